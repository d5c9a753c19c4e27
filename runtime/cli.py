"""The ``memtrain`` command: ``plan``, ``profile``, ``run``, ``resume``.

User mistakes (bad config, path, size, a plan that cannot fit) print one message and exit 2;
set ``MEMTRAIN_DEBUG=1`` to see the traceback. Failures of ours keep their traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

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

    p = sub.add_parser("plan", help="dry run: will it fit, how, how fast (no GPU needed)")
    _add_config_args(p)
    p.add_argument("--json", metavar="PATH", help="write the plan and its predictions as JSON")
    p.add_argument("--html", metavar="PATH", help="write a self-contained HTML report")
    p.add_argument("--trace", metavar="PATH", help="write a Chrome/Perfetto trace of the simulated step")
    p.add_argument("--profile", metavar="PATH", help="use this measured profile instead of catalog figures")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")

    p = sub.add_parser("profile", help="measure this machine and the configured model")
    _add_config_args(p)
    p.add_argument("--out", metavar="PATH", help="profile file (default: <run_dir>/profile.parquet)")

    p = sub.add_parser(
        "run", help="train with the plan",
        description="Plan, then train in this process; writes plan.json and metrics.jsonl (one line per step) to "
                    "the run directory. Exit status: 0 done, 2 a user mistake, 3 the loss became NaN or infinite.",
    )
    _add_config_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run's plan.json and metrics.jsonl in the run directory (without it, "
                        "such a directory is refused); profile.parquet is kept")

    p = sub.add_parser("resume", help="resume a run from its latest snapshot or checkpoint")
    _add_config_args(p)
    return parser


def _cmd_plan(args: argparse.Namespace) -> int:
    from memtrain.runtime.config import load_config

    cfg = load_config(args.config, args.overrides)
    from memtrain.planner import report
    from memtrain.runtime.planning import plan_from_config

    t0 = time.perf_counter()
    plan = plan_from_config(cfg, profile_path=args.profile)
    elapsed_s = time.perf_counter() - t0
    if not args.quiet:
        report.print_summary(plan)
        print(f"planned in {elapsed_s:.2f} s")
    for path, write in ((args.json, report.write_json), (args.html, report.write_html), (args.trace, report.write_trace)):
        if path:
            write(plan, path)
            if not args.quiet:
                print(f"wrote {path}")
    if not plan.fits:
        print(f"memtrain: error: the model does not fit: {plan.shortfall}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from memtrain.runtime.config import load_config

    cfg = load_config(args.config, args.overrides)
    from memtrain.planner.profile import run_profile, save_profile
    from memtrain.runtime.planning import run_dir

    out = args.out or str(run_dir(cfg) / "profile.parquet")
    t0 = time.perf_counter()
    prof = run_profile(cfg, progress=print)
    save_profile(prof, out)
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
    from memtrain.runtime.config import load_config

    cfg = load_config(args.config, args.overrides)
    from memtrain.runtime.train import EXIT_NON_FINITE_LOSS, NonFiniteLoss, train

    try:
        train(cfg, overwrite=args.overwrite)
    except NonFiniteLoss as e:  # training diverged: a clean stop with its own status
        print(f"memtrain: error: {e}", file=sys.stderr)
        return EXIT_NON_FINITE_LOSS
    return 0


def _not_yet(name: str):
    def run(args: argparse.Namespace) -> int:
        raise UsageError(f"'memtrain {name}' is not yet available in this version; 'memtrain plan' is")

    return run


_COMMANDS = {
    "plan": _cmd_plan,
    "profile": _cmd_profile,
    "run": _cmd_run,
    "resume": _not_yet("resume"),
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        # User mistakes are ValueErrors with a message naming the field (docs/DESIGN.md rule 6).
        if os.environ.get("MEMTRAIN_DEBUG"):
            raise
        print(f"memtrain: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
