"""The offloaded optimizer's points in a step's program: states read ahead, early updates, and
where write-backs are waited for.

docs/DESIGN.md rules 1-3, docs/optimizer.md. ``add_optim_points`` adds to a backward pass lowered
by planner.program the actions the engine's ``OffloadedOptimizer`` runs and the simulator times:

- ``0OPTIM_READ3@c5`` right after a backward block's marker: start reading chunk 5's optimizer
  states into host staging ([Note: states read ahead]);
- ``0OPTIM3@c5`` in the last backward, right after the marker of the block whose backward
  completes chunk 5's gradients (``Layout.complete_at``; a loose module's chunk at the pass's
  end) and before its release: its update, on the host (offload.optim [Note: early optimizer
  step]);
- ``0OPTIM_WAIT3@c5`` before one of those: wait for chunk 5's write-back (this step's, or one
  carried from the last step) and free its host staging;
- after the last backward, the updates that did not run early, each on its chunk with no
  micro-batch (``final_optim_points``, [Note: the step's end]), then ``0OPTIM``.

[Note: the optimizer's points] What the lowering decides, from the staging held when the pass
starts (``Staging``, which the engine reads off its optimizer as it reads the resident chunks
off its store) and ``MemoryPolicy.optim_staged_chunks`` (S):
1. Early updates apply unless fp16 loss scaling or gradient clipping needs every gradient first
   (``early_updates``).
2. At each backward block's start, while fewer than ``read_ahead_slots(S)`` states are read
   ahead, the next nvme chunk's are, in the order of ``cost.read_ahead_order`` (the last to
   update first), if fewer than S chunks are staged once carried write-backs are waited for.
3. Before an nvme chunk's update its own carried write-back is waited for (its staging would go
   stale); a chunk not read ahead first waits for the oldest write-backs, carried ones first,
   while S chunks are staged.
4. The step leaves the write-backs not waited for running (they are the next step's
   ``Staging.carried``: [Note: write-backs across the step end]); ``steady_carried`` gives them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

from memtrain.planner.cost import optim_read_ahead_slots, read_ahead_order
from memtrain.planner.plan import Action, Op
from memtrain.planner.program import Layout, lower_passes
from memtrain.planner.stats import DType

__all__ = ["OptimLayout", "Staging", "early_updates", "add_optim_points", "final_optim_points", "lower_step_optim",
           "lower_steady_step", "steady_carried",
           "OPTIM_OPS"]

OPTIM_OPS = frozenset({Op.OPTIM_READ, Op.OPTIM_WAIT})
"""With ``OPTIM`` on a chunk, the ops of the optimizer's points."""


def early_updates(dtype: DType | str, clip_grad_norm: bool = False) -> bool:
    """Whether host and nvme chunks update as their gradients complete in the last backward: not
    under fp16, whose loss scaling needs every gradient to skip or unscale the step, nor when
    the step clips gradients by their global norm, which needs every gradient too (offload.clip)."""
    return DType(dtype) is not DType.FP16 and not clip_grad_norm


@dataclass(frozen=True, slots=True)
class OptimLayout:
    """What the optimizer's points need to know besides the chunk layout."""

    staged_chunks: int
    """``MemoryPolicy.optim_staged_chunks``: nvme chunks holding host staging at once."""
    early: bool
    """``early_updates(dtype, clip_grad_norm)``."""


@dataclass(frozen=True, slots=True)
class Staging:
    """The nvme chunks holding the optimizer's host staging at a point of the program."""

    ahead: tuple[int, ...] = ()
    """States read ahead, not yet updated, in the order read."""
    writing: tuple[int, ...] = ()
    """Updated this step, write-back not waited for, oldest first."""
    carried: tuple[int, ...] = ()
    """Write-backs carried from the last step, not waited for, oldest first."""
    updated: frozenset[int] = field(default_factory=frozenset)
    """Chunks updated early this step."""


@functools.lru_cache(maxsize=64)
def _read_order(layout: Layout) -> tuple[int, ...]:
    return tuple(read_ahead_order(layout.uses, layout.nvme))


class _Points:
    def __init__(self, layout: Layout, opt: OptimLayout, state: Staging, mb: int) -> None:
        self.layout, self.opt, self.mb = layout, opt, mb
        self.ahead, self.writing, self.carried = list(state.ahead), list(state.writing), list(state.carried)
        self.updated = set(state.updated)
        self.slots = optim_read_ahead_slots(opt.staged_chunks) if opt.early and layout.nvme else 0
        self.order = _read_order(layout) if self.slots else ()
        self.out: list[Action] = []

    def staged(self) -> int:
        return len(self.ahead) + len(self.writing) + len(self.carried)

    def wait(self, c: int) -> None:
        (self.carried if c in self.carried else self.writing).remove(c)
        self.out.append(Action(0, Op.OPTIM_WAIT, self.mb, c))

    def read_ahead(self) -> None:  # rule 2
        if len(self.ahead) >= self.slots:
            return
        c = next((c for c in self.order if c not in self.ahead and c not in self.updated), None)
        if c is None:
            return
        while self.staged() >= self.opt.staged_chunks and self.carried:
            self.wait(self.carried[0])
        if self.staged() < self.opt.staged_chunks:
            self.ahead.append(c)
            self.out.append(Action(0, Op.OPTIM_READ, self.mb, c))

    def update(self, c: int) -> None:  # rule 3
        if c in self.updated:
            return
        self.updated.add(c)
        if c in self.layout.nvme:
            if c in self.carried:
                self.wait(c)
            if c in self.ahead:
                self.ahead.remove(c)
            else:
                while (self.carried or self.writing) and self.staged() >= self.opt.staged_chunks:
                    self.wait((self.carried or self.writing)[0])
            self.writing.append(c)
        self.out.append(Action(0, Op.OPTIM, self.mb, c))

    def state(self) -> Staging:
        return Staging(tuple(self.ahead), tuple(self.writing), tuple(self.carried), frozenset(self.updated))


def add_optim_points(layout: Layout, opt: OptimLayout, actions: Sequence[Action], mb: int, state: Staging = Staging(),
                     *, final: bool = False) -> tuple[tuple[Action, ...], Staging]:
    """Micro-batch ``mb``'s backward ``actions`` (``program.lower_backward``) with the optimizer's
    points added ([Note: the optimizer's points]), from the staging ``state`` held when it starts;
    ``final``: the last backward of the step, where the early updates run. Returns the actions and
    the staging held when the pass ends."""
    if not opt.early or not (final or (layout.nvme and optim_read_ahead_slots(opt.staged_chunks))):
        return tuple(actions), state  # no updates, nothing read ahead
    pts = _Points(layout, opt, state, mb)
    out = pts.out
    todo: list[int] = []  # this block's chunks to update, in the order their gradients complete

    def updates(upto: int | None = None) -> None:
        while todo:
            c = todo.pop(0)
            pts.update(c)
            if c == upto:
                return

    read_due = False  # a marker's read-aheads go after the swap-ins right after it
    for a in actions:
        if a.op is Op.B and a.block is not None:
            if read_due:
                pts.read_ahead()
            updates()
            out.append(a)
            read_due = True
            if final:
                todo = sorted((c for c in layout.off_uses(a.block)
                               if layout.complete_at(c) == a.block and c not in layout.loose), reverse=True)
            continue
        if read_due and a.op is Op.SWAP_IN:  # run with the marker (planner.program_swaps, rule 3)
            out.append(a)
            continue
        if read_due:
            pts.read_ahead()
            read_due = False
        updates(upto=a.chunk if a.op is Op.OFFLOAD and a.chunk in todo else None)
        out.append(a)
    if read_due:
        pts.read_ahead()
    updates()
    if final:  # a loose module's gradients may complete after the last block's backward
        for c in sorted((c for c in layout.loose if c in layout.off), reverse=True):
            pts.update(c)
    return tuple(out), pts.state()


def steady_carried(layout: Layout, opt: OptimLayout, num_microbatches: int) -> tuple[int, ...]:
    """The write-backs a step leaves running into the next (rule 4): the same every step, since
    carried ones only change where the next step waits, not what it reads or updates."""
    return _with_points(layout, opt, lower_passes(layout, num_microbatches), Staging())[1].writing


def lower_step_optim(layout: Layout, opt: OptimLayout, num_microbatches: int, *, hand_off: bool = False,
                     carried: Sequence[int] | None = None) -> tuple[Action, ...]:
    """``program.lower_step`` with the optimizer's points: F then B of each micro-batch, then
    ``0OPTIM``; the step begins with the write-backs ``carried`` left running (None: those the
    last step left, ``steady_carried``; () for the first step)."""
    return lower_steady_step(layout, opt, num_microbatches, hand_off=hand_off, carried=carried)[0]


def lower_steady_step(layout: Layout, opt: OptimLayout, num_microbatches: int, *, hand_off: bool = False,
                      carried: Sequence[int] | None = None) -> tuple[tuple[Action, ...], tuple[int, ...]]:
    """``lower_step_optim``'s program and the write-backs carried into it (one lowering of the
    passes for both)."""
    passes = lower_passes(layout, num_microbatches, hand_off=hand_off)
    if carried is None:
        carried = _with_points(layout, opt, passes, Staging())[1].writing
    return _with_points(layout, opt, passes, Staging(carried=tuple(carried)))[0], tuple(carried)


def final_optim_points(layout: Layout, opt: OptimLayout) -> tuple[Action, ...]:
    """[Note: the step's end] What the optimizer runs after the last backward, in order, then
    ``0OPTIM`` (the early updates waited for, the gradients cleared):

    - ``0OPTIM@c<i>`` (no micro-batch) for each chunk that did not update early, in chunk order:
      the device chunks, and under fp16 (``early_updates``) the host chunks too;
    - under fp16 the nvme chunks streamed through staging: ``0OPTIM_READ@c<i+1>`` (the next
      chunk's states read while this one updates), ``0OPTIM@c<i>``, and ``0OPTIM_WAIT@c<i-1>``
      once two write-backs are in flight; the last ones are waited for before ``0OPTIM``.
    """
    chunks = layout.chunks
    out = [Action(0, Op.OPTIM, None, c) for c in chunks
           if c not in layout.nvme and (c not in layout.off or not opt.early)]
    streamed = [] if opt.early else [c for c in chunks if c in layout.nvme]
    if streamed:
        out.append(Action(0, Op.OPTIM_READ, None, streamed[0]))
    writing: list[int] = []
    for pos, c in enumerate(streamed):
        if pos + 1 < len(streamed):
            out.append(Action(0, Op.OPTIM_READ, None, streamed[pos + 1]))
        out.append(Action(0, Op.OPTIM, None, c))
        writing.append(c)
        while len(writing) > 1:  # one write-back in flight besides the one just queued
            out.append(Action(0, Op.OPTIM_WAIT, None, writing.pop(0)))
    out += [Action(0, Op.OPTIM_WAIT, None, c) for c in writing]
    out.append(Action(0, Op.OPTIM))
    return tuple(out)


def _with_points(layout: Layout, opt: OptimLayout, passes, state: Staging) -> tuple[tuple[Action, ...], Staging]:
    out: list[Action] = []
    for mb, (fwd, bwd) in enumerate(passes):
        acts, state = add_optim_points(layout, opt, bwd, mb, state, final=mb == len(passes) - 1)
        out += fwd + acts
    out += final_optim_points(layout, opt)
    return tuple(out), state
