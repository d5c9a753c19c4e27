"""A pipeline rank's step end (``runtime.stage_worker.StageWorker`` inherits it): the handlers of
``ALLREDUCE``, ``REDUCE_SCATTER``, ``CLIP`` and ``OPTIM``, which sum the stages' gradients over the
tied ranks and the replicas (whole, or by shard under ZeRO: runtime.stage_zero,
runtime.stage_offload_zero), clip them by the global norm (runtime.stage_clip) and step the
optimizers, counting the gradient bytes held on the way (``StepResult.grad_bytes``). Kept apart
from the forward, backward and transfers, which only produce the gradients these consume."""

from __future__ import annotations

import torch

from memtrain.comm import all_reduce_
from memtrain.planner.plan import Action
from memtrain.runtime.stage_clip import clip_rank
from memtrain.runtime.stage_zero import ShardedOptimizer

__all__ = ["StageStepEnd", "grad_report"]


class StageStepEnd:
    """The step-end handlers of ``StageWorker``; they use its spec, stages (``owns``, ``tied``,
    ``optims``, ``offloaded``), groups and the step's ``grad_bytes`` and learning rate."""

    def _all_reduce(self, a: Action) -> None:
        """Sum the stage's gradients: a weight the first and last stages share across the two
        ends' ranks, then across the replicas (each replica's loss was already divided by the
        global batch's micro-batches, so the sum is the mean); under ZeRO-1 a reduce-scatter,
        each replica getting the sums of its shard only, under ZeRO-2 the buckets not started
        since its ``REDUCE_SCATTER`` and the wait for all (runtime.stage_zero)."""
        s = a.stage
        opt = self.optims.get(s)
        tied = self.tied.get(s, [])
        reducer = self.offloaded[s].reducer if s in self.offloaded else None
        # ZeRO-2 dropped the .grad of the buckets it started: only the tied ones are needed here
        for q in tied if isinstance(opt, ShardedOptimizer) and opt.zero2 or reducer is not None else self.owns[s]:
            if q.grad is None:
                q.grad = torch.zeros_like(q)
        if tied:
            all_reduce_([q.grad for q in tied], self.tie_group, rank=self.rank, what=f"{a} (tied weights)",
                        timeout_s=self.spec.timeout_s)
        if reducer is not None:  # ZeRO-2 of an offloaded stage: the chunks left, then the waits
            reducer.reduce(str(a))
            self._count_grads("reduce_peak", reducer.peak_grad_bytes)
            self._count_grads("offloaded_after", reducer.grad_bytes)
            return
        if isinstance(opt, ShardedOptimizer):  # ZeRO-1: a reduce-scatter; ZeRO-2: the rest, then the waits
            opt.reduce_grads(str(a))
            self._count_grads("reduce_peak", opt.peak_grad_bytes)
            return
        held = sum(q.grad.numel() * q.grad.element_size() for q in self.owns[s])
        if self.spec.dp > 1:  # all_reduce_ sums one flat copy of them
            all_reduce_([q.grad for q in self.owns[s]], self.dp_group, rank=self.rank, what=str(a),
                        timeout_s=self.spec.timeout_s)
        self._count_grads("reduce_peak", held * (2 if self.spec.dp > 1 else 1))
        if s in self.offloaded:  # what its OFFLOAD moves to the home: every gradient, summed
            self._count_grads("offloaded_after", held)

    def _reduce_scatter(self, a: Action) -> None:
        """ZeRO-2: the stage's buckets reduce-scattered from here on (runtime.stage_zero), an
        offloaded stage's chunks reduced to their owners (runtime.stage_offload_zero)."""
        st = self.offloaded.get(a.stage)
        if st is not None and st.reducer is not None:
            st.reducer.arm(str(a))
            return
        opt = self.optims.get(a.stage)
        if not isinstance(opt, ShardedOptimizer) or not opt.zero2:
            raise RuntimeError(f"rank {self.rank}: {a} in its program, but stage {a.stage} is not under ZeRO-2")
        opt.arm(str(a))

    def _count_grads(self, key: str, num_bytes: int) -> None:
        """StepResult.grad_bytes: the stages' figures added up."""
        self.grad_bytes[key] = self.grad_bytes.get(key, 0) + num_bytes

    def _optim(self, a: Action) -> None:
        if "at_optim" not in self.grad_bytes:
            self.grad_bytes["at_optim"] = sum(
                opt.grad_bytes if isinstance(opt, ShardedOptimizer)
                else sum(q.grad.numel() * q.grad.element_size() for q in self.owns[s] if q.grad is not None)
                for s, opt in self.optims.items())
        if a.stage in self.offloaded:
            self.offloaded[a.stage].step(self._lr)
            return
        opt = self.optims.get(a.stage)
        if isinstance(opt, ShardedOptimizer):
            opt.step(str(a))
        elif opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    def _clip(self, a: Action) -> None:
        """``CLIP``: the rank's gradients clipped by the global norm (runtime.stage_clip ``clip_rank``)."""
        self._grad_norm = clip_rank(self, str(a))


def grad_report(worker, stage: int):
    """What a parameter ``stage`` of ``worker`` owns reports when its gradient is final: the
    ZeRO-2 stage's ``grad_ready`` (its buckets', runtime.stage_zero, or an offloaded stage's
    chunks', runtime.stage_offload_zero), or None."""
    st = worker.offloaded.get(stage)
    if st is not None:
        return st.reducer.grad_ready if st.reducer is not None else None
    opt = worker.optims.get(stage)
    return opt.grad_ready if isinstance(opt, ShardedOptimizer) and opt.zero2 else None
