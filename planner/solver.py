"""The CP-SAT planner: data parallelism x pipeline partition x per-stage tp x microbatches.

The search is split in two levels (docs/solver.md has the full formulation):

1. *Outer*: every (dp, microbatches) pair the pins allow. Each pair fixes the microbatch
   size, hence one ``CostTable``. Pairs are visited best-lower-bound first and skipped once
   their bound cannot beat the incumbent.
2. *Inner*: one CP-SAT model per pair. A plan is a path through the layer boundaries
   ``0..L``; an arc ``(a, b, tp)`` is a stage holding layers ``a..b`` at degree ``tp``.
   Stage time and memory of an arc are prefix sums of the table, computed before the model
   is built, so the model is a shortest path with a bottleneck term, device offsets for the
   placement rule and a cutoff at the incumbent.

Optimality is proven by CP-SAT: the best pair is solved to OPTIMAL and every other pair
is shown INFEASIBLE below the incumbent (or pruned by a valid lower bound).

>>> from planner.cost_table import CostTable, LayerCost, Link
>>> from planner.cluster import Cluster, Workload
>>> def build(mbs, m):
...     c = {1: LayerCost(1e-3 * mbs, 0, 10**9), 2: LayerCost(6e-4 * mbs, 1e-4, 5 * 10**8)}
...     return CostTable((c,) * 4, (1 << 20,) * 3, Link(1e-6, 1e11), Link(5e-6, 1e10), mbs, m)
>>> sol = solve(build, Cluster(1, 2, "H100"), Workload(batch_size=2, objective="latency"))
>>> (sol.dp, sol.pp, [s.tp for s in sol.stages], sol.solver.status)
(2, 1, [1], 'OPTIMAL')
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ortools.sat.python import cp_model

from planner.cluster import MAX_DEVICES, Cluster, Workload
from planner.cost_table import TICK_S, CostTable, CostTableBuilder, to_ticks

__all__ = [
    "PlanError",
    "InfeasiblePlanError",
    "Stage",
    "Prediction",
    "SolverStats",
    "Solution",
    "PINNABLE",
    "Restriction",
    "check_pins",
    "solve",
    "best_per_family",
    "replica_size_allowed",
    "place_stages",
    "predict",
]

PINNABLE = ("dp", "pp", "tp", "microbatches")


@dataclass(frozen=True)
class Restriction:
    """Plans an engine can express (``plan MODEL --target``; ``planner.engines``).

    The defaults restrict nothing. The training fields concern train plans only (an
    inference search ignores them).

    Attributes:
        uniform_tp: every stage has the same tp (whichever the solver picks).
        split: ``stages -> [(first, last), ...]``, the only layer ranges the engine gives
            that many stages (``pp × virtual_stages``; ``None`` for a count it cannot run);
            ``None``: any contiguous split.
        name: shown in messages.
        zero_levels: ``(dp, pp, tp) -> frozenset`` of the ZeRO levels (0-3) the engine runs
            with those degrees; ``None``: any level.
        schedules: the pipeline schedules it runs when ``pp > 1`` (``gpipe``, ``1f1b``,
            ``interleaved``); ``None``: any.
        recompute: the ``stages[i].recompute`` modes it has; ``None``: any.
        uniform_recompute: one recompute mode for every stage (one global setting).
        tp_with_pp: it combines tp > 1 with pp > 1.
        sequence_parallel_with_tp: with tp > 1, sequence parallelism must be this (True:
            always on, False: never); ``None``: either.
    """

    uniform_tp: bool = False
    split: Callable[[int], list[tuple[int, int]] | None] | None = None
    name: str = ""
    zero_levels: Callable[[int, int, int], frozenset[int]] | None = None
    schedules: frozenset[str] | None = None
    recompute: frozenset[str] | None = None
    uniform_recompute: bool = False
    tp_with_pp: bool = True
    sequence_parallel_with_tp: bool | None = None


GiB = 2**30


class PlanError(ValueError):
    """A request the planner cannot satisfy; the message says what to change."""


class InfeasiblePlanError(PlanError):
    """Nothing fits. ``suggestions`` lists the smallest single changes that do, computed."""

    def __init__(self, message: str, suggestions: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.suggestions = tuple(suggestions)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: a contiguous layer range on one TP group per replica.

    Attributes:
        first, last: inclusive layer indices.
        tp: tensor-parallel degree.
        devices: device ids per data-parallel replica, ``devices[r]`` has ``tp`` ids.
        compute_s, comm_s: one microbatch through the stage (kernels, TP collectives).
        memory_bytes: per-device memory of the stage.
        kv_heads_replicated: KV-head replication factor the cost model applied at ``tp``.
    """

    first: int
    last: int
    tp: int
    devices: tuple[tuple[int, ...], ...]
    compute_s: float
    comm_s: float
    memory_bytes: int
    kv_heads_replicated: int = 1

    @property
    def layers(self) -> tuple[int, int]:
        return (self.first, self.last)


@dataclass(frozen=True)
class Prediction:
    """Predicted figures of a whole plan (definitions in docs/solver.md)."""

    latency_s: float
    throughput_samples_per_s: float
    peak_memory_bytes: int
    period_s: float = 0.0
    p2p_s: tuple[float, ...] = ()


@dataclass(frozen=True)
class SolverStats:
    """How the plan was found. ``objective``/``bound`` are seconds of the minimised time."""

    status: str
    objective: float
    bound: float
    wall_s: float
    objective_ticks: int = 0
    gap: float = 0.0
    solver: str = "cp-sat"
    combos_solved: int = 0
    combos_pruned: int = 0


@dataclass(frozen=True)
class Solution:
    """A plan as the solvers return it; ``planner.plan.Plan`` adds the model and workload."""

    objective: str
    batch_size: int
    dp: int
    microbatches: int
    microbatch_size: int
    stages: tuple[Stage, ...]
    predicted: Prediction
    solver: SolverStats
    sequence_parallel: bool = False

    @property
    def pp(self) -> int:
        return len(self.stages)

    @property
    def num_devices_used(self) -> int:
        return self.dp * sum(s.tp for s in self.stages)

    @property
    def family(self) -> tuple[int, int, tuple[int, ...]]:
        """(dp, pp, tp of each stage): the key ``plan explain`` groups alternatives by."""
        return (self.dp, self.pp, tuple(s.tp for s in self.stages))


# --------------------------------------------------------------------------- placement


def replica_size_allowed(size: int, dp: int, nodes: int, devices_per_node: int) -> bool:
    """Whether ``dp`` replicas of ``size`` devices each can be placed by the rule.

    Replica ``r`` takes devices ``[r*size, (r+1)*size)``. With several replicas the size
    must divide the node (replicas tile a node) or be a multiple of it (replicas start on a
    node boundary), so every replica sees the same node layout.
    """
    if size < 1 or dp * size > nodes * devices_per_node:
        return False
    return dp == 1 or devices_per_node % size == 0 or size % devices_per_node == 0


def place_stages(
    tps: Sequence[int], dp: int, devices_per_node: int
) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Device ids of every stage and replica: ``result[stage][replica]``.

    Stages are packed in pipeline order inside a replica; replicas are contiguous.
    Raises ``PlanError`` when a TP group would straddle a node boundary.
    """
    size = sum(tps)
    placed = []
    offset = 0
    for i, tp in enumerate(tps):
        if offset % devices_per_node + tp > devices_per_node:
            raise PlanError(
                f"stage {i} (tp {tp}) would start at device {offset} and straddle a node of "
                f"{devices_per_node} devices"
            )
        placed.append(tuple(tuple(range(r * size + offset, r * size + offset + tp)) for r in range(dp)))
        offset += tp
    return tuple(placed)


def _objective_value(values: Sequence, m: int, objective: str):
    """Latency or period of one batch from the stage and p2p-hop times (ints or floats)."""
    total, worst = sum(values), max(values)
    if objective == "latency":
        return total + (m - 1) * worst
    return max(m * worst, total)


def predict(
    table: CostTable,
    layers: Sequence[tuple[int, int, int]],
    dp: int,
    batch_size: int,
    devices_per_node: int,
) -> tuple[tuple[Stage, ...], Prediction]:
    """Stages with their predicted figures, and the plan's prediction, in seconds.

    Args:
        table: the cost table for this plan's microbatch size.
        layers: ``(first, last, tp)`` of each stage in pipeline order.
        dp: data-parallel replicas.
        batch_size: global batch.
        devices_per_node: node size, for the placement rule and p2p pricing.
    """
    m = table.microbatches
    devices = place_stages([t for _, _, t in layers], dp, devices_per_node)
    stages, times, hops = [], [], []
    offset = 0
    for i, (a, b, t) in enumerate(layers):
        compute = sum(table.costs[j][t].compute_s for j in range(a, b + 1))
        comm = sum(table.costs[j][t].comm_s for j in range(a, b + 1))
        stages.append(
            Stage(a, b, t, devices[i], compute, comm, table.stage_memory_bytes(a, b, t),
                  int(table.kv_heads_replicated.get(t, 1)))
        )
        times.append(compute + comm)
        offset += t
        if i + 1 < len(layers):
            hops.append(table.p2p_s(b, inter_node=offset % devices_per_node == 0))
    latency = _objective_value(times + hops, m, "latency")
    period = _objective_value(times + hops, m, "throughput")
    prediction = Prediction(
        latency_s=latency,
        throughput_samples_per_s=batch_size / period if period > 0 else math.inf,
        peak_memory_bytes=max(s.memory_bytes for s in stages),
        period_s=period,
        p2p_s=tuple(hops),
    )
    return tuple(stages), prediction


# --------------------------------------------------------------------------- search space


@dataclass
class _Combo:
    """One outer choice (dp, microbatches) with its table rounded to integers."""

    dp: int
    m: int
    table: CostTable
    tps: tuple[int, ...]
    ticks: list[dict[int, int]]
    mem: list[dict[int, int]]
    hop_intra: list[int]
    hop_inter: list[int]
    cap: int
    sizes: tuple[int, ...]
    pp: int | None
    allowed: frozenset | None = None  # the only (first, last) stages (Restriction.split)
    lb: int = 0
    bottleneck: int | None = None  # _bottleneck_bound, computed when the combo is solved

    @property
    def num_layers(self) -> int:
        return len(self.ticks)

    @property
    def s_max(self) -> int:
        return max(self.sizes)

    def mem_at(self, j: int, first: int, t: int) -> int:
        """Layer ``j``'s memory at ``t`` in a stage starting at layer ``first`` (a tensor
        it borrows from a layer before ``first`` is held again: ``CostTable.borrowed``)."""
        if not self.table.borrowed:  # the common case, in the solver's inner loops
            return self.mem[j][t]
        return self.mem[j][t] + self.table.borrowed_bytes(j, first, t)


@dataclass
class _Space:
    """Everything both solvers share about a request: combos, limits, objective."""

    batch_size: int
    nodes: int
    devices_per_node: int
    cap: int
    objective: str
    combos: list[_Combo]
    pins: dict[int, int] = field(default_factory=dict)

    def solution(self, combo: _Combo, path, stats: SolverStats) -> Solution:
        stages, prediction = predict(combo.table, path, combo.dp, self.batch_size,
                                     self.devices_per_node)
        return Solution(self.objective, self.batch_size, combo.dp, combo.m,
                        combo.table.microbatch_size, stages, prediction, stats,
                        combo.table.sequence_parallel)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pin_product_message(pins: Mapping[str, int], nodes: int, per_node: int) -> str | None:
    factors = [(k, pins[k]) for k in ("dp", "pp", "tp") if k in pins]
    product = math.prod(v for _, v in factors)
    total = nodes * per_node
    if factors and product > total:
        expr = " × ".join(f"{k} {v}" for k, v in factors)
        return (f"{expr} = {product} > {total} devices ({nodes} node(s) × {per_node}); "
                f"lower a pin or add devices")
    return None


def check_pins(pins: Mapping[str, int], batch_size: int, num_layers: int, nodes: int,
               devices_per_node: int) -> dict[str, int]:
    """Validate user pins against the cluster and workload; one message lists every problem.

    Raises:
        PlanError: naming every contradicting factor.
    """
    problems = []
    unknown = set(pins) - set(PINNABLE)
    if unknown:
        problems.append(f"unknown pin(s) {sorted(unknown)}; pinnable: {', '.join(PINNABLE)}")
    clean = {}
    for k in PINNABLE:
        if k in pins and pins[k] is not None:
            v = pins[k]
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                problems.append(f"{k} must be a positive integer, got {v!r}")
            else:
                clean[k] = v
    tp, dp, pp, m = (clean.get(k) for k in ("tp", "dp", "pp", "microbatches"))
    if tp is not None and tp > devices_per_node:
        problems.append(f"tp {tp} > {devices_per_node} devices per node: a tensor-parallel "
                        f"group stays inside one node")
    elif tp is not None and devices_per_node % tp:
        problems.append(f"tp {tp} does not divide {devices_per_node} devices per node; "
                        f"use one of {_divisors(devices_per_node)}")
    if dp is not None and batch_size % dp:
        problems.append(f"dp {dp} does not divide batch size {batch_size}; "
                        f"use one of {_divisors(batch_size)}")
    if pp is not None and pp > num_layers:
        problems.append(f"pp {pp} > {num_layers} layers: every stage needs at least one layer")
    if m is not None:
        # with dp free, some replica count works only if m divides the batch (dp = 1)
        split = bool(dp) and batch_size % dp == 0
        per_replica = batch_size // dp if split else batch_size
        if per_replica % m:
            where = f"batch {batch_size} / dp {dp} = {per_replica}" if split \
                else f"batch size {batch_size}"
            problems.append(f"microbatches {m} does not divide {where} samples per replica")
    product = _pin_product_message(clean, nodes, devices_per_node)
    if product:
        problems.append(product)
    if problems:
        raise PlanError("pins contradict the request: " + "; ".join(problems))
    return clean


def _shapes(
    builder: CostTableBuilder,
    cluster: Cluster,
    workload: Workload,
    pins: Mapping[str, int] | None,
    tp_degrees: Iterable[int] | None,
    max_microbatches: int | None,
    probe: Callable[[int, int], CostTable] | None = None,
) -> tuple[tuple[int, ...], list[tuple[int, int, tuple[int, ...]]], dict[str, int]]:
    """The request's outer choices without their tables: ``(tps, [(dp, m, replica sizes)],
    clean pins)``, in the order the search visits them. ``probe`` builds the table read for
    the layer count and degrees (default ``builder``).

    Raises:
        PlanError: contradictory pins, or no tp degree of the model fits the node.
    """
    nodes, per_node, batch = cluster.nodes, cluster.devices_per_node, workload.batch_size
    probe = (probe or builder)(batch, 1)
    pins = check_pins(dict(pins or {}), batch, probe.num_layers, nodes, per_node)
    allowed = {t for t in probe.tp_degrees if per_node % t == 0}
    if tp_degrees is not None:
        allowed &= set(tp_degrees)
    if "tp" in pins:
        if pins["tp"] not in allowed:
            why = getattr(builder, "excluded_tp", {}).get(pins["tp"])
            why = (f"{why}" if why else "tp must divide the devices per node and the model's "
                   "sharding analysis must find a strategy that shards something")
            raise PlanError(f"tp {pins['tp']} cannot be honoured: {why}; this model allows tp in "
                            f"{sorted(allowed)} here (pin one of those, or drop --tp)")
        allowed = {pins["tp"]}
    if not allowed:
        raise PlanError(f"no tp degree of the model {list(probe.tp_degrees)} divides "
                        f"{per_node} devices per node")
    shapes = []
    for dp in [pins["dp"]] if "dp" in pins else _divisors(batch):
        sizes = tuple(s for s in range(1, nodes * per_node // dp + 1)
                      if replica_size_allowed(s, dp, nodes, per_node))
        if not sizes or sizes[0] * dp > nodes * per_node:
            continue
        per_replica = batch // dp
        ms = [pins["microbatches"]] if "microbatches" in pins else _divisors(per_replica)
        for m in ms:
            if per_replica % m or (max_microbatches and m > max_microbatches and
                                   "microbatches" not in pins):
                continue
            shapes.append((dp, m, sizes))
    return tuple(sorted(allowed)), shapes, pins


def _build_space(
    builder: CostTableBuilder,
    cluster: Cluster,
    workload: Workload,
    pins: Mapping[str, int] | None,
    tp_degrees: Iterable[int] | None,
    max_microbatches: int | None,
    capacity_bytes: int | None = None,
    restriction: Restriction | None = None,
) -> tuple[_Space, dict[str, int]]:
    cap = capacity_bytes if capacity_bytes is not None else int(
        cluster.device_spec.memory_bytes * (1.0 - workload.memory_headroom))
    tps, shapes, pins = _shapes(builder, cluster, workload, pins, tp_degrees, max_microbatches)
    batch = workload.batch_size
    combos = []
    tables: dict[tuple[int, int], CostTable] = {}
    for dp, m, sizes in shapes:
        key = (batch // dp // m, m)
        if key not in tables:
            tables[key] = builder(*key)
        if restriction is None or not (restriction.uniform_tp or restriction.split):
            combos.append(_make_combo(tables[key], dp, m, tps, cap, sizes, pins.get("pp")))
            continue
        # One combo per degree (and per stage count, for an engine's own split): the outer
        # search bounds and solves each, so the best of them is proven optimal as before.
        for t in tps if restriction.uniform_tp else [tps]:
            degrees = (t,) if restriction.uniform_tp else tps
            if restriction.split is None:
                combos.append(_make_combo(tables[key], dp, m, degrees, cap, sizes,
                                          pins.get("pp")))
                continue
            L = tables[key].num_layers
            for pp in [pins["pp"]] if "pp" in pins else range(1, L + 1):
                ranges = restriction.split(pp)
                if ranges is None or pp * min(degrees) > max(sizes):
                    continue
                combos.append(replace(_make_combo(tables[key], dp, m, degrees, cap, sizes, pp),
                                      allowed=frozenset(ranges)))
    return _Space(batch, cluster.nodes, cluster.devices_per_node, cap, workload.objective,
                  combos, pins=dict(pins)), pins


def _make_combo(table: CostTable, dp: int, m: int, tps, cap: int, sizes, pp) -> _Combo:
    L = table.num_layers
    tps = tuple(t for t in tps if t <= max(sizes))  # a stage cannot outgrow its replica
    if pp is not None and tps:
        # pp stages: one of degree t leaves pp - 1 stages of at least the smallest degree
        tps = tuple(t for t in tps if t + (pp - 1) * min(tps) <= max(sizes))
    ticks = [{t: to_ticks(c.time_s) for t, c in table.costs[j].items() if t in tps}
             for j in range(L)]
    mem = [{t: c.memory_bytes for t, c in table.costs[j].items() if t in tps} for j in range(L)]
    intra = [to_ticks(table.p2p_s(j, False)) for j in range(L - 1)]
    inter = [to_ticks(table.p2p_s(j, True)) for j in range(L - 1)]
    return _Combo(dp, m, table, tuple(tps), ticks, mem, intra, inter, cap, tuple(sizes), pp)


def _min_devices(combo: _Combo) -> int:
    """Fewest devices one replica needs for its layers to fit in memory (ignores time)."""
    L = combo.num_layers
    fewest = [0] + [math.inf] * L
    for a in range(L):
        if fewest[a] == math.inf:
            continue
        for t in combo.tps:
            mem = combo.table.workspace(t)
            for b in range(a, L):
                if t not in combo.mem[b]:
                    break
                mem += combo.mem_at(b, a, t)
                if mem > combo.cap:
                    break
                fewest[b + 1] = min(fewest[b + 1], fewest[a] + t)
    return fewest[L]


def _bottleneck_bound(combo: _Combo) -> int | None:
    """The smallest largest-stage time of any plan of this combo, or None if nothing fits.

    Exact for the stage times alone: the least ``M`` such that the layers can be cut into
    contiguous stages, each of time ``<= M`` and within memory at a degree all its layers
    allow, using at most ``S_max`` devices. It ignores p2p hops, the placement rule and a
    ``pp`` pin, so it is a valid lower bound on ``max E`` of every plan. Where memory forces
    short stages this is far above the LP bound (device-seconds / S_max), which cannot see
    that a stage holds a whole number of layers.

    Feasibility of ``M`` is monotone and the answer is some stage's time, so it is found by
    bisection over the times of the stages that fit in memory. Each test is a fewest-devices
    shortest path in O(L * |tp| * log L): a stage that fits may be shortened and still fit,
    so boundary ``x`` is reached by any arc starting before ``x`` whose longest fitting
    extension reaches ``x`` (a heap of such arcs by device count).
    """
    L, s_max = combo.num_layers, combo.s_max
    if not all(combo.ticks):
        return None
    rows = []  # (tp, prefix time, furthest end boundary by memory and allowed degree)
    for t in combo.tps:
        pt, pm = [0], [0]
        for j in range(L):
            pt.append(pt[-1] + combo.ticks[j].get(t, 0))
            pm.append(pm[-1] + combo.mem[j].get(t, 0))
        allowed_until = [L] * (L + 1)  # first layer >= a that does not allow t
        for j in range(L - 1, -1, -1):
            allowed_until[j] = j if t not in combo.ticks[j] else allowed_until[j + 1]
        room = combo.cap - combo.table.workspace(t)
        ends = [bisect.bisect_right(pm, pm[a] + room, a, allowed_until[a] + 1) - 1
                for a in range(L)]
        rows.append((t, pt, ends))

    def fits(limit: int) -> bool:
        heap: list[tuple[int, int]] = []
        fewest = 0
        for a in range(L):
            for t, pt, ends in rows:
                end = bisect.bisect_right(pt, pt[a] + limit, a, ends[a] + 1) - 1
                if end > a:
                    heapq.heappush(heap, (fewest + t, end))
            while heap and heap[0][1] <= a:
                heapq.heappop(heap)
            if not heap or heap[0][0] > s_max:  # fewest is non-decreasing in the boundary
                return False
            fewest = heap[0][0]
        return True

    # The answer is the time of some stage that fits: bisect over those times.
    floor = max(min(c.values()) for c in combo.ticks)
    values = sorted({pt[b] - pt[a] for _, pt, ends in rows for a in range(L)
                     for b in range(a + 1, ends[a] + 1) if pt[b] - pt[a] >= floor})
    if not values or not fits(values[-1]):
        return None
    lo, hi = 0, len(values) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(values[mid]):
            hi = mid
        else:
            lo = mid + 1
    return values[lo]


def _lower_bound(combo: _Combo, objective: str, bottleneck: int = 0) -> int | None:
    """A valid bound on the objective of any plan of this combo.

    Sum of stage times >= every layer at its fastest degree. Bottleneck >= the slowest
    layer at its fastest degree, >= that sum spread over the most stages possible, and
    >= the device-seconds of the layers (each at its cheapest ``tp * time``) spread over
    the replica's devices: sum_i tp_i * t_i >= W and sum_i tp_i <= S imply max t_i >= W/S.
    ``bottleneck`` is a further known lower bound on it (``_bottleneck_bound``).
    """
    if _min_devices(combo) > combo.s_max:
        return None
    fastest, cheapest = [], 0
    for j in range(combo.num_layers):
        if not combo.ticks[j]:
            return None
        fastest.append(min(combo.ticks[j].values()))
        cheapest += min(t * v for t, v in combo.ticks[j].items())
    total = sum(fastest)
    stages_max = min(combo.num_layers, combo.s_max // min(combo.tps))
    if combo.pp is not None:
        if combo.pp > stages_max:
            return None
        stages_max = combo.pp
    worst = max(max(fastest), -(-total // stages_max), -(-cheapest // combo.s_max),
                bottleneck)
    if objective == "latency":
        bound = total + (combo.m - 1) * worst
    else:
        bound = max(combo.m * worst, total)
    # Coupled bound: layer j at degree tau_j adds c to the sum and tau*c to the
    # device-seconds, and bottleneck >= device-seconds / S. For latency the two terms add;
    # for the period, any convex combination of its two lower bounds is one.
    s_max, m = combo.s_max, combo.m
    weights = [(1.0, (m - 1) / s_max)] if objective == "latency" else \
        [(1.0 - lam, lam * m / s_max) for lam in (0.0, 0.25, 0.5, 0.75, 1.0)]
    for w_sum, w_dev in weights:
        coupled = sum(min(v * (w_sum + w_dev * t) for t, v in combo.ticks[j].items())
                      for j in range(combo.num_layers))
        bound = max(bound, int(math.floor(coupled * (1 - 1e-12))))
    return bound


def _path_value(combo: _Combo, path, objective: str, per_node: int) -> int | None:
    """Integer objective of a path, or None when it breaks a constraint."""
    values, offset = [], 0
    for i, (a, b, t) in enumerate(path):
        if offset % per_node + t > per_node:
            return None
        if any(t not in combo.ticks[j] for j in range(a, b + 1)):
            return None
        memory = combo.table.workspace(t) + sum(combo.mem_at(j, a, t) for j in range(a, b + 1))
        if memory > combo.cap:
            return None
        values.append(sum(combo.ticks[j][t] for j in range(a, b + 1)))
        offset += t
        if i + 1 < len(path):
            values.append(combo.hop_inter[b] if offset % per_node == 0 else combo.hop_intra[b])
    if offset not in combo.sizes or (combo.pp is not None and len(path) != combo.pp):
        return None
    return _objective_value(values, combo.m, objective)


# --------------------------------------------------------------------------- heuristic


def _greedy_partition(ticks: list[int], mem: list[int], limit: int, mem_cap: int):
    """Fewest stages with every stage time <= limit and memory <= mem_cap (greedy is exact)."""
    cuts, start, t_acc, m_acc = [], 0, 0, 0
    for j, (t, mm) in enumerate(zip(ticks, mem)):
        if t > limit or mm > mem_cap:
            return None
        if t_acc + t > limit or m_acc + mm > mem_cap:
            cuts.append((start, j - 1))
            start, t_acc, m_acc = j, 0, 0
        t_acc += t
        m_acc += mm
    cuts.append((start, len(ticks) - 1))
    return cuts


def _heuristic(combo: _Combo, objective: str, per_node: int):
    """Best plan with one tp for all stages and a min-bottleneck split, per stage count."""
    best = None
    L = combo.num_layers
    for t in combo.tps:
        if any(t not in combo.ticks[j] for j in range(L)):
            continue
        ticks = [combo.ticks[j][t] for j in range(L)]
        mem = [combo.mem[j][t] for j in range(L)]
        mem_cap = combo.cap - combo.table.workspace(t)
        k_max = min(L, combo.s_max // t)
        if combo.pp is not None:
            candidates = [combo.pp] if combo.pp <= k_max else []
        else:
            candidates = sorted({k for k in range(1, min(k_max, 8) + 1)}
                                | {int(k_max / 1.25 ** i) for i in range(40)} - {0})
        for k in candidates:
            if k * t not in combo.sizes:
                continue
            lo, hi = max(ticks), sum(ticks)
            p = _greedy_partition(ticks, mem, hi, mem_cap)
            if p is None or len(p) > k:  # memory alone needs more than k stages
                continue
            while lo < hi:
                mid = (lo + hi) // 2
                p = _greedy_partition(ticks, mem, mid, mem_cap)
                if p is not None and len(p) <= k:
                    hi = mid
                else:
                    lo = mid + 1
            parts = _greedy_partition(ticks, mem, lo, mem_cap)
            while len(parts) < k:  # split the longest stage to reach exactly k stages
                i = max(range(len(parts)), key=lambda s: parts[s][1] - parts[s][0])
                a, b = parts[i]
                if a == b:
                    break
                parts[i:i + 1] = [(a, a), (a + 1, b)]
            if len(parts) != k:
                continue
            path = [(a, b, t) for a, b in parts]
            if combo.allowed is not None and any((a, b) not in combo.allowed for a, b in parts):
                path = sorted((a, b, t) for a, b in combo.allowed)  # the engine's own split
            value = _path_value(combo, path, objective, per_node)
            if value is not None and (best is None or value < best[0]):
                best = (value, path)
    return best


# --------------------------------------------------------------------------- CP-SAT model


def _arcs(combo: _Combo, objective: str, cutoff: int | None):
    """Every stage (a, b, tp) that fits in memory and cannot be excluded by the cutoff.

    With a cutoff, a stage of time ``s`` is kept only if the objective could still be
    ``<= cutoff``: latency >= m*s + (every other layer at its fastest degree); the period
    >= m*s and >= s + (every other layer at its fastest degree).
    """
    L, m = combo.num_layers, combo.m
    best = [min(c.values()) if c else 0 for c in combo.ticks]
    prefix_best = [0]
    for v in best:
        prefix_best.append(prefix_best[-1] + v)
    arcs = []
    for a in range(L):
        for t in combo.tps:
            if t > combo.s_max:
                continue
            time_acc, mem_acc = 0, combo.table.workspace(t)
            for b in range(a, L):
                if t not in combo.ticks[b]:
                    break
                time_acc += combo.ticks[b][t]
                mem_acc += combo.mem_at(b, a, t)
                if mem_acc > combo.cap:
                    break
                if combo.allowed is not None and (a, b) not in combo.allowed:
                    continue
                if cutoff is not None:
                    if m * time_acc > cutoff:
                        break
                    outside = prefix_best[a] + prefix_best[L] - prefix_best[b + 1]
                    lead = m * time_acc if objective == "latency" else time_acc
                    if lead + outside > cutoff:
                        continue
                arcs.append((a, b, t, time_acc, mem_acc))
    return arcs


def _cp_model(combo: _Combo, objective: str, per_node: int, cutoff: int | None,
              hint=None):
    """Build the CP-SAT model of one combo. Returns (model, y, arcs, objective expr)."""
    L, m = combo.num_layers, combo.m
    arcs = _arcs(combo, objective, cutoff)
    model = cp_model.CpModel()
    y = [model.NewBoolVar(f"y{a}_{b}_{t}") for a, b, t, _, _ in arcs]
    out_arcs: list[list[int]] = [[] for _ in range(L + 1)]
    in_arcs: list[list[int]] = [[] for _ in range(L + 1)]
    for i, (a, b, *_rest) in enumerate(arcs):
        out_arcs[a].append(i)
        in_arcs[b + 1].append(i)
    model.AddExactlyOne(y[i] for i in out_arcs[0])
    model.AddExactlyOne(y[i] for i in in_arcs[L])
    cut = [None] * (L + 1)
    for j in range(1, L):
        model.Add(sum(y[i] for i in in_arcs[j]) == sum(y[i] for i in out_arcs[j]))
        cut[j] = model.NewBoolVar(f"cut{j}")
        model.Add(sum(y[i] for i in in_arcs[j]) == cut[j])
    size = model.NewIntVarFromDomain(cp_model.Domain.FromValues(list(combo.sizes)), "devices")
    model.Add(size == sum(arcs[i][2] * y[i] for i in range(len(arcs))))
    if combo.pp is not None:
        model.Add(sum(y) == combo.pp)
    spans_nodes = max(combo.sizes) > per_node
    hop = [None] * (L + 1)
    for j in range(1, L):
        intra, inter = combo.hop_intra[j - 1], combo.hop_inter[j - 1]
        if not spans_nodes or intra == inter:
            hop[j] = intra * cut[j]
            continue
        # offset[j] = devices of the stages ending before boundary j (replica 0);
        # the cut is inter-node when the next stage starts on a node boundary.
        hop[j] = None
    if spans_nodes:
        offset = [model.NewConstant(0)]
        for j in range(1, L + 1):
            o = model.NewIntVar(0, combo.s_max, f"off{j}")
            model.Add(o == offset[-1] + sum(arcs[i][2] * y[i] for i in in_arcs[j]))
            offset.append(o)
        for j in range(L):
            if per_node > 1:
                rem = model.NewIntVar(0, per_node - 1, f"rem{j}")
                q = model.NewIntVar(0, combo.s_max // per_node, f"node{j}")
                model.Add(offset[j] == per_node * q + rem)
            else:
                rem = model.NewConstant(0)
            # a TP group starting at boundary j stays inside its node
            model.Add(rem + sum(arcs[i][2] * y[i] for i in out_arcs[j]) <= per_node)
            if 0 < j and hop[j] is None:
                intra, inter = combo.hop_intra[j - 1], combo.hop_inter[j - 1]
                at_node_start = model.NewBoolVar(f"z{j}")
                model.Add(rem == 0).OnlyEnforceIf(at_node_start)
                model.Add(rem >= 1).OnlyEnforceIf(at_node_start.Not())
                crossing = model.NewBoolVar(f"w{j}")
                model.AddBoolAnd([at_node_start, cut[j]]).OnlyEnforceIf(crossing)
                model.AddBoolOr([at_node_start.Not(), cut[j].Not()]).OnlyEnforceIf(crossing.Not())
                hop[j] = intra * cut[j] + (inter - intra) * crossing
                # A full-node stage starts on a node boundary (it may not straddle), so the
                # cuts on both sides of it cross nodes: valid cuts that tighten the LP.
                for side in (in_arcs[j], out_arcs[j]):
                    full = [y[i] for i in side if arcs[i][2] == per_node]
                    if full:
                        model.Add(crossing >= sum(full))

    # Stage times in the sum are written relative to every layer at its fastest degree
    # (a constant): same objective, but small non-negative coefficients, which lets the LP
    # relaxation reach its bound in far fewer iterations (docs/solver.md).
    fastest = [min(c.values()) for c in combo.ticks]
    prefix = [0]
    for v in fastest:
        prefix.append(prefix[-1] + v)
    stage_sum = prefix[L] + sum((arcs[i][3] - prefix[arcs[i][1] + 1] + prefix[arcs[i][0]]) * y[i]
                                for i in range(len(arcs)))
    hop_sum = sum(hop[j] for j in range(1, L))
    top = max([a[3] for a in arcs] + combo.hop_inter + combo.hop_intra + [0])
    # every plan of the combo has a stage at least this long (_bottleneck_bound)
    floor = combo.bottleneck or 0
    worst = model.NewIntVar(floor, max(top, floor), "bottleneck")
    for a in range(L):
        if out_arcs[a]:
            model.Add(worst >= sum(arcs[i][3] * y[i] for i in out_arcs[a]))
    for j in range(1, L):
        model.Add(worst >= hop[j])
    # device-seconds: sum_i tp_i * t_i <= (sum_i tp_i) * max_i t_i <= S_max * bottleneck
    model.Add(combo.s_max * worst >= sum(arcs[i][2] * arcs[i][3] * y[i] for i in range(len(arcs))))
    if combo.pp is not None:
        # exactly pp stages, none longer than the bottleneck: their sum is at most pp x it
        model.Add(combo.pp * worst >= sum(arcs[i][3] * y[i] for i in range(len(arcs))))
    total = stage_sum + hop_sum
    if objective == "latency":
        obj = total + (m - 1) * worst
    else:
        obj = model.NewIntVar(0, m * top + sum(a[3] for a in arcs) + sum(combo.hop_inter)
                              + sum(combo.hop_intra), "period")
        model.Add(obj >= m * worst)
        model.Add(obj >= total)
    if cutoff is not None:
        model.Add(obj <= cutoff)
    model.Minimize(obj)
    if hint is not None:
        chosen = set(hint)
        for i, (a, b, t, _, _) in enumerate(arcs):
            model.AddHint(y[i], (a, b, t) in chosen)
    return model, y, arcs, obj


def _run(model, num_workers: int, time_limit_s: float):
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = num_workers
    # Presolve probing and overlap detection cost seconds on these path models and do not
    # shorten the search; measured in docs/solver.md.
    solver.parameters.cp_model_probing_level = 0
    solver.parameters.symmetry_level = 0
    solver.parameters.find_big_linear_overlap = False
    solver.parameters.max_presolve_iterations = 1
    solver.parameters.max_time_in_seconds = max(time_limit_s, 0.01)
    status = solver.Solve(model)
    return solver, status


def _extract(solver, y, arcs):
    path = sorted((arcs[i][0], arcs[i][1], arcs[i][2]) for i in range(len(arcs))
                  if solver.Value(y[i]))
    return path


# --------------------------------------------------------------------------- entry points


def solve(
    cost_table: CostTableBuilder,
    cluster: Cluster,
    workload: Workload,
    *,
    pins: Mapping[str, int] | None = None,
    tp_degrees: Iterable[int] | None = None,
    max_microbatches: int | None = None,
    num_workers: int = 2,
    time_limit_s: float = 60.0,
    diagnose: bool = True,
    rebuild: Callable[[Workload], CostTableBuilder] | None = None,
    restriction: Restriction | None = None,
) -> Solution:
    """Find the plan minimising the workload's objective, proven optimal by CP-SAT.

    Args:
        cost_table: builder ``(microbatch_size, microbatches) -> CostTable``.
        cluster: nodes, devices per node, device memory (``cluster.device_spec``).
        workload: batch size, objective and memory headroom.
        pins: any of ``dp``, ``pp``, ``tp`` (every stage), ``microbatches`` fixed.
        tp_degrees: restrict tp further (the table's degrees dividing the node by default).
        max_microbatches: largest microbatch count tried (all divisors when ``None``).
        num_workers: CP-SAT search workers.
        time_limit_s: wall-clock budget; on expiry the best plan is returned with status
            ``FEASIBLE``, its bound and gap.
        diagnose: on infeasibility, compute the smallest changes that fit (exact
            memory-feasibility searches, no CP-SAT, within the same ``time_limit_s``).
        rebuild: makes the builder for another workload (dtype, context length); lets the
            diagnosis try lower precision and, for decode, a shorter KV context.
        restriction: only plans a target engine can express (one tp for every stage, its
            own layer split); optimal, and proven so, within them.

    Returns:
        The best ``Solution``; ``solution.solver.status`` is ``OPTIMAL`` when proven.

    Raises:
        PlanError: contradictory pins, or no plan found within the time limit.
        InfeasiblePlanError: nothing fits; the message lists computed changes that fit.
    """
    start = time.perf_counter()
    deadline = start + time_limit_s
    space, clean_pins = _build_space(cost_table, cluster, workload, pins, tp_degrees,
                                     max_microbatches, restriction=restriction)
    result = _search(space, num_workers, deadline)
    if result is None:
        if time.perf_counter() >= deadline:
            raise PlanError(f"no plan found within the {time_limit_s:g} s time limit")
        message, suggestions = _diagnose(space, cost_table, cluster, workload, clean_pins,
                                         tp_degrees, max_microbatches, diagnose, rebuild,
                                         deadline=deadline, time_limit_s=time_limit_s)
        raise InfeasiblePlanError(message, suggestions)
    combo, path, value, bound, status, solved, pruned = result
    wall = time.perf_counter() - start
    stats = SolverStats(
        status=status,
        objective=value * TICK_S,
        bound=bound * TICK_S,
        wall_s=wall,
        objective_ticks=value,
        gap=(value - bound) / value if value else 0.0,
        solver="cp-sat",
        combos_solved=solved,
        combos_pruned=pruned,
    )
    return space.solution(combo, path, stats)


def _search(space: _Space, num_workers: int, deadline: float):
    """Outer loop over combos. Returns (combo, path, value, bound, status, solved, pruned)."""
    objective, per_node = space.objective, space.devices_per_node
    scored = []
    for combo in space.combos:
        lb = _lower_bound(combo, objective)
        if lb is None:
            continue
        combo.lb = lb
        scored.append(combo)
    scored.sort(key=lambda c: (c.lb, c.dp, c.m))
    incumbent = None  # (value, combo, path)
    for combo in scored:  # heuristic incumbent, best lower bound first
        if incumbent is not None and combo.lb >= incumbent[0]:
            break
        found = _heuristic(combo, objective, per_node)
        if found is not None and (incumbent is None or found[0] < incumbent[0]):
            incumbent = (found[0], combo, found[1])
    best = None  # (value, combo, path) proven by CP-SAT
    open_bounds: list[int] = []
    solved = pruned = 0
    order = scored
    if incumbent is not None:  # the heuristic's combo first, so its optimum is the cutoff
        order = [incumbent[1]] + [c for c in scored if c is not incumbent[1]]
    for combo in order:
        limit = best[0] - 1 if best is not None else (incumbent[0] if incumbent else None)
        if limit is not None and combo.lb > limit:
            pruned += 1
            continue
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            open_bounds.append(combo.lb)
            continue
        if combo.bottleneck is None:  # exact for the stage times; often prunes the combo
            combo.bottleneck = _bottleneck_bound(combo) or 0
            combo.lb = max(combo.lb, _lower_bound(combo, objective, combo.bottleneck) or 0)
            if limit is not None and combo.lb > limit:
                pruned += 1
                continue
        hint = incumbent[2] if incumbent is not None and incumbent[1] is combo else None
        model, y, arcs, obj = _cp_model(combo, objective, per_node, limit, hint)
        if not arcs:
            solved += 1
            continue
        solver, status = _run(model, num_workers, remaining)
        solved += 1
        if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            value = int(round(solver.Value(obj)))
            path = _extract(solver, y, arcs)
            if best is None or value < best[0]:
                best = (value, combo, path)
            if status == cp_model.FEASIBLE:
                open_bounds.append(max(combo.lb, int(math.ceil(solver.BestObjectiveBound()))))
        elif status == cp_model.UNKNOWN:
            open_bounds.append(max(combo.lb, int(math.ceil(solver.BestObjectiveBound()))))
    if best is None:
        if incumbent is not None:  # time ran out before CP-SAT confirmed the heuristic
            value, combo, path = incumbent
            bound = min(open_bounds + [value])
            return combo, path, value, bound, "FEASIBLE", solved, pruned
        return None
    value, combo, path = best
    bound = min(open_bounds + [value])
    status = "OPTIMAL" if bound >= value else "FEASIBLE"
    return combo, path, value, bound, status, solved, pruned


# --------------------------------------------------------------------------- diagnosis
#
# Whether a request has a plan at all depends on memory only: no objective, no cutoff.
# So every "smallest change" is found with an exact memory-feasibility test instead of
# CP-SAT: for one (dp, m) choice, the replica sizes reachable by a chain of stages that
# each fit are a bitset per layer boundary (bit d: d devices used so far; with a pp pin,
# bit d*(pp+1)+k for k stages), propagated over every stage (a, b, tp) that fits --
# the same constraints as the model (memory, allowed degrees, no TP group across a node
# boundary, replica sizes of the placement rule, pp pin), in O(L^2 |tp|) big-int ORs.


class _OutOfTime(Exception):
    """The diagnosis reached the solve's deadline."""


@dataclass(frozen=True)
class _MemRows:
    """One table's memory by tp: prefix sums over layers, the first layer from each layer
    on that does not allow the degree, and the per-stage workspace."""

    num_layers: int
    rows: dict[int, tuple[list[int], list[int], int]]
    table: CostTable | None = None  # for the bytes of borrowed tensors (CostTable.borrowed)

    def _extra(self, a: int, b: int, t: int) -> int:
        """Borrowed bytes of the stage of layers ``a..b-1`` (boundaries ``a``, ``b``)."""
        if self.table is None or not self.table.borrowed:
            return 0
        return sum(self.table.borrowed_bytes(j, a, t) for j in range(a, b))

    @classmethod
    def of(cls, table: CostTable) -> _MemRows:
        L, rows = table.num_layers, {}
        for t in table.tp_degrees:
            cells = [c.get(t) for c in table.costs]
            prefix = list(itertools.accumulate((c.memory_bytes if c is not None else 0
                                                for c in cells), initial=0))
            until = [L] * (L + 1)
            if None in cells:
                for j in range(L - 1, -1, -1):
                    until[j] = j if cells[j] is None else until[j + 1]
            rows[t] = (prefix, until, table.workspace(t))
        return cls(L, rows, table)

    def ends(self, t: int, cap: int) -> list[int] | None:
        """Per start boundary ``a``, the furthest end boundary of a stage at ``tp = t``
        within ``cap`` bytes (memory only grows with the stage, so every shorter one fits)."""
        if t not in self.rows:
            return None
        prefix, until, workspace = self.rows[t]
        room = cap - workspace
        if room < 0:
            return None
        ends = [bisect.bisect_right(prefix, prefix[a] + room, a, until[a] + 1) - 1
                for a in range(self.num_layers)]
        if self.table is not None and self.table.borrowed:  # borrowed tensors only add
            for a, e in enumerate(ends):
                while e > a and prefix[e] - prefix[a] + self._extra(a, e, t) > room:
                    e -= 1
                ends[a] = e
        return ends

    def floor(self, tps: Sequence[int], s_max: int) -> int:
        """A lower bound on the peak memory per device of any plan of at most ``s_max``
        devices: each layer sits in some stage at some degree, and the devices of a replica
        hold at least every layer at its cheapest ``tp * memory`` plus one workspace."""
        tps = [t for t in tps if t in self.rows and t <= s_max]
        if not tps:
            return 0
        single, total = 0, min(t * self.rows[t][2] for t in tps)
        for j in range(self.num_layers):
            options = [(self.rows[t][0][j + 1] - self.rows[t][0][j], t) for t in tps
                       if self.rows[t][1][j] > j]
            if not options:
                return 0
            single = max(single, min(v + self.rows[t][2] for v, t in options))
            total += min(v * t for v, t in options)
        return max(single, -(-total // s_max))

    def stage_memories(self, tps: Sequence[int], lo: int, hi: int) -> list[int]:
        """Every stage's memory in ``[lo, hi)``, sorted: the possible peaks."""
        out = set()
        for t in tps:
            if t not in self.rows:
                continue
            prefix, until, workspace = self.rows[t]
            borrows = self.table is not None and bool(self.table.borrowed)
            for a in range(self.num_layers):
                first = a + 1 if borrows else bisect.bisect_left(
                    prefix, prefix[a] + lo - workspace, a + 1, until[a] + 1)
                for b in range(first, until[a] + 1):
                    v = prefix[b] - prefix[a] + workspace + self._extra(a, b, t)
                    if v < lo:
                        continue
                    if v >= hi:
                        break
                    out.add(v)
        return sorted(out)


_MASKS: dict[tuple[int, int, int, int], int] = {}


def _move_mask(t: int, s_cap: int, per_node: int, pp: int) -> int:
    """States from which a stage of degree ``t`` may start: it ends within ``s_cap``
    devices, does not cross a node boundary and (pp pinned) is not one stage too many."""
    key = (t, s_cap, per_node, pp)
    if key not in _MASKS:
        width = pp + 1 if pp else 1
        block = (1 << pp) - 1 if pp else 1  # every stage count k < pp of one device count
        mask = 0
        for d in range(0, s_cap - t + 1):
            if d % per_node + t <= per_node:
                mask |= block << (d * width)
        _MASKS[key] = mask
    return _MASKS[key]


def _reach(rows: _MemRows, tps: Sequence[int], cap: int, s_cap: int, per_node: int,
           pp: int | None) -> int:
    """The states (devices used, and stages when ``pp`` is pinned) in which a chain of
    stages that each fit in ``cap`` bytes per device can hold every layer (bitset)."""
    pp = pp or 0
    width = pp + 1 if pp else 1
    L = rows.num_layers
    # no replica holds more than one stage per layer (or pp stages) at the largest degree
    s_cap = min(s_cap, (pp or L) * max(tps, default=1))
    moves = []
    for t in tps:
        if t > s_cap:
            continue
        ends = rows.ends(t, cap)
        if ends is not None:
            moves.append((t * width + (1 if pp else 0), _move_mask(t, s_cap, per_node, pp), ends))
    reach = [0] * (L + 1)
    reach[0] = 1
    for a in range(L):
        r = reach[a]
        if not r:
            continue
        for shift, mask, ends in moves:
            end = ends[a]
            if end > a:
                moved = (r & mask) << shift
                if moved:
                    for x in range(a + 1, end + 1):
                        reach[x] |= moved
    return reach[L]


def _replica_sizes(bits: int, pp: int | None) -> list[int]:
    """Device counts of the complete states of a ``_reach`` bitset (all ``pp`` stages)."""
    width = pp + 1 if pp else 1
    out, d = [], 0
    while bits >> (d * width):
        if (bits >> (d * width + (pp or 0))) & 1:
            out.append(d)
        d += 1
    return out


class _Diagnosis:
    """Exact memory-feasibility tests of changed requests, sharing tables and a deadline."""

    def __init__(self, tp_degrees, max_microbatches, deadline: float) -> None:
        self.tp_degrees, self.max_microbatches = tp_degrees, max_microbatches
        self.deadline = deadline
        self.rows: dict[tuple[int, int, int], tuple[object, _MemRows]] = {}
        self.hint: tuple[int, int] | None = None  # (microbatch size, m) that fitted last
        self.floor_fits: dict[tuple, bool] = {}

    def check_time(self) -> None:
        if time.perf_counter() > self.deadline:
            raise _OutOfTime

    def memory(self, builder, mb: int, m: int) -> _MemRows:
        self.check_time()
        key = (id(builder), mb, m)
        if key not in self.rows:  # the builder is kept so that its id is not reused
            make = getattr(builder, "memory_table", builder)
            self.rows[key] = (builder, _MemRows.of(make(mb, m)))
        return self.rows[key][1]

    def shapes(self, builder, cluster, workload, pins):
        try:
            probe = getattr(builder, "memory_table", None)
            return _shapes(builder, cluster, workload, pins, self.tp_degrees,
                           self.max_microbatches, probe=probe)
        except PlanError:
            return None

    def ordered(self, shapes, batch: int):
        """The shapes nearest the one that fitted last first: the likeliest to fit again."""
        if self.hint is None:
            return shapes
        hmb, hm = self.hint
        return sorted(shapes, key=lambda s: (abs(math.log(batch / s[0] / s[1] / hmb))
                                             + abs(math.log(s[1] / hm)), s[0]))

    def fits(self, builder, cluster: Cluster, workload: Workload, pins) -> bool:
        """Whether any plan of the request fits in memory (exact; no CP-SAT)."""
        found = self.shapes(builder, cluster, workload, pins)
        if found is None:
            return False
        tps, shapes, clean = found
        cap = int(cluster.device_spec.memory_bytes * (1.0 - workload.memory_headroom))
        batch, pp, per_node = workload.batch_size, clean.get("pp"), cluster.devices_per_node

        def fit(dp: int, mb: int, m: int, sizes) -> bool:
            bits = _reach(self.memory(builder, mb, m), tps, cap, max(sizes), per_node, pp)
            return bool(set(_replica_sizes(bits, pp)) & set(sizes))

        # Memory grows with the microbatch size and count, so one sample in one microbatch
        # is the least a replica holds: a dp for which it does not fit has no shape that
        # does (the verdict does not depend on the batch: kept across checks).
        hopeless = set()
        for dp, _, sizes in shapes:
            key = (id(builder), cluster, workload.memory_headroom, tps, pp, dp)
            if key not in self.floor_fits:
                self.floor_fits[key] = fit(dp, 1, 1, sizes)
            if not self.floor_fits[key]:
                hopeless.add(dp)
        for dp, m, sizes in self.ordered(shapes, batch):
            if dp not in hopeless and fit(dp, batch // dp // m, m, sizes):
                self.hint = (batch // dp // m, m)
                return True
        return False

    def min_peak(self, space: _Space) -> int | None:
        """The smallest peak memory per device of any plan of the request, ignoring the
        capacity: exact, by bisection over the stage memories of each (dp, m) choice,
        visited by a lower bound and skipped once it cannot beat the best so far."""
        per_node, best = space.devices_per_node, None
        scored = []
        for combo in space.combos:
            rows = _MemRows.of(combo.table)
            scored.append((rows.floor(combo.tps, combo.s_max), id(combo), combo, rows))
        scored.sort(key=lambda s: s[:2])
        for floor, _, combo, rows in scored:
            if best is not None and floor >= best:
                break
            self.check_time()
            sizes = set(combo.sizes)

            def fits(cap: int, combo=combo, rows=rows, sizes=sizes) -> bool:
                bits = _reach(rows, combo.tps, cap, combo.s_max, per_node, combo.pp)
                return bool(set(_replica_sizes(bits, combo.pp)) & sizes)

            values = rows.stage_memories(combo.tps, floor, best if best is not None else 2**62)
            if not values or not fits(values[-1]):
                continue
            lo, hi = 0, len(values) - 1
            while lo < hi:
                mid = (lo + hi) // 2
                if fits(values[mid]):
                    hi = mid
                else:
                    lo = mid + 1
            best = values[lo]
        return best

    def min_nodes(self, builder, cluster: Cluster, workload: Workload, pins,
                  factor: int = 64) -> int | None:
        """The fewest nodes of this size (up to ``factor`` times as many) with a plan: for
        every (dp, m) of the largest cluster, the replica sizes that fit, each needing
        ``ceil(dp * size / devices per node)`` nodes (exact: more nodes only add plans)."""
        per_node = cluster.devices_per_node
        factor = min(factor, MAX_DEVICES // cluster.num_devices)  # the largest cluster planned
        if factor <= 1:
            return None
        big = replace(cluster, nodes=cluster.nodes * factor)
        found = self.shapes(builder, big, workload, pins)
        if found is None:
            return None
        tps, shapes, clean = found
        cap = int(cluster.device_spec.memory_bytes * (1.0 - workload.memory_headroom))
        batch, pp, best = workload.batch_size, clean.get("pp"), None
        for dp, m, sizes in sorted(shapes, key=lambda s: s[0]):
            if best is not None and -(-dp // per_node) >= best:
                break  # every replica needs a device
            rows = self.memory(builder, batch // dp // m, m)
            bits = _reach(rows, tps, cap, max(sizes), per_node, pp)
            allowed = set(sizes)
            for d in _replica_sizes(bits, pp):
                if d in allowed:
                    n = -(-dp * d // per_node)
                    best = n if best is None else min(best, n)
        return best


def _gib_ceil(nbytes: float) -> float:
    """``nbytes`` in GiB rounded up to the 0.01 GiB the message shows."""
    return math.ceil(nbytes / GiB * 100 - 1e-9) / 100


def _memory_needed(peak: int, headroom: float) -> float:
    """The smallest per-device memory, in 0.01 GiB, whose usable part holds ``peak``."""
    gib = _gib_ceil(peak / (1.0 - headroom))
    while int(math.ceil(gib * GiB) * (1.0 - headroom)) < peak:
        gib = round(gib + 0.01, 2)
    return gib


def _diagnose(space, builder, cluster, workload, pins, tp_degrees, max_microbatches,
              compute: bool, rebuild=None, deadline: float = math.inf,
              time_limit_s: float | None = None) -> tuple[str, list[str]]:
    """The infeasibility message with the smallest single changes that fit.

    Every change is found by exact memory-feasibility tests (``_Diagnosis``), so the
    figures are the true boundaries: the suggested change fits and one step less does not
    (devices, memory, KV context: exact; batch size: the largest batch at which a smaller
    one no longer matters, by bisection assuming memory grows with the batch). Stops at
    ``deadline`` and says which changes it did not compute.
    """
    cap_gib = space.cap / GiB
    head = (f"no plan fits: every placement needs more than {cap_gib:.2f} GiB per device "
            f"({cluster.device_spec.memory_bytes / GiB:.2f} GiB × (1 − "
            f"{workload.memory_headroom:g} headroom)) on {cluster.num_devices} devices "
            f"({cluster.nodes} node(s) × {cluster.devices_per_node})")
    if pins:
        head += " with pins " + ", ".join(f"{k}={v}" for k, v in pins.items())
    if not compute:
        return head, []
    check = _Diagnosis(tp_degrees, max_microbatches, deadline)
    suggestions: list[str] = []
    steps = [("per-device memory", lambda: _memory_change(check, space, workload)),
             ("devices", lambda: _device_changes(check, builder, cluster, workload, pins)),
             ("batch size", lambda: _batch_change(check, builder, cluster, workload, pins))]
    if rebuild is not None:
        steps.append(("dtype", lambda: _dtype_change(check, rebuild, cluster, workload, pins)))
        if workload.phase == "decode":
            steps.append(("KV context",
                          lambda: _context_change(check, rebuild, cluster, workload, pins)))
    skipped = []
    for name, step in steps:
        if skipped:
            skipped.append(name)
            continue
        try:
            suggestions += step()
        except _OutOfTime:
            skipped.append(name)
    tail = ""
    if skipped:
        limit = f"the {time_limit_s:g} s time limit" if time_limit_s else "the time limit"
        tail = f" (stopped at {limit} before trying: {', '.join(skipped)})"
    if not suggestions:
        return (head + ". No single change of memory, devices or batch size makes it fit"
                + tail + "."), []
    return head + ". Smallest changes that fit: " + "; or ".join(suggestions) + tail, suggestions


def _memory_change(check: _Diagnosis, space: _Space, workload: Workload) -> list[str]:
    peak = check.min_peak(space)
    if peak is None:
        return []
    need = _memory_needed(peak, workload.memory_headroom)
    return [f"per-device memory >= {need:.2f} GiB "
            f"(peak {peak / GiB:.2f} GiB + {workload.memory_headroom:g} headroom)"]


def _device_changes(check: _Diagnosis, builder, cluster: Cluster, workload: Workload,
                    pins) -> list[str]:
    out = []
    # devices inside the node, up to the largest node this device ships in
    for per_node in range(cluster.devices_per_node + 1,
                          cluster.device_spec.max_devices_per_node + 1):
        try:
            bigger = replace(cluster, devices_per_node=per_node)
        except ValueError:
            continue
        if check.fits(builder, bigger, workload, pins):
            out.append(f">= {per_node * cluster.nodes} devices ({cluster.nodes} node(s) × "
                       f"{per_node})")
            break
    nodes = check.min_nodes(builder, cluster, workload, pins)
    if nodes is not None:
        out.append(f">= {nodes * cluster.devices_per_node} devices ({nodes} node(s) × "
                   f"{cluster.devices_per_node})")
    return out


def _batch_change(check: _Diagnosis, builder, cluster: Cluster, workload: Workload,
                  pins) -> list[str]:
    """The largest smaller batch that fits: bisection, so batch ``lo`` fits and ``lo + 1``
    does not (assuming memory grows with the batch, the largest such)."""
    if workload.batch_size <= 1:
        return []
    def fits(batch: int) -> bool:
        return check.fits(builder, cluster, replace(workload, batch_size=batch),
                          _batch_pins(pins, batch))
    if not fits(1):
        return []
    lo, hi = 1, workload.batch_size
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    dropped = sorted(set(pins) - set(_batch_pins(pins, lo)))
    without = f" (without the {', '.join(f'{k}={pins[k]}' for k in dropped)} pin)" if dropped else ""
    return [f"batch size <= {lo}{without}"]


_LOWER_PRECISION = {"float32": "bfloat16"}


def _dtype_change(check: _Diagnosis, rebuild, cluster: Cluster, workload: Workload,
                  pins) -> list[str]:
    lower = _LOWER_PRECISION.get(workload.dtype)
    if lower:
        w = replace(workload, dtype=lower)
        if check.fits(rebuild(w), cluster, w, pins):
            return [f"dtype {lower} instead of {workload.dtype}"]
    return []


def _context_change(check: _Diagnosis, rebuild, cluster: Cluster, workload: Workload,
                    pins) -> list[str]:
    """The longest KV context that fits (decode), exact: the cache grows with the context,
    so each (dp, m) choice fits up to some context. The choices are visited once each: one
    that does not fit one token beyond the best so far is dropped after one test, and only
    one that does is bisected further."""
    builders: dict[int, object] = {}

    def builder(context: int):
        if context not in builders:
            builders[context] = rebuild(replace(workload, context_len=context))
        return builders[context]

    found = check.shapes(builder(1), cluster, replace(workload, context_len=1), pins)
    context = workload.kv_context_len
    if found is None or context <= 1:
        return []
    tps, shapes, clean = found
    cap = int(cluster.device_spec.memory_bytes * (1.0 - workload.memory_headroom))
    batch, pp, per_node = workload.batch_size, clean.get("pp"), cluster.devices_per_node

    def fits(shape, c: int) -> bool:
        dp, m, sizes = shape
        rows = check.memory(builder(c), batch // dp // m, m)
        bits = _reach(rows, tps, cap, max(sizes), per_node, pp)
        return bool(set(_replica_sizes(bits, pp)) & set(sizes))

    best = 0  # every context <= best fits; context itself does not (the request)
    for shape in check.ordered(shapes, batch):
        if not fits(shape, best + 1):
            continue
        lo, hi = best + 1, context
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(shape, mid):
                lo = mid
            else:
                hi = mid
        best = lo
        check.hint = (batch // shape[0] // shape[1], shape[1])
    return [f"KV context <= {best} tokens"] if best else []


def _batch_pins(pins: Mapping[str, int], batch: int) -> dict[str, int]:
    """Pins that still make sense for a smaller batch (dp/microbatches must divide it)."""
    return {k: v for k, v in pins.items()
            if k not in ("dp", "microbatches") or batch % v == 0}


def best_per_family(
    cost_table: CostTableBuilder,
    cluster: Cluster,
    workload: Workload,
    *,
    families: Iterable[tuple[int, int, int]] | None = None,
    limit: int = 8,
    num_workers: int = 2,
    time_limit_s: float = 10.0,
) -> list[tuple[tuple[int, int, int], Solution | str]]:
    """The best plan of each (dp, pp, tp) family, for ``plan explain``.

    Each family is solved by ``solve`` with those three pins, so the figures are comparable
    with the optimum. Families default to every (dp, pp, tp) that fits the device count,
    ordered by a lower bound, first ``limit`` of them.

    Returns:
        ``[((dp, pp, tp), Solution or the reason it is infeasible)]`` sorted best first.
    """
    probe = cost_table(workload.batch_size, 1)
    per_node, total = cluster.devices_per_node, cluster.num_devices
    if families is None:
        fams = [(dp, pp, tp) for dp in _divisors(workload.batch_size)
                for tp in probe.tp_degrees if per_node % tp == 0
                for pp in range(1, probe.num_layers + 1)
                if dp * pp * tp <= total and replica_size_allowed(pp * tp, dp, cluster.nodes,
                                                                   per_node)]
        fams.sort(key=lambda f: _family_bound(probe, f, workload.batch_size))
        fams = fams[:limit]
    else:
        fams = list(families)
    results: list[tuple[tuple[int, int, int], Solution | str]] = []
    for dp, pp, tp in fams:
        try:
            sol = solve(cost_table, cluster, workload, pins={"dp": dp, "pp": pp, "tp": tp},
                        num_workers=num_workers, time_limit_s=time_limit_s, diagnose=False)
            results.append(((dp, pp, tp), sol))
        except PlanError as e:
            results.append(((dp, pp, tp), str(e)))
    return sorted(results, key=lambda r: r[1].solver.objective
                  if isinstance(r[1], Solution) else math.inf)


def _family_bound(table: CostTable, family: tuple[int, int, int], batch: int) -> float:
    """Rough ordering key: per-replica work of the whole batch spread over pp stages."""
    dp, pp, tp = family
    if any(tp not in c for c in table.costs):
        return math.inf
    work = sum(c[tp].time_s for c in table.costs) / dp
    return work / pp + work * (pp - 1) / (pp * max(batch // dp, 1))
