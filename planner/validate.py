"""An independent check of a plan against its cost table: the tests' second oracle.

It shares no code with the solvers: constraints are re-derived from the device ids in
the plan (not from the placement rule), and the objective is recomputed in floating point
from the table (not from the solvers' integer ticks).

>>> check_plan(solution, table, cluster, workload)   # doctest: +SKIP
[]
"""

from __future__ import annotations

import math
from collections.abc import Callable

from planner.cluster import Cluster, Workload
from planner.cost_table import CostTable

__all__ = ["check_plan"]

_REL = 1e-9  # figures are recomputed in floats; differences come only from rounding


def _stages(plan) -> list[tuple[int, int, int, list[list[int]], object]]:
    """(first, last, tp, devices, stage) from a Solution's or a Plan's stages."""
    out = []
    for s in plan.stages:
        first, last = s.layers
        out.append((first, last, s.tp, [list(r) for r in s.devices], s))
    return out


def _pipeline_problems(pred, times: list[float], hops: list[float], m: int, batch: int,
                       peak: int) -> list[str]:
    """The plan's predicted latency, throughput and peak memory against the flow-shop
    recomputation from its stage times and hops (``m`` microbatches of a ``batch``)."""
    problems = []
    every = times + hops
    latency = math.fsum(every) + (m - 1) * max(every)
    period = max(m * max(every), math.fsum(every))
    if not _close(pred.latency_s, latency):
        problems.append(f"predicted latency {pred.latency_s} s != {latency} s recomputed")
    if not _close(pred.throughput_samples_per_s, batch / period):
        problems.append(f"predicted throughput {pred.throughput_samples_per_s} != "
                        f"{batch / period}")
    if pred.peak_memory_bytes != peak:
        problems.append(f"predicted peak memory {pred.peak_memory_bytes} != {peak}")
    return problems


def _stage_figures(stage, i: int, table, first: int, last: int, tp: int, cap: int,
                   capacity_note: str, source: str, problems: list[str]) -> tuple[float, float, int]:
    """Stage ``i``'s compute, comm and memory per device as ``table`` prices layers
    ``first..last`` at ``tp``; appends to ``problems`` where the memory exceeds ``cap`` or
    the plan's recorded figures differ from the table's (``source`` names it)."""
    compute = math.fsum(table.costs[j][tp].compute_s for j in range(first, last + 1))
    comm = math.fsum(table.costs[j][tp].comm_s for j in range(first, last + 1))
    memory = table.stage_memory_bytes(first, last, tp)
    if memory > cap:
        problems.append(f"stage {i}: {memory} bytes per device > capacity {cap} {capacity_note}")
    for name, value in (("compute_s", compute), ("comm_s", comm)):
        if not _close(_stage_figure(stage, name), value):
            problems.append(f"stage {i}: predicted {name} {_stage_figure(stage, name)} "
                            f"!= {value} from {source}")
    if _stage_figure(stage, "memory_bytes") != memory:
        problems.append(f"stage {i}: predicted memory {_stage_figure(stage, 'memory_bytes')} "
                        f"!= {memory} from {source}")
    return compute, comm, memory


def _stage_figure(stage, name: str):
    pred = getattr(stage, "predicted", None)
    return getattr(pred, name) if pred is not None else getattr(stage, name)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_REL, abs_tol=1e-15)


def check_plan(
    plan,
    table: CostTable | Callable[[int, int], CostTable],
    cluster: Cluster,
    workload: Workload,
) -> list[str]:
    """Every constraint the plan breaks, as sentences; empty when it is valid.

    Args:
        plan: a ``planner.solver.Solution`` or a ``planner.plan.Plan``.
        table: the cost table of the plan's microbatch size, or the builder; for a
            ``MixedCluster``, one per group (tables or builders), in the cluster's order.
        cluster: the cluster the plan is for (a ``Cluster`` or a ``MixedCluster``).
        workload: batch size, memory headroom.
    """
    if getattr(cluster, "is_mixed", False) is True:
        return _check_mixed(plan, table, cluster, workload)
    problems: list[str] = []
    par = getattr(plan, "parallelism", plan)
    dp, m = par.dp, par.microbatches
    batch, per_node = workload.batch_size, cluster.devices_per_node
    if dp < 1 or batch % dp:
        return [f"dp {dp} does not divide batch size {batch}"]
    if m < 1 or (batch // dp) % m:
        return [f"microbatches {m} does not divide the {batch // dp} samples of a replica"]
    mbs = batch // (dp * m)
    if callable(table) and not isinstance(table, CostTable):
        table = table(mbs, m)
    if table.microbatch_size != mbs or table.microbatches != m:
        problems.append(f"table is for microbatch size {table.microbatch_size} x "
                        f"{table.microbatches}, plan needs {mbs} x {m}")
    L = table.num_layers
    stages = _stages(plan)
    if not stages:
        return problems + ["plan has no stages"]
    expected_first = 0
    for i, (first, last, _tp, _dev, _s) in enumerate(stages):
        if first != expected_first or last < first:
            problems.append(f"stage {i} covers layers [{first}, {last}], expected to start "
                            f"at {expected_first}")
        expected_first = last + 1
    if expected_first != L:
        problems.append(f"stages end at layer {expected_first - 1}, the model has {L} layers")
    if problems:
        return problems

    cap = int(cluster.device_spec.memory_bytes * (1.0 - workload.memory_headroom))
    seen: set[int] = set()
    times, nodes_of = [], []
    peak = 0
    for i, (first, last, tp, devices, stage) in enumerate(stages):
        if per_node % tp:
            problems.append(f"stage {i}: tp {tp} does not divide {per_node} devices per node")
        missing = [j for j in range(first, last + 1) if tp not in table.costs[j]]
        if missing:
            problems.append(f"stage {i}: layers {missing} do not allow tp {tp}")
            continue
        if len(devices) != dp:
            problems.append(f"stage {i}: {len(devices)} replicas listed, dp is {dp}")
        stage_nodes = []
        for r, group in enumerate(devices):
            if len(group) != tp:
                problems.append(f"stage {i} replica {r}: {len(group)} devices for tp {tp}")
            for d in group:
                if not 0 <= d < cluster.num_devices:
                    problems.append(f"stage {i}: device {d} is not in 0..{cluster.num_devices - 1}")
                if d in seen:
                    problems.append(f"device {d} is used twice")
                seen.add(d)
            group_nodes = {d // per_node for d in group}
            if len(group_nodes) > 1:
                problems.append(f"stage {i} replica {r}: TP group spans nodes {sorted(group_nodes)}")
            stage_nodes.append(min(group_nodes) if group_nodes else -1)
        nodes_of.append(stage_nodes)
        compute, comm, memory = _stage_figures(stage, i, table, first, last, tp, cap,
                                               "(memory x (1 - headroom))", "the table",
                                               problems)
        times.append(compute + comm)
        peak = max(peak, memory)
    if problems:
        return problems

    hops = []
    for i in range(len(stages) - 1):
        last = stages[i][1]
        inter = any(a != b for a, b in zip(nodes_of[i], nodes_of[i + 1]))
        link = table.inter_node if inter else table.intra_node
        hops.append(link.latency_s + table.boundary_bytes[last] / link.bandwidth_bytes_per_s)
    return problems + _pipeline_problems(plan.predicted, times, hops, m, batch, peak)


def _check_mixed(plan, tables, cluster, workload: Workload) -> list[str]:
    """``check_plan`` on a mixed cluster: each stage's group is the one holding its device
    ids, its memory within that group's device capacity, its figures from that group's
    table; a cut inside a group on that group's links, between groups on the slower side
    (the larger latency, the smaller bandwidth)."""
    par = getattr(plan, "parallelism", plan)
    dp, m, batch = par.dp, par.microbatches, workload.batch_size
    if dp < 1 or batch % dp or m < 1 or (batch // dp) % m:
        return [f"dp {dp} x microbatches {m} does not divide batch size {batch}"]
    mbs = batch // (dp * m)
    tables = [t(mbs, m) if callable(t) and not isinstance(t, CostTable) else t for t in tables]
    if len(tables) != len(cluster.groups):
        return [f"{len(tables)} tables for {len(cluster.groups)} groups"]
    starts, problems, seen = [], [], set()
    at = 0
    for g in cluster.groups:
        starts.append(at)
        at += g.num_devices
    stages = _stages(plan)
    expected_first = 0
    for i, (first, last, *_rest) in enumerate(stages):
        if first != expected_first or last < first:
            problems.append(f"stage {i} covers layers [{first}, {last}], expected to start "
                            f"at {expected_first}")
        expected_first = last + 1
    if not stages or expected_first != tables[0].num_layers:
        problems.append(f"stages end at layer {expected_first - 1}, the model has "
                        f"{tables[0].num_layers} layers")
    if problems:
        return problems
    times, places, peak = [], [], 0
    for i, (first, last, tp, devices, stage) in enumerate(stages):
        groups = {next(k for k in range(len(starts) - 1, -1, -1) if d >= starts[k])
                  for r in devices for d in r if 0 <= d < cluster.num_devices}
        if len(groups) != 1 or any(not 0 <= d < cluster.num_devices for r in devices for d in r):
            problems.append(f"stage {i}: devices in groups {sorted(groups)} (or outside "
                            f"0..{cluster.num_devices - 1}); a stage runs in one group")
            continue
        g = groups.pop()
        group, table = cluster.groups[g], tables[g]
        if getattr(stage, "group", g) != g:
            problems.append(f"stage {i}: recorded group {stage.group}, its devices are in {g}")
        per_node = group.devices_per_node
        if len(devices) != dp or any(len(r) != tp for r in devices):
            problems.append(f"stage {i}: expected {dp} replicas of {tp} devices")
        nodes = []
        for r in devices:
            for d in r:
                if d in seen:
                    problems.append(f"device {d} is used twice")
                seen.add(d)
            local = {(d - starts[g]) // per_node for d in r}
            if len(local) > 1:
                problems.append(f"stage {i}: TP group {list(r)} spans nodes {sorted(local)} "
                                f"of group {g}")
            nodes.append(min(local))
        if any(tp not in table.costs[j] for j in range(first, last + 1)):
            problems.append(f"stage {i}: some of layers {first}..{last} do not allow tp {tp} "
                            f"on group {g}")
            continue
        cap = int(group.device_spec.memory_bytes * (1.0 - workload.memory_headroom))
        compute, comm, memory = _stage_figures(stage, i, table, first, last, tp, cap,
                                               f"of group {g} ({group.device})",
                                               f"group {g}'s table", problems)
        times.append(compute + comm)
        places.append((g, nodes))
        peak = max(peak, memory)
    if problems:
        return problems
    hops = []
    for i in range(len(stages) - 1):
        (ga, na), (gb, nb) = places[i], places[i + 1]
        a, b = tables[ga], tables[gb]
        if ga == gb:
            link = a.inter_node if na != nb else a.intra_node
            latency, bandwidth = link.latency_s, link.bandwidth_bytes_per_s
        else:
            latency = max(a.inter_node.latency_s, b.inter_node.latency_s)
            bandwidth = min(a.inter_node.bandwidth_bytes_per_s, b.inter_node.bandwidth_bytes_per_s)
        hops.append(latency + a.boundary_bytes[stages[i][1]] / bandwidth)
    return problems + _pipeline_problems(plan.predicted, times, hops, m, batch, peak)
