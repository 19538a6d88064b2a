"""The on-disk measurement cache: where profiles and calibrations live, and what keys them.

Every measurement is stored as one JSON file under the cache directory
(``$FX_PLANNER_CACHE``, else ``.fx-planner-cache/`` in the working directory). A file
records the schema it was written with and the fingerprint of the device that measured
it; a reader that finds another schema, another fingerprint or unreadable JSON ignores
the file (with a warning when it is corrupt) and the caller measures again.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CACHE_ENV",
    "cache_dir",
    "device_fingerprint",
    "fingerprint_key",
    "read_record",
    "write_record",
]

CACHE_ENV = "FX_PLANNER_CACHE"


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache directory: ``path`` if given, else ``$FX_PLANNER_CACHE``, else
    ``./.fx-planner-cache``. Created on first use."""
    root = Path(path or os.environ.get(CACHE_ENV) or ".fx-planner-cache")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_fingerprint(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """What a measurement depends on besides the ops: hardware, software, thread count.

    Args:
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:N"``).
        threads: intra-op threads the measurement uses (default: ``torch.get_num_threads()``).

    Returns:
        A JSON-able dict; two measurements are interchangeable only when these are equal.
    """
    fp: dict[str, Any] = {
        "device": device.split(":")[0],
        "torch": torch.__version__,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        fp["gpu"] = torch.cuda.get_device_name(index)
        fp["capability"] = list(torch.cuda.get_device_capability(index))
        fp["cuda"] = torch.version.cuda
    return fp


def fingerprint_key(*parts: Any) -> str:
    """A short stable hash of JSON-able ``parts`` (used in cache file names)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_record(path: Path, schema: str, fingerprint: dict[str, Any] | None = None) -> dict | None:
    """Load a cache record, or ``None`` when it is missing, stale or corrupt.

    A corrupt file (unreadable JSON, wrong shape) triggers a ``warnings.warn`` naming it;
    a file from another schema or device fingerprint is silently stale.
    """
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or "schema" not in record or "data" not in record:
            raise ValueError("not a cache record (missing 'schema' or 'data')")
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring corrupt cache file {path}: {e}; measuring again", stacklevel=2)
        return None
    if record["schema"] != schema:
        return None
    if fingerprint is not None and record.get("fingerprint") != fingerprint:
        return None
    return record["data"]


def write_record(
    path: Path, schema: str, data: Any, fingerprint: dict[str, Any] | None = None
) -> None:
    """Write a cache record atomically (write to a temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"schema": schema, "fingerprint": fingerprint, "data": data}))
    os.replace(tmp, path)
