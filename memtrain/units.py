"""Byte sizes and rates written by people ("24GiB", "1.5 TB") and printed for people."""

from __future__ import annotations

import math
import re
import reprlib

from memtrain.errors import UserError

__all__ = ["parse_bytes", "format_bytes", "format_seconds", "show", "MAX_BYTES"]

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4, "p": 1000**5, "pb": 1000**5,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "pib": 1024**5,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")
MAX_BYTES = 2**60
"""The largest size accepted (1 EiB): far beyond any memory or disk, small enough that byte
counts stay exact integers in every sum the planner makes."""

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 48, 48
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4


def show(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to at most ``limit`` characters, for quoting a user's value in a message.

    A value read from a config can be as large as the file (or a YAML alias expanded many
    times over), so a message never embeds it whole; nested values are elided past two levels
    and integers too long to print (Python refuses past 4300 digits) are described instead.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"a number of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    try:
        text = repr(value[:limit]) if isinstance(value, str) else _REPR.repr(value)
    except Exception:  # a user object whose __repr__ fails: name its type instead
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_bytes(value: int | float | str, *, field: str = "size") -> int:
    """Parse "24GiB", "512 MB", "1.5TiB" or a plain number of bytes into an int.

    A fractional result is rounded down to whole bytes. Raises ``UserError`` naming ``field``
    when the value is not a finite size in [0, 1 EiB].
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{field}: expected a size such as '24GiB', got {show(value)}")
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        unit = m.group(2).lower() if m else None
        if not m or unit not in _UNITS:
            raise UserError(
                f"{field}: cannot read {show(value)} as a size; write e.g. '24GiB', '512MB' or a number of bytes"
            )
        number: float = float(m.group(1)) * _UNITS[unit]
    else:
        number = value
    if isinstance(number, float) and not math.isfinite(number):
        raise UserError(f"{field}: a size must be a finite number of bytes, got {show(value)}")
    if number < 0:
        raise UserError(f"{field}: size must be >= 0, got {show(value)}")
    if number > MAX_BYTES:
        raise UserError(f"{field}: size {show(value)} is more than 1 EiB; write a size such as '24GiB'")
    return int(number)


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
