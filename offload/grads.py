"""A chunk store's gradient accumulators: the flush of each micro-batch's grad buffer into them
(on a GPU by a copy on the d2h side stream and an add on one host thread), and their end of step.

[Note: fp32 accumulators] Every chunk accumulates its gradients over a step's micro-batches in
fp32, whatever its home: a device-home chunk's ``grad`` is fp32 (``N·4``, not ``N·c``), as the
host and NVMe accumulators always were. Each micro-batch's gradient still arrives in the compute
dtype and is added in fp32, in the same order and arithmetic on every tier, so under mixed
precision a chunk's placement does not change how its gradients add up (test_engine checks bf16
device, host and nvme homes with one update kernel, bitwise; host chunks default to the fused CPU
AdamW, offload.optim [Note: host kernel choice]). With compute-dtype accumulators on the device,
bf16's 8-bit mantissa would round every partial sum: the tier would change the numerics, and more
so the more micro-batches. The cost is ``2·N`` device bytes per device-home chunk under bf16/fp16 (the layout
Megatron-LM uses by default for bf16); docs/memory-accounting.md and ``planner.cost.chunk_bytes``
count it.

[Note: asynchronous gradient flush] A host- or nvme-home chunk's gradients of a micro-batch land
in a device grad buffer (``N·c``); once the chunk has them all, the buffer is added into the
chunk's fp32 accumulator on the host. Done on the training thread, as ``grad_buf.to("cpu")`` and
an add, that flush blocks the host until the compute queued before it has run and the copy has
finished, into pageable memory, so the device idles while the host copies and adds and no more
kernels are queued. On a GPU ``Gradients.flush`` instead

1. takes a pinned **landing** buffer (``N·c``, host owner ``staging:grad:<i>``),
2. starts the copy on the d2h side stream after the compute queued so far (offload.tiers
   ``copy_async``, which records the side stream on the grad buffer, so the device ledger frees
   the buffer at the flush and the allocator reuses it only after the copy),
3. queues the add (``copy_`` at the step's first flush of the chunk) on one host thread, which
   waits for the copy's event, adds, and frees the landing buffer.

The training thread goes straight on to queue the next kernels. One thread keeps the adds of a
chunk in micro-batch order: the arithmetic and its order are those of the synchronous flush, so
results are bitwise the same. Whatever reads an accumulator waits for its chunk's adds first
(``wait``: the optimizer's ``_update``); ``drain`` waits for all of them and ends the thread
(``finish``, before any update of ``step()``, ``zero`` and the store's ``close``). Errors raised
on the thread surface there. When a landing buffer would overrun the host budget, the flush first
waits for the oldest adds (each frees its landing buffer) and fails only when none is left. The
simulator books the same: the copy on the d2h stream holding ``staging:grad:<i>`` from its start,
the add on its own ``grads`` stream freeing it (planner.simulate_optim ``_grad_out``). On a CPU device
there is nothing to copy (the accumulator adds the buffer in place) and no second thread runs
torch kernels (offload.optim [Note: where early updates run]), so the flush stays synchronous
there; tests turn ``asynchronous`` on to run this path on a CPU.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

import torch

from memtrain.offload.ledger import BudgetExceeded
from memtrain.offload.tiers import CopyHandle, copy_async
from memtrain.planner.plan import Tier

if TYPE_CHECKING:
    from memtrain.offload.chunk_layout import Chunk
    from memtrain.offload.ledger import Ledger

__all__ = ["Gradients"]


class _Store(Protocol):
    """What the accumulators use of their chunk store (``offload.chunks.ChunkStore``): its
    chunks, device, ledgers and buffer helpers. A protocol, so this module does not import the
    store's module, which imports this one."""

    device: torch.device
    chunks: list[Chunk]
    device_ledger: Ledger
    host_ledger: Ledger

    def _alloc(self, ledger: Ledger, owner: str, numel: int, dtype: torch.dtype, *, zero: bool = False,
               upload: bool = False) -> torch.Tensor: ...
    def _free(self, ledger: Ledger, owner: str, t: torch.Tensor, *, reuse: bool = True) -> None: ...


class Gradients:
    """The gradient accumulators of one ``ChunkStore``'s chunks (``Chunk.grad``)."""

    def __init__(self, store: _Store, *, asynchronous: bool) -> None:
        self.store = store
        self.asynchronous = asynchronous
        """[Note: asynchronous gradient flush] (default: on a CUDA device)."""
        self._worker: ThreadPoolExecutor | None = None
        self._queued: list[Future] = []  # in submission order; trimmed of finished ones at each flush
        self._latest: dict[int, Future] = {}  # chunk index -> its last queued add
        self._error: BaseException | None = None  # an add's failure, raised by every wait until zero()

    @property
    def pending(self) -> int:
        """Adds queued and not finished."""
        return sum(not f.done() for f in self._queued)

    def flush(self, c: "Chunk") -> None:
        """Add the micro-batch's grad buffer into the chunk's fp32 host accumulator (copied at the
        step's first flush) and free the buffer; an nvme chunk's accumulator is taken at its first."""
        store = self.store
        if c.grad is None:  # nvme home: the accumulator lives from the first flush to the step's end
            c.grad = store._alloc(store.host_ledger, f"chunk:{c.index}", c.num_elems, torch.float32)
        if self.asynchronous:
            self._flush_async(c, add=c.has_grad)
        else:
            src = c.grad_buf if store.device.type == "cpu" else c.grad_buf.to("cpu")
            c.grad.add_(src) if c.has_grad else c.grad.copy_(src)
        c.has_grad = True
        c.mb_seen.clear()
        store._free(store.device_ledger, f"buffer:grad:{c.index}", c.grad_buf)
        c.grad_buf = None

    def _flush_async(self, c: "Chunk", *, add: bool) -> None:
        store = self.store
        owner = f"staging:grad:{c.index}"
        landing = self._landing(owner, c.num_elems, c.grad_buf.dtype)
        try:
            handle = copy_async(landing, c.grad_buf)  # after the compute queued so far
        except BaseException:
            store._free(store.host_ledger, owner, landing)
            raise
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="memtrain-grads")
        # detached: the grad buffer (freed in the device ledger now) is kept from reuse until the
        # copy ends by the side stream recorded on it, not held alive until the add runs
        fut = self._worker.submit(self._accumulate, c, owner, landing, handle.detached(), add)
        self._queued = [f for f in self._queued if not f.done() or f.exception() is not None]
        self._queued.append(fut)
        self._latest[c.index] = fut

    def _landing(self, owner: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        store = self.store
        while True:
            try:
                return store._alloc(store.host_ledger, owner, numel, dtype)
            except BudgetExceeded:
                oldest = next((f for f in self._queued if not f.done()), None)
                if oldest is None:
                    raise
                oldest.result()  # frees its landing buffer

    def _accumulate(self, c: "Chunk", owner: str, landing: torch.Tensor, handle: CopyHandle, add: bool) -> None:
        store = self.store
        try:
            handle.wait()
            c.grad.add_(landing) if add else c.grad.copy_(landing)
        finally:
            store._free(store.host_ledger, owner, landing)

    def wait(self, c: "Chunk") -> None:
        """Until ``c``'s queued adds are done (its accumulator holds every flushed gradient)."""
        if self._error is not None:
            raise self._error
        fut = self._latest.get(c.index)
        if fut is not None:
            fut.result()

    def drain(self, *, errors: bool = True) -> None:
        """Wait for every queued add and end the thread. ``errors``: the first error raised on the
        thread surfaces here (False for ``close``, after a failure has surfaced elsewhere)."""
        queued, self._queued, worker, self._worker = self._queued, [], self._worker, None
        try:
            for fut in queued:
                if fut.exception() is not None and self._error is None:
                    self._error = fut.exception()
            if self._error is not None and errors:
                raise self._error
        finally:
            if worker is not None:
                worker.shutdown(wait=True)
            self._latest.clear()  # only now: an update on another thread may still ``wait`` on them

    def finish(self) -> None:
        """Before the optimizer: every flush added in; device-chunk slots that got no gradient
        this step zeroed."""
        self.drain()
        for c in self.store.chunks:
            if c.home is Tier.DEVICE and c.has_grad and len(c.step_seen) < len(c.slots):
                for si, s in enumerate(c.slots):
                    if si not in c.step_seen:
                        c.grad[s.offset:s.offset + s.numel].zero_()

    def finite(self) -> bool:
        """Whether every gradient of the step is finite (fp16 loss scaling's check)."""
        self.finish()
        return all(bool(torch.isfinite(c.grad).all()) for c in self.store.chunks if c.has_grad)

    def zero(self) -> None:
        """Forget the step's gradients; nvme chunks give their accumulators back."""
        self.drain()
        self._error = None
        store = self.store
        for c in store.chunks:
            c.has_grad = False
            c.step_seen.clear()
            c.mb_seen.clear()
            if c.home is Tier.NVME and c.grad is not None:
                store._free(store.host_ledger, f"chunk:{c.index}", c.grad)
                c.grad = None
