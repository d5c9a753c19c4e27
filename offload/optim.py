"""The offloaded optimizer: every chunk stepped where its states live, by its optimizer's kernels.

A chunk's home (``ChunkPlan.home``) decides where its step runs (ZeRO-Offload, Ren et al. 2021,
Sec. 4: the optimizer step follows the optimizer states): device chunks on the device, over
their flat tensors; host chunks on the CPU, over their flat fp32 master, gradient accumulator
and states; nvme chunks streamed, their master and states read into host staging
(offload.staging), stepped on the CPU and written back while the next chunk is read. What an
optimizer keeps and how it updates comes from its descriptor (``memtrain.optimizers``): torch's
own arithmetic on flat buffers, which is the arithmetic on each parameter, so results equal
``torch.optim`` on the model's parameters. The notes below give each rule of the step's
overlap with the backward and the disk; docs/optimizer.md tells how each was measured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from memtrain.errors import UserError
from memtrain.offload.clip import GradClip
from memtrain.offload.staging import Deferred, Staged, WriteBack, read_ahead_states, read_states, reserve_rewrite, write_states
from memtrain.optimizers import (
    DEFAULT_HOST_KERNEL, KERNELS as HOST_KERNELS, OptimizerKind, OptimizerSpec, adamw_step, host_adamw_step,
    measure_host_adamw, sgd_step,
)
from memtrain.planner.plan import Action, Op, Tier

if TYPE_CHECKING:
    from memtrain.offload.chunks import Chunk, ChunkStore
    from memtrain.offload.tiers import CopyHandle

__all__ = [  # the optimizer's kernels and hyper-parameters are memtrain.optimizers', re-exported
    "OptimizerSpec", "HOST_KERNELS", "DEFAULT_HOST_KERNEL", "adamw_step", "host_adamw_step", "sgd_step",
    "measure_host_adamw", "OffloadedOptimizer",
]


# --- nvme streaming and per-parameter state (over a ChunkStore's chunks) --------------------


def _gather_states(store: "ChunkStore", kind: OptimizerKind) -> dict[str, dict[str, torch.Tensor]]:
    """Optimizer state per parameter name, in torch's per-parameter format."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for c in store.chunks:
        if c.step.item() == 0 or not store.state_names:
            continue
        flats = {k: store._read(c, k) for k in store.state_names}
        for s in c.slots:
            entry = {k: f[s.offset:s.offset + s.numel].view(s.shape).clone() for k, f in flats.items()}
            if kind.counts_steps:
                entry["step"] = c.step.clone()
            out[s.name] = entry
    return out


def _load_states(store: "ChunkStore", states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    for c in store.chunks:
        present = [s.name for s in c.slots if s.name in states]
        if not present:
            continue
        if len(present) != len(c.slots):
            raise ValueError(f"optimizer state: {c.slots[0].name!r} and the parameters chunked with it must all have state or none")
        steps = {float(states[s.name].get("step", torch.tensor(1.0))) for s in c.slots}
        if len(steps) != 1:
            raise ValueError(f"optimizer state: parameters of chunk {c.index} have different step counts {sorted(steps)}")
        for k in store.state_names:
            flat = torch.empty(c.num_elems, dtype=torch.float32)
            for s in c.slots:
                flat[s.offset:s.offset + s.numel].copy_(states[s.name][k].reshape(-1))
            store._write(c, k, flat)
        c.step.fill_(steps.pop())


# [Note: parameter groups] torch's param groups give parameters their own lr and weight decay
# (the Hugging Face Trainer's default: no decay for biases and norms). A chunk packs parameters
# of several groups, so a chunk's update runs once per stretch of consecutive slots of one group,
# on views of its flat master, gradient and states, with that group's values; every stretch
# advances its own copy of the chunk's step count, all to the same value. AdamW's and SGD's
# updates are elementwise, so each element gets torch's arithmetic with its group's values.
# A chunk of one group updates whole, as without groups.


def _group_runs(store: "ChunkStore", spec: OptimizerSpec) -> dict[int, list[tuple[int, int, int]]]:
    """Per chunk, its stretches ``(start, end, group)`` covering the flat buffer (padding goes with
    the stretch before it); a group names an unknown parameter or misses one: a ``UserError``."""
    group_of: dict[str, int] = {}
    for gi, g in enumerate(spec.param_groups):
        for name in g.params:
            group_of[name] = gi
    if spec.param_groups:
        names = {s.name for c in store.chunks for s in c.slots}
        unknown = next((n for n in group_of if n not in names), None)
        if unknown is not None:
            raise UserError(f"optimizer.param_groups: {unknown!r} is not a trainable parameter of the model "
                            f"(names as model.named_parameters() gives them)")
        missing = next((n for n in store.param_order() if n in names and n not in group_of), None)
        if missing is not None:
            raise UserError(f"optimizer.param_groups: parameter {missing!r} is in no group; put every trainable "
                            "parameter in one group")
    out: dict[int, list[tuple[int, int, int]]] = {}
    for c in store.chunks:
        runs: list[tuple[int, int, int]] = []
        for s in sorted(c.slots, key=lambda s: s.offset):
            gi = group_of.get(s.name, 0)
            if not runs or runs[-1][2] != gi:
                runs.append((0 if not runs else s.offset, 0, gi))
        ends = [r[0] for r in runs[1:]] + [c.num_elems]
        out[c.index] = [(lo, hi, gi) for (lo, _, gi), hi in zip(runs, ends)] or [(0, c.num_elems, 0)]
    return out


# --- the optimizer over a ChunkStore -----------------------------------------------------


class OffloadedOptimizer:
    """Steps every chunk of a ``ChunkStore`` where its states live (see the module doc)."""

    # [Note: host kernel choice] Host and NVMe chunks default to torch's fused CPU kernel
    # (memtrain.optimizers.DEFAULT_HOST_KERNEL): several times faster than the single-tensor and
    # foreach kernels on a large flat chunk, and within one ulp per step of them, since it orders
    # the AdamW arithmetic differently. ``host_kernel="foreach"`` gives results bitwise equal to
    # ``torch.optim.AdamW``. Device chunks use what torch uses by default on that device
    # (single-tensor on a CPU, foreach on CUDA), so the all-on-device case is bitwise plain PyTorch.
    # An optimizer without the kernel asked for runs its own (``OptimizerKind.kernel``).

    def __init__(self, store: "ChunkStore", spec: OptimizerSpec, *, host_kernel: str = DEFAULT_HOST_KERNEL,
                 staged_chunks: int = 3, max_grad_norm: float | None = None, clip_order: str = "model") -> None:
        if host_kernel not in HOST_KERNELS:
            raise UserError(f"host_kernel: must be one of {', '.join(HOST_KERNELS)}, got {host_kernel!r}")
        if tuple(store.state_names) != spec.state_names:
            raise ValueError(
                f"optimizer.name: the chunk store holds states {store.state_names} but the optimizer "
                f"{spec.name!r} needs {spec.state_names}; build both with the same optimizer"
            )
        self.store = store
        self.spec = spec
        self.kind: OptimizerKind = spec.kind
        """The optimizer's descriptor: its states, update kernels and state-dict format."""
        self.host_kernel = host_kernel
        # torch's default kernel on the device ([Note: host kernel choice]).
        self.device_kernel = "foreach" if store.device.type == "cuda" else "single"
        self.num_steps = 0
        """Optimizer steps taken (skipped fp16 overflow steps not counted)."""
        self.num_unplanned = 0
        """Chunk updates the step's end ran without a point of the program (see ``step``)."""
        if staged_chunks < 1:
            raise ValueError(f"staged_chunks: must be >= 1, got {staged_chunks}")
        self.staged_chunks = staged_chunks
        """``MemoryPolicy.optim_staged_chunks``, which the program's points are lowered with
        (planner.program_optim); the optimizer itself waits only where the program says."""
        self.inline = store.device.type == "cpu"
        """Early updates run on the training thread ([Note: where early updates run])."""
        self._worker: ThreadPoolExecutor | None = None
        self._early: dict[int, Future | Deferred] = {}  # chunk index -> its queued update
        self._writing: dict[int, Future | Deferred] = {}  # nvme early steps (-> WriteBack) whose staging is held
        self._ahead: dict[int, Staged] = {}  # chunk index -> its states read ahead ([Note: states read ahead])
        self._inv_scale = 1.0  # set by step() for its duration ([Note: unscaling in fp32])
        self._behind: list[WriteBack] = []  # write-backs carried over the step end
        self.clip = GradClip(max_grad_norm, clip_order)
        """The step's gradient norm, and its clipping when ``max_grad_norm`` is set (offload.clip);
        without it host and nvme chunks update early ([Note: early optimizer step])."""
        self._runs = _group_runs(store, spec)  # [Note: parameter groups]

    @property
    def num_early(self) -> int:
        """Chunks queued by ``update`` since the last ``step()``."""
        return len(self._early)

    @property
    def staging(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """The nvme chunks holding host staging now: states read ahead, this step's write-backs
        not waited for, carried write-backs (oldest first), and the chunks updated early this
        step. The next pass's points are lowered from them (planner.program_optim ``Staging``)."""
        return tuple(self._ahead), tuple(self._writing), tuple(self.carried_chunks), tuple(self._early)

    def handlers(self) -> dict[Op, Callable[[Action], None]]:
        """The program's optimizer points (planner.program_optim), for the chunk store's
        interpreter: each runs this optimizer's mechanism on its chunk and is recorded in
        ``store.executed``."""
        store = self.store

        def run(fn):
            def handler(a: Action) -> None:
                store.executed.append(a)
                fn(store.chunks[a.chunk])
            return handler
        return {Op.OPTIM_READ: run(self.read_ahead), Op.OPTIM_WAIT: run(self.wait_write_back),
                Op.OPTIM: run(lambda c: self.update(c, store.hooks.master_for_update(c)))}

    # [Note: early optimizer step] As in ZeRO-Offload (Ren et al. 2021), a host or nvme chunk's
    # update starts as soon as its gradients for the step are complete, so the update and its
    # NVMe traffic overlap the rest of the backward: the last backward's program has an
    # ``OPTIM<mb>@c<i>`` where chunk i's gradients complete (planner.program_optim [Note: the
    # optimizer's points]), and ``update`` queues it there. Updates run one at a time in program
    # order, with the same kernels on the same buffers, so results are bitwise those of
    # ``step()``. An nvme chunk's states are read into host staging at that point of the training
    # thread, after the ``OPTIM_WAIT``s the program puts before it (each frees a write-back's
    # staging, so at most ``staged_chunks`` are staged), so host windows begin and end at points
    # of the program (docs/memory-accounting.md). ``step()`` then steps the chunks not stepped
    # early (device chunks, and all of them under fp16 loss scaling, which needs every gradient to
    # decide to skip or unscale: the program has no early updates then) and waits for the rest.
    #
    # [Note: where early updates run] On a GPU the updates run on one background thread, alive
    # from the step's first early update to the end of ``step()``, overlapping the device's
    # compute. On a CPU device (``inline``) compute and updates share the cores, and a live
    # thread that has run torch kernels slows the training thread's own kernels for as long as
    # it exists, which costs more than the overlap gains. So there a host chunk's update runs on
    # the training thread in ``update``; an nvme chunk's states read is started there (on the
    # NVMe store's I/O threads, which run no torch kernels) and its update runs at the next
    # ``update`` call, after the next chunk's read has started, or in ``step()``: one chunk
    # of lag, so the read overlaps a block's backward.
    #
    # [Note: master from the param buffer] Without mixed precision the param buffer an nvme chunk
    # was fetched into for the backward holds exactly its fp32 master (read from the ``master``
    # file, never written since). The store hands that buffer to ``update`` before releasing it
    # (``ChunkHooks.master_for_update``), so the update reads only the states from disk (4·N bytes less per chunk and step). On a
    # CPU device the buffer itself becomes the master's staging (zero-copy: the device ledger
    # frees it as the host ledger takes it, as the simulator books it); on CUDA it is copied into
    # host staging first.
    #
    # [Note: rewrite window] Rewriting a file holds its old and new copy on disk until the
    # rename, a window that depends on the disk's timing. For an early update the second copy of
    # the chunk's files is reserved on the NVMe ledger when the update is queued and freed when
    # the training thread waits for the write-back (the writes take no reservation of their own),
    # so the ledger's peak is a point of the program, the one the simulator books
    # (planner.simulate_optim ``_rewrite``), and an upper bound of what the disk holds.

    def update(self, chunk: "Chunk", master: torch.Tensor | None = None) -> None:
        """Queue ``chunk``'s update now, its gradients for this step complete (an ``OPTIM`` action:
        [Note: early optimizer step]); nothing to do without gradients. ``master``: an nvme chunk's
        fp32 parameters still in its param buffer ([Note: master from the param buffer])."""
        if chunk.home is Tier.DEVICE or chunk.index in self._early or not chunk.has_grad:
            return
        if self.inline and chunk.home is Tier.HOST:
            self._early[chunk.index] = update = Deferred(self._step_resident, chunk)
            update.result()
            return
        if self._worker is None and not self.inline:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="memtrain-optim")
        if chunk.home is Tier.HOST:
            self._early[chunk.index] = self._worker.submit(self._step_resident, chunk)
            return
        if chunk.index in self.carried_chunks:  # its staging would go stale: the program waits first
            raise RuntimeError(f"program: chunk {chunk.index}'s update comes before its carried write-back is waited for")
        staged = read_states(self.store, chunk, master, staged=self._ahead.pop(chunk.index, None))
        rewrite = None if self.store.nvme.compress else reserve_rewrite(self.store, chunk, staged.tensors)
        if self.inline:  # the updates queued before this one run now, this chunk's read under way
            for earlier in self._writing.values():
                if earlier.pending:
                    earlier.result()
            update: Future | Deferred = Deferred(self._step_staged, chunk, staged, rewrite)
        else:
            update = self._worker.submit(self._step_staged, chunk, staged, rewrite)
        self._early[chunk.index] = update
        self._writing[chunk.index] = update

    # [Note: states read ahead] Left to the updates, every states read would fall in the last
    # backward, which already carries every write-back, while the disk idles through the
    # compute-bound backwards before it. So the program reads some nvme chunks' states ahead, at
    # backward blocks' starts (after the block's own fetches are queued), while fewer than
    # ``planner.cost.optim_read_ahead_slots(staged_chunks)`` are read ahead and fewer than
    # ``staged_chunks`` are staged in all, in the order of their first forward use, the reverse of
    # the order their gradients complete: the last updates, which nothing is left to overlap, get
    # their states first (planner.program_optim [Note: the optimizer's points]). ``read_ahead``
    # starts the read, at background priority; ``update`` then reads only the master.

    def read_ahead(self, chunk: "Chunk") -> None:
        """[Note: states read ahead] Start reading ``chunk``'s states into host staging (an
        ``OPTIM_READ`` action)."""
        if chunk.index not in self._ahead and chunk.index not in self._early:
            self._ahead[chunk.index] = read_ahead_states(self.store, chunk)

    def wait_write_back(self, chunk: "Chunk") -> None:
        """Wait for ``chunk``'s write-back, carried from the last step or this step's, freeing its
        staging (an ``OPTIM_WAIT`` action); nothing to wait for when it has none in flight."""
        if self._release_carried(chunk.index):
            return
        update = self._writing.pop(chunk.index, None)
        if update is not None:
            update.result().wait()

    # [Note: carried write-backs released lazily] A write-back carried into the next step
    # ([Note: write-backs across the step end]) holds its staging until the training thread
    # waits for it, which it does only where the program says (``OPTIM_WAIT``: when a staging
    # slot is needed for a read ahead or an update, the oldest carried write-back's before this
    # step's own, or before the chunk's next update, planner.program_optim) or in ``step()``
    # before it streams the chunks that had no early update: a staging left behind then would
    # hold the old parameters, and the next fetch would copy them. Until then its chunk's
    # fetches, in the first backward too, copy from that staging; waiting for them all at the
    # next backward's start would stall it behind writes still running. The simulator waits at
    # the same actions (planner.simulate_optim ``_release_carried``); ``planner.bounds.stream_work_s``,
    # which cannot tell how long a write-back stays, counts no disk read for those chunks'
    # fetches (a lower bound).

    def _release_carried(self, index: int | None = None) -> bool:
        """[Note: carried write-backs released lazily] Wait for chunk ``index``'s carried
        write-back (None: the oldest), freeing its staging; False when there is none."""
        for pos, w in enumerate(self._behind):
            if index is None or w.index == index:
                del self._behind[pos]
                w.wait()
                return True
        return False

    def _drop_ahead(self) -> None:
        """Free the staging of states read ahead but not used (chunks that got no gradient)."""
        for i, staged in self._ahead.items():
            staged.wait()
            staged.free(self.store, i)
        self._ahead.clear()

    def _step_resident(self, chunk: "Chunk") -> None:
        self._update(chunk, chunk.master, chunk.grad, chunk.states)
        self.store.refresh_compute(chunk)

    def _step_staged(self, chunk: "Chunk", staged: Staged, rewrite: str | None = None) -> WriteBack:
        tensors = staged.wait()
        self._update(chunk, tensors["master"], chunk.grad, tensors)
        if "compute" in tensors:
            tensors["compute"].copy_(tensors["master"])
        return write_states(self.store, chunk, staged, rewrite)

    # [Note: write-backs across the step end] ``step()`` waits for the updates only: the
    # write-backs of the last ``staged_chunks`` chunks run on into the next step, overlapping its
    # fetches, instead of ending the step with a tail of writes alone on the disk. The store runs
    # a read after a write of the same key, so any read sees the new file; a fetch of those
    # chunks copies from the staging instead ([Note: fetch from a write-back]), and they are
    # waited for as [Note: carried write-backs released lazily] says. Anything that reads or
    # replaces states (``Engine.state_dict``, ``load_state_dict``, ``close``) waits for all of
    # them first (``flush()``). The simulator's step begins with those writes (the same chunks
    # every step, ``planner.program_optim.steady_carried``; planner.simulate_optim ``_carry_in``).

    def _wait_early(self, *, carry: bool = False) -> None:
        """Wait for every queued update and write-back (errors surface here), in queue order.
        ``carry``: the write-backs are left running ([Note: write-backs across the step end])."""
        try:
            for fut in self._early.values():
                fut.result()
            if carry:
                self._behind.extend(w.result() for w in self._writing.values())
                self._writing.clear()
            for update in list(self._writing.values()):
                update.result().wait()
        finally:
            self._early.clear()
            self._writing.clear()
            if self._worker is not None:  # [Note: where early updates run] one thread per step
                self._worker.shutdown(wait=True)
                self._worker = None

    @property
    def carried_chunks(self) -> list[int]:
        """Chunks whose write-backs the last step left running ([Note: write-backs across the
        step end]), in the order they were queued."""
        return [w.index for w in self._behind]

    # [Note: fetch from a write-back] The carried write-backs are of the last updates, the chunks
    # the next forward fetches first, and a read of a file waits for its write (per-key order):
    # the forward would stand behind the writes and then read back bytes still in host memory.
    # So while a write-back is carried, ``fetch_carried`` (the store's hook, asked at each nvme
    # fetch) fills the param buffer from the write-back's staging (``compute`` under mixed
    # precision, else ``master``): a memcpy on a CPU device, an h2d copy on CUDA. The copy takes
    # no staging of its own, and the write-back waits for it before freeing its staging. The
    # simulator does the same for fetches of the chunks carried into its step (``steady_carried``)
    # not yet released (planner.simulate_builder ``_start``).

    def fetch_carried(self, chunk: "Chunk", dst: torch.Tensor) -> "CopyHandle | None":
        """[Note: fetch from a write-back] Copy ``chunk``'s params into ``dst`` from the staging of
        its carried write-back; None when it has none."""
        for w in self._behind:
            if w.index == chunk.index:
                handle = self.store._copy(dst, w.staged.tensors["compute" if self.store.mixed else "master"])
                w.readers.append(handle.detached())  # the fetch owns dst; the write-back only waits
                return handle
        return None

    def flush(self) -> None:
        """Wait for the write-backs carried over from the last step ([Note: write-backs across
        the step end]); their host staging goes."""
        while self._behind:
            self._behind.pop(0).wait()

    def close(self) -> None:
        """Wait for queued work and stop the background thread."""
        try:
            self._wait_early()  # shuts the thread down too
        finally:
            try:
                self.flush()
            finally:
                self._drop_ahead()

    # [Note: unscaling in fp32] fp16 loss scaling divides the gradients by the scale before the
    # update. Unscaled in fp16, any gradient below fp16's smallest subnormal (about 6e-8) times
    # the scale would become 0 and those below 6e-5 times it would lose precision (torch's
    # GradScaler refuses to unscale fp16 gradients for that reason). ``step(inv_scale)``
    # multiplies each chunk's gradient in ``_update``, in its fp32 accumulator (every tier's,
    # offload.grads [Note: fp32 accumulators]).

    def _update(self, chunk: "Chunk", master: torch.Tensor, grad: torch.Tensor, states: dict[str, torch.Tensor]) -> None:
        kernel = self.device_kernel if chunk.home is Tier.DEVICE else self.host_kernel
        self.store.grads.wait(chunk)  # offload.grads [Note: asynchronous gradient flush]
        assert grad.dtype == master.dtype == torch.float32, (grad.dtype, master.dtype)  # offload.grads [Note: fp32 accumulators]
        if self._inv_scale != 1.0:  # [Note: unscaling in fp32]
            grad.mul_(self._inv_scale)
        if self.clip.coef is not None:  # offload.clip [Note: the norm of the chunks]
            grad.mul_(self.clip.coef.to(grad.device))
        kernel = self.kind.kernel(kernel)
        specs = self.spec.group_specs()
        runs = self._runs[chunk.index]
        if len(runs) == 1:  # one group: the whole flat chunk at once
            self.kind.update(master, grad, states, chunk.step, specs[runs[0][2]], kernel)
            return
        for lo, hi, gi in runs:  # [Note: parameter groups]
            step = chunk.step.clone()
            views = {k: v[lo:hi] for k, v in states.items()}
            self.kind.update(master[lo:hi], grad[lo:hi], views, step, specs[gi], kernel)
        chunk.step.copy_(step)

    @property
    def max_grad_norm(self) -> float | None:
        """The global norm the step clips the gradients to; None: no clipping."""
        return self.clip.max_norm

    def grad_norm(self, inv_scale: float = 1.0) -> torch.Tensor:
        """The global 2-norm of this step's gradients, as ``torch.nn.utils.clip_grad_norm_``
        returns it (offload.clip [Note: the norm of the chunks]); computed once per step, after
        the last backward, and the value the step clips with. ``inv_scale``: fp16 loss scaling's
        1 / scale, applied to every gradient first ([Note: unscaling in fp32])."""
        return self.clip.norm(self.store, [n for g in self._group_names() for n in g], inv_scale)

    def step(self, points: Sequence[Action] = (), inv_scale: float = 1.0) -> None:
        """Run the step's end, ``points`` (planner.program_optim [Note: the step's end]: the
        updates that did not run early, each recorded in ``store.executed``), wait for the early
        updates, then clear the gradients. A chunk with gradients that neither updated early nor
        has its point (a pass that left the program) is updated after them, in chunk order, and
        counted in ``num_unplanned``.

        ``inv_scale``: fp16 loss scaling's 1 / scale, applied to each gradient in the master
        dtype ([Note: unscaling in fp32]); no update may have run early then."""
        store = self.store
        store.grads.finish()
        if inv_scale != 1.0 and self._early:
            raise RuntimeError("OffloadedOptimizer.step: early updates ran on scaled gradients")
        if self.max_grad_norm is not None and self._early:  # offload.clip: every gradient before any update
            raise RuntimeError("OffloadedOptimizer.step: early updates ran before the gradients were clipped")
        self.clip.start(store, [n for g in self._group_names() for n in g], inv_scale)
        self._inv_scale = 1.0 if self.clip.unscaled else inv_scale  # the norm unscaled them already
        try:
            self._run_end(points)
        finally:
            self._inv_scale = 1.0
            self.clip.reset()

    def _run_end(self, points: Sequence[Action]) -> None:
        store = self.store
        done = set(self._early)
        staged: dict[int, Staged] = {}  # nvme chunks' states read for their update
        writing: dict[int, WriteBack] = {}  # their write-backs, until their OPTIM_WAIT
        try:
            try:
                for a in points:
                    if a.chunk is None:  # the step's own OPTIM: what follows
                        continue
                    chunk = store.chunks[a.chunk]
                    if a.op is Op.OPTIM_READ:
                        # [Note: carried write-backs released lazily]: a carried staging would go stale
                        self._release_carried(chunk.index)
                        staged[chunk.index] = read_states(store, chunk, staged=self._ahead.pop(chunk.index, None))
                    elif a.op is Op.OPTIM_WAIT:
                        writing.pop(chunk.index).wait()
                    elif a.op is Op.OPTIM:
                        if not chunk.has_grad:  # no gradient this step: nothing to update
                            unused = staged.pop(chunk.index, None)
                            if unused is not None:
                                unused.wait()
                                unused.free(store, chunk.index)
                            continue
                        done.add(chunk.index)
                        if chunk.index in staged:
                            writing[chunk.index] = self._step_staged(chunk, staged.pop(chunk.index))
                        else:
                            self._step_resident(chunk)
                    else:
                        raise RuntimeError(f"program: the optimizer's step end cannot run {a}")
                    store.executed.append(a)
            finally:
                for w in writing.values():
                    w.wait()
                for i, st in staged.items():
                    st.wait()
                    st.free(store, i)
                self._wait_early(carry=True)
            missed = [c for c in store.chunks if c.has_grad and c.index not in done]
            self.num_unplanned += len(missed)
            for chunk in missed:
                if chunk.home is not Tier.NVME:
                    self._step_resident(chunk)
            nvme = [c for c in missed if c.home is Tier.NVME]
            for chunk in nvme:  # [Note: carried write-backs released lazily]
                self._release_carried(chunk.index)
            self._step_nvme(nvme)
        finally:
            self._drop_ahead()
        self.num_steps += 1
        store.grads.zero()

    def _step_nvme(self, chunks: list["Chunk"]) -> None:
        """Stream NVMe chunks the program had no point for: read i+1 while stepping i; write i back
        while stepping i+1."""
        store = self.store
        writing: list = []  # (chunk, staging, futures) whose write-back is in flight
        def read(c: "Chunk") -> Staged:
            return read_states(store, c, staged=self._ahead.pop(c.index, None))

        pending = read(chunks[0]) if chunks else None
        for pos, chunk in enumerate(chunks):
            staged = pending
            pending = read(chunks[pos + 1]) if pos + 1 < len(chunks) else None
            writing.append(self._step_staged(chunk, staged))
            # Keep at most one write-back in flight besides the one just queued (bounded staging).
            while len(writing) > 1:
                writing.pop(0).wait()
        for w in writing:
            w.wait()

    # --- state dict ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.AdamW``/``SGD``'s format over ``store.param_order()``, or with parameter
        groups over the groups' parameters in order, one param group each (loads into them)."""
        self.flush()
        state: dict[int, dict[str, torch.Tensor]] = {}
        groups = self._group_names()
        names = [n for g in groups for n in g]
        per_param = _gather_states(self.store, self.kind)
        for idx, name in enumerate(names):
            entry = per_param.get(name)
            if entry is not None:
                state[idx] = entry
        out, start = [], 0
        for spec, g in zip(self.spec.group_specs(), groups):
            out.append(dict(spec.torch_group(), params=list(range(start, start + len(g)))))
            start += len(g)
        return {"state": state, "param_groups": out}

    def _group_names(self) -> list[list[str]]:
        """Parameter names per group, as torch numbers a state dict's parameters (group by group)."""
        if not self.spec.param_groups:
            return [self.store.param_order()]
        return [list(g.params) for g in self.spec.param_groups]

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.flush()
        mine = self._group_names()
        names = [n for g in mine for n in g]
        groups = sd.get("param_groups") or []
        if [len(g.get("params", ())) for g in groups] != [len(g) for g in mine]:
            raise ValueError(
                f"optimizer state: expected {len(mine)} param group(s) of {[len(g) for g in mine]} parameters "
                f"(the format engine.state_dict() writes); got {[len(g.get('params', ())) for g in groups]}"
            )
        _load_states(self.store, {names[int(i)]: s for i, s in sd.get("state", {}).items()})
