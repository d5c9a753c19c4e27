"""Engine-level parity: ``wrap()`` end to end against plain PyTorch (docs/DESIGN.md rule 8).

Every case trains the built-in GPT with dropout > 0 (so recompute must replay the dropout
masks), two micro-batches per step, AdamW, from the same seed as a plain-PyTorch run with
``torch.optim.AdamW``, and compares the per-step losses: (a) everything on the device,
(b) optimizer states on the host, (c) params + grads + optimizer states on NVMe (real files in
``tmp_path``), (d) activations swapped to the host, (e) swapped to NVMe, (f) recomputed; plus a
mixed plan (every policy, chunks on all three homes) and a plan whose model states are >= 4x
the device budget.

[Note: tolerances] Where the engine runs the same kernels on the same values the losses and the
final weights are bitwise equal (tolerance 0): device chunks step with torch's default CPU
kernel; host and NVMe chunks with ``host_kernel="foreach"`` (elementwise identical to torch's
AdamW); activations are copied byte for byte or recomputed under the saved RNG state. The
default host kernel (``fused``) orders the AdamW arithmetic differently, so those cases allow
max |Δloss| <= 1e-6 (offload/optim.py, [Note: host kernel choice]).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from memtrain.models.gpt import GPT, causal_lm_loss, gpt_config
from memtrain.offload.chunks import make_chunk_plans, named_blocks, param_order
from memtrain.planner.plan import ActPolicy, MemoryPolicy, Tier
from memtrain.runtime import wrap

SEED = 0
NUM_MICRO = 2
"""Micro-batches per step (gradient accumulation is part of what is compared)."""
DROPOUT = 0.1
LR = 1e-3


@dataclass(frozen=True, kw_only=True, slots=True)
class Setup:
    """One preset's run shape."""

    preset: str
    """``gpt_config`` preset."""
    num_steps: int
    """Optimizer steps compared."""
    seq_len: int
    """Tokens per sequence."""
    micro_batch_size: int
    """Sequences per micro-batch."""
    chunk_elems: int
    """Chunk size of the memory policy."""
    lr: float
    """AdamW learning rate."""


TINY = Setup(preset="tiny", num_steps=20, seq_len=16, micro_batch_size=2, chunk_elems=20_000, lr=LR)
# 100m: short sequences and single-sequence micro-batches keep one case to well under a minute
# on 2 CPU cores (~98M parameters: the NVMe case moves ~4 GB of chunk traffic per step).
M100 = Setup(preset="100m", num_steps=20, seq_len=16, micro_batch_size=1, chunk_elems=8 * 2**20, lr=1e-4)


@dataclass(frozen=True, kw_only=True, slots=True)
class Case:
    """One engine configuration compared against plain PyTorch."""

    home: Tier
    """Home of every chunk."""
    act: ActPolicy
    """Activation policy of every block."""
    host_kernel: str | None
    """``wrap(host_kernel=)``; None = the default (fused)."""
    tol: float
    """Allowed max |Δloss| per step; 0.0 = bitwise (then the final weights are compared too)."""


CASES = {
    "a-device": Case(home=Tier.DEVICE, act=ActPolicy.KEEP, host_kernel=None, tol=0.0),
    "b-optim-host": Case(home=Tier.HOST, act=ActPolicy.KEEP, host_kernel="foreach", tol=0.0),
    "b-optim-host-fused": Case(home=Tier.HOST, act=ActPolicy.KEEP, host_kernel=None, tol=1e-6),
    "c-states-nvme": Case(home=Tier.NVME, act=ActPolicy.KEEP, host_kernel="foreach", tol=0.0),
    "c-states-nvme-fused": Case(home=Tier.NVME, act=ActPolicy.KEEP, host_kernel=None, tol=1e-6),
    "d-acts-host": Case(home=Tier.DEVICE, act=ActPolicy.SWAP_HOST, host_kernel=None, tol=0.0),
    "e-acts-nvme": Case(home=Tier.DEVICE, act=ActPolicy.SWAP_NVME, host_kernel=None, tol=0.0),
    "f-recompute": Case(home=Tier.DEVICE, act=ActPolicy.RECOMPUTE, host_kernel=None, tol=0.0),
}
# The six cases of the issue, bitwise; the fused variants run on tiny only (their 1e-6 bound is
# about one fp32 ulp of a loss near 5.5; at 100m's loss near 9.7 one ulp is ~1e-6 already).
M100_CASES = ["a-device", "b-optim-host", "c-states-nvme", "d-acts-host", "e-acts-nvme", "f-recompute"]


def _batch(setup: Setup, vocab_size: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, vocab_size, (NUM_MICRO * setup.micro_batch_size, setup.seq_len + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def _config(setup: Setup, **overrides):
    return gpt_config(setup.preset, dropout=DROPOUT, **overrides)


def _plain_run(setup: Setup, cfg) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Plain PyTorch: same seed, same batches, gradient accumulation over NUM_MICRO micro-batches."""
    torch.manual_seed(SEED)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=setup.lr)
    torch.manual_seed(SEED + 1)  # the dropout stream, reset the same way in the engine run
    losses = []
    for step in range(setup.num_steps):
        x, y = _batch(setup, cfg.vocab_size, step)
        total = 0.0
        for xm, ym in zip(x.split(setup.micro_batch_size), y.split(setup.micro_batch_size)):
            loss = causal_lm_loss(model(xm), ym)
            total += loss.item()
            (loss / NUM_MICRO).backward()
        opt.step()
        opt.zero_grad()
        losses.append(total / NUM_MICRO)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _policy(model: GPT, setup: Setup, homes, acts) -> MemoryPolicy:
    blocks = named_blocks(model, None)
    chunks = make_chunk_plans(param_order(model, blocks), setup.chunk_elems, homes)
    if not isinstance(acts, (list, tuple)):
        acts = [acts] * len(blocks)
    return MemoryPolicy(chunk_size_elems=setup.chunk_elems, chunks=chunks, prefetch_depth=2, activations=tuple(acts))


def _engine_run(setup: Setup, cfg, tmp_path: Path, *, homes, acts, host_kernel=None, memory=None, check=None):
    """The same training through ``wrap()``; returns (losses, final weights, engine report, engine)."""
    torch.manual_seed(SEED)
    model = GPT(cfg)
    if callable(homes):
        homes = homes(model)
    plan = _policy(model, setup, homes, acts)
    memory = memory or {"device": "64GiB", "host": "64GiB"}
    engine = wrap(model, optimizer=dict(name="adamw", lr=setup.lr), memory={**memory, "nvme_path": str(tmp_path / "nvme")},
                  plan=plan, micro_batch_size=setup.micro_batch_size, host_kernel=host_kernel, verbose=False)
    torch.manual_seed(SEED + 1)
    losses = []
    try:
        for step in range(setup.num_steps):
            losses.append(engine.train_step(_batch(setup, cfg.vocab_size, step)))
            if check is not None:
                check(engine)
        weights = engine.model_state_dict()
        report = engine.memory_report()
    except BaseException:
        engine.close()
        raise
    return losses, weights, report, engine


def _assert_parity(got: list[float], want: list[float], tol: float, got_w=None, want_w=None) -> None:
    assert len(got) == len(want)
    diffs = [abs(a - b) for a, b in zip(got, want)]
    if tol == 0.0:
        assert got == want, f"losses differ (max |Δ| {max(diffs):.3g}): {diffs}"
        for name, value in want_w.items():
            assert torch.equal(got_w[name], value), f"weight {name} differs"
    else:
        assert max(diffs) <= tol, f"max |Δloss| {max(diffs):.3g} > {tol}: {diffs}"
    assert got[-1] < got[0]  # it trained: a run stuck at its first loss would not be parity


def _assert_case_really_offloaded(case: Case, engine, report, tmp_path: Path) -> None:
    """Guards against a case passing only because nothing left the device."""
    dev, host = report["device"].peak_breakdown, report["host"].peak_breakdown
    if case.home is Tier.DEVICE:
        assert dev.get("chunk", 0) > 0 and host.get("chunk", 0) == 0
    else:
        assert dev.get("chunk", 0) == 0 and dev.get("buffer", 0) > 0  # states away, params streamed in
    if case.home is Tier.HOST:
        assert host.get("chunk", 0) > 0
    if case.home is Tier.NVME:
        assert report["nvme"].peak_bytes > 0 and any((tmp_path / "nvme").glob("*.mt"))
        assert host.get("staging", 0) > 0
    names = [n for n, _ in engine.blocks]
    stats = [engine.activations.block_activations(n) for n in names]
    if case.act is ActPolicy.SWAP_HOST:
        assert host.get("act", 0) > 0 and all(s.swapped_data_ptrs for s in stats[1:])
    if case.act is ActPolicy.SWAP_NVME:
        assert report["nvme"].peak_bytes > 0 and all(s.swapped_data_ptrs for s in stats[1:])
    if case.act is ActPolicy.RECOMPUTE:
        assert all(s.input_bytes > 0 for s in stats[1:])  # inputs held, the rest recomputed
    if case.act is ActPolicy.KEEP:
        assert host.get("act", 0) == 0


def _ledgers_back_to_states(engine) -> None:
    """After every step only model states remain: no activation, buffer or staging bytes on
    the device or host, no activation file on NVMe; but for the host staging of the NVMe
    write-backs still running (offload.optim [Note: write-backs across the step end])."""
    carried = engine.optimizer.carried_chunks
    assert len(carried) <= engine.optimizer.staged_chunks
    for ledger in (engine.store.device_ledger, engine.store.host_ledger):
        left = {o: b for o, b in ledger.by_owner().items() if not o.startswith("chunk:")}
        if ledger is engine.store.host_ledger:
            assert set(left) == {f"staging:{i}" for i in carried}, (left, carried)
            left = {}
        assert left == {}, (ledger.tier, left)
    if engine.nvme is not None:
        assert not any(k.startswith("act") for k in engine.nvme.keys()), engine.nvme.keys()


@pytest.fixture(scope="module")
def tiny_reference():
    cfg = _config(TINY)
    return cfg, *_plain_run(TINY, cfg)


@pytest.mark.parametrize("name", list(CASES))
def test_tiny_matches_plain_pytorch(name, tiny_reference, tmp_path):
    case = CASES[name]
    cfg, want, want_w = tiny_reference
    got, got_w, report, engine = _engine_run(TINY, cfg, tmp_path, homes=case.home, acts=case.act,
                                             host_kernel=case.host_kernel, check=_ledgers_back_to_states)
    try:
        _assert_parity(got, want, case.tol, got_w, want_w)
        _assert_case_really_offloaded(case, engine, report, tmp_path)
    finally:
        engine.close()


MIXED_ACTS = [ActPolicy.SWAP_NVME, ActPolicy.RECOMPUTE, ActPolicy.SWAP_HOST, ActPolicy.KEEP]
"""Per block of tiny (embedding, layer 0, layer 1, head): every policy once."""


def _cycle_homes(model: GPT, setup: Setup) -> list[Tier]:
    n = len(make_chunk_plans(param_order(model, named_blocks(model, None)), setup.chunk_elems, Tier.HOST))
    return [(Tier.NVME, Tier.HOST, Tier.DEVICE)[i % 3] for i in range(n)]


def test_tiny_mixed_policies_and_homes(tiny_reference, tmp_path):
    """Every activation policy on some block and chunks on all three homes, in one run."""
    cfg, want, want_w = tiny_reference
    got, got_w, report, engine = _engine_run(TINY, cfg, tmp_path, homes=lambda m: _cycle_homes(m, TINY), acts=MIXED_ACTS,
                                             host_kernel="foreach", check=_ledgers_back_to_states)
    try:
        homes = {c.home for c in engine.store.chunks}
        assert homes == {Tier.DEVICE, Tier.HOST, Tier.NVME}
        _assert_parity(got, want, 0.0, got_w, want_w)
        acts = engine.activations
        assert acts.block_activations("blocks.0").swapped_data_ptrs  # swap_nvme block went out
        assert acts.block_activations("blocks.1").input_bytes > 0  # recompute block kept only its inputs
        assert acts.block_activations("blocks.2").swapped_data_ptrs  # swap_host block went out
        assert not acts.block_activations("blocks.3").swapped_data_ptrs  # keep block stayed
    finally:
        engine.close()


def test_budgets_hold_with_states_four_times_the_device(tmp_path):
    """Model states >= 4x the device budget: the device ledger's peak stays within the budget
    at every step and the losses are still bitwise those of plain PyTorch."""
    setup = Setup(preset="tiny", num_steps=8, seq_len=16, micro_batch_size=2, chunk_elems=12_000, lr=LR)
    cfg = _config(setup, num_layers=4)
    want, want_w = _plain_run(setup, cfg)
    num_params = sum(p.numel() for p in GPT(cfg).parameters())
    states_bytes = num_params * 16  # fp32 AdamW: params, grads, m, v (docs/memory-accounting.md)
    device_budget = states_bytes // 5
    assert states_bytes >= 4 * device_budget

    def homes(model):
        n = len(make_chunk_plans(param_order(model, named_blocks(model, None)), setup.chunk_elems, Tier.HOST))
        return [Tier.HOST if i % 2 else Tier.NVME for i in range(n)]

    def within_budget(engine):
        assert engine.store.device_ledger.peak_bytes <= device_budget

    acts = [ActPolicy.SWAP_HOST, ActPolicy.RECOMPUTE, ActPolicy.SWAP_NVME, ActPolicy.RECOMPUTE, ActPolicy.SWAP_HOST,
            ActPolicy.SWAP_NVME]
    got, got_w, report, engine = _engine_run(setup, cfg, tmp_path, homes=homes, acts=acts, host_kernel="foreach",
                                             memory={"device": device_budget, "host": "256MiB"}, check=within_budget)
    try:
        dev = report["device"]
        assert dev.budget_bytes == device_budget
        assert 0 < dev.peak_bytes <= device_budget
        assert dev.peak_breakdown.get("chunk", 0) == 0 and dev.peak_breakdown.get("buffer", 0) > 0
        assert report["host"].peak_bytes + report["nvme"].peak_bytes >= num_params * 12  # master + m + v away
        _assert_parity(got, want, 0.0, got_w, want_w)
    finally:
        engine.close()


@pytest.fixture(scope="module")
def m100_reference():
    cfg = _config(M100)
    return cfg, *_plain_run(M100, cfg)


@pytest.mark.slow
@pytest.mark.parametrize("name", M100_CASES)
def test_100m_matches_plain_pytorch(name, m100_reference, tmp_path):
    case = CASES[name]
    cfg, want, want_w = m100_reference
    got, got_w, report, engine = _engine_run(M100, cfg, tmp_path, homes=case.home, acts=case.act,
                                             host_kernel=case.host_kernel)
    try:
        _assert_parity(got, want, case.tol, got_w, want_w)
        _assert_case_really_offloaded(case, engine, report, tmp_path)
    finally:
        engine.close()
