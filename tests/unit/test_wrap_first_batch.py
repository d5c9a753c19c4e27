"""wrap() with only budgets: it plans from the first batch's shape, then trains with parity."""

import pytest
import torch

from memtrain.models.gpt import GPT, causal_lm_loss, gpt_config
from memtrain.runtime import wrap


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
        mbs = engine.micro_batch_size
        num, total = 4 // mbs, 0.0
        for x, y in zip(ids.split(mbs), labels.split(mbs)):
            ref_loss = causal_lm_loss(ref(x), y)
            total += ref_loss.item()
            (ref_loss / num if num > 1 else ref_loss).backward()
        opt.step()
        opt.zero_grad()
        assert loss == total / num  # single-tensor host kernel: bitwise
    assert "Memory per tier" in capsys.readouterr().out  # the plan summary was printed
    report = engine.memory_report()
    assert 0 < report["device"].peak_bytes <= budget
    engine.close()
