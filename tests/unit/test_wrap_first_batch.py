"""wrap() with only budgets: it plans from the first batch's shape, then trains with parity."""

import pytest
import torch

from memtrain.models.gpt import GPT, causal_lm_loss, gpt_config
from memtrain.runtime import wrap


def _plain_step(forward, loss_fn, opt, ids, labels, micro_batch_size) -> float:
    """One plain-PyTorch step with gradient accumulation over micro-batches; the mean loss."""
    num, total = ids.shape[0] // micro_batch_size, 0.0
    for x, y in zip(ids.split(micro_batch_size), labels.split(micro_batch_size)):
        loss = loss_fn(forward(x), y)
        total += loss.item()
        (loss / num if num > 1 else loss).backward()
    opt.step()
    opt.zero_grad()
    return total / num


def test_wrap_plans_on_first_batch_and_matches_torch(capsys):
    torch.manual_seed(0)
    cfg = gpt_config("tiny", dropout=0.1)
    model, ref = GPT(cfg), GPT(cfg)
    ref.load_state_dict(model.state_dict())
    states_bytes = 16 * sum(p.numel() for p in model.parameters())
    budget = 1_500_000
    assert states_bytes >= 1.2 * budget  # model states alone do not fit the device budget
    engine = wrap(model, optimizer=dict(name="adamw", lr=1e-3), memory={"device": budget, "host": "64MiB"},
                  host_kernel="single")
    with pytest.raises(ValueError, match="first batch"):
        engine.memory_report()
    engine.set_lr(2e-3)  # before the first batch: applied when it builds
    opt = torch.optim.AdamW(ref.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        ids = torch.randint(0, 256, (4, 32), generator=g)
        labels = torch.roll(ids, -1, 1)
        torch.manual_seed(100 + step)
        loss = engine.train_step((ids, labels))
        torch.manual_seed(100 + step)
        expected = _plain_step(ref, causal_lm_loss, opt, ids, labels, engine.micro_batch_size)
        assert loss == expected  # single-tensor host kernel: bitwise
    assert "Memory per tier" in capsys.readouterr().out  # the plan summary was printed
    report = engine.memory_report()
    assert 0 < report["device"].peak_bytes <= budget
    engine.close()


def test_hf_model_with_loose_parameters_offloaded_matches_torch():
    """An HF llama's final norm lies outside every block; offloaded, it is fetched when it runs."""
    pytest.importorskip("transformers")
    from memtrain.models import build_model
    from memtrain.config import ModelConfig

    model_cfg = ModelConfig(source="hf", hf_config=dict(
        model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    torch.manual_seed(0)
    built = build_model(model_cfg, max_seq_len=32)
    torch.manual_seed(0)
    ref = build_model(model_cfg, max_seq_len=32)
    engine = wrap(built.module, optimizer=dict(name="adamw", lr=1e-3), blocks=list(built.blocks), loss_fn=built.loss_fn,
                  call=lambda m, ids: built.forward(ids, module=m), memory={"device": "1MiB", "host": "64MiB"},
                  host_kernel="single", verbose=False)
    opt = torch.optim.AdamW(ref.module.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        ids = torch.randint(0, 256, (2, 32), generator=g)
        labels = torch.roll(ids, -1, 1)
        loss = engine.train_step((ids, labels))
        expected = _plain_step(ref.forward, ref.loss_fn, opt, ids, labels, engine.micro_batch_size)
        assert loss == pytest.approx(expected, abs=1e-6)
    homes = {str(c.home) for c in engine.store.chunks}
    assert "host" in homes  # the budget forced offload, so the loose norm was fetched on demand
    engine.close()
