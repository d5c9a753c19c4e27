"""Swap records: one block's saved activations for one micro-batch, and where they are now.

``ActivationManager`` (memtrain.offload.activations) decides what a block does with the tensors
autograd saves; this module owns the per-record mechanics behind that decision:

- ``_Record``: the state machine of one block's saved activations for one micro-batch
  (``PACKING -> RESIDENT``; a swap then goes ``COPY_OUT -> ON_HOST`` or ``COPY_OUT -> WRITING ->
  ON_NVME -> READING``, and comes back through ``COPY_IN -> RESIDENT``; all end ``FREED``), its
  ledger windows (owner ``act:<block>:<mb>``), the copy-out at the end of the forward and the
  copy-in before the backward;
- dedupe by storage: a storage saved several times (q, k and v are views of one projection) is
  one ``_Storage``, counted and moved once;
- ``_Packed``: what autograd holds for one saved tensor; unpacking rebuilds it with
  ``as_strided`` over the restored storage (same dtype, size, stride and offset), and its death
  is the signal that frees the record.

[Note: swap buffers and the ledger] A record's storages go into one buffer per tier (one copy
in, one file on NVMe) at 16-byte offsets, so every dtype can be viewed in place; the ledger
records ``A``, the sum of the storages' bytes, as the planner predicts it (the alignment adds at
most 15 bytes per storage). A tensor saved by a swapped block and then changed in place before
the block's forward ends is refused with an error: the swap copies at the end of the forward,
and plain autograd would reject that backward too. On CUDA the device copy is dropped when the
copy-out is seen finished (the next block boundary); a record needed again before that (the
last blocks of the forward) keeps using its device copy.

[Note: swap files deleted in the background] A claimed or freed swap_nvme record's file is
deleted on the store's threads, not waited for by the training thread (an unlink took about
1 ms here, twelve per step of bench/plan_accuracy.py's small/swap_nvme); the manager waits for
the deletes in flight before its next NVMe write starts (``ActivationManager.swap_out``), when
its last record is freed (the end of a micro-batch's backward) and in ``synchronize()``, so the
NVMe ledger never holds a deleted record's bytes beside a new write's, as the plan counts them,
and is empty after each backward; a delete that failed is warned about there.

[Note: swap I/O failures] A failed NVMe write or read of a record is raised in the training
thread where the record's data is next needed (the forward that waits for the write, the
backward's claim of the record), as an ``NvmeError`` naming the block and micro-batch, and again
by any later claim of it: the data the backward needs is gone, so the step cannot go on. A
record freed before that point never needed the data; its failure is still reported, as a
warning, since the disk misbehaved. A file that cannot be deleted is reported as a warning too:
it stays on the store's ledger and on disk until the store's ``close()`` removes it.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

import torch

from memtrain.offload.nvme_format import NvmeError, aligned_empty
from memtrain.offload.tiers import CopyHandle, copy_async, copy_stream
from memtrain.planner.plan import ActPolicy

if TYPE_CHECKING:
    from memtrain.offload.ledger import Ledger
    from memtrain.offload.nvme import NvmeStore

__all__ = ["act_owner"]


class _Manager(Protocol):
    """What a record uses of the manager that owns it (``offload.activations.ActivationManager``):
    its ledgers and NVMe store, and its bookkeeping of records coming back. A protocol, so this
    module does not import the manager's module, which imports this one."""

    device_ledger: Ledger
    host_ledger: Ledger
    nvme: NvmeStore | None
    _lock: threading.RLock
    _inbound: set[_Record]
    _stats: dict[str, Any]

    def _forget(self, rec: _Record) -> None: ...
    def _advance_inbound(self) -> None: ...
    def _nvme_key(self, owner: str) -> str: ...
    def _deleting(self, fut: Any, what: str) -> None: ...


class _Resolver(Protocol):
    """The part of a ``ParamResolver`` (offload.activations) a kept token needs: its unpacking."""

    def unpack(self, token: object) -> torch.Tensor: ...

_ALIGN_BYTES = 16
"""Offsets of storages inside a swap buffer: a multiple of every dtype's item size (complex128)."""


def act_owner(block: str, microbatch: int) -> str:
    """The ledger owner of one block's activations for one micro-batch (docs/memory-accounting.md)."""
    return f"act:{block}:{microbatch}"


class _State(Enum):
    PACKING = 1     # the block's forward is running
    RESIDENT = 2    # on the device (kept, or brought back)
    COPY_OUT = 3    # device -> host copy in flight
    ON_HOST = 4
    WRITING = 5     # host staging -> NVMe write in flight (the device copy is gone)
    ON_NVME = 6
    READING = 7     # NVMe -> host staging read in flight
    COPY_IN = 8     # host -> device copy in flight
    FREED = 9


class _Storage:
    """One distinct storage saved by a block."""

    __slots__ = ("data", "nbytes", "offset", "data_ptr")

    def __init__(self, data: torch.Tensor, offset: int) -> None:
        self.data: torch.Tensor | None = data
        """uint8 view of the whole original storage; dropped once it has been copied out."""
        self.nbytes = data.numel()
        self.offset = offset
        """Byte offset of this storage inside the record's swap buffers."""
        self.data_ptr = data.data_ptr()


class _Packed:
    """What autograd holds for one saved tensor of a block; its death is the release signal."""

    __slots__ = ("record", "tensor", "storage", "slot", "dtype", "size", "stride", "storage_offset")

    def __init__(self, record: _Record, tensor: torch.Tensor | None, storage: _Storage | None,
                 slot: int | None = None) -> None:
        self.record = record
        self.tensor = tensor  # kept policies and recompute inputs: the tensor itself
        self.storage = storage  # swap policies: rebuilt from the storage at unpack
        self.slot = slot  # a replayed recompute: its place in the block's saves (offload.recompute)
        if storage is not None:
            t = tensor
            self.dtype, self.size, self.stride, self.storage_offset = t.dtype, t.shape, t.stride(), t.storage_offset()
            self.tensor = None

    def __del__(self) -> None:
        self.record.release_one()


class _Kept:
    """A saved tensor left alone (a parameter view, another device, a tensor subclass), or a
    ``ParamResolver`` token, unpacked over the parameter's memory as it is then."""

    __slots__ = ("tensor", "resolver")

    def __init__(self, tensor: Any, resolver: _Resolver | None = None) -> None:
        self.tensor, self.resolver = tensor, resolver


class _Record:
    """One block's saved activations for one micro-batch, and where they are now."""

    def __init__(self, mgr: _Manager, index: int, name: str, mb: int, policy: ActPolicy) -> None:
        self.mgr, self.index, self.name, self.mb, self.policy = mgr, index, name, mb, policy
        self.owner = act_owner(name, mb)
        self.lock = threading.RLock()
        self.state = _State.PACKING
        self.storages: dict[int, _Storage] = {}
        self.versions: list[tuple[torch.Tensor, int]] = []  # (saved tensor, version at pack)
        self.device: torch.device | None = None
        self.flat_bytes = 0
        self.num_live = 0
        self.device_bytes = 0  # held on the device ledger now
        self.host_bytes = 0  # held on the host ledger now
        self.recompute_seen: set[int] = set()
        self.host_buf: torch.Tensor | None = None
        self.dev_buf: torch.Tensor | None = None
        self.copy: CopyHandle | None = None  # the copy in flight (out or in)
        self.pending_in: CopyHandle | None = None  # a copy whose end releases the host buffer
        self.io = None  # concurrent.futures.Future of an NVMe write or read
        self.nvme_key: str | None = None
        self.failed: str | None = None  # the NVMe failure raised to the training thread
        # a recompute replayed at its claim (offload.recompute [Note: recompute across B and W])
        self.replay: Any = None  # what runs the block's forward again
        self.num_packs = 0  # the forward's saves so far, in order
        self.slots: set[int] = set()  # which of them were dropped, to be rebuilt
        self.rebuilt: dict[int, torch.Tensor] | None = None  # the replay's tensors, by slot

    def placeholder(self, slot: int) -> _Packed:
        """A replayed recompute's saved tensor ``slot``, dropped until the replay rebuilds it."""
        with self.lock:
            self.slots.add(slot)
            self.num_live += 1
        return _Packed(self, None, None, slot)

    def hold(self, t: torch.Tensor) -> None:
        """A replayed recompute's input, held for the replay (``I`` on the ledger)."""
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        with self.lock:
            if ptr not in self.storages and storage.nbytes():
                data = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
                self.storages[ptr] = _Storage(data, 0)

    def replayed(self, slot: int) -> torch.Tensor:
        """Saved tensor ``slot`` of a replayed recompute; an unpack before the claim replays now."""
        with self.lock:
            if self.rebuilt is None:
                self.rebuild()
            assert self.rebuilt is not None, f"{self._what()}: unpacked after it was freed"
            return self.rebuilt[slot]

    def rebuild(self) -> None:
        """Replay a recompute block's forward (offload.recompute [Note: recompute across B and
        W]): its dropped saves rebuilt in order, their storages ``A`` taken until the record goes."""
        with self.lock:
            if self.rebuilt is not None or self.replay is None:
                return
            rebuilt: dict[int, torch.Tensor] = {}
            seen: set[int] = set()
            count = [0, 0]  # saves, bytes

            def pack(t: torch.Tensor) -> None:
                k = count[0]
                count[0] += 1
                if k in self.slots:
                    rebuilt[k] = t.detach()
                    ptr = t.untyped_storage().data_ptr()
                    if ptr not in seen:
                        seen.add(ptr)
                        count[1] += t.untyped_storage().nbytes()

            self.replay.run(pack)
            if count[0] != self.num_packs:
                raise RuntimeError(f"block {self.name!r}: its recompute saved {count[0]} tensors for backward, its "
                                   f"forward {self.num_packs}; a forward that depends on more than its inputs and RNG "
                                   "cannot be replayed: set this block's activation policy to keep")
            self.take_device(count[1])  # A: from the replay (the B's start) until the graph goes (W's end)
            self.rebuilt = rebuilt
            stats = self.mgr._stats.get(self.name)
            if stats is not None:
                stats.saved_bytes = count[1]

    # --- ledger windows ------------------------------------------------------------------

    def take_device(self, n: int) -> None:
        self.mgr.device_ledger.alloc(self.owner, n)
        self.device_bytes += n

    def give_device(self) -> None:
        if self.device_bytes:
            self.mgr.device_ledger.free(self.owner, self.device_bytes)
            self.device_bytes = 0

    def take_host(self, n: int) -> None:
        self.mgr.host_ledger.alloc(self.owner, n)
        self.host_bytes += n

    def give_host(self) -> None:
        if self.host_bytes:
            self.mgr.host_ledger.free(self.owner, self.host_bytes)
            self.host_bytes = 0

    # --- autograd's side -----------------------------------------------------------------

    def pack(self, t: torch.Tensor, storage: torch.UntypedStorage) -> _Packed:
        """Record one saved tensor whose memory is ``storage`` (a storage is recorded once)."""
        ptr = storage.data_ptr()
        with self.lock:
            s = self.storages.get(ptr)
            if s is None:
                data = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
                s = self.storages[ptr] = _Storage(data, self.flat_bytes)
                self.flat_bytes += -(-s.nbytes // _ALIGN_BYTES) * _ALIGN_BYTES
            self.num_live += 1
        if self.policy in (ActPolicy.KEEP, ActPolicy.RECOMPUTE):
            # [Note: saved outputs are detached] autograd hands a node's own output to the pack
            # hook with its grad_fn: held as is, node -> saved variable -> this -> tensor -> node
            # is a cycle that only running the node breaks, and a node that a split backward's
            # second walk never runs (offload.recompute [Note: recompute across B and W]) would
            # keep the record forever. Unpacking gives autograd the data; it needs nothing else.
            return _Packed(self, t.detach(), None)
        self.versions.append((t, t._version))
        return _Packed(self, t, s)

    def release_one(self) -> None:
        with self.lock:
            self.num_live -= 1
            if self.num_live == 0 and self.state is not _State.PACKING:
                self.free_all()

    def free_all(self) -> None:
        """Everything autograd saved for this block is gone (end of B, or the graph was dropped)."""
        with self.lock:
            for h in (self.copy, self.pending_in):
                if h is not None:
                    h.wait()  # never release memory a copy engine is still using
            self.copy = self.pending_in = None
            if self.io is not None:
                io, self.io = self.io, None
                error = io.exception()  # waits: never free a buffer the disk is still using
                if error is not None:  # [Note: swap I/O failures]: the data was never needed
                    doing = "write" if self.state is _State.WRITING else "read"
                    warnings.warn(f"{self._what()}: an NVMe {doing} failed after the data stopped being needed: "
                                  f"{error}", stacklevel=2)
            self.give_device()
            self.give_host()
            self._delete_file()
            self.storages.clear()
            self.versions.clear()
            self.host_buf = self.dev_buf = None
            self.replay = self.rebuilt = None
            self.state = _State.FREED
        self.mgr._forget(self)

    def _what(self) -> str:
        return f"activations of block {self.name!r}, micro-batch {self.mb}"

    def _wait_io(self, doing: str) -> None:
        """Wait for the NVMe write or read in flight; raise its failure ([Note: swap I/O failures])."""
        if self.failed is not None:
            raise NvmeError(self.failed)
        io, self.io = self.io, None
        error = io.exception()  # waits
        if error is None:
            return
        # Kept as a message and raised as a new exception: one raised in this thread would carry
        # its frames, and so the saved tensors whose release frees this record, wherever the
        # future's exception is kept (the store keeps failures until its flush()).
        self.failed = f"{self._what()}: {doing} NVMe failed, so this step's backward cannot run: {error}"
        if isinstance(error, NvmeError):
            raise NvmeError(self.failed) from error
        raise error

    def _delete_file(self) -> None:
        """Start deleting the record's NVMe file, if its write made one ([Note: swap I/O
        failures]; [Note: swap files deleted in the background])."""
        key, self.nvme_key = self.nvme_key, None
        if key is None or self.mgr.nvme is None or key not in self.mgr.nvme:
            return
        try:
            fut = self.mgr.nvme.delete(key, wait=False)
        except NvmeError as e:
            warnings.warn(f"{self._what()}: {e}; the NVMe store's close() removes the file", stacklevel=3)
            return
        self.mgr._deleting(fut, self._what())

    def view(self, p: _Packed) -> torch.Tensor:
        """The saved tensor ``p`` over the storage's memory as it is now (bringing it back first)."""
        with self.lock:
            if self.state not in (_State.PACKING, _State.RESIDENT):
                self.start_bring_back()
                self.advance_in(consumer=True)
            s = p.storage
            base = s.data if s.data is not None else self.dev_buf[s.offset : s.offset + s.nbytes]
        self.mgr._advance_inbound()  # start the copy-in of a prefetched record whose read is done
        flat = base.view(p.dtype)
        return flat.as_strided(p.size, p.stride, flat.storage_offset() + p.storage_offset)

    # --- copies --------------------------------------------------------------------------

    def start_copy_out(self) -> None:
        """End of F: copy every saved storage into one host buffer (side stream on CUDA)."""
        self.take_host(self.saved_bytes())  # host: from the start of the copy-out
        self.host_buf = self._host_buffer()
        handle = None
        for s in self.storages.values():
            handle = copy_async(self.host_buf[s.offset : s.offset + s.nbytes], s.data)
        # Copies on one side stream finish in order: the last one's event marks them all.
        self.copy = handle
        self.state = _State.COPY_OUT
        self.finish_copy_out(wait=False)

    def finish_copy_out(self, wait: bool) -> None:
        """If the device -> host copy is done: the device bytes go (and the NVMe write starts)."""
        with self.lock:
            if self.state is not _State.COPY_OUT or (not wait and not self.copy.done()):
                return
            self.copy.wait()
            self.copy = None
            for s in self.storages.values():
                s.data = None  # the device copy is no longer referenced by us
            self.give_device()
            if self.policy is ActPolicy.SWAP_HOST:
                self.state = _State.ON_HOST
                return
            self.nvme_key = self.mgr._nvme_key(self.owner)
            self.state = _State.WRITING
            self.io = self.mgr.nvme.write(self.nvme_key, self.host_buf)

    def wait_write(self) -> None:
        """Wait for the copy-out and the NVMe write; then the host staging goes.

        [Note: bounded NVMe writes] Only the training thread ends a write's window, at the
        points ``MemoryPolicy.swap_writes_in_flight`` names (the activation
        manager calls this there), never a completion callback: so the host staging held at any
        moment is the same on a fast and a slow disk, and a slow disk stalls the forward instead
        of piling up staging buffers.
        """
        with self.lock:
            self.finish_copy_out(wait=True)
            if self.state is not _State.WRITING:
                return
            self._wait_io("writing them to")  # an NvmeError surfaces here, in the training thread
            self.host_buf = None
            self.give_host()
            self.state = _State.ON_NVME

    def start_bring_back(self) -> None:
        """Start moving a swapped record back toward the device (no-op if it is not away)."""
        with self.lock:
            self.finish_copy_out(wait=False)
            if self.state is _State.COPY_OUT:
                # Needed again before its copy-out ended (the last blocks of the forward): the
                # device copy is still there, so use it; the host copy goes when its copy ends.
                self.pending_in, self.copy = self.copy, None
                self.state = _State.RESIDENT
                return
            self.wait_write()
            if self.state is _State.ON_HOST:
                self.start_copy_in()
            elif self.state is _State.ON_NVME:
                self.take_host(self.saved_bytes())  # host staging: from the read's start
                self.host_buf = self._host_buffer()
                self.io = self.mgr.nvme.read(self.nvme_key, self.host_buf)
                self.state = _State.READING
            if self.state in (_State.READING, _State.COPY_IN):
                with self.mgr._lock:
                    self.mgr._inbound.add(self)

    def _host_buffer(self) -> torch.Tensor:
        """The record's host buffer (pinned on CUDA). [Note: swap staging is aligned] A
        swap_nvme record's is aligned for O_DIRECT, so the store moves it with no bounce copy:
        through a worker's bounce buffer, each of the store's threads kept as many pages
        resident as the largest record it had moved (offload.nvme_format [Note: zero-copy payload])."""
        pin = self.device.type == "cuda"
        if self.policy is ActPolicy.SWAP_NVME:
            return aligned_empty(self.flat_bytes, torch.uint8, pin_memory=pin)
        return torch.empty(self.flat_bytes, dtype=torch.uint8, pin_memory=pin)

    def start_copy_in(self) -> None:
        self.take_device(self.saved_bytes())  # device: from the start of the copy-in to the end of B
        # [Note: copy streams] an upload's destination comes from the copy stream's pool: a block
        # freed on the compute stream may still be in use by kernels queued there, and the
        # side-stream copy does not wait for them. The consumer's wait_stream records the compute
        # stream on it, so its later reuse waits too.
        cuda = self.device.type == "cuda"
        with torch.cuda.stream(copy_stream(self.device, "h2d")) if cuda else contextlib.nullcontext():
            self.dev_buf = torch.empty(self.flat_bytes, dtype=torch.uint8, device=self.device)
        self.copy = copy_async(self.dev_buf, self.host_buf)
        self.state = _State.COPY_IN

    def advance_in(self, consumer: bool) -> None:
        """Move a record coming back along; a ``consumer`` (the block's backward start, or an
        unpack) claims it now.

        [Note: NVMe swap-in claims] A swap_nvme record's read is waited for, its file deleted
        and its copy-in started (taking its device bytes) only when it is claimed, never when
        the disk happens to finish: the windows end and begin at points of the program. On a
        GPU the host runs ahead of the kernels, so the copy still overlaps the backward above.
        """
        with self.lock:
            if self.state is _State.READING and consumer:
                self._wait_io("reading them back from")  # an NvmeError surfaces here, in the training thread
                self._delete_file()  # NVMe bytes: from the write start to the claim
                self.start_copy_in()
            if self.state is _State.COPY_IN and (consumer or self.copy.done()):
                # A consumer's stream waits for the copy on the GPU; the host does not block.
                self.copy.wait_stream()
                self.pending_in, self.copy = self.copy, None
                self.state = _State.RESIDENT
            if self.pending_in is not None and self.pending_in.done():
                self.pending_in.wait()
                self.pending_in = None
                self.host_buf = None
                self.give_host()  # host: until the end of the copy-in

    def saved_bytes(self) -> int:
        return sum(s.nbytes for s in self.storages.values())

