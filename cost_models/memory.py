"""Memory model: what one rank of a tensor-parallel group holds for a layer.

Per layer, from the layer's sharding analysis at degree ``tp`` (``ShardedLayer``; none at
tp 1, when a rank holds everything):

- **parameters**: the bytes of this rank's pieces of the layer's parameters, exactly as
  the generated code slices them (``ShardedLayer.param_bytes``);
- **KV cache** (decode): ``batch × context × 2 × kv_heads × head_dim × bytes`` per block,
  times the share of the keys and values this rank holds (``kv_fraction``: ``1/tp`` when
  the K/V projections are column-sharded, 1 when they are replicated — fewer KV heads
  than ranks);
- **activations**: the transient peak of one layer's tensors for one microbatch, times
  the share of the layer's activations this rank holds, plus the boundary tensors of
  every microbatch in flight. Both are per stage (``stage_workspace_bytes``).
- **headroom**: ``usable_bytes`` leaves ``memory_headroom`` of capacity free.

>>> from types import SimpleNamespace as NS
>>> llama8b = NS(num_layers=32, num_kv_heads=8, head_dim=128)
>>> kv_cache_bytes(llama8b, batch=1, context_len=8192, dtype_bytes=2) / 2**30
1.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cost_models.sharded import ShardedLayer

if TYPE_CHECKING:  # planner's Layer/ModelArch/Workload fit these; cost_models never imports planner
    from cost_models.devices import DeviceSpec
    from cost_models.types import ArchLike, LayerLike, WorkloadLike

__all__ = [
    "LayerMemory",
    "kv_cache_bytes",
    "layer_memory",
    "activation_peak_bytes",
    "stage_workspace_bytes",
    "usable_bytes",
    "WORKSPACE_FACTOR",
]

# Margin for buffers inside ATen kernels (SDPA tiles, GEMM packing) that no graph node
# shows. benchmarks/cost_model_accuracy.py measures the allocator peak of each layer: it
# equals the graph peak exactly for the hand-written GPT, so the margin is small; the
# measured ratios per model are in docs/cost-model.md.
WORKSPACE_FACTOR = 1.10


@dataclass(frozen=True)
class LayerMemory:
    """Bytes one device of a TP group holds for one layer.

    Attributes:
        params: weight shard (and replicated norms/biases).
        kv_cache: KV cache of every sequence the stage serves (decode only).
        activations: transient peak of the layer for one microbatch (stage workspace).
    """

    params: int
    kv_cache: int
    activations: int

    @property
    def resident(self) -> int:
        """What stays allocated for the whole run: parameters and KV cache."""
        return self.params + self.kv_cache


def kv_cache_bytes(
    arch: ArchLike, batch: int, context_len: int, dtype_bytes: int, blocks: int | None = None
) -> int:
    """KV cache bytes of the whole model (or of ``blocks`` blocks) on one device holding
    every KV head: ``batch × context × blocks × 2 × kv_heads × head_dim × bytes``.

    A rank of a tensor-parallel group holds ``ShardedLayer.kv_fraction`` of it.

    Args:
        arch: needs ``num_kv_heads`` (or ``num_heads``), ``head_dim`` and ``num_layers``.
        batch: sequences cached.
        context_len: tokens cached per sequence.
        dtype_bytes: bytes per cached element.
        blocks: transformer blocks counted (default ``arch.num_layers``).
    """
    kv = arch.num_kv_heads or arch.num_heads
    n_blocks = arch.num_layers if blocks is None else blocks
    return batch * context_len * n_blocks * 2 * kv * arch.head_dim * dtype_bytes


def activation_peak_bytes(
    layer: LayerLike, token_ratio: float, dtype_scale: float = 1.0, fraction: float = 1.0
) -> int:
    """Transient peak of one layer for one microbatch on one rank.

    The traced ``peak_activation_bytes`` (scaled to the microbatch's tokens and dtype)
    times the share of the layer's activations a rank holds (``fraction``, from the
    sharding analysis; 1 at tp 1), then ``WORKSPACE_FACTOR`` covers kernel-internal
    buffers.
    """
    peak = layer.peak_activation_bytes * token_ratio * dtype_scale * fraction
    return int(math.ceil(peak * WORKSPACE_FACTOR))


def layer_memory(
    layer: LayerLike,
    arch: ArchLike | None,
    tp: int,
    workload: WorkloadLike,
    microbatch_size: int,
    microbatches: int = 1,
    *,
    token_ratio: float = 1.0,
    traced_dtype_bytes: int = 4,
    sharded: ShardedLayer | None = None,
) -> LayerMemory:
    """Parameters, KV cache and transient activations of ``layer`` on one rank.

    Args:
        layer: the traced layer.
        arch: architecture (``None`` for non-transformers: no KV cache).
        tp: tensor-parallel degree (1, or the degree of ``sharded``).
        workload: phase, context length and dtype.
        microbatch_size: sequences per microbatch.
        microbatches: microbatches the stage serves (a decode stage caches all of them).
        token_ratio: microbatch tokens / traced tokens (scales activations).
        traced_dtype_bytes: bytes per element the layer was traced with.
        sharded: the layer's strategy at ``tp`` (required when ``tp > 1``).
    """
    if tp > 1 and (sharded is None or sharded.tp != tp):
        raise ValueError(f"the memory of a layer at tp {tp} needs its sharding analysis")
    sharded = sharded or ShardedLayer.replicated(layer.param_bytes)
    dtype_scale = workload.dtype_bytes / traced_dtype_bytes
    params = int(math.ceil(sharded.param_bytes * dtype_scale))
    kv = 0
    if workload.phase == "decode" and arch is not None and arch.is_transformer and layer.kind == "block":
        kv = int(math.ceil(kv_cache_bytes(
            arch, microbatch_size * microbatches, workload.kv_context_len,
            workload.dtype_bytes, blocks=1,
        ) * sharded.kv_fraction))  # fmt: skip
    acts = activation_peak_bytes(layer, token_ratio, dtype_scale, sharded.activation_fraction)
    return LayerMemory(params=params, kv_cache=kv, activations=acts)


def stage_workspace_bytes(
    layers: list[LayerLike],
    microbatches_in_flight: int,
    *,
    fractions: list[float] | None = None,
    token_ratio: float = 1.0,
    dtype_scale: float = 1.0,
) -> int:
    """Memory a stage needs once on top of its layers' resident bytes: the largest
    transient peak of any layer it may hold (``fractions[i]``: the share of layer ``i``'s
    activations a rank holds), plus the received boundary tensors of every microbatch in
    flight (bounded by the largest layer output)."""
    fractions = fractions or [1.0] * len(layers)
    peak = max(activation_peak_bytes(layer, token_ratio, dtype_scale, f)
               for layer, f in zip(layers, fractions, strict=True))
    boundary = max(layer.output_bytes for layer in layers) * token_ratio * dtype_scale
    return int(peak + boundary * max(microbatches_in_flight - 1, 0))


def usable_bytes(device: DeviceSpec, memory_headroom: float) -> int:
    """Capacity a plan may fill: ``memory_bytes × (1 − headroom)``."""
    return int(device.memory_bytes * (1.0 - memory_headroom))
