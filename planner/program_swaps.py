"""The program's activation swaps: when each swapped block's saved activations go out and come back.

docs/DESIGN.md rules 1-2. ``planner.program`` lowers each pass to block-level actions; for every
block whose activation policy is ``swap_host`` or ``swap_nvme`` (``Layout.acts``) these add:

- ``0SWAP_OUT3/b2`` right after ``0F3/b2``, before the releases that follow it: start copying
  block 2's saved activations of micro-batch 3 out (to host memory; ``swap_nvme``: then on to
  an NVMe file);
- ``0SWAP_IN3/b2``: start bringing them back, ``Layout.swap_in_ahead`` blocks ahead of
  ``0B3/b2``.

[Note: the swap rules] What the program states and what the engine's handlers add:
1. A swapped block's ``SWAP_OUT`` follows its forward marker at once.
2. ``SWAP_IN`` of block k goes right after the marker ``B/bt``, t = min(k + swap_in_ahead, top
   block), in descending block order, so its copy or read overlaps block t's backward; the top
   block's own, with a look-ahead, at the start of the backward, before its first fetches.
3. A ``B`` marker claims its block's record (offload.swap [Note: NVMe swap-in claims]: a
   swap_nvme record's read is waited for and its copy to the device started) before the
   swap-ins after it run, so the block below's host staging is taken after the block's own
   copy-in started. A record not yet coming back then (no look-ahead: its ``SWAP_IN`` follows
   its own marker) is claimed by its first use in the backward.
4. NVMe writes in flight are a fixed rule of the handlers, not actions: a ``SWAP_OUT`` of a
   ``swap_nvme`` block first waits for the oldest writes still staged until fewer than
   ``MemoryPolicy.swap_writes_in_flight`` remain (at most that many blocks' host staging at
   once, whatever the disk's speed); a ``SWAP_IN`` first waits for every write still staged
   (the forward is over). The simulator applies the same rule to the same actions.
"""

from __future__ import annotations

from collections.abc import Sequence

from memtrain.planner.plan import Action, ActPolicy, Op

__all__ = ["SWAPPED", "add_swap_outs", "add_swap_ins"]

SWAPPED = frozenset({ActPolicy.SWAP_HOST, ActPolicy.SWAP_NVME})
"""The activation policies whose blocks swap (have ``SWAP_OUT``/``SWAP_IN`` actions)."""


def _swapped(acts: Sequence[ActPolicy]) -> list[int]:
    return [j for j, p in enumerate(acts) if ActPolicy(p) in SWAPPED]


def add_swap_outs(actions: Sequence[Action], acts: Sequence[ActPolicy], mb: int) -> tuple[Action, ...]:
    """A forward's ``actions`` with each swapped block's ``SWAP_OUT`` after its marker (rule 1)."""
    swapped = set(_swapped(acts))
    if not swapped:
        return tuple(actions)
    out: list[Action] = []
    for a in actions:
        out.append(a)
        if a.op is Op.F and a.block in swapped:
            out.append(Action(a.stage, Op.SWAP_OUT, mb, block=a.block))
    return tuple(out)


def add_swap_ins(actions: Sequence[Action], acts: Sequence[ActPolicy], mb: int, ahead: int) -> tuple[Action, ...]:
    """A backward's ``actions`` with each swapped block's ``SWAP_IN`` placed by rule 2."""
    swapped = _swapped(acts)
    if not swapped:
        return tuple(actions)
    top = len(acts) - 1
    start: list[int] = []
    after: dict[int, list[int]] = {}
    for k in reversed(swapped):
        t = min(k + ahead, top)
        if ahead and t == k:
            start.append(k)
        else:
            after.setdefault(t, []).append(k)
    out = [Action(0 if not actions else actions[0].stage, Op.SWAP_IN, mb, block=k) for k in start]
    for a in actions:
        out.append(a)
        if a.op is Op.B and a.block is not None:
            out += [Action(a.stage, Op.SWAP_IN, mb, block=k) for k in after.get(a.block, ())]
    return tuple(out)
