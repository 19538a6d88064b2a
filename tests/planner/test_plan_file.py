"""Plan save/load round trip and every malformed-file error of fx-planner/plan/v2."""

from __future__ import annotations

import json

import pytest

from planner.baselines import baselines
from planner.cluster import Cluster, Workload
from planner.cost_table import CostTable, LayerCost, Link
from planner.plan import SCHEMA, Plan, PlanFormatError
from planner.solver import solve
from planner.validate import check_plan


def _build(mbs, m):
    rows = tuple({t: LayerCost(1e-3 * mbs / t * (1 + j / 10), 2e-5 * (t > 1), 10**10 // t)
                  for t in (1, 2, 4)} for j in range(6))
    return CostTable(rows, (2**20 * mbs,) * 5, Link(1e-6, 1e11), Link(1e-5, 1e10), mbs, m,
                     stage_workspace_bytes={1: 7, 2: 7, 4: 7}, kv_heads_replicated={4: 2},
                     layer_names=tuple(f"model.layers.{j}" for j in range(6)),
                     param_bytes=(10**10,) * 6)


@pytest.fixture()
def plan_and_case():
    cluster = Cluster(1, 4, "H100", memory_bytes=24 * 10**9)
    work = Workload(batch_size=4, objective="throughput", memory_headroom=0.0)
    sol = solve(_build, cluster, work)
    table = _build(sol.microbatch_size, sol.microbatches)
    plan = Plan.from_solution(sol, table, cluster, work, model_name="toy", fingerprint="abc123",
                              baselines=baselines(_build, cluster, work))
    return plan, table, cluster, work


def test_save_load_round_trip_is_equal(plan_and_case, tmp_path):
    plan, table, cluster, work = plan_and_case
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded == plan
    assert loaded.cost_table().costs == table.costs
    assert loaded.cost_table().boundary_bytes == table.boundary_bytes
    assert check_plan(loaded, loaded.cost_table(), cluster, work) == []


def test_a_file_without_microbatch_size_gets_the_one_its_sizes_imply(plan_and_case, tmp_path):
    plan, *_ = plan_and_case
    par = plan.parallelism
    d = plan.to_dict()
    del d["parallelism"]["microbatch_size"]  # files written before the key existed
    path = tmp_path / "old.json"
    path.write_text(json.dumps(d))
    loaded = Plan.load(path)
    assert loaded.parallelism.microbatch_size == par.microbatch_size
    assert loaded.parallelism.microbatch_size * par.dp * par.microbatches == 4


def test_a_file_without_runtime_loads_as_the_eager_it_was_priced_for(plan_and_case, tmp_path):
    plan, *_ = plan_and_case
    assert plan.workload.runtime == "eager"  # its Workload names none
    d = plan.to_dict()
    d["workload"]["runtime"] = "cudagraphs"
    path = tmp_path / "graphs.json"
    path.write_text(json.dumps(d))
    assert Plan.load(path).workload.runtime == "cudagraphs"
    del d["workload"]["runtime"]  # files written before the key existed
    path.write_text(json.dumps(d))
    assert Plan.load(path).workload.runtime == "eager"
    d["workload"]["runtime"] = "jit"
    path.write_text(json.dumps(d))
    with pytest.raises(PlanFormatError, match="workload.runtime"):
        Plan.load(path)


def test_file_has_every_documented_key(plan_and_case, tmp_path):
    plan = plan_and_case[0]
    path = tmp_path / "plan.json"
    plan.save(path)
    d = json.loads(path.read_text())
    assert d["schema"] == SCHEMA
    assert set(d["model"]) == {"name", "num_layers", "fingerprint"}
    assert set(d["cluster"]) == {"num_devices", "nodes", "devices_per_node", "device"}
    assert set(d["workload"]) == {"batch_size", "seq_len", "dtype", "phase", "objective",
                                  "runtime"}
    assert {"dp", "pp", "microbatches", "sequence_parallel"} <= set(d["parallelism"])
    assert {"layers", "tp", "devices", "predicted"} <= set(d["stages"][0])
    assert set(d["stages"][0]["predicted"]) == {"compute_s", "comm_s", "memory_bytes"}
    assert {"kv_cache_bytes", "prefill_s", "prefill_boundary_bytes"} <= set(d["stages"][0])
    assert set(d["layers"][0]["costs"]) == {"1", "2", "4"}
    assert set(d["layers"][0]["costs"]["1"]) == {"compute_s", "comm_s", "memory_bytes",
                                                 "kv_cache_bytes"}
    assert len(d["boundaries"]) == 5
    assert set(d["predicted"]) == {"latency_s", "throughput_samples_per_s", "peak_memory_bytes",
                                   "ttft_s", "tpot_s", "mfu"}
    assert d["predicted"]["ttft_s"] is None and d["predicted"]["tpot_s"] is None  # prefill
    assert (d["parallelism"]["zero"], d["parallelism"]["schedule"],
            d["parallelism"]["virtual_stages"], d["predicted"]["mfu"]) == (0, None, 1, None)
    assert {s["recompute"] for s in d["stages"]} == {"none"}
    assert set(d["baselines"]) == {"even_tp_node", "pure_tp", "pure_pp", "pure_dp"}
    assert {"latency_s", "throughput_samples_per_s", "feasible"} <= set(d["baselines"]["pure_tp"])
    assert {"status", "objective", "bound", "wall_s"} <= set(d["solver"])


def test_a_decode_table_s_kv_cache_and_period_are_recorded_and_round_trip(tmp_path):
    """``LayerCost.kv_cache_bytes`` travels to ``layers[j].costs`` and sums into
    ``stages[i].kv_cache_bytes``; a decode plan's ``tpot_s`` is the solution's period."""
    def build(mbs, m):
        rows = tuple({t: LayerCost(1e-3 * mbs / t, 2e-5 * (t > 1), 10**9 // t + 3 * mbs * m,
                                   3 * mbs * m) for t in (1, 2)} for _ in range(4))
        return CostTable(rows, (2**10 * mbs,) * 3, Link(1e-6, 1e11), Link(1e-5, 1e10), mbs, m)

    cluster = Cluster(1, 2, "H100")
    work = Workload(batch_size=4, phase="decode", context_len=16, objective="throughput")
    sol = solve(build, cluster, work, pins={"pp": 2, "microbatches": 2})
    table = build(sol.microbatch_size, sol.microbatches)
    plan = Plan.from_solution(sol, table, cluster, work, model_name="toy", fingerprint="f")
    for s in plan.stages:
        first, last = s.layers
        assert s.kv_cache_bytes == 3 * 4 * (last - first + 1) \
            == table.stage_kv_cache_bytes(first, last, s.tp)
    assert plan.predicted.tpot_s == sol.predicted.period_s == 4 / sol.predicted.throughput_samples_per_s
    assert plan.predicted.ttft_s is None  # no prefill table given
    path = tmp_path / "decode.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded == plan
    assert loaded.cost_table().costs == table.costs
    assert check_plan(loaded, loaded.cost_table(), cluster, work) == []


def _write(tmp_path, plan, edit):
    d = plan.to_dict()
    edit(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    return path


def _set(d, dotted, value):
    *head, last = dotted.split(".")
    for k in head:
        d = d[int(k)] if k.isdigit() else d[k]
    d[last] = value


@pytest.mark.parametrize("edit, message", [
    (lambda d: _set(d, "schema", "fx-planner/plan/v0"),
     "schema is 'fx-planner/plan/v0'; this planner reads 'fx-planner/plan/v2'"),
    (lambda d: d["workload"].pop("seq_len"), "missing key 'workload.seq_len'"),
    (lambda d: d.pop("solver"), "missing key 'solver.status'"),
    (lambda d: _set(d, "parallelism.dp", "1"), "key 'parallelism.dp' must be int, got str '1'"),
    (lambda d: _set(d, "stages.0.layers", [1, 2, 3]), "key 'stages[0].layers' must be [first, last]"),
    (lambda d: _set(d, "layers.0.costs", {"four": d["layers"][0]["costs"]["1"]}),
     "layers[0].costs has key 'four'"),
    (lambda d: _set(d, "stages.0.layers", [1, d["stages"][0]["layers"][1]]),
     "stages must cover layers contiguously, this one should start at 0"),
    (lambda d: _set(d, "stages.0.devices", [[99] * d["stages"][0]["tp"]] * d["parallelism"]["dp"]),
     "uses device 99; the cluster has devices 0..3"),
    (lambda d: _set(d, "parallelism.pp", 7), "parallelism.pp 7 × virtual_stages 1 is 7 but stages[] has"),
    (lambda d: _set(d, "model.num_layers", 9), "model.num_layers is 9 but layers[] has 6"),
    (lambda d: d["boundaries"].pop(), "boundaries has 4 entries; 6 layers have 5 cuts"),
    (lambda d: _set(d, "cluster.num_devices", 5),
     "cluster.num_devices 5 != nodes 1 × devices_per_node 4"),
    (lambda d: _set(d, "stages.0.kv_cache_bytes", 5),
     "stages[0].kv_cache_bytes is 5; its layers' costs"),
    (lambda d: d["layers"][0]["costs"]["1"].update(kv_cache_bytes=10**11),
     "kv_cache_bytes is 100000000000, more than its memory_bytes"),
    (lambda d: _set(d, "predicted.tpot_s", 1e-3),
     "predicted.ttft_s and predicted.tpot_s are null for a prefill plan"),
    (lambda d: _set(d, "stages.0.prefill_s", 1e-3), "only decode plans have them"),
    (lambda d: _set(d, "predicted.ttft_s", -1.0), "key 'predicted.ttft_s' must be number >= 0"),
])
def test_malformed_plan_files_raise_naming_the_key(plan_and_case, tmp_path, edit, message):
    path = _write(tmp_path, plan_and_case[0], edit)
    with pytest.raises(PlanFormatError) as err:
        Plan.load(path)
    assert message in str(err.value)


def test_not_json_and_missing_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{not json")
    with pytest.raises(PlanFormatError, match="is not valid JSON"):
        Plan.load(path)
    with pytest.raises(PlanFormatError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")


def test_fingerprint_mismatch_is_refused_with_the_fix():
    import planner
    from planner.api import plan_traced
    from planner.models import load_model
    from planner.plan import PlanFormatError, check_fingerprint

    lm = load_model("gpt-tiny", batch_size=2, seq_len=32)
    traced = planner.trace(lm.model, lm.args)
    plan = plan_traced(traced, planner.Cluster.parse("2xcpu"),
                       planner.Workload(batch_size=2, seq_len=32, dtype="float32"), alternatives=0)
    check_fingerprint(plan, traced)  # the same model: accepted
    other = load_model("gpt-tiny", batch_size=2, seq_len=64)
    with pytest.raises(PlanFormatError, match="re-plan with `plan MODEL --out plan.json`"):
        check_fingerprint(plan, planner.trace(other.model, other.args))


def test_a_tied_head_in_its_own_stage_is_charged_its_table_and_recorded(tmp_path):
    import planner
    from planner.api import plan_traced
    from planner.models import load_model

    lm = load_model("gpt2-tiny", batch_size=2, seq_len=8)
    traced = planner.trace(lm.model, lm.args, lm.kwargs)
    last = len(traced.layers) - 1
    table_bytes = traced.graph_module.get_parameter(traced.layers[last].tied_params[0])
    table_bytes = table_bytes.numel() * table_bytes.element_size()
    plan = plan_traced(traced, planner.Cluster.parse("4xcpu"),
                       planner.Workload(batch_size=2, seq_len=8, dtype="float32"),
                       pins={"pp": 2, "tp": 2}, alternatives=0)
    (borrow,) = plan.borrowed
    assert (borrow.layer, borrow.previous) == (last, 0)
    assert borrow.bytes[1] == table_bytes and borrow.bytes[2] == table_bytes // 2
    head = plan.stages[-1]
    first, _ = head.layers
    costs = [plan.layers[j].costs[head.tp].memory_bytes for j in range(first, last + 1)]
    workspace = plan.stage_workspace_bytes.get(head.tp, 0)
    assert head.predicted.memory_bytes == workspace + sum(costs) + borrow.bytes[head.tp]
    path = tmp_path / "plan.json"
    plan.save(path)
    again = Plan.load(path)
    assert again.borrowed == plan.borrowed
    assert again.cost_table().stage_memory_bytes(first, last, head.tp) == \
        head.predicted.memory_bytes


def test_training_keys_are_checked_against_the_phase(plan_and_case, tmp_path):
    """Only train plans carry a schedule, ZeRO level, virtual stages, recompute and MFU; an
    interleaved schedule has virtual stages whose devices repeat those of stage i mod pp."""
    plan = plan_and_case[0]
    d = plan.to_dict()
    path = tmp_path / "plan.json"
    bad = json.loads(json.dumps(d))
    bad["parallelism"]["zero"] = 2
    path.write_text(json.dumps(bad))
    with pytest.raises(PlanFormatError, match="training keys"):
        Plan.load(path)
    train = json.loads(json.dumps(d))
    train["workload"]["phase"] = "train"
    path.write_text(json.dumps(train))
    with pytest.raises(PlanFormatError, match="schedule is null"):
        Plan.load(path)
    train["parallelism"].update(schedule="1f1b", zero=3)
    train["stages"][0]["recompute"] = "selective"
    train["predicted"]["mfu"] = 0.4
    path.write_text(json.dumps(train))
    loaded = Plan.load(path)
    assert (loaded.parallelism.zero, loaded.parallelism.schedule,
            loaded.stages[0].recompute, loaded.predicted.mfu) == (3, "1f1b", "selective", 0.4)
    train["parallelism"]["schedule"] = "interleaved"
    path.write_text(json.dumps(train))
    with pytest.raises(PlanFormatError, match="virtual_stages"):
        Plan.load(path)
    train["stages"][0]["recompute"] = "sometimes"
    path.write_text(json.dumps(train))
    with pytest.raises(PlanFormatError, match="recompute"):
        Plan.load(path)
