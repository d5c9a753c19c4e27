"""The engine tests' shared case (test_engine.py, test_engine_overlap.py): the tiny GPT's
batches, a memory policy of one home for every chunk, and a wrapped engine on it."""

from __future__ import annotations

import torch

from memtrain.models.gpt import GPT
from memtrain.offload.chunks import make_chunk_plans, named_blocks, param_order
from memtrain.planner.plan import ActPolicy, MemoryPolicy, Tier
from memtrain.runtime import wrap

SEQ_LEN, BATCH, MICRO = 16, 4, 2


def _batch(cfg, step: int, batch: int = BATCH, seq_len: int = SEQ_LEN):
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def _policy(model, home: Tier, chunk_elems: int = 20_000, depth: int = 2) -> MemoryPolicy:
    blocks = named_blocks(model, None)
    return MemoryPolicy(chunk_size_elems=chunk_elems, chunks=make_chunk_plans(param_order(model, blocks), chunk_elems, home),
                        prefetch_depth=depth, activations=(ActPolicy.KEEP,) * len(blocks))


def _engine(cfg, home: Tier, tmp_path, *, seed: int = 0, optimizer=None, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = GPT(cfg)
    memory = {"device": "64MiB", "host": "256MiB", "nvme_path": str(tmp_path / "nvme")}
    engine = wrap(model, optimizer=optimizer or dict(name="adamw", lr=1e-3), memory=memory, plan=_policy(model, home, chunk_elems=40_000 if home is Tier.NVME else 20_000),
                  micro_batch_size=MICRO, verbose=False, **kw)
    return engine, model
