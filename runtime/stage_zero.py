"""ZeRO-1 for one pipeline stage: its optimizer states sharded across the data-parallel replicas.

ZeRO stage 1 (Rajbhandari et al. 2020, Sec. 5.1, P_os): each of the ``dp`` replicas of a stage
keeps the optimizer states of one contiguous shard of the stage's parameters, flattened in
``owns`` order (shard ``d`` of ``ceil(N / dp)`` elements, the last one shorter), and so about
``1 / dp`` of them. At ``OPTIM`` each replica updates its shard, from an fp32 copy of the
shard's parameters and the gradients ``ALLREDUCE`` already summed, with the stage's own
``torch.optim`` optimizer, then the replicas all-gather the updated shards and every replica
copies the whole back into its parameters.

[Note: ZeRO-1 parity] The update is elementwise and reads the same summed gradient on every
replica, so each element gets the arithmetic it gets without sharding: losses are bitwise those
of data parallelism without sharding. The gradients are summed by the all-reduce the stage runs
anyway (not a reduce-scatter), which keeps that sum, and so parity, the same; the cost is
moving the whole gradient where a reduce-scatter would move a shard of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from memtrain.comm import all_gather

__all__ = ["ShardedOptimizer"]


class ShardedOptimizer:
    """A stage's optimizer over this replica's shard (see the module doc); ``step``,
    ``zero_grad``, ``param_groups`` and ``state`` as a ``torch.optim`` optimizer's, so the
    worker drives it as one."""

    def __init__(self, params: list[nn.Parameter], make: Callable[[list[nn.Parameter]], torch.optim.Optimizer], *,
                 replica: int, dp: int, group: dist.ProcessGroup | None, rank: int, what: str,
                 timeout_s: float) -> None:
        self.params = params
        self.dp, self.group, self.rank, self.what, self.timeout_s = dp, group, rank, what, timeout_s
        total = sum(p.numel() for p in params)
        self.shard_elems = math.ceil(total / dp)
        self.lo = min(total, replica * self.shard_elems)
        self.hi = min(total, self.lo + self.shard_elems)
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        self.master = nn.Parameter(flat[self.lo:self.hi].clone())
        """The shard's parameters, fp32: what the optimizer updates."""
        self.optimizer = make([self.master])

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def step(self) -> None:
        """Update this shard from the summed gradients, then gather every shard into the
        parameters ([Note: ZeRO-1 parity])."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.master.grad = torch.cat([g.reshape(-1) for g in grads])[self.lo:self.hi]
        self.optimizer.step()
        self.master.grad = None
        shard = torch.zeros(self.shard_elems, dtype=self.master.dtype)
        shard[:self.hi - self.lo] = self.master.detach()
        if self.group is None:  # one replica: the shard is the whole
            whole = shard
        else:
            whole = all_gather(shard, self.group, rank=self.rank, what=f"{self.what} (gathering the shards)",
                               timeout_s=self.timeout_s)
        offset = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(whole[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
