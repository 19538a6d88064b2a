"""Tensor-parallel rewrite on one process: weight pieces, collectives, local shapes.

Every strategy here comes from ``planner.sharding`` (the graph), and every check compares
what the rewrite did with what the analysis (and, for solved plans, the plan) says.
"""

from __future__ import annotations

import pytest
import torch

import planner
from codegen.emit import compile_plan
from codegen.layout import ParallelLayout
from codegen.stage_split import split_stages
from codegen.tensor_parallel import check_against, count_collectives, shard_stage
from planner.sharding import Shard, _view_groups, analyse_layer
from tests.codegen.plans import traced_for

_KIND = {"all_reduce": "all_reduce", "all_gather": "all_gather_into_tensor",
         "reduce_scatter": "reduce_scatter_tensor"}


def _stage(model, overrides=None, split=((0, 5),), batch=2, seq=8):
    traced = traced_for(model, overrides, batch, seq)
    return traced, split_stages(traced, list(split))


@pytest.mark.parametrize("model, prefix, out_dim", [("gpt-tiny", "h", 0),
                                                     ("gpt2-tiny", "transformer.h", 1)])
def test_fused_qkv_is_a_blocked_shard_of_equal_thirds(model, prefix, out_dim):
    traced, (stage,) = _stage(model)
    name = f"{prefix}.1.attn.c_attn.weight"
    full = stage.module.get_parameter(name).detach().clone()
    report = shard_stage(stage, traced, tp=2, tp_rank=1, group_name="g")
    assert report.analysis.params[name] == Shard(out_dim, ((64, True),) * 3)
    local = stage.module.get_parameter(name)
    q, k, v = full.chunk(3, out_dim)
    expected = torch.cat([part.chunk(2, out_dim)[1] for part in (q, k, v)], out_dim)
    assert torch.equal(local, expected)
    assert report.sharded[name] == (tuple(full.shape), tuple(local.shape))


def test_unequal_gqa_qkv_and_fused_gate_up_are_cut_where_their_consumers_cut_them():
    """phi3: qkv_proj is sliced into q (64) | k (32) | v (32), gate_up_proj chunked in two."""
    over = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256,
            "pad_token_id": 0}
    traced, (stage,) = _stage("hf:phi3", over, split=((0, 3),))
    qkv, gate_up = "model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"
    full = {n: stage.module.get_parameter(n).detach().clone() for n in (qkv, gate_up)}
    report = shard_stage(stage, traced, tp=2, tp_rank=1, group_name="g")
    assert report.analysis.params[qkv] == Shard(0, ((64, True), (32, True), (32, True)))
    assert report.analysis.params[gate_up] == Shard(0, ((128, True), (128, True)))
    w = full[qkv]
    expected = torch.cat([w[32:64], w[64 + 16:96], w[96 + 16:128]])
    assert torch.equal(stage.module.get_parameter(qkv), expected)
    assert not report.analysis.fallbacks
    # two all-reduces per block, one for the embedding, one all-gather of the logits
    assert count_collectives(stage.module) == {"all_reduce": 2 * 2 + 1,
                                               "all_gather_into_tensor": 1}


@pytest.mark.parametrize("model", ["gpt-tiny", "gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("pp", [2, 1])  # pp 1: tied tables in one stage
def test_inserted_collectives_are_the_analysis_and_the_plan_record(model, sp, pp):
    from planner.api import plan_traced

    traced = traced_for(model, None, 2, 8)
    workload = planner.Workload(batch_size=2, seq_len=8, dtype="float32")
    pins = {"tp": 2, "pp": pp, "dp": 2 // pp}
    plan = plan_traced(traced, planner.Cluster.parse("4xcpu"), workload, pins=pins,
                       sequence_parallel=sp)
    split = [s.layers for s in plan.stages]
    micro = traced_for(model, None, plan.parallelism.microbatch_size, 8)
    for stage, rec in zip(split_stages(micro, split), plan.stages, strict=True):
        report = shard_stage(stage, micro, 2, 0, "g", sharding=rec.sharding,
                             sequence_parallel=sp)
        check_against(report, rec.sharding)  # kind and bytes, each one
        inserted = sorted(report.collectives)
        assert inserted == sorted((c.kind, c.bytes) for c in report.analysis.collectives)
        counts = {}
        for kind, _ in inserted:
            counts[_KIND[kind]] = counts.get(_KIND[kind], 0) + 1
        assert count_collectives(stage.module) == counts
        blocks = sum(micro.layers[j].kind == "block"
                     for j in range(stage.layers[0], stage.layers[1] + 1))
        first, last = stage.layers[0] == 0, stage.layers[1] == len(micro.layers) - 1
        if not sp:  # Megatron: 2 per block, the embedding's, the logits' gather
            expected = {"all_reduce": 2 * blocks + first, "all_gather_into_tensor": int(last)}
            assert counts == {k: n for k, n in expected.items() if n}
        elif model == "llama-tiny":  # linear: every partial sum is reduce-scattered over T
            assert counts.get("reduce_scatter_tensor", 0) == 2 * blocks + first


@pytest.mark.parametrize("vocab, tp, split", [(256, 2, True), (250, 4, False)])
def test_embedding_and_head_are_split_by_rows_when_tp_divides_the_vocabulary(vocab, tp, split):
    traced, (stage,) = _stage("llama-tiny", {"vocab_size": vocab})
    tables = ("model.embed_tokens.weight", "lm_head.weight")
    full = {n: stage.module.get_parameter(n).detach().clone() for n in tables}
    report = shard_stage(stage, traced, tp=tp, tp_rank=tp - 1, group_name="g")
    for n in tables:
        local = stage.module.get_parameter(n)
        if split:
            rows = vocab // tp
            assert torch.equal(local, full[n][(tp - 1) * rows:])
        else:  # 250 rows do not split 4 ways: the tables stay whole
            assert n not in report.sharded and torch.equal(local, full[n])


@pytest.mark.parametrize("kv, tp", [(1, 2), (2, 4)])
def test_kv_projections_stay_whole_when_fewer_kv_heads_than_ranks(kv, tp):
    traced, (stage,) = _stage("llama-tiny", {"num_key_value_heads": kv})
    name = "model.layers.0.self_attn.k_proj.weight"
    full = stage.module.get_parameter(name).detach().clone()
    report = shard_stage(stage, traced, tp=tp, tp_rank=tp - 1, group_name="g")
    assert torch.equal(stage.module.get_parameter(name), full)
    q = stage.module.get_parameter("model.layers.0.self_attn.q_proj.weight")
    assert q.shape[0] == traced.arch.num_heads * traced.arch.head_dim // tp
    assert not report.analysis.fallbacks  # the whole K/V are sliced to this rank's heads


def test_literal_head_counts_are_rewritten_to_local():
    traced, (stage,) = _stage("llama-tiny")
    shard_stage(stage, traced, tp=2, tp_rank=0, group_name="g")
    expands = [n.args[1] for n in stage.module.graph.nodes
               if n.target is torch.ops.aten.expand.default and len(n.args[1]) == 5]
    reshapes = [n.args[1] for n in stage.module.graph.nodes
                if n.target is torch.ops.aten.reshape.default and len(n.args[1]) == 4]
    # 2 KV heads × 2 query heads each at tp 1 -> 1 KV head × 2 per rank; 4 heads -> 2.
    assert expands[0] == [2, 1, 2, 8, 16]
    assert reshapes[0] == [2, 2, 8, 16]


def test_a_tp_that_splits_no_head_keeps_the_attention_whole_instead_of_failing():
    """4 heads at tp 3: no projection splits into whole heads; the analysis replicates what
    it cannot shard (priced), and the rewrite never raises."""
    traced, (stage,) = _stage("gpt-tiny")
    report = shard_stage(stage, traced, tp=3, tp_rank=0, group_name="g")
    assert "h.0.attn.c_attn.weight" not in report.sharded


def test_view_groups_pair_dims_with_equal_products():
    assert _view_groups((2, 8, 64), (2, 8, 4, 16)) == [([0], [0]), ([1], [1]), ([2], [2, 3])]
    assert _view_groups((16, 192), (2, 8, 192)) == [([0], [0, 1]), ([1], [2])]


def test_analysis_is_pure():
    traced = traced_for("llama-tiny", None, 2, 8)
    before = [(n.name, n.target, n.args) for n in traced.graph_module.graph.nodes]
    params = {n: p.clone() for n, p in traced.graph_module.named_parameters()}
    analyse_layer(traced, 1, 2)
    assert before == [(n.name, n.target, n.args) for n in traced.graph_module.graph.nodes]
    assert all(torch.equal(p, params[n]) for n, p in traced.graph_module.named_parameters())


def test_compile_plan_writes_readable_stages_with_collectives_and_p2p(tmp_path):
    traced = traced_for("llama-tiny", None, 2, 8)
    paths = compile_plan(traced, ParallelLayout.simple(1, [(0, 2, 2), (3, 5, 2)]), tmp_path)
    first, second = (p.read_text() for p in paths[:2])
    assert first.count("_c10d_functional.all_reduce.default(") == 2 * 2 + 1  # + embedding
    assert second.count("_c10d_functional.all_gather_into_tensor.default(") == 1  # logits
    assert second.count("_c10d_functional.wait_tensor.default(") == 2 * 2 + 1
    assert "# send to stage 1:" in first and "# recv from stage 0:" in second
    assert "(rotary)" in second and "(mask)" in second
    assert "# sharded weights" in first and "S(0)" in first
    compile(first.split("\n\n", 1)[1], "stage0.py", "exec")  # the body is valid Python


@pytest.mark.parametrize("model", ["gpt-tiny", "gpt2-tiny", "llama-tiny"])
def test_sequence_parallel_runs_norms_on_the_local_sequence(model):
    traced, stages = _stage(model, split=((0, 2), (3, 5)))
    for stage in stages:
        report = shard_stage(stage, traced, tp=2, tp_rank=1, group_name="g",
                             sequence_parallel=True)
        assert not report.analysis.fallbacks
        # Norms run on this rank's half of the sequence (T = 8 -> 4): their inputs are
        # sequence shards, by the analysis.
        norms = [n for n in stage.module.graph.nodes
                 if n.target in (torch.ops.aten.layer_norm.default, torch.ops.aten.mean.dim)]
        places = [report.analysis.nodes[n.name].placement for n in norms]
        assert norms and all(p == Shard(1, ((8, True),)) for p in places[1:])


def test_sequence_parallel_with_a_sequence_tp_does_not_divide_keeps_it_whole():
    traced = traced_for("gpt-tiny", None, 2, 7)
    (stage,) = split_stages(traced, [(0, 5)])
    report = shard_stage(stage, traced, tp=2, tp_rank=0, group_name="g", sequence_parallel=True)
    assert "reduce_scatter_tensor" not in count_collectives(stage.module)
    # greedy (no plan): 2 per block, and both tables (tokens, positions) split by rows
    assert report.all_reduces == 2 * 4 + 2


def test_compile_plan_with_different_tp_per_stage_names_the_boundary_ranks(tmp_path):
    traced = traced_for("llama-tiny", None, 2, 8)
    paths = compile_plan(traced, ParallelLayout.simple(1, [(0, 2, 1), (3, 5, 2)]), tmp_path)
    first, second = (p.read_text() for p in paths[:2])
    assert "# rank 0: recv from -, send to [1, 2]" in first
    assert "# rank 2: recv from 0, send to -" in second
    assert second.count("_c10d_functional.all_reduce.default(") == 4  # 2 blocks at tp 2
    assert "all_reduce" not in first.split("\n\n", 1)[1]
