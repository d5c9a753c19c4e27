"""ZeRO-0, -1 and -2 side by side on local Ray workers: gradient bytes while summed and after, time.

    python bench/pipeline_zero.py [--layers 4] [--hidden 128] [--vocab 1024] [--steps 4]
                                  [--microbatches 4] [--bucket-elems 65536] [--schedule 1f1b]
                                  [--offload host,nvme] [--chunk-elems 65536]

pp 2 × dp 2 (four workers of one thread on the embedded Ray, 127.0.0.1, token auth on), the
same model, batches and seed for each ``parallel.zero``; per rank, the medians over the steps
after the first of: ``StepResult.grad_bytes`` (``reduce_peak``: the most gradient bytes held while
the stages' gradients were summed; ``at_optim``: held when the optimizer step began), the time
from the last gradient pass's end to the end of the sum (``ALLREDUCE``'s wall time) and the step.
With ``--offload`` (a home per stage, states in host chunks or NVMe files in a temporary
directory) also ``offloaded_after``: the gradient bytes an offloaded stage holds after the sum,
what its ``OFFLOAD`` moves home (runtime.stage_offload_zero), and each rank's optimizer states.
The losses of the three runs are compared (bitwise with two copies, runtime.stage_zero [Note:
ZeRO-1 parity]).
"""

from __future__ import annotations

import argparse
import os
import statistics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--bucket-elems", type=int, default=65536)
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--offload", default=None, help="a home per stage, e.g. host,nvme")
    ap.add_argument("--chunk-elems", type=int, default=65536)
    args = ap.parse_args()
    import tempfile

    homes = tuple(args.offload.split(",")) if args.offload else None
    tmp = tempfile.TemporaryDirectory()

    import ray

    from memtrain.runtime.pipeline_driver import run_pipeline
    from memtrain.runtime.ray_cluster import _loopback_only

    _loopback_only()
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
    model = {"preset": "tiny", "overrides": {"num_layers": args.layers, "hidden_size": args.hidden,
                                             "vocab_size": args.vocab, "tie_embeddings": False}}
    try:
        runs = {}
        for zero in (0, 1, 2):
            runs[zero] = run_pipeline(model=model, schedule=args.schedule, num_ranks=2, dp=2,
                                      num_microbatches=args.microbatches, micro_batch_size=2, seq_len=32,
                                      num_steps=args.steps, seed=0, lr=1e-3, timeout_s=60,
                                      zero=zero, zero_bucket_elems=args.bucket_elems if zero == 2 else None,
                                      offload=homes, nvme_dir=f"{tmp.name}/z{zero}",
                                      offload_chunk_elems=args.chunk_elems if homes else None)
    finally:
        ray.shutdown()
        tmp.cleanup()
    print(f"pp 2 × dp 2, {args.schedule}, gpt tiny with {args.layers} layers × {args.hidden}, vocab {args.vocab}; "
          f"{args.microbatches} micro-batches; ZeRO-2 buckets of {args.bucket_elems} elements")
    print(f"{'zero':>4} {'rank':>4} {'grads MiB':>10} {'reduce peak':>12} {'at OPTIM':>9} {'ALLREDUCE ms':>13} "
          f"{'step ms':>8}")
    for zero, res in runs.items():
        later = range(1, len(res.records)) if len(res.records) > 1 else range(len(res.records))
        for rank in range(4):
            base = runs[0].grad_bytes[-1][rank]
            whole = base["at_optim"] + base.get("offloaded_after", 0)  # the rank's gradients, summed
            peak = statistics.median(res.grad_bytes[k][rank]["reduce_peak"] for k in later)
            held = statistics.median(res.grad_bytes[k][rank]["at_optim"] for k in later)
            ar = statistics.median(sum(t for a, t in zip(res.records[k][rank], _action_s(res, k, rank))
                                       if "ALLREDUCE" in a) for k in later)
            step = statistics.median(res.step_times_s[k][rank] for k in later)
            print(f"{zero:>4} {rank:>4} {whole / 2**20:>10.2f} {peak / whole:>11.2f}x {held / whole:>8.2f}x "
                  f"{ar * 1e3:>13.1f} {step * 1e3:>8.1f}")
    if homes:
        print(f"offloaded stages ({','.join(homes)}, chunks of {args.chunk_elems} elements): gradient bytes after "
              "the sum (moved home) and optimizer states, per rank, vs ZeRO-0")
        print(f"{'zero':>4} {'rank':>4} {'grads after':>12} {'states':>8}")
        for zero, res in runs.items():
            for rank in range(4):
                g0 = statistics.median(runs[0].grad_bytes[k][rank]["offloaded_after"] for k in later)
                g = statistics.median(res.grad_bytes[k][rank]["offloaded_after"] for k in later)
                s0 = runs[0].state_bytes[rank]["optimizer_states"]
                print(f"{zero:>4} {rank:>4} {g / g0:>11.2f}x {res.state_bytes[rank]['optimizer_states'] / s0:>7.2f}x")
    same = runs[0].microbatch_losses == runs[1].microbatch_losses == runs[2].microbatch_losses
    print(f"losses bitwise equal across zero 0, 1, 2: {same}")


def _action_s(res, step: int, rank: int) -> tuple[float, ...]:
    return res.action_s[step][rank]


if __name__ == "__main__":
    main()
