"""Timing for the profiler, and how far to trust it.

A probe repeats its measurement and reports the repeats' ``spread``; ``LoadMeter`` reads how many
cores other processes kept busy meanwhile. ``measure_reliably`` runs a probe, and when the spread
or the load says its figures are unreliable, waits briefly and, if the machine has become quiet,
measures again (a bounded number of rounds); it keeps the most trustworthy round and says what
is still wrong with it, so the profile carries a warning instead of silently poisoning every
later plan.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

__all__ = [
    "MAX_SPREAD", "MAX_DISK_SPREAD", "MAX_OTHER_CPU_SHARE", "MAX_ROUNDS", "RETRY_WAIT_S",
    "sync", "timed_runs", "median_time", "spread", "Load", "LoadMeter", "ProbeQuality", "measure_reliably",
]

T = TypeVar("T")

MAX_SPREAD = 0.15
"""Relative interquartile range of a timing's repeats above which it is unreliable: repeats on
a quiet machine agree within a few percent, and a spread this wide means something else was
running in the middle of them."""
MAX_DISK_SPREAD = 0.5
"""The same for the NVMe probes: a shared virtual disk varies by tens of percent from one second
to the next on its own (``runtime.disk_probe``), so only a wider spread is a sign of trouble."""
MAX_OTHER_CPU_SHARE = 0.25
"""Share of the machine's cores other processes may keep busy during a CPU-bound probe: above it
they take cores the timed work needs (on 2 cores, half a core), and every timing is slower than
the same work alone."""
MAX_ROUNDS = 3
"""Rounds of an unreliable probe at most (the first and 2 re-measurements): a burst of load
passes in seconds; a long job does not, and waiting for it would stall the profile."""
RETRY_WAIT_S = 2.0
"""Seconds to wait before re-measuring, for a burst of load to pass; the load is read meanwhile,
and a probe is not measured again while other processes are still busy."""


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a CUDA device runs asynchronously; the CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_runs(fn: Callable[[], object], device: torch.device, reps: int, *, min_total_s: float = 0.0,
               max_reps: int = 200) -> list[float]:
    """Seconds of each run of ``fn`` after a warm-up: at least ``reps`` runs, and more (up to
    ``max_reps``) until the runs add up to ``min_total_s``."""
    fn()  # warm-up
    times: list[float] = []
    while len(times) < reps or (sum(times) < min_total_s and len(times) < max_reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def median_time(fn: Callable[[], object], device: torch.device, reps: int, *, min_total_s: float = 0.0,
                max_reps: int = 200) -> float:
    """Median of ``timed_runs``."""
    return statistics.median(timed_runs(fn, device, reps, min_total_s=min_total_s, max_reps=max_reps))


def spread(values: Sequence[float]) -> float:
    """Relative interquartile range, (q3 − q1) / median, of repeated measurements: 0 when they
    agree; unlike (max − min) / median, one late outlier among many repeats does not count."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    median = statistics.median(values)
    return (q3 - q1) / median if median > 0 else 0.0


# --- load from other processes -----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Load:
    other_cpus: float
    """Cores other processes (and the hypervisor, as steal time) kept busy, on average over the window."""
    num_cpus: int
    load_avg: float
    """The 1-minute load average at the end of the window (this process's threads included)."""

    def busy(self) -> bool:
        return self.other_cpus > MAX_OTHER_CPU_SHARE * self.num_cpus

    def describe(self) -> str:
        return f"other processes used {self.other_cpus:.1f} of {self.num_cpus} cores, load average {self.load_avg:.1f}"


class LoadMeter:
    """How busy other processes kept this machine's cores since the meter was made: the machine's
    busy CPU time (``psutil.cpu_times``) less this process's own, over the wall time. ``ps`` and
    ``clock`` stand in for psutil and ``time.monotonic`` in tests."""

    def __init__(self, *, ps=None, clock: Callable[[], float] = time.monotonic) -> None:
        if ps is None:
            import psutil as ps
        self._psutil, self._clock = ps, clock
        self._proc = ps.Process()
        self._t0, self._busy0, self._own0 = clock(), self._busy_s(), self._own_s()

    def _busy_s(self) -> float:
        t = self._psutil.cpu_times()
        # as psutil.cpu_percent counts it: guest time is already in user/nice; idle and iowait are not busy
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        return total - t.idle - getattr(t, "iowait", 0.0)

    def _own_s(self) -> float:
        t = self._proc.cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    def read(self) -> Load:
        wall_s = max(self._clock() - self._t0, 1e-3)
        others_s = (self._busy_s() - self._busy0) - (self._own_s() - self._own0)
        return Load(other_cpus=max(others_s, 0.0) / wall_s, num_cpus=self._psutil.cpu_count() or 1,
                    load_avg=self._psutil.getloadavg()[0])


class _Meter(Protocol):
    def read(self) -> Load: ...


# --- re-measuring --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ProbeQuality:
    """How far one probe's kept figures can be trusted (``Profile.quality``)."""

    spread: float
    """Relative interquartile range of the kept round's repeats (``spread``)."""
    other_cpus: float
    """Cores other processes kept busy while the kept round ran (``Load.other_cpus``)."""
    num_cpus: int
    load_avg: float
    rounds: int
    """Rounds run; more than 1 when the first was unreliable and the probe measured again."""
    under_load: bool = False
    """The kept round ran while other processes kept too many cores busy (``MAX_OTHER_CPU_SHARE``)."""
    noisy: bool = False
    """The kept round's repeats spread too far."""
    problem: str = ""
    """Why the kept round is unreliable, for people; empty when it is not."""


def measure_reliably(
    name: str, probe: Callable[[], tuple[T, float]], *, max_spread: float = MAX_SPREAD, check_load: bool = True,
    rounds: int = MAX_ROUNDS, wait_s: float = RETRY_WAIT_S, meter: Callable[[], _Meter] = LoadMeter,
    sleep: Callable[[float], None] = time.sleep, progress: Callable[[str], None] = lambda msg: None,
) -> tuple[T, ProbeQuality]:
    """Run ``probe`` (returning its figures and their spread) until its spread is within
    ``max_spread`` and, with ``check_load``, other processes kept under ``MAX_OTHER_CPU_SHARE``
    of the cores busy; at most ``rounds`` times. Before measuring again it waits ``wait_s`` for a
    burst of load to pass, reading the load meanwhile: if other processes are still busy (with
    ``check_load``), another round would be measured under the same load, so it stops there.
    Keeps the round nearest to reliable (the least of spread and load, each over its limit) and
    says what is still wrong with it."""
    kept: tuple[float, T, ProbeQuality] | None = None
    ran = 0
    while ran < max(rounds, 1):
        if ran:
            waiting = meter()
            sleep(wait_s)
            meanwhile = waiting.read()
            if check_load and meanwhile.busy():
                progress(f"  {name}: {kept[2].problem}; not measuring again: other processes are still busy "
                         f"({meanwhile.describe()})")
                break
            progress(f"  {name}: {kept[2].problem}; measuring again (round {ran + 1} of {rounds})")
        m = meter()
        figures, spread_ = probe()
        load = m.read()
        ran += 1
        under_load, noisy = check_load and load.busy(), spread_ > max_spread
        parts = [f"measured under load ({load.describe()})"] if under_load else []
        parts += [f"repeats spread {spread_:.0%} (limit {max_spread:.0%})"] if noisy else []
        quality = ProbeQuality(spread=spread_, other_cpus=load.other_cpus, num_cpus=load.num_cpus,
                               load_avg=load.load_avg, rounds=ran, under_load=under_load, noisy=noisy,
                               problem="; ".join(parts))
        badness = max(spread_ / max_spread, load.other_cpus / (MAX_OTHER_CPU_SHARE * load.num_cpus) if check_load else 0.0)
        if kept is None or badness < kept[0]:
            kept = (badness, figures, quality)
        if not quality.problem:
            break
    _, figures, quality = kept
    quality = dataclasses.replace(quality, rounds=ran)
    progress(f"  {name}: repeats spread {quality.spread:.1%}; other processes used {quality.other_cpus:.1f} of "
             f"{quality.num_cpus} cores, load average {quality.load_avg:.1f}{f'; {ran} rounds' if ran > 1 else ''}"
             f"{f'; unreliable, kept with a warning: {quality.problem}' if quality.problem else ''}")
    return figures, quality
