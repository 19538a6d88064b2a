"""CP-SAT planner vs the exact reference, the independent validator, pins and errors."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.cluster import Cluster, Workload
from planner.cost_table import TICK_S, Borrow, CostTable, LayerCost, Link, to_ticks
from planner.reference_solver import solve_reference
from planner.solver import (
    InfeasiblePlanError,
    PlanError,
    place_stages,
    predict,
    replica_size_allowed,
    solve,
)
from planner.validate import check_plan

GiB = 2**30
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def instances(draw):
    """A random chain of <= 8 layers on <= 8 devices in 1-2 nodes, with a random budget."""
    nodes = draw(st.sampled_from([1, 2]))
    per_node = draw(st.sampled_from([1, 2, 4] if nodes == 2 else [1, 2, 4, 8]))
    degrees = [t for t in (1, 2, 4, 8) if per_node % t == 0]
    allowed = draw(st.lists(st.sampled_from(degrees), min_size=1, unique=True))
    L = draw(st.integers(1, 8))
    layers = draw(st.lists(st.tuples(st.floats(1e-4, 5e-3), st.floats(0, 1e-3),
                                     st.integers(1, 50), st.integers(0, 20)),
                           min_size=L, max_size=L))
    bounds = draw(st.lists(st.integers(0, 10**8), min_size=L - 1, max_size=L - 1))
    ws = draw(st.integers(0, 3)) * 10**8
    # the last layer may read a table an earlier one owns (a tied head): held again by a
    # stage that starts after its owner
    borrowed = ()
    if L >= 2 and draw(st.booleans()):
        size = draw(st.integers(1, 20)) * 10**8
        borrowed = (Borrow(L - 1, draw(st.integers(0, L - 2)), "table",
                           {t: size // t for t in allowed}),)

    def build(mbs: int, m: int) -> CostTable:
        costs = tuple({t: LayerCost(c * mbs / t * (1 + 0.1 * (t - 1)), k * (t > 1) * mbs,
                                    w * 10**8 // t + a * 10**7 * mbs * m // t)
                       for t in allowed} for c, k, w, a in layers)
        return CostTable(costs, tuple(b * mbs for b in bounds), Link(3e-6, 4.5e11),
                         Link(2e-5, 5e10), mbs, m, stage_workspace_bytes={t: ws for t in allowed},
                         borrowed=borrowed)

    cluster = Cluster(nodes, per_node, "H100", memory_bytes=draw(st.integers(5, 60)) * 10**8)
    work = Workload(batch_size=draw(st.sampled_from([1, 2, 3, 4, 6, 8])),
                    objective=draw(st.sampled_from(["latency", "throughput"])),
                    memory_headroom=0.0)
    return build, cluster, work


def _both(build, cluster, work, pins=None):
    """Both solvers' answers; None for an infeasible request (or contradicting pins)."""
    try:
        fast = solve(build, cluster, work, pins=pins, diagnose=False)
    except PlanError:
        fast = None
    try:
        exact = solve_reference(build, cluster, work, pins=pins)
    except PlanError:
        exact = None
    return fast, exact


@settings(max_examples=150, **SETTINGS)
@given(instances())
def test_cpsat_objective_equals_reference_and_plans_pass_validator(case):
    build, cluster, work = case
    fast, exact = _both(build, cluster, work)
    assert (fast is None) == (exact is None)
    if fast is None:
        return
    assert fast.solver.status == "OPTIMAL"
    assert fast.solver.objective_ticks == exact.solver.objective_ticks
    assert fast.solver.bound == fast.solver.objective and fast.solver.gap == 0.0
    for sol in (fast, exact):
        assert check_plan(sol, build, cluster, work) == []
        minimised = sol.predicted.latency_s if work.objective == "latency" \
            else sol.predicted.period_s
        # the float prediction and the tick objective differ only by per-term rounding
        terms = 2 * len(sol.stages) * (build(1, 1).num_layers + 1) * sol.microbatches
        assert abs(minimised - sol.solver.objective_ticks * TICK_S) <= terms * TICK_S


@settings(max_examples=60, **SETTINGS)
@given(instances(), st.data())
def test_pins_are_honoured_and_optimal_within_the_pins(case, data):
    build, cluster, work = case
    try:
        free = solve_reference(build, cluster, work)
    except InfeasiblePlanError:
        return
    keys = data.draw(st.lists(st.sampled_from(["dp", "pp", "tp", "microbatches"]),
                              unique=True, min_size=1))
    stage_tp = free.stages[0].tp
    values = {"dp": free.dp, "pp": free.pp, "tp": stage_tp, "microbatches": free.microbatches}
    pins = {k: values[k] for k in keys}
    fast, exact = _both(build, cluster, work, pins)
    if "tp" in pins and any(s.tp != stage_tp for s in free.stages):
        assert (fast is None) == (exact is None)
        if fast is None:
            return
    assert fast is not None and exact is not None
    assert fast.solver.objective_ticks == exact.solver.objective_ticks
    assert fast.solver.objective_ticks >= free.solver.objective_ticks
    for sol in (fast, exact):
        got = {"dp": sol.dp, "pp": sol.pp, "microbatches": sol.microbatches}
        assert all(got[k] == v for k, v in pins.items() if k != "tp")
        if "tp" in pins:
            assert {s.tp for s in sol.stages} == {pins["tp"]}
        assert check_plan(sol, build, cluster, work) == []


def _uniform(L=4, time_s=1e-3, mem=10**9, tps=(1, 2, 4, 8), boundary=2**20):
    def build(mbs, m):
        row = {t: LayerCost(time_s * mbs / t, 1e-5 * (t > 1), mem // t) for t in tps}
        return CostTable((row,) * L, (boundary * mbs,) * (L - 1), Link(1e-6, 1e11),
                         Link(1e-5, 1e10), mbs, m)
    return build


@pytest.mark.parametrize("pins, message", [
    ({"tp": 16}, "tp 16 > 8 devices per node: a tensor-parallel group stays inside one node"),
    ({"tp": 3}, "tp 3 does not divide 8 devices per node; use one of [1, 2, 4, 8]"),
    ({"dp": 3}, "dp 3 does not divide batch size 8; use one of [1, 2, 4, 8]"),
    ({"dp": 2, "pp": 2, "tp": 4, "microbatches": 1},
     "dp 2 × pp 2 × tp 4 = 16 > 8 devices (1 node(s) × 8); lower a pin or add devices"),
    ({"pp": 5}, "pp 5 > 4 layers: every stage needs at least one layer"),
    ({"dp": 2, "microbatches": 3},
     "microbatches 3 does not divide batch 8 / dp 2 = 4 samples per replica"),
])
def test_contradictory_pins_raise_with_every_factor(pins, message):
    with pytest.raises(PlanError) as err:
        solve(_uniform(), Cluster(1, 8, "H100"), Workload(batch_size=8), pins=pins)
    assert message in str(err.value)


def test_tp_pin_the_model_does_not_allow_is_named():
    with pytest.raises(PlanError, match=r"tp 8 cannot be honoured: .*\[1, 2, 4\]"):
        solve(_uniform(tps=(1, 2, 4)), Cluster(1, 8, "H100"), Workload(batch_size=8),
              pins={"tp": 8})


def test_infeasible_error_states_the_computed_smallest_changes():
    # 4 layers of 50 GiB at tp 1 only, 64 GiB devices: one layer per device, 4 devices.
    build = _uniform(L=4, mem=50 * GiB, tps=(1,))
    cluster = Cluster(1, 2, "H100", memory_bytes=64 * GiB)
    work = Workload(batch_size=2, memory_headroom=0.0)
    with pytest.raises(InfeasiblePlanError) as err:
        solve(build, cluster, work)
    # 2 devices hold 2 layers each at best: 100 GiB; a node of 4 devices (grown inside the
    # node first) or 2 nodes of 2 devices fit.
    assert err.value.suggestions == (
        "per-device memory >= 100.00 GiB (peak 100.00 GiB + 0 headroom)",
        ">= 4 devices (1 node(s) × 4)",
        ">= 4 devices (2 node(s) × 2)",
    )
    assert "no plan fits: every placement needs more than 64.00 GiB per device" in str(err.value)
    fits = solve(build, replace(cluster, nodes=2), work)
    assert fits.pp == 4 and fits.predicted.peak_memory_bytes == 50 * GiB
    fits = solve(build, replace(cluster, memory_bytes=100 * GiB), work)
    assert fits.predicted.peak_memory_bytes == 100 * GiB


def test_infeasible_batch_suggestion_when_memory_grows_with_the_batch():
    def build(mbs, m):  # activations: 20 GiB per sample per layer
        row = {1: LayerCost(1e-3 * mbs, 0.0, 20 * GiB * mbs * m)}
        return CostTable((row,) * 2, (1024,), Link(1e-6, 1e11), Link(1e-5, 1e10), mbs, m)
    cluster = Cluster(1, 2, "H100", memory_bytes=50 * GiB)
    with pytest.raises(InfeasiblePlanError) as err:
        solve(build, cluster, Workload(batch_size=6, memory_headroom=0.0))
    # dp 2 x pp 1 needs 2 x 20 GiB x (samples per replica): batch 2 fits, batch 3 does not.
    assert "batch size <= 2" in err.value.suggestions
    assert solve(build, cluster, Workload(batch_size=2, memory_headroom=0.0)).dp == 2


def test_objective_definitions_on_a_hand_computed_pipeline():
    # stage times 1 ms and 3 ms, one intra-node hop of 1 us + 1e6 B / 1e11 B/s = 11 us
    row0, row1 = {1: LayerCost(1e-3, 0.0, 1)}, {1: LayerCost(2e-3, 1e-3, 2)}
    table = CostTable((row0, row1), (10**6,), Link(1e-6, 1e11), Link(1e-5, 1e10), 1, 4)
    stages, pred = predict(table, [(0, 0, 1), (1, 1, 1)], dp=2, batch_size=8,
                           devices_per_node=8)
    hop = 1e-6 + 10**6 / 1e11
    assert math.isclose(pred.latency_s, 1e-3 + hop + 3e-3 + 3 * 3e-3)
    assert math.isclose(pred.period_s, max(4 * 3e-3, 1e-3 + hop + 3e-3))
    assert math.isclose(pred.throughput_samples_per_s, 8 / (4 * 3e-3))
    assert [s.devices for s in stages] == [((0,), (2,)), ((1,), (3,))]
    assert pred.peak_memory_bytes == 2


def test_placement_rule_packs_stages_in_order_and_replicas_contiguously():
    assert place_stages([4, 4], dp=2, devices_per_node=8) == (
        ((0, 1, 2, 3), (8, 9, 10, 11)), ((4, 5, 6, 7), (12, 13, 14, 15)))
    with pytest.raises(PlanError, match="straddle"):
        place_stages([2, 8], dp=1, devices_per_node=8)
    assert replica_size_allowed(12, 1, 2, 8)        # one replica may span 1.5 nodes
    assert not replica_size_allowed(12, 2, 4, 8)    # two would misalign the second
    assert replica_size_allowed(16, 2, 4, 8) and replica_size_allowed(2, 4, 1, 8)
    assert not replica_size_allowed(3, 2, 1, 8)


def test_inter_node_cut_is_priced_with_the_inter_node_link():
    build = _uniform(L=2, mem=8 * 60 * GiB, tps=(8,))  # 60 GiB per layer at tp 8
    cluster = Cluster(2, 8, "H100", memory_bytes=80 * GiB)
    sol = solve(build, cluster, Workload(batch_size=1, memory_headroom=0.0))
    assert [s.devices for s in sol.stages] == [(tuple(range(8)),), (tuple(range(8, 16)),)]
    assert sol.predicted.p2p_s == (1e-5 + 2**20 / 1e10,)


def test_time_limit_reports_a_plan_with_a_bound_no_larger_than_it():
    sol = solve(_uniform(L=12), Cluster(2, 8, "H100"), Workload(batch_size=8),
                time_limit_s=0.05)
    assert sol.solver.bound <= sol.solver.objective
    assert sol.solver.status in ("OPTIMAL", "FEASIBLE")
    assert math.isclose(sol.solver.gap,
                        (sol.solver.objective - sol.solver.bound) / sol.solver.objective)


def test_validator_reports_broken_plans():
    build, cluster, work = _uniform(), Cluster(1, 8, "H100"), Workload(batch_size=8)
    sol = solve(build, cluster, work)
    assert check_plan(sol, build, cluster, work) == []
    wrong = replace(sol, predicted=replace(sol.predicted, latency_s=sol.predicted.latency_s * 2))
    assert any("predicted latency" in p for p in check_plan(wrong, build, cluster, work))
    stage = sol.stages[0]
    clash = replace(sol, stages=(replace(stage, devices=(stage.devices[0],) * sol.dp),)
                    + sol.stages[1:])
    if sol.dp > 1:
        assert any("used twice" in p for p in check_plan(clash, build, cluster, work))
    short = replace(sol, stages=(replace(stage, last=stage.last - 1),) + sol.stages[1:]) \
        if stage.last > stage.first else None
    if short is not None:
        assert check_plan(short, build, cluster, work) != []


def test_to_ticks_rounds_half_up_in_tenths_of_a_nanosecond():
    assert TICK_S == 1e-10
    assert to_ticks(1e-3) == 10_000_000 and to_ticks(0.26e-9) == 3


def test_best_per_family_solves_each_family_under_its_pins():
    from planner.solver import best_per_family

    build, cluster, work = _uniform(L=6), Cluster(1, 8, "H100"), Workload(batch_size=4)
    best = solve(build, cluster, work)
    fams = best_per_family(build, cluster, work, families=[(1, 2, 4), (2, 1, 4), (4, 3, 8)])
    assert [f for f, _ in fams][:2] in ([(1, 2, 4), (2, 1, 4)], [(2, 1, 4), (1, 2, 4)])
    for (dp, pp, tp), sol in fams[:2]:
        assert (sol.dp, sol.pp, {s.tp for s in sol.stages}) == (dp, pp, {tp})
        assert sol.solver.objective >= best.solver.objective
        assert sol.solver.objective_ticks == solve_reference(
            build, cluster, work, pins={"dp": dp, "pp": pp, "tp": tp}).solver.objective_ticks
    assert fams[2][1] == ("pins contradict the request: dp 4 × pp 3 × tp 8 = 96 > 8 devices "
                          "(1 node(s) × 8); lower a pin or add devices")


def test_a_stage_holding_a_borrowed_table_without_its_owner_holds_it_again():
    # 4 layers of 10 GiB; the last reads a 30 GiB table the first owns (a tied head)
    def build(mbs, m):
        row = {1: LayerCost(1e-3, 0.0, 10 * GiB)}
        return CostTable((row,) * 4, (1024,) * 3, Link(1e-6, 1e11), Link(1e-5, 1e10), mbs, m,
                         borrowed=(Borrow(3, 0, "lm_head.weight", {1: 30 * GiB}),))
    table = build(1, 1)
    assert table.stage_memory_bytes(0, 3, 1) == 40 * GiB  # the owner is in the stage
    assert table.stage_memory_bytes(2, 3, 1) == 50 * GiB  # a copy of the table
    assert table.stage_memory_bytes(0, 2, 1) == 30 * GiB
    work = Workload(batch_size=1, objective="throughput", memory_headroom=0.0)
    # two stages of two layers would hold 20 GiB each without the copy; with it, the best
    # split of two stages is 30 + 40 GiB, so 39 GiB devices hold no plan
    small, fits = (Cluster(1, 2, "H100", memory_bytes=n * GiB) for n in (39, 40))
    with pytest.raises(PlanError):
        solve(build, small, work, pins={"pp": 2}, diagnose=False)
    with pytest.raises(PlanError):
        solve_reference(build, small, work, pins={"pp": 2})
    with pytest.raises(InfeasiblePlanError) as err:  # the diagnosis sees the copy too
        solve(build, small, work, pins={"pp": 2})
    assert "per-device memory >= 40.00 GiB" in str(err.value)
    for sol in (solve(build, fits, work, pins={"pp": 2}),
                solve_reference(build, fits, work, pins={"pp": 2})):
        assert [(s.first, s.last) for s in sol.stages] == [(0, 2), (3, 3)]
        assert [s.memory_bytes for s in sol.stages] == [30 * GiB, 40 * GiB]
        assert sol.predicted.peak_memory_bytes == 40 * GiB
        assert check_plan(sol, build, fits, work) == []
