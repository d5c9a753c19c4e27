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
    """The losses and the trained model; the logged grad norms in ``_run.grad_norms``."""
    model = _model()
    trainer = cls(model=model, args=_args(out), train_dataset=_data(), **kw)
    trainer.losses = []
    trainer.train(resume_from_checkpoint=resume)
    _run.grad_norms = [x["grad_norm"] for x in trainer.state.log_history if "grad_norm" in x]
    return trainer.losses, model


def test_memtrain_trainer_gives_the_trainers_losses_and_resumes_from_its_checkpoint(tmp_path):
    plain, plain_model = _run(PlainTrainer, tmp_path / "plain")
    plain_norms = _run.grad_norms
    # Every chunk on the host: parameters, gradients and AdamW states offloaded. The "single"
    # host kernel is the plain AdamW's CPU arithmetic, so losses and weights are bitwise equal.
    mt = dict(memory={"offload": "host"}, host_kernel="single")
    losses, model = _run(RecordingMemtrainTrainer, tmp_path / "mt", **mt)
    assert len(plain) == 2 * STEPS and losses == plain
    assert len(plain_norms) == STEPS and _run.grad_norms == plain_norms  # logged without clipping too
    for (name, a), b in zip(plain_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    ckpt = tmp_path / "mt" / f"checkpoint-{SAVE_AT}"
    assert set(torch.load(ckpt / "optimizer.pt", weights_only=True)["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    resumed, model = _run(RecordingMemtrainTrainer, tmp_path / "mt", resume=str(ckpt), **mt)
    assert resumed == plain[2 * SAVE_AT:]
    for (name, a), b in zip(plain_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("offload", ["host", "nvme"])
def test_the_trainers_defaults_clip_and_decay_as_the_trainer_does(offload, tmp_path):
    """The Trainer's defaults, max_grad_norm=1.0 and weight decay on all but biases and norms
    (two groups), with a max_grad_norm small enough to clip every step: bitwise the plain
    Trainer's losses, weights, logged grad_norm and optimizer.pt, and a resume from it."""
    args = lambda out: _args(out, max_grad_norm=1.0, weight_decay=0.1)  # noqa: E731
    plain_trainer = PlainTrainer(model=_model(), args=args(tmp_path / "plain"), train_dataset=_data())
    plain_trainer.losses = []
    plain_trainer.train()
    plain_model, plain = plain_trainer.model, plain_trainer.losses
    want_norms = [x["grad_norm"] for x in plain_trainer.state.log_history if "grad_norm" in x]
    assert len(want_norms) == STEPS and max(want_norms) > 1.0  # clipping acts
    memory = {"offload": offload, **({"nvme_path": str(tmp_path / "nvme")} if offload == "nvme" else {})}
    mt = RecordingMemtrainTrainer(model=_model(), args=args(tmp_path / "mt"), train_dataset=_data(), memory=memory,
                                  host_kernel="single")
    mt.losses = []
    mt.train()
    assert mt.losses == plain
    assert [x["grad_norm"] for x in mt.state.log_history if "grad_norm" in x] == want_norms
    for (name, a), b in zip(plain_model.state_dict().items(), mt.model.state_dict().values()):
        assert torch.equal(a, b), name
    want_sd = torch.load(tmp_path / "plain" / f"checkpoint-{SAVE_AT}" / "optimizer.pt", weights_only=True)
    got_sd = torch.load(tmp_path / "mt" / f"checkpoint-{SAVE_AT}" / "optimizer.pt", weights_only=True)
    assert [(len(g["params"]), g["weight_decay"]) for g in got_sd["param_groups"]] == \
        [(len(g["params"]), g["weight_decay"]) for g in want_sd["param_groups"]]
    assert got_sd["param_groups"][1]["weight_decay"] == 0.0 and len(got_sd["param_groups"][1]["params"]) > 0
    for i, st in want_sd["state"].items():
        for k, v in st.items():
            assert torch.equal(got_sd["state"][i][k], v), (i, k)
    # the plain Trainer's checkpoint resumes under memtrain to the same losses
    resumed = RecordingMemtrainTrainer(model=_model(), args=args(tmp_path / "plain"), train_dataset=_data(),
                                       memory=memory, host_kernel="single")
    resumed.losses = []
    resumed.train(resume_from_checkpoint=str(tmp_path / "plain" / f"checkpoint-{SAVE_AT}"))
    assert resumed.losses == plain[2 * SAVE_AT:]


def test_settings_memtrain_would_not_honour_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"TrainingArguments\.optim"):
        MemtrainTrainer(model=_model(), args=_args(tmp_path, optim="sgd"), train_dataset=_data())
    with pytest.raises(UserError, match=r"TrainingArguments\.max_grad_norm"):
        MemtrainTrainer(model=_model(), args=_args(tmp_path, max_grad_norm=-1.0), train_dataset=_data())
