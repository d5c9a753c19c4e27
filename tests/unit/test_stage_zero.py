"""runtime.stage_zero without a process group (one replica: each shard is the whole): ZeRO-2's
buckets, their order, the hooks that start them under the backward, and the update's numerics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memtrain.runtime.stage_zero import ShardedOptimizer, zero2_buckets


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def test_buckets_go_last_parameter_first_cut_at_their_size_the_deferred_last():
    params = list(_model().parameters())  # 128, 16, 256, 16, 64, 4 elements
    assert zero2_buckets(params, set(), 100) == [[5, 4, 3], [2], [1], [0]]
    assert zero2_buckets(params, set(), 300) == [[5, 4, 3], [2, 1], [0]]
    assert zero2_buckets(params, {id(params[0]), id(params[5])}, 300) == [[4, 3], [2, 1], [0, 5]]


def test_zero2_starts_each_bucket_under_the_backward_and_steps_as_torch():
    """Armed before the last of two micro-batches' backward: every bucket has started (in order)
    and no parameter keeps its .grad when the backward ends; the held gradient bytes never exceed
    the whole gradient plus a bucket; the update equals torch's AdamW on the summed gradients."""
    model, ref = _model(), _model()
    params = list(model.parameters())
    opt = ShardedOptimizer(params, lambda ps: torch.optim.AdamW(ps, lr=1e-2), replica=0, dp=1, group=None, rank=0,
                           timeout_s=5.0, buckets=zero2_buckets(params, set(), 100))
    started: list[int] = []
    start = opt._start
    opt._start = lambda k: (started.append(k), start(k))[1]
    torch.manual_seed(1)
    xs = [torch.randn(3, 8) for _ in range(2)]
    model(xs[0]).square().sum().backward()
    opt.arm("0REDUCE_SCATTER1")
    model(xs[1]).square().sum().backward()
    assert started == list(range(len(opt.buckets)))
    assert all(q.grad is None for q in params)
    whole = 4 * sum(q.numel() for q in params)
    assert whole <= opt.peak_grad_bytes <= whole + 4 * 256
    opt.reduce_grads("0ALLREDUCE")
    opt.step()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for x in xs:
        ref(x).square().sum().backward()
    ref_opt.step()
    for a, b in zip(params, ref.parameters()):
        assert torch.equal(a, b)


class _Checked(ShardedOptimizer):
    """A sharded optimizer that checks its running count against a full recount at every reading:
    every gradient tensor it holds, by storage bytes, plus the bucket copy being made then."""

    checks = 0

    def _note(self, copying: int) -> None:
        super()._note(copying)
        storages = [q.grad.untyped_storage() for q in self.params if q.grad is not None]
        storages += [p.flat.untyped_storage() for _, p in self._pending if p.flat is not None]
        storages += [t.untyped_storage() for t in self._pieces.values()]
        storages += [self._grad.untyped_storage()] if self._grad is not None else []
        held = sum({st.data_ptr(): st.nbytes() for st in storages}.values())
        assert self._held == held + copying, (self._held, held, copying)
        type(self).checks += 1


@pytest.mark.parametrize("microbatches", [1, 2])
@pytest.mark.parametrize("deferred_grad", ["dropped", "zeros"])
def test_running_gradient_count_equals_a_recount_at_every_reading(microbatches: int, deferred_grad: str) -> None:
    """[Note: gradient bytes counted as they change]: with one micro-batch every .grad appears
    after ``arm`` (a deferred parameter's without starting anything), with two they were there;
    a deferred .grad changed without a report before ``reduce_grads`` (dropped, or the zeros the
    worker's ALLREDUCE makes for a tied weight without one, runtime.stage_step_end) counts at the
    first reading after, its bucket's copy."""
    model = _model()
    params = list(model.parameters())
    deferred = {id(params[0])}
    opt = _Checked(params, lambda ps: torch.optim.AdamW(ps, lr=1e-2), replica=0, dp=1, group=None, rank=0,
                   timeout_s=5.0, buckets=zero2_buckets(params, deferred, 100), deferred=deferred)
    torch.manual_seed(1)
    x = torch.randn(3, 8)
    for _ in range(microbatches - 1):
        model(x).square().sum().backward()
    _Checked.checks = 0
    opt.arm("0REDUCE_SCATTER1")
    model(x).square().sum().backward()
    params[0].grad = None if deferred_grad == "dropped" else torch.zeros_like(params[0])
    opt.reduce_grads("0ALLREDUCE")
    assert _Checked.checks >= len(params) + len(opt.buckets)  # every report and start was checked
    assert opt.peak_grad_bytes >= 4 * sum(q.numel() for q in params[1:])


def test_gradient_bookkeeping_is_linear_in_the_parameters() -> None:
    """A step's reads of the parameters' .grad grow with their number, not its square (a recount
    per report read all 80 per report: about 80 * 80 reads here)."""
    model = nn.Sequential(*(nn.Linear(2, 2) for _ in range(40)))
    params = list(model.parameters())
    opt = ShardedOptimizer(params, lambda ps: torch.optim.SGD(ps, lr=1e-2), replica=0, dp=1, group=None, rank=0,
                           timeout_s=5.0, buckets=zero2_buckets(params, set(), 6))
    reads = 0
    real = nn.Parameter.grad

    def counted(q):
        nonlocal reads
        reads += 1
        return real.__get__(q)

    opt.arm("0REDUCE_SCATTER1")
    nn.Parameter.grad = property(counted, real.__set__)
    try:
        model(torch.randn(3, 2)).square().sum().backward()
        opt.reduce_grads("0ALLREDUCE")
    finally:
        nn.Parameter.grad = real
    assert 0 < reads <= 10 * len(params), reads
