"""Cluster and workload specifications.

>>> Cluster.parse("2x8xH100").num_devices
16
>>> Cluster.parse("4xcpu").devices_per_node
4
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from cost_models.devices import DeviceSpec, UnknownDeviceError, lookup

__all__ = ["Cluster", "Workload", "SpecError", "DTYPES"]


class SpecError(ValueError):
    """A cluster or workload the user described cannot be used; the message says what to change."""


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}

_SPEC_RE = re.compile(r"^(?:(\d+)x)?(\d+)x([A-Za-z0-9][A-Za-z0-9._-]*)$")


@dataclass(frozen=True)
class Cluster:
    """Nodes of identical devices. Link figures default to the device catalogue.

    Attributes:
        nodes: number of nodes (hosts).
        devices_per_node: devices on each node; a tensor-parallel group stays inside one.
        device: canonical device name from ``cost_models.devices``.
        memory_bytes, intra_node_bandwidth, ...: per-cluster overrides of catalogue values
            (``None`` means "use the catalogue").
    """

    nodes: int
    devices_per_node: int
    device: str
    memory_bytes: int | None = None
    intra_node_bandwidth: float | None = None
    intra_node_latency: float | None = None
    inter_node_bandwidth: float | None = None
    inter_node_latency: float | None = None

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.devices_per_node < 1:
            raise SpecError(
                f"a cluster needs at least 1 node and 1 device per node, got "
                f"{self.nodes} node(s) x {self.devices_per_node} device(s)"
            )

    @property
    def num_devices(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def device_spec(self) -> DeviceSpec:
        """The catalogue entry with this cluster's overrides applied."""
        spec = lookup(self.device)
        overrides = {
            k: v
            for k in (
                "memory_bytes",
                "intra_node_bandwidth",
                "intra_node_latency",
                "inter_node_bandwidth",
                "inter_node_latency",
            )
            if (v := getattr(self, k)) is not None
        }
        return replace(spec, **overrides) if overrides else spec

    @property
    def spec_string(self) -> str:
        if self.nodes == 1:
            return f"{self.devices_per_node}x{self.device}"
        return f"{self.nodes}x{self.devices_per_node}x{self.device}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_devices"] = self.num_devices
        return d

    @classmethod
    def parse(cls, spec: str) -> Cluster:
        """Parse ``"8xH100"``, ``"4x8xA100-80GB"``, ``"4xcpu"`` or a path to a JSON file.

        The JSON form is ``{"nodes": 2, "devices_per_node": 8, "device": "H100",
        "memory_bytes": ..., "intra_node_bandwidth": ..., ...}``.
        """
        text = spec.strip()
        if text.endswith(".json") or Path(text).is_file():
            return cls._from_json(Path(text))
        m = _SPEC_RE.match(text)
        if not m:
            raise SpecError(
                f"cannot read cluster spec {spec!r}: write DEVICESxTYPE for one node "
                "(8xH100, 4xcpu), NODESxDEVICESxTYPE for several (4x8xA100-80GB), "
                "or give the path of a cluster JSON file"
            )
        nodes = int(m.group(1)) if m.group(1) else 1
        per_node = int(m.group(2))
        try:
            device = lookup(m.group(3)).name
        except UnknownDeviceError as e:
            raise SpecError(f"cluster spec {spec!r}: {e}") from None
        cluster = cls(nodes=nodes, devices_per_node=per_node, device=device)
        cluster._check_node_size()
        return cluster

    @classmethod
    def _from_json(cls, path: Path) -> Cluster:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise SpecError(f"cluster file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise SpecError(f"cluster file {path} is not valid JSON: {e}") from None
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known - {"num_devices"}
        if unknown:
            raise SpecError(
                f"cluster file {path}: unknown keys {sorted(unknown)}; allowed keys are {sorted(known)}"
            )
        missing = {"nodes", "devices_per_node", "device"} - set(data)
        if missing:
            raise SpecError(f"cluster file {path}: missing keys {sorted(missing)}")
        try:
            data["device"] = lookup(data["device"]).name
        except UnknownDeviceError as e:
            raise SpecError(f"cluster file {path}: {e}") from None
        data.pop("num_devices", None)
        return cls(**data)

    def _check_node_size(self) -> None:
        limit = lookup(self.device).max_devices_per_node
        if self.devices_per_node > limit:
            raise SpecError(
                f"{self.devices_per_node} {self.device} devices in one node: the largest "
                f"{self.device} node has {limit}. Write NODESxDEVICESxTYPE, e.g. "
                f"{-(-self.devices_per_node // limit)}x{limit}x{self.device}"
            )


@dataclass(frozen=True)
class Workload:
    """What the model is asked to do.

    Attributes:
        batch_size: sequences per step (global, across data-parallel replicas).
        seq_len: tokens per sequence in prefill; in decode, one new token per step.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for weights and activations.
        phase: ``prefill`` (a full-sequence forward) or ``decode`` (one token against a
            KV cache of ``context_len`` tokens).
        objective: ``latency`` (one batch end to end) or ``throughput`` (samples/s in
            steady state).
        context_len: KV cache length for decode; defaults to ``seq_len``.
        memory_headroom: fraction of device memory kept free (allocator, fragmentation).
        latency_slo_s: optional upper bound on the latency of one batch.
    """

    batch_size: int = 1
    seq_len: int = 2048
    dtype: str = "bfloat16"
    phase: str = "prefill"
    objective: str = "latency"
    context_len: int | None = None
    memory_headroom: float = 0.1
    latency_slo_s: float | None = None

    def __post_init__(self) -> None:
        dtype = _DTYPE_ALIASES.get(self.dtype, self.dtype)
        object.__setattr__(self, "dtype", dtype)
        problems = []
        if self.batch_size < 1:
            problems.append(f"batch size must be >= 1 (got {self.batch_size})")
        if self.seq_len < 1:
            problems.append(f"sequence length must be >= 1 (got {self.seq_len})")
        if dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.phase not in ("prefill", "decode"):
            problems.append(f"phase {self.phase!r} must be 'prefill' or 'decode'")
        if self.objective not in ("latency", "throughput"):
            problems.append(f"objective {self.objective!r} must be 'latency' or 'throughput'")
        if self.context_len is not None and self.context_len < 1:
            problems.append(f"context length must be >= 1 (got {self.context_len})")
        if not 0.0 <= self.memory_headroom < 1.0:
            problems.append(f"memory headroom must be in [0, 1) (got {self.memory_headroom})")
        if problems:
            raise SpecError("invalid workload: " + "; ".join(problems))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def dtype_bytes(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def kv_context_len(self) -> int:
        return self.context_len if self.context_len is not None else self.seq_len

    def to_dict(self) -> dict:
        return asdict(self)
