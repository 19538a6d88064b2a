"""The plan file: schema ``fx-planner/plan/v2`` (documented key by key in docs/plan-format.md).

v2 records each stage's tensor-parallel strategy (``stages[i].sharding``: which parameter
is split how, and the collectives each layer runs), which codegen applies as written. A
v1 file (an integer ``tp`` only) is refused with a "re-plan" message.

>>> plan = Plan.load("plan.json")            # doctest: +SKIP
>>> plan.parallelism.dp, [s.tp for s in plan.stages]   # doctest: +SKIP
(1, [4, 4])
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cost_models.runtime import RUNTIMES
from planner.cluster import (
    DTYPES,
    MAX_BATCH,
    MAX_DEVICES,
    MAX_TOKENS,
    OBJECTIVES,
    PHASES,
    SpecError,
    Workload,
)
from planner.cost_table import Borrow, CostTable, LayerCost, Link
from planner.sharding import Collective, StageSharding, TemplateSharding
from planner.units import fmt_value as _show

__all__ = [
    "SCHEMA",
    "PlanFormatError",
    "check_fingerprint",
    "PlanModel",
    "PlanCluster",
    "PlanGroup",
    "PlanWorkload",
    "Parallelism",
    "StageCosts",
    "LayerCosts",
    "PlanStage",
    "PlanLayer",
    "stage_sharding",
    "Predicted",
    "BaselineFigures",
    "SolverInfo",
    "Plan",
    "PLAN_SCHEMA",
    "EXTRA_SCHEMA",
    "is_plan_file",
    "write_atomic",
]

SCHEMA = "fx-planner/plan/v2"
#: Phases a plan file may record: the inference phases and ``train``.
PLAN_PHASES = tuple(dict.fromkeys((*PHASES, "train")))
#: ``parallelism.schedule`` of a train plan: the pipeline schedule.
SCHEDULES = ("gpipe", "1f1b", "interleaved")
#: ``stages[i].recompute`` of a train plan: none, selective (attention core only), full.
RECOMPUTE = ("none", "selective", "full")
OLD_SCHEMAS = ("fx-planner/plan/v1",)


class PlanFormatError(ValueError):
    """A plan file that is not a valid ``fx-planner/plan/v2`` plan; names the key to fix."""


@dataclass(frozen=True)
class PlanModel:
    name: str
    num_layers: int
    fingerprint: str


@dataclass(frozen=True)
class PlanGroup:
    """``cluster.groups[g]``: one node group of a mixed cluster, and the cost table the
    solver saw for its devices (``costs[j]``: layer ``j`` by tp degree; its ``links`` and
    ``stage_workspace_bytes``). Plans made before the tables were recorded have none."""

    nodes: int
    devices_per_node: int
    device: str
    costs: tuple[Mapping[int, LayerCosts], ...] = ()
    links: Mapping[str, Link] = field(default_factory=dict)
    stage_workspace_bytes: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PlanCluster:
    """``cluster``. A mixed cluster lists its node ``groups`` (device ids numbered group
    after group); then ``num_devices`` and ``nodes`` are totals and ``devices_per_node``
    and ``device`` are the first group's. A homogeneous cluster has no ``groups``."""

    num_devices: int
    nodes: int
    devices_per_node: int
    device: str
    groups: tuple[PlanGroup, ...] = ()

    def group_of(self, device: int) -> tuple[int, int, int]:
        """``(group index, first id of the group, devices per node)`` of a device id."""
        if not self.groups:
            return 0, 0, self.devices_per_node
        start = 0
        for i, g in enumerate(self.groups):
            if device < start + g.nodes * g.devices_per_node:
                return i, start, g.devices_per_node
            start += g.nodes * g.devices_per_node
        return len(self.groups) - 1, start, self.groups[-1].devices_per_node


@dataclass(frozen=True)
class PlanWorkload:
    batch_size: int
    seq_len: int
    dtype: str
    phase: str
    objective: str
    runtime: str = "eager"  # what the cost model priced (cost_models.runtime); older files: eager


@dataclass(frozen=True)
class Parallelism:
    dp: int
    pp: int
    microbatches: int
    sequence_parallel: bool
    microbatch_size: int = 1
    # Training plans (``workload.phase == "train"``); inference plans keep the defaults.
    zero: int = 0  # 0: replicated (DDP); 1: optimizer states; 2: + gradients; 3: + parameters
    schedule: str | None = None  # "gpipe" | "1f1b" | "interleaved" (train plans only)
    virtual_stages: int = 1  # stages per device group; len(stages) == pp * virtual_stages


@dataclass(frozen=True)
class StageCosts:
    compute_s: float
    comm_s: float
    memory_bytes: int


@dataclass(frozen=True)
class LayerCosts:
    """``layers[j].costs["<tp>"]``: one microbatch through layer ``j`` at that degree.

    Attributes:
        compute_s: kernel time, seconds.
        comm_s: tensor-parallel collectives, seconds.
        memory_bytes: bytes each device of the group holds for the layer.
        kv_cache_bytes: the part of ``memory_bytes`` that is the layer's KV cache (decode
            plans; 0 otherwise and in files written before the key existed).
    """

    compute_s: float
    comm_s: float
    memory_bytes: int
    kv_cache_bytes: int = 0


@dataclass(frozen=True)
class PlanStage:
    """One pipeline stage of the plan (docs/plan-format.md, ``stages[i]``).

    Attributes:
        layers: ``(first, last)``, inclusive.
        tp: tensor-parallel degree.
        devices: ``devices[r]``: the ``tp`` device ids of replica ``r``.
        predicted: one microbatch through the stage (decode step for decode plans).
        kv_heads_replicated: copies of each KV head kept because ``tp > kv_heads``.
        sharding: the recorded tensor-parallel strategy (None at tp 1).
        kv_cache_bytes: KV cache each device of the stage holds (a part of
            ``predicted.memory_bytes``; 0 for prefill plans).
        prefill_s: decode plans: one microbatch of the prompt's prefill through the stage
            (compute and TP collectives), what ``predicted.ttft_s`` sums; None otherwise.
        prefill_boundary_bytes: decode plans: bytes this stage sends to the next one for
            one microbatch of the prefill (0 for the last stage); None otherwise.
    """

    layers: tuple[int, int]
    tp: int
    devices: tuple[tuple[int, ...], ...]
    predicted: StageCosts
    kv_heads_replicated: int = 1
    sharding: StageSharding | None = None  # None at tp 1
    kv_cache_bytes: int = 0
    prefill_s: float | None = None
    prefill_boundary_bytes: int | None = None
    recompute: str = "none"  # train plans: "none" | "selective" | "full"
    group: int = 0  # mixed clusters: the index in cluster.groups of the stage's devices


@dataclass(frozen=True)
class PlanLayer:
    name: str
    param_bytes: int
    costs: Mapping[int, LayerCosts]
    source: str = "predicted"  # "measured" (profiled on this device) or "predicted"


@dataclass(frozen=True)
class Predicted:
    """The plan's predicted figures (docs/plan-format.md, ``predicted``).

    Attributes:
        latency_s: one batch (prefill) or one decode step of every microbatch (decode).
        throughput_samples_per_s: ``batch_size / period``.
        peak_memory_bytes: the largest stage memory per device.
        ttft_s: decode plans: time to first token, the pipelined prefill of the plan's
            microbatches of ``workload.seq_len``-token prompts on the same stages; None for
            prefill plans and decode plans built without a prefill table.
        tpot_s: decode plans: time per output token of one sequence, one round in which
            every microbatch advances one token (the solver's period); None for prefill.
    """

    latency_s: float
    throughput_samples_per_s: float
    peak_memory_bytes: int
    ttft_s: float | None = None
    tpot_s: float | None = None
    mfu: float | None = None  # train plans: model FLOPs per second / (devices x peak)


@dataclass(frozen=True)
class BaselineFigures:
    latency_s: float | None
    throughput_samples_per_s: float | None
    feasible: bool
    needs_memory_bytes: int | None = None


@dataclass(frozen=True)
class SolverInfo:
    status: str
    objective: float
    bound: float
    wall_s: float
    gap: float = 0.0
    name: str = "cp-sat"


@dataclass(frozen=True)
class Plan:
    """A complete plan: what to run, on what, and the cost table it was chosen from.

    ``links`` (``{"intra_node"|"inter_node": {latency_s, bandwidth_bytes_per_s}}``) and
    ``stage_workspace_bytes`` (``{"<tp>": bytes}``) complete ``layers[].costs`` so that
    ``cost_table()`` rebuilds exactly the table the solver saw.
    """

    model: PlanModel
    cluster: PlanCluster
    workload: PlanWorkload
    parallelism: Parallelism
    stages: tuple[PlanStage, ...]
    layers: tuple[PlanLayer, ...]
    boundaries: tuple[int, ...]
    predicted: Predicted
    baselines: Mapping[str, BaselineFigures]
    solver: SolverInfo
    links: Mapping[str, Link] = field(default_factory=dict)
    stage_workspace_bytes: Mapping[int, int] = field(default_factory=dict)
    borrowed: tuple[Borrow, ...] = ()
    provenance: str = "predicted"
    schema: str = SCHEMA
    # Further top-level keys (alternatives for `plan explain`, how to rebuild the model,
    # the full workload, the arch): kept verbatim through save/load.
    extra: Mapping[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_solution(cls, solution, table: CostTable, cluster, workload, *, model_name: str,
                      fingerprint: str, baselines: Mapping | None = None,
                      group_tables: tuple[CostTable, ...] | None = None) -> Plan:
        """Assemble a plan from a ``Solution`` and the table of its microbatch size.

        A decode plan gets ``predicted.tpot_s`` (the solution's period) and per stage the
        KV cache bytes of its layers; ``ttft_s`` and ``stages[i].prefill_s`` need a prefill
        table (``planner.api.plan_traced`` adds them).

        Args:
            solution: ``planner.solver.Solution``.
            table: the ``CostTable`` the solution was priced with.
            cluster: ``planner.cluster.Cluster``.
            workload: ``planner.cluster.Workload``.
            model_name: shown by ``plan show``.
            fingerprint: hash of the traced graph and shapes.
            baselines: ``planner.baselines.baselines(...)`` output, optional.
            group_tables: a mixed cluster's table of each group (``planner.hetero``):
                recorded in ``cluster.groups[g]``; each stage's strategy and KV cache come
                from its group's table; ``table`` is the first group's.
        """
        def costs(c: LayerCost) -> LayerCosts:
            return LayerCosts(c.compute_s, c.comm_s, c.memory_bytes, c.kv_cache_bytes)

        def group_of(stage) -> int:
            return cluster.group_of(stage.devices[0][0]) if getattr(cluster, "is_mixed", False) else 0

        def table_of(stage) -> CostTable:
            return group_tables[group_of(stage)] if group_tables else table

        plan_cluster = _plan_cluster(cluster)
        if group_tables:
            plan_cluster = replace(plan_cluster, groups=tuple(
                replace(g, costs=tuple({t: costs(c) for t, c in sorted(tb.costs[j].items())}
                                       for j in range(tb.num_layers)),
                        links={"intra_node": tb.intra_node, "inter_node": tb.inter_node},
                        stage_workspace_bytes=dict(tb.stage_workspace_bytes))
                for g, tb in zip(plan_cluster.groups, group_tables, strict=True)))

        layers = tuple(
            PlanLayer(table.name(j), table.param_bytes[j] if table.param_bytes else 0,
                      {t: costs(c) for t, c in sorted(table.costs[j].items())})
            for j in range(table.num_layers))
        s = solution.solver
        return cls(
            model=PlanModel(model_name, table.num_layers, fingerprint),
            cluster=plan_cluster,
            workload=PlanWorkload(workload.batch_size, workload.seq_len, workload.dtype,
                                  workload.phase, workload.objective,
                                  getattr(workload, "runtime", None) or "eager"),
            parallelism=Parallelism(solution.dp, solution.pp, solution.microbatches,
                                    solution.sequence_parallel, solution.microbatch_size),
            stages=tuple(PlanStage((st.first, st.last), st.tp, st.devices,
                                   StageCosts(st.compute_s, st.comm_s, st.memory_bytes),
                                   st.kv_heads_replicated,
                                   stage_sharding(table_of(st), st.first, st.last,
                                                  st.tp, is_last=i == len(solution.stages) - 1),
                                   kv_cache_bytes=table_of(st).stage_kv_cache_bytes(
                                       st.first, st.last, st.tp),
                                   group=group_of(st))
                         for i, st in enumerate(solution.stages)),
            layers=layers,
            boundaries=table.boundary_bytes,
            predicted=Predicted(solution.predicted.latency_s,
                                solution.predicted.throughput_samples_per_s,
                                solution.predicted.peak_memory_bytes,
                                tpot_s=(solution.predicted.period_s
                                        if workload.phase == "decode" else None)),
            baselines={name: BaselineFigures(b.latency_s, b.throughput_samples_per_s,
                                             b.feasible, b.needs_memory_bytes)
                       for name, b in (baselines or {}).items()},
            solver=SolverInfo(s.status, s.objective, s.bound, s.wall_s, s.gap, s.solver),
            links={"intra_node": table.intra_node, "inter_node": table.inter_node},
            stage_workspace_bytes=dict(table.stage_workspace_bytes),
            borrowed=tuple(table.borrowed),
        )

    def cost_table(self, group: int | None = None) -> CostTable:
        """The cost table stored in the plan (what the solver saw), for audits and re-solves;
        ``group``: a mixed cluster's group (its ``cluster.groups[group]`` table)."""
        layer_costs = [layer.costs for layer in self.layers]
        links, workspace = self.links, self.stage_workspace_bytes
        if group is not None and self.cluster.groups:
            g = self.cluster.groups[group]
            if not g.costs:
                raise PlanFormatError(f"cluster.groups[{group}] records no cost table (a plan "
                                      f"written before they were); re-plan with `plan MODEL`")
            layer_costs, links, workspace = g.costs, g.links, g.stage_workspace_bytes
        return CostTable(
            costs=tuple({t: LayerCost(c.compute_s, c.comm_s, c.memory_bytes,
                                      getattr(c, "kv_cache_bytes", 0))
                         for t, c in costs.items()} for costs in layer_costs),
            boundary_bytes=self.boundaries,
            intra_node=links["intra_node"],
            inter_node=links["inter_node"],
            microbatch_size=self.parallelism.microbatch_size,
            microbatches=self.parallelism.microbatches,
            stage_workspace_bytes=dict(workspace),
            borrowed=self.borrowed,
            kv_heads_replicated={s.tp: s.kv_heads_replicated for s in self.stages},
            layer_names=tuple(layer.name for layer in self.layers),
            param_bytes=tuple(layer.param_bytes for layer in self.layers),
            sequence_parallel=self.parallelism.sequence_parallel,
        )

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict:
        d = {
            "schema": self.schema,
            "model": asdict(self.model),
            "cluster": _cluster_json(self.cluster),
            "workload": asdict(self.workload),
            "parallelism": asdict(self.parallelism),
            "stages": [{"layers": list(s.layers), "tp": s.tp,
                        "devices": [list(r) for r in s.devices],
                        "predicted": asdict(s.predicted),
                        "kv_heads_replicated": s.kv_heads_replicated,
                        "sharding": (s.sharding.to_json() if s.sharding is not None
                                     else {"templates": [], "boundary": []}),
                        "kv_cache_bytes": s.kv_cache_bytes,
                        "prefill_s": s.prefill_s,
                        "prefill_boundary_bytes": s.prefill_boundary_bytes,
                        "recompute": s.recompute,
                        **({"group": s.group} if self.cluster.groups else {})}
                       for s in self.stages],
            "layers": [{"name": layer.name, "param_bytes": layer.param_bytes,
                        "costs": {str(t): asdict(c) for t, c in layer.costs.items()},
                        "source": layer.source}
                       for layer in self.layers],
            "boundaries": list(self.boundaries),
            "predicted": asdict(self.predicted),
            "baselines": {k: asdict(v) for k, v in self.baselines.items()},
            "solver": asdict(self.solver),
            "links": {k: asdict(v) for k, v in self.links.items()},
            "stage_workspace_bytes": {str(t): b for t, b in self.stage_workspace_bytes.items()},
            "borrowed": [{"layer": b.layer, "previous": b.previous, "param": b.param,
                          "bytes": {str(t): n for t, n in sorted(b.bytes.items())}}
                         for b in self.borrowed],
            "provenance": self.provenance,
        }
        for key, value in self.extra.items():
            d.setdefault(key, value)
        return d

    def save(self, path: str | Path) -> None:
        """Validate, then write the plan as indented JSON, atomically (a temporary file in
        the same folder, then renamed over ``path``; missing parent folders are created), so
        ``path`` holds either its old content or the whole new plan, never half of one."""
        self.validate()
        write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read and validate a plan file.

        Raises:
            PlanFormatError: not JSON, wrong schema, a missing or mistyped key, or contents
                that contradict each other; the message names the key and the fix.
        """
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlanFormatError(f"plan file {path} does not exist") from None
        except IsADirectoryError:
            raise PlanFormatError(f"plan file {path} is a directory; give the plan's JSON file "
                                  "(written by `plan MODEL --out plan.json`)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise PlanFormatError(f"cannot read plan file {path}: {e}") from None
        except (json.JSONDecodeError, RecursionError) as e:
            raise PlanFormatError(f"plan file {path} is not valid JSON: {e}") from None
        try:
            plan = cls.from_dict(data)
            plan.validate()
        except PlanFormatError as e:
            raise PlanFormatError(f"plan file {path}: {e}") from None
        return plan

    @classmethod
    def from_dict(cls, data) -> Plan:
        """Build a plan from parsed JSON, checking every key of the schema (``PLAN_SCHEMA``):
        presence, type, range, allowed values; and the further keys ``plan MODEL`` writes
        (``EXTRA_SCHEMA``), which are kept verbatim in ``extra``.

        Raises:
            PlanFormatError: naming the first key that is wrong and what it must be.
        """
        if not isinstance(data, dict):
            raise PlanFormatError(f"a plan file holds one JSON object, not {type(data).__name__} "
                                  f"{_show(data)}")
        schema = data.get("schema")
        if schema in OLD_SCHEMAS:
            raise PlanFormatError(
                f"this plan is {schema}, written before each stage recorded its "
                f"tensor-parallel strategy; {SCHEMA} plans record it and codegen applies it "
                f"as written. Re-plan: run the same `plan MODEL ... --out` command again")
        if schema != SCHEMA:
            raise PlanFormatError(f"schema is {_show(schema) if not isinstance(schema, str) else repr(schema)}; "
                                  f"this planner reads {SCHEMA!r} "
                                  f"(re-create the plan with `plan MODEL --out`)")
        d = _check(PLAN_SCHEMA, data, "")
        par, w = d["parallelism"], d["workload"]
        if "microbatch_size" not in data["parallelism"]:  # older files: what it must have been
            par["microbatch_size"] = max(1, w["batch_size"] // (par["dp"] * par["microbatches"]))
        extra = {k: v for k, v in data.items() if k not in _KNOWN_KEYS}
        _check_extra(extra)
        return cls(
            model=PlanModel(**d["model"]),
            cluster=PlanCluster(**{**d["cluster"], "groups": tuple(
                PlanGroup(g["nodes"], g["devices_per_node"], g["device"],
                          tuple({t: LayerCosts(**c) for t, c in costs.items()}
                                for costs in g["costs"]),
                          {k: Link(v["latency_s"], v["bandwidth_bytes_per_s"])
                           for k, v in g["links"].items()},
                          dict(g["stage_workspace_bytes"]))
                for g in d["cluster"]["groups"])}),
            workload=PlanWorkload(**d["workload"]),
            parallelism=Parallelism(**d["parallelism"]),
            stages=tuple(PlanStage(layers=(s["layers"][0], s["layers"][1]), tp=s["tp"],
                                   devices=tuple(tuple(g) for g in s["devices"]),
                                   predicted=StageCosts(**s["predicted"]),
                                   kv_heads_replicated=s["kv_heads_replicated"],
                                   sharding=(StageSharding.from_json(
                                       s["sharding"], s["tp"], d["parallelism"]["sequence_parallel"])
                                       if s["tp"] > 1 and s["sharding"]["templates"] else None),
                                   kv_cache_bytes=s["kv_cache_bytes"],
                                   prefill_s=s["prefill_s"],
                                   prefill_boundary_bytes=s["prefill_boundary_bytes"],
                                   recompute=s["recompute"], group=s["group"])
                         for s in d["stages"]),
            layers=tuple(PlanLayer(layer["name"], layer["param_bytes"],
                                   {t: LayerCosts(**c) for t, c in layer["costs"].items()},
                                   layer["source"]) for layer in d["layers"]),
            boundaries=tuple(d["boundaries"]),
            predicted=Predicted(**d["predicted"]),
            baselines={k: BaselineFigures(**v) for k, v in d["baselines"].items()},
            solver=SolverInfo(**d["solver"]),
            links={k: Link(v["latency_s"], v["bandwidth_bytes_per_s"])
                   for k, v in d["links"].items()},
            stage_workspace_bytes=dict(d["stage_workspace_bytes"]),
            borrowed=tuple(Borrow(b["layer"], b["previous"], b["param"], dict(b["bytes"]))
                           for b in d["borrowed"]),
            provenance=d["provenance"],
            extra=extra,
        )

    def _training_errors(self) -> list[str]:
        """What a plan's training keys contradict: only train plans have a schedule, ZeRO,
        virtual stages, recompute and MFU; an interleaved schedule needs virtual stages."""
        par, errors = self.parallelism, []
        if self.workload.phase != "train":
            if par.zero or par.schedule is not None or par.virtual_stages != 1:
                errors.append(f"parallelism.zero, schedule and virtual_stages are training "
                              f"keys (0, null, 1 for a {self.workload.phase} plan)")
            if any(s.recompute != "none" for s in self.stages):
                errors.append(f"stages[].recompute is \"none\" for a {self.workload.phase} "
                              f"plan; only train plans recompute activations")
            if self.predicted.mfu is not None:
                errors.append(f"predicted.mfu is null for a {self.workload.phase} plan")
            return errors
        if par.schedule is None:
            errors.append("parallelism.schedule is null; a train plan names its pipeline "
                          f"schedule, one of {', '.join(SCHEDULES)}")
        elif (par.schedule == "interleaved") != (par.virtual_stages > 1):
            errors.append(f"parallelism.schedule is {par.schedule!r} with virtual_stages "
                          f"{par.virtual_stages}; interleaved 1F1B has virtual_stages >= 2 "
                          f"and the other schedules 1")
        return errors

    def _group_table_errors(self) -> list[str]:
        """How the groups' cost tables contradict the plan: every group has one or none does,
        one entry per layer, both links, and the first group's is ``layers[].costs``."""
        groups, L = self.cluster.groups, len(self.layers)
        with_costs = [i for i, g in enumerate(groups) if g.costs]
        if not with_costs:
            return []
        if len(with_costs) != len(groups):
            return [f"cluster.groups {with_costs} record a cost table and the others do not; "
                    f"every group records one (costs, links, stage_workspace_bytes) or none"]
        errors = []
        for i, g in enumerate(groups):
            if len(g.costs) != L:
                errors.append(f"cluster.groups[{i}].costs has {len(g.costs)} entries; the "
                              f"plan has {L} layers")
            if set(g.links) != {"intra_node", "inter_node"}:
                errors.append(f"cluster.groups[{i}].links has {sorted(g.links)}; it holds "
                              f"intra_node and inter_node")
        if not errors and ([dict(c) for c in groups[0].costs] !=
                           [dict(layer.costs) for layer in self.layers]
                           or dict(groups[0].links) != dict(self.links)):
            errors.append("cluster.groups[0]'s costs and links differ from layers[].costs and "
                          "links, which are the first group's in a mixed plan")
        return errors

    def _stage_group_errors(self, i: int, s: PlanStage) -> list[str]:
        """A mixed plan's stage names the group that holds every one of its devices."""
        groups = self.cluster.groups
        if s.group >= len(groups):
            return [f"stages[{i}].group is {s.group}; cluster.groups has {len(groups)} groups"]
        held = {self.cluster.group_of(d)[0] for r in s.devices for d in r
                if 0 <= d < self.cluster.num_devices}
        if held - {s.group}:
            return [f"stages[{i}].group is {s.group} but its devices are in group(s) "
                    f"{sorted(held)}; a stage runs on the devices of one group"]
        return []

    def validate(self) -> None:
        """Check that the plan's parts agree with each other.

        Raises:
            PlanFormatError: naming the key and what to change.
        """
        try:
            data = self.to_dict()
        except (TypeError, ValueError, AttributeError) as e:
            raise PlanFormatError(f"invalid plan: cannot write it as JSON ({e})") from None
        if data.get("schema") != SCHEMA:
            raise PlanFormatError(f"schema is {data.get('schema')!r}; this planner writes {SCHEMA!r}")
        _check(PLAN_SCHEMA, data, "")
        _check_extra(dict(self.extra))
        L, par = len(self.layers), self.parallelism
        errors = []
        if self.model.num_layers != L:
            errors.append(f"model.num_layers is {self.model.num_layers} but layers[] has {L} "
                          f"entries")
        if len(self.boundaries) != max(L - 1, 0):
            errors.append(f"boundaries has {len(self.boundaries)} entries; {L} layers have "
                          f"{max(L - 1, 0)} cuts")
        if self.cluster.groups:
            errors += _group_errors(self.cluster)
            errors += self._group_table_errors()
        elif self.cluster.num_devices != self.cluster.nodes * self.cluster.devices_per_node:
            errors.append(f"cluster.num_devices {self.cluster.num_devices} != nodes "
                          f"{self.cluster.nodes} × devices_per_node "
                          f"{self.cluster.devices_per_node}")
        if par.pp * par.virtual_stages != len(self.stages):
            errors.append(f"parallelism.pp {par.pp} × virtual_stages {par.virtual_stages} is "
                          f"{par.pp * par.virtual_stages} but stages[] has {len(self.stages)}")
        errors += self._training_errors()
        if self.workload.batch_size % par.dp or \
                (self.workload.batch_size // par.dp) % par.microbatches:
            errors.append(f"parallelism: dp {par.dp} × microbatches {par.microbatches} must "
                          f"divide workload.batch_size {self.workload.batch_size}")
        elif par.microbatch_size * par.dp * par.microbatches != self.workload.batch_size:
            errors.append(f"parallelism.microbatch_size is {par.microbatch_size}; batch_size "
                          f"{self.workload.batch_size} / (dp {par.dp} × microbatches "
                          f"{par.microbatches}) is "
                          f"{self.workload.batch_size // (par.dp * par.microbatches)}")
        expected, used = 0, set()
        for i, s in enumerate(self.stages):
            first, last = s.layers
            if first != expected or last < first:
                errors.append(f"stages[{i}].layers is [{first}, {last}]; stages must cover "
                              f"layers contiguously, this one should start at {expected}")
            expected = last + 1
            if s.tp > 1 and s.sharding is not None and s.sharding.templates:
                covered = sorted(j for t in s.sharding.templates for j in t.layers)
                if covered != list(range(first, last + 1)):
                    errors.append(f"stages[{i}].sharding.templates cover layers {covered}; a "
                                  f"tp {s.tp} stage records the strategy of each of its layers "
                                  f"{first}..{last} (re-plan with `plan MODEL --out`)")
            if len(s.devices) != par.dp:
                errors.append(f"stages[{i}].devices lists {len(s.devices)} replicas; "
                              f"parallelism.dp is {par.dp}")
            if i >= par.pp and par.pp * par.virtual_stages == len(self.stages):
                # a virtual stage runs on the devices of stage i mod pp (interleaved 1F1B)
                if s.devices != self.stages[i % par.pp].devices:
                    errors.append(f"stages[{i}].devices must equal stages[{i % par.pp}].devices:"
                                  f" with virtual_stages {par.virtual_stages}, stage i runs on "
                                  f"the devices of stage i mod pp {par.pp}")
                continue
            for r, group in enumerate(s.devices):
                if len(group) != s.tp:
                    errors.append(f"stages[{i}].devices[{r}] has {len(group)} ids for tp {s.tp}")
                if self.cluster.groups and group and \
                        0 <= min(group) and max(group) < self.cluster.num_devices:
                    places = {(g, (d - start) // per_node) for d in group
                              for g, start, per_node in [self.cluster.group_of(d)]}
                    if len(places) > 1:
                        errors.append(f"stages[{i}].devices[{r}] {list(group)} spans "
                                      f"{len({g for g, _ in places})} group(s) and "
                                      f"{len(places)} nodes; a tensor-parallel group stays "
                                      f"inside one node of one group (cluster.groups)")
                for d in group:
                    if not 0 <= d < self.cluster.num_devices:
                        errors.append(f"stages[{i}].devices[{r}] uses device {d}; the cluster "
                                      f"has devices 0..{self.cluster.num_devices - 1}")
                    elif d in used:
                        errors.append(f"stages[{i}].devices[{r}] reuses device {d}")
                    used.add(d)
            table, where = [layer.costs for layer in self.layers], "layers[{j}].costs"
            if self.cluster.groups:
                errors += self._stage_group_errors(i, s)
                g = self.cluster.groups[s.group] if s.group < len(self.cluster.groups) else None
                if g is not None and len(g.costs) == L:
                    table, where = g.costs, f"cluster.groups[{s.group}].costs[{{j}}]"
            elif s.group != 0:
                errors.append(f"stages[{i}].group is {s.group}; a plan without cluster.groups "
                              f"has one group, 0")
            for j in range(first, min(last, L - 1) + 1):
                if s.tp not in table[j]:
                    errors.append(f"stages[{i}].tp is {s.tp} but {where.format(j=j)} has no "
                                  f"\"{s.tp}\" entry")
                    break
            else:
                kv = sum(getattr(table[j][s.tp], "kv_cache_bytes", 0)
                         for j in range(first, min(last, L - 1) + 1))
                if s.kv_cache_bytes != kv:
                    errors.append(f"stages[{i}].kv_cache_bytes is {s.kv_cache_bytes}; its "
                                  f"layers' costs[\"{s.tp}\"].kv_cache_bytes sum to {kv}")
            if self.workload.phase != "decode" and (s.prefill_s is not None or
                                                   s.prefill_boundary_bytes is not None):
                errors.append(f"stages[{i}] has prefill_s or prefill_boundary_bytes; only "
                              f"decode plans have them (this plan is {self.workload.phase})")
        for j, layer in enumerate(self.layers):
            for t, c in layer.costs.items():
                if getattr(c, "kv_cache_bytes", 0) > c.memory_bytes:
                    errors.append(f"layers[{j}].costs.\"{t}\".kv_cache_bytes is "
                                  f"{c.kv_cache_bytes}, more than its memory_bytes "
                                  f"{c.memory_bytes} (the KV cache is a part of it)")
        if self.workload.phase != "decode" and (self.predicted.ttft_s is not None
                                                or self.predicted.tpot_s is not None):
            errors.append(f"predicted.ttft_s and predicted.tpot_s are null for a "
                          f"{self.workload.phase} plan; only decode plans have them")
        if self.stages and expected != L:
            errors.append(f"stages end at layer {expected - 1}; layers[] has {L} layers, the "
                          f"last stage should end at {L - 1}")
        if not self.stages:
            errors.append("stages is empty; a plan has at least one stage")
        for name, b in self.baselines.items():
            if b.feasible and (b.latency_s is None or b.throughput_samples_per_s is None):
                errors.append(f"baselines.{name} is feasible but has no latency_s or "
                              f"throughput_samples_per_s")
        if self.links and set(self.links) != {"intra_node", "inter_node"}:
            errors.append(f"links has {sorted(self.links)}; it holds intra_node and inter_node")
        if errors:
            raise PlanFormatError("invalid plan: " + "; ".join(errors))


# ---------------------------------------------------------------------- the schema

_MISSING = object()


@dataclass(frozen=True)
class _Value:
    """One leaf of the schema: a JSON scalar of ``kind`` with its allowed range or values.

    ``minimum`` is inclusive unless ``strict``, ``maximum`` inclusive; ``choices`` lists the
    allowed strings;
    ``nullable`` allows ``null``; ``default`` (when given) makes the key optional.
    """

    kind: type
    minimum: float | None = None
    strict: bool = False
    choices: tuple | Callable | None = None
    nullable: bool = False
    default: Any = _MISSING
    doc: str = ""
    maximum: float | None = None

    def describe(self) -> str:
        if self.kind is str and isinstance(self.choices, tuple):
            return " or ".join(repr(c) for c in self.choices)
        name = {int: "int", float: "number", str: "string", bool: "bool"}[self.kind]
        if self.minimum is not None:
            name += f" {'>' if self.strict else '>='} {self.minimum:g}"
        if self.maximum is not None:
            name += f" and <= {self.maximum}"
        return name + (" or null" if self.nullable else "")


@dataclass(frozen=True)
class _Object:
    """A JSON object with these keys. Unknown keys inside it are ignored (DESIGN: more keys
    are welcome) and not kept; the top level keeps its unknown keys as ``Plan.extra``."""

    keys: Mapping[str, Any]
    default: Any = _MISSING
    nullable: bool = False


@dataclass(frozen=True)
class _List:
    item: Any
    length: int | None = None  # exact length (``[first, last]``)
    min_length: int = 0
    default: Any = _MISSING
    doc: str = ""


@dataclass(frozen=True)
class _Map:
    """A JSON object whose keys are free: tp degrees (``"4"``) when ``int_keys``, else names."""

    value: Any
    int_keys: bool = False
    default: Any = _MISSING


def _known_device(name: str) -> str | None:
    from cost_models.devices import UnknownDeviceError, lookup

    try:
        lookup(name)
    except UnknownDeviceError as e:
        return str(e)
    return None


_POS = _Value(int, 1)
_RATE = _Value(float, 0, strict=True)
_COUNT = _Value(int, 0)
_SECONDS = _Value(float, 0)
_COSTS = _Object({"compute_s": _SECONDS, "comm_s": _SECONDS, "memory_bytes": _COUNT})
_LAYER_COSTS = _Object({"compute_s": _SECONDS, "comm_s": _SECONDS, "memory_bytes": _COUNT,
                        "kv_cache_bytes": _Value(int, 0, default=0)})
_COLLECTIVE = _Object({"kind": _Value(str, choices=("all_reduce", "all_gather",
                                                    "reduce_scatter")),
                       "bytes": _COUNT, "after": _Value(str, default=""),
                       "algorithm": _Value(str, default="")})
_LINK = _Object({"latency_s": _SECONDS, "bandwidth_bytes_per_s": _Value(float, 0, strict=True)})

#: The one description of ``fx-planner/plan/v2``: ``Plan.from_dict`` (load) reads through it
#: and ``Plan.validate`` (save, and plans built in code) checks through it; the table in
#: docs/plan-format.md documents the same keys (a test keeps them in step).
PLAN_SCHEMA = _Object({
    "schema": _Value(str, choices=(SCHEMA,)),
    "model": _Object({"name": _Value(str), "num_layers": _POS, "fingerprint": _Value(str)}),
    "cluster": _Object({"num_devices": _Value(int, 1, maximum=MAX_DEVICES), "nodes": _POS,
                        "devices_per_node": _POS,
                        "device": _Value(str, choices=_known_device),
                        "groups": _List(_Object({
                            "nodes": _POS, "devices_per_node": _POS,
                            "device": _Value(str, choices=_known_device),
                            "costs": _List(_Map(_LAYER_COSTS, int_keys=True), default=[]),
                            "links": _Object({"intra_node": _LINK, "inter_node": _LINK},
                                             default={}),
                            "stage_workspace_bytes": _Map(_COUNT, int_keys=True, default={}),
                        }), default=[])}),
    "workload": _Object({"batch_size": _Value(int, 1, maximum=MAX_BATCH),
                         "seq_len": _Value(int, 1, maximum=MAX_TOKENS),
                         "dtype": _Value(str, choices=tuple(DTYPES)),
                         "phase": _Value(str, choices=PLAN_PHASES),
                         "objective": _Value(str, choices=OBJECTIVES),
                         "runtime": _Value(str, choices=RUNTIMES, default="eager")}),
    "parallelism": _Object({"dp": _POS, "pp": _POS, "microbatches": _POS,
                            "sequence_parallel": _Value(bool),
                            "microbatch_size": _Value(int, 1, default=1),
                            "zero": _Value(int, 0, maximum=3, default=0),
                            "schedule": _Value(str, choices=SCHEDULES, nullable=True,
                                               default=None),
                            "virtual_stages": _Value(int, 1, default=1)}),
    "stages": _List(_Object({
        "layers": _List(_COUNT, length=2, doc="[first, last]"),
        "tp": _POS,
        "devices": _List(_List(_COUNT, min_length=1), min_length=1),
        "predicted": _COSTS,
        "kv_heads_replicated": _Value(int, 1, default=1),
        "sharding": _Object({
            "templates": _List(_Object({
                "layers": _List(_COUNT, min_length=1),
                "strategy": _Value(str, default="greedy"),
                "params": _Map(_Object({
                    "dim": _COUNT, "blocks": _List(_POS, min_length=1),
                    "replicated_blocks": _List(_COUNT, default=[]),
                })),
                "collectives": _List(_COLLECTIVE),
            })),
            "boundary": _List(_COLLECTIVE, default=[]),
        }, default={"templates": [], "boundary": []}),
        "kv_cache_bytes": _Value(int, 0, default=0),
        "prefill_s": _Value(float, 0, nullable=True, default=None),
        "prefill_boundary_bytes": _Value(int, 0, nullable=True, default=None),
        "recompute": _Value(str, choices=RECOMPUTE, default="none"),
        "group": _Value(int, 0, default=0),
    }), min_length=1),
    "layers": _List(_Object({
        "name": _Value(str), "param_bytes": _COUNT, "costs": _Map(_LAYER_COSTS, int_keys=True),
        "source": _Value(str, choices=("predicted", "measured"), default="predicted"),
    }), min_length=1),
    "boundaries": _List(_COUNT),
    "predicted": _Object({"latency_s": _SECONDS, "throughput_samples_per_s": _RATE,
                          "peak_memory_bytes": _COUNT,
                          "ttft_s": _Value(float, 0, nullable=True, default=None),
                          "tpot_s": _Value(float, 0, nullable=True, default=None),
                          "mfu": _Value(float, 0, nullable=True, default=None)}),
    "baselines": _Map(_Object({
        "latency_s": _Value(float, 0, nullable=True),
        "throughput_samples_per_s": _Value(float, 0, nullable=True),
        "feasible": _Value(bool),
        "needs_memory_bytes": _Value(int, 0, nullable=True, default=None),
    })),
    "solver": _Object({"status": _Value(str, choices=("OPTIMAL", "FEASIBLE")),
                       "objective": _SECONDS, "bound": _Value(float),
                       "wall_s": _SECONDS, "gap": _Value(float, default=0.0),
                       "name": _Value(str, choices=("cp-sat", "reference"), default="cp-sat")}),
    "links": _Object({"intra_node": _LINK, "inter_node": _LINK}, default={}),
    "stage_workspace_bytes": _Map(_COUNT, int_keys=True, default={}),
    "borrowed": _List(_Object({
        "layer": _COUNT, "previous": _COUNT, "param": _Value(str),
        "bytes": _Map(_COUNT, int_keys=True),
    }), default=[]),
    "provenance": _Value(str, choices=("predicted", "measured", "mixed"), default="predicted"),
})

#: The further keys ``plan MODEL`` writes (kept in ``Plan.extra``); optional, but checked
#: when present because ``plan show``/``explain``/``run``/``compile`` read them.
EXTRA_SCHEMA = _Object({
    "alternatives": _List(_Object({
        "dp": _POS, "pp": _POS, "tp": _POS, "feasible": _Value(bool), "why": _Value(str),
        "microbatches": _Value(int, 1, default=None),
        "objective": _Value(float, 0, default=None), "ratio": _Value(float, 0, default=None),
        "latency_s": _Value(float, 0, default=None),
        "throughput_samples_per_s": _Value(float, 0, default=None),
        "peak_memory_bytes": _Value(int, 0, default=None),
    }), default=[]),
    "source": _Object({"model": _Value(str, nullable=True, default=None),
                       "overrides": _Map(_Value(object), default={})}, default={}),
    "workload_full": _Object({
        "batch_size": _POS, "seq_len": _POS, "dtype": _Value(str, choices=tuple(DTYPES)),
        "phase": _Value(str, choices=PLAN_PHASES), "objective": _Value(str, choices=OBJECTIVES),
        "context_len": _Value(int, 1, nullable=True, default=None),
        "memory_headroom": _Value(float, 0, default=0.1),
        "latency_slo_s": _Value(float, 0, strict=True, nullable=True, default=None),
        "runtime": _Value(str, choices=RUNTIMES, nullable=True, default=None),
    }, default={}),
    "arch": _Value(object, default=None),
    "tp_excluded": _Map(_Value(str), default={}),
})

_KNOWN_KEYS = frozenset(PLAN_SCHEMA.keys)


def stage_sharding(table: CostTable, first: int, last: int, tp: int, *,
                   is_last: bool) -> StageSharding | None:
    """One stage's record from the table's per-layer strategies: layers of one template
    share an entry; a sequence-parallel stage that is not the last all-gathers the hidden
    states it sends (``boundary``)."""
    if tp <= 1 or not table.sharding:
        return None
    groups: dict[int, list[int]] = {}
    for j in range(first, last + 1):
        groups.setdefault(table.sharding[j][tp].template, []).append(j)
    templates = []
    for js in groups.values():
        rec = table.sharding[js[0]][tp]
        templates.append(TemplateSharding(tuple(js), dict(rec.params), rec.collectives,
                                          rec.strategy))
    boundary: tuple[Collective, ...] = ()
    if table.sequence_parallel and not is_last and table.hidden_boundary_bytes:
        boundary = tuple(Collective("all_gather", b, "", "stage output", "boundary")
                         for b in table.hidden_boundary_bytes[last])
    return StageSharding(tp, tuple(templates), boundary, table.sequence_parallel)


def _plan_cluster(cluster) -> PlanCluster:
    """``cluster`` of a plan for a ``Cluster`` or a ``MixedCluster``."""
    groups = cluster.groups
    return PlanCluster(cluster.num_devices, cluster.nodes, groups[0].devices_per_node,
                       groups[0].device,
                       tuple(PlanGroup(g.nodes, g.devices_per_node, g.device) for g in groups)
                       if len(groups) > 1 else ())


def _cluster_json(cluster: PlanCluster) -> dict:
    """``cluster`` as JSON: ``groups`` only for a mixed cluster, each with its cost table
    when it has one."""
    d = {k: getattr(cluster, k) for k in ("num_devices", "nodes", "devices_per_node", "device")}
    if cluster.groups:
        d["groups"] = []
        for g in cluster.groups:
            entry = {"nodes": g.nodes, "devices_per_node": g.devices_per_node, "device": g.device}
            if g.costs:
                entry["costs"] = [{str(t): asdict(c) for t, c in costs.items()}
                                  for costs in g.costs]
                entry["links"] = {k: asdict(v) for k, v in g.links.items()}
                entry["stage_workspace_bytes"] = {str(t): b for t, b in
                                                  g.stage_workspace_bytes.items()}
            d["groups"].append(entry)
    return d


def _group_errors(cluster: PlanCluster) -> list[str]:
    """How ``cluster.groups`` contradicts the rest of ``cluster``."""
    groups, errors = cluster.groups, []
    if len(groups) < 2:
        errors.append(f"cluster.groups lists {len(groups)} group; a mixed cluster has two or "
                      f"more (drop cluster.groups for one device type)")
        return errors
    total = sum(g.nodes * g.devices_per_node for g in groups)
    if cluster.num_devices != total:
        errors.append(f"cluster.num_devices {cluster.num_devices} != {total}, the devices of "
                      f"cluster.groups (nodes × devices_per_node, summed)")
    nodes = sum(g.nodes for g in groups)
    if cluster.nodes != nodes:
        errors.append(f"cluster.nodes {cluster.nodes} != {nodes}, the nodes of cluster.groups")
    if (cluster.device, cluster.devices_per_node) != (groups[0].device,
                                                      groups[0].devices_per_node):
        errors.append(f"cluster.device and cluster.devices_per_node are the first group's "
                      f"({groups[0].device!r}, {groups[0].devices_per_node}) in a mixed "
                      f"cluster, got ({cluster.device!r}, {cluster.devices_per_node})")
    return errors


def _check(spec, value, key: str):
    """``value`` checked against ``spec``; returns it normalised (ints read as floats where a
    number is due, defaults filled in). Raises PlanFormatError naming ``key``."""
    where = key or "the plan"
    if isinstance(spec, _Object):
        if value is None and spec.nullable:
            return None
        if not isinstance(value, dict):
            raise PlanFormatError(f"key {where!r} must be an object, got {_show(value)}")
        out = {}
        for name, sub in spec.keys.items():
            path = f"{key}.{name}" if key else name
            if name in value:
                out[name] = _check(sub, value[name], path)
            elif getattr(sub, "default", _MISSING) is not _MISSING:
                out[name] = sub.default
            elif isinstance(sub, _Object):  # report the first missing leaf: 'solver.status'
                out[name] = _check(sub, {}, path)
            else:
                raise PlanFormatError(f"missing key {path!r} (see docs/plan-format.md)")
        return out
    if isinstance(spec, _List):
        if not isinstance(value, list):
            what = "[first, last]" if spec.doc else "a list"
            raise PlanFormatError(f"key {where!r} must be {what}, got {_show(value)}")
        if spec.length is not None and len(value) != spec.length:
            raise PlanFormatError(f"key {where!r} must be {spec.doc or f'{spec.length} items'}, "
                                  f"got {_show(value)}")
        if len(value) < spec.min_length:
            raise PlanFormatError(f"key {where!r} must have at least {spec.min_length} "
                                  f"entr{'y' if spec.min_length == 1 else 'ies'}, got {_show(value)}")
        return [_check(spec.item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(spec, _Map):
        if not isinstance(value, dict):
            raise PlanFormatError(f"key {where!r} must be an object, got {_show(value)}")
        out = {}
        for name, v in value.items():
            if spec.int_keys and not (_INT_KEY.match(name) and int(name) >= 1):
                raise PlanFormatError(f"{where} has key {name!r}; keys are tp degrees written "
                                      f"as strings, e.g. \"4\"")
            out[int(name) if spec.int_keys else name] = _check(spec.value, v, f"{key}.{name}")
        return out
    # a leaf
    if spec.kind is object:
        return value
    if value is None and spec.nullable:
        return None
    if spec.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    kind = {int: "int", float: "float", str: "str", bool: "bool"}[spec.kind]
    if not isinstance(value, spec.kind) or (spec.kind is not bool and isinstance(value, bool)):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise PlanFormatError(f"key {where!r} must be {kind}, got "
                              f"{type(value).__name__} {shown}")
    if spec.kind is float and not math.isfinite(value):
        raise PlanFormatError(f"key {where!r} must be a finite number, got {value!r}")
    if (spec.minimum is not None and (value <= spec.minimum if spec.strict else value < spec.minimum)) \
            or (spec.maximum is not None and value > spec.maximum):
        raise PlanFormatError(f"key {where!r} must be {spec.describe()}, got {value!r}")
    if isinstance(spec.choices, tuple) and value not in spec.choices:
        raise PlanFormatError(f"key {where!r} is {value!r}; it must be {spec.describe()}")
    if callable(spec.choices) and (problem := spec.choices(value)):
        raise PlanFormatError(f"key {where!r}: {problem}")
    return value


_INT_KEY = re.compile(r"^[0-9]{1,6}$")


def _check_extra(extra: Mapping) -> None:
    """The further keys of ``plan MODEL`` (``EXTRA_SCHEMA``) and how they must agree."""
    checked = _check(EXTRA_SCHEMA, {k: v for k, v in extra.items() if k in EXTRA_SCHEMA.keys}, "")
    for i, alt in enumerate(checked["alternatives"]):
        if alt["feasible"]:
            for key in ("microbatches", "objective", "ratio", "latency_s",
                        "throughput_samples_per_s"):
                if alt[key] is None:
                    raise PlanFormatError(f"missing key 'alternatives[{i}].{key}' (a feasible "
                                          "alternative has its figures; see docs/plan-format.md)")
    if checked["workload_full"]:
        try:
            Workload(**checked["workload_full"])
        except SpecError as e:
            raise PlanFormatError(f"workload_full: {e}") from None


def is_plan_file(path: str | Path) -> bool:
    """Whether ``path`` is a file that holds a plan (a JSON object whose ``schema`` is an
    ``fx-planner/plan/...`` name), i.e. one that ``plan MODEL --out`` may overwrite."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(64 * 2**20))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and isinstance(data.get("schema"), str) and \
        data["schema"].startswith("fx-planner/plan/")


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and
    ``os.replace``: readers see the old file or the complete new one, and a failure leaves
    no partial file. Missing parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        mode = path.stat().st_mode & 0o777
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_fingerprint(plan: Plan, traced) -> None:
    """Refuse to apply ``plan`` to a model that does not trace to the plan's fingerprint.

    Raises:
        PlanFormatError: the model (or its example input shapes) differs from the planned one.
    """
    if plan.model.fingerprint != traced.fingerprint:
        raise PlanFormatError(
            f"this plan was made for {plan.model.name!r} with fingerprint {plan.model.fingerprint}, "
            f"but the model given traces to {traced.fingerprint} ({traced.name}, inputs "
            f"{traced.input_shapes}). A plan only applies to the model and input shapes it was "
            "made for: re-plan with `plan MODEL --out plan.json` (same --set, --batch and --seq)."
        )
    if plan.model.num_layers != len(traced.layers):
        raise PlanFormatError(
            f"plan has {plan.model.num_layers} layers but the model has {len(traced.layers)}; "
            "re-plan with `plan MODEL --out plan.json`"
        )
