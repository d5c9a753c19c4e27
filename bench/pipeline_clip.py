"""What gradient clipping by the global norm costs a pipeline step: the same run with and without
``max_grad_norm``, side by side.

    python bench/pipeline_clip.py [--schedule 1f1b] [--ranks 2] [--steps 6] [--layers 4] [--hidden 256]

One run each on the embedded Ray on 127.0.0.1 (``runtime.ray_cluster``), one ``StageWorker`` of
one thread per rank (``runtime.pipeline_driver.run_pipeline``). Printed: the median step time
after the first step of each run and their ratio; each rank's ``CLIP`` action (the norms, the
all-gather, the scaling; runtime.stage_clip) as measured and as ``planner.simulate_pipeline
.clip_time_s`` predicts it from the rank's gradient bytes (at ``--mem-gbps``) and a loopback link
(``--link-gbps``, ``--latency-us``); and whether the two runs' first-step losses are equal (they
must be: clipping acts after the first step's backward).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--max-grad-norm", type=float, default=0.05)
    ap.add_argument("--mem-gbps", type=float, default=10.0, help="a worker thread's memory bandwidth, GB/s")
    ap.add_argument("--link-gbps", type=float, default=1.0, help="loopback gloo bandwidth, GB/s")
    ap.add_argument("--latency-us", type=float, default=200.0, help="one gloo message on loopback, µs")
    args = ap.parse_args(argv)

    import ray

    from memtrain.planner.simulate_pipeline import Link, clip_time_s
    from memtrain.runtime.pipeline_driver import run_pipeline
    from memtrain.runtime.ray_cluster import _loopback_only

    _loopback_only()
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    ray.init(address="local", num_cpus=args.ranks, include_dashboard=False, _node_ip_address="127.0.0.1")
    model = {"preset": "tiny", "overrides": {"num_layers": args.layers, "hidden_size": args.hidden,
                                             "tie_embeddings": False}}
    runs = {}
    try:
        for clip in (None, args.max_grad_norm):
            runs[clip] = run_pipeline(model=model, schedule=args.schedule, num_ranks=args.ranks,
                                      num_microbatches=args.microbatches, micro_batch_size=2, seq_len=64,
                                      num_steps=args.steps, max_grad_norm=clip, timeout_s=60)
    finally:
        ray.shutdown()
    plain, clipped = runs[None], runs[args.max_grad_norm]
    t0, t1 = (statistics.median(r.step_wall_s[1:]) for r in (plain, clipped))
    print(f"{args.schedule}, {args.ranks} ranks, {args.layers} layers x {args.hidden}: step {t0 * 1e3:.1f} ms "
          f"unclipped, {t1 * 1e3:.1f} ms clipped ({t1 / t0:.3f}x)")
    link = Link(gbps=args.link_gbps, latency_s=args.latency_us * 1e-6)
    per_rank, tensors = _rank_params(model, args.schedule, args.ranks)
    for rank, prog in enumerate(clipped.programs):
        k = next(i for i, a in enumerate(prog) if a.endswith("CLIP"))
        measured = statistics.median(step[rank][k] for step in clipped.action_s[1:])
        predicted = clip_time_s(args.ranks, tensors, 4 * per_rank[rank], link, args.mem_gbps)
        print(f"rank {rank}: {prog[k]} measured {measured * 1e3:.2f} ms (median; a rank that arrives first waits for "
              f"the others there), predicted {predicted * 1e3:.2f} ms ({per_rank[rank]:,} parameters)")
    print(f"grad norms per step: {', '.join(f'{n:.4f}' for n in clipped.grad_norms)}")
    same = plain.microbatch_losses[0] == clipped.microbatch_losses[0]
    print(f"first step's losses equal: {same}")
    return 0 if same else 1


def _rank_params(model: dict, schedule: str, ranks: int) -> tuple[list[int], int]:
    """Per rank, the elements of its stages' parameters (the even partition); and the model's tensors."""
    import torch

    from memtrain.models.gpt import GPT, gpt_config
    from memtrain.planner.pipeline import placement
    from memtrain.runtime.pipeline_driver import even_partition

    with torch.device("meta"):
        meta = GPT(gpt_config(model["preset"], **model["overrides"]))
    per_block = [sum(q.numel() for q in b.parameters()) for b in meta.blocks]
    place = placement(schedule, ranks, 2)
    out, at = [0] * ranks, 0
    for s, n in enumerate(even_partition(len(per_block), place.num_stages)):
        out[place.rank_of[s]] += sum(per_block[at:at + n])
        at += n
    return out, sum(1 for _ in meta.parameters())


if __name__ == "__main__":
    sys.exit(main())
