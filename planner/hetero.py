"""Inference plans on a mixed cluster (``MixedCluster``): pipeline stages on node groups of
different devices, proven optimal by CP-SAT, with an exact dynamic-programming reference.

A plan is ``dp`` identical replicas. A replica's pipeline visits the groups in one order
(an outer choice: every order of the groups is tried) and takes ``d_g`` devices of group
``g`` (0 skips the group); ``dp * d_g`` devices of group ``g`` must be there, and ``d_g``
follows the placement rule of the homogeneous search inside the group (divides the node
or is a multiple of it, when ``dp > 1``). A stage is a contiguous layer range at one tp
degree inside one node of one group, priced from that group's cost table (its device,
memory capacity and links). The cut between two stages of the same group is priced on the
group's intra- or inter-node link exactly as the homogeneous search does; a cut between
groups is priced on the slower side: the larger inter-node latency and the smaller
inter-node bandwidth of the two groups. Device ids are numbered group after group;
replica ``r``'s devices of group ``g`` are ``offset_g + r * d_g + [0, d_g)``.

Both solvers enumerate (dp, microbatches, group order) and solve the layer path of each
(docs/solver.md, "Mixed clusters"): CP-SAT as a shortest path through the layered graph of
(boundary, group position) nodes, the reference by a Pareto-front DP over
(boundary, group of the last stage, devices used in it). They round every time with
``to_ticks`` alone, so their integer objectives agree exactly (tests/planner/
test_hetero.py compares them on random small clusters).

>>> from planner.cost_table import CostTable, LayerCost, Link
>>> from planner.cluster import Cluster, Workload
>>> def builder(speed):
...     def build(mbs, m):
...         c = {1: LayerCost(speed * mbs, 0, 10**9)}
...         return CostTable((c,) * 4, (1 << 20,) * 3, Link(1e-6, 1e11), Link(5e-6, 1e10), mbs, m)
...     return build
>>> mixed = Cluster.parse("1xH100+1xA100-80GB")
>>> sol = solve_mixed([builder(1e-3), builder(2e-3)], mixed, Workload(batch_size=1))
>>> ([(s.first, s.last, s.devices) for s in sol.stages], sol.solver.status)
([(0, 3, ((0,),))], 'OPTIMAL')
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

from planner.cluster import MixedCluster, Workload
from planner.cost_table import TICK_S, CostTable, CostTableBuilder, Link, to_ticks
from planner.reference_solver import _front, _unwind
from planner.solver import (
    PINNABLE,
    InfeasiblePlanError,
    PlanError,
    Prediction,
    Solution,
    SolverStats,
    Stage,
    _objective_value,
    _run,
    replica_size_allowed,
)

__all__ = ["solve_mixed", "solve_mixed_reference", "best_subsets", "group_link",
           "predict_mixed", "mixed_request_error",
           "MAX_ORDERS"]

#: Group orders tried at most (every permutation of the groups up to 4 groups).
MAX_ORDERS = 24


def group_link(a: Link, b: Link) -> Link:
    """The link between two groups: the slower side's latency and bandwidth."""
    return Link(max(a.latency_s, b.latency_s), min(a.bandwidth_bytes_per_s,
                                                    b.bandwidth_bytes_per_s))


@dataclass
class _Group:
    """One group in one combo: its table, degrees, sizes and integer times."""

    index: int  # the cluster's group index (device ids)
    per_node: int
    sizes: tuple[int, ...]  # per-replica device counts allowed (> 0)
    cap: int
    table: CostTable
    tps: tuple[int, ...]
    ticks: list[dict[int, int]]
    hop_intra: list[int]
    hop_inter: list[int]

    @property
    def s_max(self) -> int:
        return max(self.sizes)

    def mem(self, j: int, first: int, t: int) -> int:
        return self.table.layer_memory_bytes(j, first, t)


@dataclass
class _Combo:
    dp: int
    m: int
    groups: list[_Group]  # in pipeline order
    ghop: dict[tuple[int, int], list[int]]  # (position p, position q) -> ticks per cut
    pp: int | None
    lb: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.groups[0].ticks)


def _check_pins(pins: Mapping[str, int] | None, batch: int, num_layers: int,
                cluster: MixedCluster) -> dict[str, int]:
    problems, clean = [], {}
    pins = dict(pins or {})
    unknown = set(pins) - set(PINNABLE)
    if unknown:
        problems.append(f"unknown pin(s) {sorted(unknown)}; pinnable: {', '.join(PINNABLE)}")
    for k in PINNABLE:
        v = pins.get(k)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            problems.append(f"{k} must be a positive integer, got {v!r}")
        else:
            clean[k] = v
    dp, pp, tp, m = (clean.get(k) for k in ("dp", "pp", "tp", "microbatches"))
    if dp is not None and batch % dp:
        problems.append(f"dp {dp} does not divide batch size {batch}")
    if pp is not None and pp > num_layers:
        problems.append(f"pp {pp} > {num_layers} layers: every stage needs at least one layer")
    if tp is not None and not any(g.devices_per_node % tp == 0 for g in cluster.groups):
        problems.append(f"tp {tp} divides the node of no group "
                        f"({', '.join(g.spec_string for g in cluster.groups)})")
    if m is not None and dp is not None and batch % dp == 0 and (batch // dp) % m:
        problems.append(f"microbatches {m} does not divide batch {batch} / dp {dp}")
    elif m is not None and dp is None and batch % m:
        problems.append(f"microbatches {m} does not divide batch size {batch}")
    product = math.prod(clean.get(k, 1) for k in ("dp", "pp", "tp"))
    if product > cluster.num_devices:
        problems.append(f"dp × pp × tp = {product} > {cluster.num_devices} devices")
    if problems:
        raise PlanError("pins contradict the request: " + "; ".join(problems))
    return clean


def _build(builders: Sequence[CostTableBuilder], cluster: MixedCluster, workload: Workload,
           pins, max_microbatches: int | None) -> tuple[list[_Combo], dict[str, int]]:
    if not isinstance(cluster, MixedCluster):
        raise PlanError("solve_mixed plans a MixedCluster; plan one device type with "
                        "planner.solver.solve")
    if len(builders) != len(cluster.groups):
        raise PlanError(f"one cost-table builder per group: {len(cluster.groups)} groups, "
                        f"{len(builders)} builders")
    batch = workload.batch_size
    probe = builders[0](batch, 1)
    L = probe.num_layers
    pins = _check_pins(pins, batch, L, cluster)
    orders = list(itertools.permutations(range(len(cluster.groups))))[:MAX_ORDERS]
    tables: dict[tuple[int, int, int], CostTable] = {}
    combos = []
    for dp in [pins["dp"]] if "dp" in pins else [d for d in range(1, batch + 1) if batch % d == 0]:
        sizes = [tuple(s for s in range(1, g.num_devices // dp + 1)
                       if replica_size_allowed(s, dp, g.nodes, g.devices_per_node))
                 for g in cluster.groups]
        if not any(sizes):
            continue
        per_replica = batch // dp
        ms = [pins["microbatches"]] if "microbatches" in pins else \
            [d for d in range(1, per_replica + 1) if per_replica % d == 0]
        for m in ms:
            if per_replica % m or (max_microbatches and m > max_microbatches
                                   and "microbatches" not in pins):
                continue
            shapes: list[_Group | None] = []
            for gi, g in enumerate(cluster.groups):
                if not sizes[gi]:
                    shapes.append(None)
                    continue
                key = (gi, per_replica // m, m)
                if key not in tables:
                    tables[key] = builders[gi](per_replica // m, m)
                table = tables[key]
                if table.num_layers != L:
                    raise PlanError(f"the builders disagree on the layer count ({L} and "
                                    f"{table.num_layers})")
                tps = tuple(t for t in table.tp_degrees if g.devices_per_node % t == 0
                            and t <= max(sizes[gi]) and pins.get("tp", t) == t)
                cap = int(g.device_spec.memory_bytes * (1.0 - workload.memory_headroom))
                shapes.append(_Group(
                    gi, g.devices_per_node, sizes[gi], cap, table, tps,
                    [{t: to_ticks(c.time_s) for t, c in table.costs[j].items() if t in tps}
                     for j in range(L)],
                    [to_ticks(table.p2p_s(j, False)) for j in range(L - 1)],
                    [to_ticks(table.p2p_s(j, True)) for j in range(L - 1)]))
            for order in orders:
                # a group that cannot take part (too few devices for dp, no degree) is left
                # out; orders that then coincide are one combo (deduplicated below)
                groups = [shapes[i] for i in order if shapes[i] is not None and shapes[i].tps]
                if not groups:
                    continue
                ghop = {}
                for p, q in itertools.combinations(range(len(groups)), 2):
                    a, b = groups[p].table, groups[q].table
                    link = group_link(a.inter_node, b.inter_node)
                    ghop[(p, q)] = [to_ticks(link.transfer_s(a.boundary_bytes[j]))
                                    for j in range(L - 1)]
                combos.append(_Combo(dp, m, groups, ghop, pins.get("pp")))
    # orders that dropped the same groups collapse to the same combo: keep one of each
    seen, unique = set(), []
    for c in combos:
        key = (c.dp, c.m, tuple(g.index for g in c.groups))
        if key not in seen:
            seen.add(key)
            unique.append(c)
    return unique, pins


def _lower_bound(combo: _Combo, objective: str) -> int:
    """A valid bound on the objective of any plan of the combo (-1: a layer fits nowhere).

    As the homogeneous ``_lower_bound``, with every group's degrees pooled: the sum of stage
    times >= every layer at its fastest group and degree; the bottleneck >= the slowest such
    layer, >= that sum over the most stages the replica's devices allow, and >= the
    device-seconds (each layer at its cheapest ``tp * time``) over the replica's devices
    ``S = sum of each group's largest share``; and the coupled bound (a layer at degree
    ``tau`` adds ``c`` to the sum and ``tau * c`` to the device-seconds).
    """
    L, m = combo.num_layers, combo.m
    cells = []
    for j in range(L):
        row = [(t, v) for g in combo.groups for t, v in g.ticks[j].items()]
        if not row:
            return -1
        cells.append(row)
    fastest = [min(v for _, v in row) for row in cells]
    total = sum(fastest)
    s_total = sum(g.s_max for g in combo.groups)
    stages_max = min(L, sum(g.s_max // min(g.tps) for g in combo.groups))
    if combo.pp is not None:
        if combo.pp > stages_max:
            return -1
        stages_max = combo.pp
    cheapest = sum(min(t * v for t, v in row) for row in cells)
    worst = max(max(fastest), -(-total // stages_max), -(-cheapest // s_total))
    bound = total + (m - 1) * worst if objective == "latency" else max(m * worst, total)
    weights = [(1.0, (m - 1) / s_total)] if objective == "latency" else \
        [(1.0 - lam, lam * m / s_total) for lam in (0.0, 0.25, 0.5, 0.75, 1.0)]
    for w_sum, w_dev in weights:
        coupled = sum(min(v * (w_sum + w_dev * t) for t, v in row) for row in cells)
        bound = max(bound, int(math.floor(coupled * (1 - 1e-12))))
    return bound


_UNREACHED = 1 << 60  # "no partial plan" in the DP bound's int64 arrays (sums stay < 2**63)


class _StageSums:
    """``sum_min(M)``: the least sum of stage times and hops over the plans of a combo whose
    every stage takes at most ``M`` ticks: a DP over (boundary, group position, devices
    used in that group). The arcs are the CP-SAT model's (memory within the group's
    capacity, degrees every layer allows), a stage's tp group stays inside one node, a cut
    is priced as the solvers price it (inside a group by where the next stage starts,
    between groups on the slower side), a group is left with a device count it allows and
    holds at most its largest share. Only a ``pp`` pin is ignored, so for the stage times
    and hops it is exact; the bound's only slack is that ``M`` caps stages, not hops.
    """

    def __init__(self, combo: _Combo) -> None:
        L, K = combo.num_layers, len(combo.groups)
        self.combo, self.L, self.K = combo, L, K
        self.S = max(g.s_max for g in combo.groups)
        self.prefix: list[dict[int, np.ndarray]] = []
        self.ends: list[dict[int, list[int]]] = []  # last layer a stage from a may hold
        values = []
        for g in combo.groups:
            prefix, ends = {}, {}
            for t in g.tps:
                pt = np.zeros(L + 1, dtype=np.int64)
                pt[1:] = np.cumsum([g.ticks[j].get(t, 0) for j in range(L)])
                last = []
                for a in range(L):
                    mem, b = g.table.workspace(t), a - 1
                    while b + 1 < L and t in g.ticks[b + 1]:
                        mem += g.mem(b + 1, a, t)
                        if mem > g.cap:
                            break
                        b += 1
                    last.append(b)
                    if b >= a:
                        values.append(pt[a + 1:b + 2] - pt[a])
                prefix[t], ends[t] = pt, last
            self.prefix.append(prefix)
            self.ends.append(ends)
        floor = max(min(v for g in combo.groups for v in g.ticks[j].values()) for j in range(L))
        self.values = np.unique(np.concatenate(values)) if values else np.zeros(0, np.int64)
        self.values = self.values[self.values >= floor]
        # the cut before boundary j inside group q, after u of its devices: intra-node, or
        # inter-node when the next stage starts a node (u a multiple of the node), and a
        # stage of tp t may start after u devices only inside one node
        self.intra = [[0, *g.hop_intra] for g in combo.groups]
        self.extra = [[0, *(b - a for a, b in zip(g.hop_intra, g.hop_inter))]
                      for g in combo.groups]
        units = np.arange(self.S + 1)
        self.on_node = [(units % g.per_node == 0).astype(np.int64) for g in combo.groups]
        self.fits = [{t: units % g.per_node + t <= g.per_node for t in g.tps}
                     for g in combo.groups]
        self.leave = [np.array(sorted(g.sizes), dtype=np.int64) for g in combo.groups]
        self._memo: dict[int, int] = {}
        self.at: int | None = None  # the largest stage time of the bound's best case

    def sum_min(self, limit: int) -> int:
        """The least sum over plans whose stages all take <= ``limit`` (>= _UNREACHED: none)."""
        if limit not in self._memo:
            best = self._table(limit)
            self._memo[limit] = int(min(best[self.L, q, self.leave[q]].min()
                                        for q in range(self.K)))
        return self._memo[limit]

    def _table(self, limit: int) -> np.ndarray:
        """``best[j, q, u]``: the least sum reaching boundary ``j`` in group position ``q``
        with ``u`` of its devices used, every stage <= ``limit``."""
        combo, L, K, S = self.combo, self.L, self.K, self.S
        best = np.full((L + 1, K, S + 1), _UNREACHED, dtype=np.int64)
        best[0, :, 0] = 0
        for j in range(L):
            if j > 0:
                for q in range(1, K):  # enter a later group at boundary j (its offset 0)
                    for p in range(q):
                        came = best[j, p, self.leave[p]].min() + combo.ghop[(p, q)][j - 1]
                        if came < best[j, q, 0]:
                            best[j, q, 0] = came
            for q, g in enumerate(combo.groups):
                fresh = best[j, q, 0]
                used = best[j, q, 1:g.s_max] + self.intra[q][j] \
                    + self.extra[q][j] * self.on_node[q][1:g.s_max]  # after a stage of q
                for t in g.tps:
                    pt = self.prefix[q][t]
                    b = min(self.ends[q][t][j],
                            int(np.searchsorted(pt, pt[j] + limit, side="right")) - 2)
                    if b < j:
                        continue
                    times = pt[j + 1:b + 2] - pt[j]
                    rows = best[j + 1:b + 2, q]
                    if fresh < _UNREACHED:
                        np.minimum(rows[:, t], fresh + times, out=rows[:, t])
                    width = g.s_max - t
                    if width > 0:
                        source = np.where(self.fits[q][t][1:1 + width], used[:width],
                                          _UNREACHED)
                        np.minimum(rows[:, t + 1:t + 1 + width],
                                   source[None, :] + times[:, None],
                                   out=rows[:, t + 1:t + 1 + width])
        return best

    def path(self, limit: int) -> list[tuple[int, int, int, int]] | None:
        """A path ``[(first, last, tp, position)]`` of least sum with every stage <= ``limit``
        that is a plan of the combo (its tp groups inside nodes, its stage count pinned), or
        None: a candidate incumbent, priced exactly by ``_path_value``."""
        combo, L = self.combo, self.L
        best = self._table(limit)
        ends = [(int(best[L, q, u]), q, int(u)) for q in range(self.K) for u in self.leave[q]]
        value, q, u = min(ends)
        if value >= _UNREACHED:
            return None
        path, j = [], L
        while j > 0 or u > 0:
            if u == 0:  # entered group q at boundary j from an earlier group
                came = next(((p, int(w)) for p in range(q) for w in self.leave[p]
                             if best[j, p, w] + combo.ghop[(p, q)][j - 1] == value), None)
                if came is None:
                    return None
                q, u = came
                value = int(best[j, q, u])
                continue
            g, step = combo.groups[q], None
            for t in g.tps:
                if t > u:
                    continue
                pt = self.prefix[q][t]
                for a in range(j - 1, -1, -1):
                    if self.ends[q][t][a] < j - 1 or pt[j] - pt[a] > limit:
                        continue
                    before = int(best[a, q, u - t])
                    was = u - t
                    if was > 0 and not self.fits[q][t][was]:
                        continue
                    hop = self.intra[q][a] + self.extra[q][a] * int(self.on_node[q][was]) \
                        if was > 0 else 0
                    if before < _UNREACHED and before + hop + int(pt[j] - pt[a]) == value:
                        step = (a, t, before)
                        break
                if step:
                    break
            if step is None:
                return None
            a, t, value = step
            path.append((a, j - 1, t, q))
            j, u = a, u - t
        path.reverse()
        offsets = [0] * self.K
        for _, _, t, p in path:
            per_node = combo.groups[p].per_node
            if offsets[p] % per_node + t > per_node:
                return None
            offsets[p] += t
        if combo.pp is not None and len(path) != combo.pp:
            return None
        return path

    def bound(self, objective: str, cutoff: int | None, evaluations: int = 64) -> int:
        """A valid lower bound on the combo's objective (>= _UNREACHED: nothing fits).

        A plan whose largest stage takes ``M`` has sum >= ``sum_min(M)``, so its period is
        at least ``min_M max(m M, sum_min(M))`` and its latency at least
        ``min_M sum_min(M) + (m - 1) M``, ``M`` over the stage times that fit. ``sum_min`` is
        non-increasing in ``M``: the period's minimum is where the two terms cross (a
        bisection); for the latency, ``M`` in ``[v_lo, v_hi]`` gives at least
        ``sum_min(v_hi) + (m - 1) v_lo``, and intervals are split until their bound exceeds
        ``cutoff`` or ``evaluations`` DP runs are spent, lowest bound first (the lowest left
        is the answer).
        """
        v, m = self.values, self.combo.m
        n = len(v)
        if n == 0:
            return _UNREACHED
        if objective == "throughput":
            lo, hi = 0, n  # the first index whose m * M reaches sum_min(M)
            while lo < hi:
                mid = (lo + hi) // 2
                if m * int(v[mid]) >= self.sum_min(int(v[mid])):
                    hi = mid
                else:
                    lo = mid + 1
            if lo == n:
                self.at = int(v[-1])
                return self.sum_min(self.at)
            below = self.sum_min(int(v[lo - 1])) if lo > 0 else _UNREACHED
            self.at = int(v[lo]) if m * int(v[lo]) <= below else int(v[lo - 1])
            return min(m * int(v[lo]), below)
        if m == 1:
            self.at = int(v[-1])
            return self.sum_min(self.at)
        def interval(lo: int, hi: int) -> tuple[int, int, int]:
            return self.sum_min(int(v[hi])) + (m - 1) * int(v[lo]), lo, hi

        heap = [interval(0, n - 1)]  # best first: the smallest interval bound on top
        while True:
            value, lo, hi = heapq.heappop(heap)
            if lo == hi or (cutoff is not None and value > cutoff) \
                    or len(self._memo) >= evaluations:
                self.at = int(v[hi])
                return value  # no interval left bounds lower
            mid = (lo + hi) // 2
            heapq.heappush(heap, interval(lo, mid))
            heapq.heappush(heap, interval(mid + 1, hi))


# --------------------------------------------------------------------------- placement


def predict_mixed(tables: Sequence[CostTable], cluster: MixedCluster, path, dp: int,
                  batch_size: int) -> tuple[tuple[Stage, ...], Prediction]:
    """Stages (with device ids) and the prediction of a fixed mixed placement: ``path`` is
    ``[(first, last, tp, group)]`` in pipeline order, ``tables[g]`` group ``g``'s table at
    the plan's microbatch size and count. Priced as the solvers do: a cut inside a group on
    its intra- or inter-node link (inter when the next stage starts a node), between groups
    on the slower side (``group_link``). ``planner.api`` prices a decode plan's prefill
    (TTFT) with it."""
    m = tables[path[0][3]].microbatches
    groups = [g for _, _, _, g in path]
    used = {g: sum(t for _, _, t, q in path if q == g) for g in groups}
    off = dict.fromkeys(groups, 0)
    stages, times, hops = [], [], []
    for i, (a, b, t, g) in enumerate(path):
        table, per_node = tables[g], cluster.groups[g].devices_per_node
        if i > 0:
            pb, pg = path[i - 1][1], path[i - 1][3]
            if pg == g:
                hops.append(table.p2p_s(pb, inter_node=off[g] % per_node == 0))
            else:
                link = group_link(tables[pg].inter_node, table.inter_node)
                hops.append(link.transfer_s(table.boundary_bytes[pb]))
        base = cluster.group_offsets[g] + off[g]
        devices = tuple(tuple(range(base + r * used[g], base + r * used[g] + t))
                        for r in range(dp))
        compute = sum(table.costs[j][t].compute_s for j in range(a, b + 1))
        comm = sum(table.costs[j][t].comm_s for j in range(a, b + 1))
        stages.append(Stage(a, b, t, devices, compute, comm, table.stage_memory_bytes(a, b, t),
                            int(table.kv_heads_replicated.get(t, 1))))
        times.append(compute + comm)
        off[g] += t
    latency = _objective_value(times + hops, m, "latency")
    period = _objective_value(times + hops, m, "throughput")
    return tuple(stages), Prediction(latency, batch_size / period if period > 0 else math.inf,
                                     max(s.memory_bytes for s in stages), period, tuple(hops))


def _predict(combo: _Combo, path, batch_size: int, cluster: MixedCluster):
    """``predict_mixed`` of a combo's path ``[(a, b, tp, position)]``."""
    tables = {g.index: g.table for g in combo.groups}
    return predict_mixed([tables.get(i) for i in range(len(cluster.groups))], cluster,
                         [(a, b, t, combo.groups[q].index) for a, b, t, q in path], combo.dp,
                         batch_size)


def _solution(combo, path, workload, cluster, stats) -> Solution:
    stages, pred = _predict(combo, path, workload.batch_size, cluster)
    table = combo.groups[path[0][3]].table
    return Solution(workload.objective, workload.batch_size, combo.dp, combo.m,
                    table.microbatch_size, stages, pred, stats, table.sequence_parallel)


def _path_value(combo: _Combo, path, objective: str) -> int:
    """The integer objective of a path (the formula both solvers minimise)."""
    values, off = [], [0] * len(combo.groups)
    for i, (a, b, t, q) in enumerate(path):
        g = combo.groups[q]
        if i > 0:
            pb, pq = path[i - 1][1], path[i - 1][3]
            if pq == q:
                values.append(g.hop_inter[pb] if off[q] % g.per_node == 0 else g.hop_intra[pb])
            else:
                values.append(combo.ghop[(pq, q)][pb])
        values.append(sum(g.ticks[j][t] for j in range(a, b + 1)))
        off[q] += t
    return _objective_value(values, combo.m, objective)


# --------------------------------------------------------------------------- reference


def _best_path_dp(combo: _Combo, objective: str, worse_than: int | None):
    """Exact best ``(value, path)`` of a combo by a Pareto-front DP over states
    ``(boundary, position of the last stage's group, devices used in it, stages)``."""
    L, m, K = combo.num_layers, combo.m, len(combo.groups)
    pinned, latency = combo.pp is not None, objective == "latency"
    labels: list[dict] = [{} for _ in range(L + 1)]
    labels[0][(-1, 0, 0)] = [(0, 0, None)]
    for j in range(L):
        for (p, u, k), raw in sorted(labels[j].items()):
            if pinned and k >= combo.pp:
                continue
            front = _front(raw)
            for q in range(max(p, 0), K):
                if q != p and p >= 0 and u not in combo.groups[p].sizes:
                    continue  # leaving group p: its device count must be one allowed
                g = combo.groups[q]
                off = u if q == p else 0
                if j == 0:
                    hop = 0
                elif q == p:
                    hop = g.hop_inter[j - 1] if off % g.per_node == 0 else g.hop_intra[j - 1]
                else:
                    hop = combo.ghop[(p, q)][j - 1]
                for t in g.tps:
                    if off % g.per_node + t > g.per_node or off + t > g.s_max:
                        continue
                    key = (q, off + t, k + 1 if pinned else 0)
                    time_acc, mem_acc = 0, g.table.workspace(t)
                    for b in range(j, L):
                        if t not in g.ticks[b]:
                            break
                        time_acc += g.ticks[b][t]
                        mem_acc += g.mem(b, j, t)
                        if mem_acc > g.cap:
                            break
                        if worse_than is not None and m * time_acc > worse_than:
                            break
                        target = labels[b + 1].setdefault(key, [])
                        for s, w, path in front:
                            s2, w2 = s + hop + time_acc, max(w, hop, time_acc)
                            value = s2 + (m - 1) * w2 if latency else max(m * w2, s2)
                            if worse_than is None or value <= worse_than:
                                target.append((s2, w2, ((j, b, t, q), path)))
        labels[j] = {}
    best = None
    for (p, u, k), raw in labels[L].items():
        if p < 0 or u not in combo.groups[p].sizes or (pinned and k != combo.pp):
            continue
        for s, w, path in _front(raw):
            value = s + (m - 1) * w if latency else max(m * w, s)
            if best is None or value < best[0] or (value == best[0] and _unwind(path) < best[1]):
                best = (value, _unwind(path))
    return best


def solve_mixed_reference(builders: Sequence[CostTableBuilder], cluster: MixedCluster,
                          workload: Workload, *, pins: Mapping[str, int] | None = None,
                          max_microbatches: int | None = None) -> Solution:
    """Exact optimum by dynamic programming; same arguments and result as ``solve_mixed``."""
    start = time.perf_counter()
    combos, _ = _build(builders, cluster, workload, pins, max_microbatches)
    best = None
    for combo in combos:
        found = _best_path_dp(combo, workload.objective,
                              None if best is None else best[0])
        if found is not None and (best is None or found[0] < best[0]):
            best = (found[0], combo, list(found[1]))
    if best is None:
        raise InfeasiblePlanError(f"no plan fits on the {cluster.num_devices} devices of "
                                  f"{cluster.spec_string}")
    value, combo, path = best
    stats = SolverStats("OPTIMAL", value * TICK_S, value * TICK_S, time.perf_counter() - start,
                        objective_ticks=value, solver="reference", combos_solved=len(combos))
    return _solution(combo, path, workload, cluster, stats)


# --------------------------------------------------------------------------- CP-SAT


def _model(combo: _Combo, objective: str, cutoff: int | None):
    """The CP-SAT model of one combo: a path through nodes (boundary j, position q)."""
    L, m, K = combo.num_layers, combo.m, len(combo.groups)
    arcs = []  # (a, b, t, q, time)
    for q, g in enumerate(combo.groups):
        for a in range(L):
            for t in g.tps:
                time_acc, mem_acc = 0, g.table.workspace(t)
                for b in range(a, L):
                    if t not in g.ticks[b]:
                        break
                    time_acc += g.ticks[b][t]
                    mem_acc += g.mem(b, a, t)
                    if mem_acc > g.cap:
                        break
                    if cutoff is not None and m * time_acc > cutoff:
                        break
                    arcs.append((a, b, t, q, time_acc))
    trans = [(j, p, q) for j in range(L + 1) for p in range(K) for q in range(p + 1, K)]
    model = cp_model.CpModel()
    y = [model.NewBoolVar(f"y{i}") for i in range(len(arcs))]
    x = [model.NewBoolVar(f"x{i}") for i in range(len(trans))]
    flow_in = [[[] for _ in range(K)] for _ in range(L + 1)]
    flow_out = [[[] for _ in range(K)] for _ in range(L + 1)]
    starts = [[[] for _ in range(K)] for _ in range(L + 1)]  # arcs (index) starting at (j, q)
    ends = [[[] for _ in range(K)] for _ in range(L + 1)]
    for i, (a, b, _t, q, _) in enumerate(arcs):
        flow_out[a][q].append(y[i])
        flow_in[b + 1][q].append(y[i])
        starts[a][q].append(i)
        ends[b + 1][q].append(i)
    trans_at = [[] for _ in range(L + 1)]
    for i, (j, p, q) in enumerate(trans):
        flow_out[j][p].append(x[i])
        flow_in[j][q].append(x[i])
        trans_at[j].append(i)
    for j in range(L + 1):
        for q in range(K):
            net = sum(flow_out[j][q]) - sum(flow_in[j][q])
            model.Add(net == (1 if (j, q) == (0, 0) else -1 if (j, q) == (L, K - 1) else 0))
        model.Add(sum(x[i] for i in trans_at[j]) <= 1)
    if combo.pp is not None:
        model.Add(sum(y) == combo.pp)
    for q, g in enumerate(combo.groups):
        size = model.NewIntVarFromDomain(cp_model.Domain.FromValues([0, *g.sizes]), f"d{q}")
        model.Add(size == sum(arcs[i][2] * y[i] for i in range(len(arcs)) if arcs[i][3] == q))
    # offsets inside each group; a tp group stays in a node; the cut's link
    hop_terms: list[list] = [[] for _ in range(L + 1)]
    for q, g in enumerate(combo.groups):
        offset = 0
        for j in range(L):
            offset = offset + sum(arcs[i][2] * y[i] for i in ends[j][q])
            start_here = sum(y[i] for i in starts[j][q])
            tp_here = sum(arcs[i][2] * y[i] for i in starts[j][q])
            if not starts[j][q]:
                continue
            if g.per_node > 1:
                rem = model.NewIntVar(0, g.per_node - 1, f"rem{j}_{q}")
                node = model.NewIntVar(0, g.s_max // g.per_node + 1, f"node{j}_{q}")
                model.Add(offset == g.per_node * node + rem)
            else:
                rem = 0
            model.Add(rem + tp_here <= g.per_node)
            if j == 0:
                continue
            intra, inter = g.hop_intra[j - 1], g.hop_inter[j - 1]
            hop_terms[j].append(intra * start_here)
            if inter != intra:
                z = model.NewBoolVar(f"z{j}_{q}")
                if g.per_node > 1:
                    model.Add(rem == 0).OnlyEnforceIf(z)
                    model.Add(rem >= 1).OnlyEnforceIf(z.Not())
                else:
                    model.Add(z == 1)
                crossing = model.NewBoolVar(f"w{j}_{q}")
                model.AddBoolAnd([z]).OnlyEnforceIf(crossing)
                model.Add(start_here >= 1).OnlyEnforceIf(crossing)
                model.Add(crossing >= z + start_here - 1)
                hop_terms[j].append((inter - intra) * crossing)
    for i, (j, p, q) in enumerate(trans):
        if 0 < j < L:
            correction = combo.ghop[(p, q)][j - 1] - combo.groups[q].hop_inter[j - 1]
            if correction:
                hop_terms[j].append(correction * x[i])
    hops = [sum(hop_terms[j]) for j in range(1, L)]
    top = max([a[4] for a in arcs] + [v for g in combo.groups for v in g.hop_inter + g.hop_intra]
              + [v for vs in combo.ghop.values() for v in vs] + [0])
    worst = model.NewIntVar(0, top, "bottleneck")
    for j in range(L):
        for q in range(K):
            if starts[j][q]:
                model.Add(worst >= sum(arcs[i][4] * y[i] for i in starts[j][q]))
    for h in hops:
        model.Add(worst >= h)
    s_total = sum(g.s_max for g in combo.groups)
    model.Add(s_total * worst >= sum(arcs[i][2] * arcs[i][4] * y[i] for i in range(len(arcs))))
    # stage times relative to every layer at its fastest group and degree (a constant):
    # the same sum with small non-negative coefficients, as in the homogeneous model
    fastest = [min(v for g in combo.groups for v in g.ticks[j].values()) for j in range(L)]
    model.Add(worst >= max(fastest))
    prefix = [0]
    for v in fastest:
        prefix.append(prefix[-1] + v)
    total = prefix[L] + sum((arcs[i][4] - prefix[arcs[i][1] + 1] + prefix[arcs[i][0]]) * y[i]
                            for i in range(len(arcs))) + sum(hops)
    if objective == "latency":
        obj = total + (m - 1) * worst
    else:
        obj = model.NewIntVar(0, m * top + sum(a[4] for a in arcs) + L * top, "period")
        model.Add(obj >= m * worst)
        model.Add(obj >= total)
    if cutoff is not None:
        model.Add(obj <= cutoff)
    model.Minimize(obj)
    return model, y, arcs, obj


def best_subsets(builders: Sequence[CostTableBuilder], cluster: MixedCluster,
                 workload: Workload, *, pins: Mapping[str, int] | None = None,
                 num_workers: int = 2, time_limit_s: float = 60.0) -> list[Solution | None]:
    """The optimal plan of each group alone (``planner.solver.solve`` on that homogeneous
    cluster; ``None`` where nothing fits or the pins cannot hold there): the baselines a
    mixed plan is compared with, and the mixed search's first incumbent."""
    from planner.solver import solve

    found = []
    for builder, group in zip(builders, cluster.groups):
        try:
            found.append(solve(builder, group, workload, pins=pins, num_workers=num_workers,
                               time_limit_s=time_limit_s, diagnose=False))
        except PlanError:
            found.append(None)
    return found


def _as_path(combos: list[_Combo], group: int, solution: Solution, objective: str):
    """``(value, combo, path)`` of a one-group plan in the mixed search, or None."""
    for combo in combos:
        positions = [q for q, g in enumerate(combo.groups) if g.index == group]
        if combo.dp != solution.dp or combo.m != solution.microbatches or not positions \
                or combo.pp not in (None, solution.pp):
            continue
        q = positions[0]
        path = [(s.first, s.last, s.tp, q) for s in solution.stages]
        g = combo.groups[q]
        if sum(t for _, _, t, _ in path) not in g.sizes or any(
                t not in g.ticks[j] for a, b, t, _ in path for j in range(a, b + 1)):
            continue
        return _path_value(combo, path, objective), combo, path
    return None


def solve_mixed(builders: Sequence[CostTableBuilder], cluster: MixedCluster,
                workload: Workload, *, pins: Mapping[str, int] | None = None,
                max_microbatches: int | None = None, num_workers: int = 2,
                time_limit_s: float = 60.0,
                subsets: Sequence[Solution | None] | None = None) -> Solution:
    """The plan minimising the workload's objective on a mixed cluster, proven optimal by
    CP-SAT: every (dp, microbatches, group order) combo is pruned by a valid lower bound
    (the cheap one, then the DP bound of ``_StageSums``) or solved strictly below the best
    plan found (the best group alone, the DP bound's own plans, CP-SAT's).

    Args:
        builders: one cost-table builder per group of ``cluster`` (its device type).
        cluster: the ``MixedCluster``.
        workload: batch size, objective, memory headroom (per group's device memory).
        pins: any of ``dp``, ``pp``, ``tp`` (every stage), ``microbatches``.
        max_microbatches: largest microbatch count tried.
        num_workers, time_limit_s: as ``planner.solver.solve``.
        subsets: ``best_subsets``' result for the same request, when the caller has it.

    Raises:
        PlanError: contradictory pins, or nothing found within the time limit.
        InfeasiblePlanError: nothing fits in memory.
    """
    start = time.perf_counter()
    deadline = start + time_limit_s
    combos, _ = _build(builders, cluster, workload, pins, max_microbatches)
    objective = workload.objective
    scored = []
    for combo in combos:
        combo.lb = _lower_bound(combo, objective)
        if combo.lb >= 0:
            scored.append(combo)
    scored.sort(key=lambda c: (c.lb, c.dp, c.m))
    # the best plan on one group alone is a plan of the mixed search: the first incumbent
    incumbent = None
    subset_limit = max(0.01, min(time_limit_s / 4, deadline - time.perf_counter()))
    if subsets is None:
        subsets = best_subsets(builders, cluster, workload, pins=pins, num_workers=num_workers,
                               time_limit_s=subset_limit)
    for gi, alone in enumerate(subsets):
        found = _as_path(scored, gi, alone, objective) if alone is not None else None
        if found is not None and (incumbent is None or found[0] < incumbent[0]):
            incumbent = found
    # the incumbent is a plan: every combo is then solved strictly below it or pruned.
    # First every combo's DP bound (min over the largest stage time of the least stage
    # sum; dearer than the cheap one, so only where that does not prune) and the plan at
    # its best case, which often meets the bound; then CP-SAT on the combos left open.
    best, open_bounds, solved, pruned = incumbent, [], 0, 0
    for combo in scored:
        if (best is not None and combo.lb > best[0] - 1) or time.perf_counter() >= deadline:
            continue
        sums = _StageSums(combo)
        combo.lb = max(combo.lb, sums.bound(objective, best[0] - 1 if best else None))
        found = sums.path(sums.at) if sums.at is not None and combo.lb < _UNREACHED else None
        if found is not None:
            value = _path_value(combo, found, objective)
            if best is None or value < best[0]:
                best = (value, combo, found)
    for combo in scored:
        limit = best[0] - 1 if best is not None else None
        if combo.lb >= _UNREACHED or (limit is not None and combo.lb > limit):
            pruned += 1
            continue
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            open_bounds.append(combo.lb)
            continue
        model, y, arcs, obj = _model(combo, objective, limit)
        solved += 1
        if not arcs:
            continue
        solver, status = _run(model, num_workers, remaining)
        if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            value = int(round(solver.Value(obj)))
            chosen = sorted((arcs[i][0], arcs[i][1], arcs[i][2], arcs[i][3])
                            for i in range(len(arcs)) if solver.Value(y[i]))
            if best is None or value < best[0]:
                best = (value, combo, chosen)
            if status == cp_model.FEASIBLE:
                open_bounds.append(max(combo.lb, int(math.ceil(solver.BestObjectiveBound()))))
        elif status == cp_model.UNKNOWN:
            open_bounds.append(max(combo.lb, int(math.ceil(solver.BestObjectiveBound()))))
    if best is None:
        if time.perf_counter() >= deadline:
            raise PlanError(f"no plan found within the {time_limit_s:g} s time limit")
        raise InfeasiblePlanError(f"no plan fits on the {cluster.num_devices} devices of "
                                  f"{cluster.spec_string} (each group's memory × (1 − "
                                  f"{workload.memory_headroom:g} headroom))")
    value, combo, path = best
    bound = min(open_bounds + [value])
    stats = SolverStats("OPTIMAL" if bound >= value else "FEASIBLE", value * TICK_S,
                        bound * TICK_S, time.perf_counter() - start, objective_ticks=value,
                        gap=(value - bound) / value if value else 0.0, solver="cp-sat",
                        combos_solved=solved, combos_pruned=pruned)
    return _solution(combo, path, workload, cluster, stats)


def mixed_request_error(cluster: MixedCluster, phase: str) -> str | None:
    """Why ``plan MODEL`` / ``planner.plan`` refuse a request on a mixed cluster (training:
    not supported yet), or None: inference phases are planned."""
    if phase in ("prefill", "decode"):
        return None
    return (f"{phase} plans on a mixed cluster ({cluster.spec_string}) are not supported yet: "
            f"plan training for one device type (e.g. --cluster "
            f"{cluster.groups[0].spec_string}), or plan prefill or decode on the mixed cluster")
