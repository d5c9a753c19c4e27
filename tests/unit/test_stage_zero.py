"""runtime.stage_zero without a process group (one replica: each shard is the whole): ZeRO-2's
buckets, their order, the hooks that start them under the backward, and the update's numerics."""

from __future__ import annotations

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
