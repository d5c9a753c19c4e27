"""A thread pool that runs I/O by priority, one operation per key at a time.

``NvmeStore`` moves two kinds of traffic over one disk: parameter fetches and activation reads
that the compute is about to wait for, and optimizer-state reads and write-backs that only have
to finish before the step ends. With a FIFO pool a fetch queued behind a chunk's state files
waits for all of them, and the backward with it. ``KeyedPool`` runs the lowest priority number
first, in submission order within a priority: with the pool's threads busy, a fetch waits at
most for the operations already running, not for every one queued before it (docs/nvme.md has
the measurements).

[Note: per-key order] Operations on one key run one at a time, in submission order, whatever
their priorities: a read after a write must see that write. A key's next operation enters the
queue only when the one before it finishes, so no worker ever blocks waiting for another. When an
urgent operation arrives behind a less urgent one of the same key, the waiting chain is boosted to
the urgent priority (priority inheritance), so a fetch never waits behind a background write that
is itself stuck behind other background work.
"""

from __future__ import annotations

import concurrent.futures as cf
import heapq
import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["URGENT", "BACKGROUND", "KeyedPool"]

URGENT = 0
"""Compute waits for it soon: parameter fetches, activation swap traffic (the default)."""
BACKGROUND = 1
"""Needed only by the end of the step: optimizer-state reads and write-backs."""


@dataclass(eq=False, slots=True)
class _Task:
    key: str
    priority: int
    seq: int
    fn: Callable[..., Any] | None
    args: tuple
    future: cf.Future | None = field(default_factory=cf.Future)
    queued: bool = False
    """In the heap (possibly more than once after a boost; the first pop runs it)."""
    taken: bool = False


class KeyedPool:
    """``num_threads`` workers; ``submit(key, priority, fn, *args)`` returns a Future of ``fn(*args)``."""

    def __init__(self, num_threads: int, *, name: str = "memtrain-io") -> None:
        if num_threads < 1:
            raise ValueError(f"num_threads: must be >= 1, got {num_threads}")
        self._cv = threading.Condition()
        self._heap: list[tuple[int, int, _Task]] = []
        self._chains: dict[str, deque[_Task]] = {}  # per key: the running/queued head, then waiters
        self._seq = itertools.count()
        self._stopping = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True) for i in range(num_threads)]
        for t in self._threads:
            t.start()

    def submit(self, key: str, priority: int, fn: Callable[..., Any], *args: Any) -> cf.Future:
        with self._cv:
            if self._stopping:
                raise RuntimeError("KeyedPool: submit after shutdown")
            task = _Task(key, priority, next(self._seq), fn, args)
            chain = self._chains.setdefault(key, deque())
            chain.append(task)
            if len(chain) == 1:
                self._push(task)
            else:  # [Note: per-key order]: wait for the ones before; lend them this priority
                for earlier in chain:
                    if earlier.priority > priority:
                        earlier.priority = priority
                        if earlier.queued and not earlier.taken:
                            self._push(earlier)
            return task.future

    def _push(self, task: _Task) -> None:
        task.queued = True
        heapq.heappush(self._heap, (task.priority, task.seq, task))
        self._cv.notify()

    def _work(self) -> None:
        while True:
            with self._cv:
                task = None
                while task is None:
                    while not self._heap and not self._stopping:
                        self._cv.wait()
                    if not self._heap:
                        return  # stopping and drained
                    _, _, cand = heapq.heappop(self._heap)
                    if not cand.taken:  # a boosted task's older heap entry is skipped
                        cand.taken = True
                        task = cand
            if task.future.set_running_or_notify_cancel():
                try:
                    result = task.fn(*task.args)
                except BaseException as e:  # the caller sees it through the future
                    task.future.set_exception(e)
                else:
                    task.future.set_result(result)
                    del result
            # [Note: a finished task keeps nothing] A worker's locals outlive its task while it
            # waits for the next one (``cand``, a boosted task's older heap entry), and a task's
            # arguments and result (a read returns its buffer) are the caller's buffers: held
            # there, a swap's host staging outlived its record, and a pooled buffer could not be
            # reused (offload.bufpool: exclusive).
            task.fn, task.args, task.future = None, (), None
            with self._cv:
                chain = self._chains[task.key]
                chain.popleft()
                if chain:
                    self._push(chain[0])
                else:
                    del self._chains[task.key]

    def shutdown(self, *, wait: bool = True) -> None:
        """Run what was submitted, then stop the workers."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if wait:
            for t in self._threads:
                t.join()
