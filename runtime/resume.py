"""``memtrain resume RUN_DIR``: continue a run from its newest valid checkpoint.

The run directory's ``config.json`` is the config the run ran (runtime.train [Note: checkpoints
of a run]); ``--config`` or ``--set`` may change only what leaves the continuation exact
(``RESUMABLE``): the step count (not under a cosine schedule, whose decay it stretches), the
checkpoint section, the run's name and directory. Any other change is refused, naming the field.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from memtrain.config import Config, ConfigError, config_from_dict
from memtrain.errors import UserError

__all__ = ["RESUMABLE", "changed_fields", "resume_config", "resume"]

RESUMABLE = ("name", "run_dir", "train.steps", "checkpoint.interval_steps", "checkpoint.keep", "checkpoint.compress",
             "checkpoint.dir")
"""Config fields a resumed run may change without changing what it computes."""


def _flat(value: Any, path: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{path}.{k}" if path else k))
        return out
    return {path: value}


def changed_fields(saved: Config, new: Config) -> list[str]:
    """Fields whose values differ between two configs, as dotted paths, in the config's order."""
    a, b = _flat(dataclasses.asdict(saved)), _flat(dataclasses.asdict(new))
    return [k for k in dict.fromkeys([*a, *b]) if a.get(k, None) != b.get(k, None)]


def resume_config(run_dir: Path, config_path: str | None, overrides: list[str]) -> Config:
    """The config to resume ``run_dir`` with: its saved one, or ``config_path``, with the
    ``overrides``; refused when it changes what the run computes."""
    from memtrain.runtime.config_file import apply_overrides, load_config

    saved_path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise UserError(f"RUN_DIR: {run_dir} is not a directory; give the run directory of a 'memtrain run'")
    try:
        saved = config_from_dict(json.loads(saved_path.read_text()))
    except FileNotFoundError:
        raise UserError(f"RUN_DIR: {run_dir} has no config.json, so it is not a run directory memtrain can resume "
                        "(runs write one from this version on)") from None
    except (ValueError, ConfigError) as e:
        raise UserError(f"RUN_DIR: {saved_path} cannot be read ({e}); start the run again with 'memtrain run'") from None
    if config_path:
        new = load_config(config_path, overrides)
    else:
        new = config_from_dict(apply_overrides(dataclasses.asdict(saved), list(overrides)))
    new = dataclasses.replace(new, run_dir=str(run_dir))
    for name in changed_fields(saved, new):
        if name == "train.steps" and saved.train.lr_schedule == "cosine":
            raise ConfigError(
                f"train.steps: changed from {saved.train.steps} to {new.train.steps}, which stretches the cosine learning-rate "
                "schedule (train.lr_schedule) and so changes every later step; resume with the same train.steps")
        if name not in RESUMABLE:
            raise ConfigError(f"{name}: differs from the run being resumed ({run_dir / 'config.json'}), so it would not "
                              f"continue exactly; resume with the run's value, or start a new run with 'memtrain run'")
    return new


def resume(run_dir: str | Path, *, config_path: str | None = None, overrides: list[str] = (), print_fn=print,
           address: str | None = None) -> dict:
    """Continue the run in ``run_dir`` from its newest valid checkpoint (corrupt or partial ones
    are skipped, each named); returns the run's summary. A pipeline run continues on the Ray
    cluster at ``address`` (else ``RAY_ADDRESS``, else the embedded one)."""
    from memtrain.planner.plan import Plan
    from memtrain.runtime.checkpoint import latest
    from memtrain.runtime.train import checkpoint_root, train

    run_dir = Path(run_dir)
    cfg = resume_config(run_dir, config_path, list(overrides))
    root = checkpoint_root(cfg)
    loaded = latest(root, warn=print_fn)
    if loaded is None:
        raise UserError(f"RUN_DIR: no valid checkpoint under {root}; start the run again with "
                        "'memtrain run CONFIG --overwrite'")
    if loaded.step >= cfg.train.steps:
        print_fn(f"the run already finished its {cfg.train.steps} steps (checkpoint {loaded.path}); raise train.steps "
                 "(--set train.steps=N) to train further")
        return {"losses": [], "step_times_s": [], "first_step": loaded.step + 1}
    try:
        plan = Plan.load(run_dir / "plan.json")
    except FileNotFoundError:
        raise UserError(f"RUN_DIR: {run_dir} has no plan.json; the run cannot continue with the plan it ran") from None
    if cfg.parallel.num_workers > 1:
        from memtrain.runtime.distributed import run_distributed

        return run_distributed(cfg, address, print_fn=print_fn, resume_from=loaded, plan=plan)
    return train(cfg, print_fn=print_fn, resume_from=loaded, plan=plan)
