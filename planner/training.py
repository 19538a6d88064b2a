"""Planning a training step: dp (with a ZeRO level) x pipeline (schedule, per-stage
recompute) x per-stage tp x microbatches, proven optimal (docs/training.md).

The search keeps ``planner.solver``'s two levels:

1. *Outer*: every ``(dp, microbatches, zero, schedule, dp link)`` the pins allow, each with
   a ``TrainTable`` (the forward ``CostTable`` of the microbatch size, turned into a
   training step by ``cost_models.training``). ``dp link`` is whether a stage's dp peers
   share a node (``dp x replica size <= devices per node``) or not: it prices the
   gradient sync, so each link is its own combo with the replica sizes it implies.
   GPipe is searched only when pinned: it has 1F1B's step time and holds at least as many
   microbatches on every stage, so 1F1B dominates it. Interleaved 1F1B (``--schedule
   interleaved``, ``--virtual-stages V``) is searched only when pinned too, over periodic
   splits (``planner.interleaved``), after the others: each ``(combo, pp)`` pruned by
   ``_interleaved_bound`` or solved by ``planner.interleaved.best_pattern``.
2. *Inner*: per stage count ``pp``, a path over the layer boundaries; an arc ``(a, b, tp,
   recompute)`` is a stage. The step time is ``sum E + (m - 1) max E + T``: stage times
   (forward + backward + recompute per microbatch) and p2p hops (both directions) through
   the flow-shop makespan, then ``T``, the slowest stage's tail (dp collectives and the
   AdamW update). Under 1F1B stage ``k`` holds ``min(pp - k, m)`` microbatches, exact once
   ``pp`` is fixed. Each ``(combo, pp)`` is pruned by lower bounds (``_lower_bound``, the
   position bottleneck ``_Positions``) or solved exactly by a dynamic programme over
   ``(boundary, devices, stages so far)`` with Pareto labels (``_best_stages``), both
   below the best plan so far. (A CP-SAT path model was used before: its LP bound of
   ``sum + (m - 1) max + T`` was too weak to close llama-3-70b on 64 devices in 60 s.)

``planner.reference_solver.solve_train_reference`` computes the same optimum by dynamic
programming over the same combos (the tests' oracle).
"""

from __future__ import annotations

import bisect
import itertools
import math
import operator
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from cost_models import training as tm
from cost_models.layer_cost import comm_time
from cost_models.roofline import layer_work, work_time
from planner.cluster import Cluster, Workload
from planner.cost_table import TICK_S, CostTable, to_ticks
from planner.reference_solver import _unwind
from planner.solver import (
    InfeasiblePlanError,
    PlanError,
    Prediction,
    Restriction,
    Solution,
    SolverStats,
    Stage,
    _divisors,
    check_pins,
    place_stages,
    replica_size_allowed,
)

__all__ = ["TrainPins", "TrainTable", "TrainCostBuilder", "TrainSolution", "train_pins",
           "solve_train", "train_space", "path_value", "evaluate"]

#: The pins a train request takes besides ``planner.solver.PINNABLE``.
TRAIN_PINNABLE = ("zero", "schedule", "virtual_stages", "recompute")


@dataclass(frozen=True)
class TrainPins:
    """The training dimensions a request fixes (``None``: the solver chooses)."""

    zero: int | None = None
    schedule: str | None = None
    recompute: str | None = None
    virtual_stages: int | None = None


#: Virtual stages per device group ``--schedule interleaved`` tries without
#: ``--virtual-stages`` (Megatron-LM's examples use 2 to 4; ``--virtual-stages V`` plans any).
SEARCHED_VIRTUAL_STAGES = (2, 3, 4)


def train_pins(pins: Mapping | None) -> tuple[dict[str, int], TrainPins]:
    """Split ``pins`` into the inference ones (dp, pp, tp, microbatches) and the training
    ones, checking the training ones.

    Raises:
        PlanError: a value out of range, or a combination the planner does not build.
    """
    pins = dict(pins or {})
    problems = []
    zero, schedule = pins.pop("zero", None), pins.pop("schedule", None)
    recompute, v = pins.pop("recompute", None), pins.pop("virtual_stages", None)
    if zero is not None and zero not in tm.ZERO_LEVELS:
        problems.append(f"zero {zero!r} must be one of 0, 1, 2, 3")
    if schedule is not None and schedule not in tm.TRAIN_SCHEDULES:
        problems.append(f"schedule {schedule!r} must be one of {', '.join(tm.TRAIN_SCHEDULES)}")
    if recompute is not None and recompute not in tm.RECOMPUTE:
        problems.append(f"recompute {recompute!r} must be one of {', '.join(tm.RECOMPUTE)}")
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
        problems.append(f"virtual_stages {v!r} must be a whole number >= 1")
    elif v is not None and v > 1 and schedule not in (None, "interleaved"):
        problems.append(f"virtual_stages {v} needs --schedule interleaved (the {schedule} "
                        "schedule runs one stage per device group); drop --virtual-stages")
    elif v == 1 and schedule == "interleaved":
        problems.append("interleaved 1F1B holds 2 or more virtual stages per device group: "
                        "pin --virtual-stages 2 or more, or drop it")
    if (schedule == "interleaved" or (v is not None and v > 1)) and pins.get("pp") == 1:
        problems.append("interleaved 1F1B needs 2 or more pipeline stages: drop --pp 1")
    if zero and pins.get("dp") == 1:
        problems.append(f"zero {zero} shards over the data-parallel replicas and dp 1 has none "
                        "to shard over: drop --zero, or pin --dp 2 or more")
    if problems:
        raise PlanError("pins contradict the request: " + "; ".join(problems))
    if v is not None and v > 1:
        schedule = "interleaved"
    return pins, TrainPins(zero, schedule, recompute, v)


# --------------------------------------------------------------------------- cost table


@dataclass
class TrainTable:
    """The training step's costs for one (microbatch size, dp, ZeRO level, dp link).

    ``forward`` is the inference cost table of the microbatch (one forward, its tp
    collectives, the parameter shard per device, boundaries, links, workspace). The rest
    is what ``cost_models.training`` makes of it, per layer ``j``:

    - ``time[j][(tp, recompute)]``: one microbatch forward + backward (+ recompute,
      + ZeRO-3 gathers), seconds; ``comm[j][(tp, rc)]`` the part that is collectives;
    - ``state[j][tp]``: parameters, gradients and optimizer states per device;
    - ``saved[j][(tp, recompute)]``: activations one microbatch keeps for backward;
    - ``params[j][tp]``: the parameter shard's bytes (what the tail syncs and updates).
    """

    forward: CostTable
    dp: int
    zero: int
    link: str
    time: list[dict[tuple[int, str], float]]
    comm: list[dict[tuple[int, str], float]]
    state: list[dict[int, int]]
    saved: list[dict[tuple[int, str], int]]
    params: list[dict[int, int]]
    dtype: str
    tail_of: object = field(repr=False, default=None)  # (param bytes) -> seconds
    _tails: dict = field(default_factory=dict, repr=False)
    #: tick tables by (tps, rcs), shared by the tables with the same ``time`` rows
    ticks_memo: dict = field(default_factory=dict, repr=False)

    @property
    def num_layers(self) -> int:
        return self.forward.num_layers

    def tail_s(self, first: int, last: int, tp: int) -> float:
        """A stage's tail (``cost_models.training.stage_tail_s``) from its parameter bytes,
        borrowed (tied) copies included."""
        return self.tail_of_bytes(self.param_bytes(first, last, tp))

    def param_bytes(self, first: int, last: int, tp: int) -> int:
        """Parameter bytes per device of a stage of layers ``first..last`` (what its tail
        syncs and updates), borrowed (tied) copies included."""
        return sum(self.params[j][tp] + self.forward.borrowed_bytes(j, first, tp)
                   for j in range(first, last + 1))

    def tail_of_bytes(self, nbytes: int) -> float:
        if nbytes not in self._tails:
            self._tails[nbytes] = self.tail_of(nbytes)
        return self._tails[nbytes]

    def borrowed_state(self, j: int, first: int, tp: int) -> int:
        """Model states of the tied tensors layer ``j`` holds again in a stage from
        ``first`` (a copy with its own gradient and optimizer states)."""
        borrowed = self.forward.borrowed_bytes(j, first, tp)
        if not borrowed:
            return 0
        return tm.model_state_bytes(borrowed // _bytes(self.dtype), self.dtype, self.zero,
                                    self.dp)

    def static_bytes(self, first: int, last: int, tp: int) -> int:
        """Workspace, model states and tied copies of a stage, per device."""
        return self.forward.workspace(tp) + sum(
            self.state[j][tp] + self.borrowed_state(j, first, tp) for j in range(first, last + 1))

    def stage_memory(self, first: int, last: int, tp: int, rc: str, in_flight: int) -> int:
        return self.static_bytes(first, last, tp) + in_flight * sum(
            self.saved[j][(tp, rc)] for j in range(first, last + 1))

    def hop_s(self, after: int, inter: bool) -> float:
        """Activations forward and their gradients back across a cut (same bytes)."""
        return 2 * self.forward.p2p_s(after, inter_node=inter)


def _bytes(dtype: str) -> int:
    return tm.state_bytes_per_param(dtype)[0]


class TrainCostBuilder:
    """Builds ``TrainTable``s for a traced model from a forward ``CostBuilder``.

    Args:
        forward: ``planner.cost_builder.CostBuilder`` for the workload with ``phase
            "prefill"`` (the forward of one microbatch); its tables, sharding strategies
            and links are reused as they are. Where its profile has a layer's forward +
            backward (``LayerProfile.train``) and the microbatch runs the layer at the
            profiled shape, that time, scaled to the tp rank as the measured forward is
            (``layer_cost.measured_scale``), replaces the roofline's 3x forward.
        workload: the train workload (dtype, runtime).
    """

    def __init__(self, forward, workload: Workload) -> None:
        self.forward = forward
        self.workload = workload
        self.spec = forward.spec
        self._tables: dict = {}
        self._layer: dict = {}
        self._times: dict = {}
        self._saved: dict = {}
        self._states: dict = {}
        self._gathers: dict = {}

    @property
    def tp_degrees(self):
        return self.forward.tp_degrees

    @property
    def excluded_tp(self):
        return self.forward.excluded_tp

    def _per_layer(self, mb: int) -> list[dict]:
        """Per layer and tp, for microbatch size ``mb``: forward compute/comm, attention
        core forward, activation bytes (produced, input, attention core), params, and the
        measured forward + backward (None where not measured)."""
        from cost_models.layer_cost import measured_scale, runs_as_traced

        if mb in self._layer:
            return self._layer[mb]
        fwd = self.forward(mb, 1)
        traced, w = self.forward.traced, self.forward.workload
        shape = self.forward.traced_shape
        profile = self.forward.profile
        as_profiled = profile is not None and runs_as_traced(w, mb, shape)
        ratio = mb * w.seq_len / shape.tokens
        d = w.dtype_bytes / shape.dtype_bytes
        rows = []
        for j, layer in enumerate(traced.layers):
            row = {}
            for t, c in fwd.costs[j].items():
                sharded = self.forward.sharded_at(j, t)
                frac = sharded.activation_fraction if sharded is not None else 1.0
                work = layer_work(layer, traced.arch, t, w, mb, shape, sharded=sharded)
                attn = {k: v for k, v in work.items() if k == "attention"}
                attn_s = work_time(attn, self.forward.efficiencies, w.dtype, w.runtime) \
                    if attn else 0.0
                stats = layer.op_stats.get("attention")
                attn_bytes = stats.bytes_written * ratio * d * frac if stats else 0.0
                produced = layer.activation_bytes * ratio * d * frac
                into = fwd.boundary_bytes[j - 1] if j > 0 else 0
                measured = profile.layers[j].train if as_profiled else None
                fb = None if measured is None else measured.time_s * measured_scale(
                    layer, traced.arch, t, w, self.forward.efficiencies, mb, shape,
                    sharded=sharded)
                row[t] = (c.compute_s, c.comm_s, attn_s, int(math.ceil(produced)), int(into),
                          int(math.ceil(attn_bytes)), c.memory_bytes, fb)
            rows.append(row)
        self._layer[mb] = rows
        return rows

    def __call__(self, mb: int, dp: int, zero: int, link: str) -> TrainTable:
        key = (mb, dp, zero, link)
        if key in self._tables:
            return self._tables[key]
        fwd = self.forward(mb, 1)
        rows = self._per_layer(mb)
        dtype, spec, w = self.workload.dtype, self.spec, self.forward.workload
        cal = self.forward.calibration
        gather = zero == 3 and dp > 1
        # Times depend on (mb, and for ZeRO-3 dp and link); activations on mb; states on
        # (zero, dp): each part is built once and shared by the tables that agree on it.
        part = (mb, dp, link) if gather else (mb,)
        if part not in self._times:
            gathers = self._gathers.setdefault((dp, link), {})  # by parameter bytes
            time_, comm = [], []
            for row in rows:
                t_row, c_row = {}, {}
                for t, (c, k, attn_s, _produced, _into, _attn_b, pbytes, fb) in row.items():
                    g = 0.0
                    if gather and pbytes:
                        if pbytes not in gathers:
                            gathers[pbytes] = comm_time("all_gather", pbytes, dp, spec,
                                                        link=link, calibration=cal)
                        g = gathers[pbytes]
                    for rc in tm.RECOMPUTE:
                        t_row[(t, rc)] = tm.layer_step_s(c, k, rc, attn_s, g, fb)
                        c_row[(t, rc)] = 2 * k + (k if rc == "full" else 0.0) + 2 * g
                time_.append(t_row)
                comm.append(c_row)
            self._times[part] = (time_, comm, {})  # {}: _make_combo's tick tables
        if mb not in self._saved:
            self._saved[mb] = (
                [{(t, rc): tm.saved_activation_bytes(produced, into, attn_b, rc)
                  for t, (_c, _k, _a, produced, into, attn_b, _p, _fb) in row.items()
                  for rc in tm.RECOMPUTE} for row in rows],
                [{t: v[6] for t, v in row.items()} for row in rows])
        saved, params = self._saved[mb]
        states = self._states
        for row in params:
            for pbytes in row.values():
                if (pbytes, zero, dp) not in states:
                    states[(pbytes, zero, dp)] = tm.model_state_bytes(pbytes // _bytes(dtype),
                                                                      dtype, zero, dp)
        state = [{t: states[(pbytes, zero, dp)] for t, pbytes in row.items()} for row in params]
        time_, comm, ticks = self._times[part]

        def tail_of(nbytes: int) -> float:
            return tm.stage_tail_s(nbytes, dtype, zero, dp, spec, self.forward.efficiencies,
                                   link=link, runtime=w.runtime, calibration=cal)

        table = TrainTable(fwd, dp, zero, link, time_, comm, state, saved, params, dtype,
                           tail_of=tail_of, ticks_memo=ticks)
        self._tables[key] = table
        return table


# --------------------------------------------------------------------------- search space


@dataclass
class TrainCombo:
    """One outer choice with its table rounded to integer ticks."""

    dp: int
    m: int
    zero: int
    schedule: str
    link: str
    table: TrainTable
    tps: tuple[int, ...]
    rcs: tuple[str, ...]
    sizes: tuple[int, ...]
    pp: int | None
    cap: int
    ticks: list[dict[tuple[int, str], int]]
    hop_intra: list[int]
    hop_inter: list[int]
    lb: int = 0
    allowed: frozenset | None = None  # the only (first, last) stages (Restriction.split)
    memo: dict = field(default_factory=dict, repr=False)  # bounds' parts, computed once
    v: int = 1  # virtual stages per device group (interleaved 1F1B; planner.interleaved)

    @property
    def num_layers(self) -> int:
        return len(self.ticks)

    @property
    def s_max(self) -> int:
        if "s_max" not in self.memo:
            self.memo["s_max"] = max(self.sizes)
        return self.memo["s_max"]

    def tail(self, a: int, b: int, t: int) -> int:
        return to_ticks(self.table.tail_s(a, b, t))

    def in_flight(self, stage: int, pp: int) -> int:
        return tm.in_flight(self.schedule, stage, pp, self.m, self.v)


@dataclass
class TrainSpace:
    batch_size: int
    devices_per_node: int
    cap: int
    combos: list[TrainCombo]
    forward_flops: float
    peak_flops: float
    seq_len: int = 1


def train_space(builder: TrainCostBuilder, cluster: Cluster, workload: Workload,
                pins: Mapping | None, restriction: Restriction | None = None,
                tp_degrees=None) -> TrainSpace:
    """Every outer combo the pins allow, in a fixed order (both solvers share it).

    ``restriction`` (``plan MODEL --phase train --target``, ``planner.engines``): only
    plans the framework can run. One tp and one recompute mode per combo where it has one
    setting for all stages; its schedules and recompute modes; and, where its ZeRO levels
    depend on the degrees, its own layer split or it cannot combine tp with pp, one combo
    per stage count too, so each combo's rules are fixed. ``tp_degrees`` narrows tp.

    Raises:
        PlanError: contradictory pins, or pins the restriction cannot run.
    """
    plain, tpins = train_pins(pins)
    nodes, per_node, batch = cluster.nodes, cluster.devices_per_node, workload.batch_size
    probe = builder.forward(batch, 1)
    plain = check_pins(plain, batch, probe.num_layers, nodes, per_node)
    allowed = {t for t in builder.tp_degrees if per_node % t == 0}
    if "tp" in plain:
        if plain["tp"] not in allowed:
            why = builder.excluded_tp.get(plain["tp"], "tp must divide the devices per node")
            raise PlanError(f"tp {plain['tp']} cannot be honoured: {why}; this model allows tp "
                            f"in {sorted(allowed)} here (pin one of those, or drop --tp)")
        allowed = {plain["tp"]}
    if tp_degrees is not None:
        allowed &= set(tp_degrees)
    tps = tuple(sorted(allowed))
    rcs = (tpins.recompute,) if tpins.recompute else tm.RECOMPUTE
    schedules = (tpins.schedule,) if tpins.schedule else ("1f1b",)
    r = restriction or Restriction()
    if restriction is not None and tpins.schedule == "interleaved":
        raise PlanError(f"interleaved 1F1B is not searched for --target {r.name}: its plans "
                        "split each round of layers the planner's own way; drop --schedule "
                        "interleaved / --virtual-stages, or drop --target")
    # Interleaved 1F1B is searched when pinned (docs/training.md, "Interleaved 1F1B": its
    # bounds do not see memory, so on llama-3-70b 8x8xH100 the unpinned search would spend
    # ~40 s on pairs that cannot beat 1F1B).
    virtual: tuple[int, ...] = ()  # virtual stages of the interleaved combos
    if tpins.schedule == "interleaved":
        virtual = (tpins.virtual_stages,) if tpins.virtual_stages else SEARCHED_VIRTUAL_STAGES
    if r.recompute is not None:
        rcs = tuple(rc for rc in rcs if rc in r.recompute)
    if r.schedules is not None:
        if tpins.schedule is None:  # 1F1B where it runs, else GPipe (pp 1: either)
            schedules = tuple(x for x in ("1f1b", "gpipe") if x in r.schedules)[:1] or ("1f1b",)
        per_pp_schedule = not (set(schedules) & r.schedules)
    else:
        per_pp_schedule = False
    if not tps or not rcs:
        raise PlanError(f"{r.name or 'the request'} allows no tp degree or recompute mode "
                        f"that the pins leave (tp {sorted(allowed)}, recompute {list(rcs)})")
    by_stages = (r.zero_levels is not None or r.split is not None or not r.tp_with_pp
                 or per_pp_schedule)
    tp_sets = [(t,) for t in tps] if r.uniform_tp else [tps]
    rc_sets = [(rc,) for rc in rcs] if r.uniform_recompute else [rcs]
    L = probe.num_layers
    cap = int(cluster.device_spec.memory_bytes * (1.0 - workload.memory_headroom))
    combos = []
    for dp in [plain["dp"]] if "dp" in plain else _divisors(batch):
        sizes = [s for s in range(1, nodes * per_node // dp + 1)
                 if replica_size_allowed(s, dp, nodes, per_node)]
        if not sizes or (dp == 1 and tpins.zero):  # ZeRO shards over dp >= 2
            continue
        zeros = (tpins.zero,) if tpins.zero is not None else ((0,) if dp == 1 else tm.ZERO_LEVELS)
        links = {"intra": tuple(s for s in sizes if dp * s <= per_node),
                 "inter": tuple(s for s in sizes if dp * s > per_node)}
        if dp == 1:  # no dp collective: one combo, priced intra
            links = {"intra": tuple(sizes), "inter": ()}
        per_replica = batch // dp
        ms = [plain["microbatches"]] if "microbatches" in plain else _divisors(per_replica)
        for m in ms:
            if per_replica % m:
                continue
            mb = per_replica // m
            for zero in zeros:
                for link, link_sizes in links.items():
                    if not link_sizes:
                        continue
                    table = builder(mb, dp, zero, link)
                    sp = table.forward.sequence_parallel
                    for schedule, degrees, modes in itertools.product(schedules, tp_sets, rc_sets):
                        if schedule == "interleaved":
                            combos.extend(_make_combo(table, dp, m, zero, schedule, link,
                                                      degrees, modes, link_sizes,
                                                      plain.get("pp"), cap, v)
                                          for v in virtual)
                            continue
                        if r.sequence_parallel_with_tp is not None and max(degrees) > 1 \
                                and sp != r.sequence_parallel_with_tp and min(degrees) > 1:
                            continue
                        if not by_stages:
                            combos.append(_make_combo(table, dp, m, zero, schedule, link,
                                                      degrees, modes, link_sizes,
                                                      plain.get("pp"), cap))
                            continue
                        for pp in [plain["pp"]] if "pp" in plain else range(1, L + 1):
                            if pp * min(degrees) > max(link_sizes):
                                break
                            combo = _restricted(r, table, dp, m, zero, schedule, link, degrees,
                                                modes, link_sizes, pp, cap)
                            if combo is not None:
                                combos.append(combo)
    if not combos and restriction is not None:
        rules = ["ZeRO levels by (dp, pp, tp)" if r.zero_levels else "",
                 "no tp with pp" if not r.tp_with_pp else "",
                 f"schedules {sorted(r.schedules)}" if r.schedules else "",
                 f"recompute {sorted(r.recompute)}" if r.recompute else "",
                 "its own layer split" if r.split else ""]
        raise PlanError(f"{r.name} cannot run any plan these pins leave "
                        f"({', '.join(x for x in rules if x)}): drop a pin (--tp, --pp, --dp, --zero, --recompute, --schedule) or "
                        f"the --target")
    traced = builder.forward.traced
    flops = sum(layer.flops for layer in traced.layers) * (
        batch * workload.seq_len / builder.forward.traced_shape.tokens)
    eff = builder.forward.efficiencies
    peak = eff.peak_flops.get(workload.dtype) or eff.peak_flops["float32"]
    return TrainSpace(batch, per_node, cap, combos, flops, peak, workload.seq_len)


def _restricted(r: Restriction, table, dp, m, zero, schedule, link, degrees, modes, sizes,
                pp, cap):
    """One combo of ``pp`` stages under the restriction's per-stage-count rules, or None."""
    tp = degrees[0] if len(degrees) == 1 else None
    if not r.tp_with_pp and pp > 1:
        degrees = tuple(t for t in degrees if t == 1)
    if r.zero_levels is not None:
        degrees = tuple(t for t in degrees if zero in r.zero_levels(dp, pp, t))
    if pp > 1 and r.schedules is not None and schedule not in r.schedules:
        return None
    if pp == 1 and r.schedules is not None and schedule not in r.schedules:
        schedule = "1f1b"  # one stage: no pipeline schedule runs
    if not degrees or (tp is not None and degrees != (tp,)):
        return None
    combo = _make_combo(table, dp, m, zero, schedule, link, degrees, modes, sizes, pp, cap)
    if r.split is not None:
        ranges = r.split(pp)
        if ranges is None:
            return None
        combo.allowed = frozenset(ranges)
    return combo


def _make_combo(table: TrainTable, dp, m, zero, schedule, link, tps, rcs, sizes, pp, cap,
                v: int = 1):
    tps = tuple(t for t in tps if t <= max(sizes))
    L, memo = table.num_layers, table.ticks_memo
    if (tps, rcs) not in memo:
        memo[(tps, rcs)] = [{(t, rc): to_ticks(v) for (t, rc), v in table.time[j].items()
                             if t in tps and rc in rcs} for j in range(L)]
    if "hops" not in memo:
        memo["hops"] = ([to_ticks(table.hop_s(j, False)) for j in range(L - 1)],
                        [to_ticks(table.hop_s(j, True)) for j in range(L - 1)])
    ticks = memo[(tps, rcs)]
    intra, inter = memo["hops"]
    return TrainCombo(dp, m, zero, schedule, link, table, tps, rcs, tuple(sizes), pp, cap,
                      ticks, intra, inter, v=v)


# --------------------------------------------------------------------------- evaluation


def path_value(combo: TrainCombo, path, per_node: int) -> int | None:
    """Integer step time (ticks) of a path of ``(first, last, tp, recompute)`` stages, or
    None when it breaks a constraint (placement, memory at its in-flight count, degrees)."""
    values, tails, offset, pp = [], [], 0, len(path)
    for i, (a, b, t, rc) in enumerate(path):
        if offset % per_node + t > per_node:
            return None
        if combo.allowed is not None and (a, b) not in combo.allowed:
            return None
        if any((t, rc) not in combo.ticks[j] for j in range(a, b + 1)):
            return None
        if combo.table.stage_memory(a, b, t, rc, combo.in_flight(i, pp)) > combo.cap:
            return None
        values.append(sum(combo.ticks[j][(t, rc)] for j in range(a, b + 1)))
        tails.append(combo.tail(a, b, t))
        offset += t
        if i + 1 < pp:
            values.append(combo.hop_inter[b] if offset % per_node == 0 else combo.hop_intra[b])
    if offset not in combo.sizes or (combo.pp is not None and pp != combo.pp):
        return None
    return sum(values) + (combo.m - 1) * max(values) + max(tails)


def _shared(combo: TrainCombo, name: str, make, *more):
    """A figure of the combo's tick rows, shared by every combo with the same rows (the
    table's ``ticks_memo``, keyed by the tp degrees and recompute options) and ``more``."""
    key = (name, combo.tps, combo.rcs) + more
    memo = combo.table.ticks_memo
    if key not in memo:
        memo[key] = make()
    return memo[key]


def _fastest(combo: TrainCombo) -> list[int]:
    if "fastest" not in combo.memo:
        combo.memo["fastest"] = _shared(combo, "fastest",
                                        lambda: [min(c.values()) for c in combo.ticks])
    return combo.memo["fastest"]


def _total(combo: TrainCombo) -> int:
    if "total" not in combo.memo:
        combo.memo["total"] = sum(_fastest(combo))
    return combo.memo["total"]


def _slowest(combo: TrainCombo) -> int:
    if "slowest" not in combo.memo:
        combo.memo["slowest"] = max(_fastest(combo))
    return combo.memo["slowest"]


def _min_hop(combo: TrainCombo) -> int:
    if "min_hop" not in combo.memo:
        combo.memo["min_hop"] = min(combo.hop_intra + combo.hop_inter, default=0)
    return combo.memo["min_hop"]


def _cheapest(combo: TrainCombo) -> int:
    """The layers' device-seconds, each at its cheapest ``tp * time``."""
    if "cheapest" not in combo.memo:
        combo.memo["cheapest"] = _shared(combo, "cheapest", lambda: sum(
            min(t * v for (t, _), v in c.items()) for c in combo.ticks))
    return combo.memo["cheapest"]


def _tail_floor(combo: TrainCombo) -> int:
    """A floor on the largest stage tail of any plan: some stage holds at least the
    replica's parameter bytes per device spread over its devices (``sum_i tp_i bytes_i >=
    sum_j min_tp tp * bytes_j`` and ``sum_i tp_i <= S_max``), and a tail grows with the
    bytes it syncs and updates."""
    if "tail_floor" not in combo.memo:
        spread = sum(min(t * combo.table.params[j][t] for t in combo.tps
                         if t in combo.table.params[j]) for j in range(combo.num_layers))
        combo.memo["tail_floor"] = to_ticks(combo.table.tail_of_bytes(-(-spread // combo.s_max)))
    return combo.memo["tail_floor"]


def _lower_bound(combo: TrainCombo, bottleneck: int = 0, pp: int | None = None) -> int | None:
    """Valid for every plan of the combo (of ``pp`` stages, if given): the stage sum at
    every layer's fastest variant (plus ``pp - 1`` of the cheapest hop), the bottleneck at
    least the slowest layer, the sum over the most stages, the device-seconds over the
    replica and ``bottleneck``, and the tail at least ``_tail_floor``."""
    if not all(combo.ticks):
        return None
    cheapest, total, slowest = _cheapest(combo), _total(combo), _slowest(combo)
    stages_max = min(combo.num_layers, combo.s_max // min(combo.tps))
    pp = combo.pp if pp is None else pp
    hops = 0
    if pp is not None:
        if pp > stages_max:
            return None
        stages_max = pp
        hops = (pp - 1) * _min_hop(combo)
    worst = max(slowest, -(-total // stages_max), -(-cheapest // combo.s_max), bottleneck)
    m, s_max = combo.m, combo.s_max
    # Coupled: layer j at (tp, rc) adds c to the sum and tp * c to the device-seconds, and
    # the bottleneck >= device-seconds / S_max.
    if "coupled" not in combo.memo:
        combo.memo["coupled"] = _shared(combo, "coupled", lambda: sum(
            min(v * (1 + (m - 1) * t / s_max) for (t, _), v in c.items())
            for c in combo.ticks), m, s_max)
    coupled = combo.memo["coupled"]
    pipeline = max(total + (m - 1) * worst, int(math.floor(coupled * (1 - 1e-12)))) + hops
    return pipeline + _tail_floor(combo)


def _heuristic(combo: TrainCombo, per_node: int):
    """One (tp, recompute) for every stage, min-bottleneck greedy split per stage count,
    memory checked at stage 0's in-flight count; priced exactly by ``path_value``."""
    L, best = combo.num_layers, None
    for t in combo.tps:
        for rc in combo.rcs:
            if any((t, rc) not in combo.ticks[j] for j in range(L)):
                continue
            ticks = [combo.ticks[j][(t, rc)] for j in range(L)]
            k_max = min(L, combo.s_max // t)
            if combo.pp is not None:
                ks = [combo.pp] if combo.pp <= k_max else []
            else:
                ks = sorted({k for k in range(1, min(k_max, 8) + 1)}
                            | {int(k_max / 1.25 ** i) for i in range(40)} - {0})
            for k in ks:
                if k * t not in combo.sizes:
                    continue
                flight = combo.in_flight(0, k)
                if combo.allowed is not None:  # the engine's own split
                    parts = sorted(combo.allowed) if len(combo.allowed) == k else None
                else:
                    parts = _split(combo, ticks, t, rc, k, flight)
                if parts is None:
                    continue
                path = [(a, b, t, rc) for a, b in parts]
                value = path_value(combo, path, per_node)
                if value is not None and (best is None or value < best[0]):
                    best = (value, path)
    return best


def _split(combo, ticks, t, rc, k, flight):
    """Fewest-stages greedy cut with every stage <= a bisected time limit and within
    memory at ``flight`` microbatches in flight; exactly ``k`` stages or None."""
    table = combo.table

    workspace = table.forward.workspace(t)
    own = [table.state[j][t] + flight * table.saved[j][(t, rc)] for j in range(len(ticks))]
    # layers holding a tied copy in some stage (a copy counts when its previous reader is
    # before the stage's first layer, so first = j shows every one)
    tied = {j for j in range(len(ticks)) if table.borrowed_state(j, j, t)}

    def layer_bytes(j, start):  # layer j's memory in a stage from start
        return own[j] + table.borrowed_state(j, start, t) if j in tied else own[j]

    def greedy(limit):
        cuts, start, acc, mem = [], 0, 0, workspace
        for j, v in enumerate(ticks):
            if v > limit:
                return None
            add = layer_bytes(j, start)
            if acc + v > limit or mem + add > combo.cap:
                if start == j:
                    return None
                cuts.append((start, j - 1))
                start, acc = j, 0
                add = layer_bytes(j, j)
                mem = workspace
                if mem + add > combo.cap:
                    return None
            acc += v
            mem += add
        cuts.append((start, len(ticks) - 1))
        return cuts

    lo, hi = max(ticks), sum(ticks)
    p = greedy(hi)
    if p is None or len(p) > k:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        p = greedy(mid)
        if p is not None and len(p) <= k:
            hi = mid
        else:
            lo = mid + 1
    parts = greedy(lo)
    while parts is not None and len(parts) < k:
        i = max(range(len(parts)), key=lambda s: parts[s][1] - parts[s][0])
        a, b = parts[i]
        if a == b:
            return None
        parts[i:i + 1] = [(a, a), (a + 1, b)]
    return parts


# --------------------------------------------------------------------------- exact search


def _arcs(combo: TrainCombo, cutoff: int | None):
    """Stages ``(a, b, tp, rc, time, static, saved, tail)`` that fit with the fewest
    microbatches in flight any stage holds (1F1B: one; GPipe: m) and cannot be excluded by
    the cutoff. A recompute option is dropped where a faster one of the same stage fits at
    every position (m in flight): same memory for states, same tail, less time."""
    L, m, table = combo.num_layers, combo.m, combo.table
    fastest = _fastest(combo)
    prefix = [0]
    for v in fastest:
        prefix.append(prefix[-1] + v)
    least = m if combo.schedule == "gpipe" else 1
    arcs = []
    for a in range(L):
        for t in combo.tps:
            static, nbytes = table.forward.workspace(t), 0
            acc = {rc: 0 for rc in combo.rcs}
            saved = {rc: 0 for rc in combo.rcs}
            alive = set(combo.rcs)
            for b in range(a, L):
                if t not in table.state[b]:
                    break
                static += table.state[b][t] + table.borrowed_state(b, a, t)
                nbytes += table.params[b][t] + table.forward.borrowed_bytes(b, a, t)
                tail = None
                safe = False  # a faster option fits at every position
                for rc in combo.rcs:  # none, selective, full: fastest first
                    if rc not in alive or (t, rc) not in combo.ticks[b]:
                        alive.discard(rc)
                        continue
                    acc[rc] += combo.ticks[b][(t, rc)]
                    saved[rc] += table.saved[b][(t, rc)]
                    if static + least * saved[rc] > combo.cap:
                        alive.discard(rc)  # a longer stage holds more; others may fit
                        continue
                    if cutoff is not None:
                        if m * acc[rc] > cutoff:
                            alive.discard(rc)
                            continue
                        if m * acc[rc] + prefix[a] + prefix[L] - prefix[b + 1] > cutoff:
                            continue
                    if safe or (combo.allowed is not None and (a, b) not in combo.allowed):
                        continue
                    if tail is None:
                        tail = to_ticks(table.tail_of_bytes(nbytes))
                    arcs.append((a, b, t, rc, acc[rc], static, saved[rc], tail))
                    safe = static + m * saved[rc] <= combo.cap
                if not alive or static > combo.cap:
                    break
    return arcs


def _stage_counts(combo: TrainCombo) -> list[tuple[int, int]]:
    """``(pp, bound)`` for every stage count the combo allows, by bound: ``_lower_bound``
    with ``pp`` stages (the sum over ``pp`` stages, ``pp - 1`` of the cheapest hop)."""
    top = min(combo.num_layers, combo.s_max // min(combo.tps))
    pps = [combo.pp] if combo.pp is not None else range(1, top + 1)
    out = [(pp, _lower_bound(combo, pp=pp)) for pp in pps if pp <= top]
    return sorted(((pp, b) for pp, b in out if b is not None), key=lambda x: (x[1], x[0]))


def _largest_floor(combo: TrainCombo, pp: int, limit: int) -> int:
    """The largest bottleneck a ``pp``-stage plan can have and still be ``<= limit``
    (negative when no plan can): the sum holds the bottleneck stage, so ``m W + tail floor
    <= limit``, and every layer at its fastest, so ``_pp_bound(W) <= limit``."""
    base = _pp_bound(combo, pp, 0)
    if base > limit:
        return -1
    top = (limit - _tail_floor(combo)) // combo.m
    if combo.m > 1:
        top = min(top, (limit - base) // (combo.m - 1))
    return top


def _spread_floor(combo: TrainCombo, pp: int) -> int:
    """A floor on the largest stage time of ``pp`` stages: the slowest layer at its
    fastest, the layers' fastest sum over ``pp`` and their device-seconds over ``S_max``."""
    return max(_slowest(combo), -(-_total(combo) // pp), -(-_cheapest(combo) // combo.s_max))


def _pp_bound(combo: TrainCombo, pp: int, floor: int) -> int:
    """Valid for every ``pp``-stage plan whose largest stage time is at least ``floor``:
    every layer at its fastest, the fewest hops, ``(m - 1) floor`` and the tail floor."""
    return (_total(combo) + (pp - 1) * _min_hop(combo) + (combo.m - 1) * floor
            + _tail_floor(combo))


class _Positions:
    """Whether ``pp`` stages of the combo can all be within a time limit ``M``, with each
    stage's memory at its position's in-flight count (1F1B: ``min(pp - k, m)``), and the
    least such ``M`` (``least``): a valid floor on ``max E`` of every ``pp``-stage plan.

    A relaxation of the plans: hops, the placement rule, tied copies and an engine's own
    split are ignored, and each stage takes whichever recompute option reaches furthest.
    Feasibility of ``M`` is monotone and the least ``M`` is some stage's time, so it is a
    bisection over the stage times that fit; each test (``fits``) is a fewest-devices walk
    over ``(stages to the end, boundary)``: a stage that fits may be shortened and still
    fit, so the stage from ``a``
    holds layers ``a .. x - 1`` for every ``x`` up to its furthest reach, a range minimum
    of the fewest devices after it (a sparse table). Integer ticks and bytes in int64
    numpy arrays.
    """

    BIG = 1 << 52  # ticks of a layer at a degree it does not allow (128 of them fit int64)

    def __init__(self, combo: TrainCombo) -> None:
        self.combo = combo
        L, table, cap = combo.num_layers, combo.table, combo.cap
        self.rows = []  # (tp, [(prefix time, prefix states, prefix saved, room)] per rc)
        for t in combo.tps:
            per_rc = []
            for rc in combo.rcs:
                v = [combo.ticks[j].get((t, rc), self.BIG) for j in range(L)]
                pt = np.concatenate(([0], np.cumsum(np.array(v, dtype=np.int64))))
                ps = np.concatenate(([0], np.cumsum(np.array(
                    [table.state[j].get(t, 0) for j in range(L)], dtype=np.int64))))
                pv = np.concatenate(([0], np.cumsum(np.array(
                    [table.saved[j].get((t, rc), 0) for j in range(L)], dtype=np.int64))))
                per_rc.append((pt, ps, pv, cap - table.forward.workspace(t)))
            self.rows.append((t, per_rc))
        self._ends: dict = {}
        # every (tp, rc) option as one row: prefix times, and the memory ends by flight
        self._pts = np.array([pt for _, per_rc in self.rows for pt, *_ in per_rc])
        self._shape = (len(self.rows), len(combo.rcs), L)
        self._mem: dict = {}
        self._time_reach: dict = {}
        self._walks: dict = {}
        self._needs: dict = {}
        self._known: dict = {}  # pp -> (largest limit known not to fit, least known to)
        self._top = min(L, combo.s_max // min(combo.tps))
        self._starts = np.arange(L)
        self._first = np.minimum(self._starts + 1, L)
        self._tps = np.array([t for t, _ in self.rows], dtype=np.int64)[:, None]
        self._levels = max(1, (L + 1).bit_length())
        logs = np.floor(np.log2(np.arange(1, L + 2))).astype(np.int64)
        self._logs = np.concatenate(([0], logs))  # logs[n] = floor(log2(n)), n >= 1
        self._sums: dict = {}
        self._values: list[int] | None = None

    @property
    def values(self) -> list[int]:
        """The times of the stages that fit with the fewest microbatches in flight, sorted."""
        if self._values is None:
            L, combo = self.combo.num_layers, self.combo
            least = combo.m if combo.schedule == "gpipe" else 1
            values = []
            for (_, per_rc), ends in zip(self.rows, self.ends(least)):
                for (pt, *_), end in zip(per_rc, ends):
                    for a in range(L):
                        if end[a] > a:
                            values.append(pt[a + 1:end[a] + 1] - pt[a])
            found = np.unique(np.concatenate(values)) if values else np.zeros(0, np.int64)
            self._values = [int(v) for v in found[found < self.BIG]]
        return self._values

    def ends(self, flight: int) -> list[list[np.ndarray]]:
        """Per tp and rc, the furthest boundary a stage from each layer reaches in memory
        holding ``flight`` microbatches (``a - 1`` or ``a``: not one layer)."""
        if flight not in self._ends:
            self._ends[flight] = [
                [np.searchsorted(ps + flight * pv, (ps + flight * pv)[:-1] + room,
                                 side="right") - 1 for _, ps, pv, room in per_rc]
                for _, per_rc in self.rows]
        return self._ends[flight]

    def _stage_ends(self, limit: int, flight: int) -> np.ndarray:
        """Per tp, the furthest boundary a stage from each layer reaches within ``limit``
        and memory at ``flight``, with its best recompute option (``(tp, start)``)."""
        if flight not in self._mem:
            self._mem[flight] = np.array([e for row in self.ends(flight) for e in row])
        if limit not in self._time_reach:
            self._time_reach = {limit: np.array(
                [np.searchsorted(pt, pt[:-1] + limit, side="right") - 1 for pt in self._pts])}
        end = np.minimum(self._time_reach[limit], self._mem[flight])
        return end.reshape(self._shape).max(axis=1)

    def fits(self, limit: int, pp: int) -> bool:
        """Whether ``pp`` stages fit with every stage time ``<= limit``. Feasibility is
        monotone in the limit, so each stage count keeps its largest limit known not to
        fit and its least known to fit, and walks only between them."""
        if pp > self._top:
            return False
        no, yes = self._known.get(pp, (-1, None))
        if limit <= no:
            return False
        if yes is not None and limit >= yes:
            return True
        walk = self._walk(limit, pp)
        ok = pp <= walk["k"] and walk["ok"][pp]
        self._known[pp] = (no, limit if yes is None else min(yes, limit)) if ok else \
            (max(no, limit), yes)
        return ok

    def _walk(self, limit: int, upto: int | None = None) -> dict:
        """``ok[k]``: ``k`` stages fit within ``limit``, for every ``k`` up to ``upto`` (all
        by default) at once, and ``needs[k]``. Walks back from the last layer: the stage
        with ``k`` stages from it to the end holds ``in_flight(pp - k, pp)`` microbatches,
        which for GPipe and 1F1B depends on ``k`` alone (``m``; ``min(k, m)``), so one walk
        serves every stage count; it goes on from where it stopped when asked for more
        stages, and stops for good once no suffix fits the devices (``dead``)."""
        combo, L, big, top = self.combo, self.combo.num_layers, self.BIG, self._top
        walk = self._walks.get(limit)
        if walk is None:
            cur = np.full(L + 1, big, dtype=np.int64)  # fewest devices covering [x, L)
            cur[L] = 0
            walk = self._walks[limit] = {"k": 0, "ok": [False], "needs": [cur], "dead": False}
        upto = top if upto is None else min(upto, top)
        if walk["k"] >= upto or walk["dead"]:
            return walk
        starts, first, logs, tps = self._starts, self._first, self._logs, self._tps
        levels = self._levels
        cur = walk["needs"][-1]
        for k in range(walk["k"] + 1, upto + 1):
            # table[i, x] = min cur[x .. x + 2**i - 1] (big past the end)
            table = np.full((levels, L + 1), big, dtype=np.int64)
            table[0] = cur
            for i in range(1, levels):
                half = 1 << (i - 1)
                table[i, :L + 1 - half] = np.minimum(table[i - 1, :L + 1 - half],
                                                     table[i - 1, half:])
            flight = combo.in_flight(top - k, top)  # min(k, m) (1F1B) or m (GPipe)
            end = self._stage_ends(limit, flight)  # (tp, start)
            # the stage from a holds layers a .. x - 1 for the boundaries x in a + 1 .. end
            level = logs[np.maximum(end - starts, 1)]
            second = np.clip(end - (1 << level) + 1, 0, L)
            best = np.minimum(table[level, first], table[level, second]) + tps
            best[end <= starts] = big
            new = np.full(L + 1, big, dtype=np.int64)
            new[:L] = best.min(axis=0)
            cur = np.minimum(new, big)
            walk["needs"].append(cur)
            walk["ok"].append(bool(cur[0] <= combo.s_max))
            walk["k"] = k
            if cur.min() > combo.s_max:
                walk["dead"] = True
                break
        return walk

    def sums(self, limit: int, price: int) -> list[list[int]]:
        """``sums[k][x]``: the least ``sum (time + price * tp)`` over ways to hold layers
        ``x..L-1`` as the last ``k`` stages, each within ``limit`` and memory at its
        position (``BIG``: none). For a plan on ``R`` devices, ``sums[k][x] - price * R``
        is a floor on those stages' time sum (Lagrange on the device count, any price
        ``>= 0``). A stage from ``a`` to ``b`` costs ``pt[b] - pt[a] + price * tp``, so
        the best ``b`` is a range minimum of ``pt[b] + sums[k-1][b]``."""
        key = (limit, price)
        if key in self._sums:
            return self._sums[key]
        combo, L, big = self.combo, self.combo.num_layers, self.BIG
        top = min(L, combo.s_max // min(combo.tps))
        starts = np.arange(L)
        levels = max(1, (L + 1).bit_length())
        # every (tp, rc) option at once: rows of prefix times, their time reach, their tp
        pts = np.array([pt for _, per_rc in self.rows for pt, *_ in per_rc])
        costs = np.array([t for t, per_rc in self.rows for _ in per_rc], dtype=np.int64)
        reach = np.array([np.searchsorted(pt, pt[:-1] + limit, side="right") - 1
                          for pt in pts])
        rows = np.arange(len(pts))[:, None]
        first = np.minimum(starts + 1, L)
        cur = np.full(L + 1, big, dtype=np.int64)
        cur[L] = 0
        out = [cur.tolist()]
        for k in range(1, top + 1):
            flight = combo.in_flight(top - k, top)
            end = np.minimum(reach, np.array([e for row in self.ends(flight) for e in row]))
            table = np.full((levels, len(pts), L + 1), 1 << 62, dtype=np.int64)
            table[0] = pts + cur  # < 2**60: 128 layers of BIG at most
            for i in range(1, levels):
                half = 1 << (i - 1)
                table[i, :, :L + 1 - half] = np.minimum(table[i - 1, :, :L + 1 - half],
                                                        table[i - 1, :, half:])
            level = np.floor(np.log2(np.maximum(end - starts, 1))).astype(np.int64)
            second = np.clip(end - (1 << level) + 1, 0, L)
            best = np.minimum(table[level, rows, first], table[level, rows, second]) \
                - pts[:, :-1] + price * costs[:, None]
            best[end <= starts] = big
            new = np.full(L + 1, big, dtype=np.int64)
            new[:L] = best.min(axis=0)
            cur = np.minimum(new, big)
            out.append(cur.tolist())
            if cur.min() >= big:
                break
        out += [[big] * (L + 1)] * (top + 1 - len(out))
        self._sums[key] = out
        return out

    def needs(self, limit: int) -> list[list[int]]:
        """``needs[k][x]``: the fewest devices on which layers ``x..L-1`` fit as ``k``
        stages (the last ``k`` of the pipeline) each within ``limit`` (``BIG``: none)."""
        if limit not in self._needs:
            needs = self._walk(limit)["needs"]
            big = [self.BIG] * (self.combo.num_layers + 1)
            self._needs[limit] = [n.tolist() for n in needs] + [big] * (self._top + 1 - len(needs))
        return self._needs[limit]

    def below(self, limit: int) -> int | None:
        """The largest stage time in ``values`` at or below ``limit`` (None: none is)."""
        i = bisect.bisect_right(self.values, limit)
        return self.values[i - 1] if i else None

    def least(self, pp: int, above: int = 0, within: float = 2e-3) -> int | None:
        """A floor on the least limit that fits ``pp`` stages, within ``within`` of it
        (relative), searched among the stage times ``>= above`` (the caller knows none
        below fits); None when none fits. The bisection keeps ``values[lo]`` at or below
        the least limit, so stopping early returns a valid floor."""
        values = self.values
        lo, hi = bisect.bisect_left(values, above), len(values) - 1
        if lo > hi or not self.fits(values[hi], pp):
            return None
        while lo < hi and values[hi] - values[lo] > within * values[hi]:
            mid = (lo + hi) // 2
            if self.fits(values[mid], pp):
                hi = mid
            else:
                lo = mid + 1
        return values[lo]


def _best_stages(combo: TrainCombo, starts: list[list], per_node: int, pp: int,
                 cutoff: int | None, floor: int, deadline: float | None = None,
                 needs: list[list[int]] | None = None, sums=None):
    """``(value, path)`` of the best ``pp``-stage plan of the combo at or below ``cutoff``,
    None when there is none, or ``"timeout"`` when ``deadline`` passed first.

    Exact: a forward walk over the boundaries with states ``(devices used, stages so
    far)``, so stage ``k``'s in-flight count, hence its memory, is exact; labels are the
    Pareto front of (stage and hop sum, their max, the largest tail), each non-decreasing
    in the step time ``sum + (m - 1) max + tail``. ``starts[a]`` are the arcs
    (``_arcs``) from boundary ``a``. Two facts keep the fronts small: every ``pp``-stage
    plan has ``max >= floor`` (``_Positions.least``) and ``tail >= _tail_floor``, so
    labels carry ``max(max, floor)`` and ``max(tail, tail floor)`` without changing the value
    of any complete plan; and a label is dropped when its sum plus every remaining layer
    at its fastest option and the fewest remaining hops already exceeds ``cutoff``.
    """
    L, m = combo.num_layers, combo.m
    fastest = _fastest(combo)
    rest = [0] * (L + 1)
    for j in range(L - 1, -1, -1):
        rest[j] = rest[j + 1] + fastest[j]
    min_hop = min(combo.hop_intra + combo.hop_inter, default=0)
    tail_floor, min_tp = _tail_floor(combo), min(combo.tps)
    limit = cutoff if cutoff is not None else 1 << 62
    # The stages after boundary x run on the R devices left, so their max is at least
    # their device-seconds over R, each layer's at least its cheapest tp * time
    # (``cheap``), and, coupled with the sum, layer j adds at least min c (1 + (m-1) tp / R).
    cheap = [0] * (L + 1)
    for j in range(L - 1, -1, -1):
        cheap[j] = cheap[j + 1] + min(t * v for (t, _), v in combo.ticks[j].items())
    coupled = _coupled_rows(combo)

    def coupled_rest(x: int, left: int) -> int:
        row = coupled.get(left)
        if row is None:
            row = coupled[left] = _coupled_row(combo, left)
        return row[x]
    # Devices used enter the state only by their residue on the node (placement, hops)
    # when a completion that fits after u devices also fits after u - per_node (the sizes
    # allow it): then fewer devices with the same residue is simply better, one more
    # coordinate of the front.
    sizes = set(combo.sizes)
    by_residue = all(s - q * per_node in sizes for s in sizes
                     for q in range(1, s // per_node + 1) if s - q * per_node >= 1)
    labels: list[dict] = [{} for _ in range(L + 1)]
    labels[0][(0, 0)] = [(0, floor, tail_floor, 0, None)]
    for x in range(L):
        if deadline is not None and time.perf_counter() > deadline:
            return "timeout"
        for (_, k), raw in labels[x].items():
            groups: dict[int, list] = {}
            for label in _front4(raw):
                groups.setdefault(label[3], []).append(label)
            flight = combo.in_flight(k, pp)
            left = pp - k - 1  # stages after this one
            for used, front in groups.items():
                _extend(combo, starts[x], labels, front, used, k, flight, left, per_node,
                        by_residue, rest, cheap, coupled_rest, min_hop, min_tp, limit, needs,
                        sums)
        labels[x] = {}
    best = None
    for raw in labels[L].values():
        for s, w, tl, _, path in _front4(raw):
            value = s + (m - 1) * w + tl
            if best is None or value < best[0]:
                best = (value, list(_unwind(path)))
    return best


def _coupled_rows(combo: TrainCombo) -> dict:
    """``_coupled_row`` by devices left, shared by every stage count of the combo."""
    return _shared(combo, "coupled_rows", dict, combo.m)


def _coupled_row(combo: TrainCombo, left: int) -> list[int]:
    """``row[x]``: a floor on ``sum_j c_j (1 + (m - 1) tp_j / left)`` over the layers from
    ``x``, each at its least option (the stage sum coupled with device-seconds over the
    ``left`` devices): the same float operations, in the same order, as a Python loop
    from the last layer."""
    def parts():
        width = max(len(c) for c in combo.ticks)
        v = np.full((combo.num_layers, width), np.inf)
        t = np.zeros((combo.num_layers, width))
        for j, c in enumerate(combo.ticks):
            for i, ((tp, _), x) in enumerate(c.items()):
                v[j, i], t[j, i] = x, tp
        return v, t
    v, t = _shared(combo, "coupled_parts", parts)
    least = (v * (1 + (combo.m - 1) * t / left)).min(axis=1)
    row = np.concatenate((np.cumsum(least[::-1])[::-1], [0.0]))
    return [int(math.floor(x * (1 - 1e-12))) for x in row.tolist()]


_FIRST4 = operator.itemgetter(0, 1, 2, 3)


def _front4(labels: list) -> list:
    """Labels ``(sum, max, tail, devices, path)`` that no other is at or below in all four."""
    labels.sort(key=_FIRST4)
    kept: list = []
    for label in labels:
        _, w, tl, u, _ = label
        for k in kept:
            if k[1] <= w and k[2] <= tl and k[3] <= u:
                break
        else:
            kept.append(label)
    return kept


def _extend(combo, arcs, labels, front, used, k, flight, left, per_node, by_residue, rest,
            cheap, coupled_rest, min_hop, min_tp, limit, needs, sums):
    """``_best_stages``' step: every arc from the labels ``front`` (``used`` devices, ``k``
    stages so far) into the labels of the boundary after it."""
    L, m1, cap, s_max = combo.num_layers, combo.m - 1, combo.cap, combo.s_max
    sizes, hop_inter, hop_intra = combo.sizes, combo.hop_inter, combo.hop_intra
    offset = used % per_node
    hops_after = max(left - 1, 0) * min_hop
    need_row = needs[left] if needs is not None and left else None
    price, sum_row = 0, None
    if sums is not None and left:
        price, sum_row = sums[0], sums[1][left]
    for a, b, t, rc, t_ab, static, saved, tail in arcs:
        if (left == 0) != (b == L - 1) or L - 1 - b < left:
            continue
        if offset + t > per_node or static + flight * saved > cap:
            continue
        used2 = used + t
        room = s_max - used2
        if room < left * min_tp:
            continue
        if need_row is not None and need_row[b + 1] > room:
            continue  # the layers after b do not fit the devices left in time and memory
        if left == 0:
            if used2 not in sizes:
                continue
            hop = 0
        else:
            hop = hop_inter[b] if used2 % per_node == 0 else hop_intra[b]
        later = rest[b + 1]
        if sum_row is not None:
            lagrange = sum_row[b + 1] - price * room
            if lagrange > later:
                later = lagrange
        ahead = t_ab + hop + later + hops_after
        spread, ahead2 = 0, 0
        if left:
            spread = -(-cheap[b + 1] // room)
            ahead2 = t_ab + hop + coupled_rest(b + 1, room) + hops_after
        wa = t_ab if t_ab > hop else hop
        step = t_ab + hop
        target = None
        for s, w, tl, _, path in front:
            w2 = w if w > wa else wa
            tl2 = tl if tl > tail else tail
            v = ahead + m1 * (w2 if w2 > spread else spread)
            if s + tl2 + (v if v > ahead2 else ahead2) > limit:
                continue
            if target is None:
                key = (used2 % per_node if by_residue else used2, k + 1)
                target = labels[b + 1].setdefault(key, [])
            target.append((s + step, w2, tl2, used2, ((a, b, t, rc), path)))


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class TrainSolution:
    """A training plan as the solvers return it.

    ``solution`` holds the stages (``compute_s``/``comm_s``: one microbatch forward +
    backward + recompute; ``memory_bytes``: at the stage's in-flight count) and the
    prediction (``latency_s`` = step time, ``throughput_samples_per_s`` = batch / step).
    """

    solution: Solution
    zero: int
    schedule: str
    recompute: tuple[str, ...]
    tail_s: tuple[float, ...]
    in_flight: tuple[int, ...]
    step_s: float
    mfu: float
    tokens_per_s: float
    link: str
    virtual_stages: int = 1


def evaluate(combo: TrainCombo, path, space: TrainSpace, objective: str,
             stats: SolverStats) -> TrainSolution:
    """The plan's figures from the unrounded table (the same formulas as ``path_value``;
    an interleaved combo's path is its pattern, ``planner.interleaved.pattern_value``)."""
    if combo.v > 1:
        return _evaluate_interleaved(combo, path, space, objective, stats)
    table, per_node, pp = combo.table, space.devices_per_node, len(path)
    devices = place_stages([t for _, _, t, _ in path], combo.dp, per_node)
    stages, times, hops, tails, flights = [], [], [], [], []
    offset = 0
    for i, (a, b, t, rc) in enumerate(path):
        total = sum(table.time[j][(t, rc)] for j in range(a, b + 1))
        comm = sum(table.comm[j][(t, rc)] for j in range(a, b + 1))
        flight = combo.in_flight(i, pp)
        stages.append(Stage(a, b, t, devices[i], total - comm, comm,
                            table.stage_memory(a, b, t, rc, flight),
                            int(table.forward.kv_heads_replicated.get(t, 1))))
        times.append(total)
        tails.append(table.tail_s(a, b, t))
        flights.append(flight)
        offset += t
        if i + 1 < pp:
            hops.append(table.hop_s(b, offset % per_node == 0))
    step = tm.pipeline_step_s(times, hops, tails, combo.m)
    used = combo.dp * sum(t for _, _, t, _ in path)
    mfu = tm.model_flops_per_step(space.forward_flops) / step / (used * space.peak_flops)
    prediction = Prediction(step, space.batch_size / step,
                            max(s.memory_bytes for s in stages), step, tuple(hops))
    solution = Solution(objective, space.batch_size, combo.dp, combo.m,
                        space.batch_size // (combo.dp * combo.m), tuple(stages), prediction,
                        stats, table.forward.sequence_parallel)
    tokens = space.batch_size * space.seq_len
    return TrainSolution(solution, combo.zero, combo.schedule, tuple(p[3] for p in path),
                         tuple(tails), tuple(flights), step, mfu, tokens / step, combo.link)


def _evaluate_interleaved(combo: TrainCombo, pattern, space: TrainSpace, objective: str,
                         stats: SolverStats) -> TrainSolution:
    """``evaluate`` for an interleaved pattern: the plan's stages are the chunks in model
    order (chunk ``r pp + i`` on group ``i``'s devices); a chunk's ``compute_s``/``comm_s``
    are its own layers', its ``memory_bytes``, in-flight count and tail its group's (what
    the device holds and does after the pipeline drains)."""
    from planner import interleaved as il

    table, per_node, pp, v = combo.table, space.devices_per_node, len(pattern), combo.v
    bounds = tm.round_bounds(combo.num_layers, v)
    devices = place_stages([t for _, t, _ in pattern], combo.dp, per_node)
    group_s, links, tails, memory, flights = [], [], [], [], []
    used = 0
    for i, (start, t, rc) in enumerate(pattern):
        end = pattern[i + 1][0] if i + 1 < pp else None
        chunks = il.chunks_of(bounds, start, end)
        group_s.append(sum(table.time[j][(t, rc)] for a, b in chunks for j in range(a, b + 1)))
        tails.append(table.tail_of_bytes(sum(table.param_bytes(a, b, t) for a, b in chunks)))
        flights.append(combo.in_flight(i, pp))
        # one workspace per device, however many chunks it holds
        space_t = table.forward.workspace(t)
        memory.append(space_t + sum(table.stage_memory(a, b, t, rc, flights[-1]) - space_t
                                    for a, b in chunks))
        used += t
        if i + 1 < pp:
            inter = used % per_node == 0
            links.append(sum(table.hop_s(a + end - 1, inter) for a in bounds[:-1]))
    links.append(sum(table.hop_s(b - 1, used > per_node) for b in bounds[1:-1]))
    step = tm.interleaved_step_s(group_s, links, tails, combo.m, v)
    stages, recompute, tail_s, in_flight = [], [], [], []
    for a, b, t, rc, i in il.pattern_chunks(combo, pattern):
        total = sum(table.time[j][(t, rc)] for j in range(a, b + 1))
        comm = sum(table.comm[j][(t, rc)] for j in range(a, b + 1))
        stages.append(Stage(a, b, t, devices[i], total - comm, comm, memory[i],
                            int(table.forward.kv_heads_replicated.get(t, 1))))
        recompute.append(rc)
        tail_s.append(tails[i])
        in_flight.append(flights[i])
    used_devices = combo.dp * sum(t for _, t, _ in pattern)
    mfu = tm.model_flops_per_step(space.forward_flops) / step / (used_devices * space.peak_flops)
    prediction = Prediction(step, space.batch_size / step, max(memory), step, tuple(links))
    solution = Solution(objective, space.batch_size, combo.dp, combo.m,
                        space.batch_size // (combo.dp * combo.m), tuple(stages), prediction,
                        stats, table.forward.sequence_parallel)
    tokens = space.batch_size * space.seq_len
    return TrainSolution(solution, combo.zero, combo.schedule, tuple(recompute),
                         tuple(tail_s), tuple(in_flight), step, mfu, tokens / step, combo.link,
                         virtual_stages=v)


#: How many of the best-bounded combos the first heuristic plan may come from.
_HEURISTIC_WINDOW = 8


def solve_train(builder: TrainCostBuilder, cluster: Cluster, workload: Workload, *,
                pins: Mapping | None = None, num_workers: int = 2,
                time_limit_s: float = 60.0, restriction: Restriction | None = None,
                tp_degrees=None) -> TrainSolution:
    """The training plan of least step time, proven optimal: every ``(combo, stage
    count)`` is either pruned by a valid lower bound above the best plan found or solved
    exactly by ``_best_stages`` (``OPTIMAL``); on the time limit, ``FEASIBLE`` with the
    least bound of those left. ``num_workers`` is unused (the search runs in this
    process; kept for the callers shared with inference).

    Raises:
        PlanError: contradictory pins, or nothing found in the time limit.
        InfeasiblePlanError: nothing fits in memory.
    """
    start = time.perf_counter()
    deadline = start + time_limit_s
    space = train_space(builder, cluster, workload, pins, restriction, tp_degrees)
    per_node = space.devices_per_node
    scored = []
    for combo in (c for c in space.combos if c.v == 1):
        lb = _lower_bound(combo)
        if lb is not None:
            combo.lb = lb
            scored.append(combo)
    scored.sort(key=lambda c: (c.lb, c.dp, c.m, c.zero))
    incumbent = None
    # The heuristic on the best combo of each of the first three dp degrees among the
    # eight best bounds: ZeRO levels of one dp give nearly the same heuristic plan, and a
    # first incumbent from another dp can be much nearer the optimum (llama-3-405b on
    # 64x8xH100: dp 4, where the DP then finds the optimum before the dp 2 combos).
    degrees: set[int] = set()
    for combo in scored[:_HEURISTIC_WINDOW]:
        if incumbent is not None and combo.lb >= incumbent[0]:
            break
        if combo.dp in degrees or len(degrees) == 3:
            continue
        degrees.add(combo.dp)
        found = _heuristic(combo, per_node)
        if found is not None and (incumbent is None or found[0] < incumbent[0]):
            incumbent = (found[0], combo, found[1])
    order = scored
    if incumbent is not None:
        order = [incumbent[1]] + [c for c in scored if c is not incumbent[1]]
    best, open_bounds, solved, pruned = None, [], 0, 0
    for combo in order:
        limit = best[0] - 1 if best is not None else (incumbent[0] if incumbent else None)
        if limit is not None and combo.lb > limit:
            pruned += 1
            continue
        if time.perf_counter() >= deadline:
            open_bounds.append(combo.lb)
            continue
        starts: list[list] | None = None
        positions = None
        for pp, cheap in _stage_counts(combo):
            limit = best[0] - 1 if best is not None else (incumbent[0] if incumbent else None)
            if limit is not None and cheap > limit:
                pruned += 1
                continue
            if time.perf_counter() >= deadline:
                open_bounds.append(cheap)
                continue
            if positions is None:
                positions = _Positions(combo)
            # One test first: can every stage be short enough for the limit at all? The
            # walk at the one-stage limit (the largest) answers for every stage count.
            # Then the Lagrange floor on the stage sum (one table for the limit).
            later, needs, sums = _total(combo), None, None
            if limit is not None:
                widest = _largest_floor(combo, 1, limit)
                if _largest_floor(combo, pp, limit) < 0 or not positions.fits(widest, pp):
                    pruned += 1
                    continue
                price = widest // 4  # about a stage's time per device at tp 4; one table a limit
                sums = (price, positions.sums(widest, price))
                later = max(later, sums[1][pp][0] - price * combo.s_max)
                if _pp_bound(combo, pp, _spread_floor(combo, pp)) - _total(combo) + later > limit:
                    pruned += 1
                    continue
            # The same start for every stage count, so their bisections share walks.
            above = _spread_floor(combo, combo.s_max)
            if limit is not None and combo.m > 1:
                # The bound is base + (m - 1) floor: above the limit exactly when no stage
                # time up to (limit - base) // (m - 1) fits pp stages, which one walk at the
                # largest such time answers (feasibility is monotone in the limit).
                base = _pp_bound(combo, pp, 0) - _total(combo) + later
                top_value = positions.below((limit - base) // (combo.m - 1))
                if top_value is None or top_value < above or not positions.fits(top_value, pp):
                    pruned += 1
                    continue
            floor = positions.least(pp, above)
            if floor is None:  # pp stages do not fit
                continue
            bound = max(cheap, _pp_bound(combo, pp, floor) - _total(combo) + later)
            if limit is not None and bound > limit:
                pruned += 1
                continue
            if starts is None:
                starts = [[] for _ in range(combo.num_layers)]
                for arc in _arcs(combo, limit):
                    starts[arc[0]].append(arc)
            if limit is not None:
                needs = positions.needs(widest)
            solved += 1
            found = _best_stages(combo, starts, per_node, pp, limit, floor, deadline, needs,
                                 sums)
            if found == "timeout":
                open_bounds.append(bound)
            elif found is not None and (best is None or found[0] < best[0]):
                best = (found[0], combo, found[1])
    if best is None and incumbent is not None:
        best = incumbent
    counts = [0, 0, 0]
    best = _search_interleaved(space, best, open_bounds, deadline, counts)
    solved, pruned = solved + counts[0], pruned + counts[1]
    if best is None:
        if time.perf_counter() >= deadline:
            raise PlanError(f"no training plan found within the {time_limit_s:g} s time limit")
        if not counts[2] and not any(c.v == 1 for c in space.combos):
            raise PlanError(_no_shape_message(pins, cluster, workload))
        raise InfeasiblePlanError(_infeasible_message(space, cluster, workload))
    value, combo, path = best
    bound = min(open_bounds + [value])
    status = "OPTIMAL" if bound >= value else "FEASIBLE"
    stats = SolverStats(status, value * TICK_S, bound * TICK_S, time.perf_counter() - start,
                        objective_ticks=value, gap=(value - bound) / value if value else 0.0,
                        combos_solved=solved, combos_pruned=pruned)
    return evaluate(combo, path, space, workload.objective, stats)


def _interleaved_bound(combo: TrainCombo, pp: int, per_node: int) -> int | None:
    """Valid for every ``pp``-group interleaved plan of the combo, or None when none fits:
    per tp ``t`` the groups could use, the groups' sum is at least the layers' fastest
    sum ``F_t``, the bottleneck at least ``F_t / pp``, the device-seconds over the replica
    and the memory floor (``planner.interleaved.memory_floor``); the tail at least
    ``_tail_floor``; the least over ``t``."""
    from planner.interleaved import memory_floor

    if not all(combo.ticks):
        return None
    v, best = combo.v, None
    for t in combo.tps:
        if pp * t not in combo.sizes or t > per_node:
            continue
        floor = memory_floor(combo, pp, t)
        if floor is None:
            continue
        worst, total = floor
        worst = max(worst, -(-total // pp), -(-_cheapest(combo) // combo.s_max))
        value = -(-((combo.m * v - 1) * worst + total) // v)
        best = value if best is None else min(best, value)
    return None if best is None else best + _tail_floor(combo)


#: How many of the best-bounded interleaved (combo, pp) pairs the even patterns come from.
_HEURISTIC_PAIRS = 64


def _even_pattern(combo: TrainCombo, pp: int, per_node: int):
    """The best pattern with the round split evenly and one (tp, recompute) for every
    group, priced by ``pattern_value``; ``(value, pattern)`` or None."""
    from planner.interleaved import pattern_value

    shortest = tm.shortest_round(combo.num_layers, combo.v)
    starts = [k * shortest // pp for k in range(pp)]
    best = None
    for t in combo.tps:
        if pp * t not in combo.sizes:
            continue
        for rc in combo.rcs:
            value = pattern_value(combo, [(s, t, rc) for s in starts], per_node)
            if value is not None and (best is None or value < best[0]):
                best = (value, [(s, t, rc) for s in starts])
    return best


def _search_interleaved(space: TrainSpace, best, open_bounds: list, deadline: float,
                        counts: list):
    """The interleaved combos after the others: each ``(combo, pp)`` pruned by
    ``_interleaved_bound`` against ``best`` or solved exactly by
    ``planner.interleaved.best_pattern``; returns the new best ``(value, combo, path)``
    (an interleaved path is its pattern). ``counts``: solved, pruned, pairs (added to)."""
    from planner.interleaved import best_pattern, stage_counts

    todo = []
    for combo in (c for c in space.combos if c.v > 1):
        for pp in stage_counts(combo):
            counts[2] += 1
            bound = _interleaved_bound(combo, pp, space.devices_per_node)
            if bound is not None:
                todo.append((bound, pp, combo))
    todo.sort(key=lambda x: x[0])
    # A first incumbent from even patterns (one tp and recompute for every group) of the
    # best-bounded pairs, so that the exact searches after it prune from the start.
    for _bound, pp, combo in todo[:_HEURISTIC_PAIRS]:
        found = _even_pattern(combo, pp, space.devices_per_node)
        if found is not None and (best is None or found[0] < best[0]):
            best = (found[0], combo, found[1])
    for bound, pp, combo in todo:
        limit = best[0] - 1 if best is not None else None
        if limit is not None and bound > limit:
            counts[1] += 1
            continue
        if time.perf_counter() >= deadline:
            open_bounds.append(bound)
            continue
        counts[0] += 1
        found = best_pattern(combo, pp, space.devices_per_node, limit, deadline)
        if found == "timeout":
            open_bounds.append(bound)
        elif found is not None and (best is None or found[0] < best[0]):
            best = (found[0], combo, found[1])
    return best


def _no_shape_message(pins, cluster: Cluster, workload: Workload) -> str:
    pinned = ", ".join(f"{k} {v}" for k, v in sorted((pins or {}).items())) or "none"
    return (f"the pins ({pinned}) leave no plan shape to search on {cluster.num_devices} "
            f"{cluster.device} devices at batch {workload.batch_size}: ZeRO 1-3 needs dp >= 2, "
            "interleaved 1F1B needs pp >= 2 groups, a round of at least pp layers and "
            "microbatches its schedule runs (a multiple of max(1, m // pp)); drop or change a "
            "pin (--zero, --schedule, --virtual-stages, --pp, --dp, --microbatches)")


def _infeasible_message(space: TrainSpace, cluster: Cluster, workload: Workload) -> str:
    return (f"no training plan fits in {space.cap / 2**30:.2f} GiB per device on "
            f"{cluster.num_devices} {cluster.device} devices at batch {workload.batch_size} x "
            f"seq {workload.seq_len} ({workload.dtype}, AdamW): add devices, lower --batch or "
            "--seq, or allow ZeRO-3 and full recompute (drop --zero/--recompute pins)")


def with_stats(sol: TrainSolution, stats: SolverStats) -> TrainSolution:
    return replace(sol, solution=replace(sol.solution, solver=stats))


# --------------------------------------------------------------------------- baselines


def _baseline_specs(cluster: Cluster, batch: int, num_layers: int) -> dict[str, dict]:
    """The hand-written training plans: Megatron-LM's default (tp = devices per node,
    one stage per node, full recompute; ZeRO-1 would shard over dp, which is 1 here, so
    level 0), pure FSDP (ZeRO-3 over every device) and
    DDP (replicas on every device), each 1F1B with the layers split evenly."""
    per_node, devices = cluster.devices_per_node, cluster.num_devices
    dp_all = max(d for d in _divisors(batch) if d <= devices)
    specs = {"ddp": {"dp": dp_all, "tp": 1, "pp": 1, "zero": 0, "recompute": "none"},
             "fsdp": {"dp": dp_all, "tp": 1, "pp": 1, "zero": 3, "recompute": "none"}}
    if cluster.nodes <= num_layers:
        # one replica: ZeRO-1 has no replica to shard over, so it is DDP's level 0
        specs["megatron"] = {"dp": 1, "tp": per_node, "pp": cluster.nodes, "zero": 0,
                             "recompute": "full"}
    return specs


def train_baselines(builder: TrainCostBuilder, cluster: Cluster, workload: Workload):
    """``{name: (TrainSolution or None, reason)}``: each baseline at its best microbatch
    count, priced by ``path_value``/``evaluate`` (the solver's own formulas)."""
    from planner.baselines import even_split

    L = builder.forward(workload.batch_size, 1).num_layers
    out = {}
    for name, spec in _baseline_specs(cluster, workload.batch_size, L).items():
        pins = {"dp": spec["dp"], "tp": spec["tp"], "pp": spec["pp"], "zero": spec["zero"],
                "recompute": spec["recompute"], "schedule": "1f1b"}
        try:
            space = train_space(builder, cluster, workload, pins)
        except PlanError as e:
            out[name] = (None, str(e))
            continue
        path = [(a, b, spec["tp"], spec["recompute"]) for a, b in even_split(L, spec["pp"])]
        best = None
        for combo in space.combos:
            value = path_value(combo, path, space.devices_per_node)
            if value is not None and (best is None or value < best[0]):
                best = (value, combo)
        if best is None:
            out[name] = (None, "does not fit in memory at any microbatch count")
            continue
        stats = SolverStats("BASELINE", best[0] * TICK_S, best[0] * TICK_S, 0.0,
                            objective_ticks=best[0], solver="baseline")
        out[name] = (evaluate(best[1], path, space, workload.objective, stats), "")
    return out


# --------------------------------------------------------------------------- the plan


def to_plan(sol: TrainSolution, table: TrainTable, cluster: Cluster, workload: Workload, *,
            model_name: str, fingerprint: str, baselines=None, extra=None):
    """The plan file of a training solution (docs/plan-format.md, train plans).

    ``layers[].costs`` is the forward table of the plan's microbatch (what the training
    formulas start from); ``stages[i].predicted`` is one microbatch forward + backward
    (+ recompute) of the stage, ``memory_bytes`` at its in-flight count;
    ``predicted.latency_s`` is the step time.
    """
    from planner.plan import BaselineFigures, Plan, Predicted

    plan = Plan.from_solution(sol.solution, table.forward, cluster, workload,
                              model_name=model_name, fingerprint=fingerprint)
    stages = tuple(replace(s, recompute=rc) for s, rc in zip(plan.stages, sol.recompute))
    p = sol.solution.predicted
    figures = {}
    for name, (b, _reason) in (baselines or {}).items():
        figures[name] = BaselineFigures(b.step_s, b.solution.predicted.throughput_samples_per_s,
                                        True) if b is not None else \
            BaselineFigures(None, None, False)
    training = {
        "step_s": sol.step_s,
        "tokens_per_s": sol.tokens_per_s,
        "optimizer": workload.optimizer,
        "dp_link": sol.link,
        "stage_tail_s": list(sol.tail_s),
        "in_flight": list(sol.in_flight),
        "baselines": {name: _describe(b, reason) for name, (b, reason) in
                      (baselines or {}).items()},
    }
    return replace(plan,
                   parallelism=replace(plan.parallelism, zero=sol.zero, schedule=sol.schedule,
                                       pp=len(sol.solution.stages) // sol.virtual_stages,
                                       virtual_stages=sol.virtual_stages),
                   stages=stages,
                   predicted=Predicted(p.latency_s, p.throughput_samples_per_s,
                                       p.peak_memory_bytes, mfu=sol.mfu),
                   baselines=figures,
                   extra={**(extra or {}), "training": training})


def _describe(b: TrainSolution | None, reason: str) -> dict:
    if b is None:
        return {"feasible": False, "reason": reason}
    s = b.solution
    return {"feasible": True, "dp": s.dp, "pp": s.pp, "tp": s.stages[0].tp, "zero": b.zero,
            "recompute": b.recompute[0], "microbatches": s.microbatches, "step_s": b.step_s,
            "mfu": b.mfu, "peak_memory_bytes": s.predicted.peak_memory_bytes}


def alternatives(builder: TrainCostBuilder, cluster: Cluster, workload: Workload,
                 best: TrainSolution, pins: Mapping | None, num_workers: int,
                 time_limit_s: float, restriction: Restriction | None = None,
                 tp_degrees=None) -> list[dict]:
    """What ``plan explain`` says about recompute and ZeRO-3: the best plan with each
    other recompute option on every stage, and with ZeRO-3 if the plan has another level
    (or the best level below 3 if it has ZeRO-3), each with its step time and peak memory,
    or why it does not fit."""
    out = []
    variants = [("recompute", rc) for rc in tm.RECOMPUTE if set(best.recompute) != {rc}]
    variants.append(("zero", 3) if best.zero != 3 else ("zero", None))
    for key, value in variants:
        trial = dict(pins or {})
        if key == "zero" and value is None:  # the best level below 3
            results = []
            for z in (0, 1, 2):
                if best.solution.dp == 1 and z > 0:
                    continue
                trial["zero"] = z
                results.append(_try(builder, cluster, workload, trial, num_workers,
                                     time_limit_s, restriction, tp_degrees))
            ok = [r for r in results if r.get("feasible")]
            out.append({"change": "zero < 3", **(min(ok, key=lambda r: r["step_s"]) if ok
                                                 else results[-1])})
            continue
        trial[key] = value
        out.append({"change": f"{key} {value}",
                    **_try(builder, cluster, workload, trial, num_workers, time_limit_s,
                           restriction, tp_degrees)})
    return out


def _try(builder, cluster, workload, pins, num_workers, time_limit_s, restriction=None,
         tp_degrees=None) -> dict:
    try:
        s = solve_train(builder, cluster, workload, pins=pins, num_workers=num_workers,
                        time_limit_s=time_limit_s, restriction=restriction,
                        tp_degrees=tp_degrees)
    except PlanError as e:
        return {"feasible": False, "reason": str(e).split(":")[0]}
    sol, v = s.solution, s.virtual_stages
    groups = sol.stages[:sol.pp // v]
    return {"feasible": True, "step_s": s.step_s, "mfu": s.mfu, "zero": s.zero,
            "recompute": list(s.recompute[:len(groups)]), "dp": sol.dp, "pp": len(groups),
            "virtual_stages": v, "schedule": s.schedule,
            "tp": [st.tp for st in groups], "microbatches": sol.microbatches,
            "peak_memory_bytes": sol.predicted.peak_memory_bytes,
            "status": sol.solver.status}


def plan_train(traced, cluster: Cluster, workload: Workload, forward_builder, *,
               pins=None, solver: str = "cp-sat", num_workers: int = 2,
               time_limit_s: float = 60.0, name: str | None = None, extra=None,
               explain: bool = True, restriction: Restriction | None = None,
               tp_degrees=None):
    """A training plan for ``traced`` (``planner.api.plan_traced`` with ``phase "train"``).

    Args:
        forward_builder: the ``CostBuilder`` of the forward (``phase "prefill"``).
        pins: any of dp, pp, tp, microbatches, zero, schedule, virtual_stages, recompute.
        solver: ``cp-sat`` or ``reference`` (the exact dynamic programme).
        explain: also solve the recompute / ZeRO-3 alternatives for ``plan explain``.
        restriction, tp_degrees: only plans a training framework runs (``--target``).
    """
    from planner.reference_solver import solve_train_reference

    builder = TrainCostBuilder(forward_builder, workload)
    if solver == "reference":
        sol = solve_train_reference(builder, cluster, workload, pins=pins,
                                    restriction=restriction, tp_degrees=tp_degrees)
    else:
        sol = solve_train(builder, cluster, workload, pins=pins, num_workers=num_workers,
                          time_limit_s=time_limit_s, restriction=restriction,
                          tp_degrees=tp_degrees)
    table = builder(sol.solution.microbatch_size, sol.solution.dp, sol.zero, sol.link)
    baselines = train_baselines(builder, cluster, workload)
    more = dict(extra or {})
    if explain:
        more["training_alternatives"] = alternatives(
            builder, cluster, workload, sol, pins, num_workers, max(time_limit_s / 4, 1.0),
            restriction, tp_degrees)
    return to_plan(sol, table, cluster, workload, model_name=name or traced.name,
                   fingerprint=traced.fingerprint, baselines=baselines, extra=more)
