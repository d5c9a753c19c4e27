"""Activations between forward and backward: keep, swap to host, swap to NVMe, or recompute.

``ActivationManager`` carries out the plan's per-block activation policy (``ActPolicy``) with
``torch.autograd.graph.saved_tensors_hooks`` installed around each block's forward:

    acts = ActivationManager(policies={"blocks.0": "keep", "blocks.1": "swap_host", ...},
                             device_ledger=device.ledger, host_ledger=host.ledger, nvme=store)
    acts.wrap_blocks(list(model.blocks.named_children()))   # (name, module) pairs, in order
    for mb, batch in enumerate(microbatches):
        acts.set_microbatch(mb)
        loss = loss_fn(model(batch)); loss.backward()
    acts.unwrap()

Policies (accounting windows: docs/memory-accounting.md, "Activations", owner ``act:<block>:<mb>``):

- ``keep``: saved tensors stay where they are; the device ledger holds the block's saved bytes
  ``A`` from the end of its forward until autograd has released the last of them (end of B).
- ``swap_host`` (Rhu et al. 2016 vDNN; MEMO, Zhao et al. 2024): at the end of the block's
  forward every saved storage is copied into one host buffer (pinned, on a side stream, on
  CUDA) and the device copy is dropped; in backward it is brought back ahead of use.
- ``swap_nvme`` (SSDTrain, Wu et al. 2024): the same through a host staging buffer to an
  ``NvmeStore`` file written asynchronously, read back ahead of use in backward.
- ``recompute`` (Chen et al. 2016): the block runs under non-reentrant
  ``torch.utils.checkpoint`` with its RNG state preserved (so dropout masks match); the ledger
  holds the block's inputs ``I`` from F to B and the recomputed ``A`` during recompute + B.

[Note: what counts as an activation] Every tensor autograd saves while a wrapped block's forward
runs belongs to that block's record, except (a) views of parameter memory: those the
``param_resolver`` claims (the chunk store moves parameters, so it hands out tokens instead of
tensors) and those whose storage is a parameter or buffer of the block, re-read at each forward;
they are neither counted nor swapped, and (b) tensors that are not plain strided tensors or that
live on another device than the block's first saved tensor (left in place, not counted).
Tensors saved outside any wrapped block (the loss) are not seen at all. A storage saved several
times (q, k and v are views of one projection) is counted and moved once; each saved view is
rebuilt with ``as_strided`` over the restored storage (same dtype, size, stride and offset).

[Note: when backward starts] A hook on the block's output tensors fires when the gradient of
the output is complete, i.e. just before the block's own backward nodes run. It brings the
block's record back if it is not already, and starts bringing back the records of the
``prefetch_depth`` blocks before it (same micro-batch), so their copies overlap this block's
backward. An unpack that finds its record still away brings it back on the spot (a stall, never
a wrong value).

[Note: swap buffers and the ledger] A record's storages go into one buffer per tier (one copy
in, one file on NVMe) at 16-byte offsets, so every dtype can be viewed in place; the ledger
records ``A``, the sum of the storages' bytes, as the planner predicts it (the alignment adds at
most 15 bytes per storage). A tensor saved by a swapped block and then changed in place before
the block's forward ends is refused with an error: the swap copies at the end of the forward,
and plain autograd would reject that backward too. On CUDA the device copy is dropped when the
copy-out is seen finished (the next block boundary); a record needed again before that (the
last blocks of the forward) keeps using its device copy.

[Note: copies on CPU] Without CUDA the "device" is host memory (docs/DESIGN.md, the CPU-only
path): copies are real, synchronous ``copy_`` calls into fresh buffers, so the numerics and the
ledger windows are exercised exactly; only the overlap needs a GPU (tests/gpu).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memtrain.offload.ledger import Ledger
from memtrain.offload.nvme import NvmeStore
from memtrain.offload.tiers import CopyHandle, copy_async
from memtrain.planner.plan import ActPolicy

__all__ = ["ActivationManager", "BlockActivations", "ParamResolver", "act_owner"]

_ALIGN_BYTES = 16
"""Offsets of storages inside a swap buffer: a multiple of every dtype's item size (complex128)."""


def act_owner(block: str, microbatch: int) -> str:
    """The ledger owner of one block's activations for one micro-batch (docs/memory-accounting.md)."""
    return f"act:{block}:{microbatch}"


@runtime_checkable
class ParamResolver(Protocol):
    """Hands out tokens for views of parameter memory that a chunk store manages."""

    def pack(self, t: torch.Tensor) -> object | None:
        """A token when ``t`` is a view of managed parameter memory, else None."""

    def unpack(self, token: object) -> torch.Tensor:
        """The same view over the parameter's current, resident memory."""


@dataclass(kw_only=True, slots=True)
class BlockActivations:
    """What one block saved for backward in its most recent forward (or recompute)."""

    name: str
    """The block's name as given to ``wrap_blocks``."""
    policy: ActPolicy
    """The block's activation policy."""
    saved_bytes: int = 0
    """``A``: bytes of the distinct storages saved for backward, parameters excluded (for
    ``recompute``: measured during the last recompute)."""
    input_bytes: int = 0
    """``I``: bytes of the block's tensor inputs held for the recompute (``recompute`` only)."""
    num_storages: int = 0
    """Distinct storages behind ``saved_bytes``."""
    num_saved_tensors: int = 0
    """Tensors autograd saved (several may share a storage)."""
    num_param_tensors: int = 0
    """Saved tensors that were views of parameters or buffers, left in place."""
    swapped_data_ptrs: frozenset[int] = frozenset()
    """Device addresses of the storages copied out by the last swap (empty unless swapping)."""


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

    __slots__ = ("record", "tensor", "storage", "dtype", "size", "stride", "storage_offset")

    def __init__(self, record: _Record, tensor: torch.Tensor | None, storage: _Storage | None) -> None:
        self.record = record
        self.tensor = tensor  # kept policies and recompute inputs: the tensor itself
        self.storage = storage  # swap policies: rebuilt from the storage at unpack
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

    def __init__(self, tensor: Any, resolver: ParamResolver | None = None) -> None:
        self.tensor, self.resolver = tensor, resolver


class _Record:
    """One block's saved activations for one micro-batch, and where they are now."""

    def __init__(self, mgr: ActivationManager, index: int, name: str, mb: int, policy: ActPolicy) -> None:
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
                try:
                    self.io.result()
                except Exception:  # noqa: BLE001 - the data is no longer wanted, so a failed write or read is moot
                    pass
                self.io = None
            self.give_device()
            self.give_host()
            if self.nvme_key is not None and self.mgr.nvme is not None:
                try:
                    self.mgr.nvme.delete(self.nvme_key)
                except Exception:  # noqa: BLE001 - a leftover file is removed by the store's next start()
                    pass
                self.nvme_key = None
            self.storages.clear()
            self.versions.clear()
            self.host_buf = self.dev_buf = None
            self.state = _State.FREED
        self.mgr._forget(self)

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
        self.host_buf = torch.empty(self.flat_bytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
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
        self.io.add_done_callback(lambda fut, ref=weakref.ref(self): _after_write(ref, fut))

    def finish_write(self, wait: bool = False) -> None:
        """If the NVMe write is done: the host staging bytes go."""
        with self.lock:
            if self.state is not _State.WRITING or (not wait and not self.io.done()):
                return
            self.io.result()  # an NvmeError surfaces here, in the training thread
            self.io = None
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
            self.finish_write(wait=True)
            if self.state is _State.ON_HOST:
                self.start_copy_in()
            elif self.state is _State.ON_NVME:
                self.take_host(self.saved_bytes())  # host staging: from the read start
                self.host_buf = torch.empty(self.flat_bytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
                self.io = self.mgr.nvme.read(self.nvme_key, self.host_buf)
                self.state = _State.READING
            if self.state in (_State.READING, _State.COPY_IN):
                with self.mgr._lock:
                    self.mgr._inbound.add(self)

    def start_copy_in(self) -> None:
        self.take_device(self.saved_bytes())  # device: from the start of the copy-in to the end of B
        self.dev_buf = torch.empty(self.flat_bytes, dtype=torch.uint8, device=self.device)
        self.copy = copy_async(self.dev_buf, self.host_buf)
        self.state = _State.COPY_IN

    def advance_in(self, consumer: bool) -> None:
        """Move a record coming back along; a ``consumer`` (an unpack) needs it now."""
        with self.lock:
            if self.state is _State.READING and (consumer or self.io.done()):
                self.io.result()
                self.io = None
                self.mgr.nvme.delete(self.nvme_key)  # NVMe bytes: from the write start to the read end
                self.nvme_key = None
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


def _after_write(ref: weakref.ref, fut: Any) -> None:
    rec = ref()
    if rec is not None and fut.exception() is None:
        rec.finish_write()


class ActivationManager:
    """Per-block keep / swap_host / swap_nvme / recompute of saved activations. See module doc."""

    def __init__(
        self,
        *,
        policies: dict[str, ActPolicy | str],
        device_ledger: Ledger,
        host_ledger: Ledger,
        nvme: NvmeStore | None = None,
        param_resolver: ParamResolver | None = None,
        prefetch_depth: int = 1,
    ) -> None:
        self.policies: dict[str, ActPolicy] = {}
        for name, p in policies.items():
            try:
                self.policies[name] = ActPolicy(p)
            except ValueError:
                choices = ", ".join(x.value for x in ActPolicy)
                raise ValueError(f"policies[{name!r}]: unknown activation policy {p!r}; choose one of {choices}") from None
        needs_nvme = sorted(n for n, p in self.policies.items() if p is ActPolicy.SWAP_NVME)
        if needs_nvme and nvme is None:
            raise ValueError(
                f"policies: block(s) {', '.join(needs_nvme)} swap to NVMe but no nvme store was given; "
                "pass nvme=NvmeStore(...) or choose swap_host for them"
            )
        if isinstance(prefetch_depth, bool) or not isinstance(prefetch_depth, int) or prefetch_depth < 0:
            raise ValueError(f"prefetch_depth: must be an int >= 0 (blocks brought back ahead), got {prefetch_depth!r}")
        if param_resolver is not None and not isinstance(param_resolver, ParamResolver):
            raise ValueError("param_resolver: must have pack(tensor) and unpack(token) methods (see ParamResolver)")
        self.device_ledger = device_ledger
        self.host_ledger = host_ledger
        self.nvme = nvme
        self.param_resolver = param_resolver
        self.prefetch_depth = prefetch_depth
        self.microbatch = 0
        self._blocks: list[tuple[str, nn.Module]] = []
        self._stats: dict[str, BlockActivations] = {}
        self._records: dict[tuple[int, int], _Record] = {}
        """Records with saved activations alive, by (block index, micro-batch)."""
        self._inbound: set[_Record] = set()
        """Records on their way back (NVMe read or host -> device copy in flight)."""
        # Reentrant: a saved tensor's release (a __del__) may run inside a garbage collection
        # triggered while this thread already holds the lock.
        self._lock = threading.RLock()
        self._key_serial = 0

    # --- public --------------------------------------------------------------------------

    def wrap_blocks(self, blocks: Sequence[tuple[str, nn.Module]]) -> None:
        """Install the per-block behaviour on ``blocks`` (``(name, module)`` in forward order)."""
        if self._blocks:
            raise ValueError("wrap_blocks: blocks are already wrapped; call unwrap() first")
        names = [n for n, _ in blocks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"wrap_blocks: block name(s) {', '.join(dup)} appear more than once; names must be unique")
        if len({id(m) for _, m in blocks}) != len(blocks):
            raise ValueError("wrap_blocks: the same module is listed twice; wrap each block once")
        missing = [n for n in names if n not in self.policies]
        if missing:
            raise ValueError(f"policies: no activation policy for block(s) {', '.join(missing)}; add one for each block")
        for name, module in blocks:
            if not isinstance(module, nn.Module):
                raise ValueError(f"wrap_blocks: block {name!r} is a {type(module).__name__}, not an nn.Module")
            if "forward" in module.__dict__:
                raise ValueError(f"wrap_blocks: block {name!r} already has an instance-level forward (wrapped twice?)")
        for index, (name, module) in enumerate(blocks):
            self._stats[name] = BlockActivations(name=name, policy=self.policies[name])
            module.forward = self._make_forward(index, name, module, module.forward)
        self._blocks = list(blocks)

    def unwrap(self) -> None:
        """Restore the blocks' own forwards (records already saved stay valid until their backward)."""
        for _, module in self._blocks:
            module.__dict__.pop("forward", None)
        self._blocks = []

    def set_microbatch(self, mb: int) -> None:
        """The micro-batch the following forwards belong to (the ``<mb>`` of ``act:<block>:<mb>``)."""
        if isinstance(mb, bool) or not isinstance(mb, int) or mb < 0:
            raise ValueError(f"set_microbatch: micro-batch index must be an int >= 0, got {mb!r}")
        self.microbatch = mb

    def block_activations(self, name: str) -> BlockActivations:
        """What block ``name`` saved in its most recent forward (for reports and checks)."""
        if name not in self._stats:
            raise ValueError(f"block_activations: no wrapped block named {name!r}; known: {', '.join(self._stats)}")
        return self._stats[name]

    def synchronize(self) -> None:
        """Wait for every copy-out and NVMe write in flight (swapped records come to rest)."""
        for rec in self._live_records():
            rec.finish_copy_out(wait=True)
            rec.finish_write(wait=True)

    # --- forward -------------------------------------------------------------------------

    def _make_forward(self, index: int, name: str, module: nn.Module, inner):
        mgr = self

        def forward(*args, **kwargs):
            return mgr._run_block(index, name, module, inner, args, kwargs)

        forward.__wrapped__ = inner  # for tools that look through wrappers
        return forward

    def _run_block(self, index: int, name: str, module: nn.Module, inner, args, kwargs):
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        self._poll()
        policy = self.policies[name]
        rec = _Record(self, index, name, self.microbatch, policy)
        param_ptrs = self._param_ptrs(module)
        stats = BlockActivations(name=name, policy=policy)
        hooks = torch.autograd.graph.saved_tensors_hooks(
            lambda t: self._pack(rec, t, param_ptrs, stats), self._unpack
        )
        with hooks:
            if policy is ActPolicy.RECOMPUTE:
                # Only checkpoint's saved inputs reach our pack hook; the block's own saved
                # tensors are checkpoint's placeholders, rebuilt by the recompute.
                body = self._recompute_body(rec, inner, param_ptrs, stats)
                out = checkpoint(body, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
            else:
                out = inner(*args, **kwargs)
        self._end_forward(rec, stats)
        self._watch_backward(rec, out)
        return out

    def _param_ptrs(self, module: nn.Module) -> frozenset[int]:
        """Storages of the block's parameters and buffers, read now: the chunk store may move them."""
        ptrs = {p.untyped_storage().data_ptr() for p in module.parameters()}
        ptrs.update(b.untyped_storage().data_ptr() for b in module.buffers())
        ptrs.discard(0)
        return frozenset(ptrs)

    def _pack(self, rec: _Record, t: torch.Tensor, param_ptrs: frozenset[int], stats: BlockActivations):
        stats.num_saved_tensors += 1
        if self.param_resolver is not None:
            token = self.param_resolver.pack(t)
            if token is not None:
                stats.num_param_tensors += 1
                return _Kept(token, self.param_resolver)
        if type(t) not in (torch.Tensor, nn.Parameter) or t.layout is not torch.strided:
            return _Kept(t)
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in param_ptrs:
            stats.num_param_tensors += 1
            return _Kept(t)
        if rec.device is None:
            rec.device = t.device
        if t.device != rec.device or storage.nbytes() == 0:
            return _Kept(t)
        with rec.lock:
            s = rec.storages.get(ptr)
            if s is None:
                data = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
                s = rec.storages[ptr] = _Storage(data, rec.flat_bytes)
                rec.flat_bytes += -(-s.nbytes // _ALIGN_BYTES) * _ALIGN_BYTES
            rec.num_live += 1
        if rec.policy in (ActPolicy.KEEP, ActPolicy.RECOMPUTE):
            return _Packed(rec, t, None)
        rec.versions.append((t, t._version))
        return _Packed(rec, t, s)

    @staticmethod
    def _unpack(obj) -> torch.Tensor:
        if type(obj) is _Packed:
            return obj.tensor if obj.tensor is not None else obj.record.view(obj)
        return obj.tensor if obj.resolver is None else obj.resolver.unpack(obj.tensor)

    def _recompute_body(self, rec: _Record, inner, param_ptrs: frozenset[int], stats: BlockActivations):
        mgr = self

        def body(*args, **kwargs):
            if rec.state is _State.PACKING:
                return inner(*args, **kwargs)  # the original forward
            with _CountingHooks(mgr, rec, param_ptrs):
                return inner(*args, **kwargs)

        return body

    def _end_forward(self, rec: _Record, stats: BlockActivations) -> None:
        """The block's forward is done: open its ledger window and start any swap-out."""
        saved = sum(s.nbytes for s in rec.storages.values())
        if rec.policy is ActPolicy.RECOMPUTE:
            stats.input_bytes = saved
            prev = self._stats.get(rec.name)
            stats.saved_bytes = prev.saved_bytes if prev is not None else 0  # until a recompute measures it
        else:
            stats.saved_bytes = saved
        stats.num_storages = len(rec.storages)
        self._stats[rec.name] = stats
        for t, version in rec.versions:
            if t._version != version:
                raise RuntimeError(
                    f"block {rec.name!r}: a tensor saved for backward was modified in place later in the same "
                    f"forward; its {rec.policy.value} policy copies it after the forward, so set this block's "
                    "activation policy to keep (or avoid the in-place op)"
                )
        rec.versions.clear()
        with rec.lock:
            if rec.num_live == 0:  # nothing was saved (or it was already released)
                rec.state = _State.FREED
                return
            rec.take_device(saved)  # device: from the end of F
            rec.state = _State.RESIDENT
            self._remember(rec)
            if rec.policy in (ActPolicy.SWAP_HOST, ActPolicy.SWAP_NVME):
                stats.swapped_data_ptrs = frozenset(s.data_ptr for s in rec.storages.values())
                rec.start_copy_out()

    # --- backward ------------------------------------------------------------------------

    def _watch_backward(self, rec: _Record, out) -> None:
        ref = weakref.ref(rec)
        fired = [False]

        def on_grad(_grad):
            if not fired[0]:
                fired[0] = True
                r = ref()
                if r is not None:
                    self._on_backward_start(r)

        for t in _tensors(out):
            if t.requires_grad:
                t.register_hook(on_grad)

    def _on_backward_start(self, rec: _Record) -> None:
        """Block ``rec``'s backward is about to run: bring it back, and the blocks before it."""
        self._poll()
        rec.start_bring_back()
        for j in range(rec.index - 1, rec.index - 1 - self.prefetch_depth, -1):
            if j < 0:
                break
            with self._lock:
                prev = self._records.get((j, rec.mb))
            if prev is not None:
                prev.start_bring_back()

    def _advance_inbound(self) -> None:
        """Move prefetched records along (their NVMe read or host copy may have finished)."""
        if not self._inbound:
            return
        with self._lock:
            inbound = list(self._inbound)
        for rec in inbound:
            rec.advance_in(consumer=False)
            if rec.state not in (_State.READING, _State.COPY_IN):
                with self._lock:
                    self._inbound.discard(rec)

    def _poll(self) -> None:
        """Advance records whose copies or I/O finished (cheap; called at block boundaries)."""
        for rec in self._live_records():
            rec.finish_copy_out(wait=False)
            rec.finish_write()
            rec.advance_in(consumer=False)

    # --- bookkeeping ---------------------------------------------------------------------

    def _remember(self, rec: _Record) -> None:
        with self._lock:
            self._records[(rec.index, rec.mb)] = rec

    def _forget(self, rec: _Record) -> None:
        with self._lock:
            if self._records.get((rec.index, rec.mb)) is rec:
                del self._records[(rec.index, rec.mb)]
            self._inbound.discard(rec)

    def _live_records(self) -> list[_Record]:
        with self._lock:
            return list(self._records.values())

    def _nvme_key(self, owner: str) -> str:
        # The owner name is the key (the nvme ledger then speaks the same vocabulary); a second
        # record of the same block and micro-batch alive at once gets a distinct key.
        with self._lock:
            if owner not in self.nvme:
                return owner
            self._key_serial += 1
            return f"{owner}#{self._key_serial}"


class _CountingHooks:
    """During a recompute: count the block's saved storages ``A`` into its record, then hand
    each tensor on to checkpoint's own hooks (the ones in force when the recompute began).

    [Note: counting A during a recompute] Non-reentrant checkpoint installs its own saved-tensor
    hooks around the recompute, and only the innermost hooks see a saved tensor. To measure the
    bytes the recompute brings back without taking them from checkpoint, these hooks read the
    hooks in force (``torch._C._autograd._top_saved_tensors_default_hooks``, the accessor
    ``saved_tensors_hooks`` itself is built on), count, and delegate every call to them.
    """

    def __init__(self, mgr: ActivationManager, rec: _Record, param_ptrs: frozenset[int]) -> None:
        self.mgr, self.rec, self.param_ptrs = mgr, rec, param_ptrs
        self.outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        assert self.outer is not None, "recompute ran without torch.utils.checkpoint's hooks"
        self.saved_bytes = 0

    def pack(self, t: torch.Tensor):
        rec, ptr = self.rec, t.untyped_storage().data_ptr()
        if (
            type(t) in (torch.Tensor, nn.Parameter)
            and ptr not in self.param_ptrs
            and ptr not in rec.recompute_seen
            and (self.mgr.param_resolver is None or self.mgr.param_resolver.pack(t) is None)
        ):
            rec.recompute_seen.add(ptr)
            n = t.untyped_storage().nbytes()
            with rec.lock:
                if rec.state is not _State.FREED:
                    rec.take_device(n)  # A: from the start of the recompute to the end of B
            self.saved_bytes += n
        return self.outer[0](t)

    def __enter__(self) -> _CountingHooks:
        torch._C._autograd._push_saved_tensors_default_hooks(self.pack, self.outer[1])
        return self

    def __exit__(self, *exc: object) -> None:
        torch._C._autograd._pop_saved_tensors_default_hooks()
        stats = self.mgr._stats.get(self.rec.name)
        if stats is not None:
            stats.saved_bytes = self.saved_bytes


def _tensors(out: Any) -> list[torch.Tensor]:
    """The tensors in a block's output (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for x in out for t in _tensors(x)]
    if isinstance(out, dict):
        return [t for x in out.values() for t in _tensors(x)]
    return []
