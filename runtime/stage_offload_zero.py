"""ZeRO-2 of an offloaded pipeline stage: each chunk's gradients summed on the replica that updates it.

[Note: ZeRO-2 of an offloaded stage] Under ``PipelineSpec.zero`` 2 an offloaded stage
(runtime.stage_offload) shards its gradients as ZeRO-Offload does (Ren et al. 2021, Sec. 4.1:
gradients reduced as the backward produces them, each replica moving only its partition's to the
CPU): its chunks are split into runs of whole chunks, one per replica, as under ZeRO-1
(``split_owners``), and the program's ``sREDUCE_SCATTER<i>``, right before the stage's last
gradient pass (``planner.pipeline.add_reduce_scatter_points``, as for a device stage), arms hooks
on its parameters; as the backward makes a chunk's gradients final (every parameter of the chunk
reported, a ``W`` reporting its own), the chunk's gradients are copied into one flat buffer, the
parameters' ``.grad`` dropped, and a reduce of the buffer to the chunk's owner started
asynchronously, chunks in one fixed order (last chunk first, the order the backward finishes them)
on every replica, at most ``MAX_IN_FLIGHT`` under way, the backward never waiting. A chunk
holding a weight tied across ranks is final only after the tied sum: it goes at ``sALLREDUCE``,
which starts the chunks left and waits for every reduce (with the timeout). A replica keeps the
sums of its own chunks only; ``sOFFLOAD`` adds those into its chunks' accumulators, ``sOPTIM``
updates them and all-gathers the masters (ZeRO-1's step end, runtime.stage_offload).

So each replica holds, after the sum, about ``1 / dp`` of the stage's gradients, and moves only
those to its home; while summing, the gradient plus a few chunks (not the gradient and its whole
flat copy, as the all-reduce of ZeRO-0 and -1). A reduce of two terms is the all-reduce's sum, so
with 2 replicas the losses are bitwise ZeRO-1's and the unsharded run's; with more, gloo may add
in another order (the data-parallel tolerance).

The gradient bytes held are counted as they change (runtime.stage_zero [Note: gradient bytes
counted as they change]): all at ``arm``, a parameter at its report (a late chunk's too, which
starts nothing), a chunk's at its copy, the late chunks' at ``reduce`` (a tied weight's ``.grad``
the worker may make there), the buffers and sums by what each start and wait adds or takes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memtrain.comm import PendingReduce, start_reduce
from memtrain.planner.simulate_pipeline import REDUCE_IN_FLIGHT
from memtrain.runtime.stage_zero import HeldGrads

__all__ = ["ChunkReducer", "MAX_IN_FLIGHT"]

MAX_IN_FLIGHT = REDUCE_IN_FLIGHT
"""Chunks' reduces under way at once (runtime.stage_zero's figure for buckets)."""


class ChunkReducer:
    """An offloaded stage's gradients reduced chunk by chunk to their owners (the module doc)."""

    def __init__(self, chunks: list[Any], owners: tuple[int, ...], *, replica: int, group: Any, rank: int,
                 timeout_s: float, deferred: set[int]) -> None:
        self.chunks, self.owners, self.replica = chunks, owners, replica
        self.group, self.rank, self.timeout_s = group, rank, timeout_s
        late = {c.index for c in chunks if any(id(s.param) in deferred for s in c.slots)}
        self.order = [c.index for c in reversed(chunks) if c.index not in late] + sorted(late)
        """Chunk indices in the order every replica reduces them."""
        self._late = late
        self._chunk_of = {id(s.param): c.index for c in chunks for s in c.slots}
        self._armed: str | None = None
        self._left: dict[int, int] = {}
        self._next = 0  # position in ``order`` of the next chunk to start
        self._pending: list[tuple[int, PendingReduce]] = []
        self.summed: dict[int, torch.Tensor] = {}
        """After ``reduce``: this replica's chunks' summed gradients, flat, by chunk index."""
        self.peak_grad_bytes = 0
        """The most gradient bytes held from ``arm`` to the end of ``reduce``: the parameters'
        ``.grad``, buffers under way and the sums kept."""
        self._grads = HeldGrads()  # [Note: gradient bytes counted as they change]
        self._in_flight = self._summed = 0
        for c in chunks:
            for s in c.slots:  # a late chunk's only counted
                s.param.register_post_accumulate_grad_hook(self.grad_ready)

    @property
    def grad_bytes(self) -> int:
        """Gradient bytes held now: the parameters' ``.grad``, reduces under way, the sums kept."""
        held = sum(s.param.grad.numel() * s.param.grad.element_size() for c in self.chunks for s in c.slots
                   if s.param.grad is not None)
        held += sum(p.input_bytes for _, p in self._pending)
        return held + sum(t.numel() * t.element_size() for t in self.summed.values())

    @property
    def held_bytes(self) -> int:
        """``grad_bytes`` as counted along the step ([Note: gradient bytes counted as they change])."""
        return self._grads.total + self._in_flight + self._summed

    def _note(self) -> None:
        self.peak_grad_bytes = max(self.peak_grad_bytes, self.held_bytes)

    def arm(self, what: str) -> None:
        """``REDUCE_SCATTER``: from now on each chunk is reduced once its gradients are final."""
        self._armed, self._next, self._pending, self.summed = what, 0, [], {}
        self._left = {c.index: len(c.slots) for c in self.chunks if c.index not in self._late}
        self._grads.reset(s.param for c in self.chunks for s in c.slots)
        self._in_flight = self._summed = 0
        self.peak_grad_bytes = 0
        self._note()

    def grad_ready(self, param: nn.Parameter) -> None:
        """A parameter's gradient is final for the step (its hook, or the worker's ``W``)."""
        k = self._chunk_of.get(id(param))
        if self._armed is None or k is None:
            return
        self._grads.note(param)
        if k in self._late:  # final only at ALLREDUCE
            return
        self._left[k] -= 1
        self._note()
        while self._pending and self._pending[0][1].done():  # never waits here: the backward goes on
            self._finish_oldest()
        while (self._next < len(self.order) and self._left.get(self.order[self._next]) == 0
               and len(self._pending) < MAX_IN_FLIGHT):
            self._start(self.order[self._next])

    def _start(self, k: int) -> None:
        """Chunk ``k``'s gradients copied out (their ``.grad`` dropped) and its reduce started."""
        while len(self._pending) >= MAX_IN_FLIGHT:
            self._finish_oldest()
        c = self.chunks[k]
        flat = torch.zeros(c.num_elems, dtype=torch.float32, device=c.slots[0].param.device)
        for s in c.slots:
            self._grads.note(s.param)  # as it is now, whoever made it
            if s.param.grad is not None:
                flat[s.offset:s.offset + s.numel] = s.param.grad.reshape(-1)
        pending = start_reduce(flat, self.owners[k], self.group, rank=self.rank, what=f"{self._armed} (chunk {k})",
                               timeout_s=self.timeout_s)
        self._pending.append((k, pending))
        self._in_flight += pending.input_bytes
        self._note()  # the copy, before the .grad go
        for s in c.slots:
            s.param.grad = None
            self._grads.note(s.param)
        self._next += 1

    def _finish_oldest(self) -> None:
        k, p = self._pending.pop(0)
        self._in_flight -= p.input_bytes
        out = p.wait()
        if self.owners[k] == self.replica:
            self.summed[k] = out
            self._summed += out.numel() * out.element_size()
        self._note()

    def reduce(self, what: str) -> None:
        """``ALLREDUCE``: the chunks not started yet (the tied ones, after their tie's sum) start,
        and every reduce is waited for; this replica keeps its own chunks' sums in ``summed``."""
        if self._armed is None:  # the program never armed (no REDUCE_SCATTER): every chunk here
            self.arm(what)
        for k in self._late:  # a tied weight's .grad may have come since (the worker's zeros)
            for s in self.chunks[k].slots:
                self._grads.note(s.param)
        while self._next < len(self.order):
            self._start(self.order[self._next])
        while self._pending:
            self._finish_oldest()
        self._armed = None

    def abandon(self) -> None:
        """A failed step (runtime.stage_failure): the chunks' gradients, reduces under way and sums
        dropped, disarmed (a reduce under way is not waited for: its process group keeps its buffer)."""
        self._armed, self._next, self._pending, self.summed = None, 0, [], {}
        for c in self.chunks:
            for s in c.slots:
                s.param.grad = None
        self._grads.reset(s.param for c in self.chunks for s in c.slots)
        self._in_flight = self._summed = 0

    def entries(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Per parameter of this replica's chunks, its summed gradient (a view of ``summed``)."""
        return [(s.param, self.summed[k][s.offset:s.offset + s.numel]) for k in sorted(self.summed)
                for s in self.chunks[k].slots]

    def scale(self, coef: torch.Tensor) -> None:
        """The kept sums multiplied by ``coef`` (a clipped step)."""
        for t in self.summed.values():
            t.mul_(coef.to(t.device))
