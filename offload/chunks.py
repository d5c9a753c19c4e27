"""Chunked model states (PatrickStar, Fang et al. 2022; ProTrain, Yang et al. 2024).

Parameters are packed in execution order into flat chunks (``MemoryPolicy.chunks``; packing
rule: ``planner.plan.pack_params``). Each chunk keeps, on its **home** tier, its fp32 master
parameters, optimizer states and fp32 gradient accumulator (offload.grads [Note: fp32 accumulators]; bytes
and owners exactly as in docs/memory-accounting.md). A chunk whose home is not the device is brought into a device
**param buffer** before a block uses it — prefetched up to ``prefetch_depth`` buffers, in forward
order and again in reverse for backward, as the pass's program says — and ``param.data`` points
into that buffer while it is resident. Gradients are copied, per parameter, by a post-accumulate-grad hook into the chunk's
device **grad buffer**; once all of a chunk's parameters have their gradient for the micro-batch
the buffer is added into the home accumulator and freed.

[Note: released parameters] A released parameter's ``.data`` is a NaN scalar expanded to the
parameter's shape: zero bytes, the right shape (autograd's AccumulateGrad checks it), and any
accidental use outside a fetched window shows up as NaN instead of silently wrong numbers.

[Note: saved views of parameters] Autograd saves parameters (and views of them, e.g. ``W.t()``)
for backward. ``ChunkStore.pack`` turns such a tensor into a ``ParamRef`` (chunk, offset, size,
stride) and ``unpack`` rebuilds the same view over the chunk's current buffer, fetching it again
if it was released; so releasing a buffer really frees it, and parameters are never swapped or
counted as activations. The activation manager installs this resolver; without it the store's
own ``saved_tensors_hooks`` do the same.

[Note: across pass ends] [Note: kept within the prefetch window] When each buffer is fetched and
released is not decided here: the engine hands each pass its program (planner.program, rules in
[Note: the residency rules]: fetch ahead to ``prefetch_depth`` buffers, keep a chunk the next
blocks use within that window, so no fetch is repeated at a forward's end or between
micro-batches), and the block hooks run it ([Note: the program's interpreter]). ``executed``
records what ran; the golden test sets it against the plan's program.

The store's pieces: this file holds the chunks' memory and residency (fetch and release: the
handlers of the program's ``PREFETCH`` and ``OFFLOAD``), the saved-view resolver and the state
reads and writes; ``chunk_hooks.py`` the block and gradient hooks that move the pass's program
along (``ChunkStore.hooks``; other mechanisms' ops join its interpreter through
``add_handlers``); ``chunk_build.py`` building the chunks and reading the parameters back;
``chunk_layout.py`` the layout rules and the records.

[Note: CPU-only fetch] Without a GPU the device tier is host memory, so copying a chunk from host
staging into its "device" buffer would be a memcpy on the cores the compute needs (12 ms per
28 MiB chunk measured on 2 shared cores, 52 fetches per step of the 100m model). There the disk
read lands in the param buffer itself, with no bounce copy either (buffers come from
``aligned_empty``; memtrain.offload.nvme_format [Note: zero-copy payload]). The staging bytes the
accounting rule takes are still reserved in the host ledger for the same window (fetch start to
the block's use), so the ledger keeps matching the simulator and stays an upper bound of the
memory really held (by ``N·c`` while a read is in flight).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from memtrain.offload.bufpool import BufferPool, keep_heap_top
from memtrain.offload.chunk_build import block_uses, fill_chunk, gather_params, lay_out, load_params
from memtrain.offload.chunk_hooks import ChunkHooks
from memtrain.offload.chunk_layout import (Chunk, ParamRef, ParamSlot, block_param_order, make_chunk_plans, named_blocks,
                                           param_order, torch_dtype)
from memtrain.offload.grads import Gradients
from memtrain.offload.ledger import Ledger
from memtrain.offload.tiers import CopyHandle, copy_async, copy_stream
from memtrain.planner.plan import Action, ChunkPlan, Op, Tier
from memtrain.planner.stats import DType

__all__ = [
    "ParamRef", "ParamSlot", "Chunk", "ChunkStore", "named_blocks", "block_param_order", "param_order", "make_chunk_plans",
    "torch_dtype",
]


class _NvmeFetch:
    """disk → host staging (``staging:<i>``) → device buffer (docs/memory-accounting.md).

    ``staging`` is None on the CPU-only path: see [Note: CPU-only fetch]."""

    def __init__(self, store: "ChunkStore", chunk: Chunk, staging: torch.Tensor | None, future) -> None:
        self.store, self.chunk, self.staging, self.future = store, chunk, staging, future

    def wait_stream(self) -> None:
        self.future.result()
        owner = f"staging:{self.chunk.index}"
        if self.staging is None:
            self.store.host_ledger.free(owner, self.chunk.num_elems * self.store.compute_dtype.itemsize)
            return
        self.store._copy(self.chunk.buf, self.staging).wait_stream()
        self.store._free(self.store.host_ledger, owner, self.staging)


class ChunkStore:
    """Owns the model's parameters as chunks; see the module doc. ``build()`` moves them in."""

    def __init__(
        self, *, model: nn.Module, blocks: Sequence[tuple[str, nn.Module]], chunks: Sequence[ChunkPlan],
        dtype: DType | str, state_names: Sequence[str], device: torch.device | str,
        device_ledger: Ledger, host_ledger: Ledger, nvme=None, prefetch_depth: int = 1,
    ) -> None:
        if prefetch_depth < 1:
            raise ValueError(f"memory.prefetch_depth: must be >= 1, got {prefetch_depth}")
        if any(c.home is Tier.NVME for c in chunks) and nvme is None:
            raise ValueError("memory.nvme: the plan puts chunks on NVMe; set memory['nvme'] to a directory")
        self.model = model
        self.blocks = list(blocks)
        self.plans = tuple(chunks)
        self.dtype = DType(dtype)
        self.compute_dtype = torch_dtype(dtype)
        self.mixed = self.dtype is not DType.FP32
        self.state_names = tuple(state_names)
        self.device = torch.device(device)
        self.device_ledger, self.host_ledger, self.nvme = device_ledger, host_ledger, nvme
        self.prefetch_depth = prefetch_depth
        self.chunks: list[Chunk] = []
        self.uses: list[tuple[int, ...]] = []
        """Per block position, the chunks holding its parameters (tied ones included)."""
        self.num_refetches = 0
        """Fetches forced by unpacking a saved view of a released chunk (a plan that releases too early)."""
        self.num_fetches = 0
        """Param-buffer fetches begun (host or NVMe to device), for the profiler's overhead fit."""
        self.microbatch = 0
        """The micro-batch the passes run (the engine sets it), for ``executed``."""
        self.executed: list[Action] = []
        """What the store did, as program actions (planner.program): each param-buffer fetch begun
        (``PREFETCH``) and release (``OFFLOAD``), each block's forward and backward start (the
        compute markers), and the swaps and optimizer's points their handlers ran (runtime.engine,
        offload.optim). The engine clears it at each ``train_step``; the golden test sets it
        against the program the planner lowers."""
        self.loose_chunks: tuple[int, ...] = ()
        """Chunks of modules outside every block ([Note: loose parameters])."""
        self.held_for_backward = False
        """The last forward kept buffers for a backward that has not come."""
        self.placeholder: torch.Tensor | None = None
        """The NaN scalar a released parameter's ``.data`` expands ([Note: released parameters])."""
        self._by_ptr: dict[int, int] = {}
        self._built = False
        self.on_backward_block = None
        """Called at each block's backward start, after its fetches began and before the
        optimizer's points there run (the activation manager's claim and swap-ins: runtime.engine)."""
        self.fetch_carried = None
        """Asked at each nvme fetch (chunk, buffer): a copy from host, or None (offload.optim [Note: fetch from a write-back])."""
        self.hooks = ChunkHooks(self)
        """The block and gradient hooks and the pass they run (offload.chunk_hooks)."""
        self.runner = self.hooks.runner
        """The pass's program interpreter (offload.program_runner): one handler per op."""
        self.grads = Gradients(self, asynchronous=self.device.type == "cuda")
        """The chunks' gradient accumulators (offload.grads)."""
        # [Note: why pool CPU buffers] (offload.bufpool): per ledger whose memory is plain CPU RAM.
        # Page-aligned CPU buffers for the ledgers whose tier is plain CPU memory: on a CPU device
        # both tiers, one pool, since they are the same memory (offload.bufpool); on CUDA none
        # (device memory and pinned host memory have caching allocators of their own).
        pool = BufferPool() if self.device.type == "cpu" else None
        if pool is not None:
            keep_heap_top()  # torch's own CPU allocations: offload.bufpool [Note: the C heap's top]
        self.pools = {} if pool is None else {id(host_ledger): pool, id(device_ledger): pool}

    # --- memory helpers (a thin stand-in for offload.tiers: tensor + ledger entry) ----------

    def _alloc(self, ledger: Ledger, owner: str, numel: int, dtype: torch.dtype, *, zero: bool = False,
               upload: bool = False) -> torch.Tensor:
        pool = self.pools.get(id(ledger))
        if pool is not None:
            # Page-aligned, so the NVMe store moves it without a bounce copy ([Note: CPU-only fetch]),
            # and reused (offload.bufpool [Note: why pool CPU buffers]); given back if the ledger refuses it.
            t = pool.take(numel, dtype)
            try:
                ledger.alloc(owner, numel * dtype.itemsize)
            except BaseException:
                pool.give(t)
                raise
            return t.zero_() if zero else t
        ledger.alloc(owner, numel * dtype.itemsize)
        on_host = ledger is self.host_ledger
        dev = torch.device("cpu") if on_host else self.device
        pin = on_host and self.device.type == "cuda"
        make = torch.zeros if zero else torch.empty
        if on_host or not upload or self.device.type != "cuda":
            return make(numel, dtype=dtype, device=dev, pin_memory=pin)
        with torch.cuda.stream(copy_stream(self.device, "h2d")):  # uploads land here: see _copy
            return make(numel, dtype=dtype, device=dev)

    def _free(self, ledger: Ledger, owner: str, t: torch.Tensor, *, reuse: bool = True) -> None:
        """Give back ``t``'s bytes; ``reuse``: the caller is done with the tensor (False when it
        was passed on and the new holder frees it later)."""
        ledger.free(owner, t.numel() * t.element_size())
        if reuse:  # the pool that handed it out takes it back (a passed-on buffer changes ledger)
            for pool in self.pools.values():
                if pool.owns(t):
                    pool.give(t)
                    break

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> CopyHandle:
        """Host→device upload; on CUDA on the h2d side stream, where ``dst`` was allocated
        (offload.tiers [Note: copy streams]); ``wait_stream()`` orders the compute stream after it."""
        return copy_async(dst, src, after_current=False)

    def nvme_key(self, chunk: Chunk, part: str) -> str:
        return f"chunk:{chunk.index}:{part}"

    # --- build ----------------------------------------------------------------------------

    def build(self) -> "ChunkStore":
        """Copy the parameters into their chunks, point them at device memory, install hooks."""
        assert not self._built
        layout, placed = lay_out(self.model, self.plans)
        self.placeholder = torch.full((), math.nan, dtype=self.compute_dtype, device=self.device)
        for chunk in layout:  # the plan is valid: only now move the parameters
            fill_chunk(self, chunk)
            self.chunks.append(chunk)
        for mod in self.model.modules():  # buffers (not model states) just move to the device
            for k, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[k] = b.to(self.device)
        self.uses, loose = block_uses(self.model, self.blocks, placed)
        self.loose_chunks = tuple(sorted({ci for _, cs in loose for ci in cs}))
        self.hooks.install(loose)
        self._built = True
        return self

    # --- residency ------------------------------------------------------------------------

    def _start(self, c: Chunk) -> None:
        """Begin fetching ``c`` into a device param buffer (no-op when resident or in flight)."""
        if c.home is Tier.DEVICE or c.buf is not None:
            return
        c.buf = self._alloc(self.device_ledger, f"buffer:param:{c.index}", c.num_elems, self.compute_dtype, upload=True)
        self.num_fetches += 1
        self.executed.append(Action(0, Op.PREFETCH, self.microbatch, c.index))
        if c.home is Tier.HOST:
            c.fetch = self._copy(c.buf, c.compute if self.mixed else c.master)
        else:
            c.fetch = self.fetch_carried(c, c.buf) if self.fetch_carried is not None else None
            if c.fetch is not None:
                return
            key = self.nvme_key(c, "compute" if self.mixed else "master")
            if self.device.type == "cpu":  # [Note: CPU-only fetch]
                self.host_ledger.alloc(f"staging:{c.index}", c.num_elems * self.compute_dtype.itemsize)
                c.fetch = _NvmeFetch(self, c, None, self.nvme.read(key, c.buf))
                return
            staging = self._alloc(self.host_ledger, f"staging:{c.index}", c.num_elems, self.compute_dtype)
            c.fetch = _NvmeFetch(self, c, staging, self.nvme.read(key, staging))

    def _ensure(self, c: Chunk) -> torch.Tensor:
        """Make ``c`` resident (waiting for its fetch) and point its parameters into it."""
        if c.home is Tier.DEVICE:
            return c.compute
        if c.buf is None:
            self._start(c)
        if c.fetch is not None:
            c.fetch.wait_stream()
            c.fetch = None
            self._by_ptr[c.buf.untyped_storage().data_ptr()] = c.index
            for s in c.slots:
                s.param.data = c.buf[s.offset:s.offset + s.numel].view(s.shape)
        return c.buf

    def _release(self, c: Chunk, *, reuse: bool = True) -> None:
        if c.home is Tier.DEVICE or c.buf is None:
            return
        if c.fetch is not None:
            c.fetch.wait_stream()
            c.fetch = None
        self._by_ptr.pop(c.buf.untyped_storage().data_ptr(), None)
        for s in c.slots:
            s.param.data = self.placeholder.expand(s.shape)  # [Note: released parameters]
        self._free(self.device_ledger, f"buffer:param:{c.index}", c.buf, reuse=reuse)
        c.buf = None
        self.executed.append(Action(0, Op.OFFLOAD, self.microbatch, c.index))

    def release_all(self) -> None:
        """Release every param buffer (chunks kept across a pass end that no pass used)."""
        for c in self.chunks:
            self._release(c)
        self.held_for_backward = False

    @property
    def resident_chunks(self) -> tuple[int, ...]:
        """Chunks with a param buffer now (what the next pass's program starts from)."""
        return tuple(c.index for c in self.chunks if c.buf is not None)

    # --- the resolver protocol ([Note: saved views of parameters]) -------------------------

    def pack(self, t: torch.Tensor) -> ParamRef | None:
        try:
            ci = self._by_ptr.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):
            return None
        if ci is None:
            return None
        mem = self.chunks[ci].memory
        if mem is None or t.dtype != mem.dtype or t.device != mem.device:
            return None
        return ParamRef(ci, t.storage_offset() - mem.storage_offset(), tuple(t.shape), tuple(t.stride()))

    def unpack(self, ref: ParamRef) -> torch.Tensor:
        c = self.chunks[ref.chunk]
        if c.home is not Tier.DEVICE and (c.buf is None or c.fetch is not None):
            self.num_refetches += c.buf is None
        mem = self._ensure(c)
        return mem.as_strided(ref.size, ref.stride, mem.storage_offset() + ref.offset)

    def saved_tensors_hooks(self):
        """Hooks that keep parameter views out of autograd's saved tensors (no activation manager)."""
        def pack(t):
            ref = self.pack(t)
            return t if ref is None else ref

        def unpack(x):
            return self.unpack(x) if isinstance(x, ParamRef) else x

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    # --- passes ---------------------------------------------------------------------------

    def begin_forward(self, program: Sequence[Action] = ()) -> None:
        """A forward starts; ``program``: its actions (planner.program ``lower_forward``)."""
        self.hooks.begin_forward(program)

    def begin_backward(self, program: Sequence[Action] = ()) -> None:
        """A backward starts; ``program``: its actions (planner.program ``lower_backward``, with
        the swaps of planner.program_swaps and the optimizer's points of planner.program_optim)."""
        self.hooks.begin_backward(program)

    def end_backward(self) -> None:
        """Flush grad buffers of chunks whose parameters did not all get gradients; run the rest
        of the pass's program (the releases at its end; a first block's input carries no gradient,
        so its releases come here too)."""
        self.hooks.end_backward()

    def add_handlers(self, handlers: Mapping[Op, Callable[[Action], None]]) -> None:
        """Handlers for more of the program's ops (another mechanism's: the optimizer's points,
        activation swaps), run by the pass's interpreter like the store's own; one per op."""
        taken = sorted(op.value for op in handlers if op in self.runner.handlers)
        if taken:
            raise RuntimeError(f"program: op {', '.join(taken)} has a handler already; each op has one")
        self.runner.handlers.update(handlers)

    # --- state reads and writes -----------------------------------------------------------

    def refresh_compute(self, c: Chunk) -> None:
        """After the optimizer updated ``c.master``: refresh the compute copy (mixed precision)."""
        if self.mixed and c.home is not Tier.NVME:
            c.compute.copy_(c.master)

    def param_order(self) -> list[str]:
        """Parameter names in ``model.parameters()`` order (torch optimizers' state indices)."""
        return [n for n, _ in self.model.named_parameters()]

    def _read(self, c: Chunk, part: str) -> torch.Tensor:
        if c.home is not Tier.NVME:
            t = c.master if part == "master" else c.states[part]
            return t.detach().to("cpu", copy=True)
        out = torch.empty(c.num_elems, dtype=torch.float32)
        self.nvme.read(self.nvme_key(c, part), out).result()
        return out

    def _write(self, c: Chunk, part: str, flat: torch.Tensor) -> None:
        if c.home is not Tier.NVME:
            (c.master if part == "master" else c.states[part]).copy_(flat)
            if part == "master":
                self.refresh_compute(c)
            return
        self.nvme.write(self.nvme_key(c, part), flat).result()
        if part == "master" and self.mixed:
            self.nvme.write(self.nvme_key(c, "compute"), flat.to(self.compute_dtype)).result()

    def gather_params(self) -> dict[str, torch.Tensor]:
        """fp32 master parameters by name, on the CPU, whichever tier holds them."""
        return gather_params(self)

    def load_params(self, params: Mapping[str, torch.Tensor]) -> None:
        """Replace every chunk's master parameters with ``params`` (by name; all of them)."""
        load_params(self, params)

    def close(self) -> None:
        """Remove hooks, drop buffers, delete the chunk files."""
        try:
            self.grads.drain(errors=False)
        finally:
            self.hooks.uninstall()
            for pool in self.pools.values():
                pool.clear()
            if self.nvme is not None:
                for c in self.chunks:
                    if c.home is Tier.NVME:
                        for part in ("master", "compute", *self.state_names):
                            if self.nvme_key(c, part) in self.nvme:
                                self.nvme.delete(self.nvme_key(c, part))
