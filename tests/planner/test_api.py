"""planner.plan end to end on real model shapes: optimality vs baselines, memory, pins."""

from __future__ import annotations

import math

import pytest
import torch

import planner
from planner.api import objective_terms, plan_traced
from planner.cost_builder import CostBuilder
from planner.models import load_model
from planner.solver import solve
from planner.validate import check_plan


@pytest.fixture(scope="module")
def llama70b():
    lm = load_model("llama-3-70b", batch_size=8, seq_len=2048, dtype=torch.bfloat16, device="meta")
    return planner.trace(lm.model, lm.args, lm.kwargs, name="llama-3-70b")


def _objective(plan, latency, throughput):
    return latency if plan.workload.objective == "latency" else 1.0 / throughput


def _assert_beats_baselines(plan):
    mine = _objective(plan, plan.predicted.latency_s, plan.predicted.throughput_samples_per_s)
    feasible = [b for b in plan.baselines.values() if b.feasible]
    assert feasible, "at least one baseline should fit"
    for b in feasible:
        assert mine <= _objective(plan, b.latency_s, b.throughput_samples_per_s) * (1 + 1e-9)


def test_llama_3_70b_on_8xh100_prefill_beats_every_baseline(llama70b):
    cluster = planner.Cluster.parse("8xH100")
    work = planner.Workload(batch_size=8, seq_len=2048, phase="prefill", objective="latency")
    plan = plan_traced(llama70b, cluster, work, alternatives=2)
    assert plan.solver.status == "OPTIMAL"
    # The solver optimises integer ticks of 0.1 ns; the prediction is the unrounded sum.
    assert plan.solver.objective == pytest.approx(plan.predicted.latency_s, abs=1e-8)
    _assert_beats_baselines(plan)
    # The plan respects every constraint when re-checked by the independent validator.
    assert check_plan(plan, plan.cost_table(), cluster, work) == []
    usable = cluster.device_spec.memory_bytes * (1 - work.memory_headroom)
    assert all(s.predicted.memory_bytes <= usable for s in plan.stages)
    assert plan.model.fingerprint == llama70b.fingerprint
    assert plan.model.num_layers == 82


def test_memory_tight_case_beats_baselines_and_fits(llama70b):
    # 70B in bf16 is 141 GB of weights; 4 H100s leave ~40 GB each after weights.
    cluster = planner.Cluster.parse("4xH100")
    work = planner.Workload(batch_size=8, seq_len=2048, phase="prefill", objective="throughput")
    plan = plan_traced(llama70b, cluster, work, alternatives=0)
    assert not plan.baselines["pure_dp"].feasible
    assert plan.baselines["pure_dp"].needs_memory_bytes > cluster.device_spec.memory_bytes
    usable = cluster.device_spec.memory_bytes * (1 - work.memory_headroom)
    assert plan.predicted.peak_memory_bytes <= usable
    _assert_beats_baselines(plan)


def test_reference_solver_agrees_with_cp_sat_on_a_real_table():
    lm = load_model("llama-3-8b", batch_size=4, seq_len=1024, dtype=torch.bfloat16, device="meta")
    traced = planner.trace(lm.model, lm.args, lm.kwargs)
    cluster = planner.Cluster.parse("2x4xH100")
    for objective in ("latency", "throughput"):
        work = planner.Workload(batch_size=4, seq_len=1024, objective=objective)
        a = plan_traced(traced, cluster, work, alternatives=0)
        b = plan_traced(traced, cluster, work, alternatives=0, solver="reference")
        assert a.solver.objective == pytest.approx(b.solver.objective, rel=1e-9, abs=1e-9)


def test_objective_terms_add_up_to_the_objective(llama70b):
    cluster = planner.Cluster.parse("8xH100")
    for objective, pins in (("latency", {"pp": 4}), ("throughput", {"pp": 2, "tp": 2})):
        work = planner.Workload(batch_size=8, seq_len=2048, objective=objective)
        sol = solve(CostBuilder(llama70b, cluster, work), cluster, work, pins=pins)
        terms = objective_terms(sol, objective)
        assert sol.pp == pins["pp"] and sol.solver.status == "OPTIMAL"
        assert len(terms) > 1  # more than one term: the sum is a real check
        assert math.isclose(sum(terms.values()), sol.solver.objective, rel_tol=1e-6)


def test_pins_are_honoured(llama70b):
    cluster = planner.Cluster.parse("2x8xH100")
    work = planner.Workload(batch_size=8, seq_len=2048)
    plan = plan_traced(llama70b, cluster, work, pins={"tp": 4, "pp": 2}, alternatives=0)
    assert plan.parallelism.pp == 2 and all(s.tp == 4 for s in plan.stages)
    with pytest.raises(planner.PlanError, match="tp 16"):
        plan_traced(llama70b, cluster, work, pins={"tp": 16}, alternatives=0)


def test_plan_accepts_a_module_and_records_provenance():
    lm = load_model("gpt-tiny", batch_size=4, seq_len=64)
    plan = planner.plan(lm.model, "4xcpu", planner.Workload(batch_size=4, seq_len=64, dtype="float32"),
                        args=lm.args, alternatives=1)
    assert plan.cluster.num_devices == 4 and plan.provenance == "predicted"
    assert plan.parallelism.dp * sum(s.tp for s in plan.stages) <= 4
    assert len(plan.extra["alternatives"]) == 1


def test_plan_records_which_costs_were_measured_and_which_predicted():
    from cost_models.profiler import profile_model

    lm = load_model("gpt-tiny", batch_size=2, seq_len=64)
    traced = planner.trace(lm.model, lm.args, name="gpt-tiny")
    profile = profile_model(traced, lm.args, {}, repeats=3, node_repeats=1, min_time_s=0)
    work = planner.Workload(batch_size=2, seq_len=64, dtype="float32")
    here = plan_traced(traced, planner.Cluster.parse("2xcpu"), work, profile=profile,
                       pins={"dp": 1, "microbatches": 1}, alternatives=0)
    assert here.provenance == "measured"
    assert [layer.source for layer in here.layers] == ["measured"] * len(traced.layers)
    tp1 = [layer.costs[1].compute_s for layer in here.layers]
    assert tp1 == pytest.approx([lp.time_s for lp in profile.layers], rel=1e-12)
    unprofiled = plan_traced(traced, planner.Cluster.parse("2xcpu"), work, alternatives=0,
                             pins={"dp": 1, "microbatches": 1})
    assert unprofiled.provenance == "predicted"
    assert {layer.source for layer in unprofiled.layers} == {"predicted"}
    with pytest.raises(ValueError, match="measured on cpu but the cluster's devices are H100"):
        plan_traced(traced, planner.Cluster.parse("8xH100"), work, profile=profile)
