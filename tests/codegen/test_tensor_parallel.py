"""Tensor-parallel pass on one process: weight slices, collectives in the graph, local shapes."""

from __future__ import annotations

import pytest
import torch

from codegen.emit import compile_plan
from codegen.layout import ParallelLayout
from codegen.stage_split import split_stages
from codegen.tensor_parallel import ShardingError, _view_groups, count_collectives, shard_stage
from tests.codegen.plans import traced_for


def _stage(model, overrides=None, split=((0, 5),)):
    traced = traced_for(model, overrides, 2, 8)
    return traced, split_stages(traced, list(split))


@pytest.mark.parametrize("model, prefix", [("gpt-tiny", "h"), ("gpt2-tiny", "transformer.h")])
def test_fused_qkv_is_split_sharded_and_rejoined(model, prefix):
    traced, (stage,) = _stage(model)
    name = f"{prefix}.1.attn.c_attn.weight"
    full = stage.module.get_parameter(name).detach().clone()
    out_dim = 0 if model == "gpt-tiny" else 1  # nn.Linear (out, in); HF Conv1D (in, out)
    report = shard_stage(stage.module, tp=2, tp_rank=1, group_name="g", arch=traced.arch)
    local = stage.module.get_parameter(name)
    q, k, v = full.chunk(3, out_dim)
    expected = torch.cat([part.chunk(2, out_dim)[1] for part in (q, k, v)], out_dim)
    assert torch.equal(local, expected)
    assert local.numel() * 2 == full.numel()
    assert report.sharded[name] == (tuple(full.shape), tuple(local.shape))


def _charged(traced, stage, tp, sequence_parallel=False) -> dict[str, int]:
    """The collectives the cost model charges for the stage's layers (``tp_collectives``),
    counted by the functional op that implements each."""
    from cost_models.layer_cost import tp_collectives
    from planner.cluster import Workload

    ops = {"all_reduce": "all_reduce", "all_gather": "all_gather_into_tensor",
           "reduce_scatter": "reduce_scatter_tensor"}
    work = Workload(batch_size=2, seq_len=8, dtype="float32")
    counts: dict[str, int] = {}
    for j in range(stage.layers[0], stage.layers[1] + 1):
        for kind, _ in tp_collectives(traced.layers[j], traced.arch, tp, work, 2,
                                      sequence_parallel=sequence_parallel):
            counts[ops[kind]] = counts.get(ops[kind], 0) + 1
    return counts


@pytest.mark.parametrize("model", ["gpt-tiny", "gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("split", [((0, 2), (3, 5)), ((0, 5),)])  # tied tables in one stage
def test_generated_collectives_are_the_ones_the_cost_model_charges(model, sp, split):
    traced, stages = _stage(model, split=split)
    for stage in stages:
        shard_stage(stage.module, tp=2, tp_rank=0, group_name="g", arch=traced.arch,
                    sequence_parallel=sp)
        blocks = sum(traced.layers[j].kind == "block" for j in range(stage.layers[0],
                                                                     stage.layers[1] + 1))
        expected = _charged(traced, stage, 2, sp)
        assert count_collectives(stage.module) == expected
        # Megatron: 2 per block, 1 all-reduce for the embedding, 1 all-gather for the head.
        first, last = stage.layers[0] == 0, stage.layers[1] == len(traced.layers) - 1
        if not sp:
            assert expected == {"all_reduce": 2 * blocks + first,
                                **({"all_gather_into_tensor": 1} if last else {})}


@pytest.mark.parametrize("model, tables", [("gpt-tiny", 1), ("llama-tiny", 2)])  # GPT: tied
@pytest.mark.parametrize("vocab, tp", [(256, 2), (250, 4)])
def test_embedding_and_head_are_split_by_vocabulary_rows(model, tables, vocab, tp):
    traced, (stage,) = _stage(model, {"vocab_size": vocab})
    tables_named = ("wte.weight", "embed_tokens.weight", "lm_head.weight")
    full = {n: p.detach().clone() for n, p in stage.module.named_parameters()
            if n.endswith(tables_named)}
    report = shard_stage(stage.module, tp=tp, tp_rank=tp - 1, group_name="g", arch=traced.arch)
    assert len(full) == tables and sorted(report.vocab_parallel) == sorted(full)
    rows = -(-vocab // tp)  # 63 rows at 250 / 4: the last shard holds 61 and 2 zero rows
    kept = vocab - (tp - 1) * rows
    for n, w in full.items():
        local = stage.module.get_parameter(n)
        assert report.sharded[n] == (tuple(w.shape), (rows, w.shape[1]))
        assert torch.equal(local[:kept], w[(tp - 1) * rows:])
        assert not local[kept:].any()


@pytest.mark.parametrize("kv, tp, rank, head", [(1, 2, 1, 0), (2, 4, 3, 1), (2, 4, 1, 0)])
def test_kv_heads_are_replicated_when_fewer_than_tp(kv, tp, rank, head):
    traced, (stage,) = _stage("llama-tiny", {"num_key_value_heads": kv})
    name = "model.layers.0.self_attn.k_proj.weight"
    full = stage.module.get_parameter(name).detach().clone()
    shard_stage(stage.module, tp=tp, tp_rank=rank, group_name="g", arch=traced.arch)
    head_dim = traced.arch.head_dim
    assert torch.equal(stage.module.get_parameter(name), full[head * head_dim:(head + 1) * head_dim])
    q = stage.module.get_parameter("model.layers.0.self_attn.q_proj.weight")
    assert q.shape[0] == traced.arch.num_heads * head_dim // tp


def test_literal_head_counts_are_rewritten_to_local():
    traced, (stage,) = _stage("llama-tiny")
    shard_stage(stage.module, tp=2, tp_rank=0, group_name="g", arch=traced.arch)
    expands = [n.args[1] for n in stage.module.graph.nodes
               if n.target is torch.ops.aten.expand.default and len(n.args[1]) == 5]
    reshapes = [n.args[1] for n in stage.module.graph.nodes
                if n.target is torch.ops.aten.reshape.default and len(n.args[1]) == 4]
    # 2 KV heads × 2 query heads each at tp 1 -> 1 KV head × 2 per rank; 4 heads -> 2.
    assert expands[0] == [2, 1, 2, 8, 16]
    assert reshapes[0] == [2, 2, 8, 16]


def test_heads_not_divisible_by_tp_are_refused():
    traced, (stage,) = _stage("gpt-tiny")
    with pytest.raises(ShardingError, match="tp 3 does not divide"):
        shard_stage(stage.module, tp=3, tp_rank=0, group_name="g", arch=traced.arch)


def test_view_groups_pair_dims_with_equal_products():
    assert _view_groups((2, 8, 64), (2, 8, 4, 16)) == [([0], [0]), ([1], [1]), ([2], [2, 3])]
    assert _view_groups((16, 192), (2, 8, 192)) == [([0], [0, 1]), ([1], [2])]


def test_compile_plan_writes_readable_stages_with_collectives_and_p2p(tmp_path):
    traced = traced_for("llama-tiny", None, 2, 8)
    paths = compile_plan(traced, ParallelLayout.simple(1, [(0, 2, 2), (3, 5, 2)]), tmp_path)
    first, second = (p.read_text() for p in paths[:2])
    assert first.count("_c10d_functional.all_reduce.default(") == 2 * 2 + 1  # + embedding
    assert second.count("_c10d_functional.all_gather_into_tensor.default(") == 1  # logits
    assert second.count("_c10d_functional.wait_tensor.default(") == 2 * 2 + 1
    assert "# send to stage 1:" in first and "# recv from stage 0:" in second
    assert "(rotary)" in second and "(mask)" in second
    compile(first.split("\n\n", 1)[1], "stage0.py", "exec")  # the body is valid Python


@pytest.mark.parametrize("model", ["gpt-tiny", "gpt2-tiny", "llama-tiny"])
def test_sequence_parallel_swaps_all_reduce_for_reduce_scatter_and_all_gather(model):
    traced, stages = _stage(model, split=((0, 2), (3, 5)))
    for stage in stages:
        report = shard_stage(stage.module, tp=2, tp_rank=1, group_name="g", arch=traced.arch,
                             sequence_parallel=True)
        blocks = sum(traced.layers[j].kind == "block" for j in range(stage.layers[0],
                                                                     stage.layers[1] + 1))
        first, last = stage.layers[0] == 0, stage.layers[1] == len(traced.layers) - 1
        vocab = {**({"all_reduce": 1} if first else {})}  # the vocab-parallel embedding
        assert count_collectives(stage.module) == {
            "reduce_scatter_tensor": 2 * blocks, "all_gather_into_tensor": 2 * blocks + last,
            **vocab}
        assert report.all_reduces == first
        # Norms run on this rank's half of the sequence (T = 8 -> 4).
        norms = [n for n in stage.module.graph.nodes
                 if n.target in (torch.ops.aten.layer_norm.default, torch.ops.aten.mean.dim)]
        assert norms and all(n.meta["val"].shape[1] == 4 for n in norms[1:])
        stage.module.recompile()


def test_sequence_parallel_refuses_a_sequence_tp_does_not_divide():
    traced = traced_for("gpt-tiny", None, 2, 7)
    (stage,) = split_stages(traced, [(0, 5)])
    with pytest.raises(ShardingError, match="sequence length 7 is not divisible by tp 2"):
        shard_stage(stage.module, tp=2, tp_rank=0, group_name="g", arch=traced.arch,
                    sequence_parallel=True)


def test_compile_plan_with_different_tp_per_stage_names_the_boundary_ranks(tmp_path):
    traced = traced_for("llama-tiny", None, 2, 8)
    paths = compile_plan(traced, ParallelLayout.simple(1, [(0, 2, 1), (3, 5, 2)]), tmp_path)
    first, second = (p.read_text() for p in paths[:2])
    assert "# rank 0: recv from -, send to [1, 2]" in first
    assert "# rank 2: recv from 0, send to -" in second
    assert second.count("_c10d_functional.all_reduce.default(") == 4  # 2 blocks at tp 2
    assert "all_reduce" not in first.split("\n\n", 1)[1]
