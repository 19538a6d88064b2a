"""NCCL collectives on GPUs: per algorithm and protocol, the best one per message size.

NCCL prices every (algorithm, protocol) pair of a collective as ``latency + bytes /
algorithm bandwidth`` and runs the cheapest (``ncclTopoGetAlgoTime`` in NVIDIA/nccl
``src/graph/tuning.cc``); this module does the same with NCCL's own latency table and
the bandwidths of the catalogue's links:

    latency   = baseLat[algo][proto] + steps · hwLat[link][algo][proto]
                ring: steps = 2(n-1) for all-reduce, n-1 for all-gather / reduce-scatter;
                tree: 2(n-1) hops up and down the chain inside a node
    bus bw    = RING_LINK_EFFICIENCY · link bandwidth (per direction), the NIC's rate when
                the group crosses nodes; A100 (sm80) capped at 235 GB/s as NCCL does;
                ring: LL × 1/2 (at most NCCL's llMaxBw), LL128 × 0.92, Simple × 1;
                tree: × 0.92, then LL × 1/3.8 (at most llMaxBw), LL128 × 7/9
    alg bw    ring: bus bw · n / steps;  tree: bus bw / 2 (two trees share the links)
    NVLS      (NVLink SHARP: Hopper with NVSwitch, all-reduce inside one node, Simple
              only): the switch reduces, each GPU moves (1 + 1/n)·N per direction, at
              NVLS_EFFICIENCY of its links; latency NCCL's 25 us

``nbytes`` is ``N`` as in ``cost_models.collectives``: the all-reduced tensor, the gathered
output, the scattered input. ``all_reduce_time(..., algorithm="custom")`` prices the
one-shot / two-shot intra-node all-reduce of gpt-fast (PyTorch ``IntraNodeComm``,
``ENABLE_INTRA_NODE_COMM=1``) and vLLM (its custom all-reduce): every rank reads its peers'
buffers over NVLink (P2P), one kernel, no NCCL protocol.

>>> from cost_models.devices import lookup
>>> c = choose("all_reduce", 16384, 8, lookup("H100"))   # a decode step's all-reduce
>>> (c.algorithm, c.protocol, round(c.seconds * 1e6, 1))
('ring', 'LL', 15.2)
>>> choose("all_reduce", 4 << 30, 8, lookup("H100")).algorithm  # 4 GiB: the switch reduces
'nvls'
>>> choose("all_reduce", 4 << 30, 8, lookup("A100-80GB")).algorithm
'ring'
"""

from __future__ import annotations

from dataclasses import dataclass

from cost_models.collectives import latency_steps
from cost_models.devices import DeviceSpec

__all__ = ["ALGORITHMS", "PROTOCOLS", "NcclChoice", "choose", "nccl_time", "has_nvls",
           "custom_all_reduce_time", "RING_LINK_EFFICIENCY", "NVLS_EFFICIENCY",
           "CUSTOM_AR_LATENCY_S", "CUSTOM_AR_LATENCY_PER_PEER_S"]

ALGORITHMS = ("ring", "tree", "nvls")
PROTOCOLS = ("LL", "LL128", "Simple")

# NVIDIA/nccl src/graph/tuning.cc (NCCL 2.18-2.2x): baseLat [algo][LL, LL128, Simple], us.
_BASE_LAT = {"tree": (6.8, 14.0, 8.4), "ring": (6.6, 14.0, 8.4), "nvls": (0.0, 0.0, 0.0)}
# Same file, hwLat [NVLINK | PCI | NET][algo][LL, LL128, Simple], us (0: not available).
_HW_LAT = {
    "nvlink": {"tree": (0.6, 1.25, 4.0), "ring": (0.6, 1.9, 3.4), "nvls": (0.0, 0.0, 25.0)},
    "pci": {"tree": (1.0, 1.9, 4.0), "ring": (1.0, 2.5, 5.7)},
    "net": {"tree": (5.0, 8.5, 14.0), "ring": (2.7, 4.0, 14.0)},
}
# Same file: llMaxBws (single node; GB/s) per architecture, and "if (compCap80) busBw =
# std::min(busBw, 235.0f)" (tuning.cc at NVIDIA/nccl 01afd20a, the A100 cap).
_LL_MAX_BW = {"ampere": 87.7e9, "hopper": 141e9}
_SM80_BUS_BW_CAP = 235e9
# Fitted: ring Simple bus bandwidth over the catalogue's per-direction NVLink rate, from the
# FIT rows nccl-h100-ring-2 and nccl-h100-ring-8 of benchmarks/published.py (NVIDIA/nccl
# issue 1455: 365-370 GB/s for 2..8 H100 SXM, midpoint 367.5; 367.5 / 450 = 0.817).
RING_LINK_EFFICIENCY = 0.817
# NVIDIA/nccl src/tuning (nvls.cc, NCCL 2.2x): nvlsEfficiency = 0.85 for Hopper.
NVLS_EFFICIENCY = 0.85
# Fitted (`benchmarks/published.py --fit`): the custom all-reduce's fixed time per call,
# a + b·(n - 1) for n ranks, jointly with roofline.GPU_HBM_EFFICIENCY and GPU_KERNEL_S on
# the FIT rows gf-l2-7b-tp2/4/8 and gf-l2-70b-tp2/8 (gpt-fast, A100 hybrid cube mesh).
CUSTOM_AR_LATENCY_S = 9.20e-6
CUSTOM_AR_LATENCY_PER_PEER_S = 0.67e-6


@dataclass(frozen=True)
class NcclChoice:
    """The (algorithm, protocol) NCCL runs for one call, and its predicted time."""

    algorithm: str
    protocol: str
    seconds: float


def _arch(device: DeviceSpec) -> str:
    return "hopper" if device.name.startswith(("H100", "H200")) else "ampere"


def has_nvls(device: DeviceSpec) -> bool:
    """NVLink SHARP needs Hopper (or later) GPUs on NVSwitch (not PCIe cards)."""
    return _arch(device) == "hopper" and "NVSwitch" in device.intra_node_link


def _hw(device: DeviceSpec, link: str) -> str:
    if link == "inter":
        return "net"
    return "nvlink" if "NVLink" in device.intra_node_link else "pci"


def _bus_bw(device: DeviceSpec, link: str) -> float:
    raw = device.inter_node_bandwidth if link == "inter" else device.intra_node_bandwidth
    bw = RING_LINK_EFFICIENCY * raw
    if _arch(device) == "ampere" and device.name.startswith("A100"):
        bw = min(bw, _SM80_BUS_BW_CAP)
    return bw


def nccl_time(kind: str, nbytes: float, group_size: int, device: DeviceSpec, *,
              algorithm: str, protocol: str, link: str = "intra") -> float | None:
    """Seconds for one call with ``algorithm`` and ``protocol``; ``None`` where NCCL does
    not offer that pair here (tree and NVLS are all-reduce only, NVLS Simple only)."""
    n = group_size
    if n <= 1 or nbytes <= 0:
        return 0.0
    p = PROTOCOLS.index(protocol)
    hw = _hw(device, link)
    if algorithm == "nvls":
        if kind != "all_reduce" or protocol != "Simple" or link != "intra" or not has_nvls(device):
            return None
        latency = (_BASE_LAT["nvls"][p] + _HW_LAT["nvlink"]["nvls"][p]) * 1e-6
        alg_bw = NVLS_EFFICIENCY * device.intra_node_bandwidth * n / (n + 1)
        return latency + nbytes / alg_bw
    if algorithm == "tree" and kind != "all_reduce":
        return None
    bus = _bus_bw(device, link)
    steps = latency_steps(kind, n)
    if algorithm == "ring":
        factor = {"LL": 0.5, "LL128": 0.92, "Simple": 1.0}[protocol]
        latency = _BASE_LAT["ring"][p] + steps * _HW_LAT[hw]["ring"][p]
        bus_p = bus * factor
        if protocol == "LL":
            bus_p = min(bus_p, _LL_MAX_BW[_arch(device)])
        alg_bw = bus_p * n / steps
    elif algorithm == "tree":
        factor = {"LL": 1 / 3.8, "LL128": 7 / 9, "Simple": 1.0}[protocol]
        latency = _BASE_LAT["tree"][p] + 2 * (n - 1) * _HW_LAT[hw]["tree"][p]
        bus_p = bus * 0.92 * factor
        if protocol == "LL":
            bus_p = min(bus_p, _LL_MAX_BW[_arch(device)])
        alg_bw = bus_p / 2
    else:
        raise ValueError(f"unknown NCCL algorithm {algorithm!r}; expected one of "
                         f"{', '.join(ALGORITHMS)}")
    return latency * 1e-6 + nbytes / alg_bw


def choose(kind: str, nbytes: float, group_size: int, device: DeviceSpec, *,
           link: str = "intra", algorithms: tuple[str, ...] = ALGORITHMS) -> NcclChoice:
    """The (algorithm, protocol) with the least predicted time, as NCCL picks it."""
    best = None
    for a in algorithms:
        for p in PROTOCOLS:
            t = nccl_time(kind, nbytes, group_size, device, algorithm=a, protocol=p, link=link)
            if t is not None and (best is None or t < best.seconds):
                best = NcclChoice(a, p, t)
    if best is None:
        raise ValueError(f"no NCCL algorithm of {algorithms} runs {kind} on {device.name}")
    return best


def custom_all_reduce_time(nbytes: float, group_size: int, device: DeviceSpec) -> float:
    """One-shot or two-shot P2P all-reduce inside a node, whichever is faster.

    One-shot: each rank reads the ``n - 1`` peers' whole tensors and reduces locally;
    two-shot: a reduce-scatter then an all-gather through the same buffers (two fixed
    times, ``2(n-1)/n · N`` bytes per rank). Links at ``RING_LINK_EFFICIENCY``.
    """
    n = group_size
    if n <= 1 or nbytes <= 0:
        return 0.0
    fixed = CUSTOM_AR_LATENCY_S + CUSTOM_AR_LATENCY_PER_PEER_S * (n - 1)
    bw = RING_LINK_EFFICIENCY * device.intra_node_bandwidth
    one_shot = fixed + (n - 1) * nbytes / bw
    two_shot = 2 * fixed + 2 * (n - 1) / n * nbytes / bw
    return min(one_shot, two_shot)
