"""``memtrain run`` in one process: plan, build the model, train with the engine, report.

The distributed runtime (Ray actors) reuses the same engine per stage; this is the embedded
single-process path.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from memtrain.planner.units import format_bytes
from memtrain.runtime.config import Config, ConfigError

__all__ = ["lr_at", "train"]


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then constant or
    cosine decay to 10% of the peak over the remaining steps (GPT-3, Brown et al. 2020, Sec. B)."""
    peak = cfg.train.optimizer.lr
    warm = cfg.train.warmup_steps
    if step < warm:
        return peak * (step + 1) / warm
    if cfg.train.lr_schedule == "constant":
        return peak
    span = max(cfg.train.steps - warm, 1)
    progress = min((step - warm) / span, 1.0)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _memory_for(plan, cfg: Config) -> dict:
    """The engine's budgets: the tiers' full budgets (the ledger enforces them; the plan kept
    the safety margin free for untracked workspace)."""
    from memtrain.runtime.planning import budgets_for

    budgets = budgets_for(cfg, plan.device, plan.host, plan.nvme)
    memory: dict = {"device": budgets["device"], "host": budgets["host"]}
    uses_nvme = any(c.home == "nvme" for c in plan.memory.chunks) or any(a == "swap_nvme" for a in plan.memory.activations)
    if uses_nvme:
        if plan.nvme is None:
            raise ConfigError("cluster.nodes[].nvme.path: the plan uses NVMe but no path is configured")
        memory["nvme"] = str(Path(plan.nvme.path) / f"memtrain-{cfg.name}")
        memory["nvme_budget"] = budgets["nvme"]
    return memory


def train(cfg: Config, *, print_fn=print) -> dict:
    """Train ``cfg.train.steps`` steps; returns a summary (losses, timings, memory)."""
    from memtrain.models import build_model
    from memtrain.planner import report
    from memtrain.planner.measure import LoadMeter
    from memtrain.runtime.data import TokenBatches
    from memtrain.runtime.engine import wrap
    from memtrain.runtime.planning import plan_from_config, run_dir
    from memtrain.runtime.run_check import closing_lines

    plan = plan_from_config(cfg)
    report.print_summary(plan)
    if not plan.fits:
        raise ConfigError(f"the model does not fit: {plan.shortfall}")
    out_dir = run_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan.save(out_dir / "plan.json")

    torch.manual_seed(cfg.train.seed)
    built = build_model(cfg.model, max_seq_len=cfg.train.seq_len)
    opt = cfg.train.optimizer
    optimizer = {"name": opt.name, "lr": opt.lr, "weight_decay": opt.weight_decay}
    if opt.name == "adamw":
        optimizer.update(betas=tuple(opt.betas), eps=opt.eps)
    else:
        optimizer.update(momentum=opt.momentum)
    engine = wrap(
        built.module, optimizer=optimizer, memory=_memory_for(plan, cfg), plan=plan, blocks=list(built.blocks),
        loss_fn=built.loss_fn, dtype=cfg.train.dtype, verbose=False, call=lambda m, ids: built.forward(ids),
    )
    data = TokenBatches(cfg.data, batch_size=cfg.train.global_batch_size, seq_len=cfg.train.seq_len,
                        vocab_size=built.vocab_size)
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
    losses, step_times = [], []
    metrics_path = out_dir / "metrics.jsonl"
    print_fn(f"training {cfg.train.steps} steps of {tokens_per_step:,} tokens; run directory {out_dir}")
    run_load = LoadMeter()  # what other processes do during the run, for closing_lines
    try:
        with metrics_path.open("w") as metrics:
            for step in range(cfg.train.steps):
                engine.set_lr(lr_at(step, cfg))
                t0 = time.perf_counter()
                loss = engine.train_step(next(data))
                dt = time.perf_counter() - t0
                losses.append(loss)
                step_times.append(dt)
                peaks = engine.step_peak_bytes()
                record = {"step": step + 1, "loss": loss, "step_time_s": dt, "tokens_per_s": tokens_per_step / dt,
                          "lr": lr_at(step, cfg), "peak_bytes": peaks}
                metrics.write(json.dumps(record) + "\n")
                print_fn(f"step {step + 1:>5}/{cfg.train.steps}  loss {loss:.4f}  {dt:6.3f} s  "
                         f"{tokens_per_step / dt:10,.0f} tok/s  step peak: device {format_bytes(peaks['device'])}, "
                         f"host {format_bytes(peaks['host'])}")
        mem = engine.memory_report()
    finally:
        engine.close()
    for line in closing_lines(plan, step_times_s=step_times, memory=mem, run_load=run_load.read()):
        print_fn(line)
    return {"losses": losses, "step_times_s": step_times, "plan": plan,
            "peak_bytes": {t: m.peak_bytes for t, m in mem.items()}}
