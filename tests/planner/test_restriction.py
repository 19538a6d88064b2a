"""`plan MODEL --target`: the solver searches only what an engine can express, and proves
the plan optimal there (planner.solver.Restriction)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings

from planner.cluster import Cluster, Workload
from planner.solver import PlanError, Restriction, predict, replica_size_allowed, solve
from planner.validate import check_plan
from tests.planner.test_solver import SETTINGS, instances

GiB = 2**30


def _best_pinned(build, cluster, work):
    """The best objective (ticks) over every tp pin: one tp for every stage."""
    best = None
    for t in (1, 2, 4, 8):
        try:
            sol = solve(build, cluster, work, pins={"tp": t}, diagnose=False)
        except PlanError:
            continue
        if best is None or sol.solver.objective_ticks < best:
            best = sol.solver.objective_ticks
    return best


@settings(max_examples=25, **SETTINGS)
@given(instances())
def test_uniform_tp_is_the_best_of_the_tp_pins_and_proven_optimal(case):
    build, cluster, work = case
    expected = _best_pinned(build, cluster, work)
    try:
        sol = solve(build, cluster, work, diagnose=False,
                    restriction=Restriction(uniform_tp=True))
    except PlanError:
        assert expected is None
        return
    assert sol.solver.objective_ticks == expected
    assert sol.solver.status == "OPTIMAL" and sol.solver.gap == 0.0
    assert len({s.tp for s in sol.stages}) == 1
    assert check_plan(sol, build, cluster, work) == []


def test_an_engines_own_split_is_the_only_split_and_the_best_of_them_is_found():
    """6 layers (pre, 4 blocks, post) whose first block is slow: a free split would isolate
    it; an engine that splits blocks evenly (first stages one more, as tensor_split) cannot.
    The restricted optimum equals the best of every (dp, microbatches, pp, tp) with that
    split, priced by the solver's own `predict`."""
    from planner.cost_table import CostTable, LayerCost, Link

    times = [1e-4, 8e-3, 1e-3, 1e-3, 1e-3, 2e-4]

    def build(mbs, m):
        costs = tuple({t: LayerCost(c * mbs / t, 2e-5 * (t > 1), 20 * GiB // t)
                       for t in (1, 2)} for c in times)
        return CostTable(costs, (2**20 * mbs,) * 5, Link(1e-6, 1e11), Link(1e-5, 1e10), mbs, m)

    def split(pp):  # blocks 1..4 split like torch.tensor_split; pre and post with the ends
        if pp > 4:
            return None
        sizes = [4 // pp + (i < 4 % pp) for i in range(pp)]
        ranges, at = [], 1
        for i, n in enumerate(sizes):
            ranges.append((0 if i == 0 else at, 5 if i == pp - 1 else at + n - 1))
            at += n
        return ranges

    # 20 GiB a layer at tp 1 on 50 GiB devices: no replica holds the model on one device
    cluster = Cluster(1, 4, "H100", memory_bytes=50 * GiB)
    work = Workload(batch_size=4, objective="throughput", memory_headroom=0.0)
    free = solve(build, cluster, work)
    sol = solve(build, cluster, work, restriction=Restriction(uniform_tp=True, split=split))
    assert sol.solver.status == "OPTIMAL"
    assert [s.layers for s in sol.stages] == split(sol.pp)
    assert sol.solver.objective > free.solver.objective  # the free split isolates block 0
    best = None
    for dp, pp, t in itertools.product((1, 2, 4), (1, 2, 3, 4), (1, 2)):
        if not replica_size_allowed(pp * t, dp, 1, 4) or pp * t * dp > 4:
            continue
        for m in (m for m in (1, 2, 4) if (4 // dp) % m == 0 and 4 % dp == 0):
            table = build(4 // dp // m, m)
            stages, p = predict(table, [(a, b, t) for a, b in split(pp)], dp, 4, 4)
            if max(s.memory_bytes for s in stages) <= 50 * GiB:
                best = p.period_s if best is None else min(best, p.period_s)
    assert abs(sol.predicted.period_s - best) <= 1e-9
