"""The one function the solver calls: cost of layer j at TP degree t under a workload.

``layer_cost`` combines the models of this package, for the layer's tensor-parallel
strategy as the sharding analysis found it (``ShardedLayer``; none at tp 1):

- compute: the roofline (``roofline.layer_work`` scaled to the microbatch and to one
  rank's share of each op class), or the profiler's measurement when one exists for this
  exact shape on this device (then scaled by the roofline's own tp-1 → tp ratio);
- communication: the strategy's collectives, exactly the ones the generated code runs,
  scaled to the step's tokens and dtype and priced by ``comm_time``: NCCL's algorithm and
  protocol choice on GPUs (``cost_models.nccl``), the alpha-beta model
  (``collectives.collective_time``) calibrated where measured otherwise;
- the runtime (``workload.runtime``: eager, compiled, cudagraphs; ``cost_models.runtime``)
  decides which kernels run and which pay a CPU launch;
- memory: ``memory.layer_memory`` (this rank's parameter pieces, KV cache share).

The transient activations of a stage (its largest layer peak plus boundary buffers) are
added once per stage by ``memory.stage_workspace_bytes``, not per layer.

>>> # est = layer_cost(traced.layers[3], traced.arch, 2, workload, cluster, 4, sharded=s)
>>> # est.compute_s, est.comm_s, est.memory_bytes
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cost_models.collectives import CollectiveCalibration, boundary_time, collective_time
from cost_models.devices import DeviceSpec
from cost_models.memory import LayerMemory, layer_memory
from cost_models.nccl import choose as nccl_choose
from cost_models.roofline import Efficiencies, TracedShape, efficiencies_for, layer_work, work_time
from cost_models.sharded import ShardedLayer

if TYPE_CHECKING:
    from cost_models.profiler import LayerProfile
    from cost_models.types import ArchLike, ClusterLike, LayerLike, WorkloadLike

__all__ = ["LayerEstimate", "layer_cost", "layer_memory_at", "collectives_at", "boundary_time",
           "compute_time", "comm_time", "nccl_pick", "runtime_of", "runs_as_traced",
           "measured_scale"]


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


def collectives_at(
    sharded: ShardedLayer | None,
    workload: WorkloadLike,
    microbatch_size: int,
    traced: TracedShape,
) -> list[tuple[str, int]]:
    """The strategy's collectives for one microbatch of the workload: the analysed ones
    (at the traced shape) scaled to the step's tokens and dtype.

    Returns:
        ``[(kind, nbytes), ...]`` (empty at tp 1).
    """
    if sharded is None or sharded.tp <= 1:
        return []
    per_sequence = 1 if workload.phase == "decode" else workload.seq_len
    d = workload.dtype_bytes / traced.dtype_bytes
    batched = microbatch_size * per_sequence / traced.tokens * d  # rows of tokens
    shared = per_sequence / traced.seq_len * d  # one copy for the batch (a position table)
    return [(kind, int(round(nbytes * (batched if is_batched else shared))))
            for kind, nbytes, is_batched in sharded.collectives]


def runtime_of(workload: WorkloadLike) -> str:
    """The workload's runtime (``eager`` when it names none)."""
    return getattr(workload, "runtime", None) or "eager"


def nccl_pick(kind: str, nbytes: float, group_size: int, device: DeviceSpec, *,
              link: str = "intra", calibration: CollectiveCalibration | None = None):
    """NCCL's best (algorithm, protocol) for one tensor-parallel collective, which
    ``comm_time`` prices and the plan records; ``None`` where the collective is priced
    otherwise (measured fits, a backend other than nccl, nothing to send)."""
    if calibration is None and device.backend == "nccl" and group_size > 1 and nbytes > 0:
        return nccl_choose(kind, nbytes, group_size, device, link=link)
    return None


def comm_time(kind: str, nbytes: float, group_size: int, device: DeviceSpec, *,
              link: str = "intra", calibration: CollectiveCalibration | None = None) -> float:
    """One tensor-parallel collective: measured fits where they exist, NCCL's best algorithm
    and protocol on GPUs (``nccl_pick``), else the catalogue's alpha-beta ring."""
    pick = nccl_pick(kind, nbytes, group_size, device, link=link, calibration=calibration)
    if pick is not None:
        return pick.seconds
    return collective_time(kind, nbytes, group_size, device=device, link=link,
                           calibration=calibration)


def compute_time(
    layer: LayerLike,
    arch: ArchLike | None,
    tp: int,
    workload: WorkloadLike,
    efficiencies: Efficiencies,
    microbatch_size: int,
    traced: TracedShape | None = None,
    *,
    sharded: ShardedLayer | None = None,
) -> float:
    """Roofline seconds of one microbatch through ``layer`` on one rank of the TP group."""
    work = layer_work(layer, arch, tp, workload, microbatch_size, traced, sharded=sharded)
    # The ranks of a tensor-parallel group run their GEMMs at the same moment.
    return work_time(work, efficiencies, workload.dtype, runtime_of(workload), shared=tp > 1)


def runs_as_traced(workload: WorkloadLike, microbatch_size: int, traced: TracedShape) -> bool:
    """Whether the workload runs a layer at the shape it was traced (and profiled) at: a
    measurement of the layer applies only there."""
    return (workload.phase == "prefill"
            and microbatch_size == traced.batch_size
            and workload.seq_len == traced.seq_len
            and workload.dtype_bytes == traced.dtype_bytes)


def measured_scale(
    layer: LayerLike,
    arch: ArchLike | None,
    tp: int,
    workload: WorkloadLike,
    efficiencies: Efficiencies,
    microbatch_size: int,
    traced: TracedShape,
    *,
    sharded: ShardedLayer | None = None,
    roofline_s: float | None = None,
) -> float:
    """The factor from a time measured at tp 1 to one rank of ``tp``: the roofline's own
    tp-1 -> tp ratio of the layer's compute (exactly 1 at tp 1).

    Args:
        roofline_s: the layer's roofline compute at ``tp``, when the caller has it.
    """
    if tp <= 1:
        return 1.0
    if roofline_s is None:
        roofline_s = compute_time(layer, arch, tp, workload, efficiencies, microbatch_size,
                                  traced, sharded=sharded)
    one = compute_time(layer, arch, 1, workload, efficiencies, microbatch_size, traced)
    return roofline_s / one if one > 0 else 1.0


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
    sharded: ShardedLayer | None = None,
    efficiencies: Efficiencies | None = None,
    calibration: CollectiveCalibration | None = None,
    measured: LayerProfile | None = None,
    link: str = "intra",
    compute_layer: LayerLike | None = None,
    compute_traced: TracedShape | None = None,
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
        sharded: the layer's tensor-parallel strategy at ``tp`` (required when ``tp > 1``;
            it decides the compute share, the collectives and the parameter bytes).
        efficiencies: roofline parameters (default: stored calibration or GPU defaults).
        calibration: collective fits (default: catalogue alpha-beta).
        measured: the profiler's measurement of this layer on this device; used when the
            workload runs the layer at the traced shape and dtype.
        link: ``"intra"`` (TP groups stay in a node).
        compute_layer: the layer whose ops the step runs, when that is another graph than
            ``layer``'s (a decode step's: ``planner.decode.DecodeStep`` traced at one token,
            with its cache write and mask); its ``op_stats`` describe ``compute_traced``.
            It prices the compute only: memory and collectives stay ``layer``'s.
        compute_traced: the shape ``compute_layer`` was traced at.

    Returns:
        ``LayerEstimate(compute_s, comm_s, memory_bytes, source, memory)``; unpacks as
        ``compute_s, comm_s, memory_bytes = layer_cost(...)``.
    """
    spec = _spec(device)
    eff = efficiencies or efficiencies_for(spec)
    traced = traced or TracedShape(microbatch_size, workload.seq_len, workload.dtype_bytes)
    if compute_layer is None:
        compute = compute_time(layer, arch, tp, workload, eff, microbatch_size, traced,
                               sharded=sharded)
    else:
        compute = compute_time(compute_layer, arch, tp, workload, eff, microbatch_size,
                               compute_traced, sharded=sharded)
    source = "predicted"
    if measured is not None and runs_as_traced(workload, microbatch_size, traced):
        compute = measured.time_s * measured_scale(layer, arch, tp, workload, eff,
                                                   microbatch_size, traced, roofline_s=compute)
        source = "measured"
    comm = sum(
        comm_time(kind, nbytes, tp, spec, link=link, calibration=calibration)
        for kind, nbytes in collectives_at(sharded, workload, microbatch_size, traced)
    )
    mem = layer_memory_at(layer, arch, tp, workload, microbatch_size, microbatches, traced,
                          sharded=sharded)
    return LayerEstimate(compute, comm, mem.resident, source, mem)


def layer_memory_at(layer: LayerLike, arch: ArchLike | None, tp: int, workload: WorkloadLike,
                    microbatch_size: int, microbatches: int, traced: TracedShape,
                    sharded: ShardedLayer | None = None) -> LayerMemory:
    """The memory ``layer_cost`` charges, without pricing the time: ``layer_memory`` scaled
    from the traced shape to the workload's tokens per microbatch."""
    tokens = microbatch_size * (1 if workload.phase == "decode" else workload.seq_len)
    return layer_memory(
        layer, arch, tp, workload, microbatch_size, microbatches,
        token_ratio=tokens / traced.tokens, traced_dtype_bytes=traced.dtype_bytes,
        sharded=sharded,
    )  # fmt: skip
