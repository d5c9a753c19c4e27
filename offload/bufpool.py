"""Page-aligned CPU buffers kept for reuse, within the most the pool itself has handed out.

[Note: why pool CPU buffers] A chunk store allocates and frees a chunk-sized buffer for every
fetch, gradient buffer, accumulator and optimizer staging: about 120 buffers of ~28 MiB per step of
the 100m all-NVMe plan. Fresh large allocations are fresh mmaps: every 4 KiB page faults and is
zeroed on first touch (an O_DIRECT read into it faults inside the system call), and every free
unmaps, taking the process's memory-map lock that the faults of all other threads wait on. The
CUDA side needs none of this: its caching allocators already reuse device and pinned memory.

``BufferPool`` keeps freed buffers by byte size and hands them out again. Three rules keep it
honest:

- **Bounded.** The buffers handed out plus the idle ones never exceed the most the pool has had
  handed out at once (its high-water, which only grows) by more than ``SLACK`` ([Note: pool
  slack]): a buffer given back over that bound is freed, and a fresh buffer that takes the pool
  past it first frees idle ones. The bound is the pool's own, not its ledger's: the
  ledger also counts activations, which torch allocates itself, and evicting idle buffers
  whenever activations grew made the pool free and fault in the same buffers every step.
- **Outside the C heap.** [Note: pool buffers outside the C heap] Each buffer is an anonymous
  mapping of its own, so a freed buffer goes back to the system at once. Taken from the C
  allocator, buffers under its dynamic mmap threshold (up to 32 MiB) would come from its heap,
  which keeps what is freed: the process then held every buffer the pool had ever dropped on top
  of what it held (planner.footprint [Note: process memory]).
- **Exclusive.** A buffer is reused only when nothing else still views its memory: the storage's
  use count must be what it was when the buffer was handed out (a leaked view, such as a saved
  tensor or a write still in flight, keeps it out of the pool for good). A caller that passes the
  same tensor object on (``offload.optim`` [Note: master from the param buffer]) gives it back
  only once, at the end.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import threading
import warnings
import weakref
from collections import defaultdict

import torch

from memtrain.offload.nvme_format import ALIGN_BYTES

__all__ = ["BufferPool", "SLACK", "HEAP_TOP_PAD_BYTES", "keep_heap_top"]

SLACK = 0.25
"""[Note: pool slack] The pool holds at most this much more than the most it had handed out at
once. Buffers have exact sizes, and a step needs different sizes at different times: under a
strict bound the pool freed idle buffers at the pooled peak and faulted the same sizes in again
later, each step (12 of 25 buffers per step on bench/plan_accuracy.py's small/host-d3, 35 of 85
on wide/nvme-d3); a quarter more made that 0 and 13. A fresh 3 MiB mapping costs about 3 ms
here, against 0.1 ms reused (page faults and zeroing)."""


HEAP_TOP_PAD_BYTES = 256 * 2**20
"""[Note: the C heap's top] Free memory glibc keeps at the top of its heap (``M_TOP_PAD``)."""

_heap_top_kept = False


def keep_heap_top(nbytes: int = HEAP_TOP_PAD_BYTES) -> bool:
    """Have glibc keep ``nbytes`` of freed memory at the top of its heap; True if set now.

    [Note: the C heap's top] On a CPU device torch's activations and temporaries come from the
    C heap, and glibc hands the heap's freed top back to the system at each trim, so the next
    step faults every page in again. With the top padded, requests up to the pad (those past the
    mmap threshold of runtime.process_memory included) are served from the kept top and the heap
    no longer shrinks between steps; planner.footprint [Note: process memory] does not count the
    pad yet (docs/memory-accounting.md has the figures). Process-wide and kept for the process's
    life, so it is set once, and never over the user's own ``MALLOC_TOP_PAD_`` or
    ``glibc.malloc.top_pad`` tunable. Only on glibc; elsewhere a no-op.
    """
    global _heap_top_kept
    if _heap_top_kept or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if "MALLOC_TOP_PAD_" in os.environ or "glibc.malloc.top_pad" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # It takes effect when the heap next grows (the step's first allocations): requests up to
    # the pad are then served from the heap's top, the ones past the mmap threshold
    # (runtime.process_memory [Note: the C heap's threshold]) included, instead of fresh mappings.
    _heap_top_kept = bool(mallopt(-2, int(nbytes)))  # -2: M_TOP_PAD in malloc.h
    return _heap_top_kept


def _mapped(size: int) -> tuple[torch.Tensor, mmap.mmap]:
    """[Note: pool buffers outside the C heap] ``size`` bytes of their own anonymous mapping
    (page-aligned), unmapped when the last tensor viewing them goes."""
    mm = mmap.mmap(-1, size)
    with warnings.catch_warnings():  # frombuffer warns that the buffer is writable: it is meant to be
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mm, dtype=torch.uint8), mm


def _use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class BufferPool:
    """Page-aligned CPU tensors; see the module doc. The ledgers record what it hands out."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # a buffer unmapped under it calls back in (_unmapped)
        self._idle: dict[int, list[torch.Tensor]] = defaultdict(list)  # size -> raw uint8 buffers
        self._idle_bytes = 0
        self._out_bytes = 0  # bytes of the buffers handed out and still mapped, not given back
        self._high = 0  # the most bytes handed out at once
        self._mapped_bytes = 0  # every mapping of this pool still alive: handed out, idle or viewed elsewhere
        self._mapped_high = 0  # the most _mapped_bytes has been
        self._sizes: dict[int, int] = {}  # token -> size of every live mapping
        self._tokens: dict[int, int] = {}  # data_ptr -> token of the mapping handed out or idle there
        self._next_token = 0
        # data_ptr -> (size, use count when handed out); no reference is kept to a buffer in use,
        # so one its holder drops without giving back is simply freed.
        self._out: dict[int, tuple[int, int]] = {}
        self.num_reused = 0
        """Buffers handed out again (for tests and benchmarks)."""
        self.num_fresh = 0
        """Buffers newly allocated."""
        self.num_dropped = 0
        """Idle buffers freed to stay within the bound."""

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    @property
    def mapped_bytes(self) -> int:
        """The memory the pool's buffers hold now, whoever holds them."""
        return self._mapped_bytes

    @property
    def mapped_high_bytes(self) -> int:
        """The most memory the pool's buffers have held at once: ``mapped_bytes``' high-water."""
        return self._mapped_high

    @property
    def high_bytes(self) -> int:
        """The most bytes handed out at once: what the pool may hold, idle buffers included."""
        return self._high

    def owns(self, t: torch.Tensor) -> bool:
        """Whether ``t`` was handed out by this pool and not given back yet."""
        with self._lock:
            return t.data_ptr() in self._out

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised, contiguous, ``ALIGN_BYTES``-aligned CPU tensor of ``numel`` elements."""
        nbytes = numel * dtype.itemsize
        size = -(-max(nbytes, 1) // ALIGN_BYTES) * ALIGN_BYTES
        with self._lock:
            free = self._idle.get(size)
            raw = free.pop() if free else None
            if raw is not None:
                self._idle_bytes -= size
                self.num_reused += 1
            else:
                self.num_fresh += 1
                self._drop_until(self._out_bytes + size)  # make room before the new one exists
            self._out_bytes += size
            self._high = max(self._high, self._out_bytes)
        if raw is None:
            raw, mm = _mapped(size)
            with self._lock:
                self._next_token += 1
                token = self._next_token
                self._sizes[token] = size
                self._mapped_bytes += size
                self._mapped_high = max(self._mapped_high, self._mapped_bytes)
            # An address may be mapped again before the old mapping's callback runs: the token,
            # not the address, names the mapping.
            weakref.finalize(mm, self._unmapped, token, raw.data_ptr())
            del mm
        else:
            token = self._tokens[raw.data_ptr()]
        t = raw[:nbytes].view(dtype)
        del raw
        assert t.data_ptr() % ALIGN_BYTES == 0 and t.numel() == numel
        with self._lock:
            self._out[t.data_ptr()] = (size, _use_count(t), token)
            self._tokens[t.data_ptr()] = token
        return t

    def give(self, t: torch.Tensor) -> None:
        """Return ``t`` (from ``take``); the caller no longer uses it. Others are ignored."""
        with self._lock:
            entry = self._out.pop(t.data_ptr(), None)
            if entry is None:
                return
            size, count, _ = entry
            self._out_bytes -= size
            if _use_count(t) != count:  # still viewed elsewhere: never reuse this memory
                return
            if self._out_bytes + self._idle_bytes + size > self._high * (1 + SLACK):
                self.num_dropped += 1
                return  # over the bound: freed with the caller's last reference
            nbytes = t.numel() * t.element_size()
            raw = torch.empty(0, dtype=torch.uint8).set_(
                t.untyped_storage(), t.storage_offset() * t.element_size(), (size,))
            assert raw.data_ptr() == t.data_ptr() and nbytes <= size
            self._idle[size].append(raw)
            self._idle_bytes += size

    def _unmapped(self, token: int, ptr: int) -> None:
        """A mapping went (its last view was dropped): a buffer handed out and never given back
        no longer counts as handed out."""
        with self._lock:
            self._mapped_bytes -= self._sizes.pop(token)
            if self._tokens.get(ptr) == token:
                del self._tokens[ptr]
            entry = self._out.get(ptr)
            if entry is not None and entry[2] == token:
                del self._out[ptr]
                self._out_bytes -= entry[0]

    def _drop_until(self, out_bytes: int) -> None:
        """Free idle buffers, largest first, until ``out_bytes`` handed out plus the idle ones fit
        within the high-water (or none is left)."""
        while self._idle_bytes and out_bytes + self._idle_bytes > max(self._high * (1 + SLACK), out_bytes):
            size = max(k for k, v in self._idle.items() if v)
            self._idle[size].pop()
            self._idle_bytes -= size
            self.num_dropped += 1

    def clear(self) -> None:
        """Drop every idle buffer and forget the ones handed out."""
        with self._lock:
            self._idle.clear()
            self._idle_bytes = 0
            self._out.clear()
            self._out_bytes = 0
