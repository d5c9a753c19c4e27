"""MemtrainStrategy against Lightning's default strategy: the same LightningModule, the same
losses, and a Lightning checkpoint that resumes to them (docs/integrations.md)."""

from __future__ import annotations

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")

from memtrain.errors import UserError  # noqa: E402
from memtrain.models.gpt import GPT, causal_lm_loss, gpt_config  # noqa: E402
from memtrain.runtime.integrations.lightning import MemtrainStrategy  # noqa: E402

STEPS_PER_EPOCH = 3


class LitGPT(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = GPT(gpt_config("tiny"))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        loss = causal_lm_loss(self.model(ids), labels)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 4))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def _loader():
    ids = torch.randint(0, 256, (4 * STEPS_PER_EPOCH, 33), generator=torch.Generator().manual_seed(1))
    data = torch.utils.data.TensorDataset(ids[:, :-1], ids[:, 1:])
    return torch.utils.data.DataLoader(data, batch_size=2)  # 2 micro-batches of 2 per step


def _fit(tmp_path, strategy="auto", ckpt_path=None, epochs=2, lit=None, **kw):
    lit = (lit or LitGPT)()
    save = L.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_epochs=epochs, accumulate_grad_batches=2,
                        callbacks=[save], logger=False, enable_progress_bar=False, enable_model_summary=False, **kw)
    trainer.fit(lit, _loader(), ckpt_path=ckpt_path)
    return lit


def test_memtrain_strategy_gives_lightnings_losses_and_resumes_from_its_checkpoint(tmp_path):
    plain = _fit(tmp_path / "plain")
    # Every chunk on the host; the "single" host kernel is torch's CPU AdamW: bitwise equal.
    strategy = lambda: MemtrainStrategy(memory={"offload": "host"}, host_kernel="single")  # noqa: E731
    mt = _fit(tmp_path / "mt", strategy())
    assert len(plain.losses) == 4 * STEPS_PER_EPOCH and mt.losses == plain.losses
    for (name, a), b in zip(plain.model.state_dict().items(), mt.model.state_dict().values()):
        assert torch.equal(a, b), name
    first = tmp_path / "mt" / f"epoch=0-step={STEPS_PER_EPOCH}.ckpt"
    saved = torch.load(first, weights_only=False)
    assert set(saved["optimizer_states"][0]["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    resumed = _fit(tmp_path / "resumed", strategy(), ckpt_path=str(first))
    assert resumed.losses == plain.losses[2 * STEPS_PER_EPOCH:]
    for (name, a), b in zip(plain.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


class LitGPTGroups(LitGPT):
    """Two parameter groups, listed in another order than the model's: no decay and a lower lr
    for biases and norms, decay 0.1 for the rest."""

    def configure_optimizers(self):
        named = list(self.model.named_parameters())
        plain = [p for n, p in named if n.endswith("bias") or ".norm" in n]
        rest = [p for n, p in named if not (n.endswith("bias") or ".norm" in n)]
        opt = torch.optim.AdamW([{"params": plain, "weight_decay": 0.0, "lr": 5e-4},
                                 {"params": rest, "weight_decay": 0.1}], lr=1e-3)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 4))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def test_gradient_clipping_and_param_groups_give_lightnings_results(tmp_path):
    # gradient_clip_val 0.5 clips every step (the tiny GPT's norms are about 1)
    kw = dict(gradient_clip_val=0.5, epochs=2, lit=LitGPTGroups)
    plain = _fit(tmp_path / "plain", **kw)
    strategy = lambda: MemtrainStrategy(memory={"offload": "host"}, host_kernel="single")  # noqa: E731
    mt = _fit(tmp_path / "mt", strategy(), **kw)
    assert mt.losses == plain.losses
    for (name, a), b in zip(plain.model.state_dict().items(), mt.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert _fit(tmp_path / "unclipped", epochs=1, lit=LitGPTGroups).losses != plain.losses[:2 * STEPS_PER_EPOCH]
    first = f"epoch=0-step={STEPS_PER_EPOCH}.ckpt"
    want = torch.load(tmp_path / "plain" / first, weights_only=False)["optimizer_states"][0]
    got = torch.load(tmp_path / "mt" / first, weights_only=False)["optimizer_states"][0]
    assert [(len(g["params"]), g["lr"], g["weight_decay"]) for g in got["param_groups"]] == \
        [(len(g["params"]), g["lr"], g["weight_decay"]) for g in want["param_groups"]]
    for i, st in want["state"].items():
        for k, v in st.items():
            assert torch.equal(got["state"][i][k], v), (i, k)
    resumed = _fit(tmp_path / "resumed", strategy(), ckpt_path=str(tmp_path / "mt" / first), **kw)
    assert resumed.losses == plain.losses[2 * STEPS_PER_EPOCH:]


def _refused(tmp_path, lit=LitGPT, **kw):
    trainer = L.Trainer(accelerator="cpu", strategy=MemtrainStrategy(), max_steps=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, **kw)
    trainer.fit(lit(), _loader())


def test_clipping_by_value_and_custom_clipping_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"gradient_clip_algorithm"):
        _refused(tmp_path, gradient_clip_val=1.0, gradient_clip_algorithm="value")

    class CustomClip(LitGPT):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            pass

    with pytest.raises(UserError, match=r"configure_gradient_clipping"):
        _refused(tmp_path, CustomClip, gradient_clip_val=1.0)

    class DifferentBetas(LitGPT):
        def configure_optimizers(self):
            return torch.optim.AdamW([{"params": list(self.model.parameters())[:2], "betas": (0.8, 0.9)},
                                      {"params": list(self.model.parameters())[2:]}])

    with pytest.raises(UserError, match=r"parameter groups with different betas"):
        _refused(tmp_path, DifferentBetas)
