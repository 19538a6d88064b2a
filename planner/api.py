"""The Python API: ``planner.plan`` (trace → cost table → solve → Plan).

>>> import planner
>>> from planner.models import load_model
>>> lm = load_model("gpt-tiny", batch_size=4, seq_len=64, device="meta")
>>> p = planner.plan(lm.model, planner.Cluster.parse("8xH100"),
...                  planner.Workload(batch_size=4, seq_len=64), kwargs=lm.kwargs, args=lm.args)
>>> p.solver.status
'OPTIMAL'
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch.nn as nn

from cost_models.runtime import prefill_runtime
from planner.baselines import baselines as compute_baselines
from planner.cluster import DEFAULT_CLUSTER, Cluster, MixedCluster, SpecError, Workload
from planner.cost_builder import CostBuilder
from planner.cost_table import CostTable
from planner.plan import Plan
from planner.reference_solver import solve_reference
from planner.solver import (
    InfeasiblePlanError,
    PlanError,
    Prediction,
    Solution,
    Stage,
    best_per_family,
    predict,
    solve,
)
from planner.tracing import TracedModel, trace

__all__ = ["plan", "plan_traced", "check_request", "default_workload", "prefill_prediction",
           "with_prefill", "decode_step_for", "DecodeUnavailable", "SOLVERS"]

SOLVERS = ("cp-sat", "reference")


def plan(
    model_or_traced: nn.Module | TracedModel,
    cluster: Cluster | str | None = None,
    workload: Workload | None = None,
    *,
    args: tuple = (),
    kwargs: dict | None = None,
    pins: dict[str, int] | None = None,
    solver: str = "cp-sat",
    profile: Any = None,
    alternatives: int = 6,
    time_limit_s: float = 60.0,
    num_workers: int = 2,
    name: str | None = None,
    sequence_parallel: bool | None = None,
) -> Plan:
    """Plan ``model_or_traced`` on ``cluster`` for ``workload``.

    Args:
        model_or_traced: a module (traced here with ``args``/``kwargs``, which should have the
            workload's batch and sequence shape) or a ``TracedModel``.
        cluster: a ``Cluster`` or a spec string (``"2x8xH100"``); ``None`` means
            ``DEFAULT_CLUSTER`` (``"8xH100"``), as for the CLI.
        workload: batch, sequence, dtype, phase, objective, headroom. ``None`` means a
            prefill of the traced shape (its batch and sequence length), in float32 on cpu
            clusters and bfloat16 otherwise, as for the CLI. Its batch (and, for
            transformers, its sequence length) must be the traced inputs' shape.
        pins: fixed dimensions, any of ``dp``, ``pp``, ``tp``, ``microbatches``.
        solver: ``"cp-sat"`` (default) or ``"reference"`` (the exact DP oracle).
        profile: a ``cost_models.profiler.ModelProfile`` measured on this device, to use
            measured layer times where the workload runs the traced shapes.
        alternatives: how many other (dp, pp, tp) families to solve for ``plan explain``.
        time_limit_s: CP-SAT wall-clock budget.
        num_workers: CP-SAT search workers.
        name: model name recorded in the plan.
        sequence_parallel: ``None`` (default) searches with and without it; a bool forces it.

    Raises:
        planner.SpecError: a cluster, workload or option that cannot be used (wrong type,
            out of range, a workload whose batch or sequence differs from the traced shape).
        planner.solver.PlanError: contradictory pins (message lists every factor).
        planner.solver.InfeasiblePlanError: nothing fits; the message says what would.
    """
    cluster = Cluster.parse(DEFAULT_CLUSTER if cluster is None else cluster)
    _refuse_mixed(cluster, workload)
    if isinstance(model_or_traced, TracedModel):
        traced = model_or_traced
    elif isinstance(model_or_traced, nn.Module):
        if not args and not kwargs:
            raise SpecError("planner.plan needs example inputs to trace the module: pass "
                            "args=(example_input,) and/or kwargs={...} with the workload's "
                            "batch and sequence shape, or a planner.trace(...) result")
        traced = trace(model_or_traced, args, kwargs, name=name)
    else:
        raise SpecError(f"planner.plan plans an nn.Module (with args/kwargs) or a TracedModel "
                        f"from planner.trace, not {type(model_or_traced).__name__}")
    if workload is None:
        workload = default_workload(traced, cluster)
    decode_traced = None
    if isinstance(workload, Workload) and workload.phase == "decode" \
            and isinstance(model_or_traced, nn.Module):  # plan_traced checks a bad workload
        decode_traced = decode_step_for(model_or_traced, traced, workload, cluster)
    return plan_traced(traced, cluster, workload, pins=pins, solver=solver, profile=profile,
                       alternatives=alternatives, time_limit_s=time_limit_s,
                       num_workers=num_workers, name=name, sequence_parallel=sequence_parallel,
                       decode_traced=decode_traced)


# Where the decode step's graph prices a decode plan: the devices on which ``plan run``
# generates with that graph eagerly. The graph writes the KV cache functionally (a copy of
# the whole cache per step) and HF's attention repeats grouped KV heads (another copy);
# that is what the eager runtime here pays, but not what a CUDA runtime that updates its
# cache in place and captures the step (issue 12 part 6, issue 13's runtime modes) would,
# so GPU decode plans keep the prefill-shaped layers scaled to one token until one exists.
DECODE_GRAPH_DEVICES = ("cpu",)
_NOT_ON_GPU = ("the decode step's graph prices the eager runtime that plan run uses on cpu; "
               "on GPUs, decode is priced for a runtime that writes the KV cache in place")


def decode_step_for(model: nn.Module, traced: TracedModel, workload: Workload,
                    cluster: Cluster):
    """The decode step a decode plan of ``model`` on ``cluster`` is priced from
    (``planner.decode.trace_decode_step`` at the traced batch and the workload's KV
    context), or ``DecodeUnavailable`` with the reason: the model has no cache path, or
    the cluster's device is not one of ``DECODE_GRAPH_DEVICES`` (nothing is traced)."""
    from planner.decode import trace_decode_step

    if any(g.device not in DECODE_GRAPH_DEVICES for g in cluster.groups):
        return DecodeUnavailable(_NOT_ON_GPU)
    step, why = trace_decode_step(model, traced.batch_size, workload.kv_context_len,
                                  name=traced.name)
    return step if step is not None else DecodeUnavailable(why)


@dataclass(frozen=True)
class DecodeUnavailable:
    """Why a decode plan is priced from the prefill-shaped layers (``plan_traced``'s
    ``decode_traced``): the model's decode step could not be built or traced."""

    reason: str


def plan_traced(traced: TracedModel, cluster: Cluster, workload: Workload, *, pins=None,
                solver="cp-sat", profile=None, alternatives=6, time_limit_s=60.0, num_workers=2,
                name=None, source: dict | None = None,
                adjust_costs: Callable[[CostTable], CostTable] | None = None,
                sequence_parallel: bool | None = None, decode_traced=None,
                target: str | None = None) -> Plan:
    """``plan`` for an already traced model.

    ``target`` (``vllm``, ``sglang``, ``tensorrt-llm``) searches only the plans that engine
    can express (``planner.engines.restriction``: one tp for every stage, the tp degrees its
    head split allows, sequence parallelism only where it has it, its own layer split where
    it has no option for another), proven optimal within them.

    ``sequence_parallel``: ``None`` solves with and without it (where it applies: prefill of a
    transformer whose sequence every TP degree divides) and keeps the better plan; ``True`` /
    ``False`` force it. Baselines are always priced without it.

    ``source`` records how to rebuild the model (the CLI's MODEL and ``--set``);
    ``adjust_costs`` transforms every cost table before the solver sees it (what-if
    analysis; the plan-quality tests use it to perturb the cost model).

    A decode plan also gets its time to first token (``predicted.ttft_s``,
    ``stages[i].prefill_s``): the prefill of the traced prompt priced on the plan's own
    stages by ``prefill_prediction``.

    ``decode_traced``: for a decode workload, the model's one-token step
    (``decode_step_for``), whose ops price every layer's compute on the devices of
    ``DECODE_GRAPH_DEVICES``; a ``DecodeUnavailable``, ``None`` or another device prices
    the prefill-shaped layers scaled to one token instead. The plan says which in
    ``extra["decode_pricing"]``.
    """
    check_request(traced, cluster, workload, pins=pins, solver=solver,
                  alternatives=alternatives, time_limit_s=time_limit_s, num_workers=num_workers)
    workload = workload.with_runtime(cluster)  # the runtime the plan records and is priced for
    if cluster.is_mixed:
        return _plan_mixed(traced, cluster, workload, pins=pins, solver=solver, profile=profile,
                           alternatives=alternatives, time_limit_s=time_limit_s,
                           num_workers=num_workers, name=name, source=source,
                           adjust_costs=adjust_costs, sequence_parallel=sequence_parallel,
                           decode_traced=decode_traced, target=target)

    if workload.phase == "train":
        return _plan_train(traced, cluster, workload, pins=pins, solver=solver,
                           profile=profile, alternatives=alternatives,
                           time_limit_s=time_limit_s, num_workers=num_workers, name=name,
                           source=source, sequence_parallel=sequence_parallel, target=target,
                           adjust_costs=adjust_costs)
    if isinstance(decode_traced, TracedModel) and cluster.device not in DECODE_GRAPH_DEVICES:
        decode_traced = DecodeUnavailable(_NOT_ON_GPU)
    step = decode_traced if isinstance(decode_traced, TracedModel) else None

    def make_builder(w: Workload, sp: bool, strategies=None):
        if isinstance(strategies, _AdjustedBuilder):
            strategies = strategies.inner
        b = CostBuilder(traced, cluster, w, sequence_parallel=sp, profile=profile,
                        strategies=strategies, decode_traced=step)
        return _AdjustedBuilder(b, adjust_costs) if adjust_costs is not None else b

    if target is not None and solver == "reference":
        raise PlanError("--target searches with the cp-sat solver; drop --solver reference")
    options, restriction, tp_degrees = _search_options(traced, cluster, workload,
                                                       sequence_parallel, target)
    best, failure = None, None
    for sp in options:
        builder = make_builder(workload, sp)
        try:
            if solver == "reference":
                solution = solve_reference(builder, cluster, workload, pins=pins)
            else:
                solution = solve(builder, cluster, workload, pins=pins, num_workers=num_workers,
                                 time_limit_s=time_limit_s,
                                 rebuild=lambda w, sp=sp: make_builder(w, sp),
                                 tp_degrees=tp_degrees, restriction=restriction)
        except InfeasiblePlanError as e:
            failure = failure or e
            continue
        if best is None or solution.solver.objective < best[1].solver.objective:
            best = (builder, solution)
    if best is None:
        raise failure
    builder, solution = best
    baseline_builder = builder if not solution.sequence_parallel else make_builder(workload, False)
    table = builder(solution.microbatch_size, solution.microbatches)
    result = Plan.from_solution(
        solution, table, cluster, workload, model_name=name or traced.name,
        fingerprint=traced.fingerprint,
        baselines=compute_baselines(baseline_builder, cluster, workload),
    )
    sources = builder.sources(solution.microbatch_size, solution.microbatches)
    result = replace(result, layers=tuple(replace(layer, source=src)
                                          for layer, src in zip(result.layers, sources)))
    if workload.phase == "decode":
        prefill = make_builder(replace(workload, phase="prefill",
                                       runtime=prefill_runtime(workload.runtime)),
                               solution.sequence_parallel,
                               strategies=builder)
        result = with_prefill(result, prefill_prediction(prefill, solution, workload.batch_size,
                                                         cluster.devices_per_node))
    kinds = set(sources)
    provenance = "measured" if kinds == {"measured"} else "mixed" if "measured" in kinds else "predicted"
    extra = {
        "alternatives": _alternatives(builder, cluster, workload, solution, alternatives,
                                      num_workers) if alternatives else [],
        "source": source or {},
        "workload_full": workload.to_dict(),
        "arch": traced.arch.to_dict() if traced.arch else None,
        "tp_excluded": {str(t): why for t, why in sorted(builder.excluded_tp.items())},
    }
    if workload.phase == "decode":
        extra["decode_pricing"] = _decode_pricing(decode_traced)
    return replace(result, provenance=provenance, extra=extra)


def _plan_train(traced, cluster, workload, *, pins, solver, profile, alternatives,
                time_limit_s, num_workers, name, source, sequence_parallel, target,
                adjust_costs=None) -> Plan:
    """A training plan (``planner.training``): the forward is priced by ``CostBuilder`` with
    ``phase "prefill"`` (a profile's measured forwards where the microbatch runs a layer
    at the profiled shape), the step by ``cost_models.training`` (a profile's measured
    forward + backward, ``LayerProfile.train``, in place of the roofline's 3x forward where
    it has one). Sequence parallelism is searched like prefill."""
    from planner.training import plan_train

    forward = replace(workload, phase="prefill")
    options, restriction, tp_degrees = _search_options(traced, cluster, forward,
                                                       sequence_parallel, target)
    best, failure = None, None
    extra = {"source": source or {}, "workload_full": workload.to_dict(),
             "arch": traced.arch.to_dict() if traced.arch else None}
    for sp in options:
        builder = CostBuilder(traced, cluster, forward, sequence_parallel=sp, profile=profile)
        if adjust_costs is not None:  # what-if: every forward table adjusted (plan bench)
            builder = _AdjustedBuilder(builder, adjust_costs)
        try:
            plan = plan_train(traced, cluster, workload, builder, pins=pins, solver=solver,
                              num_workers=num_workers, time_limit_s=time_limit_s, name=name,
                              extra={**extra, "tp_excluded": {
                                  str(t): why for t, why in sorted(builder.excluded_tp.items())}},
                              explain=bool(alternatives), restriction=restriction,
                              tp_degrees=tp_degrees)
        except InfeasiblePlanError as e:
            failure = failure or e
            continue
        if profile is not None:
            plan = _with_train_sources(plan, builder, profile)
        if best is None or plan.predicted.latency_s < best.predicted.latency_s:
            best = plan
    if best is None:
        raise failure
    return best


def _with_train_sources(plan: Plan, builder, profile) -> Plan:
    """``layers[].source`` and ``provenance`` of a train plan priced with a profile: a layer
    is ``measured`` when its forward + backward at the plan's microbatch is the profile's."""
    par = plan.parallelism
    mb = plan.workload.batch_size // (par.dp * par.microbatches)
    sources = ["measured" if src == "measured" and measured.train is not None else "predicted"
               for src, measured in zip(builder.sources(mb, 1), profile.layers, strict=True)]
    kinds = set(sources)
    provenance = "measured" if kinds == {"measured"} else "mixed" if "measured" in kinds \
        else "predicted"
    return replace(plan, provenance=provenance,
                   layers=tuple(replace(layer, source=src)
                                for layer, src in zip(plan.layers, sources, strict=True)))


def _decode_pricing(decode_traced) -> str:
    if isinstance(decode_traced, TracedModel):
        return "decode step graph (planner.decode.DecodeStep at one token)"
    why = decode_traced.reason if isinstance(decode_traced, DecodeUnavailable) else \
        "no decode step given"
    return f"prefill-shaped layers scaled to one token ({why})"


def prefill_prediction(prefill_builder, solution: Solution, batch_size: int,
                       devices_per_node: int) -> tuple[tuple[Stage, ...], Prediction, CostTable]:
    """Price the prefill of a decode solution's prompt on the solution's own placement.

    The stages (layer ranges, tp per stage), dp, microbatch size and count are the
    solution's; the table is ``prefill_builder``'s at that microbatch size and count, and
    the pricing is the solver's own for a fixed path (``planner.solver.predict``): stage
    ``s`` takes ``t'_s`` (compute + TP collectives of one prefill microbatch), the cut after
    it ``c'_s`` (its boundary tensors over the link the placement crosses), and
    ``latency_s`` is the pipeline fill of ``m`` microbatches,
    ``sum(t') + sum(c') + (m - 1) * max(t' + c')`` (the max over stages and transfers, as
    for a prefill plan's ``latency_s``).

    Args:
        prefill_builder: a cost builder for the workload with ``phase="prefill"``, built
            with ``strategies=`` the decode builder so it prices the recorded strategy.
        solution: the decode plan's ``Solution``.
        batch_size: the global batch.
        devices_per_node: node size (the placement and which cuts cross nodes).

    Returns:
        ``(stages, prediction, table)``: ``predict``'s stages and ``Prediction`` on the
        prefill table, and that table.
    """
    table = prefill_builder(solution.microbatch_size, solution.microbatches)
    path = [(st.first, st.last, st.tp) for st in solution.stages]
    stages, prediction = predict(table, path, solution.dp, batch_size, devices_per_node)
    return stages, prediction, table


def with_prefill(plan: Plan, prefill: tuple[tuple[Stage, ...], Prediction, CostTable]) -> Plan:
    """``plan`` with its time to first token from ``prefill_prediction``'s result:
    ``predicted.ttft_s`` (the prefill's latency) and per stage ``prefill_s`` (its
    ``t'_s``) and ``prefill_boundary_bytes`` (what it sends per microbatch; 0 for the last).
    """
    stages, prediction, table = prefill
    last = len(plan.stages) - 1
    return replace(
        plan,
        predicted=replace(plan.predicted, ttft_s=prediction.latency_s),
        stages=tuple(replace(s, prefill_s=p.compute_s + p.comm_s,
                             prefill_boundary_bytes=(table.boundary_bytes[p.last]
                                                     if i < last else 0))
                     for i, (s, p) in enumerate(zip(plan.stages, stages, strict=True))),
    )


def default_workload(traced: TracedModel, cluster: Cluster) -> Workload:
    """A prefill of the traced shape, float32 on cpu clusters and bfloat16 otherwise."""
    return Workload(batch_size=traced.batch_size, seq_len=traced.seq_len,
                    dtype="float32" if cluster.groups[0].device == "cpu" else "bfloat16")


def check_request(traced: TracedModel, cluster: Cluster, workload: Workload, *, pins=None,
                  solver: str = "cp-sat", alternatives: int = 0, time_limit_s: float = 60.0,
                  num_workers: int = 2) -> None:
    """Refuse, before any solving, a request that cannot be planned as asked.

    The cost tables scale the traced layers to each microbatch, but the plan's fingerprint
    (what ``plan run`` and ``parallelize`` check) is the traced shape: a workload whose batch
    (or a transformer's sequence length) differs from the traced inputs would plan a model
    that is not the one traced, so it is an error, not a silent re-interpretation.

    Raises:
        SpecError: naming the argument and what to pass instead.
    """
    if not isinstance(traced, TracedModel):
        raise SpecError(f"expected a TracedModel (from planner.trace), got {type(traced).__name__}")
    _refuse_mixed(cluster, workload)
    if not isinstance(cluster, (Cluster, MixedCluster)):
        raise SpecError(f"cluster must be a planner.Cluster (or a spec string for planner.plan), "
                        f"got {type(cluster).__name__}")
    if not isinstance(workload, Workload):
        raise SpecError(f"workload must be a planner.Workload, got {type(workload).__name__} "
                        f"{workload!r}; e.g. planner.Workload(batch_size=8, seq_len=2048)")
    problems = []
    if solver not in SOLVERS:
        problems.append(f"solver must be one of {', '.join(SOLVERS)}, not {solver!r}")
    if not isinstance(alternatives, int) or isinstance(alternatives, bool) or alternatives < 0:
        problems.append(f"alternatives must be a whole number >= 0, got {alternatives!r}")
    if not isinstance(time_limit_s, (int, float)) or isinstance(time_limit_s, bool) \
            or not time_limit_s > 0 or time_limit_s != time_limit_s:
        problems.append(f"the solver time limit must be > 0 seconds, got {time_limit_s!r}")
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
        problems.append(f"num_workers must be a whole number >= 1, got {num_workers!r}")
    if pins is not None and not isinstance(pins, Mapping):
        problems.append(f"pins must be a dict such as {{'tp': 4}}, got {type(pins).__name__}")
    if workload.batch_size != traced.batch_size:
        problems.append(
            f"the model was traced with batch {traced.batch_size} (inputs "
            f"{traced.input_shapes}) but the workload asks for batch {workload.batch_size}; "
            f"trace it with example inputs of batch {workload.batch_size}, or plan "
            f"Workload(batch_size={traced.batch_size}, ...)")
    if traced.arch is not None and traced.arch.is_transformer and traced.seq_len > 1 \
            and workload.seq_len != traced.seq_len:
        problems.append(
            f"the model was traced with sequence length {traced.seq_len} (inputs "
            f"{traced.input_shapes}) but the workload asks for seq_len {workload.seq_len}; "
            f"trace it at sequence length {workload.seq_len}, or plan "
            f"Workload(seq_len={traced.seq_len}, ...)")
    if problems:
        raise SpecError("cannot plan this request: " + "; ".join(problems))


def _refuse_mixed(cluster, workload) -> None:
    """Training on a mixed cluster is refused with what to do
    (``planner.hetero.mixed_request_error``); inference is planned (``_plan_mixed``)."""
    if getattr(cluster, "is_mixed", False) is True:
        from planner.hetero import mixed_request_error

        why = mixed_request_error(cluster, getattr(workload, "phase", "prefill"))
        if why is not None:
            raise SpecError(why)


def alone_name(group: Cluster) -> str:
    """The baseline name of the best plan on one group of a mixed cluster alone."""
    return f"alone:{group.spec_string}"


def _plan_mixed(traced, cluster, workload, *, pins, solver, profile, alternatives,
                time_limit_s, num_workers, name, source, adjust_costs, sequence_parallel,
                decode_traced, target) -> Plan:
    """An inference plan on a mixed cluster (``planner.hetero``): one ``CostBuilder`` per
    group (its device, memory and links), the mixed search, each group's table recorded in
    ``cluster.groups``, and as baselines the best plan of each group alone
    (``alone:<group>``, the homogeneous search on that group; the mixed plan is never
    slower). ``plan explain``'s alternatives are those one-group plans."""
    from planner.hetero import best_subsets, predict_mixed, solve_mixed, solve_mixed_reference

    if target is not None:
        raise PlanError(f"--target {target} lays a plan out on one device type; engines take "
                        f"no mixed cluster ({cluster.spec_string}): drop --target, or plan "
                        f"for one group (e.g. --cluster {cluster.groups[0].spec_string})")
    on_graph = all(g.device in DECODE_GRAPH_DEVICES for g in cluster.groups)
    if isinstance(decode_traced, TracedModel) and not on_graph:
        decode_traced = DecodeUnavailable(_NOT_ON_GPU)
    step = decode_traced if isinstance(decode_traced, TracedModel) else None

    def make_builders(w: Workload, sp: bool, strategies=None) -> list:
        out = []
        for i, group in enumerate(cluster.groups):
            inner = strategies[i] if strategies is not None else None
            if isinstance(inner, _AdjustedBuilder):
                inner = inner.inner
            b = CostBuilder(traced, group, w, sequence_parallel=sp, profile=profile,
                            strategies=inner, decode_traced=step)
            out.append(_AdjustedBuilder(b, adjust_costs) if adjust_costs is not None else b)
        return out

    if sequence_parallel is None:
        options = [False, True] if all(sequence_parallel_applies(traced, g, workload)
                                       for g in cluster.groups) else [False]
    else:
        options = [sequence_parallel]
    best, failure, alone = None, None, [None] * len(cluster.groups)
    for sp in options:
        builders = make_builders(workload, sp)
        started = time.perf_counter()
        subsets = best_subsets(builders, cluster, workload, pins=pins, num_workers=num_workers,
                               time_limit_s=max(0.01, time_limit_s / 4))
        subsets_s = time.perf_counter() - started  # a part of the search: counted in wall_s
        for i, sub in enumerate(subsets):
            if sub is not None and (alone[i] is None
                                    or sub.solver.objective < alone[i].solver.objective):
                alone[i] = sub
        try:
            if solver == "reference":
                solution = solve_mixed_reference(builders, cluster, workload, pins=pins)
            else:
                solution = solve_mixed(builders, cluster, workload, pins=pins,
                                       num_workers=num_workers, time_limit_s=time_limit_s,
                                       subsets=subsets)
                solution = replace(solution, solver=replace(
                    solution.solver, wall_s=solution.solver.wall_s + subsets_s))
        except InfeasiblePlanError as e:
            failure = failure or e
            continue
        if best is None or solution.solver.objective < best[1].solver.objective:
            best = (builders, solution)
    if best is None:
        raise failure
    builders, solution = best
    tables = tuple(b(solution.microbatch_size, solution.microbatches) for b in builders)
    baselines = {}
    for group, sub in zip(cluster.groups, alone, strict=True):
        baselines[alone_name(group)] = _Figures(
            sub is not None, sub.predicted.latency_s if sub else None,
            sub.predicted.throughput_samples_per_s if sub else None)
    result = Plan.from_solution(solution, tables[0], cluster, workload,
                                model_name=name or traced.name, fingerprint=traced.fingerprint,
                                baselines=baselines, group_tables=tables)
    sources = [src for b in builders
               for src in b.sources(solution.microbatch_size, solution.microbatches)]
    result = replace(result, layers=tuple(
        replace(layer, source=src) for layer, src in
        zip(result.layers, builders[0].sources(solution.microbatch_size,
                                               solution.microbatches))))
    if workload.phase == "decode":
        prefill = make_builders(replace(workload, phase="prefill",
                                        runtime=prefill_runtime(workload.runtime)),
                                solution.sequence_parallel, strategies=builders)
        prefill_tables = [b(solution.microbatch_size, solution.microbatches) for b in prefill]
        path = [(s.first, s.last, s.tp, cluster.group_of(s.devices[0][0]))
                for s in solution.stages]
        stages, prediction = predict_mixed(prefill_tables, cluster, path, solution.dp,
                                           workload.batch_size)
        result = with_prefill(result, (stages, prediction, prefill_tables[0]))
    kinds = set(sources)
    provenance = "measured" if kinds == {"measured"} else "mixed" if "measured" in kinds else "predicted"
    excluded = [b.excluded_tp for b in builders]
    extra = {
        "alternatives": _alone_alternatives(cluster, alone, solution, workload.objective)
        if alternatives else [],
        "source": source or {},
        "workload_full": workload.to_dict(),
        "arch": traced.arch.to_dict() if traced.arch else None,
        "tp_excluded": {str(t): why for t, why in sorted(excluded[0].items())
                        if all(t in e for e in excluded)},
    }
    if workload.phase == "decode":
        extra["decode_pricing"] = _decode_pricing(decode_traced)
    return replace(result, provenance=provenance, extra=extra)


@dataclass(frozen=True)
class _Figures:
    """A baseline's figures in the shape ``Plan.from_solution`` reads."""

    feasible: bool
    latency_s: float | None
    throughput_samples_per_s: float | None
    needs_memory_bytes: int | None = None


def _alone_alternatives(cluster, alone, best: Solution, objective: str) -> list[dict]:
    """``plan explain``'s rows for a mixed plan: the best plan of each group alone."""
    out = []
    for group, sol in zip(cluster.groups, alone, strict=True):
        if sol is None:
            out.append({"dp": 1, "pp": 1, "tp": 1, "feasible": False,
                        "why": f"nothing fits on {group.spec_string} alone"})
            continue
        ratio = sol.solver.objective / best.solver.objective if best.solver.objective else 1.0
        out.append({
            "dp": sol.dp, "pp": sol.pp, "tp": sol.stages[0].tp, "feasible": True,
            "microbatches": sol.microbatches, "objective": sol.solver.objective,
            "ratio": ratio, "latency_s": sol.predicted.latency_s,
            "throughput_samples_per_s": sol.predicted.throughput_samples_per_s,
            "peak_memory_bytes": sol.predicted.peak_memory_bytes,
            "why": f"{group.spec_string} alone: " + _why_lost(best, sol, objective),
        })
    return out


class _AdjustedBuilder:
    """A cost builder whose tables pass through ``adjust`` first."""

    def __init__(self, inner: CostBuilder, adjust: Callable[[CostTable], CostTable]) -> None:
        self.inner, self.adjust = inner, adjust

    def __call__(self, microbatch_size: int, microbatches: int) -> CostTable:
        return self.adjust(self.inner(microbatch_size, microbatches))

    def sources(self, microbatch_size: int, microbatches: int) -> list[str]:
        return self.inner.sources(microbatch_size, microbatches)

    def __getattr__(self, name):  # excluded_tp, tp_degrees, ... of the inner builder
        return getattr(self.inner, name)


def _search_options(traced: TracedModel, cluster: Cluster, workload: Workload,
                    sequence_parallel: bool | None, target: str | None):
    """``(sequence-parallel settings to search, the target's Restriction, its tp degrees)``:
    both settings where sequence parallelism applies unless one is asked for, only those
    ``target`` can express (``planner.engines``)."""
    if sequence_parallel is None:
        options = [False, True] if sequence_parallel_applies(traced, cluster, workload) else [False]
    else:
        options = [sequence_parallel]
    if target is None:
        return options, None, None
    from planner.engines import restriction as engine_restriction

    restriction, tp_degrees, sp_allowed = engine_restriction(
        target, [layer.name for layer in traced.layers],
        traced.arch.to_dict() if traced.arch else None,
        range(1, cluster.devices_per_node + 1))
    options = [sp for sp in options if sp_allowed or not sp]
    if not options:
        raise PlanError(f"--sp on asks for sequence parallelism, which {target} has no "
                        "option for: drop --sp on or choose another --target")
    return options, restriction, tp_degrees


def sequence_parallel_applies(traced: TracedModel, cluster: Cluster, workload: Workload) -> bool:
    """Sequence parallelism is searched for prefill of transformers whose sequence length every
    allowed TP degree divides (codegen shards the sequence evenly)."""
    from planner.cost_builder import candidate_tp_degrees

    tps = [t for t in candidate_tp_degrees(cluster) if t > 1]
    return (workload.phase == "prefill" and traced.arch is not None
            and traced.arch.is_transformer and bool(tps)
            and all(workload.seq_len % t == 0 for t in tps))


def _alternatives(builder, cluster, workload, best: Solution, limit: int, num_workers: int) -> list[dict]:
    """The best plan of each other (dp, pp, tp) family and why it lost to ``best``."""
    out = []
    for (dp, pp, tp), sol in best_per_family(builder, cluster, workload, limit=limit + 1,
                                             num_workers=num_workers):
        uniform_tp = all(st.tp == tp for st in best.stages)
        if (dp, pp, tp) == (best.dp, best.pp, best.stages[0].tp) and uniform_tp:
            continue
        if isinstance(sol, Solution):
            ratio = sol.solver.objective / best.solver.objective if best.solver.objective else 1.0
            out.append({
                "dp": dp, "pp": pp, "tp": tp, "feasible": True,
                "microbatches": sol.microbatches,
                "objective": sol.solver.objective, "ratio": ratio,
                "latency_s": sol.predicted.latency_s,
                "throughput_samples_per_s": sol.predicted.throughput_samples_per_s,
                "peak_memory_bytes": sol.predicted.peak_memory_bytes,
                "why": _why_lost(best, sol, workload.objective),
            })
        else:
            out.append({"dp": dp, "pp": pp, "tp": tp, "feasible": False, "why": sol})
    return out[:limit]


def objective_terms(s: Solution, objective: str) -> dict[str, float]:
    """Split a solution's objective (seconds) into additive terms that name its causes.

    latency = Σ compute + Σ TP comm + Σ p2p + (m − 1)·max stage (the pipeline bubble);
    period (throughput) = m·(compute + comm) of the bottleneck stage, or the fill time when
    the pipeline is longer than the batch.
    """
    m = s.microbatches
    p2p = list(s.predicted.p2p_s)
    items = [st.compute_s + st.comm_s for st in s.stages] + p2p
    slowest = max(items)
    if objective == "latency":
        return {
            "compute": sum(st.compute_s for st in s.stages),
            "tensor-parallel communication": sum(st.comm_s for st in s.stages),
            "pipeline transfers": sum(p2p),
            "pipeline bubble": (m - 1) * slowest,
        }
    k = max(range(len(s.stages)), key=lambda i: s.stages[i].compute_s + s.stages[i].comm_s)
    bottleneck = m * (s.stages[k].compute_s + s.stages[k].comm_s)
    return {
        "compute": m * s.stages[k].compute_s,
        "tensor-parallel communication": m * s.stages[k].comm_s,
        "pipeline fill": max(0.0, sum(items) - bottleneck),
    }


def _why_lost(best: Solution, alt: Solution, objective: str) -> str:
    """Name the term of the objective that grew most from the best plan to ``alt``."""
    a, b = objective_terms(alt, objective), objective_terms(best, objective)
    worst = max(a, key=lambda k: a[k] - b.get(k, 0.0))
    metric = "latency" if objective == "latency" else "period"
    ratio = alt.solver.objective / best.solver.objective if best.solver.objective else 1.0
    return (f"{metric} {ratio:.2f}x the best; largest extra cost: {worst} "
            f"(+{(a[worst] - b.get(worst, 0.0)) * 1e3:.3f} ms)")
