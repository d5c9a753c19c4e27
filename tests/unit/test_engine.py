"""wrap()/Engine: parity with plain PyTorch per chunk home, budgets, state dicts, fp16 scaling
(the optimizer's work overlapped with the backward and across steps: test_engine_overlap.py)."""

from __future__ import annotations

import pytest
import torch
from engine_case import MICRO, _batch, _engine, _policy  # the tiny GPT wrapped

from memtrain.errors import UserError

from memtrain.models.gpt import GPT, causal_lm_loss, gpt_config
from memtrain.planner.plan import Tier
from memtrain.runtime import wrap


def _reference_losses(cfg, num_steps: int, opt_factory, micro: int = MICRO, seed: int = 0) -> tuple[list[float], GPT]:
    torch.manual_seed(seed)
    model = GPT(cfg)
    opt = opt_factory(model.parameters())
    losses = []
    for step in range(num_steps):
        x, y = _batch(cfg, step)
        num = x.shape[0] // micro
        total = 0.0
        for xm, ym in zip(x.split(micro), y.split(micro)):
            loss = causal_lm_loss(model(xm), ym)
            total += loss.item()
            (loss / num).backward()
        opt.step()
        opt.zero_grad()
        losses.append(total / num)
    return losses, model


# Expected agreement per case (docs/DESIGN.md rule 8):
# - device / host+single / nvme+single: same kernels on the same values -> bitwise equal losses;
# - host with the default fused CPU AdamW: different arithmetic order -> |Δloss| <= 1e-6.
PARITY = [
    (Tier.DEVICE, None, 0.0),
    (Tier.HOST, "single", 0.0),
    (Tier.NVME, "single", 0.0),
    (Tier.HOST, None, 1e-6),
]


@pytest.mark.parametrize("home,kernel,tol", PARITY, ids=["device", "host-bitwise", "nvme-bitwise", "host-fused"])
def test_parity_with_plain_pytorch_tiny(home, kernel, tol, tmp_path):
    cfg = gpt_config("tiny")
    want, ref_model = _reference_losses(cfg, 20, lambda p: torch.optim.AdamW(p, lr=1e-3))
    engine, _ = _engine(cfg, home, tmp_path, host_kernel=kernel)
    got = [engine.train_step(_batch(cfg, step)) for step in range(20)]
    diffs = [abs(a - b) for a, b in zip(got, want)]
    assert max(diffs) <= tol, (home, diffs)
    if tol == 0.0:  # bitwise losses come with bitwise parameters
        params = engine.model_state_dict()
        for name, value in ref_model.state_dict().items():
            assert torch.equal(params[name], value), name
    if home is not Tier.DEVICE:  # the chunks really were off the device
        assert engine.memory_report()["device"].peak_breakdown.get("chunk", 0) == 0
    engine.close()


def test_parity_sgd_momentum_host(tmp_path):
    cfg = gpt_config("tiny")
    want, _ = _reference_losses(cfg, 5, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01))
    engine, _ = _engine(cfg, Tier.HOST, tmp_path, optimizer=dict(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.01))
    got = [engine.train_step(_batch(cfg, step)) for step in range(5)]
    assert got == want
    engine.close()


def test_custom_loop_equals_train_step(tmp_path):
    cfg = gpt_config("tiny")
    a, _ = _engine(cfg, Tier.HOST, tmp_path / "a")
    b, _ = _engine(cfg, Tier.HOST, tmp_path / "b")
    for step in range(3):
        x, y = _batch(cfg, step)
        la = a.train_step((x, y))
        total = 0.0
        for xm, ym in zip(x.split(MICRO), y.split(MICRO)):
            loss = b({"input_ids": xm, "labels": ym})
            total += loss.item()
            b.backward(loss / 2)
        assert b.step()
        assert total / 2 == la
    a.close(), b.close()


@pytest.mark.parametrize("planner", [False, True], ids=["built-in-policy", "planner-search"])
def test_budget_holds_with_states_four_times_the_device(planner):
    cfg = gpt_config("tiny", num_layers=6)
    torch.manual_seed(0)
    model = GPT(cfg)
    num_params = sum(p.numel() for p in model.parameters())
    device_budget = 1_200_000
    states_bytes = num_params * 16  # fp32 AdamW: params, grads, m, v
    assert states_bytes >= 4 * device_budget
    shape = dict(seq_len=8, global_batch_size=2) if planner else dict(micro_batch_size=1)
    engine = wrap(model, optimizer=dict(name="adamw", lr=1e-3), memory={"device": device_budget, "host": "64MiB"},
                  verbose=False, **shape)
    losses = [engine.train_step(_batch(cfg, step, batch=2, seq_len=8)) for step in range(4)]
    report = engine.memory_report()
    assert report["device"].peak_bytes <= device_budget
    assert report["device"].peak_bytes > 0 and report["host"].peak_bytes >= num_params * 12
    assert all(torch.isfinite(torch.tensor(losses)))
    engine.close()


def test_too_small_device_budget_is_refused_before_training():
    torch.manual_seed(0)
    model = GPT(gpt_config("tiny"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = wrap(model, optimizer="adamw", memory={"device": "64KiB", "host": "64MiB"}, verbose=False)
    ids = torch.randint(0, 256, (2, 8))
    with pytest.raises(ValueError, match="memory"):  # planned from the first batch: refused before any step
        engine.train_step((ids, ids))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="memory"):  # the planner's search says what is missing
        wrap(model, optimizer="adamw", memory={"device": "64KiB", "host": "64MiB"}, verbose=False, seq_len=8,
             global_batch_size=2)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # refused before touching the model


@pytest.mark.parametrize("memory,key", [
    ({"device": "2 bananas"}, "memory.device"),
    ({"device": "1GiB", "hots": "1GiB"}, "memory['hots']"),
    ({"device": "1GiB", "safety_margin": 1.5}, "memory.safety_margin"),
    ({"device": "1GiB", "nvme_budget": "1GiB"}, "memory['nvme_budget']"),
])
def test_bad_memory_settings_name_the_key(memory, key):
    model = GPT(gpt_config("tiny"))
    with pytest.raises(UserError) as err:
        wrap(model, optimizer="adamw", memory=memory, verbose=False)
    assert key in str(err.value)


def test_state_dict_loads_into_plain_model_and_torch_adamw(tmp_path):
    cfg = gpt_config("tiny")
    engine, _ = _engine(cfg, Tier.NVME, tmp_path, host_kernel="single")
    for step in range(3):
        engine.train_step(_batch(cfg, step))
    sd = engine.state_dict()
    plain = GPT(cfg)
    plain.load_state_dict(sd["model"])  # strict: every key, tied names included
    engine_params = engine.store.gather_params()
    for name, p in plain.named_parameters():
        assert torch.equal(p.detach(), engine_params[name]), name
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    opt.load_state_dict(sd["optimizer"])
    # Continuing in plain PyTorch equals continuing in the engine, bitwise.
    for step in range(3, 5):
        x, y = _batch(cfg, step)
        total = 0.0
        for xm, ym in zip(x.split(MICRO), y.split(MICRO)):
            loss = causal_lm_loss(plain(xm), ym)
            total += loss.item()
            (loss / 2).backward()
        opt.step()
        opt.zero_grad()
        assert engine.train_step((x, y)) == total / 2
    # And a fresh engine (other homes) restored from the state dict continues identically.
    other, _ = _engine(cfg, Tier.HOST, tmp_path / "other", seed=1, host_kernel="single")
    other.load_state_dict(engine.state_dict())
    x, y = _batch(cfg, 9)
    assert other.train_step((x, y)) == engine.train_step((x, y))
    engine.close(), other.close()


def test_close_returns_parameters_and_removes_files(tmp_path):
    cfg = gpt_config("tiny")
    engine, model = _engine(cfg, Tier.NVME, tmp_path)
    engine.train_step(_batch(cfg, 0))
    params = engine.store.gather_params()
    assert any((tmp_path / "nvme").iterdir())
    engine.close()
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), params[name])
    assert not (tmp_path / "nvme").exists() or not any((tmp_path / "nvme").glob("*.mt"))
    x, y = _batch(cfg, 1)
    assert torch.isfinite(causal_lm_loss(model(x), y))  # a plain model again


def test_fp16_loss_scaling_skips_overflowing_step(tmp_path):
    cfg = gpt_config("tiny")
    engine, _ = _engine(cfg, Tier.HOST, tmp_path, dtype="fp16", loss_scale={"scale": 2.0**40, "growth_interval": 2})
    before = engine.store.gather_params()
    x, y = _batch(cfg, 0)
    loss = engine((x, y))
    engine.backward(loss)
    assert engine.step() is False  # fp16 gradients overflowed at a 2^40 scale
    assert engine.scaler.scale == 2.0**39
    after = engine.store.gather_params()
    assert all(torch.equal(before[k], after[k]) for k in before)
    engine.scaler.scale = 1024.0
    engine.backward(engine((x, y)))
    assert engine.step() is True
    assert any(not torch.equal(before[k], v) for k, v in engine.store.gather_params().items())
    engine.close()


@pytest.mark.parametrize("home", [Tier.DEVICE, Tier.HOST])
def test_bf16_tracks_fp32(home, tmp_path):
    cfg = gpt_config("tiny")
    want, _ = _reference_losses(cfg, 5, lambda p: torch.optim.AdamW(p, lr=1e-3))
    engine, _ = _engine(cfg, home, tmp_path, dtype="bf16", host_kernel="single")
    got = [engine.train_step(_batch(cfg, step)) for step in range(5)]
    # bf16 compute (8-bit mantissa) with fp32 masters: same trajectory within bf16 rounding.
    assert max(abs(a - b) for a, b in zip(got, want)) < 0.05
    report = engine.memory_report()
    n = sum(p.numel() for p in engine.model.parameters())
    if home is Tier.HOST:  # docs/memory-accounting.md: N·(4 + 4 + o) + N·c on the host
        assert report["host"].peak_breakdown["chunk"] == n * (4 + 4 + 8 + 2)
    else:  # N·(c + 4 + 4 + o) on the device (fp32 gradient accumulator)
        assert report["device"].peak_breakdown["chunk"] == n * (2 + 4 + 4 + 8)
    engine.close()


def test_bf16_placement_does_not_change_the_numerics(tmp_path):
    # offload.grads [Note: fp32 accumulators]: 4 micro-batches of bf16 gradients summed in fp32 on
    # every tier, and the same update kernel, so device, host and nvme homes train bit for bit alike.
    cfg = gpt_config("tiny")
    runs = {}
    for home in (Tier.DEVICE, Tier.HOST, Tier.NVME):
        engine, _ = _engine(cfg, home, tmp_path / home.value, dtype="bf16", host_kernel="single")
        losses = [engine.train_step(_batch(cfg, step, batch=4 * MICRO)) for step in range(4)]
        runs[home] = losses, engine.model_state_dict()
        engine.close()
    want_losses, want_params = runs[Tier.DEVICE]
    for home in (Tier.HOST, Tier.NVME):
        losses, params = runs[home]
        assert losses == want_losses, home
        for name, value in want_params.items():
            assert torch.equal(params[name], value), (home, name)


@pytest.mark.slow
@pytest.mark.parametrize("home", [Tier.DEVICE, Tier.HOST, Tier.NVME])
def test_parity_with_plain_pytorch_100m(home, tmp_path):
    cfg = gpt_config("100m")
    steps, seq = 3, 32
    torch.manual_seed(0)
    ref = GPT(cfg)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4)
    torch.manual_seed(0)
    model = GPT(cfg)
    policy = _policy(model, home, chunk_elems=8 * 2**20)
    engine = wrap(model, optimizer=dict(name="adamw", lr=1e-4), plan=policy, host_kernel="single", verbose=False,
                  memory={"device": "8GiB", "host": "8GiB", "nvme_path": str(tmp_path / "nvme")})
    for step in range(steps):
        x, y = _batch(cfg, step, batch=1, seq_len=seq)
        loss = causal_lm_loss(ref(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert engine.train_step((x, y)) == loss.item()
    engine.close()


def test_fp16_unscales_device_gradients_in_fp32(tmp_path):
    # offload.optim [Note: unscaling in fp32]: a device-home chunk keeps fp16 gradients. Tiny true
    # gradients (the loss times 1e-9) survive the backward at a 2^16 scale, but divided by it in
    # fp16 they would all be 0, and AdamW without weight decay would not move a single weight.
    cfg = gpt_config("tiny")
    engine, _ = _engine(cfg, Tier.DEVICE, tmp_path, dtype="fp16", loss_scale={"scale": 2.0**16},
                        optimizer=dict(name="adamw", lr=1e-3, weight_decay=0.0))
    before = engine.store.gather_params()
    x, y = _batch(cfg, 0)
    engine.backward(engine((x, y)) * 1e-9)
    assert engine.step() is True
    after = engine.store.gather_params()
    moved = sum(int((after[k] != before[k]).sum()) for k in before)
    assert moved > 0.5 * sum(v.numel() for v in before.values())
    engine.close()
