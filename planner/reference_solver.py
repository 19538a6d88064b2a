"""Exact reference solver: dynamic programming over the same cost table as CP-SAT.

For each (dp, microbatches) pair it walks the layer boundaries ``0..L`` keeping, per state
``(boundary, devices used)`` (and stages so far when ``pp`` is pinned), the Pareto front of
``(sum, max)`` over the stage and p2p-hop times of every partial plan (integer ticks,
rounded exactly like the CP-SAT model). Both objectives are non-decreasing in the sum and
in the max, so the best complete plan is on the front: the result is exact. Pairs with
small replicas are solved first, and a partial plan is dropped once its sum plus every
remaining layer at its fastest degree, with its max, already exceeds the best value found
(again exact). It shares no bound or model with the CP-SAT solver. The state space grows
with the device count, so this is the test oracle and ``--solver reference``, not the fast
path.

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

import itertools
import time
from collections.abc import Iterable, Mapping

from planner.cluster import Cluster, Workload
from planner.cost_table import TICK_S, CostTableBuilder
from planner.solver import (
    InfeasiblePlanError,
    PlanError,
    Solution,
    SolverStats,
    _build_space,
    _Combo,
)

__all__ = ["solve_reference", "solve_train_reference"]


def _front(labels: list) -> list:
    """The labels ``(sum, max, path)`` not dominated in both sum and max, by sum."""
    labels.sort(key=lambda label: (label[0], label[1]))
    kept, lowest = [], None
    for label in labels:
        if lowest is None or label[1] < lowest:
            kept.append(label)
            lowest = label[1]
    return kept


def _unwind(node) -> tuple:
    """A path stored as nested ``(arc, parent)`` pairs, in pipeline order."""
    arcs = []
    while node is not None:
        arcs.append(node[0])
        node = node[1]
    return tuple(reversed(arcs))


def _best_path(combo: _Combo, objective: str, per_node: int, worse_than: int | None = None):
    """(value, path) of the best plan of one combo, or None when nothing fits.

    With ``worse_than``, partial plans that cannot end at a value ``<= worse_than`` are
    dropped (their sum so far plus every remaining layer at its fastest degree, and their
    max, already give more), so None also means "nothing at or below ``worse_than``".
    """
    L, m, latency = combo.num_layers, combo.m, objective == "latency"
    pinned = combo.pp is not None
    rest = [0] * (L + 1)  # every layer from j on at its fastest degree
    for j in range(L - 1, -1, -1):
        rest[j] = rest[j + 1] + min(combo.ticks[j].values(), default=0)

    def hopeless(s: int, w: int, pos: int) -> bool:
        total = s + rest[pos]
        value = total + (m - 1) * w if latency else max(m * w, total)
        return worse_than is not None and value > worse_than

    # labels[pos][(devices used, stages so far if pp is pinned)] = [(sum, max, path)]
    labels: list[dict] = [{} for _ in range(L + 1)]
    labels[0][(0, 0)] = [(0, 0, None)]
    for j in range(L):  # boundaries in increasing order: every arc goes forward
        for (used, k), raw in sorted(labels[j].items()):
            if pinned and k >= combo.pp:
                continue
            front = _front(raw)
            for t in combo.tps:
                if used % per_node + t > per_node or used + t > combo.s_max:
                    continue
                key = (used + t, k + 1 if pinned else 0)
                inter = (used + t) % per_node == 0
                time_acc, mem_acc = 0, combo.table.workspace(t)
                for b in range(j, L):
                    if t not in combo.ticks[b]:
                        break
                    time_acc += combo.ticks[b][t]
                    mem_acc += combo.mem_at(b, j, t)
                    if mem_acc > combo.cap:
                        break
                    if worse_than is not None and m * time_acc > worse_than:
                        break  # both objectives are >= m * (any stage time)
                    if b + 1 < L:
                        hop = combo.hop_inter[b] if inter else combo.hop_intra[b]
                    else:
                        hop = 0
                    target = labels[b + 1].setdefault(key, [])
                    arc = (j, b, t)
                    for s, w, path in front:
                        s2, w2 = s + time_acc + hop, max(w, time_acc, hop)
                        if not hopeless(s2, w2, b + 1):
                            target.append((s2, w2, (arc, path)))
        labels[j] = {}
    best = None
    for (used, k), raw in labels[L].items():
        if used not in combo.sizes or (pinned and k != combo.pp):
            continue
        for s, w, path in _front(raw):
            # the same formula as _objective_value, from the sum and the max
            value = s + (m - 1) * w if latency else max(m * w, s)
            if best is None or value < best[0] or (value == best[0] and
                                                   _unwind(path) < best[1]):
                best = (value, _unwind(path))
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
    # Small replicas first: their state spaces are small and their optimum prunes the
    # larger ones. Ties go to the earlier combo of ``space.combos``, so partial plans are
    # dropped only when they cannot reach the best value so far (not when they tie it).
    order = sorted(range(len(space.combos)),
                   key=lambda i: (space.combos[i].s_max, -space.combos[i].dp, i))
    found_at = {}
    best_value = None
    for i in order:
        found = _best_path(space.combos[i], space.objective, space.devices_per_node,
                           worse_than=best_value)
        if found is not None:
            found_at[i] = found
            best_value = found[0] if best_value is None else min(best_value, found[0])
    best = None
    if found_at:
        i = min(found_at, key=lambda i: (found_at[i][0], i))
        best = (found_at[i][0], space.combos[i], list(found_at[i][1]))
    if best is None:
        raise InfeasiblePlanError(
            f"no plan fits in {space.cap / 2**30:.2f} GiB per device on "
            f"{cluster.num_devices} devices")
    value, combo, path = best
    stats = SolverStats("OPTIMAL", value * TICK_S, value * TICK_S,
                        time.perf_counter() - start, objective_ticks=value, solver="reference",
                        combos_solved=len(space.combos))
    return space.solution(combo, path, stats)


# --------------------------------------------------------------------------- training


def _front3(labels: list) -> list:
    """Labels ``(sum, max, tail, path)`` not dominated in all three (sum, max, tail)."""
    labels.sort(key=lambda label: label[:3])
    kept: list = []
    for label in labels:
        if not any(k[0] <= label[0] and k[1] <= label[1] and k[2] <= label[2] for k in kept):
            kept.append(label)
    return kept


def _best_train_path(combo, per_node: int, pp: int):
    """(value, path) of the best ``pp``-stage plan of one training combo, or None.

    Forward over the boundaries with states ``(boundary, devices used, stages so far)``;
    stage ``k`` holds ``combo.in_flight(k, pp)`` microbatches, so its memory is exact.
    Labels are the Pareto front of (stage and hop sum, their max, the largest tail); the
    step time ``sum + (m - 1) max + tail`` is non-decreasing in all three.
    """
    L, m, table = combo.num_layers, combo.m, combo.table
    labels: list[dict] = [{} for _ in range(L + 1)]
    labels[0][(0, 0)] = [(0, 0, 0, None)]
    for j in range(L):
        for (used, k), raw in sorted(labels[j].items()):
            if k >= pp:
                continue
            front = _front3(raw)
            flight = combo.in_flight(k, pp)
            for t in combo.tps:
                if used % per_node + t > per_node or used + t > combo.s_max:
                    continue
                inter = (used + t) % per_node == 0
                for rc in combo.rcs:
                    acc = 0
                    for b in range(j, L):
                        if (t, rc) not in combo.ticks[b]:
                            break
                        acc += combo.ticks[b][(t, rc)]
                        if table.stage_memory(j, b, t, rc, flight) > combo.cap:
                            break
                        if combo.allowed is not None and (j, b) not in combo.allowed:
                            continue
                        hop = 0
                        if b + 1 < L:
                            hop = combo.hop_inter[b] if inter else combo.hop_intra[b]
                        tail = combo.tail(j, b, t)
                        target = labels[b + 1].setdefault((used + t, k + 1), [])
                        arc = (j, b, t, rc)
                        for s, w, tl, path in front:
                            target.append((s + acc + hop, max(w, acc, hop), max(tl, tail),
                                           (arc, path)))
        labels[j] = {}
    best = None
    for (used, k), raw in labels[L].items():
        if used not in combo.sizes or k != pp:
            continue
        for s, w, tl, path in _front3(raw):
            value = s + (m - 1) * w + tl
            if best is None or value < best[0]:
                best = (value, _unwind(path))
    return best


def _every_pattern(combo, per_node: int):
    """(value, pattern) of the best interleaved plan of one combo by enumerating every
    pattern (``planner.interleaved``: group offsets in a round, tp and recompute per
    group) and pricing each with ``pattern_value``; small instances only."""
    from cost_models.training import shortest_round
    from planner.interleaved import pattern_value, stage_counts

    shortest = shortest_round(combo.num_layers, combo.v)
    best = None
    for pp in stage_counts(combo):
        for cuts in itertools.combinations(range(1, shortest), pp - 1):
            for tps in itertools.product(combo.tps, repeat=pp):  # pattern_value: one tp
                for rcs in itertools.product(combo.rcs, repeat=pp):
                    pattern = list(zip((0, *cuts), tps, rcs, strict=True))
                    value = pattern_value(combo, pattern, per_node)
                    if value is not None and (best is None or value < best[0]):
                        best = (value, pattern)
    return best


def solve_train_reference(builder, cluster: Cluster, workload: Workload, *,
                          pins: Mapping | None = None, restriction=None, tp_degrees=None):
    """Exact optimum of a training request by dynamic programming over every combo and
    stage count (the oracle of ``planner.training.solve_train``; small instances only).

    Raises:
        PlanError: contradictory pins (``planner.training.train_space``).
        InfeasiblePlanError: nothing fits.
    """
    from planner.training import _infeasible_message, evaluate, train_space

    start = time.perf_counter()
    space = train_space(builder, cluster, workload, pins, restriction, tp_degrees)
    best = None
    for combo in space.combos:
        if combo.v > 1:
            found = _every_pattern(combo, space.devices_per_node)
            if found is not None and (best is None or found[0] < best[0]):
                best = (found[0], combo, found[1])
            continue
        pps = [combo.pp] if combo.pp is not None else range(
            1, min(combo.num_layers, combo.s_max // min(combo.tps)) + 1)
        for pp in pps:
            found = _best_train_path(combo, space.devices_per_node, pp)
            if found is not None and (best is None or found[0] < best[0]):
                best = (found[0], combo, found[1])
    if best is None:
        from planner.interleaved import stage_counts
        from planner.training import _no_shape_message

        if not any(c.v == 1 or stage_counts(c) for c in space.combos):
            raise PlanError(_no_shape_message(pins, cluster, workload))
        raise InfeasiblePlanError(_infeasible_message(space, cluster, workload))
    value, combo, path = best
    stats = SolverStats("OPTIMAL", value * TICK_S, value * TICK_S, time.perf_counter() - start,
                        objective_ticks=value, solver="reference",
                        combos_solved=len(space.combos))
    return evaluate(combo, list(path), space, workload.objective, stats)
