"""Cluster and workload specifications.

>>> Cluster.parse("2x8xH100").num_devices
16
>>> Cluster.parse("4xcpu").devices_per_node
4
>>> mixed = Cluster.parse("1x8xH100+2x8xA100-80GB")
>>> (mixed.num_devices, [g.device for g in mixed.groups], mixed.group_offsets)
(24, ['H100-SXM-80GB', 'A100-80GB'], (0, 8))
"""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from cost_models.devices import DeviceSpec, UnknownDeviceError, lookup
from cost_models.runtime import RUNTIMES, default_runtime
from planner.units import fmt_value as _show

__all__ = ["Cluster", "MixedCluster", "Workload", "SpecError", "DTYPES", "DEFAULT_CLUSTER", "PHASES", "OBJECTIVES"]

#: The cluster ``plan MODEL`` and ``planner.plan`` use when none is given.
DEFAULT_CLUSTER = "8xH100"

#: What the cost model and the solver's integer ticks are sized for: beyond these, times and
#: sizes overflow the solver's 64-bit integers or the search's device lists.
MAX_DEVICES = 131072
MAX_MEMORY_BYTES = 2**50
BANDWIDTH_RANGE = (1e6, 1e16)
MAX_LATENCY_S = 10.0
#: The largest global batch (sequences) and sequence / KV context (tokens) a workload may ask.
MAX_BATCH = 2**20
MAX_TOKENS = 2**24


class SpecError(ValueError):
    """A cluster or workload the user described cannot be used; the message says what to change."""


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
PHASES = ("prefill", "decode", "train")
#: Optimizers a train workload may name (``--optimizer``).
OPTIMIZERS = ("adamw",)
OBJECTIVES = ("latency", "throughput")
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
        problems, limit = [], None
        for key in ("nodes", "devices_per_node"):
            value = getattr(self, key)
            if not _is_int(value):
                problems.append(f"{key} must be a whole number, got {_show(value)}")
            elif value < 1:
                problems.append(f"{key} must be >= 1, got {value}")
        if not isinstance(self.device, str) or not self.device.strip():
            problems.append(f"device must be a device name such as \"H100\" or \"cpu\" "
                            f"(`plan devices` lists them), got {_show(self.device)}")
        else:
            try:
                limit = lookup(self.device).max_devices_per_node
            except UnknownDeviceError as e:
                problems.append(str(e))
                limit = None
        if self.memory_bytes is not None:
            value = self.memory_bytes
            if isinstance(value, float) and math.isfinite(value) and value == int(value):
                value = int(value)
                object.__setattr__(self, "memory_bytes", value)
            if not _is_int(value) or not 1 <= value <= MAX_MEMORY_BYTES:
                problems.append(f"memory_bytes must be a positive whole number of bytes per "
                                f"device, at most {MAX_MEMORY_BYTES} (1 PiB) (e.g. "
                                f"80000000000), got {_show(self.memory_bytes)}")
        for key in ("intra_node_bandwidth", "inter_node_bandwidth"):
            value = getattr(self, key)
            if value is not None and not (_is_number(value) and value > 0):
                problems.append(f"{key} must be a positive number of bytes/s (e.g. 4.5e11), "
                                f"got {_show(value)}")
            elif value is not None and not BANDWIDTH_RANGE[0] <= value <= BANDWIDTH_RANGE[1]:
                problems.append(f"{key} {value:g} bytes/s is outside what the planner models "
                                f"({BANDWIDTH_RANGE[0]:g} to {BANDWIDTH_RANGE[1]:g} bytes/s, "
                                "1 MB/s to 10 PB/s)")
        for key in ("intra_node_latency", "inter_node_latency"):
            value = getattr(self, key)
            if value is not None and not (_is_number(value) and 0 <= value <= MAX_LATENCY_S):
                problems.append(f"{key} must be a number of seconds from 0 to {MAX_LATENCY_S:g} "
                                f"(e.g. 3e-6), got {_show(value)}")
        if not problems and self.nodes * self.devices_per_node > MAX_DEVICES:
            problems.append(f"{self.nodes} x {self.devices_per_node} = "
                            f"{self.nodes * self.devices_per_node} devices; the planner plans "
                            f"clusters of up to {MAX_DEVICES} devices")
        if problems:
            raise SpecError("invalid cluster: " + "; ".join(problems))
        if limit is not None and self.devices_per_node > limit:
            name = lookup(self.device).name
            raise SpecError(
                f"{self.devices_per_node} {name} devices in one node: the largest "
                f"{name} node has {limit}. Write NODESxDEVICESxTYPE, e.g. "
                f"{-(-self.devices_per_node // limit)}x{limit}x{name}, or set "
                f"\"nodes\" and \"devices_per_node\" in the cluster file"
            )

    @property
    def num_devices(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def groups(self) -> tuple[Cluster, ...]:
        """The homogeneous node groups: this cluster alone (``MixedCluster`` has several)."""
        return (self,)

    @property
    def group_offsets(self) -> tuple[int, ...]:
        """The first device id of each group."""
        return (0,)

    @property
    def is_mixed(self) -> bool:
        return False

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
        if isinstance(spec, Cluster):
            return spec
        if not isinstance(spec, str):
            raise SpecError(
                f"a cluster is a Cluster or a spec string such as {DEFAULT_CLUSTER!r}, "
                f"'4x8xA100-80GB', '4xcpu' or the path of a cluster JSON file; got "
                f"{type(spec).__name__} {spec!r}"
            )
        text = spec.strip()
        if not text:
            raise SpecError(f"the cluster spec is empty; write e.g. --cluster {DEFAULT_CLUSTER}")
        if Path(text).is_dir():
            raise SpecError(f"cluster spec {spec!r} is a directory; give a cluster JSON file "
                            f"or a spec such as {DEFAULT_CLUSTER}")
        if text.endswith(".json") or Path(text).is_file():
            return cls._from_json(Path(text))
        if "+" in text:
            parts = [p.strip() for p in text.split("+")]
            if any(not p for p in parts):
                raise SpecError(
                    f"cannot read cluster spec {spec!r}: a mixed cluster is node groups joined "
                    "by '+', each NODESxDEVICESxTYPE, with nothing empty between them (e.g. "
                    "2x8xH100+4x8xA100-80GB)")
            groups = []
            for i, part in enumerate(parts):
                try:
                    groups.append(cls.parse(part))
                except SpecError as e:
                    raise SpecError(f"cluster spec {spec!r}, group {i} ({part!r}): "
                                    f"{e}") from None
            return MixedCluster.of(groups, where=f"cluster spec {spec!r}")
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
        return cls(nodes=nodes, devices_per_node=per_node, device=device)

    @classmethod
    def _from_json(cls, path: Path) -> Cluster:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise SpecError(f"cluster file {path} does not exist") from None
        except IsADirectoryError:
            raise SpecError(f"cluster file {path} is a directory; give a cluster JSON file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError(f"cannot read cluster file {path}: {e}") from None
        except (json.JSONDecodeError, RecursionError) as e:
            raise SpecError(f"cluster file {path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(data)
        except SpecError as e:
            raise SpecError(f"cluster file {path}: {e}") from None

    @classmethod
    def from_dict(cls, data) -> Cluster | MixedCluster:
        """A cluster from the JSON form: ``{"nodes": 2, "devices_per_node": 8, "device":
        "H100", "memory_bytes": ..., "intra_node_bandwidth": ..., ...}`` (every key checked:
        types, ranges, the node-size limit of the device), or a mixed cluster
        ``{"groups": [{"nodes": 1, "devices_per_node": 8, "device": "H100"}, ...]}``, each
        group an object of the first form (``MixedCluster``).

        Raises:
            SpecError: naming the key and what to write instead.
        """
        example = '{"nodes": 1, "devices_per_node": 8, "device": "H100"}'
        if not isinstance(data, dict):
            raise SpecError(f"a cluster file holds one JSON object such as {example}, not "
                            f"{type(data).__name__} {_show(data)}")
        if "groups" in data:
            return MixedCluster.from_dict(data)
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known - {"num_devices"}
        if unknown:
            raise SpecError(f"unknown keys {sorted(unknown)}; allowed keys are {sorted(known)}")
        missing = {"nodes", "devices_per_node", "device"} - set(data)
        if missing:
            raise SpecError(f"missing keys {sorted(missing)}; e.g. {example}")
        data = dict(data)
        num_devices = data.pop("num_devices", None)
        cluster = cls(**data)
        if isinstance(cluster.device, str):
            cluster = replace(cluster, device=lookup(cluster.device).name)
        if num_devices is not None and num_devices != cluster.num_devices:
            raise SpecError(f"num_devices is {_show(num_devices)} but nodes {cluster.nodes} x "
                            f"devices_per_node {cluster.devices_per_node} = "
                            f"{cluster.num_devices}; drop num_devices or make them agree")
        return cluster


_MIXED_EXAMPLE = ('{"groups": [{"nodes": 1, "devices_per_node": 8, "device": "H100"}, '
                  '{"nodes": 2, "devices_per_node": 8, "device": "A100-80GB"}]}')


@dataclass(frozen=True)
class MixedCluster:
    """Node groups of different devices (``2x8xH100+4x8xA100-80GB``); each group is a
    homogeneous ``Cluster`` and device ids are numbered group after group.

    ``device``, ``devices_per_node`` and ``device_spec`` describe one device type, so they
    raise ``SpecError`` here: code that needs one type refuses a mixed cluster by name
    instead of reading the first group's. ``nodes`` and ``num_devices`` are totals.
    """

    groups: tuple[Cluster, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.groups, tuple) or len(self.groups) < 2 or \
                not all(isinstance(g, Cluster) for g in self.groups):
            raise SpecError(f"a mixed cluster has two or more node groups, each a Cluster; got "
                            f"{_show(self.groups)}")
        total = sum(g.num_devices for g in self.groups)
        if total > MAX_DEVICES:
            raise SpecError(f"the groups have {total} devices together; the planner plans "
                            f"clusters of up to {MAX_DEVICES} devices")
        backends = {g.device_spec.backend for g in self.groups}
        if len(backends) > 1:
            raise SpecError(f"the groups {self.spec_string} mix GPUs and CPUs, which share no "
                            f"communication backend; plan the GPU groups and the cpu groups "
                            f"as separate clusters")

    @classmethod
    def of(cls, groups, where: str = "the cluster") -> Cluster | MixedCluster:
        """Groups as given, adjacent groups of the same devices (type, node size and
        overrides) merged; a single group left is a plain ``Cluster``."""
        merged: list[Cluster] = []
        for g in groups:
            if merged and replace(merged[-1], nodes=g.nodes) == g:
                merged[-1] = replace(g, nodes=merged[-1].nodes + g.nodes)
            else:
                merged.append(g)
        total = sum(g.num_devices for g in merged)
        if total > MAX_DEVICES:
            raise SpecError(f"{where}: the groups have {total} devices together; the planner "
                            f"plans clusters of up to {MAX_DEVICES} devices")
        return merged[0] if len(merged) == 1 else cls(tuple(merged))

    @property
    def nodes(self) -> int:
        return sum(g.nodes for g in self.groups)

    @property
    def num_devices(self) -> int:
        return sum(g.num_devices for g in self.groups)

    @property
    def group_offsets(self) -> tuple[int, ...]:
        """The first device id of each group (ids are numbered group after group)."""
        offsets, at = [], 0
        for g in self.groups:
            offsets.append(at)
            at += g.num_devices
        return tuple(offsets)

    @property
    def is_mixed(self) -> bool:
        return True

    def group_of(self, device: int) -> int:
        """The index of the group holding device id ``device``."""
        for i, (start, g) in enumerate(zip(self.group_offsets, self.groups)):
            if start <= device < start + g.num_devices:
                return i
        raise ValueError(f"device {device} is not in this cluster of {self.num_devices}")

    def _one_type(self, what: str):
        raise SpecError(f"{what} describes one device type, but this cluster mixes "
                        f"{', '.join(g.spec_string for g in self.groups)}; this step plans "
                        f"one device type only (plan for one group, e.g. --cluster "
                        f"{self.groups[0].spec_string})")

    @property
    def device(self) -> str:
        return self._one_type("cluster.device")

    @property
    def devices_per_node(self) -> int:
        return self._one_type("cluster.devices_per_node")

    @property
    def device_spec(self) -> DeviceSpec:
        return self._one_type("cluster.device_spec")

    @property
    def spec_string(self) -> str:
        return "+".join(g.spec_string for g in self.groups)

    def to_dict(self) -> dict:
        return {"groups": [g.to_dict() for g in self.groups], "num_devices": self.num_devices}

    @classmethod
    def from_dict(cls, data) -> Cluster | MixedCluster:
        """``{"groups": [{nodes, devices_per_node, device, optional overrides}, ...]}``."""
        unknown = set(data) - {"groups", "num_devices"}
        if unknown:
            raise SpecError(f"unknown keys {sorted(unknown)} next to \"groups\"; a mixed "
                            f"cluster is {_MIXED_EXAMPLE} (the link and memory overrides go "
                            f"inside each group)")
        items = data["groups"]
        if not isinstance(items, list) or not items:
            raise SpecError(f"\"groups\" must be a non-empty list of node groups such as "
                            f"{_MIXED_EXAMPLE}, got {_show(items)}")
        groups = []
        for i, item in enumerate(items):
            if isinstance(item, dict) and "groups" in item:
                raise SpecError(f"groups[{i}] has its own \"groups\"; groups do not nest: "
                                f"write every node group in the one list")
            try:
                groups.append(Cluster.from_dict(item))
            except SpecError as e:
                raise SpecError(f"groups[{i}]: {e}") from None
        cluster = cls.of(groups, where="\"groups\"")
        num_devices = data.get("num_devices")
        if num_devices is not None and num_devices != cluster.num_devices:
            raise SpecError(f"num_devices is {_show(num_devices)} but the groups have "
                            f"{cluster.num_devices} devices; drop num_devices or make them "
                            f"agree")
        return cluster


def _is_int(value) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite real number (numpy's too), not a bool."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))


@dataclass(frozen=True)
class Workload:
    """What the model is asked to do.

    Attributes:
        batch_size: sequences per step (global, across data-parallel replicas).
        seq_len: tokens per sequence in prefill; in decode, one new token per step.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for weights and activations.
        phase: ``prefill`` (a full-sequence forward), ``decode`` (one token against a
            KV cache of ``context_len`` tokens) or ``train`` (one optimizer step over the
            global batch: forward, backward, gradient sync, update; docs/training.md).
        objective: ``latency`` (one batch end to end) or ``throughput`` (samples/s in
            steady state).
        context_len: KV cache length for decode; defaults to ``seq_len``.
        memory_headroom: fraction of device memory kept free (allocator, fragmentation).
        latency_slo_s: optional upper bound on the latency of one batch.
        runtime: how the step runs: ``eager``, ``compiled`` or ``cudagraphs``
            (``cost_models.runtime``: which kernels run, which pay a CPU launch); ``None``
            takes the cluster's default (``with_runtime``): on GPUs ``cudagraphs`` for
            decode and ``eager`` for prefill; on the CPU ``eager``, the only one it runs.
        optimizer: the optimizer a train step runs (``adamw``, the only one).
    """

    batch_size: int = 1
    seq_len: int = 2048
    dtype: str = "bfloat16"
    phase: str = "prefill"
    objective: str = "latency"
    context_len: int | None = None
    memory_headroom: float = 0.1
    latency_slo_s: float | None = None
    runtime: str | None = None
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        dtype = _DTYPE_ALIASES.get(self.dtype, self.dtype) if isinstance(self.dtype, str) else self.dtype
        object.__setattr__(self, "dtype", dtype)
        problems = []
        for key, what, flag in (("batch_size", "batch size", "--batch"),
                                ("seq_len", "sequence length", "--seq"),
                                ("context_len", "context length", "--context")):
            value = getattr(self, key)
            if value is None and key == "context_len":
                continue
            limit = MAX_BATCH if key == "batch_size" else MAX_TOKENS
            if not _is_int(value):
                problems.append(f"{what} ({flag}) must be a whole number, got {_show(value)}")
            elif value < 1:
                problems.append(f"{what} must be >= 1 (got {value})")
            elif value > limit:
                problems.append(f"{what} {value} is more than the planner plans for ({flag} "
                                f"{limit} at most)")
        if dtype not in DTYPES:
            problems.append(f"dtype {_show(self.dtype)} is not one of {', '.join(DTYPES)}")
        if self.phase not in PHASES:
            problems.append(f"phase {_show(self.phase)} must be one of {', '.join(PHASES)}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer (--optimizer) {_show(self.optimizer)} must be one of "
                            f"{', '.join(OPTIMIZERS)}")
        if self.objective not in OBJECTIVES:
            problems.append(f"objective {_show(self.objective)} must be 'latency' or 'throughput'")
        if not _is_number(self.memory_headroom) or not 0.0 <= self.memory_headroom < 1.0:
            problems.append(f"memory headroom (--headroom) must be in [0, 1) (got "
                            f"{_show(self.memory_headroom)})")
        if self.latency_slo_s is not None and not (_is_number(self.latency_slo_s)
                                                   and self.latency_slo_s > 0):
            problems.append(f"latency SLO must be a positive number of seconds (got "
                            f"{_show(self.latency_slo_s)})")
        if self.runtime is not None and self.runtime not in RUNTIMES:
            problems.append(f"runtime (--runtime) {_show(self.runtime)} must be one of "
                            f"{', '.join(RUNTIMES)}")
        if problems:
            raise SpecError("invalid workload: " + "; ".join(problems))

    def with_runtime(self, cluster: Cluster) -> Workload:
        """This workload with its runtime decided for ``cluster``: the one given, checked
        against the devices, or the default (``cost_models.runtime.default_runtime``).

        Raises:
            SpecError: a GPU runtime (compiled, cudagraphs) asked of CPU devices.
        """
        first = cluster.groups[0]  # a mixed cluster's groups share one backend
        backend = first.device_spec.backend
        if self.runtime is None:
            return replace(self, runtime=default_runtime(backend, self.phase))
        if backend != "nccl" and self.runtime != "eager":
            raise SpecError(f"runtime {self.runtime!r} needs GPUs; the {first.device} devices "
                            f"of this cluster run eager (drop --runtime or pass --runtime eager)")
        return self

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
