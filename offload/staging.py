"""Host staging of an nvme chunk's optimizer step (offload.optim): its master and states read
into host memory, updated there and written back; the notes named here are offload.optim's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from memtrain.offload.io_queue import BACKGROUND
from memtrain.offload.nvme_format import is_aligned

if TYPE_CHECKING:
    from memtrain.offload.chunks import Chunk, ChunkStore
    from memtrain.offload.tiers import CopyHandle

__all__ = ["Staged", "WriteBack", "Deferred", "read_states", "read_ahead_states", "reserve_rewrite", "write_states"]


class Staged:
    """An nvme chunk's master/states read into host staging (``staging:<i>``) for its step."""

    def __init__(self, tensors: dict[str, torch.Tensor], futures: list) -> None:
        self.tensors, self.futures = tensors, futures

    def wait(self) -> dict[str, torch.Tensor]:
        for f in self.futures:
            f.result()
        return self.tensors

    def free(self, store: "ChunkStore", index: int) -> None:
        """Give the staging back to the host ledger (after its reads or writes are done) and drop
        every reference to it, so that what the ledger frees is freed (an update's record may live
        on until the step ends)."""
        for t in self.tensors.values():
            store._free(store.host_ledger, f"staging:{index}", t)
        self.tensors, self.futures = {}, []  # a read's future holds its buffer as its result


class WriteBack:
    def __init__(self, store: "ChunkStore", index: int, staged: Staged, futures: list, rewrite: str | None = None) -> None:
        self.store, self.index, self.staged, self.futures, self.rewrite = store, index, staged, futures, rewrite
        self.readers: list[CopyHandle] = []
        """Fetches copying out of the staging ([Note: fetch from a write-back])."""

    def wait(self) -> None:
        for f in self.futures:
            f.result()
        for h in self.readers:
            h.wait()
        self.staged.free(self.store, self.index)
        self.futures, self.readers = [], []
        if self.rewrite is not None:
            self.store.nvme.ledger.free(self.rewrite)


class Deferred:
    """An update queued to run on the training thread ([Note: where early updates run]):
    ``result()`` runs it the first time and returns (or raises) what it did, like a Future's."""

    def __init__(self, fn, *args) -> None:
        self._call: tuple | None = (fn, args)
        self._value: Any = None
        self._error: BaseException | None = None

    @property
    def pending(self) -> bool:
        return self._call is not None

    def result(self) -> Any:
        if self._call is not None:
            fn, args = self._call
            self._call = None
            try:
                self._value = fn(*args)
            except BaseException as e:
                self._error = e
        if self._error is not None:
            raise self._error
        return self._value


def read_states(store: "ChunkStore", c: "Chunk", master: torch.Tensor | None = None, *,
                 staged: "Staged | None" = None) -> Staged:
    """Start reading master and states of nvme chunk ``c`` (planner.cost.nvme_optim_staging_bytes).

    ``master``: the chunk's fp32 parameters already in memory ([Note: master from the param
    buffer]); then only the states are read. ``staged``: the states read ahead ([Note: states
    read ahead]); then only the master is added."""
    owner, n = f"staging:{c.index}", c.num_elems
    if staged is None:
        staged = read_ahead_states(store, c)
    tensors, futures = staged.tensors, staged.futures
    if "master" in tensors:  # read ahead with the states (mixed precision)
        return staged
    if master is not None and master.device.type == "cpu" and is_aligned(master):
        store.host_ledger.alloc(owner, n * 4)  # the buffer itself becomes the staging (zero-copy)
        tensors["master"] = master
    elif master is not None:  # a CUDA buffer: copied into host staging before it is released
        tensors["master"] = store._alloc(store.host_ledger, owner, n, torch.float32)
        tensors["master"].copy_(master)
    else:
        tensors["master"] = store._alloc(store.host_ledger, owner, n, torch.float32)
        futures.append(store.nvme.read(store.nvme_key(c, "master"), tensors["master"], priority=BACKGROUND))
    return staged


def read_ahead_states(store: "ChunkStore", c: "Chunk") -> Staged:
    """Start reading ``c``'s optimizer states (and its master under mixed precision, where the
    param buffer is not the master) into host staging."""
    owner, n = f"staging:{c.index}", c.num_elems
    tensors, futures = {}, []
    if store.mixed:  # rewritten from the master after the step, so never read
        tensors["master"] = store._alloc(store.host_ledger, owner, n, torch.float32)
        futures.append(store.nvme.read(store.nvme_key(c, "master"), tensors["master"], priority=BACKGROUND))
    for k in store.state_names:
        tensors[k] = store._alloc(store.host_ledger, owner, n, torch.float32)
        futures.append(store.nvme.read(store.nvme_key(c, k), tensors[k], priority=BACKGROUND))
    if store.mixed:
        tensors["compute"] = store._alloc(store.host_ledger, owner, n, store.compute_dtype)
    return Staged(tensors, futures)


def reserve_rewrite(store: "ChunkStore", c: "Chunk", parts) -> str:
    """[Note: rewrite window] Reserve the second copy of ``c``'s files on the NVMe ledger now."""
    owner = f"chunk:{c.index}:rewrite"
    store.nvme.ledger.alloc(owner, sum(store.nvme.entry(store.nvme_key(c, k)).disk_bytes for k in parts))
    return owner


def write_states(store: "ChunkStore", c: "Chunk", staged: Staged, rewrite: str | None = None) -> WriteBack:
    futures = [store.nvme.write(store.nvme_key(c, k), t, priority=BACKGROUND, reserved=rewrite is not None)
               for k, t in staged.tensors.items()]
    return WriteBack(store, c.index, staged, futures, rewrite)
