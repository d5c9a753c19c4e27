"""Page-aligned CPU buffers kept for reuse, within what the tier's ledger has already used.

[Note: why pool CPU buffers] A chunk store allocates and frees a chunk-sized buffer for every
fetch, gradient buffer, accumulator and optimizer staging: about 120 buffers of ~28 MiB per step of
the 100m all-NVMe plan. Fresh large allocations are fresh mmaps: every 4 KiB page faults and is
zeroed on first touch (an O_DIRECT read into it faults inside the system call), and every free
unmaps, taking the process's memory-map lock that the faults of all other threads wait on. Measured
on that step (2 shared cores): the disk reads' system calls took 73-92 ms each in training against
29-49 ms for the same reads into resident buffers with no compute, and the step took 4.1-4.8 s; with
the C allocator told to keep freed memory (``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``)
3.2-3.5 s. The CUDA side needs none of this: its caching allocators already reuse device and pinned
memory.

``BufferPool`` keeps freed buffers by byte size and hands them out again. Two rules keep it honest:

- **Bounded.** Idle buffers count against the ledger's peak: a buffer is kept only while bytes in
  use plus idle bytes stay within the highest in-use figure the ledger has recorded (a
  ``reset_peak`` does not lower it), and when the ledger's bytes in use grow (activations, say)
  idle buffers are dropped until they fit again (``Ledger.on_alloc``), so the
  process never holds more than the ledger's peak (the figure the planner predicts and the budget
  caps) for this tier, up to the rounding of each buffer to whole 4 KiB pages. Otherwise it is dropped and returned to the system.
- **Exclusive.** A buffer is reused only when nothing else still views its memory: the storage's
  use count must be what it was when the buffer was handed out (a leaked view, such as a saved
  tensor or a write still in flight, keeps it out of the pool for good). A caller that passes the
  same tensor object on (``offload.optim`` [Note: master from the param buffer]) gives it back
  only once, at the end.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import torch

from memtrain.offload.ledger import Ledger
from memtrain.offload.nvme_format import ALIGN_BYTES

__all__ = ["BufferPool"]


def _use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class BufferPool:
    """Page-aligned CPU tensors for one ledger's tier; see the module doc."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._lock = threading.Lock()
        self._idle: dict[int, list[torch.Tensor]] = defaultdict(list)  # size -> raw uint8 buffers
        self._idle_bytes = 0
        self._high = 0  # the highest bytes in use the ledger has recorded
        # data_ptr -> (size, use count when handed out); no reference is kept to a buffer in use,
        # so one its holder drops without giving back is simply freed.
        self._out: dict[int, tuple[int, int]] = {}
        self.num_reused = 0
        """Buffers handed out again (for tests and benchmarks)."""
        self.num_fresh = 0
        """Buffers newly allocated."""
        self.num_dropped = 0
        """Idle buffers returned to the system because the ledger grew past the bound."""
        ledger.on_alloc = self._trim

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

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
        if raw is None:
            raw = torch.empty(size + ALIGN_BYTES, dtype=torch.uint8)
            skip = -raw.data_ptr() % ALIGN_BYTES
            raw = raw[skip:skip + size]
        t = raw[:nbytes].view(dtype)
        del raw
        assert t.data_ptr() % ALIGN_BYTES == 0 and t.numel() == numel
        with self._lock:
            self._out[t.data_ptr()] = (size, _use_count(t))
        return t

    def give(self, t: torch.Tensor) -> None:
        """Return ``t`` (from ``take``); the caller no longer uses it. Others are ignored."""
        with self._lock:
            entry = self._out.pop(t.data_ptr(), None)
        if entry is None:
            return
        size, count = entry
        if _use_count(t) != count:  # still viewed elsewhere: never reuse this memory
            return
        with self._lock:
            self._high = max(self._high, self.ledger.peak_bytes)  # reset_peak() does not lower it
            if self._over(self.ledger.in_use_bytes, size):
                return  # over the bound: dropped, and freed with the caller's last reference
            nbytes = t.numel() * t.element_size()
            raw = torch.empty(0, dtype=torch.uint8).set_(
                t.untyped_storage(), t.storage_offset() * t.element_size(), (size,))
            assert raw.data_ptr() == t.data_ptr() and nbytes <= size
            self._idle[size].append(raw)
            self._idle_bytes += size

    def _over(self, in_use: int, extra: int = 0) -> bool:
        # Ledgers count a tensor's bytes, buffers are whole 4 KiB pages: allow that rounding.
        slack = (sum(map(len, self._idle.values())) + (1 if extra else 0)) * ALIGN_BYTES
        return in_use + self._idle_bytes + extra > self._high + slack

    def _trim(self, in_use: int) -> None:
        """The ledger took more bytes: drop idle buffers, largest first, until within the bound."""
        with self._lock:
            self._high = max(self._high, self.ledger.peak_bytes)
            while self._idle_bytes and self._over(in_use):
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
