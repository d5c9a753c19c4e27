"""The peer baseline of ``bench/pipeline.py``: ``torch.distributed.pipelining`` on gloo.

    python bench/torch_pipeline.py [--schedule 1f1b] [--ranks 2] [--microbatches 8] [--steps 6]

One process per rank (``torch.multiprocessing``, one thread each), a gloo group over a TCP
store on 127.0.0.1, the built-in GPT (untied embeddings, so every parameter lives on one stage)
cut into contiguous block ranges, ``torch.optim.AdamW`` per stage. Prints the median step time
after the warm-up and the losses; ``run`` returns them for ``bench/pipeline.py`` and the tests.
With ``data_seed`` each step reads the batch memtrain's pipeline reads (``runtime.data.TokenBatches``),
so the two runs' losses can be compared; without it, uniform random token ids.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

TORCH_SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved-1f1b": "ScheduleInterleaved1F1B",
                   "zb-h1": "ScheduleInterleavedZeroBubble", "zbv": "ScheduleZBVZeroBubble"}
"""memtrain's schedule names and torch's classes for them (torch's zero-bubble one is the
interleaved form of ZB-H1; ZBV is its V-shape, memtrain's v-shapes differ)."""
_MULTI_STAGE = {"interleaved-1f1b", "zb-h1", "zbv"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def even_partition(num_blocks: int, num_stages: int) -> list[int]:
    """Blocks per stage, as even as the count allows (the earlier stages take the remainder)."""
    q, r = divmod(num_blocks, num_stages)
    return [q + (1 if i < r else 0) for i in range(num_stages)]


def _stage_ids(kind: str, rank: int, ranks: int) -> list[int]:
    if kind not in _MULTI_STAGE:
        return [rank]
    if kind == "zbv":
        return [rank, 2 * ranks - 1 - rank]
    return [rank, rank + ranks]


def _worker(rank: int, ranks: int, port: int, kind: str, m: int, steps: int, model: dict, gbs: int, seq: int,
            partition: list[int] | None, seed: int, lr: float, data_seed: int | None, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed import pipelining as pp

    from memtrain.models.gpt import GPT, causal_lm_loss, gpt_config

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = dist.TCPStore("127.0.0.1", port, ranks, is_master=rank == 0, timeout=__import__("datetime").timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=ranks, timeout=__import__("datetime").timedelta(seconds=60))
    try:
        torch.manual_seed(seed)
        full = GPT(gpt_config(**{"tie_embeddings": False, **model}))
        num_stages = ranks * (2 if kind in _MULTI_STAGE else 1)
        sizes = partition or even_partition(len(full.blocks), num_stages)
        bounds = [sum(sizes[:i]) for i in range(num_stages + 1)]
        stages, params = [], []
        for sid in _stage_ids(kind, rank, ranks):
            sub = torch.nn.Sequential(*full.blocks[bounds[sid]:bounds[sid + 1]])
            params += list(sub.parameters())
            stages.append(pp.PipelineStage(sub, sid, num_stages, torch.device("cpu")))
        cls = getattr(pp, TORCH_SCHEDULES[kind])
        sched = cls(stages if kind in _MULTI_STAGE else stages[0], m, loss_fn=causal_lm_loss)
        opt = torch.optim.AdamW(params, lr=lr)
        holds_first = any(s.is_first for s in stages)
        holds_last = any(s.is_last for s in stages)
        losses, times = [], []
        data = None
        if data_seed is not None:
            from memtrain.config import DataConfig
            from memtrain.runtime.data import TokenBatches

            data = TokenBatches(DataConfig(seed=data_seed), batch_size=gbs, seq_len=seq, vocab_size=full.config.vocab_size)
        for step in range(steps):
            if data is not None:
                x, y = data.batch(step)
            else:
                ids = torch.randint(0, full.config.vocab_size, (gbs, seq + 1), generator=torch.Generator().manual_seed(seed * 1000 + step))
                x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
            dist.barrier()
            t0 = time.perf_counter()
            mb_losses: list = []
            kwargs = {"target": y, "losses": mb_losses} if holds_last else {}
            if holds_first:
                sched.step(x, **kwargs)
            else:
                sched.step(**kwargs)
            opt.step()
            opt.zero_grad(set_to_none=True)
            dist.barrier()
            times.append(time.perf_counter() - t0)
            if holds_last:
                losses.append(float(torch.stack([loss.detach() for loss in mb_losses]).mean()))
        if holds_last:
            torch.save({"losses": losses, "times": times}, out)
    finally:
        dist.destroy_process_group()


def run(kind: str, ranks: int, num_microbatches: int, steps: int, *, model: dict | None = None, global_batch_size: int = 8,
        seq_len: int = 32, partition: list[int] | None = None, seed: int = 0, lr: float = 1e-3,
        data_seed: int | None = None) -> dict:
    """Train ``steps`` steps under torch's ``kind`` schedule; {"losses": per step, "times": per step (s)}.
    ``data_seed``: read memtrain's synthetic batches with this data seed (see the module doc)."""
    if kind not in TORCH_SCHEDULES:
        raise ValueError(f"schedule {kind!r}: torch.distributed.pipelining has {sorted(TORCH_SCHEDULES)} here")
    model = model or {"preset": "tiny"}
    with tempfile.TemporaryDirectory(prefix="memtrain-torch-pp-") as tmp:
        out = str(Path(tmp) / "result.pt")
        mp.start_processes(_worker, args=(ranks, _free_port(), kind, num_microbatches, steps, model, global_batch_size,
                                          seq_len, partition, seed, lr, data_seed, out), nprocs=ranks, start_method="spawn")
        return torch.load(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--schedule", default="1f1b", choices=sorted(TORCH_SCHEDULES))
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    res = run(args.schedule, args.ranks, args.microbatches, args.steps)
    timed = res["times"][args.warmup:] or res["times"]
    print(f"torch.distributed.pipelining {args.schedule}, {args.ranks} ranks, {args.microbatches} micro-batches: "
          f"median step {statistics.median(timed) * 1e3:.1f} ms; losses {', '.join(f'{x:.4f}' for x in res['losses'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
