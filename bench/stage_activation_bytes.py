"""A bf16 pipeline stage's saved-activation bytes: what the planner charges against what a worker
counts (planner.stage_cost [Note: a bf16 stage's activations]).

    python bench/stage_activation_bytes.py [--hidden 64 256] [--layers 2] [--seq-len 64]
                                           [--micro-batch-size 2] [--dropout 0.0] [--dtype bf16]
                                           [--in-flight 4]

For each ``--hidden``, the built-in GPT (``tiny`` preset) runs one step on a one-rank
``StageWorker`` on the CPU, the whole model one stage, one micro-batch; per block it prints the
bytes the worker counts (runtime.stage_keep, ``KeptStage.saved_bytes``), the planner's figure
before (the plain bf16 analysis's ``activation_bytes``) and now (``StageModel``'s: the blocks
traced as the worker runs them, with the GPU's kernels), and the same trace with the CPU's own
kernels (what this worker runs: planner.analyze [Note: kernels as on the accelerator]), and of the
figure now, autocast's bf16 weight copies.

Then (bf16) the rank's activation peak with ``--in-flight`` micro-batches held at once (GPipe on
one rank): measured with each micro-batch's own weight casts (before: the worker built without
its step's shared casts) and with one set for the step (now: runtime.stage_worker [Note: one
weight cast a step]), against the planner's figure before (every micro-batch charged its casts)
and now (``act_bytes`` per micro-batch, the casts once).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E402 (the checkout, when not installed)


def measure(overrides: dict, mbs: int, seq: int, dtype: str, m: int = 1, shared: bool = True) -> tuple[list[int], int]:
    """Per block, the bytes a one-rank worker counts at its step's first forward (its weight
    casts included), and the rank's activation peak with ``m`` micro-batches in flight (GPipe);
    ``shared`` False: each micro-batch casts its own weights, as before."""
    from memtrain.config import ModelConfig
    from memtrain.runtime.pipeline_driver import stage_programs
    from memtrain.runtime.stage_worker import PipelineSpec, StageWorker

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    _, programs = stage_programs("gpipe", 1, m)
    spec = PipelineSpec(model=ModelConfig(preset="tiny", overrides=overrides), partition=(overrides["num_layers"] + 2,),
                        rank_of=(0,), num_ranks=1, dp=1, num_microbatches=m, micro_batch_size=mbs, seq_len=seq,
                        seed=0, timeout_s=30, dtype=dtype)
    worker = StageWorker(spec, 0, programs[0])
    if not shared:
        worker._casts_until = None  # before the build: no cast shared, each counted per micro-batch
    worker.build(*worker.open_store("127.0.0.1"))
    try:
        peak = worker.run_step(0).peak_bytes["activations"]
        kept = worker.acts.kept[0]
        return [a + (w or 0) for a, w in zip(kept.saved_bytes, kept.cast_bytes)], peak
    finally:
        worker.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--in-flight", type=int, default=4, help="micro-batches held at once for the rank's peak")
    args = ap.parse_args()
    from memtrain.config import ModelConfig
    from memtrain.planner.analyze import analyze, autocast_figures
    from memtrain.planner.plan import TrainShape
    from memtrain.planner.stage_cost import StageModel

    mbs, seq = args.micro_batch_size, args.seq_len
    for h in args.hidden:
        ov = dict(num_layers=args.layers, hidden_size=h, num_heads=4, max_seq_len=seq, dropout=args.dropout)
        cfg = ModelConfig(preset="tiny", overrides=ov)
        got, _ = measure(ov, mbs, seq, args.dtype)
        stats = analyze(cfg, seq_len=seq, micro_batch_size=mbs, dtype=args.dtype)
        train = TrainShape(global_batch_size=mbs, micro_batch_size=mbs, num_microbatches=1, seq_len=seq,
                           dtype=args.dtype, optimizer="adamw")
        model = StageModel(stats, train)
        now = [model.acts[j + 1] - model.acts[j] for j in range(len(got))]
        before = [b.activation_bytes for b in stats.blocks]
        cpu = ([f["autocast_activation_bytes"] + f["autocast_weight_bytes"]
                for f in autocast_figures(cfg, seq_len=seq, micro_batch_size=mbs, accelerator=False)]
               if args.dtype == "bf16" else before)
        print(f"hidden {h}, {args.layers} layers, {mbs} x {seq}, dropout {args.dropout}, {args.dtype}")
        print(f"  {'block':>5} {'worker':>10} {'before':>10} {'now':>10} {'cpu trace':>10}"
              f" {'of which weight copies':>22}")
        for j, row in enumerate(zip(got, before, now, cpu)):
            print(f"  {j:>5} " + " ".join(f"{v:>10,}" for v in row) + f" {stats.blocks[j].autocast_weight_bytes:>22,}")
        total = [sum(c) for c in (got, before, now, cpu)]
        print(f"  {'sum':>5} " + " ".join(f"{v:>10,}" for v in total)
              + f"   before/worker {total[1] / total[0]:.3f}, now/worker {total[2] / total[0]:.4f}")
        if args.dtype != "bf16":
            continue
        m = args.in_flight
        _, old_peak = measure(ov, mbs, seq, args.dtype, m, shared=False)
        _, new_peak = measure(ov, mbs, seq, args.dtype, m)
        casts = model.casts[-1]
        plan_old, plan_new = m * model.acts[-1], m * (model.acts[-1] - casts) + casts
        print(f"  rank peak, {m} micro-batches in flight: measured {old_peak:,} -> {new_peak:,} "
              f"({new_peak / old_peak:.3f}); planner {plan_old:,} -> {plan_new:,}; weight casts {casts:,} a set")


if __name__ == "__main__":
    main()
