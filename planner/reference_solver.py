"""Exact reference solver: dynamic programming over the same cost table as CP-SAT.

For each (dp, microbatches) pair it walks the layer boundaries ``0..L`` keeping, per state
``(boundary, devices used, stages so far)``, the Pareto front of ``(sum, max)`` over the
stage and p2p-hop times of every partial plan (integer ticks, rounded exactly like the
CP-SAT model). Both objectives are non-decreasing in the sum and in the max, so the best
complete plan is on the front: the result is exact. The state space grows with the device
count, so this is the test oracle and ``--solver reference``, not the fast path.

>>> from planner.cost_table import CostTable, LayerCost, Link
>>> from planner.cluster import Cluster, Workload
>>> def build(mbs, m):
...     c = {1: LayerCost(1e-3 * mbs, 0, 10**9), 2: LayerCost(6e-4 * mbs, 1e-4, 5 * 10**8)}
...     return CostTable((c,) * 4, (1 << 20,) * 3, Link(1e-6, 1e11), Link(5e-6, 1e10), mbs, m)
>>> sol = solve_reference(build, Cluster(1, 2, "H100"), Workload(batch_size=2))
>>> (sol.dp, sol.pp, sol.solver.status, sol.solver.objective_ticks)
(2, 1, 'OPTIMAL', 40000000)
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from planner.cluster import Cluster, Workload
from planner.cost_table import TICK_S, CostTableBuilder
from planner.solver import (
    InfeasiblePlanError,
    Solution,
    SolverStats,
    _build_space,
    _Combo,
)

__all__ = ["solve_reference"]


def _pareto_insert(front: list, label: tuple) -> None:
    """Keep only labels (sum, max, path) not dominated in both sum and max."""
    s, w = label[0], label[1]
    for other in front:
        if other[0] <= s and other[1] <= w:
            return
    front[:] = [o for o in front if not (s <= o[0] and w <= o[1])]
    front.append(label)


def _best_path(combo: _Combo, objective: str, per_node: int):
    """(value, path) of the best plan of one combo, or None when nothing fits."""
    L = combo.num_layers
    fronts: dict[tuple[int, int, int], list] = {(0, 0, 0): [(0, 0, ())]}
    for j in range(L):  # boundaries in increasing order: every arc goes forward
        for (pos, used, k), labels in sorted(fronts.items()):
            if pos != j:
                continue
            if combo.pp is not None and k >= combo.pp:
                continue
            for t in combo.tps:
                if used % per_node + t > per_node or used + t > combo.s_max:
                    continue
                time_acc, mem_acc = 0, combo.table.workspace(t)
                for b in range(j, L):
                    if t not in combo.ticks[b]:
                        break
                    time_acc += combo.ticks[b][t]
                    mem_acc += combo.mem[b][t]
                    if mem_acc > combo.cap:
                        break
                    new_used = used + t
                    if b + 1 < L:
                        inter = new_used % per_node == 0
                        hop = combo.hop_inter[b] if inter else combo.hop_intra[b]
                    else:
                        hop = 0
                    key = (b + 1, new_used, k + 1)
                    front = fronts.setdefault(key, [])
                    for s, w, path in labels:
                        _pareto_insert(front, (s + time_acc + hop,
                                               max(w, time_acc, hop), path + ((j, b, t),)))
    best = None
    for (pos, used, k), labels in fronts.items():
        if pos != L or used not in combo.sizes or (combo.pp is not None and k != combo.pp):
            continue
        for s, w, path in labels:
            # the same formula as _objective_value, from the sum and the max
            value = s + (combo.m - 1) * w if objective == "latency" else max(combo.m * w, s)
            if best is None or (value, path) < best:
                best = (value, path)
    return best


def solve_reference(
    cost_table: CostTableBuilder,
    cluster: Cluster,
    workload: Workload,
    *,
    pins: Mapping[str, int] | None = None,
    tp_degrees: Iterable[int] | None = None,
    max_microbatches: int | None = None,
) -> Solution:
    """Exact optimum by dynamic programming; same arguments and result type as ``solve``.

    Raises:
        PlanError: contradictory pins (the same checks and messages as ``solve``).
        InfeasiblePlanError: nothing fits (without the computed suggestions of ``solve``).
    """
    start = time.perf_counter()
    space, _ = _build_space(cost_table, cluster, workload, pins, tp_degrees, max_microbatches)
    best = None
    for combo in space.combos:
        found = _best_path(combo, space.objective, space.devices_per_node)
        if found is not None and (best is None or found[0] < best[0]):
            best = (found[0], combo, list(found[1]))
    if best is None:
        raise InfeasiblePlanError(
            f"no plan fits in {space.cap / 2**30:.2f} GiB per device on "
            f"{cluster.num_devices} devices")
    value, combo, path = best
    stats = SolverStats("OPTIMAL", value * TICK_S, value * TICK_S,
                        time.perf_counter() - start, objective_ticks=value, solver="reference",
                        combos_solved=len(space.combos))
    return space.solution(combo, path, stats)
