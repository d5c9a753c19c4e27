"""memtrain.runtime: CLI, config, the Ray driver and the single-process ``wrap()``.

``wrap`` and ``Engine`` are loaded on first use: importing this package imports neither torch
nor Ray (the CLI starts fast).
"""

from __future__ import annotations

__all__ = ["wrap", "Engine"]


def __getattr__(name: str):
    if name in __all__:
        from memtrain.runtime import engine, wrapping

        value = getattr(wrapping if name == "wrap" else engine, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'memtrain.runtime' has no attribute {name!r}")
