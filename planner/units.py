"""Byte sizes and rates written by people ("24GiB", "1.5 TB") and printed for people."""

from __future__ import annotations

import re

__all__ = ["parse_bytes", "format_bytes", "format_seconds"]

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4, "p": 1000**5, "pb": 1000**5,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "pib": 1024**5,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str, *, field: str = "size") -> int:
    """Parse "24GiB", "512 MB", "1.5TiB" or a plain number of bytes into an int.

    Raises ValueError naming ``field`` when the value is not a size.
    """
    if isinstance(value, bool):
        raise ValueError(f"{field}: expected a size such as '24GiB', got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{field}: size must be >= 0, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"{field}: expected a size such as '24GiB', got {value!r}")
    m = _SIZE_RE.match(value)
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(
            f"{field}: cannot read {value!r} as a size; write e.g. '24GiB', '512MB' or a number of bytes"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(num_bytes: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as memory is sold and reported by CUDA)."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"
