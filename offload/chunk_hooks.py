"""The chunk store's hooks and the pass they move along.

Each block's forward pre- and post-hooks, the backward's start and end (gradient hooks on a
block's output and input) and each parameter's post-accumulate-grad hook move the pass's
program through ``ChunkHooks.runner`` ([Note: the program's interpreter], offload.program_runner),
whose handlers call the store's mechanisms (``ChunkStore._start``, ``_release``). The hooks
decide nothing of their own: a block's chunks are made resident when it runs, and every other
fetch and release is an action of the program. ``store`` is an ``offload.chunks.ChunkStore`` (not
imported: the store imports this module).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from enum import Enum
from typing import Any

import torch
from torch import nn

from memtrain.offload.chunk_layout import Chunk
from memtrain.offload.program_runner import ProgramRunner
from memtrain.planner.plan import Action, Op, Tier

__all__ = ["ChunkHooks"]


class _Phase(Enum):
    IDLE = 0
    FORWARD = 1
    BACKWARD = 2


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, Mapping):
        for o in obj.values():
            yield from _tensors(o)


class ChunkHooks:
    """The hooks a ``ChunkStore`` installs, and the state of the pass they run."""

    def __init__(self, store) -> None:
        self.store = store
        self.runner = ProgramRunner({  # the pass running ([Note: the program's interpreter])
            Op.PREFETCH: lambda a: store._start(store.chunks[a.chunk]),
            Op.OFFLOAD: lambda a: store._release(store.chunks[a.chunk], reuse=a.chunk not in self._handed)})
        """The program's interpreter; ``ChunkStore.add_handlers`` gives it more ops."""
        self._phase = _Phase.IDLE
        self._handles: list = []
        self._events: dict[int, tuple[torch.Tensor, list]] = {}
        self._complete: set[int] = set()  # chunks whose gradients of this backward are complete
        self._handed: set[int] = set()  # chunks whose param buffer the optimizer took as its master

    # --- installing -----------------------------------------------------------------------

    def install(self, loose: Sequence[tuple[nn.Module, tuple[int, ...]]]) -> None:
        """Hook every block, every module outside the blocks that owns parameters (``loose``:
        [Note: loose parameters]) and every parameter of the store's chunks."""
        for pos, (_, block) in enumerate(self.store.blocks):
            self._handles.append(block.register_forward_pre_hook(
                lambda m, a, k, pos=pos: self._pre_forward(pos, a, k), with_kwargs=True))
            self._handles.append(block.register_forward_hook(lambda m, a, o, pos=pos: self._post_forward(pos, o)))
        for mod, cs in loose:
            self._handles.append(mod.register_forward_pre_hook(lambda m, a, cs=cs: self._ensure_all(cs)))
        for c in self.store.chunks:
            for si, s in enumerate(c.slots):
                self._handles.append(s.param.register_post_accumulate_grad_hook(
                    lambda p, c=c, si=si: self._on_grad(c, si, p)))

    def uninstall(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # --- passes ---------------------------------------------------------------------------

    def begin_forward(self, program: Sequence[Action]) -> None:
        self._phase = _Phase.FORWARD
        self.runner.load(program)

    def begin_backward(self, program: Sequence[Action]) -> None:
        self._phase = _Phase.BACKWARD
        self.store.held_for_backward = False
        self.runner.load(program)
        self._complete.clear()
        self._handed.clear()
        self._events.clear()  # the registered hooks hold their own event lists

    def end_backward(self) -> None:
        try:
            for c in self.store.chunks:
                if c.grad_buf is not None:
                    self.store.grads.flush(c)
                    self._complete.add(c.index)
            self.runner.finish()
        finally:
            self._phase = _Phase.IDLE
            self._events.clear()

    # --- block hooks ----------------------------------------------------------------------

    def _add_event(self, t: torch.Tensor, event: tuple[int, int]) -> None:
        """Run ``event`` when ``t``'s gradient is computed; ends (0) before starts (1) on one tensor."""
        entry = self._events.get(id(t))
        if entry is None or entry[0] is not t:
            events: list = []
            entry = self._events[id(t)] = (t, events)

            def hook(grad, events=events):
                for kind, pos in sorted(events):
                    (self._bwd_end if kind == 0 else self._bwd_start)(pos)

            t.register_hook(hook)
        entry[1].append(event)

    def _pre_forward(self, pos: int, args, kwargs) -> None:
        store = self.store
        if self._phase is _Phase.BACKWARD:  # recompute inside backward: just make it resident
            self._ensure_all(store.uses[pos])
            return
        self._phase = _Phase.FORWARD
        self._fetch_for(Op.F, pos)
        store.executed.append(Action(0, Op.F, store.microbatch, block=pos))
        if torch.is_grad_enabled():
            for t in _tensors((args, kwargs)):
                if t.requires_grad:
                    self._add_event(t, (0, pos))

    def _post_forward(self, pos: int, output) -> None:
        if self._phase is _Phase.BACKWARD:
            return
        if torch.is_grad_enabled():
            for t in _tensors(output):
                if t.requires_grad:
                    self._add_event(t, (1, pos))
        self._run_releases()
        if pos + 1 == len(self.store.blocks):
            self.store.held_for_backward = torch.is_grad_enabled() and bool(self.store.resident_chunks)

    def _bwd_start(self, pos: int) -> None:
        store = self.store
        self._fetch_for(Op.B, pos)
        store.executed.append(Action(0, Op.B, store.microbatch, block=pos))
        if store.on_backward_block is not None:  # the block's claim and the swap-ins after its marker
            store.on_backward_block()
        self._run_releases(complete_only=True)  # the optimizer's points at the block's start

    def _bwd_end(self, pos: int) -> None:
        self._run_releases(wait_for_grads=True)

    def _ensure_all(self, indices: tuple[int, ...]) -> None:
        for ci in indices:
            self.store._ensure(self.store.chunks[ci])

    # --- the program ([Note: the program's interpreter], offload.program_runner) -----------

    def _fetch_for(self, op: Op, pos: int) -> None:
        """Run the fetches before block ``pos``'s ``op``: the block's own, then (once its chunks
        are resident and, in a backward, its grad buffers taken) those ahead, so a fetched-ahead
        chunk's staging is not taken while the block's own still holds its."""
        store = self.store
        own = store.uses[pos]
        ready = [False]

        def make_ready(a: Action | None = None) -> None:
            if ready[0] or (a is not None and (a.op is not Op.PREFETCH or a.chunk in own)):
                return
            ready[0] = True
            for ci in own:
                c = store.chunks[ci]
                store._ensure(c)
                if op is Op.B and c.home is not Tier.DEVICE and c.grad_buf is None:
                    self._alloc_grad_buf(c)

        self.runner.run_to(op, pos, before=make_ready)
        make_ready()

    def _run_releases(self, *, wait_for_grads: bool = False, complete_only: bool = False) -> None:
        """Run the releases at the program's cursor. ``wait_for_grads`` (a block's backward is
        done): stop at a chunk whose gradients are still on their way (some arrived; or a loose
        module's, whose backward comes after the block's): its gradient hook runs it when they
        are complete. ``complete_only`` (a chunk's gradients just completed, inside a block's
        backward): stop at the first chunk whose gradients are not complete, since the block may
        still read it."""
        store = self.store

        def ready(ci: int) -> bool:
            if complete_only:
                return ci in self._complete
            c = store.chunks[ci]
            return not (wait_for_grads and ci not in self._complete
                        and (0 < len(c.mb_seen) < len(c.slots) or ci in store.loose_chunks))
        self.runner.run_releases(ready)

    # --- gradients ------------------------------------------------------------------------

    def master_for_update(self, c: Chunk) -> torch.Tensor | None:
        """Before ``c``'s early update (an ``OPTIM`` action, offload.optim): a grad buffer some of
        whose parameters got no gradient is added in now, as ``end_backward`` would; and without
        mixed precision an nvme chunk's resident param buffer is returned as its fp32 master, handed
        over (offload.optim [Note: master from the param buffer]: its ``OFFLOAD`` then leaves the
        buffer to the optimizer)."""
        store = self.store
        if c.grad_buf is not None:
            store.grads.flush(c)
            self._complete.add(c.index)
        if c.home is not Tier.NVME or store.mixed or c.buf is None or c.fetch is not None:
            return None
        self._handed.add(c.index)
        return c.buf

    def _alloc_grad_buf(self, c: Chunk) -> None:
        store = self.store
        c.grad_buf = store._alloc(store.device_ledger, f"buffer:grad:{c.index}", c.num_elems, store.compute_dtype,
                                  zero=True)

    def _on_grad(self, c: Chunk, si: int, param: nn.Parameter) -> None:
        g = param.grad
        if g is None:
            return
        param.grad = None
        s = c.slots[si]
        flat = g.reshape(-1)
        if c.home is Tier.DEVICE:
            dst = c.grad[s.offset:s.offset + s.numel]
            # Over micro-batches g1, then g1 + g2, ... in fp32 (offload.grads [Note: fp32 accumulators]); without
            # mixed precision the same arithmetic as torch's AccumulateGrad.
            dst.add_(flat) if si in c.step_seen else dst.copy_(flat)
            c.step_seen.add(si)
            c.has_grad = True
            return
        if c.grad_buf is None:
            self._alloc_grad_buf(c)
        dst = c.grad_buf[s.offset:s.offset + s.numel]
        dst.add_(flat) if si in c.mb_seen else dst.copy_(flat)
        del g, flat, dst  # autograd's gradient and a view of the grad buffer: nothing may outlive the flush below
        c.mb_seen.add(si)
        c.step_seen.add(si)  # the parameters with a gradient this step (offload.clip [Note: the norm of the chunks])
        if len(c.mb_seen) == len(c.slots):
            self.store.grads.flush(c)
            self._complete.add(c.index)
            # [Note: releases in the backward] (planner.program): its update and release, if next
            self._run_releases(complete_only=True)
