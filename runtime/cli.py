"""The ``memtrain`` command: ``plan``, ``profile``, ``run``, ``resume``.

User mistakes (bad config, path, size, a plan that cannot fit) are ``UserError``s: ``main``
prints the one-line message and exits 2; set ``MEMTRAIN_DEBUG=1`` to see the traceback. Any
other exception is a failure of ours and keeps its traceback. Output paths are checked before
the work that fills them, so a mistyped ``--json`` fails at once rather than after planning.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from memtrain.errors import UserError

__all__ = ["main"]

EXIT_USER_ERROR = 2


class UsageError(UserError):
    """A mistake in how memtrain was called."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see docs/config.md and examples/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a config field, e.g. --set train.micro_batch_size=4 --set memory.device=8GiB",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memtrain", description="Memory- and offload-aware training of PyTorch models on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "plan", help="dry run: will it fit, how, how fast (no GPU needed)",
        description="Plan without training: one device, or a pipeline over the cluster's devices when "
                    "parallel.pipeline x parallel.data > 1 or when the config leaves a degree to the planner "
                    "(parallel.pipeline or parallel.data 0, or 'parallel: auto') over several devices. A pipeline "
                    "plan chooses what the config leaves open (degrees, device order, partition, schedule, "
                    "micro-batches) and reports per rank. Exit status: 0 it fits, 2 a user mistake or a plan "
                    "that does not fit.",
    )
    _add_config_args(p)
    p.add_argument("--json", metavar="PATH", help="write the plan and its predictions as JSON")
    p.add_argument("--html", metavar="PATH", help="write a self-contained HTML report (a pipeline plan: a Gantt "
                                                  "chart per rank and its memory over the step)")
    p.add_argument("--trace", metavar="PATH", help="write a Chrome/Perfetto trace of the simulated step (a pipeline "
                                                   "plan: a process per rank with its memory counters)")
    p.add_argument("--profile", metavar="PATH", help="use this measured profile instead of catalog figures "
                                                     "(one-device plans)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")

    p = sub.add_parser("profile", help="measure this machine and the configured model")
    _add_config_args(p)
    p.add_argument("--out", metavar="PATH", help="profile file (default: <run_dir>/profile.parquet)")

    p = sub.add_parser(
        "run", help="train with the plan",
        description="Plan, then train: in this process for one device, on Ray workers (one per device) when "
                    "parallel.pipeline x parallel.data > 1; writes plan.json, config.json, metrics.jsonl (one line "
                    "per step) and checkpoints (every checkpoint.interval_steps, at the end, and on SIGTERM/SIGINT) "
                    "to the run directory. Exit status: 0 done, 2 a user mistake, 3 the loss became NaN or infinite, "
                    "128 + the signal when stopped by SIGTERM or SIGINT after checkpointing.",
    )
    _add_config_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run's plan.json and metrics.jsonl in the run directory (without it, "
                        "such a directory is refused); profile.parquet is kept")
    p.add_argument("--address", metavar="ADDR", default=None,
                   help="Ray cluster to join when parallel.pipeline x parallel.data > 1, host:port of its head "
                        "(default: $RAY_ADDRESS, which 'ray job submit' sets; else an embedded local Ray). Token "
                        "authentication stays on: the cluster's token must be in ~/.ray/auth_token, "
                        "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN")

    p = sub.add_parser(
        "resume", help="continue a run from its newest valid checkpoint",
        description="Continue the run in RUN_DIR from its newest checkpoint whose checksums match (corrupt or "
                    "partial ones are skipped, each named), with the config and plan it ran; the per-step losses "
                    "continue exactly as an uninterrupted run's. Exit status as for 'run'.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (holds config.json, plan.json, checkpoints/)")
    p.add_argument("--config", metavar="CONFIG", help="a config to resume with instead of the run's own; it may "
                                                      "change only train.steps and the checkpoint section")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a field of the run's config, e.g. --set train.steps=100")
    p.add_argument("--address", metavar="ADDR", default=None,
                   help="a pipeline run: the Ray cluster to continue on (else RAY_ADDRESS, else the embedded local "
                        "Ray); its nodes need the devices of the run's plan")
    return parser


def _shown(path: str) -> str:
    return repr(path) if len(path) <= 200 else repr(path[:197] + "...")


def _unusable(where: str, e: OSError | ValueError) -> UsageError:
    """A path the OS refuses to look at (a name too long, a NUL byte)."""
    return UsageError(f"{where}: not a usable file name ({getattr(e, 'strerror', None) or e})")


def _check_output(option: str, path: str | None) -> None:
    """Refuse an output path that cannot be written (a directory, under a file, a read-only or
    unwritable directory) before any work, naming ``option``. The write itself is atomic
    (``planner.atomic``) and reports what still fails then."""
    if not path:
        return
    where = f"{option} {_shown(path)}"
    try:
        p = Path(path)
        is_dir = p.is_dir()
        parent = p.absolute().parent  # the nearest folder that exists: the write makes the rest
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        parent_is_dir, writable = parent.is_dir(), os.access(parent, os.W_OK)
    except (OSError, ValueError) as e:
        raise _unusable(where, e) from None
    if is_dir:
        raise UsageError(f"{where}: is a directory; give the name of a file in it")
    if not parent_is_dir:
        raise UsageError(f"{where}: {_shown(str(parent))} is a file, not a directory; choose another path")
    if not writable:
        raise UsageError(f"{where}: {_shown(str(parent))} is not writable (read-only or no permission); "
                         "choose another path")


def _check_input(option: str, path: str | None) -> None:
    if not path:
        return
    where = f"{option} {_shown(path)}"
    try:
        is_dir = Path(path).is_dir()
    except (OSError, ValueError) as e:
        raise _unusable(where, e) from None
    if is_dir:
        raise UsageError(f"{where}: is a directory; give a file")


def _write(option: str, write, plan, path: str) -> None:
    """``write(plan, path)``, its error (``planner.atomic``'s, naming the path) prefixed by ``option``."""
    try:
        write(plan, path)
    except UserError as e:
        raise UsageError(f"{option}: {e}") from None


def _cmd_plan(args: argparse.Namespace) -> int:
    from memtrain.runtime.config_file import load_config

    for option in ("json", "html", "trace"):
        _check_output(f"--{option}", getattr(args, option))
    _check_input("--profile", args.profile)
    cfg = load_config(args.config, args.overrides)
    from memtrain.planner import report
    from memtrain.runtime.planning import plan_config

    t0 = time.perf_counter()
    plan = plan_config(cfg, profile_path=args.profile)
    elapsed_s = time.perf_counter() - t0
    if not args.quiet:
        report.print_summary(plan)
        print(f"planned in {elapsed_s:.2f} s")
    for option, path, write in (("--json", args.json, report.write_json), ("--html", args.html, report.write_html),
                                ("--trace", args.trace, report.write_trace)):
        if path:
            _write(option, write, plan, path)
            if not args.quiet:
                print(f"wrote {path}")
    if not plan.fits:
        print(f"memtrain: error: the model does not fit: {plan.shortfall}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from memtrain.runtime.config_file import load_config

    _check_output("--out", args.out)
    cfg = load_config(args.config, args.overrides)
    from memtrain.runtime.profiling import run_profile, save_profile
    from memtrain.runtime.planning import run_dir

    out = args.out or str(run_dir(cfg) / "profile.parquet")
    option = "--out" if args.out else "run_dir"
    if not args.out:
        _check_output(option, out)
    t0 = time.perf_counter()
    prof = run_profile(cfg, progress=print)
    try:
        save_profile(prof, out)
    except UserError as e:
        raise UsageError(f"{option}: {e}") from None
    bw = prof.bandwidths
    print(f"measured in {time.perf_counter() - t0:.1f} s on {prof.device}:")
    for key in ("h2d", "d2h", "device_memory", "nvme_read", "nvme_write"):
        if key in bw:
            how = " (through memtrain's NVMe store, many chunk files in flight)" if key.startswith("nvme") else ""
            print(f"  {key:>14}: {bw[key]:8.2f} GB/s{how}")
    print(f"  {'CPU AdamW':>14}: {bw['cpu_adam_params_per_s'] / 1e6:8.0f} M params/s")
    if prof.overheads:
        print("  memtrain's own cost per call, measured against plain PyTorch:")
        for key, seconds in sorted(prof.overheads.items()):
            print(f"  {key:>14}: {seconds * 1e6:8.1f} µs")
    print(f"  {len(prof.blocks)} block timings; wrote {out} (used by 'memtrain plan' and 'run' for this model on this machine)")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from memtrain.runtime.config_file import load_config

    cfg = load_config(args.config, args.overrides)
    from memtrain.runtime.planning import run_dir
    from memtrain.runtime.train import train

    _check_output("run_dir", str(run_dir(cfg) / "metrics.jsonl"))  # where the run writes its files
    address = args.address or os.environ.get("RAY_ADDRESS") or None

    def run() -> None:
        if cfg.parallel.num_workers > 1 or cfg.parallel.planner_chooses:
            from memtrain.runtime.distributed import run_distributed

            run_distributed(cfg, address, overwrite=args.overwrite)
        else:  # one device: this process, also as the driver of a Ray job
            train(cfg, overwrite=args.overwrite)

    return _training(run, str(run_dir(cfg)))


def _training(run, run_dir: str) -> int:
    """Run a training call; a diverged loss and a stop by signal end it with their own statuses."""
    from memtrain.runtime.train import EXIT_NON_FINITE_LOSS, NonFiniteLoss, Stopped

    try:
        run()
    except NonFiniteLoss as e:  # training diverged: a clean stop with its own status
        print(f"memtrain: error: {e}", file=sys.stderr)
        return EXIT_NON_FINITE_LOSS
    except Stopped as e:  # preempted: the checkpoint is written; 128 + the signal, as the shell reports it
        print(f"memtrain: {e}; continue with: memtrain resume {run_dir}", file=sys.stderr)
        return 128 + e.signum
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from memtrain.runtime.resume import resume

    _check_input("--config", args.config)
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    return _training(lambda: resume(args.run_dir, config_path=args.config, overrides=args.overrides, address=address),
                     args.run_dir)


_COMMANDS = {
    "plan": _cmd_plan,
    "profile": _cmd_profile,
    "run": _cmd_run,
    "resume": _cmd_resume,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except UserError as e:
        # A user mistake: its message names the field or file and the fix (memtrain/errors.py).
        if os.environ.get("MEMTRAIN_DEBUG"):
            raise
        print(f"memtrain: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
