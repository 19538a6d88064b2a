"""Runtime modes: which kernels a step launches, and which of them pay a CPU launch.

The roofline prices an op class's work as kernels. How many kernels run, and how many of
them are launched one by one from the CPU, depends on how the step is run:

    runtime      kernels                                       CPU launches
    eager        one per op (views launch nothing)             every kernel
    compiled     matmuls and attention as they are; the        every kernel
                 pointwise/norm/reduction ops between them
                 fused, one kernel per gap between them
    cudagraphs   as compiled (the step compiled and            none: the captured graph
                 captured: torch.compile's "reduce-overhead",   is replayed by one call
                 what gpt-fast and vLLM run for decode)

so a step's time on a GPU is

    Σ_classes  launches · launch_overhead + kernels · kernel_s + roofline(flops, bytes)

with ``launch_overhead`` the catalogue's per-op CPU cost (``DeviceSpec.launch_overhead_s``)
and ``kernel_s`` the GPU's own fixed time per kernel (``Efficiencies.kernel_s``, fitted;
see ``cost_models.roofline``). cudagraphs and compiled differ by the launch terms only.

A fused kernel reads its chain's inputs and writes its output once instead of every op
reading and writing through memory, so a fusible class's bytes are scaled by its fused
kernels over its ops (each fused kernel moves about what one op of its chain moved).

The CPU runs eager (no CUDA graphs; the CPU calibration is fitted to eager op timings).

>>> from cost_models.roofline import OpWork
>>> work = {"matmul": OpWork(7, 0, 700, 0), "attention": OpWork(1, 0, 10, 0),
...         "elementwise": OpWork(24, 0, 240, 0), "view": OpWork(23, 0, 0, 0)}
>>> [(c, k.kernels, k.launches, k.work.bytes) for c, k in kernels(work, "compiled").items()]
[('matmul', 7.0, 7.0, 700.0), ('attention', 1.0, 1.0, 10.0), ('elementwise', 9.0, 9.0, 90.0), ('view', 0.0, 0.0, 0.0)]
>>> kernels(work, "cudagraphs")["matmul"].launches
0.0
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cost_models.roofline import OpWork

__all__ = ["RUNTIMES", "FUSIBLE", "NO_KERNEL", "Kernels", "kernels", "default_runtime",
           "prefill_runtime", "check_runtime"]

RUNTIMES = ("eager", "compiled", "cudagraphs")
# Op classes torch.compile (inductor) fuses into the kernels around the matmuls and the
# attention kernel (which stay library calls: cuBLAS, flash/SDPA).
FUSIBLE = ("elementwise", "norm", "reduction", "copy", "other")
# Metadata-only ops: no kernel on a GPU.
NO_KERNEL = ("view",)


@dataclass(frozen=True)
class Kernels:
    """One op class's work as a runtime runs it.

    Attributes:
        work: the class's work (bytes reduced where fusion keeps values on chip).
        kernels: GPU kernels it runs (each pays the GPU's ``kernel_s``).
        launches: kernels launched one by one from the CPU (each pays the launch overhead).
    """

    work: OpWork
    kernels: float
    launches: float


def kernels(work: Mapping[str, OpWork], runtime: str = "eager") -> dict[str, Kernels]:
    """The kernels and CPU launches of a layer's per-class ``work`` under ``runtime``."""
    check_runtime(runtime)
    if runtime == "eager":
        return {c: Kernels(w, 0.0 if c in NO_KERNEL else float(w.count),
                           0.0 if c in NO_KERNEL else float(w.count))
                for c, w in work.items()}  # fmt: skip
    anchors = sum(w.count for c, w in work.items() if c not in FUSIBLE and c not in NO_KERNEL)
    fusible = sum(w.count for c, w in work.items() if c in FUSIBLE)
    # One fused kernel per gap between two library kernels (and one before the first).
    fused = min(fusible, anchors + 1)
    out = {}
    for c, w in work.items():
        if c in NO_KERNEL:
            n = 0.0
        elif c in FUSIBLE and w.count:
            share = fused / fusible
            n = w.count * share
            w = w.scaled(1.0, share)
        else:
            n = float(w.count)
        out[c] = Kernels(w, n, 0.0 if runtime == "cudagraphs" else n)
    return out


def default_runtime(device_backend: str, phase: str) -> str:
    """The runtime a plan assumes when none is given.

    On GPUs a decode step runs captured in a CUDA graph (the mode the generation runtime
    is meant to use on CUDA, issue 12 part 6; what gpt-fast and vLLM do), and prefill and
    training run eager: ``plan run`` executes the stage modules as they are, and a prompt's
    prefill at a new length is not a captured graph. The CPU (gloo) runs eager.
    """
    if device_backend != "nccl":
        return "eager"
    return "cudagraphs" if phase == "decode" else "eager"


def prefill_runtime(runtime: str) -> str:
    """The runtime of a decode plan's prompt prefill (its time to first token): a graph
    is captured for the fixed-shape decode step, not for the prompt, so ``cudagraphs``
    prefills ``compiled``."""
    return "compiled" if runtime == "cudagraphs" else runtime


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
