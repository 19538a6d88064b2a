"""Memory model: what one device of a tensor-parallel group holds for a layer.

Per layer and TP degree ``tp``:

- **parameters** after sharding: matmul and embedding weights are split ``tp`` ways;
  under GQA with ``num_kv_heads < tp`` the K/V projections cannot be split further and
  each device keeps one whole KV head (``ceil`` of a share, never less than one head).
- **KV cache** (decode): ``batch × context × 2 × kv_heads_per_device × head_dim × bytes``
  per block, ``kv_heads_per_device = num_kv_heads / tp``, or 1 (replicated) when
  ``num_kv_heads < tp``. Multiplied by the block count this is the familiar
  ``batch × context × layers × 2 × kv_heads/tp × head_dim × bytes``.
- **activations**: the transient peak of one layer's tensors for one microbatch (not
  summed over layers: in inference a layer's temporaries die before the next starts),
  plus the boundary tensors of every microbatch in flight. Both are per stage, so they
  are returned by ``stage_workspace_bytes`` and not per layer.
- **headroom**: ``usable_bytes`` leaves ``memory_headroom`` of capacity free.

>>> from types import SimpleNamespace as NS
>>> llama8b = NS(num_layers=32, num_kv_heads=8, head_dim=128)
>>> kv_cache_bytes(llama8b, batch=1, context_len=8192, tp=1, dtype_bytes=2) / 2**30
1.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # planner's Layer/ModelArch/Workload fit these; cost_models never imports planner
    from cost_models.devices import DeviceSpec
    from cost_models.types import ArchLike, LayerLike, WorkloadLike

__all__ = [
    "LayerMemory",
    "kv_heads_per_device",
    "kv_cache_bytes",
    "param_bytes_per_device",
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


def kv_heads_per_device(num_kv_heads: int, tp: int) -> int:
    """KV heads each device of a TP group holds (1 when ``tp`` exceeds the KV heads:
    each head is then replicated ``tp / num_kv_heads`` times)."""
    if num_kv_heads >= tp:
        return math.ceil(num_kv_heads / tp)
    return 1


def kv_cache_bytes(
    arch: ArchLike, batch: int, context_len: int, tp: int, dtype_bytes: int, blocks: int | None = None
) -> int:
    """KV cache bytes per device: ``batch × context × blocks × 2 × kv/tp × head_dim × bytes``.

    Args:
        arch: needs ``num_kv_heads`` (or ``num_heads``), ``head_dim`` and ``num_layers``.
        batch: sequences cached.
        context_len: tokens cached per sequence.
        tp: tensor-parallel degree.
        dtype_bytes: bytes per cached element.
        blocks: transformer blocks counted (default ``arch.num_layers``).
    """
    kv = arch.num_kv_heads or arch.num_heads
    n_blocks = arch.num_layers if blocks is None else blocks
    return batch * context_len * n_blocks * 2 * kv_heads_per_device(kv, tp) * arch.head_dim * dtype_bytes


def _kv_projection_bytes(arch: ArchLike | None, layer: LayerLike, dtype_bytes: float) -> float:
    """Bytes of a block's K and V projection weights (0 when not a transformer block)."""
    if arch is None or not arch.is_transformer or layer.kind != "block" or not arch.head_dim:
        return 0.0
    kv = arch.num_kv_heads or arch.num_heads
    return 2 * arch.hidden_size * kv * arch.head_dim * dtype_bytes


def _replicated_param_bytes(arch: ArchLike | None, layer: LayerLike, dtype_bytes: float) -> float:
    """Norm weights/biases stay whole on every device: 2 norms × (weight + bias) × hidden
    per block (an upper bound for RMSNorm, which has no bias)."""
    if arch is None or layer.kind != "block":
        return 0.0
    return 4 * arch.hidden_size * dtype_bytes


def param_bytes_per_device(
    layer: LayerLike, arch: ArchLike | None, tp: int, dtype_bytes: int = 4, traced_dtype_bytes: int = 4
) -> int:
    """The layer's parameter bytes held by one device at TP degree ``tp``.

    Args:
        layer: the traced layer (``param_bytes`` at the traced dtype).
        arch: model architecture (KV heads, hidden size), or ``None``.
        tp: tensor-parallel degree.
        dtype_bytes: bytes per element of the workload dtype.
        traced_dtype_bytes: bytes per element the layer was traced with.
    """
    total = layer.param_bytes * dtype_bytes / traced_dtype_bytes
    if tp == 1:
        return int(total)
    elem = dtype_bytes
    kv_w = min(_kv_projection_bytes(arch, layer, elem), total)
    repl = min(_replicated_param_bytes(arch, layer, elem), total - kv_w)
    sharded = total - kv_w - repl
    kv = (arch.num_kv_heads or arch.num_heads) if kv_w else 1
    kv_share = kv_w * kv_heads_per_device(kv, tp) / kv
    return int(math.ceil(sharded / tp + kv_share + repl))


def activation_peak_bytes(
    layer: LayerLike, tp: int, token_ratio: float, dtype_scale: float = 1.0
) -> int:
    """Transient peak of one layer for one microbatch at TP degree ``tp``.

    The traced ``peak_activation_bytes`` (scaled to the microbatch's tokens and dtype) is
    split ``tp`` ways except the layer's input/output (the replicated residual stream),
    then ``WORKSPACE_FACTOR`` covers kernel-internal buffers.
    """
    peak = layer.peak_activation_bytes * token_ratio * dtype_scale
    replicated = min(layer.output_bytes * token_ratio * dtype_scale, peak)
    return int(math.ceil(((peak - replicated) / tp + replicated) * WORKSPACE_FACTOR))


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
) -> LayerMemory:
    """Parameters, KV cache and transient activations of ``layer`` on one device.

    Args:
        layer: the traced layer.
        arch: architecture (``None`` for non-transformers: no KV cache).
        tp: tensor-parallel degree.
        workload: phase, context length and dtype.
        microbatch_size: sequences per microbatch.
        microbatches: microbatches the stage serves (a decode stage caches all of them).
        token_ratio: microbatch tokens / traced tokens (scales activations).
        traced_dtype_bytes: bytes per element the layer was traced with.
    """
    dtype_scale = workload.dtype_bytes / traced_dtype_bytes
    params = param_bytes_per_device(layer, arch, tp, workload.dtype_bytes, traced_dtype_bytes)
    kv = 0
    if workload.phase == "decode" and arch is not None and arch.is_transformer and layer.kind == "block":
        kv = kv_cache_bytes(
            arch, microbatch_size * microbatches, workload.kv_context_len, tp,
            workload.dtype_bytes, blocks=1,
        )  # fmt: skip
    acts = activation_peak_bytes(layer, tp, token_ratio, dtype_scale)
    return LayerMemory(params=params, kv_cache=kv, activations=acts)


def stage_workspace_bytes(
    layers: list[LayerLike],
    tp: int,
    microbatches_in_flight: int,
    *,
    token_ratio: float = 1.0,
    dtype_scale: float = 1.0,
) -> int:
    """Memory a stage needs once on top of its layers' resident bytes: the largest
    transient peak of any layer it may hold, plus the received boundary tensors of every
    microbatch in flight (bounded by the largest layer output)."""
    peak = max(activation_peak_bytes(layer, tp, token_ratio, dtype_scale) for layer in layers)
    boundary = max(layer.output_bytes for layer in layers) * token_ratio * dtype_scale
    return int(peak + boundary * max(microbatches_in_flight - 1, 0))


def usable_bytes(device: DeviceSpec, memory_headroom: float) -> int:
    """Capacity a plan may fill: ``memory_bytes × (1 − headroom)``."""
    return int(device.memory_bytes * (1.0 - memory_headroom))
