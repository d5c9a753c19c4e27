"""The optimizers' kernels (memtrain.optimizers) equal torch.optim on flat chunk buffers."""

from __future__ import annotations

import pytest
import torch

from memtrain.errors import UserError
from memtrain.optimizers import (
    KERNELS as HOST_KERNELS, OptimizerSpec, adamw_step, host_adamw_step, measure_host_adamw, sgd_step,
)

SIZES = [17, 64 * 64, 5, 1000, 3 * 64 * 64 + 7]


def _params_and_grads(num_steps: int):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in SIZES]
    grads = [[torch.randn(s, generator=gen) for s in SIZES] for _ in range(num_steps)]
    return params, grads


@pytest.mark.parametrize("kernel", HOST_KERNELS)
def test_flat_adamw_matches_torch_adamw(kernel):
    params, grads = _params_and_grads(6)
    ref = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.AdamW(ref, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    flat = torch.cat(params)
    m, v, step = torch.zeros_like(flat), torch.zeros_like(flat), torch.tensor(0.0)
    for g in grads:
        for p, gi in zip(ref, g):
            p.grad = gi.clone()
        opt.step()
        adamw_step(flat, torch.cat(g), m, v, step, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, kernel=kernel)
    want = torch.cat([p.detach() for p in ref])
    want_m = torch.cat([opt.state[p]["exp_avg"] for p in ref])
    assert step.item() == 6
    if kernel == "fused":  # different arithmetic order: within a few ulps (module doc)
        assert (flat - want).abs().max().item() <= 1e-6
    else:
        assert torch.equal(flat, want)
        assert torch.equal(m, want_m)


@pytest.mark.parametrize("momentum,nesterov,wd", [(0.9, False, 0.0), (0.9, True, 0.01), (0.5, False, 0.1)])
def test_flat_sgd_matches_torch_sgd(momentum, nesterov, wd):
    params, grads = _params_and_grads(4)
    ref = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.SGD(ref, lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    flat, buf = torch.cat(params), torch.zeros(sum(SIZES))
    for k, g in enumerate(grads):
        for p, gi in zip(ref, g):
            p.grad = gi.clone()
        opt.step()
        sgd_step(flat, torch.cat(g), buf, first=k == 0, lr=0.05, momentum=momentum, dampening=0.0, weight_decay=wd,
                 nesterov=nesterov)
    assert torch.equal(flat, torch.cat([p.detach() for p in ref]))
    assert torch.equal(buf, torch.cat([opt.state[p]["momentum_buffer"] for p in ref]))


def test_host_adamw_step_has_the_profilers_signature():
    p, g = torch.ones(1000), torch.full((1000,), 0.5)
    m, v, step = torch.zeros(1000), torch.zeros(1000), torch.tensor(0.0)
    host_adamw_step(p, g, m, v, step, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    assert step.item() == 1
    assert (p < 1).all()  # moved against a positive gradient
    assert torch.allclose(m, torch.full((1000,), 0.05))


def test_measure_host_adamw_reports_each_kernel():
    rows = measure_host_adamw(num_elems=1 << 16, reps=1)
    assert [r.kernel for r in rows] == list(HOST_KERNELS)
    assert all(r.step_s > 0 and r.params_per_s > 0 for r in rows)
    by = {r.kernel: r for r in rows}
    assert by["single"].max_abs_diff == 0.0 and by["foreach"].max_abs_diff == 0.0
    assert by["fused"].max_abs_diff <= 1e-6


def test_spec_defaults_are_torchs_and_mistakes_name_the_field():
    spec = OptimizerSpec.from_value({"name": "adamw", "lr": 3e-4})
    assert spec.decay == 0.01 and spec.betas == (0.9, 0.999) and spec.state_names == ("exp_avg", "exp_avg_sq")
    assert OptimizerSpec.from_value("sgd").state_names == ()
    assert OptimizerSpec(name="sgd", momentum=0.9).state_names == ("momentum_buffer",)
    with pytest.raises(UserError, match=r"optimizer\.name"):
        OptimizerSpec.from_value({"name": "adam-ish"})
    with pytest.raises(UserError, match=r"optimizer\.lr"):
        OptimizerSpec.from_value({"name": "adamw", "lr": -1})
    with pytest.raises(UserError, match=r"optimizer\.lrr"):
        OptimizerSpec.from_value({"name": "adamw", "lrr": 1e-3})
    with pytest.raises(UserError, match=r"optimizer\.betas"):
        OptimizerSpec.from_value({"betas": [0.9, 1.5]})
