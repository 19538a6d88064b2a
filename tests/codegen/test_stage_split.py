"""Stage split: chained stage modules equal the eager model; weights live where they are used."""

from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree

import planner
from codegen.stage_split import (
    StageSplitError,
    check_stage_ranges,
    model_tensor_inputs,
    run_stages,
    split_stages,
)
from planner.models import load_model

SPLITS = [[(0, 5)], [(0, 0), (1, 5)], [(0, 2), (3, 5)], [(0, 3), (4, 4), (5, 5)],
          [(0, 1), (2, 2), (3, 4), (5, 5)]]


@pytest.fixture(scope="module", params=["gpt-tiny", "gpt2-tiny", "llama-tiny", "mlp", "cnn"])
def case(request):
    lm = load_model(request.param, batch_size=2, seq_len=8)
    traced = planner.trace(lm.model, lm.args, lm.kwargs)
    with torch.no_grad():
        ref = [x for x in pytree.tree_leaves(lm.model(*lm.args, **lm.kwargs))
               if isinstance(x, torch.Tensor)]
    return lm, traced, ref


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: "-".join(f"{a}:{b}" for a, b in s))
def test_chained_stages_equal_eager_model(case, split):
    lm, traced, ref = case
    stages = split_stages(traced, split)
    with torch.no_grad():
        out = run_stages(stages, model_tensor_inputs(lm.args, lm.kwargs))
    assert len(out) == len(ref)
    for got, want in zip(out, ref):
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-4


def test_stage_inputs_and_outputs_are_the_cut_tensors(case):
    _, traced, _ = case
    stages = split_stages(traced, [(0, 1), (2, 3), (4, 5)])
    assert stages[1].inputs == tuple(t.name for t in traced.cuts[1].tensors)
    assert stages[1].outputs == tuple(t.name for t in traced.cuts[3].tensors)
    assert stages[2].inputs == stages[1].outputs
    placeholders = [n.name for n in stages[1].module.graph.nodes if n.op == "placeholder"]
    assert tuple(placeholders) == stages[1].inputs


def test_parameters_go_only_to_stages_that_use_them(case):
    _, traced, _ = case
    split = [(0, 1), (2, 3), (4, 5)]
    stages = split_stages(traced, split)
    gm = traced.graph_module
    for stage, (first, last) in zip(stages, split):
        layers = traced.layers[first:last + 1]
        # By identity: export may name a tied weight by either of its module paths.
        used = {id(gm.get_parameter(p)) for layer in layers for p in layer.params + layer.tied_params}
        held = {id(p) for p in stage.module.parameters()}
        assert held == used, f"stage {stage.index} holds the wrong parameters"
    total = {id(p) for s in stages for p in s.module.parameters()}
    assert total == {id(p) for p in gm.parameters()}


def test_tied_embedding_is_held_by_each_stage_that_uses_it():
    lm = load_model("gpt2-tiny", batch_size=1, seq_len=8)
    traced = planner.trace(lm.model, lm.args, lm.kwargs)
    first, last = split_stages(traced, [(0, 2), (3, 5)])
    assert any(traced.layers[-1].tied_params)
    tied = traced.layers[-1].tied_params[0]
    weight = traced.graph_module.get_parameter(tied)
    assert any(p is weight for p in first.module.parameters())
    assert any(p is weight for p in last.module.parameters())


def test_rotary_and_mask_tensors_cross_llama_cuts():
    lm = load_model("llama-tiny", batch_size=1, seq_len=8)
    traced = planner.trace(lm.model, lm.args, lm.kwargs)
    stages = split_stages(traced, [(0, 2), (3, 5)])
    roles = {t.name: t.role for t in traced.cuts[2].tensors}
    assert set(stages[1].inputs) == set(roles)
    assert {"rotary", "mask", "hidden"} <= set(roles.values())


@pytest.mark.parametrize("bad, message", [
    ([(0, 2), (4, 5)], "must start at layer 3"),
    ([(0, 2), (3, 4)], "extend the last stage to layer 5"),
    ([(1, 5)], "must start at layer 0"),
])
def test_bad_ranges_are_explained(bad, message):
    with pytest.raises(StageSplitError, match=message):
        check_stage_ranges(6, bad)


_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}


def _attention(stage):
    return [n for n in stage.module.graph.nodes if n.target is _SDPA]


def test_a_constant_causal_mask_becomes_the_causal_flag():
    from codegen.stage_split import causal_attention

    lm = load_model("hf:llama", _LLAMA, batch_size=2, seq_len=16)
    traced = planner.trace(lm.model, lm.args, lm.kwargs)
    sdpa = {n.name for n in traced.graph_module.graph.nodes if n.target is _SDPA}
    assert len(sdpa) == 2 and causal_attention(traced.graph_module) == sdpa
    for split in ([(0, len(traced.layers) - 1)], [(0, 1), (2, len(traced.layers) - 1)]):
        stages = split_stages(traced, split)
        nodes = [n for s in stages for n in _attention(s)]
        assert len(nodes) == 2
        assert all(n.args[3] is None and n.args[5] is True for n in nodes)
        out = run_stages(stages, model_tensor_inputs(lm.args, lm.kwargs))
        with torch.no_grad():
            ref = lm.model(*lm.args, **lm.kwargs).logits
        assert (out[0] - ref).abs().max().item() < 1e-5
    # the single-stage graph no longer builds the [b, 1, L, L] mask at all
    assert not any(n.target is torch.ops.aten.index.Tensor
                   for n in split_stages(traced, [(0, len(traced.layers) - 1)])[0]
                   .module.graph.nodes)


def test_a_padding_mask_from_the_inputs_is_kept():
    from codegen.stage_split import causal_attention

    lm = load_model("hf:llama", _LLAMA, batch_size=2, seq_len=16)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :5] = 0  # left padding: the mask depends on an input
    kwargs = {**lm.kwargs, "attention_mask": mask}
    traced = planner.trace(lm.model, lm.args, kwargs)
    assert causal_attention(traced.graph_module) == set()
    (stage,) = split_stages(traced, [(0, len(traced.layers) - 1)])
    assert all(isinstance(n.args[3], torch.fx.Node) for n in _attention(stage))
    out = run_stages([stage], model_tensor_inputs(lm.args, kwargs))
    with torch.no_grad():
        ref = lm.model(*lm.args, **kwargs).logits
    assert (out[0][1, 5:] - ref[1, 5:]).abs().max().item() < 1e-5


@pytest.mark.parametrize("split", [[(0, 1), (2, 3)], [(0, 0), (1, 2), (3, 3)], [(0, 2), (3, 3)]],
                         ids=lambda s: "-".join(f"{a}:{b}" for a, b in s))
def test_decode_step_stages_keep_their_own_kv_cache(split):
    from planner.decode import DecodeStep

    lm = load_model("hf:llama", _LLAMA, batch_size=2, seq_len=4)
    step = DecodeStep(lm.model.eval(), context_len=8)
    inputs = step.example_inputs(batch=2, tokens=1)
    traced = planner.trace(step, inputs)
    names = [n.name for n in traced.graph_module.graph.nodes if n.op == "placeholder"]
    (whole,) = split_stages(traced, [(0, len(traced.layers) - 1)])
    assert whole.inputs == tuple(names)  # one stage: the model's own call order
    stages = split_stages(traced, split)
    for stage in stages:
        first, last = stage.layers
        blocks = [j for j in range(first, last + 1) if traced.layers[j].kind == "block"]
        assert len(stage.state_inputs) == len(stage.state_outputs) == 2 * len(blocks)
        assert set(stage.state_inputs) <= {n for j in blocks for n in traced.layers[j].nodes}
        sent = set(stage.outputs) - set(stage.state_outputs)
        assert not sent & set(stage.state_outputs)
    values = model_tensor_inputs(inputs)
    want = whole.module(*values)
    got = run_stages(stages, values)
    assert len(got) == len(want) == 1 + 2 * _LLAMA["num_hidden_layers"]
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
