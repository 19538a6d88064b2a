"""Device catalogue: one source of truth for every device's peak numbers.

Figures are vendor datasheet values (dense, no sparsity) unless a comment says otherwise.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

__all__ = ["DeviceSpec", "DEVICES", "lookup", "UnknownDeviceError"]

GB = 10**9
GiB = 2**30


class UnknownDeviceError(ValueError):
    pass


@dataclass(frozen=True)
class DeviceSpec:
    """Peak capabilities of one accelerator and the links around it.

    Attributes:
        name: canonical catalogue name (``"H100-SXM-80GB"``).
        peak_flops: dense peak FLOP/s per dtype name (``"bfloat16"``, ``"float32"``, ...).
        memory_bandwidth: device memory bandwidth, bytes/s.
        memory_bytes: device memory capacity, bytes.
        intra_node_bandwidth: per-direction bandwidth between two devices of one node, bytes/s.
        intra_node_latency: latency of one intra-node message, seconds.
        inter_node_bandwidth: per-device bandwidth to another node, bytes/s.
        inter_node_latency: latency of one inter-node message, seconds.
        max_devices_per_node: the largest node this device ships in.
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


DEVICES: dict[str, DeviceSpec] = {}


def _register(spec: DeviceSpec) -> DeviceSpec:
    DEVICES[spec.name] = spec
    return spec


_register(
    DeviceSpec(
        name="H100-SXM-80GB",
        # NVIDIA H100 datasheet (SXM5): 989 TFLOPS dense BF16/FP16, 67 TFLOPS FP32,
        # 3.35 TB/s HBM3, 80 GB; NVLink 4 900 GB/s bidirectional = 450 GB/s per direction.
        peak_flops={"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
        memory_bandwidth=3.35e12,
        memory_bytes=80 * GB,
        intra_node_bandwidth=450e9,
        intra_node_latency=3e-6,
        # One ConnectX-7 NDR 400 Gb/s NIC per GPU (DGX H100) = 50 GB/s.
        inter_node_bandwidth=50e9,
        inter_node_latency=5e-6,
        aliases=("H100", "H100-SXM", "H100-80GB"),
    )
)

_register(
    DeviceSpec(
        name="cpu",
        # This machine's CPU as seen by gloo: placeholder peaks are replaced by
        # calibration (plan calibrate / plan profile) where the device is present.
        peak_flops={"bfloat16": 50e9, "float16": 50e9, "float32": 100e9},
        memory_bandwidth=10e9,
        memory_bytes=24 * GiB,
        intra_node_bandwidth=2e9,
        intra_node_latency=4e-4,
        inter_node_bandwidth=1e9,
        inter_node_latency=1e-3,
        max_devices_per_node=64,
        aliases=("CPU",),
    )
)


def lookup(name: str) -> DeviceSpec:
    """Return the catalogue entry for ``name`` (case-insensitive, aliases accepted)."""
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
