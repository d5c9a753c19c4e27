"""ZeRO-1 for one pipeline stage: its optimizer states sharded across the data-parallel replicas.

ZeRO stage 1 (Rajbhandari et al. 2020, Sec. 5.1, P_os): each of the ``dp`` replicas of a stage
keeps the optimizer states of one contiguous shard of the stage's parameters, flattened in
``owns`` order (shard ``d`` of ``ceil(N / dp)`` elements, the last one shorter), and so about
``1 / dp`` of them. The stage's ``ALLREDUCE`` is a reduce-scatter instead (``reduce_grads``):
each replica receives the sum of its shard's gradients only. Its ``OPTIM`` updates the shard,
from an fp32 copy of the shard's parameters, with the stage's own ``torch.optim`` optimizer,
then the replicas all-gather the updated shards and every replica copies the whole back into
its parameters. A reduce-scatter and an all-gather move what one all-reduce moves, so the
sharding costs no extra traffic (Sec. 7.2.1).

[Note: ZeRO-1 parity] The update is elementwise, so each element gets the arithmetic it gets
without sharding, from the same summed gradient when the reduce-scatter sums in the all-reduce's
order. With 2 replicas every sum is of two terms, the same in any order: the losses are bitwise
those of data parallelism without sharding. With more, gloo may add the replicas in another
order: within the data-parallel tolerance (test_pipeline_run.py [Note: pipeline tolerances]).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from memtrain.comm import all_gather, reduce_scatter

__all__ = ["ShardedOptimizer"]


class ShardedOptimizer:
    """A stage's optimizer over this replica's shard (see the module doc); ``step``,
    ``zero_grad``, ``param_groups`` and ``state`` as a ``torch.optim`` optimizer's, so the
    worker drives it as one, plus ``reduce_grads`` for the stage's ``ALLREDUCE``."""

    def __init__(self, params: list[nn.Parameter], make: Callable[[list[nn.Parameter]], torch.optim.Optimizer], *,
                 replica: int, dp: int, group: dist.ProcessGroup | None, rank: int, timeout_s: float) -> None:
        self.params = params
        self.dp, self.group, self.rank, self.timeout_s = dp, group, rank, timeout_s
        total = sum(p.numel() for p in params)
        self.shard_elems = math.ceil(total / dp)
        self.lo = min(total, replica * self.shard_elems)
        self.hi = min(total, self.lo + self.shard_elems)
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        self.master = nn.Parameter(flat[self.lo:self.hi].clone())
        """The shard's parameters, fp32: what the optimizer updates."""
        self.optimizer = make([self.master])
        self._grad: torch.Tensor | None = None  # the shard's summed gradients, from reduce_grads

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def reduce_grads(self, what: str) -> None:
        """``ALLREDUCE``: this shard's gradients summed across the replicas (a reduce-scatter of
        the flat gradients, padded to ``dp`` equal shards); the parameters' own are dropped."""
        flat = torch.zeros(self.shard_elems * self.dp, dtype=self.master.dtype)  # gloo sums host memory
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
        self._grad = self._grad[:self.hi - self.lo].to(self.master.device)

    def step(self, what: str = "OPTIM") -> None:
        """Update this shard from its summed gradients, then gather every shard into the
        parameters ([Note: ZeRO-1 parity])."""
        if self._grad is None:
            raise RuntimeError(f"rank {self.rank}: {what} before its ALLREDUCE: a sharded stage's gradients are "
                               "summed there")
        self.master.grad, self._grad = self._grad, None
        self.optimizer.step()
        self.master.grad = None
        shard = torch.zeros(self.shard_elems, dtype=self.master.dtype)
        shard[:self.hi - self.lo] = self.master.detach()
        if self.group is None:
            whole = shard
        else:
            whole = all_gather(shard, self.group, rank=self.rank, what=f"{what} (gathering the shards)",
                               timeout_s=self.timeout_s)
        offset = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(whole[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def state_dict(self) -> dict[str, Any]:
        """The shard's optimizer state (a checkpoint keeps one per rank)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The shard's optimizer state back; the shard's fp32 parameters taken again from the
        parameters (loaded before it)."""
        with torch.no_grad():
            self.master.copy_(torch.cat([p.detach().reshape(-1) for p in self.params])[self.lo:self.hi])
        self.optimizer.load_state_dict(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self._grad = None
