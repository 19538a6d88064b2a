"""Glue from a TracedModel to the solver's cost tables, through ``cost_models``.

``CostBuilder(traced, cluster, workload)`` is a ``CostTableBuilder``: called with a
microbatch size and count it returns the ``CostTable`` the solver optimises over, every
entry from ``cost_models.layer_cost`` (measured where a profile of this device is given,
predicted from the calibrated roofline otherwise) and every boundary from the traced cut
points. Tables are cached per (microbatch size, microbatches).

Tensor parallelism comes from the graph: for every distinct layer and every tp that
divides the node, ``planner.sharding.choose`` picks the layer's strategy (priced here
with ``layer_cost``) and the table prices exactly that strategy. A tp degree is offered
when some layer has a strategy that shards something and beats replicating that layer in
time or in memory; the others are listed with the reason in ``excluded_tp``.

``CostBuilder(traced, cluster, other_workload, strategies=builder)`` prices the strategies
``builder`` chose instead of choosing again: a decode plan's time to first token is its
prompt's prefill on the same placement, run with the strategy the plan records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cost_models.collectives import link_alpha_beta, load_calibration
from cost_models.layer_cost import (
    TracedShape,
    collectives_at,
    layer_cost,
    layer_memory_at,
    nccl_pick,
)
from cost_models.memory import LayerMemory, stage_workspace_bytes
from cost_models.roofline import efficiencies_for
from cost_models.sharded import ShardedLayer
from planner import sharding
from planner.cluster import Cluster, Workload
from planner.cost_table import Borrow, CostTable, LayerCost, Link
from planner.tracing import TracedModel

__all__ = ["CostBuilder", "candidate_tp_degrees"]


def candidate_tp_degrees(cluster: Cluster) -> tuple[int, ...]:
    """The tp degrees a tensor-parallel group may have: divisors of the node's devices
    (a group stays inside one node)."""
    per_node = cluster.devices_per_node
    return tuple(t for t in range(1, per_node + 1) if per_node % t == 0)


@dataclass
class CostBuilder:
    """Builds ``CostTable``s for ``traced`` on ``cluster`` under ``workload``.

    Attributes:
        traced: the traced model.
        cluster: the cluster (its device and links).
        workload: phase, lengths, dtype.
        sequence_parallel: whether the tables assume sequence parallelism.
        profile: a ``cost_models.profiler.ModelProfile`` measured on this device, or None.
        strategies: another builder for the same traced model, cluster, sequence
            parallelism and profile (typically another phase) whose tensor-parallel
            strategies, tp degrees and borrowed tensors this one prices as they are,
            instead of choosing its own for ``workload``; None chooses.
        decode_traced: for a decode workload, the model's one-token step
            (``planner.decode.trace_decode_step``: the graph ``plan run`` generates with,
            its cache write and mask included); every layer's compute is priced from its
            ops, paired with ``traced``'s layers by position. ``None`` (or another
            phase): the prefill-shaped layers scaled to one token.
    """

    traced: TracedModel
    cluster: Cluster
    workload: Workload
    sequence_parallel: bool = False
    profile: object | None = None  # cost_models.profiler.ModelProfile of this device
    strategies: CostBuilder | None = field(default=None, repr=False)
    decode_traced: TracedModel | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)
    _sources: dict = field(default_factory=dict, repr=False)
    _times: dict = field(default_factory=dict, repr=False)
    _group_index: tuple | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.spec = self.cluster.device_spec
        if isinstance(self.workload, Workload):  # the runtime priced: given, or the default
            self.workload = self.workload.with_runtime(self.cluster)
        if self.profile is not None and not _same_device(self.profile.device, self.spec.name):
            raise ValueError(
                f"the profile was measured on {self.profile.device} but the cluster's devices are "
                f"{self.spec.name}: measured costs only apply to plans for the device they were "
                "measured on (drop --profile, or profile on that device)"
            )
        self.traced_shape = TracedShape(self.traced.batch_size, self.traced.seq_len,
                                        _dtype_bytes(self.traced.dtype))
        self._decode_layer, self.compute_shape = {}, None
        step = self.decode_traced
        if step is not None and self.workload.phase == "decode":
            if len(step.layers) != len(self.traced.layers):
                raise ValueError(f"the decode step of {self.traced.name} has "
                                 f"{len(step.layers)} layers and the model "
                                 f"{len(self.traced.layers)}; they must pair one to one")
            self._decode_layer = {id(layer): d for layer, d in zip(self.traced.layers, step.layers)}
            self.compute_shape = TracedShape(step.batch_size, step.seq_len,
                                             _dtype_bytes(step.dtype))
        self.calibration = load_calibration(self.spec.backend) if self.spec.name == "cpu" else None
        # Read once: efficiencies_for goes to the on-disk calibration on every call.
        self.efficiencies = efficiencies_for(self.spec)
        if self.strategies is None:
            self._analyse()
        else:
            self._reuse(self.strategies)

    def _reuse(self, other: CostBuilder) -> None:
        """Take ``other``'s chosen strategies (``sharded``, ``records``), tp degrees and
        borrowed tensors as they are; they are keyed by layer group, so the groups are
        ``other``'s too."""
        if other.traced is not self.traced or other.cluster != self.cluster \
                or other.sequence_parallel != self.sequence_parallel \
                or other.profile is not self.profile:
            raise ValueError("a builder reuses the strategies of a builder for the same traced "
                             "model, cluster, sequence parallelism and profile")
        self._group_index = other._groups()
        self.sharded = dict(other.sharded)
        self.records = dict(other.records)
        self.excluded_tp = dict(other.excluded_tp)
        self.tp_degrees = other.tp_degrees
        self.borrows = list(other.borrows)

    def _analyse(self) -> None:
        """Choose every distinct layer's strategy at every candidate tp (``sharded``) and
        keep the tp degrees that some layer can use (``tp_degrees``, ``excluded_tp``)."""
        _, first = self._groups()
        self.sharded: dict[tuple[int, int], ShardedLayer] = {}
        self.records: dict[tuple[int, int], sharding.Analysis] = {}
        self.excluded_tp: dict[int, str] = {}
        allowed = [1]
        layers, gm = self.traced.layers, self.traced.graph_module
        for tp in candidate_tp_degrees(self.cluster)[1:]:
            useful, why = False, "no layer has a parameter the analysis can shard"
            chosen: dict = {}  # a parameter shared by layers (tied tables) is placed once
            for g, j in enumerate(first):
                layer = layers[j]
                shared = {t: chosen[t] for t in sharding.same_params(gm, layer.tied_params)
                          if t in chosen}
                try:
                    best, name, candidates = sharding.choose(
                        self.traced, j, tp, lambda a, layer=layer, tp=tp: self._price(
                            layer, tp, sharding.to_sharded(a, layer, gm=gm)),
                        sequence_parallel=self.sequence_parallel, fixed=shared)
                except Exception as exc:  # an analysis must never stop planning
                    raise RuntimeError(f"sharding analysis of {layer.name} at tp {tp} "
                                       f"failed: {exc}") from exc
                chosen.update(best.params)
                shard = sharding.to_sharded(best, layer, name, gm=gm)
                self.sharded[(g, tp)] = shard
                self.records[(g, tp)] = best
                if best.sharded_params:
                    whole = sharding.to_sharded(candidates["replicate"], layer, gm=gm)
                    faster = self._price(layer, tp, shard) < self._price(layer, tp, whole)
                    if faster or shard.param_bytes < whole.param_bytes:
                        useful = True
                    else:
                        why = (f"sharding {layer.name} at tp {tp} is neither faster nor "
                               "smaller than replicating it")
            if useful:
                allowed.append(tp)
            else:
                self.excluded_tp[tp] = why
        self.tp_degrees = tuple(allowed)
        self.borrows = self._borrows()

    def _borrows(self) -> list[tuple[int, int, str, dict[int, int]]]:
        """``(layer, previous reader, param, {tp: local bytes as traced})`` for every tensor
        a layer reads but an earlier layer owns (``CostTable.borrowed``): at tp 1 the whole
        tensor, above it the borrower's share under its chosen placement."""
        layers, gm = self.traced.layers, self.traced.graph_module
        group, _ = self._groups()
        readers: dict[str, list[int]] = {}  # canonical name -> layers reading the tensor
        for j, layer in enumerate(layers):
            for name in (*layer.params, *layer.tied_params):
                key = min(sharding.same_params(gm, [name]))
                if j not in readers.setdefault(key, []):
                    readers[key].append(j)
        out = []
        for j, layer in enumerate(layers):
            for name in layer.tied_params:
                names = sharding.same_params(gm, [name])
                seen = readers[min(names)]
                earlier = [i for i in seen if i < j]
                if not earlier:
                    continue
                p = gm.get_parameter(name)
                by_tp = {1: p.numel() * p.element_size()}
                for tp in self.tp_degrees[1:]:
                    local = self.records[(group[j], tp)].param_bytes
                    by_tp[tp] = next((local[n] for n in names if n in local), by_tp[1])
                out.append((j, max(earlier), name, by_tp))
        return out

    def _price(self, layer, tp: int, shard: ShardedLayer) -> float:
        """Seconds of one sequence through ``layer`` at ``tp`` under a candidate strategy."""
        est = layer_cost(layer, self.traced.arch, tp, self.workload, self.spec, 1,
                         traced=self.traced_shape, sharded=shard,
                         efficiencies=self.efficiencies, calibration=self.calibration,
                         **self._compute_of(layer))
        return est.compute_s + est.comm_s

    def _compute_of(self, layer) -> dict:
        """``layer_cost``'s ``compute_layer``/``compute_traced`` for ``layer``: its decode
        step counterpart, when this builder prices decode from the step's graph."""
        if not self._decode_layer:
            return {}
        return {"compute_layer": self._decode_layer[id(layer)],
                "compute_traced": self.compute_shape}

    def sharded_at(self, j: int, tp: int) -> ShardedLayer | None:
        """Layer ``j``'s strategy at ``tp`` (``None`` at tp 1)."""
        if tp <= 1:
            return None
        group, _ = self._groups()
        return self.sharded[(group[j], tp)]

    def record(self, j: int, tp: int, microbatch_size: int) -> sharding.LayerRecord:
        """What the plan records for layer ``j`` at ``tp``: its sharded parameters
        (relative to the block's path) and its collectives per microbatch."""
        group, _ = self._groups()
        g = group[j]
        analysis = self.records[(g, tp)]
        first_layer = self.traced.layers[self._groups()[1][g]]
        prefix = first_layer.name + "." if first_layer.kind == "block" else ""
        params = {}
        for target, p in analysis.params.items():
            if not isinstance(p, sharding.Shard):
                continue
            if prefix and not target.startswith(prefix):
                continue
            params[target[len(prefix):]] = p
        scaled = collectives_at(self.sharded[(g, tp)], self.workload, microbatch_size,
                                self.traced_shape)
        collectives = tuple(sharding.Collective(kind, nbytes, c.value, c.after, c.reason,
                                                c.batched, self._algorithm(kind, nbytes, tp))
                            for (kind, nbytes), c in zip(scaled, analysis.collectives,
                                                         strict=True))
        return sharding.LayerRecord(g, params, collectives, self.sharded[(g, tp)].strategy)

    def _algorithm(self, kind: str, nbytes: int, tp: int) -> str:
        """NCCL's (algorithm, protocol) that ``layer_cost`` priced this collective with
        (``comm_time``), for the plan to record; ``""`` where no choice was made."""
        pick = nccl_pick(kind, nbytes, tp, self.spec, calibration=self.calibration)
        return "" if pick is None else f"{pick.algorithm}/{pick.protocol}"

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

    def _memory(self, j: int, tp: int, mb: int, m: int) -> LayerMemory:
        """``layer_cost(...).memory`` without pricing the time (same arguments)."""
        return layer_memory_at(self.traced.layers[j], self.traced.arch, tp, self.workload,
                               mb, m, self.traced_shape, sharded=self.sharded_at(j, tp))

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
                    mem = self._memory(j, tp, mb, m)
                    row[tp] = LayerCost(0.0, 0.0, int(mem.resident), int(mem.kv_cache))
                    continue
                # Times do not depend on the microbatch count: priced once per size.
                timed = self._times.get((j, tp, mb))
                if timed is None:
                    est = layer_cost(layer, self.traced.arch, tp, w, self.spec, mb, m,
                                     traced=self.traced_shape,
                                     sharded=self.sharded_at(j, tp),
                                     efficiencies=self.efficiencies,
                                     calibration=self.calibration, measured=measured[j],
                                     **self._compute_of(layer))
                    timed = self._times[(j, tp, mb)] = (est.compute_s, est.comm_s, est.source)
                    mem = est.memory
                else:
                    mem = self._memory(j, tp, mb, m)
                row[tp] = LayerCost(timed[0], timed[1], int(mem.resident), int(mem.kv_cache))
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
        workspace = {}
        for tp in self.tp_degrees:
            fractions = [self.sharded[(g, tp)].activation_fraction if tp > 1 else 1.0
                         for g in range(len(first))]
            workspace[tp] = stage_workspace_bytes(distinct, m, fractions=fractions,
                                                  token_ratio=ratio, dtype_scale=dtype_scale)
        replicated = {}
        for tp in self.tp_degrees[1:]:
            kv = [self.sharded[(g, tp)].kv_fraction for g, j in enumerate(first)
                  if layers[j].kind == "block"]
            factor = round(min(kv) * tp) if kv else 1
            if factor > 1:
                replicated[tp] = factor
        records = {} if memory_only else {
            j: {tp: self.record(j, tp, mb) for tp in self.tp_degrees[1:]}
            for j in range(len(layers))}
        hidden = sharding.hidden_values(self.traced)
        hidden_bytes = tuple(
            tuple(int(t.bytes * ratio * dtype_scale) for t in c.tensors if t.name in hidden)
            for c in self.traced.cuts)
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
            sharding=records,
            hidden_boundary_bytes=hidden_bytes,
            borrowed=tuple(Borrow(j, prev, name, {t: int(math.ceil(b * dtype_scale))
                                                  for t, b in by_tp.items()})
                           for j, prev, name, by_tp in self.borrows),
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
