"""What a decode plan records for a generation run to be compared against (issue 12):
the KV cache each device of a stage holds, the time to first token (the prompt's prefill
on the plan's own stages) and the time per output token (one pipelined round)."""

from __future__ import annotations

import json
import re

import pytest

from planner.api import plan_traced
from planner.cluster import Cluster, Workload
from planner.cost_builder import CostBuilder
from planner.models.loader import load_model
from planner.plan import Plan
from planner.report import render_plan
from planner.tracing import trace

# the tiny HF llama of tests/codegen/test_generation.py (_MODEL), fp32
_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "vocab_size": 256}
BATCH, SEQ, CONTEXT = 4, 8, 24


def _traced(kv_heads: int):
    config = {**_CONFIG, "num_key_value_heads": kv_heads}
    lm = load_model("hf:llama", config, batch_size=BATCH, seq_len=SEQ, context_len=CONTEXT)
    return config, trace(lm.model, lm.args, lm.kwargs, name=lm.name, arch=lm.arch)


@pytest.fixture(scope="module")
def gqa():
    return _traced(2)


@pytest.fixture(scope="module")
def mqa():
    return _traced(1)


def _decode(traced, cluster: str, pins: dict) -> Plan:
    work = Workload(batch_size=BATCH, seq_len=SEQ, dtype="float32", phase="decode",
                    context_len=CONTEXT)
    return plan_traced(traced, Cluster.parse(cluster), work, pins=pins, alternatives=0)


def _blocks(plan: Plan, stage) -> int:
    first, last = stage.layers
    return sum(bool(re.fullmatch(r"model\.layers\.\d+", plan.layers[j].name))
               for j in range(first, last + 1))


def _expected_kv(config: dict, plan: Plan, stage) -> int:
    """rows × context × blocks × 2 × local KV heads × head_dim × 4 bytes, from the config."""
    kv, tp = config["num_key_value_heads"], stage.tp
    local = kv // tp if kv % tp == 0 else kv  # fewer KV heads than ranks: each keeps all
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    rows = plan.parallelism.microbatch_size * plan.parallelism.microbatches  # one replica
    return rows * CONTEXT * _blocks(plan, stage) * 2 * local * head_dim * 4


def _hops(plan: Plan, sizes) -> list[float]:
    """The transfer after every stage but the last, priced as the solver prices a cut."""
    per_node, offset, hops = plan.cluster.devices_per_node, 0, []
    for i, (s, nbytes) in enumerate(zip(plan.stages, sizes, strict=True)):
        offset += s.tp
        if i + 1 < len(plan.stages):
            link = plan.links["inter_node" if offset % per_node == 0 else "intra_node"]
            hops.append(link.latency_s + nbytes / link.bandwidth_bytes_per_s)
    return hops


CASES = [  # (cluster, pins): tp 2; pp 2 with 2 microbatches; tp 2 x pp 2; 2 replicas
    ("2xcpu", {"tp": 2, "pp": 1}),
    ("2xcpu", {"tp": 1, "pp": 2, "dp": 1, "microbatches": 2}),
    ("4xcpu", {"tp": 2, "pp": 2, "dp": 1, "microbatches": 2}),
    ("4xcpu", {"tp": 2, "pp": 1, "dp": 2, "microbatches": 1}),
]


@pytest.mark.parametrize("cluster, pins", CASES)
def test_stage_kv_cache_bytes_are_the_hand_formula_and_the_sum_of_its_layers(gqa, cluster, pins):
    config, traced = gqa
    plan = _decode(traced, cluster, pins)
    assert {k: getattr(plan.parallelism, k) for k in pins if k != "tp"} == \
        {k: v for k, v in pins.items() if k != "tp"}
    assert all(s.tp == pins["tp"] for s in plan.stages)
    for s in plan.stages:
        first, last = s.layers
        assert s.kv_cache_bytes == _expected_kv(config, plan, s) > 0
        assert s.kv_cache_bytes == sum(plan.layers[j].costs[s.tp].kv_cache_bytes
                                       for j in range(first, last + 1))
        assert s.kv_cache_bytes <= s.predicted.memory_bytes
    table = plan.cost_table()
    assert [table.stage_kv_cache_bytes(*s.layers, s.tp) for s in plan.stages] == \
        [s.kv_cache_bytes for s in plan.stages]


def test_fewer_kv_heads_than_ranks_keep_the_whole_cache(mqa):
    config, traced = mqa
    plan = _decode(traced, "2xcpu", {"tp": 2, "pp": 1})
    (stage,) = plan.stages
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    whole = BATCH * CONTEXT * 2 * 2 * 1 * head_dim * 4  # 2 blocks, k and v, 1 KV head
    assert stage.kv_cache_bytes == _expected_kv(config, plan, stage) == whole
    assert stage.kv_heads_replicated == 2


@pytest.mark.parametrize("cluster, pins", CASES)
def test_tpot_and_ttft_are_the_pipeline_formulas_of_the_plans_own_figures(gqa, cluster, pins):
    _, traced = gqa
    plan = _decode(traced, cluster, pins)
    m, p = plan.parallelism.microbatches, plan.predicted
    # TPOT: one round of m groups through the decode stages and cuts
    t = [s.predicted.compute_s + s.predicted.comm_s for s in plan.stages]
    c = _hops(plan, [plan.boundaries[s.layers[1]] if i + 1 < len(plan.stages) else 0
                     for i, s in enumerate(plan.stages)])
    assert p.tpot_s == pytest.approx(max(sum(t) + sum(c), m * max(t + c)), rel=1e-9)
    assert p.tpot_s == pytest.approx(BATCH / p.throughput_samples_per_s, rel=1e-9)
    if not c or max(c) <= max(t):  # the max over stages alone, where no cut is slower
        assert p.tpot_s == pytest.approx(max(sum(t) + sum(c), m * max(t)), rel=1e-9)
    # TTFT: the fill of m prompt microbatches through the same stages, prefill priced
    t1 = [s.prefill_s for s in plan.stages]
    c1 = _hops(plan, [s.prefill_boundary_bytes for s in plan.stages])
    assert p.ttft_s == pytest.approx(sum(t1) + sum(c1) + (m - 1) * max(t1 + c1), rel=1e-9)
    if not c1 or max(c1) <= max(t1):
        assert p.ttft_s == pytest.approx(sum(t1) + sum(c1) + (m - 1) * max(t1), rel=1e-9)
    # the prefill boundaries are the traced cuts at one microbatch of SEQ-token prompts
    mb = plan.parallelism.microbatch_size
    cuts = [int(traced.cuts[s.layers[1]].bytes * (mb * SEQ) / (BATCH * SEQ))
            for s in plan.stages[:-1]]
    assert [s.prefill_boundary_bytes for s in plan.stages] == cuts + [0]
    # prefill_s is the prefill table's stage time at the plan's microbatch size and count,
    # priced with the strategies the decode plan records
    decode = CostBuilder(traced, Cluster.parse(cluster), Workload(
        batch_size=BATCH, seq_len=SEQ, dtype="float32", phase="decode", context_len=CONTEXT))
    prefill = CostBuilder(traced, decode.cluster, Workload(
        batch_size=BATCH, seq_len=SEQ, dtype="float32", phase="prefill", context_len=CONTEXT),
        strategies=decode)
    assert prefill.sharded == decode.sharded and prefill.tp_degrees == decode.tp_degrees
    table = prefill(mb, m)
    assert t1 == pytest.approx([table.stage_time_s(*s.layers, s.tp) for s in plan.stages],
                               rel=1e-12)
    assert all(a > b for a, b in zip(t1, t))  # SEQ tokens per sequence, not 1


def test_one_stage_one_microbatch_tpot_is_the_stage_time_and_the_step_latency(gqa):
    _, traced = gqa
    plan = _decode(traced, "2xcpu", {"tp": 2, "pp": 1, "microbatches": 1})
    (stage,) = plan.stages
    step = stage.predicted.compute_s + stage.predicted.comm_s
    assert plan.predicted.tpot_s == pytest.approx(step, rel=1e-12)
    assert plan.predicted.tpot_s == pytest.approx(plan.predicted.latency_s, rel=1e-12)
    assert plan.predicted.ttft_s == pytest.approx(stage.prefill_s, rel=1e-12)


def test_prefill_plans_have_no_generation_figures(gqa, tmp_path):
    _, traced = gqa
    plan = plan_traced(traced, Cluster.parse("2xcpu"),
                       Workload(batch_size=BATCH, seq_len=SEQ, dtype="float32"),
                       pins={"tp": 2}, alternatives=0)
    assert plan.predicted.ttft_s is None and plan.predicted.tpot_s is None
    for s in plan.stages:
        assert s.kv_cache_bytes == 0 and s.prefill_s is None and s.prefill_boundary_bytes is None
    assert all(c.kv_cache_bytes == 0 for layer in plan.layers for c in layer.costs.values())
    plan.save(tmp_path / "prefill.json")
    d = json.loads((tmp_path / "prefill.json").read_text())
    assert d["predicted"]["ttft_s"] is None and d["predicted"]["tpot_s"] is None
    # (the sharding record's in-memory notes are not in the file; compare what is)
    assert Plan.load(tmp_path / "prefill.json").to_dict() == plan.to_dict()


def test_decode_figures_round_trip_and_old_files_load_with_defaults(gqa, tmp_path):
    _, traced = gqa
    plan = _decode(traced, "4xcpu", {"tp": 2, "pp": 2, "dp": 1, "microbatches": 2})
    path = tmp_path / "decode.json"
    plan.save(path)
    d = json.loads(path.read_text())
    assert d["predicted"]["ttft_s"] == plan.predicted.ttft_s > 0
    assert d["predicted"]["tpot_s"] == plan.predicted.tpot_s > 0
    assert [s["kv_cache_bytes"] for s in d["stages"]] == [s.kv_cache_bytes for s in plan.stages]
    assert [s["prefill_s"] for s in d["stages"]] == [s.prefill_s for s in plan.stages]
    assert d["layers"][1]["costs"]["2"]["kv_cache_bytes"] > 0
    loaded = Plan.load(path)
    assert loaded.to_dict() == plan.to_dict()
    assert loaded.predicted == plan.predicted
    assert [(s.kv_cache_bytes, s.prefill_s, s.prefill_boundary_bytes) for s in loaded.stages] \
        == [(s.kv_cache_bytes, s.prefill_s, s.prefill_boundary_bytes) for s in plan.stages]
    assert loaded.cost_table().costs == plan.cost_table().costs
    assert any(c.kv_cache_bytes for row in loaded.cost_table().costs for c in row.values())
    # a file written before these keys: loads, with no figures and no cache recorded
    for s in d["stages"]:
        for key in ("kv_cache_bytes", "prefill_s", "prefill_boundary_bytes"):
            del s[key]
    for layer in d["layers"]:
        for c in layer["costs"].values():
            del c["kv_cache_bytes"]
    del d["predicted"]["ttft_s"], d["predicted"]["tpot_s"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(d))
    again = Plan.load(old)
    assert again.predicted.ttft_s is None and again.predicted.tpot_s is None
    assert all(s.kv_cache_bytes == 0 and s.prefill_s is None for s in again.stages)
    assert again.predicted.latency_s == plan.predicted.latency_s


def test_a_stage_kv_cache_that_is_not_its_layers_sum_is_refused(gqa, tmp_path):
    from planner.plan import PlanFormatError

    _, traced = gqa
    plan = _decode(traced, "2xcpu", {"tp": 2, "pp": 1})
    d = plan.to_dict()
    d["stages"][0]["kv_cache_bytes"] += 1
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(PlanFormatError, match=r"stages\[0\]\.kv_cache_bytes is"):
        Plan.load(path)


def test_plan_summary_shows_ttft_and_tpot_for_decode_plans(gqa):
    from rich.console import Console

    _, traced = gqa
    plan = _decode(traced, "2xcpu", {"tp": 1, "pp": 2, "dp": 1, "microbatches": 2})
    console = Console(width=160, record=True)
    render_plan(plan, console)
    text = console.export_text()
    line = next(x for x in text.splitlines() if x.startswith("decode:"))
    assert f"({SEQ}-token prompts)" in line and "TPOT" in line and "TTFT" in line
    assert "KV cache per device by stage: 24.00 KiB / 24.00 KiB" in line
