"""Planner accuracy: the simulator's predictions against measured runs on this machine.

    python bench/plan_accuracy.py [--steps 10] [--warmup 2] [--nvme-path DIR] [--only NAME ...]

For each configuration (small GPTs on the CPU device: all on the device; host-home chunks
under a device budget that forces offload; NVMe-home chunks in real files, also on a wider GPT
whose step the disk's bandwidth bounds; swap_host, swap_nvme and recompute activations; several
micro-batches) it profiles the model and this
machine afresh (``runtime.profiling.run_profile`` + ``apply_profile``), predicts one step with
``simulate_step`` on a given memory policy (or plans one with the search under budgets), trains
``--steps`` steps with ``wrap(..., plan=...)``, and prints predicted against measured step time
(median of the steps after ``--warmup``) and per-tier ledger peaks (over the same steps), with
the errors. Peaks are compared without the untracked workspace estimate
(``planner.search.tracked_peak_bytes``); the prediction uses the analysis' activation sizes, as
the planner does. The last columns set the process against the plan: the peak RSS above a
baseline taken just before the model is built (after the profile, the heap trimmed), against
the plan's ``process_bytes`` (planner.footprint [Note: process memory]: both tiers, the
workspace, what the C heap keeps, the NVMe store's threads), as bytes above the baseline and as
the whole process's peak (baseline + each). Targets: median step-time error <= 10%, every peak
within 5%, no peak under-predicted by more than 2%, every process peak (baseline included, as
``memtrain run`` reports it) within 10%. A profile the profiler flags as unreliable (measured under load,
or noisy: ``planner.measure``) is named under its row and counted at the end.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from memtrain.cluster.inventory import local_node_spec
from memtrain.models.gpt import GPT, gpt_config
from memtrain.offload.chunks import make_chunk_plans, named_blocks, param_order
from memtrain.cluster import catalog
from memtrain.planner.analyze import analyze
from memtrain.planner.plan import ActPolicy, MemoryPolicy, Tier, TrainShape
from memtrain.planner.profile_format import profile_flag
from memtrain.planner.profile_inputs import apply_profile
from memtrain.planner.search import plan, predicted_process_bytes, tracked_peak_bytes
from memtrain.planner.simulate import simulate_step
from memtrain.config import ModelConfig, config_from_dict
from memtrain.runtime.process_memory import ProcessPeak
from memtrain.runtime.profiling import run_profile
from memtrain.runtime.wrapping import wrap

K, SH, SN, RC = ActPolicy.KEEP, ActPolicy.SWAP_HOST, ActPolicy.SWAP_NVME, ActPolicy.RECOMPUTE
TARGET_STEP_ERR = 0.10
TARGET_PEAK_ERR = 0.05
TARGET_UNDER = 0.02
TARGET_PROCESS_ERR = 0.10
SMALL = {"num_layers": 4, "hidden_size": 256, "num_heads": 4, "vocab_size": 2048, "max_seq_len": 128}
WIDE = {"num_layers": 4, "hidden_size": 768, "num_heads": 12, "vocab_size": 8192, "max_seq_len": 128}
"""About 35M parameters: with every chunk NVMe-home the step is bound by the disk's bandwidth,
not by its per-request cost as with SMALL."""

# name: model overrides on the tiny preset, batch shape, and the memory policy (or budgets to plan under)
CONFIGS = {
    "tiny/device": dict(model={}, seq=64, gbs=4, mbs=2, homes=Tier.DEVICE, acts=K, depth=1, chunk=10**9),
    "tiny/host-d2": dict(model={}, seq=64, gbs=4, mbs=2, homes=Tier.HOST, acts=K, depth=2, chunk=60_000),
    "small/device-keep": dict(model=SMALL, seq=128, gbs=4, mbs=2, homes=Tier.DEVICE, acts=K, depth=1, chunk=10**9),
    "small/host-d3": dict(model=SMALL, seq=128, gbs=4, mbs=2, homes=Tier.HOST, acts=K, depth=3, chunk=800_000),
    "small/nvme-d3": dict(model=SMALL, seq=128, gbs=4, mbs=2, homes=Tier.NVME, acts=K, depth=3, chunk=800_000),
    "wide/nvme-d3": dict(model=WIDE, seq=128, gbs=4, mbs=2, homes=Tier.NVME, acts=K, depth=3, chunk=4 * 2**20),
    "small/swap_host": dict(model=SMALL, seq=128, gbs=4, mbs=2, homes=Tier.DEVICE, acts=SH, depth=1, chunk=10**9),
    "small/swap_nvme": dict(model=SMALL, seq=128, gbs=4, mbs=2, homes=Tier.DEVICE, acts=SN, depth=1, chunk=10**9),
    "small/recompute-4mb": dict(model=SMALL, seq=128, gbs=8, mbs=2, homes=Tier.DEVICE, acts=RC, depth=1, chunk=10**9),
    "small/mixed": dict(model=SMALL, seq=128, gbs=4, mbs=2, depth=3, chunk=800_000,
                        homes=lambda n: [Tier.DEVICE] * 2 + [Tier.HOST] * (n - 4) + [Tier.NVME] * 2,
                        acts=lambda n: [K, SH, RC, SN, K, K][:n]),
    # the search chooses the policy under a device budget that cannot hold the model states
    "small/planned-40MiB": dict(model=SMALL, seq=128, gbs=4, mbs=2, device_budget=40 * 2**20),
}


def _policy(model, spec: dict) -> MemoryPolicy:
    params = param_order(model, named_blocks(model, None))
    num_chunks = len(make_chunk_plans(params, spec["chunk"], Tier.HOST))
    homes = spec["homes"](num_chunks) if callable(spec["homes"]) else [spec["homes"]] * num_chunks
    num_blocks = len(model.blocks)
    acts = spec["acts"](num_blocks) if callable(spec["acts"]) else [spec["acts"]] * num_blocks
    return MemoryPolicy(chunk_size_elems=spec["chunk"], chunks=make_chunk_plans(params, spec["chunk"], homes),
                        prefetch_depth=spec["depth"], activations=tuple(acts))


def _predict(name: str, spec: dict, model, nvme_dir: Path, quiet: bool):
    """Profile afresh, then (policy, predicted step time, predicted tracked peaks, predicted
    process bytes above the baseline, what is unreliable in the profile: ``profile_flag``, empty
    when nothing). ``model`` may be on the meta device: only its parameters' names and sizes are read."""
    dtype = "fp32"
    cfg = config_from_dict({
        "name": name.replace("/", "-"),
        "model": {"preset": "tiny", "overrides": spec["model"]},
        "train": {"global_batch_size": spec["gbs"], "micro_batch_size": spec["mbs"], "seq_len": spec["seq"], "dtype": dtype},
        "cluster": {"auto": False, "nodes": [{"nvme": {"path": str(nvme_dir / "profile")}}]},
    })
    profile = run_profile(cfg, progress=(lambda msg: None) if quiet else print)
    flag = profile_flag(profile)
    node = local_node_spec()
    device = catalog.cpu_device_spec(num_cpus=node.host.num_cpus, memory_bytes=node.host.memory_bytes // 2)
    nvme = catalog.default_nvme_spec(str(nvme_dir), shutil.disk_usage(nvme_dir).free)
    stats = analyze(ModelConfig(preset="tiny", overrides=spec["model"]), seq_len=spec["seq"], micro_batch_size=1, dtype=dtype)
    stats, device, host, nvme = apply_profile(profile, stats, device, node.host, nvme)
    if "device_budget" in spec:
        p = plan(stats, name=name, global_batch_size=spec["gbs"], micro_batch_size=spec["mbs"], dtype=dtype,
                 optimizer="adamw", device=device, host=host, nvme=nvme,
                 budgets={"device": spec["device_budget"], "host": node.host.memory_bytes // 4, "nvme": 2**34},
                 safety_margin=0.1, param_numels={n: p.numel() for n, p in model.named_parameters()})
        if not p.fits:
            raise SystemExit(f"{name}: the search found no plan: {p.shortfall}")
        dev = p.prediction.devices[0]
        return p.memory, p.prediction.step_time_s, tracked_peak_bytes(dev), dev.process_bytes, flag
    policy = _policy(model, spec)
    train = TrainShape(global_batch_size=spec["gbs"], micro_batch_size=spec["mbs"], num_microbatches=spec["gbs"] // spec["mbs"],
                       seq_len=spec["seq"], dtype=dtype, optimizer="adamw")
    sim = simulate_step(stats, train, device, host, nvme, policy, timeline=False)
    return policy, sim.step_time_s, sim.peak_bytes, predicted_process_bytes(stats, train, device, policy, sim), flag


def _measure(spec: dict, policy: MemoryPolicy, nvme_dir: Path, steps: int, warmup: int):
    """(median step time after warm-up, ledger peaks per tier over those steps, the process's
    peak RSS above the baseline taken before the model is built, as ``memtrain run`` takes it)."""
    meter = ProcessPeak("cpu")
    torch.manual_seed(0)
    model = GPT(gpt_config("tiny", **spec["model"]))
    engine = wrap(model, optimizer="adamw", memory={"device": 2**40, "host": 2**40, "nvme_path": str(nvme_dir / "run")},
                  plan=policy, micro_batch_size=spec["mbs"], verbose=False, device="cpu")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (spec["gbs"], spec["seq"] + 1), generator=gen)
    batch = (ids[:, :-1], ids[:, 1:])
    ledgers = {"device": engine.store.device_ledger, "host": engine.store.host_ledger}
    if engine.nvme is not None:
        ledgers["nvme"] = engine.nvme.ledger
    times = []
    try:
        for step in range(steps):
            if step == warmup:
                for led in ledgers.values():
                    led.reset_peak()
            t0 = time.perf_counter()
            engine.train_step(batch)
            if step >= warmup:
                times.append(time.perf_counter() - t0)
        peaks = {t: led.peak_bytes for t, led in ledgers.items()}
        process = meter.peak_bytes()
    finally:
        engine.close()
    return statistics.median(times), peaks, process, meter.baseline_bytes


def _err(pred: float, meas: float) -> float:
    return (pred - meas) / meas if meas else (0.0 if pred == 0 else float("inf"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="steps per configuration, warm-up included")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the timing and the peaks")
    ap.add_argument("--nvme-path", default=None, help="directory for NVMe files (default: a temporary directory)")
    ap.add_argument("--only", nargs="*", default=None, help="configuration names to run")
    ap.add_argument("--verbose", action="store_true", help="print the profiler's progress")
    args = ap.parse_args(argv)
    if args.steps <= args.warmup:
        raise SystemExit("--steps: must be more than --warmup")
    names = args.only or list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"--only: unknown configuration {unknown[0]!r}; known: {', '.join(CONFIGS)}")
    root = Path(args.nvme_path) if args.nvme_path else Path(tempfile.mkdtemp(prefix="memtrain-accuracy-"))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    header = f"{'configuration':<22} {'step pred':>9} {'meas':>9} {'err':>7}   " + "   ".join(
        f"{t + ' pred':>12} {'meas':>12} {'err':>7}" for t in ("device", "host", "nvme")) + (
        f"   {'process pred':>11} {'meas':>11} {'err':>7} {'total err':>9}")
    print(header)
    step_errs, peak_errs, process_errs, flagged = [], [], [], []
    started = time.perf_counter()
    for name in names:
        spec = CONFIGS[name]
        work = root / name.replace("/", "-")
        work.mkdir(parents=True, exist_ok=True)
        with torch.device("meta"):
            model = GPT(gpt_config("tiny", **spec["model"]))
        policy, pred_s, pred_peaks, pred_process, flag = _predict(name, spec, model, work, quiet=not args.verbose)
        meas_s, peaks, process, baseline = _measure(spec, policy, work, args.steps, args.warmup)
        step_errs.append(_err(pred_s, meas_s))
        process_errs.append((_err(baseline + pred_process, baseline + process), name))
        cells = []
        for tier in ("device", "host", "nvme"):
            p, m = pred_peaks.get(tier, 0), peaks.get(tier, 0)
            e = _err(p, m)
            if p or m:
                peak_errs.append((e, name, tier))
            cells.append(f"{p:>12,} {m:>12,} {e:>+7.1%}" if p or m else f"{'-':>12} {'-':>12} {'':>7}")
        cells.append(f"{pred_process / 2**20:>8.1f}MiB {process / 2**20:>8.1f}MiB {_err(pred_process, process):>+7.1%} "
                     f"{process_errs[-1][0]:>+9.1%}")
        print(f"{name:<22} {pred_s * 1e3:>7.1f}ms {meas_s * 1e3:>7.1f}ms {step_errs[-1]:>+7.1%}   " + "   ".join(cells),
              flush=True)
        if flag:
            flagged.append(name)
            print(f"{'':<22} profile flagged: {flag}", flush=True)
        shutil.rmtree(work, ignore_errors=True)
    if not args.nvme_path:
        shutil.rmtree(root, ignore_errors=True)
    median_step = statistics.median(abs(e) for e in step_errs)
    worst = max(peak_errs, key=lambda t: abs(t[0]))
    under = min(peak_errs, key=lambda t: t[0])
    worst_process = max(process_errs, key=lambda t: abs(t[0]))
    ok = (median_step <= TARGET_STEP_ERR and abs(worst[0]) <= TARGET_PEAK_ERR and under[0] >= -TARGET_UNDER
          and abs(worst_process[0]) <= TARGET_PROCESS_ERR)
    print(f"\nmedian |step-time error| {median_step:.1%} (target <= {TARGET_STEP_ERR:.0%}); "
          f"worst peak error {worst[0]:+.1%} ({worst[1]} {worst[2]}; target within {TARGET_PEAK_ERR:.0%}); "
          f"most under-predicted peak {under[0]:+.1%} ({under[1]} {under[2]}; target >= -{TARGET_UNDER:.0%}); "
          f"worst process-peak error {worst_process[0]:+.1%} ({worst_process[1]}; target within "
          f"{TARGET_PROCESS_ERR:.0%} of the process's peak RSS)")
    if flagged:
        print(f"{len(flagged)} of {len(names)} profiles flagged as unreliable (measured under load or noisy): "
              "their errors are the machine's, not the planner's; run the bench on a quiet machine")
    print(f"{'all targets met' if ok else 'targets missed'}; {len(names)} configurations in {time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
