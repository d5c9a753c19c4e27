"""The program of a step at block granularity: when each chunk's param buffer is fetched and
released, around each block's forward and backward.

docs/DESIGN.md rules 1-2. ``lower_step`` turns the compute order of a single-device step (F then
B per micro-batch) into actions the engine executes one by one (offload.chunks moves through
them at its block hooks) and the report shows:

- ``0F3/b2``, ``0B3/b2``: block 2's forward or backward of micro-batch 3 (the compute markers);
- ``0PREFETCH3@c5`` before a marker: start fetching chunk 5's parameters into a device buffer
  (host copy or NVMe read); the block that needs it waits for it at its marker;
- ``0OFFLOAD3@c5`` after a marker: free chunk 5's param buffer;
- ``0SWAP_OUT3/b2``, ``0SWAP_IN3/b2``: start moving block 2's saved activations of micro-batch 3
  out after its forward and back ahead of its backward, for blocks whose activation policy
  swaps (planner.program_swaps, [Note: the swap rules] there).

[Note: the residency rules] What the lowering decides, block by block, from the chunks each
block uses (``Layout.uses``) and ``prefetch_depth``:
1. Before a block runs, its off-device chunks not yet fetched are fetched; then, while fewer
   than ``prefetch_depth`` param buffers exist, the chunks of the blocks that follow (in pass
   order: the rest of the forward, then the backward; in a backward with a forward after it,
   that forward's blocks) are fetched in the order they will be used.
2. After a block, a chunk it used is released unless the next block uses it or it is among the
   first ``prefetch_depth`` distinct chunks the following blocks use (it would be fetched again
   at once): so chunks stay across the end of a forward into the backward, and across a
   backward's end into the next micro-batch's forward.
3. At the end of a backward with no forward after it, every buffer is released in chunk order.

Passes are lowered one at a time from the buffers the last one left (``lower_forward``,
``lower_backward``): ``wrap()``'s own loop (engine(batch), engine.backward) asks for them as they
come, ``lower_step`` strings a whole step of ``train_step`` together.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from memtrain.planner.cost import within_prefetch_window
from memtrain.planner.plan import DEFAULT_SWAP_IN_AHEAD, Action, ActPolicy, MemoryPolicy, Op, Tier
from memtrain.planner.program_swaps import add_swap_ins, add_swap_outs

__all__ = ["Layout", "PassResult", "lower_forward", "lower_backward", "lower_passes", "lower_step", "compute_markers"]


@dataclass(frozen=True, slots=True)
class Layout:
    """What the lowering needs to know of the chunk store."""

    uses: tuple[tuple[int, ...], ...]
    """Per block, the chunks holding its parameters, ascending (loose modules' in the last block's)."""
    off: frozenset[int]
    """Chunks whose home is not the device (they have param buffers to fetch and release)."""
    prefetch_depth: int
    """Param buffers that may exist at once (``MemoryPolicy.prefetch_depth``)."""
    nvme: frozenset[int] = frozenset()
    """Chunks whose home is NVMe."""
    loose: tuple[int, ...] = ()
    """Chunks of modules outside every block: kept past the last block's backward."""
    acts: tuple[ActPolicy, ...] = ()
    """Per block, its activation policy (``MemoryPolicy.activations``): swapped blocks get swap
    actions; empty when nothing swaps."""
    swap_in_ahead: int = DEFAULT_SWAP_IN_AHEAD
    """Blocks ahead of its backward a swapped block's activations start coming back
    (``MemoryPolicy.swap_in_ahead``)."""
    num_chunks: int = 0
    """Chunks of the store, device ones included (0: those ``uses`` and ``loose`` name)."""
    _memo: dict = field(default_factory=dict, init=False, compare=False, hash=False, repr=False)
    """``_index``'s result, kept on the instance: hashing the layout for a cache costs as much."""

    @staticmethod
    def of(policy: MemoryPolicy, uses: Sequence[Sequence[int]], loose: Sequence[int] = ()) -> "Layout":
        return Layout(uses=tuple(tuple(u) for u in uses), prefetch_depth=policy.prefetch_depth, loose=tuple(loose),
                      off=frozenset(c.index for c in policy.chunks if c.home is not Tier.DEVICE),
                      nvme=frozenset(c.index for c in policy.chunks if c.home is Tier.NVME),
                      acts=tuple(ActPolicy(p) for p in policy.activations), swap_in_ahead=policy.swap_in_ahead,
                      num_chunks=len(policy.chunks))

    @staticmethod
    def of_store(store, acts: Sequence[ActPolicy] = (), swap_in_ahead: int = DEFAULT_SWAP_IN_AHEAD) -> "Layout":
        """The layout of a built ``offload.chunks.ChunkStore`` (its blocks' chunks, homes, depth),
        with the blocks' activation policies ``acts`` and ``swap_in_ahead`` of the plan."""
        homes = {c.index: c.home for c in store.chunks}
        return Layout(uses=tuple(tuple(u) for u in store.uses), prefetch_depth=store.prefetch_depth,
                      loose=tuple(store.loose_chunks), off=frozenset(i for i, h in homes.items() if h is not Tier.DEVICE),
                      nvme=frozenset(i for i, h in homes.items() if h is Tier.NVME),
                      acts=tuple(ActPolicy(p) for p in acts), swap_in_ahead=swap_in_ahead, num_chunks=len(store.chunks))

    @property
    def chunks(self) -> range:
        """Every chunk's index, device chunks included."""
        return range(max(self.num_chunks, 1 + max((c for u in self.uses for c in u), default=-1),
                         1 + max(self.loose, default=-1)))

    def complete_at(self, c: int) -> int:
        """The block whose backward completes chunk ``c``'s gradients: the first block using it."""
        return _index(self)[1][c]

    def off_uses(self, pos: int) -> tuple[int, ...]:
        return _index(self)[0][pos]

    def within_window(self, c: int, upcoming: Iterable[int]) -> bool:
        """Whether ``c`` is among the first ``prefetch_depth`` distinct off-device chunks the blocks
        ``upcoming`` use (``cost.within_prefetch_window``)."""
        return within_prefetch_window(c, upcoming, _index(self)[0], self.prefetch_depth)


def _index(layout: Layout) -> tuple[tuple[tuple[int, ...], ...], dict[int, int]]:
    """Per block its off-device chunks; per chunk the first block using it."""
    memo = layout._memo.get("index")
    if memo is not None:
        return memo
    off_uses = tuple(tuple(c for c in u if c in layout.off) for u in layout.uses)
    first: dict[int, int] = {}
    for q, u in enumerate(layout.uses):
        for c in u:
            first.setdefault(c, q)
    layout._memo["index"] = off_uses, first
    return off_uses, first


@dataclass(frozen=True, slots=True)
class PassResult:
    actions: tuple[Action, ...]
    resident: tuple[int, ...]
    """Chunks with a param buffer when the pass ends, in the order they were fetched."""
    held: bool = False
    """A forward that ended with buffers kept for a backward (released if a forward comes first)."""


class _Lowering:
    def __init__(self, layout: Layout, mb: int, resident: Sequence[int]) -> None:
        self.layout, self.mb = layout, mb
        self.resident = list(resident)
        self.out: list[Action] = []

    def fetch(self, c: int) -> None:
        if c in self.layout.off and c not in self.resident:
            self.resident.append(c)
            self.out.append(Action(0, Op.PREFETCH, self.mb, c))

    def release(self, c: int) -> None:
        if c in self.resident:
            self.resident.remove(c)
            self.out.append(Action(0, Op.OFFLOAD, self.mb, c))

    def prefetch(self, order: Iterable[int]) -> None:
        if self.layout.prefetch_depth <= 1:
            return
        off_uses = _index(self.layout)[0]
        for q in order:
            for c in off_uses[q]:
                if len(self.resident) >= self.layout.prefetch_depth:
                    return
                self.fetch(c)

    def block(self, op: Op, pos: int, prefetch_order: Iterable[int]) -> None:
        for c in self.layout.uses[pos]:
            self.fetch(c)
        self.prefetch(prefetch_order)
        self.out.append(Action(0, op, self.mb, block=pos))

    def release_after(self, pos: int, nxt: set[int], upcoming) -> None:
        for c in self.layout.uses[pos]:
            if c in self.resident and c not in nxt and not self.layout.within_window(c, upcoming()):
                self.release(c)


def lower_forward(layout: Layout, mb: int, resident: Sequence[int] = (), *, grad: bool = True,
                  held: bool = False) -> PassResult:
    """Micro-batch ``mb``'s forward from the buffers ``resident``; ``grad``: a backward follows
    (``torch.is_grad_enabled()``); ``held``: the last forward kept buffers for a backward that
    never came (they are released first)."""
    low = _Lowering(layout, mb, resident)
    n = len(layout.uses)
    if held:
        for c in list(low.resident):
            low.release(c)
    for pos in range(n):
        low.block(Op.F, pos, range(pos + 1, n))
        nxt = set(layout.uses[pos + 1]) if pos + 1 < n else (set(layout.uses[pos]) if grad else set())
        low.release_after(pos, nxt, lambda pos=pos: itertools.chain(range(pos + 1, n), range(n - 1, -1, -1))
                          if grad else range(pos + 1, n))
    actions = add_swap_outs(low.out, layout.acts, mb) if grad else tuple(low.out)
    return PassResult(actions=actions, resident=tuple(low.resident), held=grad and bool(low.resident))


def lower_backward(layout: Layout, mb: int, resident: Sequence[int], *, next_forward: bool = False,
                   hand_off: bool = False) -> PassResult:
    """Micro-batch ``mb``'s backward from the buffers ``resident``; ``next_forward``: another
    micro-batch's forward follows at once, so the buffers it starts with stay; ``hand_off``: the
    optimizer takes each nvme chunk's buffer as its master once its gradients are complete (the
    last backward of an fp32 step with early updates: offload.optim [Note: master from the param
    buffer]), so that buffer goes then, kept or not.

    [Note: releases in the backward] A chunk is released in the backward of the block that
    completes its gradients (``Layout.complete_at``; several in descending chunk order, as
    autograd completes them), unless it stays by rule 2; the chunks a block used that stay
    past that are looked at again after the block. The first block's input carries no gradient
    (token ids), so nothing is released after its backward but at the pass's end."""
    low = _Lowering(layout, mb, resident)
    n = len(layout.uses)

    def after(p: int) -> Iterable[int]:
        down = range(p, -1, -1)
        return itertools.chain(down, range(n)) if next_forward else down

    for pos in range(n - 1, -1, -1):
        low.block(Op.B, pos, after(pos - 1))
        done = sorted((c for c in layout.off_uses(pos) if layout.complete_at(c) == pos), reverse=True)
        for c in done:
            if c not in low.resident:
                continue
            handed = hand_off and c in layout.nvme
            stays = (next_forward and c in layout.uses[0]) or (not handed and layout.within_window(c, after(pos - 1)))
            if not stays:
                low.release(c)
        if pos == 0:
            break
        nxt = set(layout.uses[pos - 1])
        if pos == n - 1:
            nxt.update(layout.loose)
        low.release_after(pos, nxt, lambda pos=pos: after(pos - 1))
    if not next_forward:
        for c in sorted(low.resident):
            low.release(c)
    return PassResult(actions=add_swap_ins(low.out, layout.acts, mb, layout.swap_in_ahead), resident=tuple(low.resident))


def lower_passes(layout: Layout, num_microbatches: int, *, hand_off: bool = False,
                 ) -> list[tuple[tuple[Action, ...], tuple[Action, ...]]]:
    """Each micro-batch's forward and backward actions in ``train_step``'s order (F then B per
    micro-batch, with their swaps), each pass from the buffers the last left, the last B
    releasing every buffer; ``hand_off`` as ``lower_backward``'s, for the last backward."""
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches: must be >= 1, got {num_microbatches}")
    out = []
    resident: tuple[int, ...] = ()
    for mb in range(num_microbatches):
        fwd = lower_forward(layout, mb, resident)
        last = mb == num_microbatches - 1
        bwd = lower_backward(layout, mb, fwd.resident, next_forward=not last, hand_off=hand_off and last)
        out.append((fwd.actions, bwd.actions))
        resident = bwd.resident
    return out


def lower_step(layout: Layout, num_microbatches: int, *, hand_off: bool = False) -> tuple[Action, ...]:
    """``train_step``'s program: ``lower_passes``' actions, then ``0OPTIM``."""
    passes = lower_passes(layout, num_microbatches, hand_off=hand_off)
    return tuple(a for fwd, bwd in passes for a in fwd + bwd) + (Action(0, Op.OPTIM),)


def compute_markers(actions: Iterable[Action]) -> list[Action]:
    """The block forwards and backwards of ``actions``, in order."""
    return [a for a in actions if a.op in (Op.F, Op.B) and a.block is not None]
