"""The plan file: schema ``fx-planner/plan/v1`` (documented key by key in docs/plan-format.md).

>>> plan = Plan.load("plan.json")            # doctest: +SKIP
>>> plan.parallelism.dp, [s.tp for s in plan.stages]   # doctest: +SKIP
(1, [4, 4])
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from planner.cost_table import CostTable, LayerCost, Link

__all__ = [
    "SCHEMA",
    "PlanFormatError",
    "check_fingerprint",
    "PlanModel",
    "PlanCluster",
    "PlanWorkload",
    "Parallelism",
    "StageCosts",
    "PlanStage",
    "PlanLayer",
    "Predicted",
    "BaselineFigures",
    "SolverInfo",
    "Plan",
]

SCHEMA = "fx-planner/plan/v1"


_KNOWN_KEYS = frozenset({
    "schema", "model", "cluster", "workload", "parallelism", "stages", "layers", "boundaries",
    "predicted", "baselines", "solver", "links", "stage_workspace_bytes", "provenance",
})


class PlanFormatError(ValueError):
    """A plan file that is not a valid ``fx-planner/plan/v1`` plan; names the key to fix."""


@dataclass(frozen=True)
class PlanModel:
    name: str
    num_layers: int
    fingerprint: str


@dataclass(frozen=True)
class PlanCluster:
    num_devices: int
    nodes: int
    devices_per_node: int
    device: str


@dataclass(frozen=True)
class PlanWorkload:
    batch_size: int
    seq_len: int
    dtype: str
    phase: str
    objective: str


@dataclass(frozen=True)
class Parallelism:
    dp: int
    pp: int
    microbatches: int
    sequence_parallel: bool
    microbatch_size: int = 1


@dataclass(frozen=True)
class StageCosts:
    compute_s: float
    comm_s: float
    memory_bytes: int


@dataclass(frozen=True)
class PlanStage:
    layers: tuple[int, int]
    tp: int
    devices: tuple[tuple[int, ...], ...]
    predicted: StageCosts
    kv_heads_replicated: int = 1


@dataclass(frozen=True)
class PlanLayer:
    name: str
    param_bytes: int
    costs: Mapping[int, StageCosts]
    source: str = "predicted"  # "measured" (profiled on this device) or "predicted"


@dataclass(frozen=True)
class Predicted:
    latency_s: float
    throughput_samples_per_s: float
    peak_memory_bytes: int


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
    provenance: str = "predicted"
    schema: str = SCHEMA
    # Further top-level keys (alternatives for `plan explain`, how to rebuild the model,
    # the full workload, the arch): kept verbatim through save/load.
    extra: Mapping[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_solution(cls, solution, table: CostTable, cluster, workload, *, model_name: str,
                      fingerprint: str, baselines: Mapping | None = None) -> Plan:
        """Assemble a plan from a ``Solution`` and the table of its microbatch size.

        Args:
            solution: ``planner.solver.Solution``.
            table: the ``CostTable`` the solution was priced with.
            cluster: ``planner.cluster.Cluster``.
            workload: ``planner.cluster.Workload``.
            model_name: shown by ``plan show``.
            fingerprint: hash of the traced graph and shapes.
            baselines: ``planner.baselines.baselines(...)`` output, optional.
        """
        def costs(c: LayerCost) -> StageCosts:
            return StageCosts(c.compute_s, c.comm_s, c.memory_bytes)

        layers = tuple(
            PlanLayer(table.name(j), table.param_bytes[j] if table.param_bytes else 0,
                      {t: costs(c) for t, c in sorted(table.costs[j].items())})
            for j in range(table.num_layers))
        s = solution.solver
        return cls(
            model=PlanModel(model_name, table.num_layers, fingerprint),
            cluster=PlanCluster(cluster.num_devices, cluster.nodes, cluster.devices_per_node,
                                cluster.device),
            workload=PlanWorkload(workload.batch_size, workload.seq_len, workload.dtype,
                                  workload.phase, workload.objective),
            parallelism=Parallelism(solution.dp, solution.pp, solution.microbatches,
                                    solution.sequence_parallel, solution.microbatch_size),
            stages=tuple(PlanStage((st.first, st.last), st.tp, st.devices,
                                   StageCosts(st.compute_s, st.comm_s, st.memory_bytes),
                                   st.kv_heads_replicated) for st in solution.stages),
            layers=layers,
            boundaries=table.boundary_bytes,
            predicted=Predicted(solution.predicted.latency_s,
                                solution.predicted.throughput_samples_per_s,
                                solution.predicted.peak_memory_bytes),
            baselines={name: BaselineFigures(b.latency_s, b.throughput_samples_per_s,
                                             b.feasible, b.needs_memory_bytes)
                       for name, b in (baselines or {}).items()},
            solver=SolverInfo(s.status, s.objective, s.bound, s.wall_s, s.gap, s.solver),
            links={"intra_node": table.intra_node, "inter_node": table.inter_node},
            stage_workspace_bytes=dict(table.stage_workspace_bytes),
        )

    def cost_table(self) -> CostTable:
        """The cost table stored in the plan (what the solver saw), for audits and re-solves."""
        return CostTable(
            costs=tuple({t: LayerCost(c.compute_s, c.comm_s, c.memory_bytes)
                         for t, c in layer.costs.items()} for layer in self.layers),
            boundary_bytes=self.boundaries,
            intra_node=self.links["intra_node"],
            inter_node=self.links["inter_node"],
            microbatch_size=self.parallelism.microbatch_size,
            microbatches=self.parallelism.microbatches,
            stage_workspace_bytes=dict(self.stage_workspace_bytes),
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
            "cluster": asdict(self.cluster),
            "workload": asdict(self.workload),
            "parallelism": asdict(self.parallelism),
            "stages": [{"layers": list(s.layers), "tp": s.tp,
                        "devices": [list(r) for r in s.devices],
                        "predicted": asdict(s.predicted),
                        "kv_heads_replicated": s.kv_heads_replicated} for s in self.stages],
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
            "provenance": self.provenance,
        }
        for key, value in self.extra.items():
            d.setdefault(key, value)
        return d

    def save(self, path: str | Path) -> None:
        """Validate, then write the plan as indented JSON."""
        self.validate()
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

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
        except json.JSONDecodeError as e:
            raise PlanFormatError(f"plan file {path} is not valid JSON: {e}") from None
        plan = cls.from_dict(data)
        plan.validate()
        return plan

    @classmethod
    def from_dict(cls, data) -> Plan:
        """Build a plan from parsed JSON, checking every key of the schema and its type."""
        if not isinstance(data, dict):
            raise PlanFormatError("a plan file holds one JSON object")
        schema = data.get("schema")
        if schema != SCHEMA:
            raise PlanFormatError(f"schema is {schema!r}; this planner reads {SCHEMA!r} "
                                  f"(re-create the plan with `plan MODEL --out`)")
        r = _Reader(data)
        stages = tuple(
            PlanStage(
                layers=_pair(r.get(f"stages[{i}].layers", list), f"stages[{i}].layers"),
                tp=r.get(f"stages[{i}].tp", int),
                devices=tuple(tuple(_ints(g, f"stages[{i}].devices"))
                              for g in r.get(f"stages[{i}].devices", list)),
                predicted=_costs(r, f"stages[{i}].predicted"),
                kv_heads_replicated=r.get(f"stages[{i}].kv_heads_replicated", int, default=1),
            ) for i in range(len(r.get("stages", list))))
        layers = []
        for j in range(len(r.get("layers", list))):
            raw = r.get(f"layers[{j}].costs", dict)
            costs = {}
            for key in raw:
                if not key.isdigit():
                    raise PlanFormatError(f"layers[{j}].costs has key {key!r}; keys are tp "
                                          f"degrees written as strings, e.g. \"4\"")
                costs[int(key)] = _costs(r, f"layers[{j}].costs.{key}")
            layers.append(PlanLayer(r.get(f"layers[{j}].name", str),
                                    r.get(f"layers[{j}].param_bytes", int), costs,
                                    r.get(f"layers[{j}].source", str, default="predicted")))
        links = {k: Link(r.get(f"links.{k}.latency_s", float),
                         r.get(f"links.{k}.bandwidth_bytes_per_s", float))
                 for k in r.get("links", dict, default={})}
        return cls(
            model=PlanModel(r.get("model.name", str), r.get("model.num_layers", int),
                            r.get("model.fingerprint", str)),
            cluster=PlanCluster(r.get("cluster.num_devices", int), r.get("cluster.nodes", int),
                                r.get("cluster.devices_per_node", int),
                                r.get("cluster.device", str)),
            workload=PlanWorkload(r.get("workload.batch_size", int),
                                  r.get("workload.seq_len", int), r.get("workload.dtype", str),
                                  r.get("workload.phase", str), r.get("workload.objective", str)),
            parallelism=Parallelism(r.get("parallelism.dp", int), r.get("parallelism.pp", int),
                                    r.get("parallelism.microbatches", int),
                                    r.get("parallelism.sequence_parallel", bool),
                                    r.get("parallelism.microbatch_size", int, default=1)),
            stages=stages,
            layers=tuple(layers),
            boundaries=tuple(_ints(r.get("boundaries", list), "boundaries")),
            predicted=Predicted(r.get("predicted.latency_s", float),
                                r.get("predicted.throughput_samples_per_s", float),
                                r.get("predicted.peak_memory_bytes", int)),
            baselines={k: BaselineFigures(
                r.get(f"baselines.{k}.latency_s", float, optional=True),
                r.get(f"baselines.{k}.throughput_samples_per_s", float, optional=True),
                r.get(f"baselines.{k}.feasible", bool),
                r.get(f"baselines.{k}.needs_memory_bytes", int, optional=True, default=None))
                for k in r.get("baselines", dict)},
            solver=SolverInfo(r.get("solver.status", str), r.get("solver.objective", float),
                              r.get("solver.bound", float), r.get("solver.wall_s", float),
                              r.get("solver.gap", float, default=0.0),
                              r.get("solver.name", str, default="cp-sat")),
            links=links,
            stage_workspace_bytes={int(k): v for k, v in
                                   r.get("stage_workspace_bytes", dict, default={}).items()},
            provenance=r.get("provenance", str, default="predicted"),
            extra={k: v for k, v in data.items() if k not in _KNOWN_KEYS},
        )

    def validate(self) -> None:
        """Check that the plan's parts agree with each other.

        Raises:
            PlanFormatError: naming the key and what to change.
        """
        L, par = len(self.layers), self.parallelism
        errors = []
        if self.model.num_layers != L:
            errors.append(f"model.num_layers is {self.model.num_layers} but layers[] has {L} "
                          f"entries")
        if len(self.boundaries) != max(L - 1, 0):
            errors.append(f"boundaries has {len(self.boundaries)} entries; {L} layers have "
                          f"{max(L - 1, 0)} cuts")
        if self.cluster.num_devices != self.cluster.nodes * self.cluster.devices_per_node:
            errors.append(f"cluster.num_devices {self.cluster.num_devices} != nodes "
                          f"{self.cluster.nodes} × devices_per_node "
                          f"{self.cluster.devices_per_node}")
        if par.pp != len(self.stages):
            errors.append(f"parallelism.pp is {par.pp} but stages[] has {len(self.stages)}")
        if self.workload.batch_size % par.dp or \
                (self.workload.batch_size // par.dp) % par.microbatches:
            errors.append(f"parallelism: dp {par.dp} × microbatches {par.microbatches} must "
                          f"divide workload.batch_size {self.workload.batch_size}")
        expected, used = 0, set()
        for i, s in enumerate(self.stages):
            first, last = s.layers
            if first != expected or last < first:
                errors.append(f"stages[{i}].layers is [{first}, {last}]; stages must cover "
                              f"layers contiguously, this one should start at {expected}")
            expected = last + 1
            if len(s.devices) != par.dp:
                errors.append(f"stages[{i}].devices lists {len(s.devices)} replicas; "
                              f"parallelism.dp is {par.dp}")
            for r, group in enumerate(s.devices):
                if len(group) != s.tp:
                    errors.append(f"stages[{i}].devices[{r}] has {len(group)} ids for tp {s.tp}")
                for d in group:
                    if not 0 <= d < self.cluster.num_devices:
                        errors.append(f"stages[{i}].devices[{r}] uses device {d}; the cluster "
                                      f"has devices 0..{self.cluster.num_devices - 1}")
                    elif d in used:
                        errors.append(f"stages[{i}].devices[{r}] reuses device {d}")
                    used.add(d)
            for j in range(first, min(last, L - 1) + 1):
                if s.tp not in self.layers[j].costs:
                    errors.append(f"stages[{i}].tp is {s.tp} but layers[{j}].costs has no "
                                  f"\"{s.tp}\" entry")
                    break
        if self.stages and expected != L:
            errors.append(f"stages end at layer {expected - 1}; layers[] has {L} layers, the "
                          f"last stage should end at {L - 1}")
        if not self.stages:
            errors.append("stages is empty; a plan has at least one stage")
        if errors:
            raise PlanFormatError("invalid plan: " + "; ".join(errors))


# ---------------------------------------------------------------------- reading helpers

_MISSING = object()


class _Reader:
    """Typed access to nested keys (``"stages[1].tp"``) with errors that name the key."""

    def __init__(self, data: dict) -> None:
        self.data = data

    def get(self, key: str, kind: type, default=_MISSING, optional: bool = False):
        node = self.data
        for part in key.replace("[", ".[").split("."):
            if part.startswith("["):
                node = node[int(part[1:-1])]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            elif default is not _MISSING:
                return default
            else:
                raise PlanFormatError(f"missing key {key!r} (see docs/plan-format.md)")
        if node is None and optional:
            return None
        if kind is float and isinstance(node, int) and not isinstance(node, bool):
            node = float(node)
        if not isinstance(node, kind) or (kind is int and isinstance(node, bool)):
            raise PlanFormatError(f"key {key!r} must be {kind.__name__}, got "
                                  f"{type(node).__name__} {node!r}")
        return node


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


def _ints(values, key: str) -> list[int]:
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                               for v in values):
        raise PlanFormatError(f"key {key!r} must be a list of integers")
    return values


def _pair(values, key: str) -> tuple[int, int]:
    values = _ints(values, key)
    if len(values) != 2:
        raise PlanFormatError(f"key {key!r} must be [first, last], got {values}")
    return (values[0], values[1])


def _costs(r: _Reader, key: str) -> StageCosts:
    return StageCosts(r.get(f"{key}.compute_s", float), r.get(f"{key}.comm_s", float),
                      r.get(f"{key}.memory_bytes", int))
