"""Tracing: equality with eager, layers, parameter accounting, FLOPs, cut points."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import planner
from planner.models import load_model
from planner.op_stats import node_work

SMALL = ["gpt-tiny", "gpt2-tiny", "llama-tiny", "mlp", "cnn"]


def _trace(name, overrides=None, device="cpu", **kw):
    lm = load_model(name, overrides, batch_size=2, seq_len=16, device=device)
    return lm, planner.trace(lm.model, lm.args, lm.kwargs, name=name, arch=lm.arch, **kw)


def _output(value):
    return value.logits if hasattr(value, "logits") else value


@pytest.mark.parametrize("name", SMALL)
def test_traced_graph_equals_eager(name):
    lm, traced = _trace(name)
    with torch.no_grad():
        expected = _output(lm.model(*lm.args, **lm.kwargs))
        got = _output(traced.graph_module(*lm.args, **lm.kwargs))
    assert traced.tracer == "export"
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", SMALL)
def test_layers_are_pre_blocks_post(name):
    lm, traced = _trace(name)
    n_blocks = lm.arch.num_layers
    assert len(traced.layers) == n_blocks + 2
    assert [layer.kind for layer in traced.layers] == ["pre"] + ["block"] * n_blocks + ["post"]
    assert [layer.index for layer in traced.layers] == list(range(n_blocks + 2))
    assert len(traced.cuts) == n_blocks + 1
    # Every non-structural fx node belongs to exactly one layer.
    owned = [n for layer in traced.layers for n in layer.nodes]
    assert len(owned) == len(set(owned)) == len(traced.graph_module.graph.nodes)


@pytest.mark.parametrize("name", SMALL)
def test_parameter_bytes_sum_exactly_to_model(name):
    lm, traced = _trace(name)
    unique = {id(p): p for p in lm.model.parameters()}.values()
    expected = sum(p.numel() * p.element_size() for p in unique)
    assert traced.param_bytes == expected
    assert sum(layer.param_bytes for layer in traced.layers) == expected


def test_tied_embedding_is_owned_once_and_listed_as_tied():
    _, traced = _trace("gpt-tiny")
    pre, post = traced.layers[0], traced.layers[-1]
    assert "wte.weight" in pre.params
    assert "lm_head.weight" not in post.params
    assert any(name.endswith("wte.weight") or name.endswith("lm_head.weight") for name in post.tied_params)


class _Linears(nn.Module):
    def __init__(self, sizes):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(sizes, sizes[1:]))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_linear_flops_are_2_b_t_in_out():
    B, T, sizes = 3, 5, [16, 32, 24]
    model = _Linears(sizes).eval()
    traced = planner.trace(model, (torch.randn(B, T, sizes[0]),))
    blocks = [layer for layer in traced.layers if layer.kind == "block"]
    assert [b.flops for b in blocks] == [2 * B * T * i * o for i, o in zip(sizes, sizes[1:])]
    assert [b.op_stats["matmul"].flops for b in blocks] == [b.flops for b in blocks]


def test_attention_block_flops_match_hand_count():
    # GPT block: qkv (3C^2), proj (C^2), fc (4C^2), fc2 (4C^2) matmuls + SDPA (2 x 2*B*h*T*T*hs).
    lm, traced = _trace("gpt-tiny")
    B, T, C = 2, 16, 64
    block = traced.layers[1]
    assert block.op_stats["matmul"].flops == 2 * B * T * C * C * (3 + 1 + 4 + 4)
    assert block.op_stats["attention"].flops == 2 * (2 * B * T * T * C)


def test_rope_cut_lists_hidden_state_and_rotary_tensors():
    lm, traced = _trace("llama-tiny")
    cut = traced.cuts[2]  # between model.layers.1 and model.layers.2
    roles = [t.role for t in cut.tensors]
    hidden = [t for t in cut.tensors if t.role == "hidden"]
    assert len(hidden) == 1 and hidden[0].shape == (2, 16, 64)
    assert roles.count("rotary") == 2  # cos and sin
    rotary = [t for t in cut.tensors if t.role == "rotary"]
    assert all(t.shape[-2:] == (16, lm.arch.head_dim) for t in rotary)
    assert cut.bytes == sum(t.bytes for t in cut.tensors)
    assert hidden[0].bytes == 2 * 16 * 64 * 4


def test_cut_after_layer_records_exactly_the_values_used_later():
    lm, traced = _trace("gpt-tiny")
    gm = traced.graph_module
    layer_of = traced.layer_of_node
    for cut in traced.cuts:
        j = cut.after_layer
        expected = {
            n.name
            for n in gm.graph.nodes
            if n.op not in ("get_attr", "output") and layer_of[n.name] <= j
            and any(layer_of[u.name] > j for u in n.users)
            and isinstance(n.meta.get("val"), torch.Tensor)
        }
        assert {t.name for t in cut.tensors} == expected


def test_meta_trace_folds_blocks_and_matches_a_real_trace():
    overrides = {"num_hidden_layers": 8}
    _, real = _trace("llama-tiny", overrides)
    _, meta = _trace("llama-tiny", overrides, device="meta")
    assert meta.folded and not real.folded
    assert len(meta.layers) == len(real.layers) == 10
    assert meta.fingerprint == real.fingerprint
    assert [layer.param_bytes for layer in meta.layers] == [layer.param_bytes for layer in real.layers]
    assert [layer.flops for layer in meta.layers] == [layer.flops for layer in real.layers]
    assert [c.bytes for c in meta.cuts] == [c.bytes for c in real.cuts]
    assert meta.param_bytes == real.param_bytes


def test_fingerprint_changes_with_shapes():
    _, a = _trace("gpt-tiny")
    lm = load_model("gpt-tiny", batch_size=2, seq_len=32)
    b = planner.trace(lm.model, lm.args)
    assert a.fingerprint != b.fingerprint


def _llama_param_count(vocab, hidden, inter, layers, heads, kv):
    head_dim = hidden // heads
    attn = hidden * heads * head_dim + 2 * hidden * kv * head_dim + heads * head_dim * hidden
    block = attn + 3 * hidden * inter + 2 * hidden
    return vocab * hidden + layers * block + hidden + hidden * vocab


@pytest.mark.slow
def test_llama_3_70b_traces_on_meta_with_exact_parameter_count():
    lm = load_model("llama-3-70b", batch_size=1, seq_len=512, dtype=torch.bfloat16, device="meta")
    traced = planner.trace(lm.model, lm.args, lm.kwargs, name="llama-3-70b")
    expected = _llama_param_count(128256, 8192, 28672, 80, 64, 8)
    assert traced.num_params == expected
    assert traced.param_bytes == 2 * expected
    assert len(traced.layers) == 82 and traced.folded
    assert sum(layer.param_bytes for layer in traced.layers) == 2 * expected


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return self.lin(x)
        return -self.lin(x)


class _BranchyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(_Branchy(), nn.Linear(8, 8)) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_untraceable_model_names_module_and_fix():
    model = _BranchyNet().eval()
    with pytest.raises(planner.TraceError) as info:
        planner.trace(model, (torch.randn(2, 8),))
    message = str(info.value)
    assert "torch.export failed in module blocks.0.0 (_Branchy)" in message
    assert "fx.symbolic_trace failed in module blocks.0.0 (_Branchy)" in message
    assert "leaf_modules" in message


def test_symbolic_trace_fallback_with_leaf_module_equals_eager():
    model = _BranchyNet().eval()
    x = torch.randn(2, 8)
    traced = planner.trace(model, (x,), leaf_modules=(_Branchy,))
    assert traced.tracer == "symbolic_trace"
    assert [layer.name for layer in traced.layers] == ["blocks.0", "blocks.1"]
    torch.testing.assert_close(traced.graph_module(x), model(x), rtol=0, atol=0)
    assert sum(layer.param_bytes for layer in traced.layers) == traced.param_bytes
    assert traced.layers[0].op_stats["matmul"].flops == 2 * 2 * 8 * 8 * 2


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


def _counted_flops(model, x) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("head", [False, True])
def test_top_level_sequential_blocks_are_layers(head):
    """A model that is an ``nn.Sequential`` (its blocks are the root's children), with and
    without an embedding-like first and a head-like last child of other classes."""
    torch.manual_seed(0)
    blocks = [_Residual(16) for _ in range(4)]
    model = nn.Sequential(nn.Linear(8, 16), *blocks, nn.Linear(16, 3)) if head \
        else nn.Sequential(*blocks)
    x = torch.randn(5, 8 if head else 16)
    traced = planner.trace(model.eval(), (x,))
    names = [layer.name for layer in traced.layers]
    assert names == (["pre", "1", "2", "3", "4", "post"] if head else ["0", "1", "2", "3"])
    assert traced.block_container == ""
    # every layer has work, and the layers' FLOPs are the whole graph's: each node counted
    # once, its matmuls exactly what torch's own flop counter finds in the model
    assert all(layer.flops > 0 for layer in traced.layers)
    graph_flops = sum(node_work(n).flops for n in traced.graph_module.graph.nodes)
    assert sum(layer.flops for layer in traced.layers) == traced.flops == graph_flops
    matmul = [layer.op_stats["matmul"].flops for layer in traced.layers]
    assert sum(matmul) == _counted_flops(model, x)
    assert [f for f, layer in zip(matmul, traced.layers) if layer.kind == "block"] == \
        [2 * 5 * (16 * 64 + 64 * 16)] * 4  # fc1 and fc2 of each block, batch 5
    if head:
        assert matmul[0] == 2 * 5 * 8 * 16 and matmul[-1] == 2 * 5 * 16 * 3
    assert [layer.param_bytes for layer in traced.layers if layer.kind == "block"] == \
        [sum(p.numel() * 4 for p in b.parameters()) for b in blocks]
    with torch.no_grad():
        torch.testing.assert_close(traced.graph_module(x), model(x), rtol=0, atol=0)


def test_pipeline_plan_of_a_sequential_has_compute_in_every_stage():
    model = nn.Sequential(nn.Linear(64, 256), *[_Residual(256) for _ in range(6)],
                          nn.Linear(256, 10)).eval()
    x = torch.randn(8, 64)
    traced = planner.trace(model, (x,))
    work = planner.Workload(batch_size=8, seq_len=traced.seq_len)
    plan = planner.plan(traced, planner.Cluster.parse("4xH100"), work, pins={"pp": 4, "dp": 1},
                        alternatives=0)
    assert len(plan.stages) == 4
    assert all(stage.predicted.compute_s > 0 for stage in plan.stages)
    covered = [j for stage in plan.stages for j in range(stage.layers[0], stage.layers[1] + 1)]
    assert covered == list(range(len(traced.layers))) and len(traced.layers) == 8
    blocks = sum(1 for layer in traced.layers if layer.kind == "block")
    assert blocks == 6


class _Stacked(nn.Module):
    """Blocks in a Sequential between two children of other classes (not the root)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), *[_Residual(16) for _ in range(n)],
                                  nn.LayerNorm(16))

    def forward(self, x):
        return self.body(x).sum(-1)


def test_folding_a_run_of_blocks_inside_a_sequential_matches_a_real_trace():
    torch.manual_seed(0)
    real_model = _Stacked(8).eval()
    x = torch.randn(3, 8)
    real = planner.trace(real_model, (x,))
    meta_model = _Stacked(8).to("meta").eval()
    meta = planner.trace(meta_model, (x.to("meta"),))
    assert meta.folded and not real.folded
    assert [layer.name for layer in meta.layers] == \
        ["pre"] + [f"body.{i}" for i in range(1, 9)] + ["post"]
    assert [layer.name for layer in real.layers] == [layer.name for layer in meta.layers]
    assert [layer.flops for layer in meta.layers] == [layer.flops for layer in real.layers]
    assert [layer.param_bytes for layer in meta.layers] == \
        [layer.param_bytes for layer in real.layers]
    assert meta.layers[-1].params == real.layers[-1].params == ("body.9.weight", "body.9.bias")
    assert meta.fingerprint == real.fingerprint
    assert len(meta_model.body) == 10  # the container is restored after folding


_TINY_MIXTRAL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
                 "vocab_size": 128}


@pytest.mark.parametrize("blocks", [2, 8])
def test_moe_meta_trace_equals_the_cpu_trace(blocks):
    """transformers' MoE routing branches on the device (``histc`` on float on cpu, on int32
    elsewhere): a model built on meta is traced as if on cpu, so a plan made on meta passes
    the cpu fingerprint check of ``plan run`` (folded at 8 blocks, not at 2)."""
    overrides = dict(_TINY_MIXTRAL, num_hidden_layers=blocks)
    _, real = _trace("hf:mixtral", overrides)
    lm, meta = _trace("hf:mixtral", overrides, device="meta")
    assert meta.folded == (blocks == 8) and not real.folded
    assert meta.fingerprint == real.fingerprint
    assert [layer.name for layer in meta.layers] == [layer.name for layer in real.layers]
    assert [layer.flops for layer in meta.layers] == [layer.flops for layer in real.layers]
    assert [layer.op_stats for layer in meta.layers] == [layer.op_stats for layer in real.layers]
    assert [c.bytes for c in meta.cuts] == [c.bytes for c in real.cuts]
    assert all(p.is_meta for p in lm.model.parameters())  # still nothing allocated
    assert all(p.is_meta for p in meta.graph_module.parameters())
    histc = [n for n in meta.graph_module.graph.nodes if "histc" in str(n.target)]
    assert histc and all(n.meta["val"].dtype == torch.float32 for n in histc)  # the cpu path


def test_a_layout_op_that_must_copy_is_priced_as_a_copy_of_its_output():
    """GQA's keys expanded to every head and reshaped, and a transposed tensor made
    contiguous, are copies (class ``copy``, reading and writing the output's bytes); the
    same ops on tensors whose strides allow a view stay free views."""
    class Layout(nn.Module):
        def forward(self, k, x):
            b, kv, s, d = k.shape
            rep = k[:, :, None].expand(b, kv, 2, s, d).reshape(b, kv * 2, s, d)  # copies
            flat = x.reshape(x.shape[0], -1)  # a view
            made = x.transpose(1, 2).contiguous()  # copies
            kept = x.contiguous()  # already contiguous: a view
            return rep, flat, made, kept

    g = torch.export.export(Layout(), (torch.zeros(2, 3, 5, 4), torch.zeros(2, 6, 7)),
                            strict=False).graph_module
    works = {n.name: node_work(n) for n in g.graph.nodes if n.op == "call_function"}
    assert {w.op for w in works.values()} >= {"reshape", "contiguous"}
    copies = {name: w for name, w in works.items() if w.op_class == "copy"}
    assert sorted(w.bytes_written for w in copies.values()) == [2 * 6 * 7 * 4, 2 * 6 * 5 * 4 * 4]
    assert all(w.bytes_read == w.bytes_written and w.flops == 0 for w in copies.values())
    assert len(copies) == 2  # the flat reshape and the no-op contiguous are not copies
