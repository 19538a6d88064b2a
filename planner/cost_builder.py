"""Glue from a TracedModel to the solver's cost tables, through ``cost_models``.

``CostBuilder(traced, cluster, workload)`` is a ``CostTableBuilder``: called with a
microbatch size and count it returns the ``CostTable`` the solver optimises over, every
entry from ``cost_models.layer_cost`` (measured where a profile of this device is given,
predicted from the calibrated roofline otherwise) and every boundary from the traced cut
points. Tables are cached per (microbatch size, microbatches).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cost_models.collectives import link_alpha_beta, load_calibration
from cost_models.layer_cost import TracedShape, layer_cost, layer_memory_at
from cost_models.memory import kv_heads_per_device, stage_workspace_bytes
from cost_models.roofline import efficiencies_for
from planner.cluster import Cluster, Workload
from planner.cost_table import CostTable, LayerCost, Link
from planner.tracing import TracedModel

__all__ = ["CostBuilder", "allowed_tp_degrees"]


def allowed_tp_degrees(traced: TracedModel, cluster: Cluster) -> tuple[int, ...]:
    """TP degrees that divide the node and the model's heads and FFN width.

    KV heads need not divide: with ``tp > kv_heads`` each KV head is replicated
    ``tp / kv_heads`` times (recorded in the plan), provided ``kv_heads`` divides ``tp``.
    Models without heads (MLP) split their hidden/FFN width; a CNN runs at tp 1.
    """
    per_node = cluster.devices_per_node
    candidates = [t for t in range(1, per_node + 1) if per_node % t == 0]
    arch = traced.arch
    if arch is None or arch.family == "cnn":
        return (1,)
    out = []
    for t in candidates:
        if arch.num_heads is not None:
            if arch.num_heads % t:
                continue
            kv = arch.num_kv_heads or arch.num_heads
            if kv % t and t % kv:
                continue
        if arch.ffn_hidden_size and arch.ffn_hidden_size % t:
            continue
        out.append(t)
    return tuple(out)


@dataclass
class CostBuilder:
    """Builds ``CostTable``s for ``traced`` on ``cluster`` under ``workload``."""

    traced: TracedModel
    cluster: Cluster
    workload: Workload
    sequence_parallel: bool = False
    profile: object | None = None  # cost_models.profiler.ModelProfile of this device
    _cache: dict = field(default_factory=dict, repr=False)
    _sources: dict = field(default_factory=dict, repr=False)
    _times: dict = field(default_factory=dict, repr=False)
    _group_index: tuple | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.spec = self.cluster.device_spec
        if self.profile is not None and not _same_device(self.profile.device, self.spec.name):
            raise ValueError(
                f"the profile was measured on {self.profile.device} but the cluster's devices are "
                f"{self.spec.name}: measured costs only apply to plans for the device they were "
                "measured on (drop --profile, or profile on that device)"
            )
        self.tp_degrees = allowed_tp_degrees(self.traced, self.cluster)
        self.traced_shape = TracedShape(self.traced.batch_size, self.traced.seq_len,
                                        _dtype_bytes(self.traced.dtype))
        self.calibration = load_calibration(self.spec.backend) if self.spec.name == "cpu" else None
        # Read once: efficiencies_for goes to the on-disk calibration on every call.
        self.efficiencies = efficiencies_for(self.spec)

    def __call__(self, microbatch_size: int, microbatches: int) -> CostTable:
        key = (microbatch_size, microbatches)
        if key not in self._cache:
            self._cache[key] = self._build(microbatch_size, microbatches)
        return self._cache[key]

    def memory_table(self, microbatch_size: int, microbatches: int) -> CostTable:
        """The table's memory only (every time 0): what the solver's infeasibility
        diagnosis needs, at a fraction of the cost of pricing every layer's time."""
        return self._build(microbatch_size, microbatches, memory_only=True)

    def sources(self, microbatch_size: int, microbatches: int) -> list[str]:
        """Per layer, where its costs came from: ``"measured"`` or ``"predicted"``."""
        self(microbatch_size, microbatches)
        return self._sources[(microbatch_size, microbatches)]

    def _groups(self) -> tuple[list[int], list[int]]:
        """Identical layers (same work, same parameters, same measurement) cost the same:
        ``group[j]`` is layer ``j``'s group, ``first[g]`` the first layer of group ``g``."""
        if self._group_index is None:
            layers = self.traced.layers
            measured = self.profile.layers if self.profile is not None else [None] * len(layers)
            index: dict = {}
            group, first = [], []
            for j, layer in enumerate(layers):
                key = (_layer_key(layer), measured[j].time_s if measured[j] else None)
                if key not in index:
                    index[key] = len(first)
                    first.append(j)
                group.append(index[key])
            self._group_index = (group, first)
        return self._group_index

    def _resident(self, layer, tp: int, mb: int, m: int) -> int:
        """``layer_cost(...).memory_bytes`` without pricing the time (same arguments)."""
        return int(layer_memory_at(layer, self.traced.arch, tp, self.workload, mb, m,
                                   self.traced_shape).resident)

    def _build(self, mb: int, m: int, memory_only: bool = False) -> CostTable:
        w, layers = self.workload, self.traced.layers
        measured = self.profile.layers if self.profile is not None else [None] * len(layers)
        group, first = self._groups()
        rows, sources = [], []
        for j in first:
            layer, row = layers[j], {}
            source = "predicted"
            for tp in self.tp_degrees:
                if memory_only:
                    row[tp] = LayerCost(0.0, 0.0, self._resident(layer, tp, mb, m))
                    continue
                # Times do not depend on the microbatch count: priced once per size.
                timed = self._times.get((j, tp, mb))
                if timed is None:
                    est = layer_cost(layer, self.traced.arch, tp, w, self.spec, mb, m,
                                     traced=self.traced_shape,
                                     sequence_parallel=self.sequence_parallel,
                                     efficiencies=self.efficiencies,
                                     calibration=self.calibration, measured=measured[j])
                    timed = self._times[(j, tp, mb)] = (est.compute_s, est.comm_s, est.source)
                    memory = int(est.memory_bytes)
                else:
                    memory = self._resident(layer, tp, mb, m)
                row[tp] = LayerCost(timed[0], timed[1], memory)
                source = timed[2]
            rows.append(row)
            sources.append(source)
        costs = [rows[g] for g in group]
        tokens_traced = self.traced_shape.tokens
        tokens_step = mb * (1 if w.phase == "decode" else w.seq_len)
        ratio = tokens_step / tokens_traced
        dtype_scale = w.dtype_bytes / self.traced_shape.dtype_bytes
        boundary = tuple(int(c.bytes * ratio * dtype_scale) for c in self.traced.cuts)
        # one layer of each group has every group's peak and output (identical layers)
        distinct = [layers[j] for j in first]
        workspace = {tp: stage_workspace_bytes(distinct, tp, m, token_ratio=ratio,
                                               dtype_scale=dtype_scale)
                     for tp in self.tp_degrees}
        arch = self.traced.arch
        replicated = {}
        if arch is not None and arch.num_kv_heads:
            for tp in self.tp_degrees:
                per_device = kv_heads_per_device(arch.num_kv_heads, tp)
                if per_device * tp > arch.num_kv_heads:
                    replicated[tp] = per_device * tp // arch.num_kv_heads
        intra = link_alpha_beta(self.spec, "intra")
        inter = link_alpha_beta(self.spec, "inter")
        if not memory_only:
            self._sources[(mb, m)] = [sources[g] for g in group]
        return CostTable(
            costs=tuple(costs),
            boundary_bytes=boundary,
            intra_node=Link(intra.alpha_s, intra.bandwidth),
            inter_node=Link(inter.alpha_s, inter.bandwidth),
            microbatch_size=mb,
            microbatches=m,
            stage_workspace_bytes=workspace,
            kv_heads_replicated=replicated,
            layer_names=tuple(layer.name for layer in layers),
            param_bytes=tuple(layer.param_bytes for layer in layers),
            sequence_parallel=self.sequence_parallel,
        )


def _same_device(profiled: str, catalogue_name: str) -> bool:
    """A ``cpu`` profile applies to the ``cpu`` entry only; a ``cuda`` profile to GPU entries
    (the planner cannot tell an H100 from an A100 by the string; plan for the GPU you have)."""
    if profiled == "cpu" or catalogue_name == "cpu":
        return profiled == catalogue_name
    return profiled.startswith("cuda")


def _layer_key(layer) -> tuple:
    """Everything ``layer_cost`` reads from a layer."""
    return (layer.kind, layer.param_bytes, layer.flops, layer.activation_bytes,
            layer.peak_activation_bytes, layer.output_bytes, layer.buffer_bytes,
            tuple(sorted(layer.op_stats.items())))


def _dtype_bytes(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 4)
