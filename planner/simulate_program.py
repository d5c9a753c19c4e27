"""The simulator's reading of the step's program: one handler per op, as the engine's interpreter.

``index_program`` walks the program (planner.program with planner.program_swaps and
planner.program_optim) once and files each action under the compute marker it belongs to, which
is where the simulator's step builder (planner.simulate) turns it into tasks: the fetches before
a block, the releases and swap-outs after it, the swap-ins before a backward's fetches or right
after its marker, the optimizer's points after a backward marker. An op without a handler fails
loudly, like ``offload.program_runner``: a new op must be given its cost before a plan with it
can be timed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from memtrain.planner.plan import Action, Op

__all__ = ["ProgramIndex", "index_program"]

Where = tuple[int, str, int]
"""A compute marker: (micro-batch, "F" or "B", block)."""


@dataclass
class ProgramIndex:
    markers: list[Where] = field(default_factory=list)
    """The compute markers in program order: the order the simulator builds the blocks' tasks in."""
    fetch_at: dict[Where, list[int]] = field(default_factory=lambda: defaultdict(list))
    """The chunks fetched before a marker's block, in program order (its own, then ahead)."""
    release_at: dict[Where, list[int]] = field(default_factory=lambda: defaultdict(list))
    """The chunks released after a marker."""
    swap_out_at: set[tuple[int, int]] = field(default_factory=set)
    """(micro-batch, block) swapped out right after its forward."""
    swap_in_before: dict[tuple[int, int], list[int]] = field(default_factory=lambda: defaultdict(list))
    """Per backward block, the blocks whose swap-ins come before its fetches."""
    swap_in_after: dict[tuple[int, int], list[int]] = field(default_factory=lambda: defaultdict(list))
    """Per backward block, the blocks whose swap-ins come right after its marker."""
    optim_at: dict[tuple[int, int], list[Action]] = field(default_factory=lambda: defaultdict(list))
    """Per backward block, the optimizer's points after its marker (read-aheads, updates, waits)."""
    final_optim: int = 0
    """The step's final ``OPTIM`` actions (one)."""
    final_points: list[Action] = field(default_factory=list)
    """The optimizer's points after the last backward, in order (planner.program_optim [Note:
    the step's end]): updates, reads and waits on chunks, with no micro-batch."""


class _Reader:
    def __init__(self) -> None:
        self.index = ProgramIndex()
        self.where: Where | None = None
        self.pending: list[int] = []
        self.swap_ins: list[int] = []
        self.handlers: dict[Op, Callable[[Action], None]] = {
            Op.F: self.marker, Op.B: self.marker, Op.PREFETCH: self.fetch, Op.OFFLOAD: self.release,
            Op.SWAP_OUT: self.swap_out, Op.SWAP_IN: self.swap_in, Op.OPTIM: self.optim,
            Op.OPTIM_READ: self.optim, Op.OPTIM_WAIT: self.optim,
        }

    def read(self, a: Action) -> None:
        handler = self.handlers.get(a.op)
        if handler is None:
            raise ValueError(f"simulate: no cost for {a} (op {a.op.value}) in a single-device step; the "
                             f"simulator times {', '.join(sorted(op.value for op in self.handlers))}")
        handler(a)

    def marker(self, a: Action) -> None:
        if a.block is None:
            raise ValueError(f"simulate: {a} is not lowered to blocks (planner.program)")
        ix = self.index
        self.where = (a.microbatch, a.op.value, a.block)
        ix.markers.append(self.where)
        ix.fetch_at[self.where], self.pending = self.pending, []
        if self.swap_ins:
            ix.swap_in_before[(a.microbatch, a.block)], self.swap_ins = self.swap_ins, []

    def fetch(self, a: Action) -> None:
        self.pending.append(a.chunk)

    def release(self, a: Action) -> None:
        self.index.release_at[self._after(a)].append(a.chunk)

    def swap_out(self, a: Action) -> None:
        self.index.swap_out_at.add((a.microbatch, a.block))

    def swap_in(self, a: Action) -> None:
        w = self.where
        if w is not None and w[1] == "B" and w[0] == a.microbatch:
            self.index.swap_in_after[(a.microbatch, w[2])].append(a.block)
        else:
            self.swap_ins.append(a.block)

    def optim(self, a: Action) -> None:
        if a.op is Op.OPTIM and a.chunk is None:  # the step's end: the early updates waited for
            self.index.final_optim += 1
            return
        if a.microbatch is None:  # after the last backward ([Note: the step's end])
            self.index.final_points.append(a)
            return
        w = self._after(a)
        self.index.optim_at[(w[0], w[2])].append(a)

    def _after(self, a: Action) -> Where:
        if self.where is None:
            raise ValueError(f"simulate: {a} comes before any block's marker")
        return self.where


def index_program(actions: Iterable[Action]) -> ProgramIndex:
    """File each action of a single-device step's program under its marker (see the module)."""
    reader = _Reader()
    for a in actions:
        reader.read(a)
    return reader.index
