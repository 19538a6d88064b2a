"""Baselines on the solver's table: the optimum is never worse than any of them."""

from __future__ import annotations

import pytest

from planner.baselines import baselines, even_split
from planner.cluster import Cluster, Workload
from planner.cost_table import CostTable, LayerCost, Link
from planner.solver import solve

GiB = 2**30


def test_even_split_sizes_differ_by_at_most_one_larger_first():
    assert even_split(10, 4) == [(0, 2), (3, 5), (6, 7), (8, 9)]
    assert even_split(3, 3) == [(0, 0), (1, 1), (2, 2)]


def _build(weights_gib):
    def build(mbs, m):
        rows = []
        for j in range(10):
            heavy = 3.0 if j in (0, 9) else 1.0  # embedding and head
            rows.append({t: LayerCost(heavy * 2e-3 * mbs / t, 5e-5 * (t > 1) * mbs,
                                      int(weights_gib * heavy * GiB) // t + 2**26 * mbs)
                         for t in (1, 2, 4, 8)})
        return CostTable(tuple(rows), (2**22 * mbs,) * 9, Link(3e-6, 4.5e11),
                         Link(5e-6, 5e10), mbs, m)
    return build


@pytest.mark.parametrize("objective", ["latency", "throughput"])
@pytest.mark.parametrize("weights_gib", [1.0, 14.0])  # roomy, and tight memory
def test_optimum_is_no_worse_than_any_feasible_baseline(objective, weights_gib):
    cluster = Cluster(2, 8, "H100")
    work = Workload(batch_size=8, objective=objective)
    build = _build(weights_gib)
    best = solve(build, cluster, work)
    found = baselines(build, cluster, work)
    key = (lambda lat, thr: lat) if objective == "latency" else (lambda lat, thr: -thr)
    mine = key(best.predicted.latency_s, best.predicted.throughput_samples_per_s)
    feasible = [b for b in found.values() if b.feasible]
    assert feasible, "at least one baseline fits"
    for b in feasible:
        assert mine <= key(b.latency_s, b.throughput_samples_per_s) * (1 + 1e-12), b.name
    assert found["even_tp_node"].tp == 8 and found["even_tp_node"].pp == 2
    assert found["pure_dp"].dp == 8 and found["pure_pp"].pp == 10


def test_infeasible_baseline_says_how_much_memory_it_needs():
    cluster = Cluster(2, 8, "H100")
    work = Workload(batch_size=8, memory_headroom=0.1)
    found = baselines(_build(14.0), cluster, work)
    pure_dp = found["pure_dp"]  # 10 layers of weights on one device: 14 x (8 + 2 x 3) GiB
    assert not pure_dp.feasible
    peak = int(14.0 * 3 * GiB) * 2 + int(14.0 * GiB) * 8 + 10 * 2**26
    assert pure_dp.peak_memory_bytes == peak
    assert pure_dp.needs_memory_bytes == int(peak / 0.9)
    assert pure_dp.reason == f"infeasible (needs {int(peak / 0.9) / GiB:.1f} GiB per device)"
