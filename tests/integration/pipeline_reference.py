"""The single-process reference of the pipeline parity tests: plain PyTorch, the model built the
ordinary way under the seed, the same global batch as micro-batches in order, each loss divided
by their number before its backward, ``torch.optim.AdamW`` with the same hyper-parameters and
learning rate per step (``lr_at``: one for all groups or one per group; ``bf16``: the forward under ``torch.autocast``, the loss in fp32);
with ``max_grad_norm`` each step first ``torch.nn.utils.clip_grad_norm_(model.parameters())``, with
``param_groups`` (dicts of parameter names, ``lr``, ``weight_decay``) AdamW's groups by name.
``out``, when given, receives the steps' norms (``grad_norms``) and the final ``weights`` by name.
``device``: where it computes (the model built on the CPU, then moved: a GPU's dropout masks come
from that device's generator, seeded by ``torch.manual_seed``)."""

from __future__ import annotations

import torch

from memtrain.config import DataConfig, ModelConfig
from memtrain.models.source import build_model
from memtrain.planner.plan import Action, Op
from memtrain.runtime.data import TokenBatches
from memtrain.runtime.train import lr_at


def reference_losses(model: dict, *, num_steps: int, num_microbatches: int, micro_batch_size: int, seq_len: int,
                     seed: int, lr: float, adamw: dict | None = None, lr_at=None, bf16: bool = False,
                     max_grad_norm: float | None = None, param_groups: list[dict] | None = None,
                     out: dict | None = None, device: str = "cpu") -> list[list[float]]:
    """Per step, each micro-batch's loss, on one thread (as each worker runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        built = build_model(ModelConfig(**model), max_seq_len=seq_len)
        built.module.to(device)
        named = dict(built.module.named_parameters())
        params = ([{**g, "params": [named[n] for n in g["params"]]} for g in param_groups] if param_groups
                  else built.module.parameters())
        opt = torch.optim.AdamW(params, lr=lr, **(adamw or {}))
        norms = []
        m, b = num_microbatches, micro_batch_size
        data = TokenBatches(DataConfig(), batch_size=m * b, seq_len=seq_len, vocab_size=built.vocab_size)
        losses_out = []
        for step in range(num_steps):
            if lr_at is not None:  # one rate for every group, or one per group
                rates = lr_at(step)
                rates = [rates] * len(opt.param_groups) if isinstance(rates, float) else list(rates)
                for g, rate in zip(opt.param_groups, rates, strict=True):
                    g["lr"] = rate
            ids, labels = (t.to(device) for t in data.batch(step))
            losses = []
            for i in range(m):
                rows = slice(i * b, (i + 1) * b)
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                    logits = built.forward(ids[rows])
                loss = built.loss_fn(logits, labels[rows])
                (loss / m).backward()
                losses.append(loss.item())
            if max_grad_norm is not None:
                norms.append(float(torch.nn.utils.clip_grad_norm_(built.module.parameters(), max_grad_norm)))
            opt.step()
            opt.zero_grad()
            losses_out.append(losses)
        if out is not None:
            out["grad_norms"] = norms
            out["weights"] = {n: p.detach().to("cpu", copy=True) for n, p in built.module.named_parameters()}
        return losses_out
    finally:
        torch.set_num_threads(threads)



def config_reference_losses(cfg, **extra) -> list[list[float]]:
    """Plain PyTorch's per-micro-batch losses for a run of examples/gpt-tiny-pp2.yaml as ``cfg``
    sets it (the tiny GPT, 4 micro-batches of 2, its steps, sequence length, AdamW and LR
    schedule); ``extra`` goes to ``reference_losses`` (``bf16``, ``max_grad_norm``, ``out``)."""
    opt = cfg.train.optimizer
    return reference_losses({"source": "gpt", "preset": "tiny"}, num_steps=cfg.train.steps, num_microbatches=4,
                            micro_batch_size=2, seq_len=cfg.train.seq_len, seed=0, lr=opt.lr,
                            adamw={"betas": tuple(opt.betas), "weight_decay": opt.weight_decay},
                            lr_at=lambda k: lr_at(k, cfg), **extra)

def check_zero2_records(got, num_microbatches: int, step_end: list[Op]) -> None:
    """A ZeRO-2 run's (``PipelineResult``) records equal its programs (2 ranks), and each stage's
    ``REDUCE_SCATTER`` comes right before its last gradient pass (``W`` under a split backward,
    else ``B``) and its actions end with ``step_end``."""
    for step in got.records:
        for rank, record in enumerate(step):
            assert record == got.programs[rank % 2], (rank, record)
    for program in got.programs:
        acts = [Action.parse(a) for a in program]
        for s in {a.stage for a in acts}:
            grad_op = Op.W if any(a.op is Op.W and a.stage == s for a in acts) else Op.B
            last = max(k for k, a in enumerate(acts) if a.stage == s and a.op is grad_op)
            assert acts[last - 1] == Action(s, Op.REDUCE_SCATTER, num_microbatches - 1), program
            assert [a.op for a in acts if a.stage == s][-len(step_end):] == step_end, program
