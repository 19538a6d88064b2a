"""The one function the solver calls: cost of layer j at TP degree t under a workload.

``layer_cost`` combines the three models of this package:

- compute: the roofline (``roofline.layer_work`` scaled to the microbatch and split
  across the TP group, priced by ``roofline.work_time`` with the device's calibrated or
  default efficiencies), or the profiler's measurement when one exists for this exact
  shape on this device (then scaled by the roofline's own tp-1 → tp ratio);
- communication: the tensor-parallel collectives of the layer (``tp_collectives``) priced
  by the alpha-beta model (``collectives.collective_time``), calibrated where measured;
- memory: ``memory.layer_memory`` (parameters after sharding, KV cache).

The transient activations of a stage (its largest layer peak plus boundary buffers) are
added once per stage by ``memory.stage_workspace_bytes``, not per layer.

>>> # est = layer_cost(traced.layers[3], traced.arch, 2, workload, cluster, microbatch_size=4)
>>> # est.compute_s, est.comm_s, est.memory_bytes
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cost_models.collectives import CollectiveCalibration, boundary_time, collective_time
from cost_models.devices import DeviceSpec
from cost_models.memory import LayerMemory, layer_memory
from cost_models.roofline import Efficiencies, TracedShape, efficiencies_for, layer_work, work_time

if TYPE_CHECKING:
    from cost_models.profiler import LayerProfile
    from cost_models.types import ArchLike, ClusterLike, LayerLike, WorkloadLike

__all__ = ["LayerEstimate", "layer_cost", "layer_memory_at", "tp_collectives", "boundary_time",
           "compute_time"]


@dataclass(frozen=True)
class LayerEstimate:
    """One microbatch through one layer on each device of a TP group.

    Attributes:
        compute_s: kernel time, seconds.
        comm_s: the layer's TP collectives, seconds (0 at tp 1).
        memory_bytes: resident bytes per device for this layer (weight shard + KV cache).
        source: ``"measured"`` (profiler) or ``"predicted"`` (roofline) for ``compute_s``.
        memory: the breakdown (params, kv_cache, transient activations).
    """

    compute_s: float
    comm_s: float
    memory_bytes: int
    source: str
    memory: LayerMemory

    def __iter__(self):
        return iter((self.compute_s, self.comm_s, self.memory_bytes))


def _spec(device: DeviceSpec | ClusterLike) -> DeviceSpec:
    return device if isinstance(device, DeviceSpec) else device.device_spec


def tp_collectives(
    layer: LayerLike,
    arch: ArchLike | None,
    tp: int,
    workload: WorkloadLike,
    microbatch_size: int,
    traced: TracedShape | None = None,
    *,
    sequence_parallel: bool = False,
) -> list[tuple[str, int]]:
    """The collectives a TP group runs for one microbatch through ``layer`` (Megatron-style).

    transformer block: 2 all-reduces of the hidden state (after attention and after the
    MLP); with sequence parallelism each becomes an all-gather + a reduce-scatter of the
    same size. Embedding (vocab-parallel): 1 all-reduce (also under sequence parallelism:
    the generated code all-reduces, then each rank keeps its rows). Head (vocab-parallel):
    1 all-gather of the logits. Other layers with a matmul (column- then row-parallel
    pair): 1 all-reduce of the layer output.

    ``codegen.tensor_parallel`` inserts exactly these, stage by stage
    (``tests/codegen/test_tensor_parallel.py`` checks the counts): under sequence
    parallelism a stage's first block needs no all-gather (its input arrives whole) and the
    stage instead all-gathers the sequence at its end, before its output or the head.

    Returns:
        ``[(kind, nbytes), ...]`` (empty at tp 1).
    """
    if tp <= 1:
        return []
    decode = workload.phase == "decode"
    tokens = microbatch_size * (1 if decode else workload.seq_len)
    b = workload.dtype_bytes
    if arch is not None and arch.is_transformer:
        hidden = tokens * arch.hidden_size * b
        if layer.kind == "block":
            if sequence_parallel:
                return [("all_gather", hidden), ("reduce_scatter", hidden)] * 2
            return [("all_reduce", hidden)] * 2
        if layer.kind == "pre" and "embedding" in layer.op_stats:
            return [("all_reduce", hidden)]
        if layer.kind == "post" and "matmul" in layer.op_stats and arch.vocab_size:
            return [("all_gather", tokens * arch.vocab_size * b)]
        return []
    if "matmul" not in layer.op_stats:
        return []
    traced = traced or TracedShape(microbatch_size, workload.seq_len, b)
    scale = tokens / traced.tokens * b / traced.dtype_bytes
    return [("all_reduce", int(layer.output_bytes * scale))]


def compute_time(
    layer: LayerLike,
    arch: ArchLike | None,
    tp: int,
    workload: WorkloadLike,
    efficiencies: Efficiencies,
    microbatch_size: int,
    traced: TracedShape | None = None,
    *,
    sequence_parallel: bool = False,
) -> float:
    """Roofline seconds of one microbatch through ``layer`` on one device of the TP group."""
    work = layer_work(layer, arch, tp, workload, microbatch_size, traced,
                      sequence_parallel=sequence_parallel)  # fmt: skip
    return work_time(work, efficiencies, workload.dtype)


def layer_cost(
    layer: LayerLike,
    arch: ArchLike | None,
    tp: int,
    workload: WorkloadLike,
    device: DeviceSpec | ClusterLike,
    microbatch_size: int,
    microbatches: int = 1,
    *,
    traced: TracedShape | None = None,
    sequence_parallel: bool = False,
    efficiencies: Efficiencies | None = None,
    calibration: CollectiveCalibration | None = None,
    measured: LayerProfile | None = None,
    link: str = "intra",
) -> LayerEstimate:
    """Cost of one microbatch through ``layer`` on a TP group of ``tp`` devices.

    Args:
        layer: traced layer (``op_stats`` at the ``traced`` shape).
        arch: transformer hyper-parameters or ``None``.
        tp: tensor-parallel degree.
        workload: phase, sequence/context length, dtype.
        device: a ``DeviceSpec`` or a ``Cluster`` (its ``device_spec``).
        microbatch_size: sequences per microbatch.
        microbatches: microbatches the stage serves (KV cache of all of them in decode).
        traced: shape the model was traced at (default: the microbatch's shape).
        sequence_parallel: shard norms/residuals across the group.
        efficiencies: roofline parameters (default: stored calibration or GPU defaults).
        calibration: collective fits (default: catalogue alpha-beta).
        measured: the profiler's measurement of this layer on this device; used when the
            workload runs the layer at the traced shape and dtype.
        link: ``"intra"`` (TP groups stay in a node).

    Returns:
        ``LayerEstimate(compute_s, comm_s, memory_bytes, source, memory)``; unpacks as
        ``compute_s, comm_s, memory_bytes = layer_cost(...)``.
    """
    spec = _spec(device)
    eff = efficiencies or efficiencies_for(spec)
    traced = traced or TracedShape(microbatch_size, workload.seq_len, workload.dtype_bytes)
    kw = {"sequence_parallel": sequence_parallel}
    compute = compute_time(layer, arch, tp, workload, eff, microbatch_size, traced, **kw)
    source = "predicted"
    same_shape = (
        workload.phase == "prefill"
        and microbatch_size == traced.batch_size
        and workload.seq_len == traced.seq_len
        and workload.dtype_bytes == traced.dtype_bytes
    )
    if measured is not None and same_shape:
        one = compute_time(layer, arch, 1, workload, eff, microbatch_size, traced, **kw)
        compute = measured.time_s * (compute / one if one > 0 else 1.0)
        source = "measured"
    comm = sum(
        collective_time(kind, nbytes, tp, device=spec, link=link, calibration=calibration)
        for kind, nbytes in tp_collectives(layer, arch, tp, workload, microbatch_size, traced, **kw)
    )
    mem = layer_memory_at(layer, arch, tp, workload, microbatch_size, microbatches, traced)
    return LayerEstimate(compute, comm, mem.resident, source, mem)


def layer_memory_at(layer: LayerLike, arch: ArchLike | None, tp: int, workload: WorkloadLike,
                    microbatch_size: int, microbatches: int, traced: TracedShape) -> LayerMemory:
    """The memory ``layer_cost`` charges, without pricing the time: ``layer_memory`` scaled
    from the traced shape to the workload's tokens per microbatch."""
    tokens = microbatch_size * (1 if workload.phase == "decode" else workload.seq_len)
    return layer_memory(
        layer, arch, tp, workload, microbatch_size, microbatches,
        token_ratio=tokens / traced.tokens, traced_dtype_bytes=traced.dtype_bytes,
    )  # fmt: skip
