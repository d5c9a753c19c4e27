"""The config's limits and value checks: ``ConfigError``, the ``MAX_*`` bounds and the helpers
each section's ``__post_init__`` calls (memtrain.config, which re-exports what others use)."""

from __future__ import annotations

import math
import os
from typing import Any, Callable, NewType

from memtrain.errors import UserError
from memtrain.units import show

__all__ = ["ConfigError", "Size", "PIPELINE_SCHEDULES", "check_parallel_batch", "check_parallel"]


class ConfigError(UserError):
    """A user mistake in the configuration; the message names the field and the fix."""


Size = NewType("Size", int)
"""A byte count: a field annotated ``Size`` accepts "24GiB" (``units.parse_bytes``); a plain
``int`` field accepts whole numbers only. ``_build`` tells them apart by identity."""

MAX_GLOBAL_BATCH_SIZE = 1 << 20
"""Sequences per optimizer step at most (train.global_batch_size). Every divisor is a micro-batch
size to try; below this bound a number has at most 240 of them, and the search stays within
seconds."""
MAX_SEQ_LEN = 1 << 20
"""Tokens per sequence at most (train.seq_len)."""
MAX_STEPS = 10**9
"""Optimizer steps at most (train.steps, train.warmup_steps, snapshot.interval_steps)."""
MAX_SEED = 2**32 - 1
MAX_DEVICES_PER_NODE = 1024
MAX_NUM_CPUS = 1 << 16
MAX_STRIPES = 256
"""Data or parity stripes of a snapshot at most (snapshot.k, snapshot.m)."""
MAX_CHECKPOINTS_KEPT = 1000
"""Checkpoints kept at most (checkpoint.keep)."""
MAX_TEXT = 4096
"""Characters of a text field at most (names, paths, kinds)."""
MAX_CONFIG_BYTES = 16 << 20
"""Size of a config file at most; a config is a few KiB of YAML."""
MAX_CHUNK_ELEMS = 1 << 40
MAX_PREFETCH_DEPTH = 1024
MAX_PARALLEL_DEGREE = 1 << 16
"""Pipeline or data-parallel degree at most (parallel.pipeline, parallel.data)."""
MAX_TIMEOUT_S = 7 * 24 * 3600.0
PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "v-half", "v-min")
"""The schedules ``parallel.schedule`` accepts: ``planner.pipeline.SCHEDULES``, repeated here because
this module is below planner/ (a unit test checks the two are equal)."""
_V_SCHEDULES = ("v-half", "v-min")


def _check_number(path: str, value: Any, what: str, ok: Callable[[float], bool]) -> None:
    """Raise unless ``value`` (when not None) is a finite number, not a bool, for which ``ok`` holds."""
    if value is None:
        return
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not math.isfinite(value)) or not ok(value)):
        raise ConfigError(f"{path}: must be {what}, got {show(value)}")


def _positive(path: str, value: Any) -> None:
    _check_number(path, value, "a finite number > 0", lambda v: v > 0)


def _fraction(path: str, value: Any) -> None:
    _check_number(path, value, "a number in [0, 1)", lambda v: 0 <= v < 1)


def _check_int(path: str, value: Any, lo: int, hi: int) -> None:
    """Raise unless ``value`` (when not None) is a whole number in [lo, hi]."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{path}: must be a whole number from {lo} to {hi}, got {show(value)}")


def _check_path(path: str, value: str) -> None:
    """Refuse a file name no filesystem takes (a NUL byte, a name too long, unencodable text)."""
    try:
        raw = os.fsencode(value)
    except (UnicodeError, TypeError):
        raise ConfigError(f"{path}: {show(value)} is not a valid file name") from None
    if b"\0" in raw or len(raw) > 4096 or any(len(part) > 255 for part in raw.split(b"/")):
        raise ConfigError(f"{path}: {show(value)} is not a valid file name (a NUL byte, or a name too long)")


def check_parallel_batch(p: Any, gbs: int, mbs: int) -> None:
    """``ParallelConfig.check_batch``: the global batch ``gbs`` splits into ``p.data`` shares of
    whole micro-batches (of ``mbs`` sequences when set); ``interleaved-1f1b`` runs them in groups
    of ``p.pipeline``. A degree of 0 is the planner's to choose, and its shares the planner's to check."""
    m = p.microbatches
    if p.num_workers == 1 or p.data == 0:
        return
    if gbs % p.data:
        raise ConfigError(f"train.global_batch_size: {gbs} does not split over parallel.data {p.data} "
                          f"copies; make it a multiple of {p.data}")
    share = gbs // p.data
    if m and share % m:
        raise ConfigError(f"parallel.microbatches: {m} does not divide each data-parallel share of "
                          f"{share} sequences (train.global_batch_size {gbs} / parallel.data {p.data}); "
                          "choose a divisor, or 0 to derive it from train.micro_batch_size")
    if mbs and share % mbs:
        raise ConfigError(f"train.micro_batch_size: {mbs} does not divide each data-parallel share of "
                          f"{share} sequences (train.global_batch_size {gbs} / parallel.data {p.data}); "
                          "choose a divisor, or 0 to let the planner choose")
    if m and mbs and m * mbs != share:
        raise ConfigError(f"parallel.microbatches: {m} micro-batches of train.micro_batch_size {mbs} make {m * mbs} "
                          f"sequences, not the {share} of each data-parallel share; set one of them to 0")
    count = m or (share // mbs if mbs else 0)
    if p.schedule == "interleaved-1f1b" and count and p.pipeline and count % p.pipeline:
        raise ConfigError(f"parallel.microbatches: interleaved-1f1b runs micro-batches in groups of "
                          f"parallel.pipeline ({p.pipeline}); {count} is not a multiple of it")


def check_parallel(cfg: Any) -> None:
    """``Config``'s cross-section checks of ``parallel``: the batch splits (``check_parallel_batch``);
    ``parallel.zero`` shards across data-parallel copies, so it needs more than one (0: the
    planner's choice, which runs without sharding where it picks one copy); ZeRO-1 and -2 shard
    offloaded stages too (runtime.stage_offload, runtime.stage_offload_zero)."""
    p = cfg.parallel
    p.check_batch(cfg.train)
    if p.zero and p.data == 1:
        raise ConfigError(f"parallel.zero: {p.zero} shards the optimizer states across the parallel.data copies, "
                          "and there is one; set parallel.data to 2 or more, or parallel.zero: 0")
