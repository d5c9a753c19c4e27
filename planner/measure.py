"""Timing for the profiler: repeated runs of a function on a device."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["sync", "median_time"]


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a CUDA device runs asynchronously; the CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, reps: int, *, min_total_s: float = 0.0,
                max_reps: int = 200) -> float:
    """Median seconds of ``fn`` after a warm-up: at least ``reps`` runs, and more (up to
    ``max_reps``) until the runs add up to ``min_total_s``."""
    fn()  # warm-up
    times: list[float] = []
    while len(times) < reps or (sum(times) < min_total_s and len(times) < max_reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
