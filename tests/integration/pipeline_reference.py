"""The single-process reference of the pipeline parity tests: plain PyTorch, the model built the
ordinary way under the seed, the same global batch as micro-batches in order, each loss divided
by their number before its backward, ``torch.optim.AdamW`` with the same hyper-parameters and
learning rate per step (``lr_at``: one for all groups or one per group; ``bf16``: the forward under ``torch.autocast``, the loss in fp32);
with ``max_grad_norm`` each step first ``torch.nn.utils.clip_grad_norm_(model.parameters())``, with
``param_groups`` (dicts of parameter names, ``lr``, ``weight_decay``) AdamW's groups by name.
``out``, when given, receives the steps' norms (``grad_norms``) and the final ``weights`` by name."""

from __future__ import annotations

import torch

from memtrain.config import DataConfig, ModelConfig
from memtrain.models.source import build_model
from memtrain.runtime.data import TokenBatches


def reference_losses(model: dict, *, num_steps: int, num_microbatches: int, micro_batch_size: int, seq_len: int,
                     seed: int, lr: float, adamw: dict | None = None, lr_at=None, bf16: bool = False,
                     max_grad_norm: float | None = None, param_groups: list[dict] | None = None,
                     out: dict | None = None) -> list[list[float]]:
    """Per step, each micro-batch's loss, on one thread (as each worker runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        built = build_model(ModelConfig(**model), max_seq_len=seq_len)
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
            ids, labels = data.batch(step)
            losses = []
            for i in range(m):
                rows = slice(i * b, (i + 1) * b)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
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
            out["weights"] = {n: p.detach().clone() for n, p in built.module.named_parameters()}
        return losses_out
    finally:
        torch.set_num_threads(threads)
