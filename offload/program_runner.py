"""The interpreter of a pass's program (planner.program) for the chunk store.

[Note: the program's interpreter] A pass's program is a list of actions between compute markers
(``0F3/b2``). The store's block hooks move through it: a block's pre-hook runs the actions up to
its marker when that marker is the next one (the fetches), and after the marker the releases, a
swapped block's ``SWAP_OUT`` and the optimizer's points that follow it, each once the chunk it is
about has its gradients (at the block's start, its backward's end, or a chunk's last gradient);
the store decides nothing of its own. Each op has one handler; an op without one fails loudly.
The ``SWAP_IN``s right after a backward marker (planner.program_swaps [Note: the swap rules]) run
when the engine calls ``run_following`` at the block's backward start. A block the program does
not have next is counted (``num_unplanned``) and the store only makes its chunks resident.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from memtrain.planner.plan import Action, Op

__all__ = ["ProgramRunner", "MARKERS"]

MARKERS = frozenset({Op.F, Op.B})
"""The compute markers (``0F3/b2``): a block's forward or backward, run by the model itself."""
_AFTER_MARKER = frozenset({Op.OFFLOAD, Op.SWAP_OUT, Op.OPTIM, Op.OPTIM_READ, Op.OPTIM_WAIT})
"""Ops a marker's hooks run at the cursor (``run_releases``); the rest run before the next marker."""


class ProgramRunner:
    def __init__(self, handlers: Mapping[Op, Callable[[Action], None]]) -> None:
        self.handlers = dict(handlers)
        self.program: tuple[Action, ...] = ()
        self.cursor = 0
        self.num_unplanned = 0
        """Blocks run where the program has another (a block called twice, blocks in another order)."""
        self.marker: Action | None = None
        """The marker the last ``run_to`` reached (None when the block was not the program's next)."""

    def load(self, program: Sequence[Action]) -> None:
        self.program, self.cursor, self.marker = tuple(program), 0, None

    def run_to(self, op: Op, block: int, before: Callable[[Action], None] | None = None) -> None:
        """Run the actions before the marker of ``block``'s ``op`` when it is the next marker;
        ``before(action)`` is called ahead of each."""
        prog, i = self.program, self.cursor
        while i < len(prog) and prog[i].op not in MARKERS:
            i += 1
        if i == len(prog) or prog[i].op is not op or prog[i].block != block:
            self.num_unplanned += 1
            self.marker = None
            return
        for a in prog[self.cursor:i]:
            if before is not None:
                before(a)
            self.execute(a)
        self.cursor, self.marker = i + 1, prog[i]

    def run_releases(self, ready: Callable[[int], bool] | None = None) -> None:
        """Run the actions at the cursor that follow a marker: the ``OFFLOAD``s, a swapped block's
        ``SWAP_OUT`` and the optimizer's points (``OPTIM`` on a chunk, ``OPTIM_READ``,
        ``OPTIM_WAIT``), stopping at the first ``OFFLOAD`` or ``OPTIM`` whose chunk is not
        ``ready``; an ``OPTIM_WAIT`` runs with the action after it (the wait is for that update or
        read)."""
        prog = self.program
        while self.cursor < len(prog) and prog[self.cursor].op in _AFTER_MARKER and (
                prog[self.cursor].op is Op.SWAP_OUT or prog[self.cursor].block is None):
            gate = next((a for a in prog[self.cursor:] if a.op is not Op.OPTIM_WAIT), None)
            if (ready is not None and gate is not None and gate.op in (Op.OFFLOAD, Op.OPTIM) and gate.chunk is not None
                    and not ready(gate.chunk)):
                return
            a = prog[self.cursor]
            self.cursor += 1
            self.execute(a)

    def run_following(self, op: Op) -> None:
        """Run the actions of ``op`` at the cursor (the swap-ins right after a backward marker)."""
        prog = self.program
        while self.cursor < len(prog) and prog[self.cursor].op is op:
            self.cursor += 1
            self.execute(prog[self.cursor - 1])

    def finish(self) -> None:
        """Run what is left of the pass's program; a marker left means a block that never ran."""
        for a in self.program[self.cursor:]:
            if a.op not in MARKERS:
                self.execute(a)
            else:
                self.num_unplanned += 1
        self.cursor = len(self.program)

    def execute(self, a: Action) -> None:
        handler = self.handlers.get(a.op)
        if handler is None:
            raise RuntimeError(f"program: the chunk store cannot run {a} (op {a.op.value}); it runs "
                               f"{', '.join(sorted(op.value for op in self.handlers))} and the compute markers")
        handler(a)
