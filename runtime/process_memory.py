"""The process's own memory, read from the operating system, to set beside the plan's figure.

``memtrain run`` measures a baseline just before it builds the model (the interpreter, torch,
memtrain and what planning left), resets the peak, and compares the peak at the end with
baseline + the plan's ``process_bytes`` (planner.footprint [Note: process memory]): RSS on a
CPU device, ``torch.cuda.max_memory_reserved`` on a GPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
import sys

from memtrain.planner.footprint import HEAP_MMAP_THRESHOLD_BYTES

__all__ = ["rss_bytes", "peak_rss_bytes", "reset_peak", "release_free_memory", "MMAP_THRESHOLD_BYTES",
           "return_large_frees", "warm_up_torch", "ProcessPeak"]

_PAGE = resource.getpagesize()
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter

MMAP_THRESHOLD_BYTES = HEAP_MMAP_THRESHOLD_BYTES
"""[Note: the C heap's threshold] glibc serves an allocation of at least this size with a mapping
of its own, returned to the system when freed. Left to itself glibc raises the threshold to the
size of each large block freed (up to 32 MiB), so the activations and temporaries of a CPU-device
step come from its heap, which keeps what is freed: a process held 20-140 MiB more than it used
(bench/plan_accuracy.py's small configurations) and its peak could not be predicted. Fixed at
4 MiB the excess is 17-62 MiB and steps take 3-7% longer (70M GPT, host and NVMe homes)."""


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def return_large_frees() -> bool:
    """Fix the C heap's mmap threshold at ``MMAP_THRESHOLD_BYTES`` ([Note: the C heap's
    threshold]) unless the user set ``MALLOC_MMAP_THRESHOLD_``; False where there is no glibc."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def rss_bytes() -> int:
    """Resident set size now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: the peak is the best figure there is
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """The resident set's high-water mark since the process started or ``reset_peak()``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak() -> bool:
    """Start the high-water mark again from the current RSS (Linux: ``/proc/self/clear_refs``
    5); False where the system cannot, and the peak then covers the whole process."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Collect garbage and hand the C heap's free pages back (glibc ``malloc_trim``), so a new
    baseline does not include what an earlier run freed."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def warm_up_torch() -> None:
    """Run a transformer block's kinds of kernels once, forward and backward, on a few KiB.

    torch loads its kernels' code and starts its thread pools on first use: 15-40 MiB of RSS
    that are the interpreter's, not the model's, and would otherwise land after the baseline.
    """
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        emb = torch.randn(16, 8, generator=gen, requires_grad=True)
        w = torch.randn(8, 8, generator=gen, requires_grad=True)
        x = F.embedding(torch.arange(4).view(1, 4), emb)
        x = F.layer_norm(x, (8,))
        q = F.linear(x, w).view(1, 4, 2, 4).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, q, q, is_causal=True, dropout_p=0.1).transpose(1, 2).reshape(1, 4, 8)
        h = F.dropout(F.gelu(F.linear(a, w)), 0.1) + x
        loss = F.cross_entropy(F.linear(h, emb).flatten(0, 1), torch.arange(4))
        loss.backward()
    torch.optim.AdamW([emb, w]).step()


class ProcessPeak:
    """The process's peak memory above a baseline taken when this is made: on a CPU device the
    RSS (torch warmed up, the C heap trimmed and the high-water mark reset first), on a GPU the device's reserved
    bytes (``torch.cuda.max_memory_reserved``, its peak statistics reset). ``exact`` is False
    where the system cannot reset the RSS high-water mark: the peak then covers the whole process."""

    def __init__(self, device: str = "cpu") -> None:
        self.cuda = device.startswith("cuda")
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_bytes = torch.cuda.memory_reserved()
            self.exact = True
        else:
            warm_up_torch()
            release_free_memory()
            self.baseline_bytes = rss_bytes()
            self.exact = reset_peak()

    def peak_bytes(self) -> int:
        """The peak since the baseline, less the baseline (never negative)."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_reserved()
        else:
            peak = peak_rss_bytes()
        return max(0, peak - self.baseline_bytes)
