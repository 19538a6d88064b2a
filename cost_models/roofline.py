"""Analytical (roofline) op costs, their tensor-parallel split, and their calibration here.

One op class's time on a device is

    time = count · overhead + max(flops / (peak · e_compute), bytes / (bandwidth · e_memory))

with ``peak`` the dtype's dense FLOP/s and ``bandwidth`` the memory bandwidth. The
efficiencies ``e_*`` and the per-op ``overhead`` depend on (device, op class):

- on a device that is here (``cpu``; ``cuda`` when present) they are *fitted* to per-node
  timings of real graphs (``fit_efficiencies``, stored by ``calibrate_device``), and the
  peaks are the measured ones (``measure_peaks``);
- for catalogue GPUs they default to ``GPU_EFFICIENCIES`` (sources next to each number).

A layer's work at the traced shape (``Layer.op_stats``) is scaled to the workload's
microbatch, sequence, phase and dtype, then to one rank of a tensor-parallel group by the
fractions the sharding analysis computed for each op class (``ShardedLayer.work``: an op
on a split value does its share, a replicated op all of it) — no rule of its own:

    op class     prefill scaling
    matmul       flops ∝ tokens, weights fixed
    attention    flops ∝ batch·seq², bytes ∝ tokens
    elementwise, norm, reduction, embedding   ∝ tokens

Decode (one token per sequence against a KV cache of ``context`` tokens) keeps the same
rules with ``tokens = batch``; attention reads the whole KV cache and the weights are
read once per step, which makes decode bandwidth-bound.

>>> w = matmul_work(m=128, k=64, n=256, dtype_bytes=4)
>>> (w.flops, w.bytes_read, w.bytes_written)
(4194304, 98304, 131072)
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from cost_models.cache import (
    cache_dir,
    device_fingerprint,
    read_record,
    write_record,
)
from cost_models.devices import DeviceSpec
from cost_models.runtime import kernels as kernels_of
from cost_models.sharded import ShardedLayer

if TYPE_CHECKING:
    from cost_models.types import ArchLike, LayerLike, OpStatsLike, WorkloadLike

__all__ = [
    "OP_CLASSES",
    "OpWork",
    "ClassEfficiency",
    "Efficiencies",
    "GPU_EFFICIENCIES",
    "GPU_HBM_EFFICIENCY",
    "GPU_KERNEL_S",
    "TracedShape",
    "OpSample",
    "matmul_work",
    "attention_work",
    "elementwise_work",
    "norm_work",
    "op_time",
    "class_times",
    "work_time",
    "layer_work",
    "measure_peaks",
    "measure_matmul_rows",
    "fit_efficiencies",
    "fit_class_scales",
    "calibrate_device",
    "save_efficiencies",
    "load_efficiencies",
    "efficiencies_for",
]

OP_CLASSES = ("matmul", "attention", "elementwise", "norm", "embedding", "reduction", "copy",
              "view", "other")
_SCHEMA = "fx-planner/roofline/v1"


@dataclass(frozen=True)
class OpWork:
    """Work of one op class; ``planner.layers.OpStats`` is this type.

    ``rows`` is the number of rows of the matmul class's GEMMs (the tokens of the step,
    set by ``layer_work``), 0 where unknown: a calibrated CPU prices GEMMs of few rows by
    ``Efficiencies.matmul_rows``."""

    count: int = 0
    flops: float = 0
    bytes_read: float = 0
    bytes_written: float = 0
    rows: float = 0

    @property
    def bytes(self) -> float:
        return self.bytes_read + self.bytes_written

    def __add__(self, other: OpWork) -> OpWork:
        return OpWork(
            self.count + other.count,
            self.flops + other.flops,
            self.bytes_read + other.bytes_read,
            self.bytes_written + other.bytes_written,
            max(self.rows, other.rows),
        )

    def scaled(self, flops: float = 1.0, bytes_: float = 1.0) -> OpWork:
        return OpWork(self.count, self.flops * flops, self.bytes_read * bytes_,
                      self.bytes_written * bytes_, self.rows)


# ------------------------------------------------------------------ analytical op work


def matmul_work(m: int, k: int, n: int, dtype_bytes: int, batch: int = 1) -> OpWork:
    """``batch`` products of (m, k) × (k, n): 2·m·k·n FLOPs each; reads both operands,
    writes (m, n)."""
    return OpWork(
        1, 2 * batch * m * k * n, batch * (m * k + k * n) * dtype_bytes, batch * m * n * dtype_bytes
    )


def attention_work(
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    dtype_bytes: int,
    kv_heads: int | None = None,
) -> OpWork:
    """Fused attention (``scaled_dot_product_attention``): QKᵀ and PV, 2·L·S·E FLOPs each per
    head (causal masking not subtracted: kernels compute whole tiles). Reads Q, K, V
    (K and V with ``kv_heads`` heads under GQA), writes the output."""
    kvh = kv_heads or heads
    flops = 4 * batch * heads * q_len * kv_len * head_dim
    read = batch * (heads * q_len + 2 * kvh * kv_len) * head_dim * dtype_bytes
    return OpWork(1, flops, read, batch * heads * q_len * head_dim * dtype_bytes)


def elementwise_work(numel: int, inputs: int, dtype_bytes: int, flops_per_element: int = 1) -> OpWork:
    """A pointwise op over ``numel`` elements reading ``inputs`` tensors of that size."""
    return OpWork(1, numel * flops_per_element, inputs * numel * dtype_bytes, numel * dtype_bytes)


def norm_work(rows: int, width: int, dtype_bytes: int, affine_params: int = 2) -> OpWork:
    """LayerNorm/RMSNorm over ``rows`` vectors of ``width``: 5 FLOPs per element (mean,
    variance, normalise, scale, shift); reads the input and the affine parameters."""
    numel = rows * width
    return OpWork(
        1, 5 * numel, (numel + affine_params * width) * dtype_bytes, numel * dtype_bytes
    )


# ------------------------------------------------------------------ efficiencies


@dataclass(frozen=True)
class ClassEfficiency:
    """Roofline parameters of one op class on one device.

    Attributes:
        compute: achieved fraction of peak FLOP/s.
        memory: achieved fraction of memory bandwidth (can exceed 1 on CPUs when the
            working set stays in cache).
        overhead_s: fixed cost per op (dispatch and launch).
    """

    compute: float
    memory: float
    overhead_s: float


# Defaults for catalogue GPUs (not measured here). Compute fractions (sources):
# - matmul 0.70: large BF16 GEMMs reach ~70% of dense peak on H100/A100 (cuBLAS figures in
#   NVIDIA's H100 tuning guide; Megatron-LM reports 50-60% end-to-end MFU, GEMMs higher).
# - attention 0.50: FlashAttention-2 forward reaches 50-73% of A100 peak (Dao 2023) and
#   ~35-50% of H100 peak; FlashAttention-3 ~75% on H100. 0.5 sits between.
# Memory fraction on GPUs: GPU_HBM_EFFICIENCY for every class (fitted, below). A kernel's fixed GPU
# time is GPU_KERNEL_S, so the achieved fraction of bandwidth and FLOP/s depends on the
# kernel's size: e(S) = S / (bw · (GPU_KERNEL_S + S / (bw · e))) for S bytes, which is what
# makes small decode GEMVs (and everything at high tp) reach less of HBM than large ones.
# overhead_s is the catalogue's launch_overhead_s (filled in by efficiencies_for), charged
# per CPU launch only (cost_models.runtime).
#
# Fitted by `benchmarks/published.py --fit` (least squares in relative error) to the FIT
# rows of benchmarks/published.py that the cost model models: gf-l2-7b-tp1/2/4/8,
# gf-l2-70b-tp2/8 and ao-l2-7b-a100 (bf16 decode, batch 1, A100-80GB, CUDA graphs), jointly
# with the custom all-reduce latency of cost_models.nccl. The A100 fraction is used for
# every catalogue GPU (no other GPU has a modelled fit row); the evaluation rows were never
# used. Output of that command: docs/cost-model.md, "Published GPU measurements".
GPU_HBM_EFFICIENCY = 0.784
GPU_KERNEL_S = 1.98e-6
# The memory fractions below (0.70-0.85: achieved HBM bandwidth in copy/elementwise kernels
# is 80-90% of the datasheet figure, NVIDIA CUDA best-practices guide, "effective
# bandwidth") are what an uncalibrated cpu entry uses, as before; on GPUs efficiencies_for
# replaces them with the fitted GPU_HBM_EFFICIENCY.
GPU_EFFICIENCIES: dict[str, ClassEfficiency] = {
    "matmul": ClassEfficiency(0.70, 0.80, 0.0),
    "attention": ClassEfficiency(0.50, 0.80, 0.0),
    "elementwise": ClassEfficiency(0.50, 0.85, 0.0),
    "copy": ClassEfficiency(0.50, 0.85, 0.0),  # a strided copy: an elementwise kernel
    "norm": ClassEfficiency(0.50, 0.80, 0.0),
    "embedding": ClassEfficiency(0.50, 0.70, 0.0),
    "reduction": ClassEfficiency(0.50, 0.80, 0.0),
    "view": ClassEfficiency(1.0, 1.0, 0.0),
    "other": ClassEfficiency(0.50, 0.80, 0.0),
}
# View ops are metadata-only: no kernel launch on GPU, a Python dispatch on CPU (fitted).
_NO_LAUNCH = {"view"}


@dataclass(frozen=True)
class Efficiencies:
    """The roofline parameters of one device: peaks and per-class efficiencies.

    Attributes:
        device: catalogue name.
        peak_flops: FLOP/s per dtype used as the roofline's peak (measured where calibrated).
        memory_bandwidth: bytes/s used as the roofline's bandwidth.
        classes: per op class efficiencies and overhead.
        source: ``"calibrated"`` (fitted on this device) or ``"default"``.
        samples: node timings the fit used (0 for defaults).
        layer_scale: measured / predicted layer time, median over the calibration layers.
            Node timings come from an interpreter that runs each op cold and alone; a
            layer runs its ops back to back with warm caches and a reused allocator.
            The per-node fit sets the shape, this factor the level (1 for defaults).
        class_scales: per op class refinement of ``layer_scale`` (``fit_class_scales``):
            how much slower or faster a class runs inside a layer than alone. Classes
            missing here use ``layer_scale``.
        kernel_s: the device's own fixed time per kernel, charged per kernel in every
            runtime (``cost_models.runtime``); 0 where the per-op ``overhead_s`` already
            holds all fixed cost (the CPU calibration).
        matmul_rows: GEMM rows -> measured / fitted time of GEMMs of that many rows whose
            weights stream from memory (``measure_matmul_rows``); the matmul class's time
            is multiplied by it, interpolated in log rows. Empty (factor 1) for defaults.
        matmul_rows_shared: the same, measured while every other rank of the host streams
            its own weights at once (what the ranks of a tensor-parallel group do: they
            share the host's memory bandwidth); used for layers priced at tp > 1.
    """

    device: str
    peak_flops: Mapping[str, float]
    memory_bandwidth: float
    classes: Mapping[str, ClassEfficiency]
    source: str
    samples: int = 0
    layer_scale: float = 1.0
    class_scales: Mapping[str, float] = field(default_factory=dict)
    kernel_s: float = 0.0
    matmul_rows: Mapping[int, float] = field(default_factory=dict)
    matmul_rows_shared: Mapping[int, float] = field(default_factory=dict)

    def for_class(self, op_class: str) -> ClassEfficiency:
        return self.classes.get(op_class) or self.classes["other"]

    def scale_for(self, op_class: str) -> float:
        return self.class_scales.get(op_class, self.layer_scale)

    def rows_factor(self, rows: float, shared: bool = False) -> float:
        """``matmul_rows`` at ``rows`` GEMM rows: 1 where nothing was measured, the rows are
        unknown (0) or they are ``FIT_ROWS`` or more (the matmul fit's own range); below
        the smallest measured rows that row count's factor; else linear in log rows
        between the two neighbours (``FIT_ROWS`` counting as a point of factor 1).
        ``shared``: the factors measured with the host's other ranks streaming at once
        (``matmul_rows_shared``), where they were measured."""
        table = self.matmul_rows_shared if shared and self.matmul_rows_shared \
            else self.matmul_rows
        if not table or rows <= 0 or rows >= FIT_ROWS:
            return 1.0
        pts = sorted((int(r), float(f)) for r, f in table.items() if r < FIT_ROWS)
        pts.append((FIT_ROWS, 1.0))
        if rows <= pts[0][0]:
            return pts[0][1]
        # rows < FIT_ROWS, the last point: a neighbour pair always brackets it
        (r0, f0), (r1, f1) = next((a, b) for a, b in zip(pts, pts[1:]) if rows <= b[0])
        return f0 + math.log(rows / r0) / math.log(r1 / r0) * (f1 - f0)

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "peak_flops": dict(self.peak_flops),
            "memory_bandwidth": self.memory_bandwidth,
            "classes": {c: [e.compute, e.memory, e.overhead_s] for c, e in self.classes.items()},
            "source": self.source,
            "samples": self.samples,
            "layer_scale": self.layer_scale,
            "class_scales": dict(self.class_scales),
            "kernel_s": self.kernel_s,
            "matmul_rows": {str(r): f for r, f in self.matmul_rows.items()},
            "matmul_rows_shared": {str(r): f for r, f in self.matmul_rows_shared.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> Efficiencies:
        return cls(
            d["device"],
            dict(d["peak_flops"]),
            d["memory_bandwidth"],
            {c: ClassEfficiency(*v) for c, v in d["classes"].items()},
            d["source"],
            d.get("samples", 0),
            d.get("layer_scale", 1.0),
            dict(d.get("class_scales", {})),
            d.get("kernel_s", 0.0),
            {int(r): float(f) for r, f in d.get("matmul_rows", {}).items()},
            {int(r): float(f) for r, f in d.get("matmul_rows_shared", {}).items()},
        )


def op_time(work: OpWork, eff: ClassEfficiency, peak_flops: float, bandwidth: float,
            *, kernels: float | None = None, launches: float | None = None,
            kernel_s: float = 0.0) -> float:
    """Roofline time of one op class's aggregated work (see the module docstring):
    ``launches · overhead + kernels · kernel_s + max(compute, memory)``; both counts
    default to the work's op count (eager)."""
    compute = work.flops / (peak_flops * eff.compute) if work.flops else 0.0
    memory = work.bytes / (bandwidth * eff.memory) if work.bytes else 0.0
    launches = work.count if launches is None else launches
    kernels = work.count if kernels is None else kernels
    return launches * eff.overhead_s + kernels * kernel_s + max(compute, memory)


def class_times(
    work: Mapping[str, OpWork], efficiencies: Efficiencies, dtype: str, runtime: str = "eager",
    *, shared: bool = False,
) -> dict[str, float]:
    """Roofline seconds of each op class's work under ``runtime`` (``cost_models.runtime``:
    which kernels run and which pay a CPU launch), before the in-layer scales. ``shared``:
    the other ranks of the host run at the same time (a tensor-parallel group)."""
    peak = efficiencies.peak_flops.get(dtype) or efficiencies.peak_flops["float32"]
    if runtime == "eager" and not efficiencies.kernel_s:  # the calibrated (CPU) path
        out = {c: op_time(w, efficiencies.for_class(c), peak, efficiencies.memory_bandwidth)
               for c, w in work.items()}  # fmt: skip
        if "matmul" in out:
            out["matmul"] *= efficiencies.rows_factor(work["matmul"].rows, shared)
        return out
    return {c: op_time(k.work, efficiencies.for_class(c), peak, efficiencies.memory_bandwidth,
                       kernels=k.kernels, launches=k.launches, kernel_s=efficiencies.kernel_s)
            for c, k in kernels_of(work, runtime).items()}  # fmt: skip


def work_time(work: Mapping[str, OpWork], efficiencies: Efficiencies, dtype: str,
              runtime: str = "eager", *, shared: bool = False) -> float:
    """Seconds for a layer's per-class work on the device ``efficiencies`` describes
    (``shared``: see ``class_times``)."""
    return sum(efficiencies.scale_for(c) * t
               for c, t in class_times(work, efficiencies, dtype, runtime,
                                       shared=shared).items())  # fmt: skip


# ------------------------------------------------------------------ scaling a traced layer


@dataclass(frozen=True)
class TracedShape:
    """The shape a model was traced at: the op_stats of its layers describe this."""

    batch_size: int
    seq_len: int
    dtype_bytes: int = 4

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


def _as_work(stats: OpStatsLike) -> OpWork:
    return OpWork(stats.count, stats.flops, stats.bytes_read, stats.bytes_written)


def _matmul_weight_bytes(layer: LayerLike, arch: ArchLike | None, traced: TracedShape) -> float:
    """Bytes of weights the layer's matmuls read (fixed under batch scaling)."""
    stats = layer.op_stats.get("matmul")
    if stats is None:
        return 0.0
    weights = layer.param_bytes
    if arch is not None and layer.kind == "post" and arch.tied_embeddings and arch.vocab_size:
        weights += arch.vocab_size * arch.hidden_size * traced.dtype_bytes  # the tied head
    return float(min(weights, stats.bytes_read))


def layer_work(
    layer: LayerLike,
    arch: ArchLike | None,
    tp: int,
    workload: WorkloadLike,
    microbatch_size: int,
    traced: TracedShape | None = None,
    *,
    sharded: ShardedLayer | None = None,
) -> dict[str, OpWork]:
    """Per-class work of one microbatch through ``layer`` on one rank of a TP group.

    Args:
        layer: traced layer; its ``op_stats`` describe the ``traced`` shape.
        arch: architecture (needed for decode attention).
        tp: tensor-parallel degree (1, or the degree of ``sharded``).
        workload: phase, sequence/context length and dtype.
        microbatch_size: sequences in the microbatch.
        traced: shape the layer was traced at (default: the microbatch's own shape).
        sharded: the layer's strategy at ``tp`` (required when ``tp > 1``): each class's
            work is multiplied by the share one rank runs.

    Returns:
        ``{op_class: OpWork}`` on one rank.
    """
    if tp > 1 and (sharded is None or sharded.tp != tp):
        raise ValueError(f"layer {getattr(layer, 'name', '')!r} at tp {tp} needs its sharding "
                         "analysis (a ShardedLayer of that tp) to be priced")
    decode = workload.phase == "decode"
    seq = workload.seq_len
    traced = traced or TracedShape(microbatch_size, seq, workload.dtype_bytes)
    tokens = microbatch_size * (1 if decode else seq)
    r = tokens / traced.tokens
    d = workload.dtype_bytes / traced.dtype_bytes
    out: dict[str, OpWork] = {}
    for op_class, stats in layer.op_stats.items():
        w = _as_work(stats)
        flops_f, bytes_f = sharded.fraction(op_class) if sharded is not None else (1.0, 1.0)
        if op_class == "matmul":
            weights = _matmul_weight_bytes(layer, arch, traced)
            acts = max(w.bytes_read - weights, 0.0)
            wf = sharded.weight_fraction if sharded is not None else 1.0
            w = OpWork(w.count, w.flops * r * flops_f, (weights * wf + acts * r * bytes_f) * d,
                       w.bytes_written * r * d * bytes_f, tokens)
            out[op_class] = w
            continue
        elif op_class == "attention":
            if decode and arch is not None and arch.is_transformer:
                w = _decode_attention(arch, layer, microbatch_size, workload, stats.count)
                if sharded is not None:  # the step reads this rank's share of the KV cache
                    out[op_class] = w.scaled(flops_f, sharded.kv_fraction)
                    continue
            else:
                ra = microbatch_size * seq * seq / (traced.batch_size * traced.seq_len**2)
                w = OpWork(w.count, w.flops * ra, w.bytes_read * r * d, w.bytes_written * r * d)
        else:
            w = w.scaled(r, r * d)
        out[op_class] = w.scaled(flops_f, bytes_f)
    return out


def _decode_attention(
    arch: ArchLike, layer: LayerLike, batch: int, workload: WorkloadLike, count: int
) -> OpWork:
    """One new token per sequence against ``kv_context_len`` cached tokens, whole layer."""
    w = attention_work(batch, arch.num_heads, 1, workload.kv_context_len + 1, arch.head_dim,
                       workload.dtype_bytes, kv_heads=arch.num_kv_heads or arch.num_heads)
    return OpWork(count, w.flops, w.bytes_read, w.bytes_written)


# ------------------------------------------------------------------ calibration


@dataclass(frozen=True)
class OpSample:
    """One measured node: its op class, work and median time."""

    op_class: str
    flops: float
    bytes: float
    seconds: float


def measure_peaks(threads: int | None = None, repeats: int = 5) -> tuple[float, float]:
    """Measure this CPU's float32 matmul FLOP/s (1024³ GEMM) and copy bandwidth (256 MiB).

    Returns:
        ``(peak_flops, memory_bandwidth)``: the best of ``repeats`` runs (the least
        disturbed by other processes on the host).
    """
    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        src = torch.empty(64 * 2**20)  # 256 MiB, far beyond the last-level cache
        dst = torch.empty_like(src)
        torch.mm(a, b)
        dst.copy_(src)
        best_mm = best_copy = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best_mm = min(best_mm, time.perf_counter() - t0)
            t0 = time.perf_counter()
            dst.copy_(src)
            best_copy = min(best_copy, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(prev)
    return 2 * 1024**3 / best_mm, 2 * src.numel() * 4 / best_copy


# GEMM shapes (in, out) of ``measure_matmul_rows``: the projections of small decoders
# (hidden 512-2048, MLP 8/3 x hidden), each weight at least 1 MiB in float32.
MATMUL_ROWS_SHAPES = ((512, 512), (512, 1376), (1376, 512), (1024, 1024), (2048, 2048))
MATMUL_ROWS = (1, 2, 4, 8)
# From this many GEMM rows on, the matmul fit itself holds (factor 1): the calibration
# set's smallest GEMMs have 16 rows (``planner.calibration.CALIBRATION_SHAPES``: batch 1,
# 16 tokens), and the factors are interpolated up to it.
FIT_ROWS = 16


def _stream_weights(ready, stop, stream_bytes: float) -> None:
    """Another rank of the host: multiply one row by ``stream_bytes`` of weights, over and
    over, until ``stop`` is set (run in a child process by ``measure_matmul_rows``)."""
    torch.set_num_threads(1)
    k, n = MATMUL_ROWS_SHAPES[1]  # 512 in, 1376 out
    weights = [torch.randn(n, k) for _ in range(max(2, math.ceil(stream_bytes / (k * n * 4))))]
    x = torch.randn(1, k)
    ready.set()
    with torch.no_grad():
        while not stop.is_set():
            for w in weights:
                torch.nn.functional.linear(x, w)


def measure_matmul_rows(eff: Efficiencies, rows: Sequence[int] = MATMUL_ROWS,
                        shapes: Sequence[tuple[int, int]] = MATMUL_ROWS_SHAPES,
                        stream_bytes: float = 256 * 2**20, repeats: int = 7,
                        others: int = 0) -> dict[int, float]:
    """Measured / fitted time of ``F.linear`` with ``rows`` rows on weights read from memory.

    Decode multiplies a few rows (the batch) by every weight of the model, which comes
    from DRAM on every step; the calibration's matmuls have 16 rows or more on weights that
    stay in cache. For each shape, ``stream_bytes`` of distinct weights are multiplied one
    after another (each leaves the cache before it comes back), the median over
    ``repeats`` passes is divided by ``op_time`` of the same GEMM under ``eff``'s matmul fit,
    and the factor of a row count is the median over the shapes.

    ``others`` more processes (one thread each) stream their own weights for the whole
    measurement, as the other ranks of a tensor-parallel group on this host do.

    Returns:
        ``{rows: factor}``, what ``Efficiencies.matmul_rows`` (``others=0``) and
        ``matmul_rows_shared`` hold.
    """
    if others:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        stop = ctx.Event()
        procs = []
        try:
            for _ in range(others):
                ready = ctx.Event()
                p = ctx.Process(target=_stream_weights, args=(ready, stop, stream_bytes),
                                daemon=True)
                p.start()
                procs.append(p)
                if not ready.wait(120):
                    raise RuntimeError("a weight-streaming process did not start in 120 s")
            return measure_matmul_rows(eff, rows, shapes, stream_bytes, repeats)
        finally:
            stop.set()
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
    eff_mm = eff.for_class("matmul")
    peak = eff.peak_flops.get("float32") or next(iter(eff.peak_flops.values()))
    ratios: dict[int, list[float]] = {r: [] for r in rows}
    with torch.no_grad():
        for k, n in shapes:
            copies = max(2, math.ceil(stream_bytes / (k * n * 4)))
            weights = [torch.randn(n, k) for _ in range(copies)]
            for r in rows:
                x = torch.randn(r, k)
                for w in weights[:2]:
                    torch.nn.functional.linear(x, w)
                passes = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    for w in weights:
                        torch.nn.functional.linear(x, w)
                    passes.append((time.perf_counter() - t0) / copies)
                fitted = op_time(matmul_work(r, k, n, 4), eff_mm, peak, eff.memory_bandwidth)
                ratios[r].append(float(np.median(passes)) / fitted)
            del weights
    return {r: float(np.median(v)) for r, v in ratios.items()}


_COMPUTE_GRID = np.logspace(-3, 0.3, 56)  # fraction of peak FLOP/s
_MEMORY_GRID = np.logspace(-3, 1.5, 64)  # fraction of DRAM bandwidth (>1: cache-resident)


def _fit_class(samples: Sequence[OpSample], peak: float, bw: float) -> ClassEfficiency:
    """Grid search over (e_compute, e_memory); for each pair the per-op overhead has a
    closed form. Residuals are weighted by 1/t (chi-square style): between absolute error,
    which ignores the many 10 µs ops whose overheads add up in a layer, and relative
    error, which lets the near-free ones (``getitem``, 0.3 µs) set the overhead."""
    f = np.array([s.flops for s in samples], dtype=float)
    b = np.array([s.bytes for s in samples], dtype=float)
    y = np.array([s.seconds for s in samples], dtype=float)
    w = 1.0 / y
    if not f.any() and not b.any():
        return ClassEfficiency(1.0, 1.0, float(np.mean(y)))
    cgrid, mgrid = _COMPUTE_GRID, _MEMORY_GRID
    for _ in range(3):  # coarse grid, then two finer grids around the best point
        tc = f[None, :] / (peak * cgrid[:, None])  # (C, n)
        tm = b[None, :] / (bw * mgrid[:, None])  # (M, n)
        roof = np.maximum(tc[:, None, :], tm[None, :, :])  # (C, M, n)
        o = np.clip(np.sum((y - roof) * w, axis=-1) / np.sum(w), 0.0, None)  # (C, M)
        err = np.sum(w * (o[..., None] + roof - y) ** 2, axis=-1)
        i, j = np.unravel_index(int(np.argmin(err)), err.shape)
        best = ClassEfficiency(float(cgrid[i]), float(mgrid[j]), float(o[i, j]))
        cgrid = _refine(cgrid, i)
        mgrid = _refine(mgrid, j)
    return best


def _refine(grid: np.ndarray, i: int) -> np.ndarray:
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    return np.geomspace(lo, hi, 25)


def fit_efficiencies(
    samples: Iterable[OpSample],
    peak_flops: float,
    memory_bandwidth: float,
    device: str = "cpu",
    dtype: str = "float32",
    min_samples: int = 3,
) -> Efficiencies:
    """Fit per-class efficiencies and overheads to measured node timings.

    Classes with fewer than ``min_samples`` samples borrow the fit of ``other`` (or of all
    samples pooled when ``other`` is thin too).
    """
    samples = list(samples)
    by_class: dict[str, list[OpSample]] = {}
    for s in samples:
        by_class.setdefault(s.op_class, []).append(s)
    pooled = _fit_class(samples, peak_flops, memory_bandwidth)
    classes = {
        c: _fit_class(ss, peak_flops, memory_bandwidth)
        for c, ss in by_class.items()
        if len(ss) >= min_samples
    }
    fallback = classes.get("other", pooled)
    for c in OP_CLASSES:
        classes.setdefault(c, fallback)
    return Efficiencies(
        device, {dtype: peak_flops}, memory_bandwidth, classes, "calibrated", len(samples)
    )


# Ridge weight pulling each class scale toward the global layer scale (units: squared
# relative error of one calibration layer). Picked from 0.01..1 on one measured calibration
# set by leave-one-model-out error: smaller values drove some class scales to zero or below
# (collinear classes), larger ones gave back most of the gain. The accuracy benchmark prints
# the held-out error with and without class scales (docs/cost-model.md).
CLASS_SCALE_SHRINK = 0.3


def fit_class_scales(
    layers: Sequence[tuple[Mapping[str, OpWork], float]],
    efficiencies: Efficiencies,
    dtype: str = "float32",
    shrink: float = CLASS_SCALE_SHRINK,
) -> dict[str, float]:
    """Per-class multipliers so that summed op times match measured whole layers.

    Solves ``min Σ_layers (Σ_c k_c·t_c / t − 1)² + shrink·Σ_c (k_c − k₀)²`` with ``t_c`` the
    node-fitted time of class ``c`` in a layer, ``t`` the layer's measured time and ``k₀``
    the global ``layer_scale``: a class that runs slower inside a layer than alone (the
    interpreter times each op with cold caches and its own dispatch) gets a larger factor,
    and a class the data says little about stays at ``k₀``. Results are clipped to
    ``[k₀/4, 4·k₀]``.
    """
    k0 = efficiencies.layer_scale
    classes = sorted({c for work, _ in layers for c in work})
    if not layers or not classes:
        return {}
    rows = [(class_times(work, efficiencies, dtype), t) for work, t in layers]
    x = np.array([[times.get(c, 0.0) / t for c in classes] for times, t in rows])
    a = x.T @ x + shrink * np.eye(len(classes))
    b = x.T @ np.ones(len(layers)) + shrink * k0
    k = np.clip(np.linalg.solve(a, b), k0 / 4, 4 * k0)
    return {c: float(v) for c, v in zip(classes, k)}


def _path(device: str, cache) -> os.PathLike:
    return cache_dir(cache) / f"roofline-{device}.json"


def save_efficiencies(
    eff: Efficiencies, fingerprint: dict, cache: str | os.PathLike | None = None
) -> None:
    """Store a calibration in the cache, keyed by the device fingerprint."""
    write_record(_path(eff.device, cache), _SCHEMA, eff.to_dict(), fingerprint)


def load_efficiencies(
    device: str = "cpu", *, threads: int | None = None, cache: str | os.PathLike | None = None
) -> Efficiencies | None:
    """The stored calibration of ``device`` if it was measured on this host, else ``None``."""
    data = read_record(_path(device, cache), _SCHEMA, device_fingerprint(device, threads))
    return None if data is None else Efficiencies.from_dict(data)


def calibrate_device(
    samples: Iterable[OpSample],
    layers: Iterable[tuple[Mapping[str, OpWork], float]] = (),
    *,
    device: str = "cpu",
    threads: int | None = None,
    cache: str | os.PathLike | None = None,
    save: bool = True,
    matmul_rows: bool = True,
    host_ranks: int = 1,
) -> Efficiencies:
    """Measure this device's peaks, fit efficiencies to ``samples`` and store the result.

    Args:
        samples: node timings, e.g. ``ModelProfile.op_samples()`` of profiled models.
        layers: ``(work, measured_s)`` of whole layers at the calibration shapes
            (``layer_work`` at tp 1, ``LayerProfile.time_s``): fits ``layer_scale`` and
            ``class_scales``.
        device: ``"cpu"`` (``cuda`` calibration uses the same fit on CUDA timings).
        threads: intra-op threads the samples were measured with.
        cache: cache directory.
        save: write ``<cache>/roofline-<device>.json``.
        matmul_rows: on ``cpu``, measure the few-row GEMM factors (``measure_matmul_rows``,
            about 10 s) after the fit.
        host_ranks: ranks a plan runs on this host (``plan calibrate --cluster Nxcpu``);
            above 1 the factors are measured a second time with the other ranks streaming
            at once (``matmul_rows_shared``).
    """
    peak, bw = measure_peaks(threads)
    eff = fit_efficiencies(samples, peak, bw, device=device)
    # The fit is per float32 FLOP; other dtypes on CPU run at the same order of speed.
    eff = replace(eff, peak_flops={"float32": peak, "bfloat16": peak, "float16": peak})
    layers = list(layers)
    ratios = [t / work_time(w, eff, "float32") for w, t in layers]
    if ratios:
        eff = replace(eff, layer_scale=float(np.median(ratios)))
        eff = replace(eff, class_scales=fit_class_scales(layers, eff))
    if device == "cpu" and matmul_rows:
        prev = torch.get_num_threads()
        torch.set_num_threads(threads or 1)  # as a rank runs (and the profiler measures)
        try:
            eff = replace(eff, matmul_rows=measure_matmul_rows(eff))
            if host_ranks > 1:
                eff = replace(eff, matmul_rows_shared=measure_matmul_rows(
                    eff, others=host_ranks - 1))
        finally:
            torch.set_num_threads(prev)
    if save:
        save_efficiencies(eff, device_fingerprint(device, threads), cache)
    return eff


def efficiencies_for(
    device: DeviceSpec,
    *,
    threads: int | None = None,
    cache: str | os.PathLike | None = None,
    calibrated: Efficiencies | None = None,
) -> Efficiencies:
    """The roofline parameters for ``device``: an explicit or stored calibration when one
    exists for it on this host, else the documented defaults with catalogue peaks."""
    if calibrated is not None and calibrated.device == device.name:
        return calibrated
    stored = load_efficiencies(device.name, threads=threads, cache=cache)
    if stored is not None:
        return stored
    gpu = device.backend == "nccl"
    classes = {
        c: replace(e, overhead_s=0.0 if c in _NO_LAUNCH else device.launch_overhead_s,
                   memory=GPU_HBM_EFFICIENCY if gpu and c not in _NO_LAUNCH else e.memory)
        for c, e in GPU_EFFICIENCIES.items()
    }
    return Efficiencies(
        device.name, dict(device.peak_flops), device.memory_bandwidth, classes, "default",
        kernel_s=GPU_KERNEL_S if gpu else 0.0,
    )


