"""Device catalogue: one source of truth for every device's peak numbers.

Figures are vendor datasheet values (dense, i.e. without 2:4 sparsity) unless a comment
says otherwise. "Per direction" link figures are half of NVIDIA's bidirectional numbers.
Link *latencies* are not datasheet figures: they are typical small-message latencies
(nccl-tests on NVLink/PCIe, InfiniBand/RoCE verbs latency) and are marked as such; a
cluster JSON file or ``plan calibrate`` replaces them with measured values.

The ``cpu`` entry describes this machine's CPU as one device per process; its peak
FLOP/s and memory bandwidth are *nominal* values that the roofline replaces with the
figures measured by ``cost_models.roofline.calibrate_device`` when a calibration exists.

>>> lookup("h100").name
'H100-SXM-80GB'
>>> lookup("A100").name
'A100-80GB'
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

__all__ = ["DeviceSpec", "DEVICES", "lookup", "UnknownDeviceError", "GB", "GiB"]

GB = 10**9
GiB = 2**30


class UnknownDeviceError(ValueError):
    """The device name is not in the catalogue (the message lists close matches)."""


@dataclass(frozen=True)
class DeviceSpec:
    """Peak capabilities of one accelerator and the links around it.

    Attributes:
        name: canonical catalogue name (``"H100-SXM-80GB"``).
        peak_flops: dense peak FLOP/s per dtype name (``"bfloat16"``, ``"float32"``, ...).
            ``float32`` is the tensor-core TF32 rate where PyTorch uses it for matmuls
            only when enabled; we list the plain FP32 (non-tensor-core) rate, the default.
        memory_bandwidth: device memory bandwidth, bytes/s.
        memory_bytes: device memory capacity, bytes.
        intra_node_bandwidth: per-direction bandwidth between two devices of one node, bytes/s.
        intra_node_latency: latency of one intra-node message, seconds.
        inter_node_bandwidth: per-device bandwidth to another node, bytes/s.
        inter_node_latency: latency of one inter-node message, seconds.
        max_devices_per_node: the largest node this device ships in.
        aliases: other names accepted by ``lookup``.
        intra_node_link: the intra-node interconnect, in words (``"NVLink 4"``).
        inter_node_link: the inter-node interconnect assumed, in words.
        launch_overhead_s: fixed cost of launching one op (kernel launch + framework
            dispatch in eager PyTorch); the roofline adds it per kernel launched from the
            CPU (every op eager, every fused kernel compiled, none in a CUDA graph:
            ``cost_models.runtime``).
        backend: the torch.distributed backend for this device (``nccl`` or ``gloo``).
    """

    name: str
    peak_flops: dict[str, float]
    memory_bandwidth: float
    memory_bytes: int
    intra_node_bandwidth: float
    intra_node_latency: float
    inter_node_bandwidth: float
    inter_node_latency: float
    max_devices_per_node: int = 8
    aliases: tuple[str, ...] = ()
    intra_node_link: str = ""
    inter_node_link: str = ""
    launch_overhead_s: float = 5e-6
    backend: str = "nccl"

    def flops_for(self, dtype: str) -> float:
        """Peak dense FLOP/s for ``dtype`` (falls back to float32 for unknown dtypes)."""
        return self.peak_flops.get(dtype, self.peak_flops["float32"])


DEVICES: dict[str, DeviceSpec] = {}

# Not datasheet figures (see module docstring): typical small-message latencies.
_NVLINK_LATENCY = 3e-6  # NCCL intra-node small-message latency over NVLink, nccl-tests
_PCIE_LATENCY = 6e-6  # NCCL over PCIe (no NVLink), nccl-tests
_IB_LATENCY = 5e-6  # InfiniBand/RoCE verbs latency incl. NCCL proxy overhead
# Eager PyTorch on CUDA: ~5 us per op for launch + dispatch (PyTorch performance tuning
# guide; what CUDA graphs remove). Not a datasheet figure.
_CUDA_LAUNCH = 5e-6


def _register(spec: DeviceSpec) -> DeviceSpec:
    DEVICES[spec.name] = spec
    return spec


_register(
    DeviceSpec(
        name="H100-SXM-80GB",
        # NVIDIA H100 Tensor Core GPU datasheet, SXM column: BF16/FP16 1,979 TFLOPS with
        # sparsity = 989 dense; FP32 67 TFLOPS; 80 GB HBM3 at 3.35 TB/s.
        peak_flops={"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
        memory_bandwidth=3.35e12,
        memory_bytes=80 * GB,
        # Datasheet: NVLink 900 GB/s (bidirectional) = 450 GB/s per direction.
        intra_node_bandwidth=450e9,
        intra_node_latency=_NVLINK_LATENCY,
        # DGX H100: one ConnectX-7 NDR 400 Gb/s InfiniBand port per GPU = 50 GB/s.
        inter_node_bandwidth=50e9,
        inter_node_latency=_IB_LATENCY,
        aliases=("H100", "H100-SXM", "H100-80GB", "H100-SXM5"),
        intra_node_link="NVLink 4 (NVSwitch)",
        inter_node_link="InfiniBand NDR 400 Gb/s per GPU",
        launch_overhead_s=_CUDA_LAUNCH,
    )
)

_register(
    DeviceSpec(
        name="H100-PCIe",
        # H100 datasheet, PCIe column: BF16/FP16 1,513 TFLOPS with sparsity = 756 dense;
        # FP32 51 TFLOPS; 80 GB HBM2e at 2 TB/s.
        peak_flops={"bfloat16": 756e12, "float16": 756e12, "float32": 51e12},
        memory_bandwidth=2.0e12,
        memory_bytes=80 * GB,
        # Datasheet: PCIe Gen5 128 GB/s (bidirectional) = 64 GB/s per direction. The
        # optional NVLink bridge joins pairs only, so a TP group > 2 crosses PCIe.
        intra_node_bandwidth=64e9,
        intra_node_latency=_PCIE_LATENCY,
        # Assumes one 400 Gb/s NIC per GPU (ConnectX-7 datasheet rate) = 50 GB/s.
        inter_node_bandwidth=50e9,
        inter_node_latency=_IB_LATENCY,
        aliases=("H100PCIe", "H100-PCIE-80GB"),
        intra_node_link="PCIe Gen5 x16",
        inter_node_link="400 Gb/s NIC per GPU (assumed)",
        launch_overhead_s=_CUDA_LAUNCH,
    )
)

_register(
    DeviceSpec(
        name="H200",
        # NVIDIA H200 Tensor Core GPU datasheet, SXM column: BF16/FP16 1,979 TFLOPS with
        # sparsity = 989 dense; FP32 67 TFLOPS; 141 GB HBM3e at 4.8 TB/s.
        peak_flops={"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
        memory_bandwidth=4.8e12,
        memory_bytes=141 * GB,
        # Datasheet: NVLink 900 GB/s (bidirectional) = 450 GB/s per direction.
        intra_node_bandwidth=450e9,
        intra_node_latency=_NVLINK_LATENCY,
        # DGX H200: one ConnectX-7 NDR 400 Gb/s port per GPU = 50 GB/s.
        inter_node_bandwidth=50e9,
        inter_node_latency=_IB_LATENCY,
        aliases=("H200-SXM", "H200-141GB", "H200-SXM-141GB"),
        intra_node_link="NVLink 4 (NVSwitch)",
        inter_node_link="InfiniBand NDR 400 Gb/s per GPU",
        launch_overhead_s=_CUDA_LAUNCH,
    )
)

_register(
    DeviceSpec(
        name="A100-40GB",
        # NVIDIA A100 Tensor Core GPU datasheet, 40GB SXM column: BF16/FP16 312 TFLOPS
        # (624 with sparsity); FP32 19.5 TFLOPS; 40 GB HBM2 at 1,555 GB/s.
        peak_flops={"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
        memory_bandwidth=1.555e12,
        memory_bytes=40 * GB,
        # Datasheet: NVLink 600 GB/s (bidirectional) = 300 GB/s per direction.
        intra_node_bandwidth=300e9,
        intra_node_latency=_NVLINK_LATENCY,
        # DGX A100: one ConnectX-6 HDR 200 Gb/s InfiniBand port per GPU = 25 GB/s.
        inter_node_bandwidth=25e9,
        inter_node_latency=_IB_LATENCY,
        aliases=("A100-SXM-40GB", "A100-40G"),
        intra_node_link="NVLink 3 (NVSwitch)",
        inter_node_link="InfiniBand HDR 200 Gb/s per GPU",
        launch_overhead_s=_CUDA_LAUNCH,
    )
)

_register(
    DeviceSpec(
        name="A100-80GB",
        # A100 datasheet, 80GB SXM column: BF16/FP16 312 TFLOPS (624 with sparsity);
        # FP32 19.5 TFLOPS; 80 GB HBM2e at 2,039 GB/s.
        peak_flops={"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
        memory_bandwidth=2.039e12,
        memory_bytes=80 * GB,
        # Datasheet: NVLink 600 GB/s (bidirectional) = 300 GB/s per direction.
        intra_node_bandwidth=300e9,
        intra_node_latency=_NVLINK_LATENCY,
        # DGX A100 80GB: one ConnectX-6 HDR 200 Gb/s port per GPU = 25 GB/s.
        inter_node_bandwidth=25e9,
        inter_node_latency=_IB_LATENCY,
        aliases=("A100", "A100-SXM-80GB", "A100-80G"),
        intra_node_link="NVLink 3 (NVSwitch)",
        inter_node_link="InfiniBand HDR 200 Gb/s per GPU",
        launch_overhead_s=_CUDA_LAUNCH,
    )
)

_register(
    DeviceSpec(
        name="L40S",
        # NVIDIA L40S datasheet: BF16/FP16 tensor 362.05 TFLOPS dense (733 with sparsity);
        # FP32 91.6 TFLOPS; 48 GB GDDR6 at 864 GB/s.
        peak_flops={"bfloat16": 362.05e12, "float16": 362.05e12, "float32": 91.6e12},
        memory_bandwidth=864e9,
        memory_bytes=48 * GB,
        # Datasheet: PCIe Gen4 x16 64 GB/s bidirectional = 32 GB/s per direction; no NVLink.
        intra_node_bandwidth=32e9,
        intra_node_latency=_PCIE_LATENCY,
        # Not part of the GPU: assumes one 200 Gb/s NIC per GPU (ConnectX-7 rate) = 25 GB/s.
        inter_node_bandwidth=25e9,
        inter_node_latency=_IB_LATENCY,
        aliases=("L40S-48GB",),
        intra_node_link="PCIe Gen4 x16",
        inter_node_link="200 Gb/s NIC per GPU (assumed)",
        launch_overhead_s=_CUDA_LAUNCH,
    )
)

_register(
    DeviceSpec(
        name="L4",
        # NVIDIA L4 datasheet: BF16/FP16 tensor 242 TFLOPS with sparsity = 121 dense;
        # FP32 30.3 TFLOPS; 24 GB GDDR6 at 300 GB/s.
        peak_flops={"bfloat16": 121e12, "float16": 121e12, "float32": 30.3e12},
        memory_bandwidth=300e9,
        memory_bytes=24 * GB,
        # Datasheet: PCIe Gen4 x16 64 GB/s bidirectional = 32 GB/s per direction; no NVLink.
        intra_node_bandwidth=32e9,
        intra_node_latency=_PCIE_LATENCY,
        # Not part of the GPU: assumes 100 Gb/s Ethernet per node shared by the GPUs
        # (typical L4 cloud instances), i.e. 12.5 GB/s.
        inter_node_bandwidth=12.5e9,
        inter_node_latency=_IB_LATENCY,
        aliases=("L4-24GB",),
        intra_node_link="PCIe Gen4 x16",
        inter_node_link="100 Gb/s Ethernet (assumed)",
        launch_overhead_s=_CUDA_LAUNCH,
    )
)

_register(
    DeviceSpec(
        name="cpu",
        # This machine's CPU as one device per process (gloo). Nominal figures only:
        # `cost_models.roofline.calibrate_device` measures peak matmul FLOP/s and copy
        # bandwidth here and the roofline uses those measurements when they exist.
        # Nominal: 2 cores x 2.0 GHz x 64 FP32 FLOP/cycle (2 AVX-512 FMA units) = 256 GFLOP/s.
        peak_flops={"bfloat16": 256e9, "float16": 256e9, "float32": 256e9},
        memory_bandwidth=10e9,
        memory_bytes=24 * GiB,
        # Processes on one host talk through loopback TCP (gloo); replaced by `plan calibrate`.
        intra_node_bandwidth=2e9,
        intra_node_latency=4e-4,
        inter_node_bandwidth=1.25e9,  # 10 Gb/s Ethernet, assumed
        inter_node_latency=1e-3,
        max_devices_per_node=64,
        aliases=("CPU",),
        intra_node_link="loopback TCP (gloo)",
        inter_node_link="10 Gb/s Ethernet (assumed)",
        launch_overhead_s=5e-6,
        backend="gloo",
    )
)


def lookup(name: str) -> DeviceSpec:
    """Return the catalogue entry for ``name`` (case-insensitive, aliases accepted).

    Raises:
        UnknownDeviceError: with the closest catalogue names when ``name`` is unknown.
    """
    key = name.strip().lower()
    for spec in DEVICES.values():
        if key == spec.name.lower() or key in (a.lower() for a in spec.aliases):
            return spec
    names = sorted(set(DEVICES) | {a for s in DEVICES.values() for a in s.aliases})
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownDeviceError(
        f"unknown device {name!r}.{hint} Known devices: {', '.join(sorted(DEVICES))} "
        "(run `plan devices` for the catalogue, or describe the device in a cluster JSON file)."
    )
