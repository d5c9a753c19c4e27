"""MemtrainTrainer against transformers' own Trainer: the same script, the same losses, and a
checkpoint of the Trainer's that resumes to them (docs/integrations.md)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from memtrain.errors import UserError  # noqa: E402
from memtrain.runtime.integrations.hf import MemtrainTrainer  # noqa: E402

STEPS, SAVE_AT = 6, 3


def _model():
    torch.manual_seed(0)
    # GPT-2 (tied input and output embeddings): its meta-device trace, which plans, runs on
    # transformers 4.57 and 5.x alike.
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=1)
    return transformers.GPT2LMHeadModel(cfg)


def _data():
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 128, (4 * STEPS, 16), generator=g)
    return [{"input_ids": r, "labels": r.clone()} for r in rows]


def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                learning_rate=1e-3, warmup_steps=2, lr_scheduler_type="linear", max_grad_norm=0.0, weight_decay=0.0,
                optim="adamw_torch", save_strategy="steps", save_steps=SAVE_AT, logging_steps=1, report_to=[],
                use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    return transformers.TrainingArguments(**{**base, **kw})


class _Recording:
    """Records each micro-batch's loss as the Trainer's ``training_step`` returns it."""

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.losses.append(loss.item())
        return loss


class PlainTrainer(_Recording, transformers.Trainer):
    losses: list


class RecordingMemtrainTrainer(_Recording, MemtrainTrainer):
    losses: list


def _run(cls, out, resume=None, **kw):
    model = _model()
    trainer = cls(model=model, args=_args(out), train_dataset=_data(), **kw)
    trainer.losses = []
    trainer.train(resume_from_checkpoint=resume)
    return trainer.losses, model


def test_memtrain_trainer_gives_the_trainers_losses_and_resumes_from_its_checkpoint(tmp_path):
    plain, plain_model = _run(PlainTrainer, tmp_path / "plain")
    # Every chunk on the host: parameters, gradients and AdamW states offloaded. The "single"
    # host kernel is the plain AdamW's CPU arithmetic, so losses and weights are bitwise equal.
    mt = dict(memory={"offload": "host"}, host_kernel="single")
    losses, model = _run(RecordingMemtrainTrainer, tmp_path / "mt", **mt)
    assert len(plain) == 2 * STEPS and losses == plain
    for (name, a), b in zip(plain_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    ckpt = tmp_path / "mt" / f"checkpoint-{SAVE_AT}"
    assert set(torch.load(ckpt / "optimizer.pt", weights_only=True)["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    resumed, model = _run(RecordingMemtrainTrainer, tmp_path / "mt", resume=str(ckpt), **mt)
    assert resumed == plain[2 * SAVE_AT:]
    for (name, a), b in zip(plain_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_settings_memtrain_would_not_honour_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"TrainingArguments\.max_grad_norm"):
        MemtrainTrainer(model=_model(), args=_args(tmp_path, max_grad_norm=1.0), train_dataset=_data())
    with pytest.raises(UserError, match=r"TrainingArguments\.weight_decay"):
        MemtrainTrainer(model=_model(), args=_args(tmp_path, weight_decay=0.1), train_dataset=_data())
