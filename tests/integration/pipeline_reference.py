"""The single-process reference of the pipeline parity tests: plain PyTorch, the model built the
ordinary way under the seed, the same global batch as micro-batches in order, each loss divided
by their number before its backward, ``torch.optim.AdamW`` with the same hyper-parameters and
learning rate per step (``bf16``: the forward under ``torch.autocast``, the loss in fp32)."""

from __future__ import annotations

import torch

from memtrain.config import DataConfig, ModelConfig
from memtrain.models.source import build_model
from memtrain.runtime.data import TokenBatches


def reference_losses(model: dict, *, num_steps: int, num_microbatches: int, micro_batch_size: int, seq_len: int,
                     seed: int, lr: float, adamw: dict | None = None, lr_at=None, bf16: bool = False) -> list[list[float]]:
    """Per step, each micro-batch's loss, on one thread (as each worker runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        built = build_model(ModelConfig(**model), max_seq_len=seq_len)
        opt = torch.optim.AdamW(built.module.parameters(), lr=lr, **(adamw or {}))
        m, b = num_microbatches, micro_batch_size
        data = TokenBatches(DataConfig(), batch_size=m * b, seq_len=seq_len, vocab_size=built.vocab_size)
        out = []
        for step in range(num_steps):
            if lr_at is not None:
                for g in opt.param_groups:
                    g["lr"] = lr_at(step)
            ids, labels = data.batch(step)
            losses = []
            for i in range(m):
                rows = slice(i * b, (i + 1) * b)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    logits = built.forward(ids[rows])
                loss = built.loss_fn(logits, labels[rows])
                (loss / m).backward()
                losses.append(loss.item())
            opt.step()
            opt.zero_grad()
            out.append(losses)
        return out
    finally:
        torch.set_num_threads(threads)
