"""ZeRO-1 and ZeRO-2 for one pipeline stage: optimizer states (and gradients) sharded across replicas.

ZeRO stage 1 (Rajbhandari et al. 2020, Sec. 5.1, P_os): each of the ``dp`` replicas of a stage
keeps the optimizer states of one shard of the stage's parameters, and so about ``1 / dp`` of
them. The parameters are flattened in buckets (ZeRO-1: one bucket, ``owns`` order); replica
``d``'s shard is slice ``d`` of every bucket (``ceil(n / dp)`` elements, the last one shorter).
The stage's ``ALLREDUCE`` is a reduce-scatter instead (``reduce_grads``): each replica receives
the sum of its shard's gradients only. Its ``OPTIM`` updates the shard, from an fp32 copy of the
shard's parameters, with the stage's own ``torch.optim`` optimizer, then the replicas all-gather
the updated shards and every replica copies the whole back into its parameters. A
reduce-scatter and an all-gather move what one all-reduce moves, so the sharding costs no extra
traffic (Sec. 7.2.1).

[Note: ZeRO-2 in a pipeline] ZeRO stage 2 (P_os+g) also partitions the gradients: in DeepSpeed
each bucket is reduced to its owner as soon as the backward fills it, so no replica ever holds
the whole gradient. A pipeline stage accumulates its gradients over the step's micro-batches, so
the whole gradient exists until the last micro-batch's backward (DeepSpeed refuses ZeRO-2 with
pipeline parallelism for that reason). Here ZeRO-2 is: the program's ``sREDUCE_SCATTER<i>``,
right before the stage's last gradient pass (its last ``B``, or ``W`` where the backward is
split), arms hooks on the parameters (``register_post_accumulate_grad_hook``; a ``W`` reports
its parameters itself, last module first); as each bucket's gradients are final, in the order the
backward finishes them, the bucket is copied out, its parameters' ``.grad`` dropped and its
reduce-scatter started asynchronously, buckets in one fixed order on every replica. A bucket
whose turn comes while ``MAX_IN_FLIGHT`` are under way keeps its gradients until one has ended
(looked at in each hook: the backward never waits for the network). ``sALLREDUCE`` starts the
buckets left (parameters shared with another stage or tied across ranks, which are final only
there) and waits for every one, before ``OPTIM``.

What it saves: the sum no longer holds the gradient twice (ZeRO-0 and ZeRO-1 copy the whole
gradient into one flat buffer beside it; ZeRO-2 holds it plus at most ``MAX_IN_FLIGHT`` buckets,
shrinking to the shard), and the reduce-scatter can run under the last backward. Measured
(``bench/pipeline_zero.py``: pp 2 × dp 2, 4 layers × 128, 2 MiB of gradients per rank, buckets of
64k elements; ``StepResult.grad_bytes``): most gradient bytes while summing 2.00x the gradient
for ZeRO-0 and -1, 1.12-1.25x for ZeRO-2 (the head's table is a bucket of its own); at
``OPTIM`` 1.00x, 0.50x, 0.50x. What it does not save: the peak while gradients accumulate
(each earlier micro-batch's backward holds the whole gradient, as under ZeRO-1), and after the
sum ZeRO-1 already keeps only the ``1 / dp`` shard. On CPU workers sharing few cores the overlap
gains no time (gloo's thread competes with the backward); the simulator's figure is
planner.simulate_pipeline [Note: ZeRO-2 overlap].

[Note: ZeRO-1 parity] The update is elementwise, so each element gets the arithmetic it gets
without sharding, from the same summed gradient when the reduce-scatter sums in the all-reduce's
order. With 2 replicas every sum is of two terms, the same in any order: the losses are bitwise
those of data parallelism without sharding, with ZeRO-1 or ZeRO-2 (whose buckets only move
elements between the shards). With more, gloo may add the replicas in another order: within the
data-parallel tolerance (test_pipeline_run.py [Note: pipeline tolerances]).

[Note: gradient bytes counted as they change] ``peak_grad_bytes`` is read at every gradient
report, copy and wait of the step; recounting every parameter's ``.grad`` there made the step's
bookkeeping quadratic in the parameters (a stage of P parameters: about P reports of P reads
each). ``HeldGrads`` keeps the count per parameter instead, updated only for the parameter or
bucket that changed (linear): all of them at ``arm``, one at its report (a deferred one's too,
which starts nothing; a ``W`` reports a parameter to the stage that owns it, so a table another
stage of the rank grows is counted by its owner), a bucket's at its copy (a tied weight's zeros
made at ``ALLREDUCE`` included), and the pieces kept by their storage (a view of the padded
reduce-scatter output). Each reading is that sum as it stands plus the copy being made, never a
delta on the last reading (buckets finished in between would be missed): every reading equals a
recount of every gradient storage held (tests/integration/test_pipeline_zero2_count.py).
``grad_bytes`` stays the full recount, read once a step and by the tests against the running
figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from memtrain.comm import PendingReduce, all_gather, reduce_scatter, start_reduce_scatter
from memtrain.planner.simulate_pipeline import REDUCE_BUCKET_ELEMS, REDUCE_IN_FLIGHT

__all__ = ["ShardedOptimizer", "HeldGrads", "zero2_buckets", "MAX_IN_FLIGHT", "BUCKET_ELEMS"]

MAX_IN_FLIGHT = REDUCE_IN_FLIGHT
"""ZeRO-2: a stage's reduce-scatters under way at once (the simulator's figure too)."""
BUCKET_ELEMS = REDUCE_BUCKET_ELEMS
"""ZeRO-2: elements per gradient bucket by default (16 MiB of fp32; a parameter larger than it is
a bucket of its own; the planner's figure too)."""


def zero2_buckets(params: Sequence[nn.Parameter], deferred: set[int], bucket_elems: int) -> list[list[int]]:
    """[Note: ZeRO-2 in a pipeline] The stage's buckets as indices into ``params``: those not in
    ``deferred`` (ids of parameters final only at ``ALLREDUCE``) last first, the order the
    backward finishes them, cut at ``bucket_elems``; then one bucket of the deferred ones."""
    out: list[list[int]] = []
    size = 0
    for i in reversed(range(len(params))):
        if id(params[i]) in deferred:
            continue
        if not out or size + params[i].numel() > bucket_elems and out[-1]:
            out.append([])
            size = 0
        out[-1].append(i)
        size += params[i].numel()
    late = [i for i, q in enumerate(params) if id(q) in deferred]
    return out + ([late] if late else [])


class HeldGrads:
    """The bytes of the ``.grad`` some parameters hold, updated one parameter at a time ([Note:
    gradient bytes counted as they change]; runtime.stage_offload_zero's too)."""

    def __init__(self) -> None:
        self._by: dict[int, int] = {}
        self.total = 0

    def note(self, param: nn.Parameter) -> None:
        """``param``'s ``.grad`` as it is now (none: 0 bytes)."""
        g = param.grad
        n = 0 if g is None else g.numel() * g.element_size()
        self.total += n - self._by.get(id(param), 0)
        self._by[id(param)] = n

    def reset(self, params: Iterable[nn.Parameter]) -> None:
        """Count ``params`` afresh (and forget any other)."""
        self._by, self.total = {}, 0
        for q in params:
            self.note(q)


class ShardedOptimizer:
    """A stage's optimizer over this replica's shard (see the module doc); ``step``,
    ``zero_grad``, ``param_groups`` and ``state`` as a ``torch.optim`` optimizer's, so the
    worker drives it as one, plus ``reduce_grads`` for the stage's ``ALLREDUCE`` and, under
    ZeRO-2 (``buckets`` given), ``arm`` for its ``REDUCE_SCATTER``."""

    def __init__(self, params: list[nn.Parameter], make: Callable[[list[nn.Parameter]], torch.optim.Optimizer], *,
                 replica: int, dp: int, group: dist.ProcessGroup | None, rank: int, timeout_s: float,
                 buckets: list[list[int]] | None = None, deferred: set[int] = frozenset(),
                 group_of: Sequence[int] | None = None) -> None:
        self.params = params
        self.replica, self.dp, self.group, self.rank, self.timeout_s = replica, dp, group, rank, timeout_s
        self.zero2 = buckets is not None
        self.buckets = buckets if buckets is not None else [list(range(len(params)))]
        """Per bucket, its parameters (indices into ``params``), in the order they are reduced."""
        self.slices: list[tuple[int, int, int]] = []
        """Per bucket: its elements, the length of each replica's slice, this replica's slice's length."""
        pieces = []
        for idx in self.buckets:
            n = sum(params[i].numel() for i in idx)
            per = math.ceil(n / dp)
            lo, hi = min(n, replica * per), min(n, (replica + 1) * per)
            self.slices.append((n, per, hi - lo))
            if hi > lo:
                pieces.append(torch.cat([params[i].detach().reshape(-1) for i in idx])[lo:hi])
        flat = torch.cat(pieces) if pieces else params[0].detach().new_zeros(0)
        self.master = nn.Parameter(flat.clone())
        """The shard's parameters, fp32: what the optimizer updates."""
        self.parts = self._group_parts(group_of) if group_of is not None else []
        """[Note: groups of a shard] ``(start, end, group)`` stretches of ``master``; empty: one group."""
        self._views = [nn.Parameter(self.master.detach()[a:b]) for a, b, _ in self.parts]
        self.optimizer = make([{"params": [v], "group": g} for v, (_, _, g) in zip(self._views, self.parts)]
                              if self.parts else [self.master])
        self._grad: torch.Tensor | None = None  # the shard's summed gradients, from reduce_grads
        # ZeRO-2: per parameter id its bucket; hooks on the parameters of the buckets that can go early
        self._bucket_of = {id(params[i]): k for k, idx in enumerate(self.buckets) for i in idx}
        self._early = {id(q) for q in params if id(q) not in deferred} if self.zero2 else set()
        self._armed: str | None = None
        self._left: list[int] = []  # per bucket, its parameters not final yet
        self._next = 0  # the next bucket to start (every replica starts them in this order)
        self._pending: list[tuple[int, PendingReduce]] = []
        self._pieces: dict[int, torch.Tensor] = {}
        self._held = 0  # gradient bytes held while armed: parameters' .grad, buckets under way, shard pieces
        self._grads = HeldGrads()  # [Note: gradient bytes counted as they change]
        self._pieces_bytes = 0
        self.peak_grad_bytes = 0
        """The most gradient bytes this stage held from its reduce's start to its end (the last
        ``reduce_grads``), its parameters' ``.grad`` included."""
        if self.zero2:
            for q in params:  # a deferred one's only counted
                q.register_post_accumulate_grad_hook(self.grad_ready)

    def _group_parts(self, group_of: Sequence[int]) -> list[tuple[int, int, int]]:
        """[Note: groups of a shard] With parameter groups (``group_of``: per parameter its group),
        the shard is cut into stretches of one group each, every one a parameter of the optimizer
        (a view of ``master``, so the update lands there) in a param group tagged ``group``; the
        update is elementwise, so each element gets its group's arithmetic as unsharded."""
        parts: list[tuple[int, int, int]] = []
        for i, start, end, _ in self._shard_pieces():
            g = group_of[i]
            if parts and parts[-1][2] == g and parts[-1][1] == start:
                parts[-1] = (parts[-1][0], end, g)
            else:
                parts.append((start, end, g))
        return parts

    def _shard_pieces(self) -> Iterator[tuple[int, int, int, bool]]:
        """Per parameter with elements in this replica's shard, in shard order: its index in
        ``params``, where its piece starts and ends in the replica's flat shard (its buckets'
        shares one after another), and whether the piece is the whole parameter."""
        at = 0
        for (n, per, mine), idx in zip(self.slices, self.buckets):
            lo, offset = min(n, self.replica * per), 0
            for i in idx:
                size = self.params[i].numel()
                a, b = max(offset, lo), min(offset + size, lo + mine)
                if b > a:
                    yield i, at + a - lo, at + b - lo, a == offset and b == offset + size
                offset += size
            at += mine

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @property
    def grad_bytes(self) -> int:
        """Gradient bytes this stage holds now: its parameters' ``.grad`` and the shard's sums."""
        held = sum(q.grad.numel() * q.grad.element_size() for q in self.params if q.grad is not None)
        return held + (0 if self._grad is None else self._grad.numel() * self._grad.element_size())

    # ---- ZeRO-2: buckets reduced under the backward -------------------------------------------

    def arm(self, what: str) -> None:
        """``REDUCE_SCATTER``: from now on each bucket is reduce-scattered once its parameters'
        gradients are final ([Note: ZeRO-2 in a pipeline])."""
        if not self.zero2:
            raise RuntimeError(f"rank {self.rank}: {what} in the program of a stage without ZeRO-2")
        self._armed, self._next, self._pending, self._pieces, self._pieces_bytes = what, 0, [], {}, 0
        self._left = [sum(1 for i in idx if id(self.params[i]) in self._early) for idx in self.buckets]
        self._grads.reset(self.params)
        self._held = self.grad_bytes
        self.peak_grad_bytes = self._held

    def grad_ready(self, param: nn.Parameter) -> None:
        """A parameter's gradient is final for the step (its hook, or the worker's ``W``)."""
        if self._armed is None or id(param) not in self._bucket_of:
            return
        self._grads.note(param)
        if id(param) not in self._early:  # deferred: final only at ALLREDUCE
            return
        k = self._bucket_of[id(param)]
        self._left[k] -= 1
        self._note(0)  # the .grad just grown (a first micro-batch's) counts
        while self._pending and self._pending[0][1].done():  # never waits here: the backward goes on
            self._finish_oldest()
        while (self._next < len(self.buckets) and self._left[self._next] == 0 and self._is_early(self._next)
               and len(self._pending) < MAX_IN_FLIGHT):
            self._start(self._next)

    def _is_early(self, k: int) -> bool:
        return any(id(self.params[i]) in self._early for i in self.buckets[k])

    def _note(self, copying: int) -> None:
        """A reading: the held bytes as they stand, by the running counts (``held_bytes``), plus
        ``copying`` bytes of a copy being made and not yet held anywhere counted. Never a delta
        on the last reading: a bucket finished between two readings (its input given back, its
        piece kept) would be missed."""
        self._held = self.held_bytes + copying
        self.peak_grad_bytes = max(self.peak_grad_bytes, self._held)

    @property
    def held_bytes(self) -> int:
        """``grad_bytes`` and the buffers under way as counted along the step ([Note: gradient
        bytes counted as they change])."""
        shard = 0 if self._grad is None else self._grad.numel() * self._grad.element_size()
        return self._grads.total + shard + self._in_flight()

    def _in_flight(self) -> int:
        return sum(p.input_bytes for _, p in self._pending) + self._pieces_bytes  # at most MAX_IN_FLIGHT pending

    def _keep_piece(self, k: int, piece: torch.Tensor) -> None:
        """Keep bucket ``k``'s shard piece, counted by its storage: a view of the reduce-scatter's
        output, which holds the padded slice (``per`` elements) where this replica's is shorter."""
        self._pieces[k] = piece
        self._pieces_bytes += piece.untyped_storage().nbytes()

    def _start(self, k: int) -> None:
        """Bucket ``k``'s gradients copied out (their ``.grad`` dropped) and its reduce-scatter started."""
        n, per, _ = self.slices[k]
        while self.group is not None and len(self._pending) >= MAX_IN_FLIGHT:
            self._finish_oldest()
        flat = torch.zeros(per * self.dp, dtype=self.master.dtype, device=self.master.device)
        offset = 0
        for i in self.buckets[k]:
            q = self.params[i]
            self._grads.note(q)  # as it is now, whoever made it
            if q.grad is not None:
                flat[offset:offset + q.numel()] = q.grad.reshape(-1)
            offset += q.numel()
        self._note(flat.numel() * flat.element_size())  # the copy, before the .grad go
        for i in self.buckets[k]:
            self.params[i].grad = None
            self._grads.note(self.params[i])
        what = f"{self._armed or 'ALLREDUCE'} (bucket {k})"
        if self.group is None:  # one replica: its slice is the whole bucket
            self._keep_piece(k, flat[:self.slices[k][2]])
        else:
            self._pending.append((k, start_reduce_scatter(flat, self.group, rank=self.rank, what=what,
                                                          timeout_s=self.timeout_s)))
        self._next = k + 1
        self._note(0)

    def _finish_oldest(self) -> None:
        k, p = self._pending.pop(0)
        self._keep_piece(k, p.wait()[:self.slices[k][2]].to(self.master.device))

    # ---- the step --------------------------------------------------------------------------

    def reduce_grads(self, what: str) -> None:
        """``ALLREDUCE``: this shard's gradients summed across the replicas, bucket by bucket (a
        reduce-scatter of each bucket's flat gradients, padded to ``dp`` equal slices); the
        parameters' own are dropped. Under ZeRO-2, the buckets not started yet start here and
        every one is waited for."""
        if self._armed is None:  # ZeRO-1 (or a ZeRO-2 program that never armed: all buckets here)
            self._next, self._pending, self._pieces, self._pieces_bytes = 0, [], {}, 0
            self._grads.reset(self.params)
            self._held = self.peak_grad_bytes = self.grad_bytes
            if not self.zero2:
                self._reduce_one_bucket(what)
                return
        self._armed = self._armed or what
        while self._next < len(self.buckets):
            self._start(self._next)
        while self._pending:
            self._finish_oldest()
        self._grad = torch.cat([self._pieces[k] for k in range(len(self.buckets))])
        self._pieces, self._pieces_bytes, self._armed = {}, 0, None
        self._note(0)

    def _reduce_one_bucket(self, what: str) -> None:
        """ZeRO-1's reduce-scatter of the whole stage as one flat buffer after the backward."""
        n, per, mine = self.slices[0]
        flat = torch.zeros(per * self.dp, dtype=self.master.dtype)  # gloo sums host memory
        self._note(flat.numel() * flat.element_size())
        offset = 0
        for p in self.params:
            if p.grad is not None:
                flat[offset:offset + p.numel()] = p.grad.reshape(-1)
            offset += p.numel()
            p.grad = None
        if self.group is None:  # one replica: its shard is the whole
            self._grad = flat
        else:
            self._grad = reduce_scatter(flat, self.group, rank=self.rank, what=what, timeout_s=self.timeout_s)
        self._grad = self._grad[:mine].to(self.master.device)

    def grad_pieces(self) -> list[tuple[int, torch.Tensor, bool]]:
        """After ``reduce_grads``: per parameter with elements in this replica's shard, its index
        in ``params``, the shard's (flat) view of its summed gradient there and whether that is the
        whole parameter (runtime.stage_clip [Note: the global norm of a pipeline])."""
        if self._grad is None:
            return []
        return [(i, self._grad[start:end], whole) for i, start, end, whole in self._shard_pieces()]

    def scale_grads(self, coef: torch.Tensor) -> None:
        """The shard's summed gradients multiplied by ``coef`` (a clipped step)."""
        if self._grad is not None:
            self._grad.mul_(coef.to(self._grad.device))

    def step(self, what: str = "OPTIM") -> None:
        """Update this shard from its summed gradients, then gather every shard into the
        parameters ([Note: ZeRO-1 parity])."""
        if self._grad is None:
            raise RuntimeError(f"rank {self.rank}: {what} before its ALLREDUCE: a sharded stage's gradients are "
                               "summed there")
        if self.parts:  # [Note: groups of a shard]
            for v, (a, b, _) in zip(self._views, self.parts):
                v.grad = self._grad[a:b]
        else:
            self.master.grad = self._grad
        self._grad = None
        self.optimizer.step()
        self.master.grad = None
        for v in self._views:
            v.grad = None
        shard = torch.zeros(sum(per for _, per, _ in self.slices), dtype=self.master.dtype)
        offsets, at, got = [], 0, 0
        for _, per, mine in self.slices:  # this replica's slice of each bucket, padded to the bucket's slice length
            shard[at:at + mine] = self.master.detach()[got:got + mine]
            offsets.append(at)
            at, got = at + per, got + mine
        if self.group is None:
            whole = shard
        else:
            whole = all_gather(shard, self.group, rank=self.rank, what=f"{what} (gathering the shards)",
                               timeout_s=self.timeout_s)
        total = shard.numel()
        with torch.no_grad():
            for (n, per, _), idx, at in zip(self.slices, self.buckets, offsets):
                bucket = torch.cat([whole[d * total + at:d * total + at + per] for d in range(self.dp)])
                offset = 0
                for i in idx:
                    p = self.params[i]
                    p.copy_(bucket[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()

    def state_dict(self) -> dict[str, Any]:
        """The shard's optimizer state (a checkpoint keeps one per rank)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The shard's optimizer state back; the shard's fp32 parameters taken again from the
        parameters (loaded before it)."""
        with torch.no_grad():
            got = 0
            for (n, per, mine), idx in zip(self.slices, self.buckets):
                lo = min(n, self.replica * per)
                self.master[got:got + mine] = torch.cat([self.params[i].detach().reshape(-1) for i in idx])[lo:lo + mine]
                got += mine
        self.optimizer.load_state_dict(state)

    def abandon(self) -> None:
        """A failed step (runtime.stage_failure): its gradients, buckets under way and shard sums
        dropped, disarmed. A reduce-scatter under way is not waited for (its replicas may never
        join it); the process group keeps its buffers until it ends."""
        self._armed, self._next, self._pending, self._pieces, self._pieces_bytes = None, 0, [], {}, 0
        self.zero_grad()
        self._grads.reset(self.params)
        self._held = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self._grad = None
