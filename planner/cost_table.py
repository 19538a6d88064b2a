"""The cost table: everything the solver knows about a model on a cluster.

This module is the seam between ``cost_models`` (which predicts) and the solvers (which
decide). It imports nothing from the rest of ``planner``, so the cost model can build
tables without importing a solver.

A table describes one *microbatch size* (``batch_size / (dp * microbatches)`` samples):

- ``costs[j][tp]`` — one microbatch through layer ``j`` on a tensor-parallel group of
  ``tp`` devices: ``compute_s`` (kernels), ``comm_s`` (the TP collectives), and
  ``memory_bytes`` (what each device of the group holds for that layer: its weight shard,
  activations in flight, KV cache of every microbatch the stage serves), of which
  ``kv_cache_bytes`` is the KV cache (decode tables; 0 otherwise). A ``tp`` missing
  from ``costs[j]`` means layer ``j`` cannot run at that degree (heads do not divide).
- ``boundary_bytes[j]`` — bytes sent from the stage holding layer ``j`` to the next one
  when a pipeline cut sits after layer ``j``, for one microbatch.
- ``intra_node`` / ``inter_node`` — alpha-beta links pricing that transfer:
  ``latency_s + bytes / bandwidth``.
- ``stage_workspace_bytes[tp]`` — memory added once per stage (allocator workspace,
  communication buffers), on top of the per-layer sum.
- ``borrowed`` — parameters a layer reads but an earlier layer owns (a head tied to the
  embedding table). ``costs`` charges such a tensor to its owner only; a stage that holds a
  borrower without the layer before it that reads the tensor holds its own copy, so
  ``stage_memory_bytes`` adds it (``Borrow``). The stage's memory is still a sum over its
  layers, but a borrower's share depends on where the stage starts.

Because per-layer cost depends on the microbatch size, the solver takes a builder:

>>> def build(microbatch_size: int, microbatches: int) -> CostTable:
...     layer = {1: LayerCost(2e-3 * microbatch_size, 0.0, 10**9)}
...     return CostTable(
...         costs=(layer, layer), boundary_bytes=(4096,), intra_node=Link(1e-6, 1e11),
...         inter_node=Link(5e-6, 1e10), microbatch_size=microbatch_size,
...         microbatches=microbatches)
>>> build(2, 4).stage_time_s(0, 1, tp=1)
0.008
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["LayerCost", "Link", "Borrow", "CostTable", "CostTableBuilder", "TICK_S", "to_ticks"]

# Times are optimised as integers of this many seconds (0.1 ns). Both solvers round every
# table entry with ``to_ticks`` and nothing else, so their integer objectives agree exactly.
TICK_S = 1e-10


def to_ticks(seconds: float) -> int:
    """Round a time in seconds to the solvers' integer unit (``TICK_S``), half up."""
    return int(seconds / TICK_S + 0.5)


@dataclass(frozen=True)
class LayerCost:
    """One microbatch through one layer on one tensor-parallel group.

    Attributes:
        compute_s: kernel time on each device of the group, seconds.
        comm_s: time of the layer's tensor-parallel collectives (0 at tp 1), seconds.
        memory_bytes: bytes each device of the group holds for this layer.
        kv_cache_bytes: the part of ``memory_bytes`` that is the layer's KV cache (the
            cache of every sequence the stage serves, this device's share of it); 0 for a
            layer without a cache and for prefill tables.
    """

    compute_s: float
    comm_s: float
    memory_bytes: int
    kv_cache_bytes: int = 0

    def __post_init__(self) -> None:
        if self.compute_s < 0 or self.comm_s < 0 or self.memory_bytes < 0 \
                or self.kv_cache_bytes < 0:
            raise ValueError(f"layer costs must be non-negative, got {self}")
        if self.kv_cache_bytes > self.memory_bytes:
            raise ValueError(f"kv_cache_bytes is a part of memory_bytes, got {self}")

    @property
    def time_s(self) -> float:
        return self.compute_s + self.comm_s


@dataclass(frozen=True)
class Link:
    """An alpha-beta link: a message of ``n`` bytes takes ``latency_s + n / bandwidth``."""

    latency_s: float
    bandwidth_bytes_per_s: float

    def transfer_s(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s


@dataclass(frozen=True)
class Borrow:
    """Layer ``layer`` reads parameter ``param`` that layer ``previous`` (< ``layer``) also
    reads, and that tensor is not in ``layer``'s own memory.

    A stage that holds ``layer`` but starts after ``previous`` holds its own copy:
    ``bytes[tp]`` per device (the borrower's local share at ``tp``). Chained through
    ``previous``, a tensor is charged once per stage: to the first reader in the stage
    when its owner is elsewhere, never when the owner is in the stage.
    """

    layer: int
    previous: int
    param: str
    bytes: Mapping[int, int]


@dataclass(frozen=True)
class CostTable:
    """Per-layer costs for one microbatch size (see the module docstring).

    Attributes:
        costs: ``costs[j][tp]`` for every layer ``j`` and every tp degree it allows.
        boundary_bytes: bytes crossing the cut after layer ``j``; ``len == num_layers - 1``.
        intra_node: link between two devices of one node.
        inter_node: link between devices of different nodes.
        microbatch_size: samples per microbatch this table was built for.
        microbatches: microbatches per replica this table was built for (the KV cache of
            a decode stage holds all of them).
        stage_workspace_bytes: per-stage memory added once, by tp (missing = 0).
        kv_heads_replicated: by tp, how many times each KV head is replicated because
            ``tp > num_kv_heads`` (missing = 1, not replicated); recorded in the plan.
        layer_names: optional names, ``"layer{j}"`` when empty.
        param_bytes: optional unsharded parameter bytes per layer (for the plan file).
        sequence_parallel: whether the costs assume sequence parallelism.
        sharding: ``sharding[j][tp]``: layer ``j``'s tensor-parallel strategy at ``tp`` as
            the plan records it (a ``planner.sharding.LayerRecord``; absent for tables
            built without a traced model).
        hidden_boundary_bytes: per cut, the bytes of each hidden state crossing it (what a
            sequence-parallel stage all-gathers before sending).
        borrowed: the ``Borrow`` records of layers reading a tensor an earlier layer owns.
    """

    costs: tuple[Mapping[int, LayerCost], ...]
    boundary_bytes: tuple[int, ...]
    intra_node: Link
    inter_node: Link
    microbatch_size: int = 1
    microbatches: int = 1
    stage_workspace_bytes: Mapping[int, int] = field(default_factory=dict)
    kv_heads_replicated: Mapping[int, int] = field(default_factory=dict)
    layer_names: tuple[str, ...] = ()
    param_bytes: tuple[int, ...] = ()
    sequence_parallel: bool = False
    sharding: Mapping[int, Mapping[int, object]] = field(default_factory=dict)
    hidden_boundary_bytes: tuple[tuple[int, ...], ...] = ()
    borrowed: tuple[Borrow, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "costs", tuple(dict(c) for c in self.costs))
        object.__setattr__(self, "borrowed", tuple(self.borrowed))
        by_layer: dict[int, list[Borrow]] = {}
        for b in self.borrowed:
            by_layer.setdefault(b.layer, []).append(b)
        object.__setattr__(self, "_borrows", {j: tuple(v) for j, v in by_layer.items()})
        object.__setattr__(self, "boundary_bytes", tuple(int(b) for b in self.boundary_bytes))
        n = len(self.costs)
        problems = []
        if n == 0:
            problems.append("the table has no layers")
        if len(self.boundary_bytes) != max(n - 1, 0):
            problems.append(
                f"boundary_bytes has {len(self.boundary_bytes)} entries; a chain of {n} "
                f"layers has {max(n - 1, 0)} cuts"
            )
        for j, c in enumerate(self.costs):
            if not c:
                problems.append(f"layer {j} allows no tp degree (costs[{j}] is empty)")
        if self.layer_names and len(self.layer_names) != n:
            problems.append(f"layer_names has {len(self.layer_names)} entries for {n} layers")
        if self.param_bytes and len(self.param_bytes) != n:
            problems.append(f"param_bytes has {len(self.param_bytes)} entries for {n} layers")
        if self.microbatch_size < 1 or self.microbatches < 1:
            problems.append("microbatch_size and microbatches must be >= 1")
        for b in self.borrowed:
            if not 0 <= b.previous < b.layer < n:
                problems.append(f"borrowed {b.param}: layer {b.layer} reads it after layer "
                                f"{b.previous}; both must be layers and previous < layer")
        if problems:
            raise ValueError("invalid cost table: " + "; ".join(problems))

    @property
    def num_layers(self) -> int:
        return len(self.costs)

    @property
    def tp_degrees(self) -> tuple[int, ...]:
        """Every tp degree that at least one layer allows, ascending."""
        return tuple(sorted({t for c in self.costs for t in c}))

    def name(self, j: int) -> str:
        return self.layer_names[j] if self.layer_names else f"layer{j}"

    def workspace(self, tp: int) -> int:
        return int(self.stage_workspace_bytes.get(tp, 0))

    def stage_time_s(self, first: int, last: int, tp: int) -> float:
        """Compute + TP communication of layers ``first..last`` (inclusive), one microbatch."""
        return sum(self.costs[j][tp].time_s for j in range(first, last + 1))

    def borrowed_bytes(self, j: int, first: int, tp: int) -> int:
        """Bytes per device layer ``j`` adds for tensors it borrows, in a stage starting at
        layer ``first`` with degree ``tp`` (0 when their previous reader is in the stage)."""
        borrows = self._borrows.get(j)
        if not borrows:
            return 0
        return sum(int(b.bytes.get(tp, 0)) for b in borrows if b.previous < first)

    def layer_memory_bytes(self, j: int, first: int, tp: int) -> int:
        """Layer ``j``'s memory per device in a stage starting at ``first``."""
        return self.costs[j][tp].memory_bytes + self.borrowed_bytes(j, first, tp)

    def stage_memory_bytes(self, first: int, last: int, tp: int) -> int:
        """Per-device memory of a stage holding layers ``first..last`` at degree ``tp``."""
        return self.workspace(tp) + sum(
            self.layer_memory_bytes(j, first, tp) for j in range(first, last + 1)
        )

    def stage_kv_cache_bytes(self, first: int, last: int, tp: int) -> int:
        """Per-device KV cache of a stage holding layers ``first..last`` at degree ``tp``
        (a part of ``stage_memory_bytes``)."""
        return sum(self.costs[j][tp].kv_cache_bytes for j in range(first, last + 1))

    def p2p_s(self, after_layer: int, inter_node: bool) -> float:
        """Time to send one microbatch's boundary tensors across the cut after a layer."""
        link = self.inter_node if inter_node else self.intra_node
        return link.transfer_s(self.boundary_bytes[after_layer])


class CostTableBuilder(Protocol):
    """Builds the table for a microbatch size; implemented by the cost model.

    ``microbatches`` is passed because memory depends on it (a decode stage keeps the KV
    cache of every microbatch it serves); per-microbatch times should not.
    """

    def __call__(self, microbatch_size: int, microbatches: int) -> CostTable: ...
