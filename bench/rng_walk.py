"""The dropout walk's CPU time per random element (runtime.stage_rng ``StageRng.begin``), the
figure planner.stage_cost ``RNG_WALK_S_PER_ELEM`` charges.

    python bench/rng_walk.py [--hidden 64 256] [--layers 6] [--seq-len 64] [--micro-batch-size 2]
                             [--microbatches 8] [--reps 5]

For each ``--hidden``, the built-in GPT (``tiny`` preset, dropout 0.1) is traced on the CPU as a
pipeline worker traces it (``trace_gpt``), its random elements per micro-batch counted (each
draw's tensor: the embedding's and each layer's two residual dropouts, b·s·h, and the attention
probabilities', b·heads·s·s), and a rank's walk over ``--microbatches`` micro-batches of one
replica timed on one thread (as the workers run) in CPU time, the least of ``--reps``. Prints
the elements, the walk's time and the time per element. The machine's load moves the figures.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E402 (the checkout, when not installed)


def walk_per_elem(hidden: int, layers: int, seq_len: int, batch: int, m: int, reps: int) -> tuple[int, float]:
    """Random elements one micro-batch draws, and the walk's CPU seconds for ``m`` of them."""
    import torch

    from memtrain.models.gpt import gpt_config
    from memtrain.runtime.stage_rng import StageRng, TensorSpec, trace_gpt

    cfg = gpt_config("tiny", hidden_size=hidden, num_layers=layers, max_seq_len=seq_len, dropout=0.1)
    cpu = torch.device("cpu")
    draws = trace_gpt(cfg, batch, seq_len, cpu)
    elems = sum(math.prod(d.args[0].shape) for ds in draws for d in ds if isinstance(d.args[0], TensorSpec))
    rng = StageRng(draws, {0: range(len(draws))}, replica=0, dp=1, num_microbatches=m, device=cpu)
    best = math.inf
    for _ in range(reps):
        t = time.process_time()
        rng.begin()
        best = min(best, time.process_time() - t)
    return elems, best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    print(f"{'hidden':>6} {'elements/mb':>12} {'walk ms':>8} {'ns/element':>10}")
    for h in args.hidden:
        elems, s = walk_per_elem(h, args.layers, args.seq_len, args.micro_batch_size, args.microbatches, args.reps)
        print(f"{h:>6} {elems:>12,} {s * 1e3:>8.2f} {s / (elems * args.microbatches) * 1e9:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
