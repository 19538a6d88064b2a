"""Collective and point-to-point transfer times: alpha-beta models, and their calibration.

A collective over ``n`` ranks moving ``N`` bytes takes, for a ring algorithm,

    all_reduce      2(n-1)·alpha + 2(n-1)/n · N · beta
    all_gather       (n-1)·alpha +  (n-1)/n · N · beta     (N = gathered output size)
    reduce_scatter   (n-1)·alpha +  (n-1)/n · N · beta     (N = input size)
    send_recv            alpha   +           N · beta

with ``alpha`` the per-message latency and ``beta`` the inverse link bandwidth. Without a
calibration, alpha and beta come from the device catalogue's link figures for the link
class (``"intra"``: inside a node, ``"inter"``: crossing nodes). ``calibrate`` measures
the collectives on the live backend (gloo on CPU, nccl on GPUs) and fits, per collective
and group size, ``time = alpha_fit + beta_fit · bus_factor · N`` (alpha_fit holds all of
a call's latency steps), which then replaces the catalogue formula.

What is measured is what a step pays: a step issues its collectives back to back between
its ops, never after a barrier, and on a shared host some calls wait for a descheduled
rank (gloo here: 0.4 ms, or 3-4 ms when a rank has to be woken). So each sample times a
*chain* of ``chain`` back-to-back calls (one barrier before the chain) and the fit uses
the median of the chains' per-call time: a step of several collectives pays their mean,
tail included, which the best case of a call timed alone after a barrier leaves out.

>>> round(collective_time("all_reduce", 2**20, 2, alpha_beta=AlphaBeta(1e-5, 1e-9)) * 1e6, 1)
1068.6
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from cost_models.cache import cache_dir, device_fingerprint, read_record, write_record
from cost_models.devices import DeviceSpec

__all__ = [
    "COLLECTIVES",
    "DEFAULT_CHAIN",
    "DEFAULT_PERCENTILE",
    "LINK_CLASSES",
    "AlphaBeta",
    "CollectiveFit",
    "CollectiveCalibration",
    "CalibrationError",
    "bus_factor",
    "latency_steps",
    "link_alpha_beta",
    "collective_time",
    "p2p_time",
    "boundary_time",
    "calibrate",
    "fit_calibration",
    "measure_collectives",
    "fit_alpha_beta",
    "load_calibration",
]

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")
LINK_CLASSES = ("intra", "inter")
_SCHEMA = "fx-planner/collectives/v1"
DEFAULT_SIZES = (4 * 1024, 64 * 1024, 1024 * 1024, 4 * 1024 * 1024)
DEFAULT_CHAIN = 8  # back-to-back calls per calibration sample (a tp-2 decode step has ~10)
DEFAULT_PERCENTILE = 50.0  # of the samples' per-call times: a step pays the typical call


class CalibrationError(RuntimeError):
    """A calibration run failed or timed out; the message says which ranks and why."""


@dataclass(frozen=True)
class AlphaBeta:
    """Latency (s) per message and inverse bandwidth (s/byte) of one link class."""

    alpha_s: float
    beta_s_per_byte: float

    @property
    def bandwidth(self) -> float:
        return 1.0 / self.beta_s_per_byte


def bus_factor(kind: str, group_size: int) -> float:
    """Bytes each rank sends over its link per byte of ``N`` (ring algorithms)."""
    n = group_size
    factors = {
        "all_reduce": 2 * (n - 1) / n,
        "all_gather": (n - 1) / n,
        "reduce_scatter": (n - 1) / n,
        "send_recv": 1.0,
    }
    if kind not in factors:
        raise ValueError(f"unknown collective {kind!r}; expected one of {', '.join(COLLECTIVES)}")
    return factors[kind]


def latency_steps(kind: str, group_size: int) -> int:
    """Sequential messages on the critical path of a ring collective."""
    n = group_size
    return {"all_reduce": 2 * (n - 1), "all_gather": n - 1, "reduce_scatter": n - 1}.get(kind, 1)


def link_alpha_beta(device: DeviceSpec, link: str = "intra") -> AlphaBeta:
    """The catalogue's alpha and beta for ``link`` (``"intra"`` or ``"inter"``) of ``device``."""
    if link == "intra":
        return AlphaBeta(device.intra_node_latency, 1.0 / device.intra_node_bandwidth)
    if link == "inter":
        return AlphaBeta(device.inter_node_latency, 1.0 / device.inter_node_bandwidth)
    raise ValueError(f"unknown link class {link!r}; expected 'intra' or 'inter'")


@dataclass(frozen=True)
class CollectiveFit:
    """A measured ``time = alpha_s + beta_s_per_byte · bus_factor(kind, n) · N`` fit.

    Attributes:
        kind: one of ``COLLECTIVES``.
        group_size: ranks in the group.
        link: ``"intra"`` or ``"inter"``.
        alpha_s: fixed time of one call (all its latency steps), seconds.
        beta_s_per_byte: inverse bus bandwidth, seconds per byte.
        sizes: the message sizes (bytes, ``N``) the fit used.
        times_s: the measured (low-percentile) time at each size.
    """

    kind: str
    group_size: int
    link: str
    alpha_s: float
    beta_s_per_byte: float
    sizes: tuple[int, ...]
    times_s: tuple[float, ...]

    def time(self, nbytes: int) -> float:
        return self.alpha_s + self.beta_s_per_byte * bus_factor(self.kind, self.group_size) * nbytes


@dataclass(frozen=True)
class CollectiveCalibration:
    """Fitted alpha/beta per (collective, group size, link class) for one backend and host."""

    backend: str
    fits: tuple[CollectiveFit, ...]
    percentile: float
    fingerprint: dict | None = None
    chain: int = 1

    def fit_for(self, kind: str, group_size: int, link: str = "intra") -> CollectiveFit | None:
        """The fit for exactly this (kind, group size, link), else the nearest group size's
        fit of the same kind and link rescaled (alpha by latency steps), else ``None``."""
        same = [f for f in self.fits if f.kind == kind and f.link == link]
        for f in same:
            if f.group_size == group_size:
                return f
        if not same:
            return None
        near = min(same, key=lambda f: abs(math.log(f.group_size / group_size)))
        scale = latency_steps(kind, group_size) / latency_steps(kind, near.group_size)
        return CollectiveFit(
            kind, group_size, link, near.alpha_s * scale, near.beta_s_per_byte, (), ()
        )

    def to_dict(self) -> dict:
        return {
            "backend": self.backend,
            "percentile": self.percentile,
            "chain": self.chain,
            "fits": [asdict(f) for f in self.fits],
        }

    @classmethod
    def from_dict(cls, data: dict, fingerprint: dict | None = None) -> CollectiveCalibration:
        fits = tuple(
            CollectiveFit(**{**f, "sizes": tuple(f["sizes"]), "times_s": tuple(f["times_s"])})
            for f in data["fits"]
        )
        return cls(data["backend"], fits, data["percentile"], fingerprint,
                   int(data.get("chain", 1)))


def collective_time(
    kind: str,
    nbytes: float,
    group_size: int,
    *,
    device: DeviceSpec | None = None,
    link: str = "intra",
    calibration: CollectiveCalibration | None = None,
    alpha_beta: AlphaBeta | None = None,
) -> float:
    """Predicted seconds for one collective.

    Args:
        kind: ``all_reduce``, ``all_gather``, ``reduce_scatter`` or ``send_recv``.
        nbytes: ``N``: the all-reduced tensor, the gathered output, the scattered input,
            or the message.
        group_size: ranks in the group (1 means no communication: 0 s).
        device: catalogue entry whose link figures are used without a calibration.
        link: ``"intra"`` (inside one node) or ``"inter"`` (the group crosses nodes; the
            slower inter-node link bounds a ring).
        calibration: measured fits; used when one exists for (kind, group size, link).
        alpha_beta: explicit link figures (overrides ``device``).

    Returns:
        Seconds.
    """
    if group_size <= 1 or nbytes <= 0:
        return 0.0
    if calibration is not None and alpha_beta is None:
        fit = calibration.fit_for(kind, group_size, link)
        if fit is not None:
            return fit.time(nbytes)
    if alpha_beta is None:
        if device is None:
            raise ValueError("collective_time needs a device, an alpha_beta or a calibration")
        alpha_beta = link_alpha_beta(device, link)
    return (
        latency_steps(kind, group_size) * alpha_beta.alpha_s
        + bus_factor(kind, group_size) * nbytes * alpha_beta.beta_s_per_byte
    )


def p2p_time(
    nbytes: float,
    *,
    device: DeviceSpec | None = None,
    link: str = "intra",
    calibration: CollectiveCalibration | None = None,
) -> float:
    """Seconds to send ``nbytes`` from one rank to another over ``link``."""
    return collective_time("send_recv", nbytes, 2, device=device, link=link, calibration=calibration)


def boundary_time(
    nbytes: float,
    link: str = "intra",
    *,
    device: DeviceSpec | None = None,
    calibration: CollectiveCalibration | None = None,
) -> float:
    """Pipeline boundary transfer: the bytes crossing a cut (``CutPoint.bytes``, scaled to
    the microbatch) sent once from the last rank of one stage to the first of the next.

    Args:
        nbytes: bytes crossing the cut for one microbatch.
        link: ``"intra"`` when both stages sit in one node, else ``"inter"``.
        device: catalogue entry (used when no calibration covers ``send_recv``).
        calibration: measured point-to-point fit, if any.

    Returns:
        Seconds.
    """
    return p2p_time(nbytes, device=device, link=link, calibration=calibration)


# --------------------------------------------------------------------------- calibration


def fit_alpha_beta(sizes: Sequence[float], times: Sequence[float], factor: float = 1.0):
    """Least squares in relative error of ``t = alpha + beta · factor · size``.

    Relative (1/t weighted) residuals keep small messages, whose time is almost all alpha,
    from being drowned by large ones.

    Returns:
        ``(alpha_s, beta_s_per_byte)``.
    """
    x = np.asarray(sizes, dtype=float) * factor
    y = np.asarray(times, dtype=float)
    w = 1.0 / y
    a = np.stack([w, x * w], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(a, np.ones_like(y), rcond=None)
    if alpha <= 0 or beta <= 0:  # degenerate data: fall back to endpoints
        i, j = int(np.argmin(x)), int(np.argmax(x))
        beta = max((y[j] - y[i]) / max(x[j] - x[i], 1.0), 1e-15)
        alpha = max(y[i] - beta * x[i], 1e-9)
    return float(alpha), float(beta)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_kind(dist, kind: str, nbytes: int, rank: int, world: int):
    """Build tensors for one (kind, size) and return a zero-argument call doing it once."""
    numel = max(nbytes // 4, world)
    numel -= numel % world
    if kind == "all_reduce":
        x = torch.ones(numel)
        return lambda: dist.all_reduce(x)
    if kind == "all_gather":
        shard, out = torch.ones(numel // world), torch.empty(numel)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return lambda: gather(out, shard)
    if kind == "reduce_scatter":
        full, out = torch.ones(numel), torch.empty(numel // world)
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return lambda: scatter(out, full)
    if kind == "send_recv":  # ping-pong between ranks 0 and 1; half the round trip
        x = torch.ones(numel)

        def ping_pong():
            if rank == 0:
                dist.send(x, 1)
                dist.recv(x, 1)
            elif rank == 1:
                dist.recv(x, 0)
                dist.send(x, 0)

        return ping_pong
    raise ValueError(f"unknown collective {kind!r}")


def _calibration_worker(
    rank: int,
    world: int,
    port: int,
    backend: str,
    kinds: tuple[str, ...],
    sizes: tuple[int, ...],
    reps: int,
    warmup: int,
    timeout_s: float,
    out_path: str,
    chain: int = 1,
) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        backend,
        rank=rank,
        world_size=world,
        init_method=f"tcp://127.0.0.1:{port}",
        timeout=timedelta(seconds=timeout_s),
    )
    results: dict[str, dict[str, list[float]]] = {}
    try:
        # Every (kind, size) runs once per round, rounds repeated: a slow spell of a shared
        # host (seconds long) then hits every size alike instead of whichever size happened
        # to be running, and the low percentile of each size sees the same machine.
        ops = [(kind, nbytes, _run_kind(dist, kind, nbytes, rank, world))
               for kind in kinds for nbytes in sizes]  # fmt: skip
        times: dict[tuple[str, int], list[float]] = {(k, n): [] for k, n, _ in ops}
        for i in range(warmup + reps):
            for kind, nbytes, op in ops:
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(chain):
                    op()
                elapsed = (time.perf_counter() - t0) / chain
                if i >= warmup:
                    times[kind, nbytes].append(elapsed / 2 if kind == "send_recv" else elapsed)
        for kind, nbytes, _ in ops:
            # A collective ends when its slowest rank ends.
            t = torch.tensor(times[kind, nbytes], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            results.setdefault(kind, {})[str(nbytes)] = t.tolist()
        if rank == 0:
            Path(out_path).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def measure_collectives(
    world_size: int,
    *,
    backend: str = "gloo",
    kinds: Sequence[str] = COLLECTIVES,
    sizes: Sequence[int] = DEFAULT_SIZES,
    reps: int = 40,
    warmup: int = 5,
    timeout_s: float = 60.0,
    chain: int = 1,
) -> dict[str, dict[int, list[float]]]:
    """Run the collectives on ``world_size`` live processes and return raw timings.

    Each repetition times ``chain`` back-to-back calls of one (kind, size) after a barrier
    and records the time per call (``chain=1``: one call alone).

    Spawns ``world_size`` processes (``torch.multiprocessing``, start method ``spawn``),
    each with one intra-op thread, joined through ``tcp://127.0.0.1:<free port>``. Every
    collective runs under the process group's ``timeout_s``, and the whole run is killed
    after ``timeout_s`` plus start-up time.

    Returns:
        ``{kind: {nbytes: [seconds per call, one per repetition]}}``, each repetition's time
        being the slowest rank's.

    Raises:
        CalibrationError: a rank failed or the run timed out.
    """
    import torch.multiprocessing as mp

    if backend == "nccl":
        raise CalibrationError("nccl calibration needs one GPU per rank; run it under torchrun")
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "timings.json")
        args = (world_size, _free_port(), backend, tuple(kinds), tuple(sizes), reps, warmup,
                timeout_s, out_path, chain)  # fmt: skip
        ctx = mp.start_processes(
            _calibration_worker, args=args, nprocs=world_size, join=False, start_method="spawn"
        )
        # Start-up, one collective's timeout, and 50 ms per call (a 4 MiB gloo all-reduce
        # takes ~16 ms here, several times that on a loaded host): a safety net for a
        # rank stuck outside a collective, which the process group's timeout cannot see.
        calls = (warmup + reps) * chain * len(kinds) * len(sizes)
        budget = timeout_s + 60.0 + 0.05 * calls
        deadline = time.monotonic() + budget
        try:
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise CalibrationError(
                        f"collective calibration on {world_size} {backend} ranks did not finish "
                        f"within {budget:.0f} s; lower reps/sizes or raise timeout_s"
                    )
        except mp.ProcessRaisedException as e:
            raise CalibrationError(f"a calibration rank failed: {e}") from None
        except mp.ProcessExitedException as e:
            raise CalibrationError(f"a calibration rank exited abnormally: {e}") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
                    p.join(5)
        raw = json.loads(Path(out_path).read_text())
    return {kind: {int(n): v for n, v in by_size.items()} for kind, by_size in raw.items()}


def _calibration_path(backend: str, cache: str | os.PathLike | None) -> Path:
    return cache_dir(cache) / f"collectives-{backend}.json"


def fit_calibration(
    raw: dict[str, dict[int, list[float]]],
    world_size: int,
    backend: str = "gloo",
    percentile: float = DEFAULT_PERCENTILE,
    chain: int = 1,
) -> CollectiveCalibration:
    """Fit alpha/beta per collective to ``measure_collectives`` timings (every size in
    ``raw``, measured in chains of ``chain`` calls), using each size's ``percentile``-th
    timing."""
    fits = []
    for kind, by_size in raw.items():
        ns = sorted(by_size)
        ts = [float(np.percentile(by_size[n], percentile)) for n in ns]
        alpha, beta = fit_alpha_beta(ns, ts, bus_factor(kind, world_size))
        fits.append(CollectiveFit(kind, world_size, "intra", alpha, beta, tuple(ns), tuple(ts)))
    return CollectiveCalibration(backend, tuple(fits), percentile,
                                 device_fingerprint("cpu", threads=1), chain)  # fmt: skip


def calibrate(
    world_size: int,
    backend: str = "gloo",
    *,
    sizes: Sequence[int] = DEFAULT_SIZES,
    reps: int = 40,
    kinds: Sequence[str] = COLLECTIVES,
    percentile: float = DEFAULT_PERCENTILE,
    chain: int = DEFAULT_CHAIN,
    timeout_s: float = 60.0,
    cache: str | os.PathLike | None = None,
    save: bool = True,
) -> CollectiveCalibration:
    """Measure collectives on ``world_size`` live ranks, fit alpha/beta, store the fits.

    gloo latency on a shared host is bimodal (scheduler wake-ups), and a step pays it: each
    size is timed ``reps`` times as a chain of ``chain`` back-to-back calls, and the
    ``percentile``-th per-call time (the median) is fitted: what a step's collectives cost
    on this host, wake-ups included (module docstring). ``chain=1, percentile=10`` fits
    the best case of one call alone instead.

    Args:
        world_size: ranks (2 or more).
        backend: ``gloo`` (CPU).
        sizes: message sizes ``N`` in bytes used for the fit.
        reps: timed repetitions per size (after 5 warm-up chains), sizes interleaved.
        kinds: the collectives to measure.
        percentile: the percentile of each size's timings that is fitted.
        chain: back-to-back calls per repetition.
        timeout_s: per-collective timeout; the run is killed after this plus start-up.
        cache: cache directory (default: ``$FX_PLANNER_CACHE`` or ``.fx-planner-cache``).
        save: merge the fits into ``<cache>/collectives-<backend>.json``.

    Returns:
        The fitted calibration for this group size (merged with stored ones when saved).
    """
    if world_size < 2:
        raise ValueError(f"calibration needs at least 2 ranks, got {world_size}")
    raw = measure_collectives(world_size, backend=backend, kinds=kinds, sizes=sizes, reps=reps,
                              timeout_s=timeout_s, chain=chain)
    result = fit_calibration(raw, world_size, backend, percentile, chain)
    fits, fingerprint = result.fits, result.fingerprint
    if save:
        stored = load_calibration(backend, cache=cache)
        keep = [] if stored is None else [
            f for f in stored.fits if (f.kind, f.group_size, f.link) not in
            {(g.kind, g.group_size, g.link) for g in fits}
        ]  # fmt: skip
        result = CollectiveCalibration(backend, tuple(keep) + tuple(fits), percentile, fingerprint,
                                       chain)
        write_record(_calibration_path(backend, cache), _SCHEMA, result.to_dict(), fingerprint)
    return result


def load_calibration(
    backend: str = "gloo", *, cache: str | os.PathLike | None = None
) -> CollectiveCalibration | None:
    """The stored calibration for ``backend`` measured on this host, or ``None``."""
    fingerprint = device_fingerprint("cpu", threads=1)
    data = read_record(_calibration_path(backend, cache), _SCHEMA, fingerprint)
    return None if data is None else CollectiveCalibration.from_dict(data, fingerprint)
