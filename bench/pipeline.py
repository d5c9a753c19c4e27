"""Pipeline schedules on local Ray workers: measured step and bubble beside the simulator's and the peer's.

    python bench/pipeline.py [--schedules gpipe 1f1b ...] [--steps 8] [--warmup 3] [--layers 6]
                             [--hidden 256] [--vocab 8192] [--microbatches 8] [--balance 1f1b]
    python bench/pipeline.py --quick      # a tiny model, 2 steps, 2 schedules (the test's run)

One run, on the embedded Ray on 127.0.0.1 with token authentication on (``runtime.ray_cluster``),
one ``StageWorker`` per core with one thread each (``runtime.pipeline_driver.run_pipeline``):

1. **Costs.** Each block's forward ``F``, whole backward, input-gradient ``B``, weight-gradient
   ``W`` and optimizer step, timed in this process on one thread by the worker's own handlers
   (a ``StageWorker`` of one rank holding every block as a stage of its own), plus the rest of
   its step (the batch, the bookkeeping): once for the table at the top, then afresh before each
   run (the form of backward it uses), so a simulation and its run see the machine in about the
   same state; a gloo probe between two processes on loopback (``bench/link_probe.py``) for the
   link; Ray's gap between two calls queued on an actor for Ray's part of a step. The timings are
   ``runtime.pipeline_probe``'s and ``comm.link_probe``'s, what ``memtrain run`` measures on its
   workers before it plans a pipeline of CPUs (planner.measured [Note: measured pipeline]).
2. **Simulated.** Per schedule, the stages' sums of those costs over the even partition go to the
   multi-rank simulator (``planner.simulate_pipeline``, one link per pair of ranks as
   ``planner.hetero_plan`` gives it; each receive costs its rank a late receive's time, gloo's
   transfers being rendezvous: ``simulate``); a rank's step ends with its optimizer steps, and
   the step is the latest rank's plus the rest of the step.
3. **Measured.** The same run on Ray: step time is the median, over the steps after the warm-up,
   of the slowest rank's wall time; the bubble is ``1 - Σ busy / (ranks × step)`` with each rank's
   busy time its passes' and optimizer steps' costs from 1, as the simulator counts it. Error = simulated / measured - 1; target: median |error|
   over the schedules <= 10%.
4. **The peer.** ``torch.distributed.pipelining`` on gloo (``bench/torch_pipeline.py``) with the
   same model, split, batches and seed where torch has the schedule (GPipe, 1F1B, interleaved
   1F1B); memtrain/torch is the driver's time per step (each step queued on the workers ahead of
   the last one's end: runtime.pipeline_driver [Note: a step queued ahead]) / torch's step, target <= 1.0×,
   and the two runs' losses are compared.
5. **Balanced against even.** The head sits on the last stage, so an even split of the blocks
   leaves the first rank idle; the split the simulator finds fastest over the measured block
   costs (starting from ``planner.partition.partition_min_max``'s) is run and shown beside the
   even one, with each rank's idle share.

The machine's load moves every figure: run it on a quiet machine for numbers to quote (it prints
the load and the spread of its cost timings). [Note: worker niceness] keeps the Ray workers,
the cost timings and torch's processes at one niceness.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benches, also in spawned children
import link_probe  # noqa: E402
import torch_pipeline  # noqa: E402

from memtrain.optimizers import OptimizerSpec  # noqa: E402
from memtrain.config import ConfigError, ModelConfig  # noqa: E402
from memtrain.errors import UserError  # noqa: E402
from memtrain.models.gpt import gpt_config  # noqa: E402
from memtrain.planner.measured import BlockCosts, pipeline_link  # noqa: E402
from memtrain.planner.partition import partition_min_max  # noqa: E402
from memtrain.planner.pipeline import SCHEDULES, add_p2p, generate, placement  # noqa: E402
from memtrain.planner.simulate_pipeline import Link, StageCost, simulate_pipeline  # noqa: E402
from memtrain.runtime.pipeline_driver import even_partition, run_pipeline, stage_programs  # noqa: E402
from memtrain.runtime import pipeline_probe  # noqa: E402
from memtrain.runtime.ray_cluster import embedded  # noqa: E402
from memtrain.runtime.stage_device import pins_cores  # noqa: E402
from memtrain.runtime.stage_worker import block_ranges  # noqa: E402

TARGET_ERR = 0.10
"""Median |simulated / measured - 1| over the schedules (issue 18)."""
TARGET_RATIO = 1.0
"""memtrain's step (Ray included) over torch.distributed.pipelining's."""
LOSS_TOL = 1e-5
"""|memtrain - torch| per step's mean loss. The runs start from the same weights and read the same
batches on one thread each; the means are taken differently (memtrain's in float64 over the
micro-batch losses, the torch bench's a float32 ``torch.mean``: about 1e-6 apart at a loss near
9), and torch scales the summed gradients by 1/m where memtrain scales each loss before its
backward, which AdamW nearly cancels (measured: at most 1.1e-6 over 6 steps)."""
TORCH_SAME = ("gpipe", "1f1b", "interleaved-1f1b")
"""Schedules torch has with memtrain's split (its zero-bubble ones are interleaved or ZBV)."""
_SPLIT_W = ("zb-h1", "v-half", "v-min")
MAX_SIMULATED_SPLITS = 2000
"""The most contiguous splits ``balanced_partition`` simulates (8 blocks over 4 stages: 35)."""

DEFAULT_MODEL = {"num_layers": 6, "hidden_size": 256, "num_heads": 4, "vocab_size": 8192, "max_seq_len": 64,
                 "tie_embeddings": False}
"""About 0.5 s a step per rank at the default shapes on one core of a 2020s x86 CPU; a large
vocabulary, so the head (with the loss) weighs about three layers: the even split's imbalance."""
QUICK_MODEL = {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "vocab_size": 256, "max_seq_len": 16,
               "tie_embeddings": False}


def measure_blocks(model: ModelConfig, *, m: int, b: int, seq: int, seed: int, lr: float, steps: int,
                   split: bool | None = None, base: BlockCosts | None = None) -> BlockCosts:
    """Each block's costs on one thread in this process: ``runtime.pipeline_probe.measure_blocks``,
    what ``memtrain run`` measures on its workers before planning (every layer timed here)."""
    costs, _ = pipeline_probe.measure_blocks(model, m=m, b=b, seq=seq, seed=seed, optimizer=OptimizerSpec(lr=lr),
                                             steps=steps, split=split, base=base, num_threads=1)
    return costs


@dataclass(frozen=True, slots=True)
class Simulated:
    step_s: float
    bubble: float
    busy_s: tuple[float, ...]
    """Per rank, its passes and optimizer steps."""


def stage_costs(costs: BlockCosts, partition: tuple[int, ...], split: bool) -> list[StageCost]:
    out = []
    for blocks in block_ranges(partition):
        out.append(StageCost(fwd_s=sum(costs.fwd_s[i] for i in blocks),
                             bwd_s=sum((costs.b_s if split else costs.bwd_s)[i] for i in blocks),
                             wgrad_s=sum(costs.w_s[i] for i in blocks) if split else 0.0,
                             output_bytes=costs.output_bytes))
    return out


def simulate(kind: str, p: int, m: int, v: int, partition: tuple[int, ...], costs: BlockCosts, link: Link) -> Simulated:
    """Schedule ``kind``'s step from the block costs and the link (see the module doc, 2), the
    link as ``memtrain run``'s planner takes it (planner.measured ``pipeline_link``)."""
    place = placement(kind, p, v)
    sched = add_p2p(generate(kind, p, m, stages_per_rank=v), place)
    plain = stage_costs(costs, partition, kind in _SPLIT_W)
    wire = pipeline_link(link.latency_s, link.gbps, link.send_s)
    links = {(a, c): wire for a in range(p) for c in range(p) if a != c}  # loopback: every pair alike
    res = simulate_pipeline(sched, place, plain, wire, links=links)
    ends = [0.0] * p
    for (_, s, _), (_, end) in res.pass_times.items():
        ends[place.rank_of[s]] = max(ends[place.rank_of[s]], end)
    ranges = block_ranges(partition)
    tail = [sum(costs.optim_s[i] for s in place.stages_of(r) for i in ranges[s]) for r in range(p)]
    # busy: the passes themselves (each once per micro-batch) and the optimizer steps, no receives
    busy = [m * sum(plain[s].fwd_s + plain[s].bwd_s + plain[s].wgrad_s for s in place.stages_of(r)) + tail[r]
            for r in range(p)]
    step = costs.rest_s + max(e + t for e, t in zip(ends, tail))
    return Simulated(step_s=step, bubble=1.0 - sum(busy) / (p * step), busy_s=tuple(busy))


def min_max_partition(costs: BlockCosts, num_stages: int, split: bool) -> tuple[int, ...]:
    """The contiguous split whose costliest stage (passes and optimizer step) is cheapest."""
    per_block = [f + (bb + w if split else bw) + o
                 for f, bw, bb, w, o in zip(costs.fwd_s, costs.bwd_s, costs.b_s, costs.w_s, costs.optim_s)]
    prefix = [0.0]
    for c in per_block:
        prefix.append(prefix[-1] + c)
    _, bounds = partition_min_max(len(per_block), num_stages, lambda s, first, end: prefix[end] - prefix[first])
    return tuple(end - first for first, end in bounds)


def balanced_partition(kind: str, p: int, m: int, v: int, costs: BlockCosts, link: Link) -> tuple[int, ...]:
    """The contiguous split the simulator finds fastest, among all of them where there are at
    most ``MAX_SIMULATED_SPLITS`` (ties: the min-max split), else the min-max split. Summed stage
    costs miss what a schedule adds (the first rank's last backward and optimizer step come
    after the last rank's), so the simulator has the last word."""
    n, k = len(costs.fwd_s), placement(kind, p, v).num_stages
    min_max = min_max_partition(costs, k, kind in _SPLIT_W)
    if math.comb(n - 1, k - 1) > MAX_SIMULATED_SPLITS:
        return min_max
    splits = [tuple(e - a for a, e in zip((0, *cuts), (*cuts, n)))
              for cuts in itertools.combinations(range(1, n), k - 1)]
    return min(splits, key=lambda parts: (simulate(kind, p, m, v, parts, costs, link).step_s,
                                          parts != min_max))


@dataclass(frozen=True, slots=True)
class Measured:
    step_s: float
    wall_s: float
    """The driver's median time per step (Ray's part included: what a user waits)."""
    losses: tuple[float, ...]
    records_match: bool
    """Every rank's executed record equals its program, every step."""


def measure(kind: str, args: argparse.Namespace, model: ModelConfig, partition: tuple[int, ...]) -> Measured:
    res = run_pipeline(model=model, schedule=kind, num_ranks=args.ranks, dp=1, num_microbatches=args.microbatches,
                       micro_batch_size=args.micro_batch_size, seq_len=args.seq_len, num_steps=args.steps,
                       seed=args.seed, lr=args.lr, partition=partition, stages_per_rank=args.stages_per_rank,
                       timeout_s=120.0, num_threads=1, num_cpus_per_worker=1,
                       pin_cores=embedded() and pins_cores(args.ranks, 1))
    timed = [max(ranks) for ranks in res.step_times_s[args.warmup:]]
    match = all(rec == res.programs[r] for step in res.records for r, rec in enumerate(step))
    return Measured(step_s=statistics.median(timed), wall_s=statistics.median(res.step_wall_s[args.warmup:]),
                    losses=res.losses, records_match=match)


def measure_torch(kind: str, args: argparse.Namespace, model: ModelConfig, partition: tuple[int, ...]) -> dict:
    res = torch_pipeline.run(kind, args.ranks, args.microbatches, args.steps,
                             model={"preset": model.preset, **model.overrides},
                             global_batch_size=args.microbatches * args.micro_batch_size, seq_len=args.seq_len,
                             partition=list(partition), seed=args.seed, lr=args.lr, data_seed=0)
    return {"step_s": statistics.median(res["times"][args.warmup:]), "losses": tuple(res["losses"])}


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms"


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=None,
                    help="default: all six (--quick: gpipe 1f1b)")
    ap.add_argument("--ranks", type=int, default=2, help="pipeline ranks, one Ray worker of one thread each")
    ap.add_argument("--microbatches", type=int, default=None, help="micro-batches per step (default 8; --quick 4)")
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 64; --quick 16)")
    ap.add_argument("--layers", type=int, default=None, help="transformer layers (default 6; --quick 2)")
    ap.add_argument("--hidden", type=int, default=None, help="hidden size (default 256; --quick 64)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (default 8192; --quick 256)")
    ap.add_argument("--stages-per-rank", type=int, default=2, help="interleaved-1f1b's stages per rank")
    ap.add_argument("--steps", type=int, default=None, help="steps per run, warm-up included (default 8; --quick 2)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="steps left out of the timing (default 3, as a run's first steps took up to 1.3x the later "
                         "ones here; --quick 1)")
    ap.add_argument("--cost-steps", type=int, default=2, help="steps timed for the block costs, after a warm-up")
    ap.add_argument("--balance", default="1f1b", help="schedule of the balanced-against-even runs, or 'none'")
    ap.add_argument("--no-torch", action="store_true", help="leave out torch.distributed.pipelining")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--quick", action="store_true", help="a tiny model, 2 steps, gpipe and 1f1b (the test's run)")
    args = ap.parse_args(argv)
    quick = args.quick
    for name, full, small in (("schedules", list(SCHEDULES), ["gpipe", "1f1b"]), ("microbatches", 8, 4),
                              ("seq_len", 64, 16), ("layers", 6, 2), ("hidden", 256, 64), ("vocab", 8192, 256),
                              ("steps", 8, 2), ("warmup", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    for name in ("ranks", "microbatches", "micro_batch_size", "seq_len", "layers", "hidden", "vocab",
                 "stages_per_rank", "steps", "cost_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.warmup < args.steps:
        raise UserError(f"--warmup: must be from 0 to --steps - 1 ({args.steps - 1}), got {args.warmup}")
    if args.balance != "none" and args.balance not in SCHEDULES:
        raise UserError(f"--balance: one of {', '.join(SCHEDULES)} or 'none', got {args.balance!r}")
    for kind in {*args.schedules, *([args.balance] if args.balance != "none" else [])}:
        try:
            place, _ = stage_programs(kind, args.ranks, args.microbatches, stages_per_rank=args.stages_per_rank)
        except ValueError as e:
            raise UserError(f"--microbatches/--ranks: {kind}: {e}") from None
        if place.num_stages > args.layers + 2:
            raise UserError(f"--layers: {kind} over {args.ranks} ranks has {place.num_stages} stages, more than the "
                            f"model's {args.layers + 2} blocks (the layers, the embedding, the head); give --layers "
                            f"{place.num_stages - 2} or more")
    return args


def _model(args: argparse.Namespace) -> ModelConfig:
    base = QUICK_MODEL if args.quick else DEFAULT_MODEL
    heads = base["num_heads"]
    if args.hidden % heads:
        raise UserError(f"--hidden: must be a multiple of {heads} (the heads), got {args.hidden}")
    return ModelConfig(preset="tiny", overrides={**base, "num_layers": args.layers, "hidden_size": args.hidden,
                                                 "vocab_size": args.vocab, "max_seq_len": args.seq_len})


def run(args: argparse.Namespace) -> int:
    """The whole benchmark (the module doc); Ray must be connected."""
    import ray

    model = _model(args)
    p, m, v = args.ranks, args.microbatches, args.stages_per_rank
    n = args.layers + 2
    print(f"model: gpt {args.layers} layers × {args.hidden} hidden, vocabulary {args.vocab}, untied ({n} blocks); "
          f"{p} ranks × 1 thread; {m} micro-batches of {args.micro_batch_size} × {args.seq_len} tokens; "
          f"{args.steps} steps, {args.warmup} warm-up")
    load = os.getloadavg()[0]
    print(f"Ray: {int(ray.cluster_resources().get('CPU', 0))} CPUs, {os.cpu_count()} cores, load average {load:.1f} "
          f"before the bench" + (" (others are using the cores: every figure below is noisy; rerun on a quiet "
                                 "machine to quote them)" if load > 0.5 * (os.cpu_count() or 1) else ""))
    if p > (os.cpu_count() or 1):
        print(f"  {p} ranks on {os.cpu_count()} cores: the workers share cores, which the simulator does not model")
    costs = measure_blocks(model, m=m, b=args.micro_batch_size, seq=args.seq_len, seed=args.seed, lr=args.lr,
                           steps=args.cost_steps)
    for label, vals in (("F", costs.fwd_s), ("B whole", costs.bwd_s), ("B split", costs.b_s), ("W split", costs.w_s),
                        ("optimizer", costs.optim_s)):
        print(f"  per block {label:<10} " + " ".join(f"{x * 1e3:7.2f}" for x in vals) + " ms")
    print(f"  rest of a step (batch, bookkeeping): {_ms(costs.rest_s)}")
    probe = link_probe.probe()
    rtt = pipeline_probe.ray_step_gap_s()
    print(f"  gloo on loopback: latency {probe.link.latency_s * 1e6:.0f} µs, {probe.link.gbps:.2f} GB/s, a late "
          f"receive {probe.recv_s * 1e6:.0f} µs, a send {probe.link.send_s * 1e6:.0f} µs; Ray between two queued calls "
          f"{_ms(rtt)}")
    print()
    head = (f"{'schedule':<17}{'partition':<14}{'measured':>11}{'bubble':>8}{'simulated':>11}{'bubble':>8}"
            f"{'error':>8}{'torch':>11}{'memtrain/torch':>16}{'max|Δloss|':>12}{'load':>6}")
    print(head)
    errors, ratios, loss_diffs, even_runs = [], [], [], {}
    ok = True
    totals = [sum(costs.fwd_s)]  # a micro-batch's forward through every block, per timing: the load's mark
    for kind in args.schedules:
        stages = placement(kind, p, v).num_stages
        parts = even_partition(n, stages)
        fresh = _fresh_costs(args, model, kind, costs)
        totals.append(sum(fresh.fwd_s))
        sim = simulate(kind, p, m, v, parts, fresh, probe.link)
        got = measure(kind, args, model, parts)
        even_runs[kind] = (parts, got, sim)
        bubble = 1.0 - sum(sim.busy_s) / (p * got.step_s)
        err = sim.step_s / got.step_s - 1.0
        errors.append(abs(err))
        torch_cols = f"{'—':>11}{'—':>16}{'—':>12}"
        if not args.no_torch and kind in TORCH_SAME and (kind != "interleaved-1f1b" or v == 2):
            peer = measure_torch(kind, args, model, parts)
            ratio = got.wall_s / peer["step_s"]
            diff = max(abs(a - c) for a, c in zip(got.losses, peer["losses"], strict=True))
            ratios.append(ratio)
            loss_diffs.append(diff)
            torch_cols = f"{_ms(peer['step_s']):>11}{ratio:>15.2f}×{diff:>12.1e}"
        ok = ok and got.records_match
        print(f"{kind:<17}{','.join(map(str, parts)):<14}{_ms(got.step_s):>11}{bubble * 100:>7.1f}%"
              f"{_ms(sim.step_s):>11}{sim.bubble * 100:>7.1f}%{_pct(err):>8}{torch_cols}{os.getloadavg()[0]:>6.1f}"
              + ("" if got.records_match else "  records differ from the programs"))
        print(f"{'':<17}losses {' '.join(f'{x:.4f}' for x in got.losses)}")
    print()
    med = statistics.median(errors)
    print(f"median |error| over {len(errors)} schedules: {med * 100:.1f}% (target <= {TARGET_ERR * 100:.0f}%)")
    if ratios:
        print(f"memtrain/torch step, the driver's wait per step (Ray included): worst {max(ratios):.2f}×, best {min(ratios):.2f}× "
              f"(target <= {TARGET_RATIO:.1f}×); losses: max |Δ| {max(loss_diffs):.1e} (tolerance {LOSS_TOL:g})")
        ok = ok and max(loss_diffs) <= LOSS_TOL
    print("every rank ran its program: " + ("yes" if all(r[1].records_match for r in even_runs.values()) else "NO"))
    if args.balance != "none":
        totals.append(_balanced_against_even(args, model, costs, probe, even_runs))
    print(f"\nthe block costs, timed afresh before each run: a micro-batch's forward through every block took "
          f"{_ms(min(totals))} to {_ms(max(totals))} (the machine's load moves the figures by about "
          f"{(max(totals) / min(totals) - 1) * 100:.0f}%); load average (1 min) {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores, this bench's {p} worker{'s' if p > 1 else ''} included")
    return 0 if ok else 1


def _fresh_costs(args: argparse.Namespace, model: ModelConfig, kind: str, base: BlockCosts) -> BlockCosts:
    """The block costs timed again just before ``kind``'s run (the backward form it uses), so the
    simulation and the run see the machine in about the same state."""
    return measure_blocks(model, m=args.microbatches, b=args.micro_batch_size, seq=args.seq_len, seed=args.seed,
                          lr=args.lr, steps=args.cost_steps, split=kind in _SPLIT_W, base=base)


def _balanced_against_even(args: argparse.Namespace, model: ModelConfig, costs: BlockCosts,
                           probe: link_probe.Probe, even_runs: dict) -> float:
    """Prints the section; returns the forward through every block of the costs it timed."""
    kind, p, m, v = args.balance, args.ranks, args.microbatches, args.stages_per_rank
    stages = placement(kind, p, v).num_stages
    fresh = _fresh_costs(args, model, kind, costs)
    even = even_partition(args.layers + 2, stages)
    balanced = balanced_partition(kind, p, m, v, fresh, probe.link)
    print()
    print(f"balanced against even ({kind}): per rank, its idle share of the measured step")
    print(f"{'partition':<22}{'measured':>11}{'simulated':>11}{'error':>8}   idle per rank: measured step, simulated")
    runs = {}
    for label, parts in (("even", even), ("balanced", balanced)):
        # both simulated on the same fresh costs, so the simulated gain is the partition's alone
        sim = simulate(kind, p, m, v, parts, fresh, probe.link)
        if label == "even" and kind in even_runs:
            got = even_runs[kind][1]
        elif label == "balanced" and parts == even:
            got = runs["even"][0]
        else:
            got = measure(kind, args, model, parts)
        runs[label] = (got, sim)
        idle = (" ".join(f"{max(0.0, 1.0 - b / got.step_s) * 100:5.1f}%" for b in sim.busy_s) + "  |"
                + " ".join(f"{(1.0 - b / sim.step_s) * 100:5.1f}%" for b in sim.busy_s))
        print(f"{label + ' ' + ','.join(map(str, parts)):<22}{_ms(got.step_s):>11}{_ms(sim.step_s):>11}"
              f"{_pct(sim.step_s / got.step_s - 1.0):>8}   {idle}")
    print(f"balanced step: {runs['even'][0].step_s / runs['balanced'][0].step_s:.2f}× faster than even (measured), "
          f"{runs['even'][1].step_s / runs['balanced'][1].step_s:.2f}× (simulated)")
    return sum(fresh.fwd_s)


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parse(argv)
        model = _model(args)
        gpt_config(model.preset, **model.overrides)
    except (UserError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from memtrain.runtime.ray_cluster import connected

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # the Ray workers inherit it from the raylet
    # [Note: worker niceness] Ray starts its workers 15 nicer than the raylet, so that on a busy
    # machine the raylet and GCS come first; the bench's own timings (the block costs, torch's
    # processes) run at this process's niceness, so the embedded Ray's workers are started at it too
    os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        with connected(num_cpus=args.ranks) as line:
            print(line)
            return run(args)
    except (UserError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
