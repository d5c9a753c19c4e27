"""Activations between forward and backward: keep, swap to host, swap to NVMe, or recompute.

``ActivationManager`` carries out the plan's per-block activation policy (``ActPolicy``) with
``torch.autograd.graph.saved_tensors_hooks`` installed around each block's forward. It is a
mechanism: when a swapped block's activations go out and come back is the program's
(planner.program_swaps [Note: the swap rules]); the engine hands it the program's actions:

    acts = ActivationManager(policies={"blocks.0": "keep", "blocks.1": "swap_host", ...},
                             device_ledger=device.ledger, host_ledger=host.ledger, nvme=store)
    acts.wrap_blocks(list(model.blocks.named_children()))   # (name, module) pairs, in order
    acts.set_microbatch(mb)              # before each micro-batch's forward
    acts.swap_out(block, mb)             # 0SWAP_OUT<mb>/b<block>, after the block's forward
    acts.swap_in(block, mb)              # 0SWAP_IN<mb>/b<block>, ahead of its backward
    acts.claim(block, mb)                # at 0B<mb>/b<block>, the block's backward start

Policies (accounting windows: docs/memory-accounting.md, "Activations", owner ``act:<block>:<mb>``):

- ``keep``: saved tensors stay where they are; the device ledger holds the block's saved bytes
  ``A`` from the end of its forward until autograd has released the last of them (end of B).
- ``swap_host`` (Rhu et al. 2016 vDNN; MEMO, Zhao et al. 2024): at ``swap_out`` every saved
  storage is copied into one host buffer (pinned, on a side stream, on CUDA) and the device
  copy is dropped; ``swap_in`` brings it back ahead of use.
- ``swap_nvme`` (SSDTrain, Wu et al. 2024): the same through a host staging buffer to an
  ``NvmeStore`` file written asynchronously, read back ahead of use in backward.
- ``recompute`` (Chen et al. 2016): the block runs under non-reentrant
  ``torch.utils.checkpoint`` with its RNG state preserved (so dropout masks match); the ledger
  holds the block's inputs ``I`` from F to B and the recomputed ``A`` during recompute + B.
  With ``split_backward`` (a backward walked as B, then W) the forward is replayed at the
  block's claim instead and ``A`` held until its graph goes, after W (offload.recompute
  [Note: recompute across B and W]).

[Note: what counts as an activation] Every tensor autograd saves while a wrapped block's forward
runs belongs to that block's record, except (a) views of parameter memory: those the
``param_resolver`` claims (the chunk store moves parameters, so it hands out tokens instead of
tensors) and those whose storage is a parameter or buffer of the block, re-read at each forward;
they are neither counted nor swapped, and (b) tensors that are not plain strided tensors or that
live on another device than the block's first saved tensor (left in place, not counted), and
(c) with ``shared_casts``, casts of a parameter (autocast's weight copies) that the caller
shares among its micro-batches (runtime.stage_worker [Note: one weight cast a step]): handed to
``shared_casts``, which counts each once, and left in place (moving one would free nothing).
Tensors saved outside any wrapped block (the loss) are not seen at all. A storage saved several
times (q, k and v are views of one projection) is counted and moved once; each saved view is
rebuilt with ``as_strided`` over the restored storage (same dtype, size, stride and offset).

[Note: when backward starts] ``claim`` (the program's ``B`` marker) makes the block's record
usable: a swap_nvme record's read is waited for and its copy to the device started (offload.swap
[Note: NVMe swap-in claims]), before the swap-ins the program has after that marker. An unpack
that finds its record still away brings it back on the spot (a stall, never a wrong value).

[Note: bounded NVMe writes] A swap_nvme block's host staging is held from its copy-out until
its write is waited for; the writes are waited for in staging order, by a fixed rule of the
swap actions (planner.program_swaps [Note: the swap rules], rule 4): ``swap_out`` of a
swap_nvme block first waits for the oldest until fewer than ``writes_in_flight`` (the plan's
``MemoryPolicy.swap_writes_in_flight``) remain, ``swap_in`` for all of them. So at most
``writes_in_flight`` blocks' staging exist at once whatever the disk's speed; a disk slower
than the forward stalls the forward rather than piling up host buffers.

The per-record copies, the dedupe by storage and the rebuilding of saved views live in
memtrain.offload.swap ([Note: swap buffers and the ledger] there).

[Note: copies on CPU] Without CUDA the "device" is host memory (docs/DESIGN.md, the CPU-only
path): copies are real, synchronous ``copy_`` calls into fresh buffers, so the numerics and the
ledger windows are exercised exactly; only the overlap needs a GPU (tests/gpu).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memtrain.offload.activation_records import ActivationRecords
from memtrain.offload.ledger import Ledger
from memtrain.offload.nvme import NvmeStore
from memtrain.offload.recompute import Replay
from memtrain.offload.swap import _Kept, _Packed, _Record, _State, act_owner
from memtrain.planner.plan import ActPolicy
from memtrain.planner.stats import cast_of_parameter

__all__ = ["ActivationManager", "BlockActivations", "ParamResolver", "act_owner", "param_storages"]


def param_storages(module: nn.Module) -> frozenset[int]:
    """Storages of a block's parameters and buffers, read now (the chunk store may move them):
    saves of them are not activations ([Note: what counts as an activation])."""
    ptrs = {p.untyped_storage().data_ptr() for p in module.parameters()}
    ptrs.update(b.untyped_storage().data_ptr() for b in module.buffers())
    ptrs.discard(0)
    return frozenset(ptrs)


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


class ActivationManager(ActivationRecords):
    """Per-block keep / swap_host / swap_nvme / recompute of saved activations. See module doc.
    The live records and their I/O in flight are offload.activation_records' ``ActivationRecords``."""

    def __init__(
        self,
        *,
        policies: dict[str, ActPolicy | str],
        device_ledger: Ledger,
        host_ledger: Ledger,
        nvme: NvmeStore | None = None,
        param_resolver: ParamResolver | None = None,
        writes_in_flight: int = 1,
        split_backward: bool = False,
        shared_casts: Callable[[torch.Tensor], object] | None = None,
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
        if isinstance(writes_in_flight, bool) or not isinstance(writes_in_flight, int) or writes_in_flight < 1:
            raise ValueError(
                f"writes_in_flight: must be an int >= 1 (swap_nvme blocks staged at once), got {writes_in_flight!r}"
            )
        if param_resolver is not None and not isinstance(param_resolver, ParamResolver):
            raise ValueError("param_resolver: must have pack(tensor) and unpack(token) methods (see ParamResolver)")
        self.device_ledger = device_ledger
        self.host_ledger = host_ledger
        self.nvme = nvme
        self.param_resolver = param_resolver
        self.writes_in_flight = writes_in_flight
        self.split_backward = split_backward
        """The backward is walked twice (B, then W): recompute blocks replay at their claim
        (offload.recompute [Note: recompute across B and W])."""
        self.shared_casts = shared_casts
        """Where a saved weight cast goes when the caller shares autocast's casts over a step
        ([Note: what counts as an activation] (c)); None: a cast is the block's activation."""
        self.microbatch = 0
        self._blocks: list[tuple[str, nn.Module]] = []
        self._stats: dict[str, BlockActivations] = {}
        self._init_records()  # offload.activation_records

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
        """Wait for every copy-out, NVMe write and delete in flight (swapped records come to rest)."""
        self._wait_writes(0)
        for rec in self._live_records():
            rec.finish_copy_out(wait=True)
        self._wait_deletes()

    # --- the program's swap actions (planner.program_swaps [Note: the swap rules]) --------

    def swap_out(self, block: int, mb: int) -> bool:
        """Start copying block ``block``'s saved activations of micro-batch ``mb`` out (host, or
        host then NVMe, by its policy); False when it has no record resident to move."""
        rec = self._swapped_record(block, mb)
        if rec is None or rec.state is not _State.RESIDENT:
            return False
        if rec.policy is ActPolicy.SWAP_NVME:
            self._wait_writes(self.writes_in_flight - 1)  # [Note: bounded NVMe writes]
            self._wait_deletes()  # [Note: swap files deleted in the background]
        with rec.lock:
            if rec.state is not _State.RESIDENT:
                return False
            self._stats[rec.name].swapped_data_ptrs = frozenset(s.data_ptr for s in rec.storages.values())
            rec.start_copy_out()
            if rec.policy is ActPolicy.SWAP_NVME:
                with self._lock:
                    self._staged.append(rec)
        return True

    def swap_in(self, block: int, mb: int) -> bool:
        """Start bringing block ``block``'s activations of micro-batch ``mb`` back toward the
        device (after every write still staged is waited for); False when it has no record."""
        self._poll()
        self._wait_writes(0)  # [Note: bounded NVMe writes]
        rec = self._swapped_record(block, mb)
        if rec is None or rec.state in (_State.PACKING, _State.RESIDENT, _State.FREED):
            return False  # not away
        rec.start_bring_back()
        return True

    def claim(self, block: int, mb: int) -> None:
        """Block ``block``'s backward of micro-batch ``mb`` starts: its record is made usable
        ([Note: when backward starts]), a replayed recompute's forward run again; a no-op for a
        record kept, or not coming back."""
        with self._lock:
            rec = self._records.get((block, mb))
        if rec is not None and rec.replay is not None:
            rec.rebuild()
            return
        rec = self._swapped_record(block, mb)
        if rec is not None:
            rec.advance_in(consumer=True)  # [Note: NVMe swap-in claims] (memtrain.offload.swap)

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
        param_ptrs = param_storages(module)
        stats = BlockActivations(name=name, policy=policy)
        hooks = torch.autograd.graph.saved_tensors_hooks(
            lambda t: self._pack(rec, t, param_ptrs, stats), self._unpack
        )
        if policy is ActPolicy.RECOMPUTE and self.split_backward:  # offload.recompute
            rec.replay = Replay(inner, args, kwargs)
            for t in rec.replay.inputs():
                if rec.device is None:
                    rec.device = t.device
                if t.device == rec.device and t.untyped_storage().data_ptr() not in param_ptrs:
                    rec.hold(t)
        with hooks:
            if policy is ActPolicy.RECOMPUTE and not self.split_backward:
                # Only checkpoint's saved inputs reach our pack hook; the block's own saved
                # tensors are checkpoint's placeholders, rebuilt by the recompute.
                body = self._recompute_body(rec, inner, module, stats)
                out = checkpoint(body, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
            else:
                out = inner(*args, **kwargs)
        self._end_forward(rec, stats)
        return out

    def _pack(self, rec: _Record, t: torch.Tensor, param_ptrs: frozenset[int], stats: BlockActivations):
        stats.num_saved_tensors += 1
        if rec.replay is not None:  # a replayed recompute: each save's place, for the replay
            slot, rec.num_packs = rec.num_packs, rec.num_packs + 1
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
            return _Kept(t.detach())
        if self.shared_casts is not None and cast_of_parameter(t):  # [Note: what counts as an activation] (c)
            self.shared_casts(t)
            return _Kept(t.detach())
        if rec.device is None:
            rec.device = t.device
        if t.device != rec.device or storage.nbytes() == 0:
            return _Kept(t.detach())  # swap.py [Note: saved outputs are detached]
        if rec.replay is not None:
            return rec.placeholder(slot)
        return rec.pack(t, storage)

    @staticmethod
    def _unpack(obj) -> torch.Tensor:
        if type(obj) is _Packed:
            if obj.tensor is not None:
                return obj.tensor
            return obj.record.replayed(obj.slot) if obj.slot is not None else obj.record.view(obj)
        return obj.tensor if obj.resolver is None else obj.resolver.unpack(obj.tensor)

    def _recompute_body(self, rec: _Record, inner, module: nn.Module, stats: BlockActivations):
        mgr = self

        def body(*args, **kwargs):
            if rec.state is _State.PACKING:
                return inner(*args, **kwargs)  # the original forward
            # Parameter storages are read again now: the chunk store may have moved them since
            # the forward, and an activation may sit at a freed parameter buffer's old address.
            with _CountingHooks(mgr, rec, param_storages(module)):
                return inner(*args, **kwargs)

        return body

    def _end_forward(self, rec: _Record, stats: BlockActivations) -> None:
        """The block's forward is done: open its ledger window (a swap-out is the program's)."""
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
