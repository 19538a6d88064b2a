"""Human-readable quantities for tables and messages: bytes, FLOPs, seconds, values."""

from __future__ import annotations

import json

__all__ = ["fmt_bytes", "fmt_flops", "fmt_count", "fmt_seconds", "fmt_value"]


def fmt_bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _si(n: float, suffix: str) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}{suffix}"
    return f"{n:.0f} {suffix}".rstrip()


def fmt_flops(n: float) -> str:
    return _si(n, "FLOP")


def fmt_count(n: float) -> str:
    return _si(n, "")


def fmt_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"


def fmt_value(value, limit: int = 60) -> str:
    """A value as an error message quotes it: JSON where it can be, else ``repr``, cut at
    ``limit`` characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
