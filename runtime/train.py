"""``memtrain run`` in one process: plan, build the model, train with the engine, report.

The distributed runtime (Ray actors) reuses the same engine per stage; this is the embedded
single-process path.

[Note: the run directory] A run writes ``plan.json`` (before its first step) and
``metrics.jsonl`` (one line per step, flushed to the OS as the step ends, so a killed run keeps
the lines of every finished step; no fsync, which would cost a disk flush per step) into its run
directory, so the two always describe the same run: a directory holding an earlier run's
``plan.json`` or ``metrics.jsonl`` is refused, and ``overwrite=True`` (``--overwrite``) removes
them once the new plan fits. ``profile.parquet`` (``memtrain profile``'s, reused by later plans)
is kept. A run that fails before its first step ends removes what it wrote there.

[Note: closing the engine] Whatever fails after ``wrap()`` (the data source, a step, the loss
turning non-finite, an interrupt) closes the engine before the error propagates, so the NVMe
store's chunk files and lock are removed; a SIGKILL leaves them, and the next run's store
removes them (offload.nvme [Note: stale files]).

[Note: checkpoints of a run] A run also writes ``config.json`` (the config it ran, which
``memtrain resume`` reads) and checkpoints under ``checkpoint.dir`` (default
``<run_dir>/checkpoints``, runtime.checkpoint [Note: checkpoint layout]): every
``checkpoint.interval_steps`` steps, at the end, and after the step in progress when SIGTERM or
SIGINT arrives (preemption; a pipeline whose steps take under a second may first finish the one
queued behind it, runtime.pipeline_driver [Note: a step queued ahead]), after which the run stops
with ``Stopped``. A second SIGINT
interrupts at once. Writes overlap the next steps (``Checkpointer``). A resumed run
(``resume_from``) runs the plan it saved, loads the state, truncates ``metrics.jsonl`` to the
checkpoint's step and continues with the next step, so its lines equal an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
import warnings
from pathlib import Path

import torch

from memtrain.errors import UserError
from memtrain.units import format_bytes
from memtrain.config import Config, ConfigError

__all__ = ["lr_factor", "lr_at", "step_lrs", "train",
           "NonFiniteLoss", "Stopped", "StopSignals", "RUN_ARTIFACTS", "EXIT_NON_FINITE_LOSS", "checkpoint_root",
           "check_run_dir", "remove_artifacts", "truncate_metrics", "write_config", "non_finite"]

RUN_ARTIFACTS = ("plan.json", "metrics.jsonl", "config.json")
"""What ``train`` writes to the run directory ([Note: the run directory])."""

EXIT_NON_FINITE_LOSS = 3
"""``memtrain run``'s exit status when the loss became NaN or infinite (2 is a user mistake)."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite at ``step``; the run stopped after writing its metrics line.

    Neither a config mistake nor a failure of memtrain: training diverged, so ``memtrain run``
    exits with ``EXIT_NON_FINITE_LOSS``. A step that fp16 loss scaling skipped for overflowing
    gradients has a finite loss and is not one."""

    def __init__(self, message: str, *, step: int) -> None:
        super().__init__(message)
        self.step = step


class Stopped(Exception):
    """SIGTERM or SIGINT stopped the run after ``step`` steps, with a checkpoint written at
    ``path`` ([Note: checkpoints of a run])."""

    def __init__(self, signum: int, *, step: int, path: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {path}")
        self.signum, self.step, self.path = signum, step, path


def checkpoint_root(cfg: Config) -> Path:
    from memtrain.runtime.planning import run_dir

    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir(cfg) / "checkpoints"


class StopSignals:
    """SIGTERM and SIGINT set ``signum`` (the run checkpoints after the step in progress); a
    second SIGINT raises KeyboardInterrupt. Only the main thread can take signals: elsewhere
    nothing is installed."""

    def __init__(self, print_fn) -> None:
        self.signum: int | None = None
        self.print_fn = print_fn
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        self.print_fn(f"memtrain: {signal.Signals(signum).name} received: checkpointing after this step, then stopping "
                      "(press Ctrl-C again to stop at once)")

    def __enter__(self) -> "StopSignals":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of steps 1..``step`` (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def lr_factor(step: int, cfg: Config) -> float:
    """The schedule's factor at optimizer step ``step`` (0-based): linear warm-up, then constant
    or cosine decay to 0.1 over the remaining steps (GPT-3, Brown et al. 2020, Sec. B). Every
    group's rate is its peak times this, as torch's ``LambdaLR`` scales each param group."""
    warm = cfg.train.warmup_steps
    if step < warm:
        return (step + 1) / warm
    if cfg.train.lr_schedule == "constant":
        return 1.0
    span = max(cfg.train.steps - warm, 1)
    progress = min((step - warm) / span, 1.0)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate of optimizer step ``step`` (0-based): ``train.optimizer.lr`` × ``lr_factor``
    (a group without its own ``lr`` runs at this; ``metrics.jsonl``'s ``lr``)."""
    return cfg.train.optimizer.lr * lr_factor(step, cfg)


def step_lrs(step: int, cfg: Config) -> float | tuple[float, ...]:
    """What a step sets (``engine.set_lr``, ``run_pipeline``'s ``lr_at``): ``lr_at`` without
    ``train.optimizer.param_groups``, else one rate per group, its peak × ``lr_factor``."""
    opt = cfg.train.optimizer
    if not opt.param_groups:
        return lr_at(step, cfg)
    factor = lr_factor(step, cfg)
    return tuple((opt.lr if g.lr is None else g.lr) * factor for g in opt.param_groups)


def _memory_for(plan, cfg: Config) -> dict:
    """The engine's budgets: the tiers' full budgets (the ledger enforces them; the plan kept
    the safety margin free for untracked workspace)."""
    from memtrain.runtime.planning import budgets_for

    budgets = budgets_for(cfg, plan.device, plan.host, plan.nvme)
    memory: dict = {"device": budgets["device"], "host": budgets["host"]}
    uses_nvme = any(c.home == "nvme" for c in plan.memory.chunks) or any(a == "swap_nvme" for a in plan.memory.activations)
    if uses_nvme:
        field = "cluster.nodes[0].nvme.path"
        if plan.nvme is None:
            raise ConfigError(f"{field}: the plan uses NVMe but no path is configured")
        if not Path(plan.nvme.path).is_dir():
            raise ConfigError(f"{field}: {plan.nvme.path!r} is not a directory; create it (on a fast local disk) or "
                              "point the path at one")
        memory["nvme_path"] = str(Path(plan.nvme.path) / f"memtrain-{cfg.name}")
        memory["nvme"] = budgets["nvme"]
    return memory


def check_run_dir(out_dir: Path, overwrite: bool, checkpoints: Path) -> None:
    """Refuse a run directory holding an earlier run's artifacts ([Note: the run directory])."""
    from memtrain.runtime.checkpoint import list_checkpoints

    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"run_dir: {out_dir} is a file; set run_dir (or name) to a directory")
    found = [name for name in RUN_ARTIFACTS if (out_dir / name).exists()]
    if list_checkpoints(checkpoints):
        found.append(f"checkpoints in {checkpoints}")
    if found and not overwrite:
        raise UserError(
            f"run_dir: {out_dir} holds an earlier run's {' and '.join(found)}; pass --overwrite to replace them, "
            "or give this run its own directory (--set name=... or --set run_dir=...)"
        )


def remove_artifacts(out_dir: Path, created: bool, checkpoints: Path | None = None) -> None:
    for name in RUN_ARTIFACTS:
        (out_dir / name).unlink(missing_ok=True)
    if checkpoints is not None and checkpoints.is_dir():
        import shutil

        shutil.rmtree(checkpoints)
    if created:
        with contextlib.suppress(OSError):  # something else was written there meanwhile: keep it
            out_dir.rmdir()


@contextlib.contextmanager
def _store_notes_to(print_fn):
    """Show the NVMe store's ``StaleFilesWarning`` as a line of the run's output."""
    from memtrain.offload.nvme import StaleFilesWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", StaleFilesWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, StaleFilesWarning):
                print_fn(f"memtrain: {message}")
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def non_finite(loss: float, step: int, cfg: Config, metrics_path: Path) -> NonFiniteLoss:
    fixes = [f"lower train.optimizer.lr (peak {cfg.train.optimizer.lr:g})",
             f"add or lengthen train.warmup_steps (now {cfg.train.warmup_steps})"]
    if cfg.train.dtype == "fp16":
        fixes.append("train in bf16 (--set train.dtype=bf16), whose range does not overflow like fp16's")
    return NonFiniteLoss(
        f"step {step}: the loss is {loss} (not finite), so training stopped; likely fixes: {'; '.join(fixes)}. "
        f"The metrics of steps 1-{step} are in {metrics_path}", step=step,
    )


def train(cfg: Config, *, overwrite: bool = False, print_fn=print, resume_from=None, plan=None) -> dict:
    """Train ``cfg.train.steps`` steps; returns a summary (losses, timings, memory).

    ``overwrite``: replace an earlier run's artifacts in the run directory instead of refusing
    ([Note: the run directory]). ``resume_from`` (a ``runtime.checkpoint.Loaded``) with the
    ``plan`` the run saved continues that run ([Note: checkpoints of a run]). Raises
    ``NonFiniteLoss`` when the loss turns NaN or infinite, ``Stopped`` after SIGTERM or SIGINT.
    """
    from memtrain.models import build_model
    from memtrain.planner import report
    from memtrain.planner.measure import LoadMeter
    from memtrain.runtime.checkpoint import Checkpointer, engine_state, restore_engine_state
    from memtrain.runtime.data import TokenBatches
    from memtrain.runtime.wrapping import wrap
    from memtrain.runtime.planning import optimizer_spec, plan_from_config, run_dir
    from memtrain.runtime.process_memory import ProcessPeak
    from memtrain.runtime.run_check import closing_lines

    out_dir = run_dir(cfg)
    ckpt_root = checkpoint_root(cfg)
    resuming = resume_from is not None
    if not resuming:
        check_run_dir(out_dir, overwrite, ckpt_root)
        optimizer_spec(cfg)  # param_groups checked before planning, on the meta device
        plan = plan_from_config(cfg)
    report.print_summary(plan)
    if not plan.fits:
        raise ConfigError(f"the model does not fit: {plan.shortfall}")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        remove_artifacts(out_dir, created=False, checkpoints=ckpt_root)
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
    start = resume_from.step if resuming else 0
    losses, step_times = [], []
    metrics_path = out_dir / "metrics.jsonl"
    engine = None
    try:
        if not resuming:
            plan.save(out_dir / "plan.json")
            write_config(out_dir / "config.json", cfg)
        # the baseline: the interpreter, torch, memtrain and what planning left (closing_lines)
        process = ProcessPeak("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(cfg.train.seed)
        built = build_model(cfg.model, max_seq_len=cfg.train.seq_len)
        names = tuple(n for n, q in built.module.named_parameters() if q.requires_grad)
        optimizer = optimizer_spec(cfg, names)  # param_groups resolved (a ConfigError names the entry)
        with _store_notes_to(print_fn):
            engine = wrap(
                built.module, optimizer=optimizer, memory=_memory_for(plan, cfg), plan=plan,
                blocks=list(built.blocks), loss_fn=built.loss_fn, dtype=cfg.train.dtype, verbose=False,
                call=lambda m, ids: built.forward(ids, module=m), max_grad_norm=cfg.train.max_grad_norm,
            )
        # [Note: closing the engine] from here on
        data = TokenBatches(cfg.data, batch_size=cfg.train.global_batch_size, seq_len=cfg.train.seq_len,
                            vocab_size=built.vocab_size)
        if resuming:
            state = restore_engine_state(engine, resume_from)
            data.load_state_dict(state["data"])
            truncate_metrics(metrics_path, start)
            print_fn(f"resuming after step {start} from {resume_from.path}")
        checkpoints = Checkpointer(ckpt_root, keep=cfg.checkpoint.keep, compress=cfg.checkpoint.compress,
                                   meta={"config": dataclasses.asdict(cfg)})

        def checkpoint(done: int) -> None:
            checkpoints.save(done, {0: engine_state(engine, step=done, data=data.state_dict())}, copy=False)

        print_fn(f"training {cfg.train.steps - start} steps of {tokens_per_step:,} tokens; run directory {out_dir}")
        run_load = LoadMeter()  # what other processes do during the run, for closing_lines
        interval = cfg.checkpoint.interval_steps
        from memtrain.runtime.progress import StepProgress

        with (metrics_path.open("a") as metrics, StopSignals(print_fn) as stop,
              StepProgress(cfg.train.steps, start, print_fn) as progress):
            for step in range(start, cfg.train.steps):
                engine.set_lr(step_lrs(step, cfg))
                t0 = time.perf_counter()
                loss = engine.train_step(next(data))
                dt = time.perf_counter() - t0
                losses.append(loss)
                step_times.append(dt)
                peaks = engine.step_peak_bytes()
                finite = math.isfinite(loss)
                record = {"step": step + 1, "loss": loss if finite else None, "step_time_s": dt,
                          "tokens_per_s": tokens_per_step / dt, "lr": lr_at(step, cfg), "peak_bytes": peaks}
                if cfg.train.optimizer.param_groups:
                    record["group_lrs"] = list(step_lrs(step, cfg))
                if cfg.train.max_grad_norm:
                    record["grad_norm"] = engine.last_grad_norm  # before clipping, as the trainers log it
                if not finite:
                    record["non_finite_loss"] = str(loss)  # JSON has no NaN or Infinity
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()  # [Note: the run directory]
                if not finite:
                    raise non_finite(loss, step + 1, cfg, metrics_path)
                progress.step(step + 1, f"step {step + 1:>5}/{cfg.train.steps}  loss {loss:.4f}  {dt:6.3f} s  "
                              f"{tokens_per_step / dt:10,.0f} tok/s  step peak: device {format_bytes(peaks['device'])}, "
                              f"host {format_bytes(peaks['host'])}", loss)
                done = step + 1
                if stop.signum is not None or done == cfg.train.steps or (interval and done % interval == 0):
                    checkpoint(done)
                if stop.signum is not None:
                    checkpoints.wait()
                    raise Stopped(stop.signum, step=done, path=ckpt_root / f"step-{done:08d}")
            checkpoints.wait()
        mem = engine.memory_report()
        process_peak = process.peak_bytes()
    except BaseException:
        if engine is not None:
            try:
                engine.close()
            except Exception as e:  # the first failure is the one to report; this one is a note
                print_fn(f"memtrain: closing the engine after a failure also failed: {e!r}")
        if not losses and not resuming:
            remove_artifacts(out_dir, created)
        raise
    engine.close()
    if checkpoints.saved:
        print_fn(f"checkpoint {checkpoints.saved[-1]} ({checkpoints.seconds_blocked:.2f} s of training time spent on "
                 "checkpoints)")
    for line in closing_lines(plan, step_times_s=step_times, memory=mem, run_load=run_load.read(),
                              process=(process_peak, process.baseline_bytes, process.exact)):
        print_fn(line)
    return {"losses": losses, "step_times_s": step_times, "plan": plan, "first_step": start + 1,
            "peak_bytes": {t: m.peak_bytes for t, m in mem.items()},
            "process_bytes": {"baseline": process.baseline_bytes, "peak_above_baseline": process_peak,
                              "predicted": plan.prediction.devices[0].process_bytes if plan.prediction.devices else 0}}


def write_config(path: Path, cfg: Config) -> None:
    """The config the run ran, as JSON ``config_from_dict`` reads back (``memtrain resume``)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    os.replace(tmp, path)
