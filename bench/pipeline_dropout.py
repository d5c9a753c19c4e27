"""Dropout's cost in a pipeline: the step with one process's masks (runtime.stage_rng) against without.

    python bench/pipeline_dropout.py [--layers 6] [--hidden 256] [--vocab 8192] [--seq-len 64]
                                     [--microbatches 8] [--micro-batch-size 2] [--dp 1]
                                     [--schedule 1f1b] [--steps 8] [--warmup 3] [--rounds 2]

pp 2 × ``--dp`` workers of one thread on the embedded Ray (127.0.0.1, token auth on), the same
model with dropout 0.1, batches and seed, run three ways, ``--rounds`` times in turn:

- ``walk``: as memtrain runs it, each rank replaying the step's draws in one process's order;
- ``own stream``: the behaviour before, each worker's forwards drawing from its own generator
  (``StageRng``'s calls made no-ops in every worker by a Ray worker setup hook);
- ``dropout 0``: for scale (no masks at all, no walk).

Step time: the median over the steps after the warm-up of the slowest rank's wall time, then the
least over the rounds (other processes' load only ever adds). The ratio walk / own stream is the
walk's cost. Also the walk alone, timed in this process on one thread in CPU time
(``StageRng.begin``), and its share of the step and of rank 0's forwards and backwards (its
blocks, timed the same way): on a loaded machine that last share is the steady figure. Whether the
``walk`` losses equal one process's (tests/integration/pipeline_reference.py; the ``own stream``
ones do not). The load moves every figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def _own_stream() -> None:
    """Worker setup hook: every rank draws from its own stream, as before runtime.stage_rng."""
    from memtrain.runtime.stage_rng import StageRng

    StageRng.begin = StageRng.enter = StageRng.leave = StageRng.finish = lambda self, *a: None


def _pipeline(args: argparse.Namespace, model: dict, hook: bool) -> tuple[float, list[list[float]]]:
    import ray

    from memtrain.runtime.pipeline_driver import run_pipeline
    from memtrain.runtime.ray_cluster import _loopback_only

    _loopback_only()
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    env = {"worker_process_setup_hook": _own_stream} if hook else None
    ray.init(address="local", num_cpus=max(4, 2 * args.dp), include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env=env)
    try:
        got = run_pipeline(model=model, schedule=args.schedule, num_ranks=2, dp=args.dp,
                           num_microbatches=args.microbatches, micro_batch_size=args.micro_batch_size,
                           seq_len=args.seq_len, num_steps=args.steps, seed=0, lr=1e-3, timeout_s=120,
                           step_timeout_s=600)
    finally:
        ray.shutdown()
    step = statistics.median(max(ts) for ts in got.step_times_s[args.warmup:])
    return step, [list(x) for x in got.microbatch_losses]


def _walk_s(args: argparse.Namespace, model: dict) -> tuple[float, float]:
    """In this process on one thread, in CPU time (the load adds none), the least of 5: rank 0's
    ``StageRng.begin``, and its share of the work, its blocks' (the first half) forward and
    backward over its micro-batches."""
    import torch

    from memtrain.models.gpt import GPT, gpt_config
    from memtrain.runtime.stage_rng import StageRng, trace_gpt

    torch.set_num_threads(1)
    cfg = gpt_config(model["preset"], **model["overrides"])
    cpu = torch.device("cpu")
    rng = StageRng(trace_gpt(cfg, args.micro_batch_size, args.seq_len, cpu), {0: range(0, 1)}, replica=0,
                   dp=args.dp, num_microbatches=args.microbatches, device=cpu)
    blocks = GPT(cfg).train().blocks[: (cfg.num_layers + 2) // 2]
    ids = torch.randint(0, cfg.vocab_size, (args.micro_batch_size, args.seq_len))

    def rank0() -> None:
        for _ in range(args.microbatches):
            x = ids
            for block in blocks:
                x = block(x)
            x.backward(torch.ones_like(x))

    def least(fn) -> float:
        times = []
        for _ in range(5):
            t = time.thread_time()
            fn()
            times.append(time.thread_time() - t)
        return min(times)
    return least(rng.begin), least(rank0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    overrides = {"num_layers": args.layers, "hidden_size": args.hidden, "vocab_size": args.vocab,
                 "max_seq_len": args.seq_len, "tie_embeddings": False}
    model = {"preset": "tiny", "overrides": {**overrides, "dropout": 0.1}}
    plain = {"preset": "tiny", "overrides": {**overrides, "dropout": 0.0}}
    print(f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; pp 2 × dp {args.dp}, {args.schedule}, "
          f"{args.layers} layers of {args.hidden}, {args.microbatches} micro-batches of {args.micro_batch_size} × "
          f"{args.seq_len}")
    runs: dict[str, list[float]] = {"walk": [], "own stream": [], "dropout 0": []}
    losses = own = None
    for _ in range(args.rounds):
        step, losses = _pipeline(args, model, hook=False)
        runs["walk"].append(step)
        step, own = _pipeline(args, model, hook=True)
        runs["own stream"].append(step)
        runs["dropout 0"].append(_pipeline(args, plain, hook=False)[0])
    step = {k: min(v) for k, v in runs.items()}
    for k, v in runs.items():
        print(f"{k:>11}: step {step[k] * 1e3:8.1f} ms   (rounds: {', '.join(f'{t * 1e3:.1f}' for t in v)})")
    walk, work = _walk_s(args, model)
    print(f"walk / own stream: {step['walk'] / step['own stream']:.3f}×; the walk alone (this process, CPU time): "
          f"{walk * 1e3:.2f} ms per step, {walk / step['walk']:.1%} of the walk run's step, "
          f"{walk / work:.1%} of rank 0's forwards and backwards ({work * 1e3:.1f} ms)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
    from pipeline_reference import reference_losses

    want = reference_losses(model, num_steps=args.steps, num_microbatches=args.microbatches * args.dp,
                            micro_batch_size=args.micro_batch_size, seq_len=args.seq_len, seed=0, lr=1e-3)
    for name, got in (("walk", losses), ("own stream", own)):
        diff = max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w, strict=True))
        print(f"{name}'s losses against one process's: {'bitwise' if got == want else f'max |Δ| {diff:.2e}'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
