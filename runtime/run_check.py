"""What ``memtrain run`` says at its end: the measured step time and per-tier peaks against the
plan's predictions, and, when the step time is more than ``STEP_TIME_TOLERANCE`` off, the likely
cause and the command that fixes it.

The cause is chosen from what is known, first match wins: the plan used catalog figures (no
profile); its profile can no longer be read; it was measured on another machine; other processes
loaded the machine during this run more than while profiling (the run was slowed, not the plan
wrong); the profile was flagged as measured under load or noisy; else the profile is stale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from memtrain.planner.measure import Load
from memtrain.planner.plan import Plan
from memtrain.planner.profile_format import Profile, ProfileError, load_profile, other_machine, profile_flag
from memtrain.units import format_bytes

__all__ = ["STEP_TIME_TOLERANCE", "closing_lines", "likely_cause", "process_line"]

STEP_TIME_TOLERANCE = 0.25
"""How far the measured step time may be from the predicted, as a fraction of the prediction,
before ``memtrain run`` warns: the planner aims at a median error of 10% (``bench/plan_accuracy.py``),
so a run further off than this points at the figures the plan was made with."""

_PROFILE = "memtrain profile CONFIG"


def closing_lines(
    plan: Plan, *, step_times_s: Sequence[float], memory: dict, run_load: Load | None = None,
    fingerprint: dict[str, str] | None = None, read_profile: Callable[[str], Profile] = load_profile,
    process: tuple[int, int, bool] | None = None,
) -> list[str]:
    """The lines ``memtrain run`` prints after training: measured (median of the steps after the
    first) against predicted step time, a warning with the likely cause and its fix when they
    differ by more than ``STEP_TIME_TOLERANCE``, and each tier's measured against predicted peak.

    ``memory`` is the engine's ``memory_report()``; ``run_load`` what other processes did during
    the run (``planner.measure.LoadMeter``); ``fingerprint`` this machine's (default: measured);
    ``process`` (peak above the baseline, the baseline, whether the peak was reset at the
    baseline: ``runtime.process_memory.ProcessPeak``) adds the process's line, set against the
    plan's ``process_bytes`` (planner.footprint [Note: process memory]).
    """
    from memtrain.planner.search import tracked_peak_bytes

    steady = list(step_times_s[1:] or step_times_s)
    measured_s = sorted(steady)[len(steady) // 2]
    predicted = plan.prediction
    ratio = measured_s / predicted.step_time_s
    lines = [f"step time: measured {measured_s:.3f} s (median), predicted {predicted.step_time_s:.3f} s ({ratio:.2f}×)"]
    if abs(ratio - 1.0) > STEP_TIME_TOLERANCE:
        profile, error = None, ""
        if plan.source.startswith("profile:"):
            try:
                profile = read_profile(plan.source[len("profile:"):])
            except ProfileError as e:
                error = str(e)
        cause, fix = likely_cause(plan, ratio, profile=profile, profile_error=error, run_load=run_load,
                                  fingerprint=fingerprint)
        lines.append(f"warning: the step took {ratio:.2f}× the predicted time (more than {STEP_TIME_TOLERANCE:.0%} off); "
                     f"likely cause: {cause}; fix: {fix}")
    elif not plan.source.startswith("profile:"):
        lines.append(f"(predictions from {plan.source} figures; '{_PROFILE}' measures this machine and model, "
                     "and later plans use it)")
    tracked = tracked_peak_bytes(predicted.devices[0]) if predicted.devices else {}
    for tier, m in memory.items():
        pred = tracked.get(tier, 0)
        error = f" ({(m.peak_bytes - pred) / pred:+.1%})" if pred else ""
        lines.append(f"{tier:>7} peak: measured {format_bytes(m.peak_bytes)}, predicted {format_bytes(pred)}{error}, "
                     f"budget {format_bytes(m.budget_bytes) if m.budget_bytes else 'none'} (ledger-tracked bytes)")
    if process is not None and predicted.devices and predicted.devices[0].process_bytes:
        lines.append(process_line(predicted.devices[0].process_bytes, *process))
    return lines


def process_line(predicted_bytes: int, measured_bytes: int, baseline_bytes: int, exact: bool = True) -> str:
    """The process's peak (RSS on a CPU, reserved device memory on a GPU) against the baseline
    measured before the model was built plus the plan's ``process_bytes``."""
    total_m, total_p = baseline_bytes + measured_bytes, baseline_bytes + predicted_bytes
    line = (f"process peak: measured {format_bytes(total_m)}, predicted {format_bytes(total_p)} "
            f"({(total_p - total_m) / total_m:+.1%}): the {format_bytes(baseline_bytes)} baseline measured "
            f"before the model was built + {format_bytes(measured_bytes)} measured, {format_bytes(predicted_bytes)} planned")
    if not exact:
        line += " (this system cannot reset the peak: the measured figure covers the whole process)"
    return line


def likely_cause(plan: Plan, ratio: float, *, profile: Profile | None, profile_error: str = "",
                 run_load: Load | None = None, fingerprint: dict[str, str] | None = None) -> tuple[str, str]:
    """(the likely cause, the command that fixes it) of a measured step ``ratio`` × the predicted;
    ``profile`` is the plan's profile as read now (None: no profile, or ``profile_error``)."""
    if not plan.source.startswith("profile:"):
        return (f"the plan used {plan.source} figures, not measurements of this machine and model",
                f"run '{_PROFILE}', then 'memtrain run CONFIG' again")
    path = plan.source[len("profile:"):]
    if profile is None:
        return f"the plan's profile cannot be read now ({profile_error})", f"run '{_PROFILE}'"
    other = other_machine(profile, fingerprint)
    if other:
        return f"the profile {path} was {other}", f"run '{_PROFILE}' on this machine"
    blocks = profile.quality.get("blocks")
    profiled_cpus = blocks.other_cpus if blocks is not None else 0.0
    if ratio > 1.0 and run_load is not None and run_load.busy() and run_load.other_cpus > profiled_cpus:
        return (f"other processes used {run_load.other_cpus:.1f} of {run_load.num_cpus} cores during this run "
                f"({profiled_cpus:.1f} while profiling): they slowed the steps",
                "run 'memtrain run CONFIG' again when the machine is quiet")
    flag = profile_flag(profile)
    if flag:
        return (f"the profile {path} is unreliable: {flag}",
                f"re-run '{_PROFILE}' on a quiet machine")
    return (f"the profile {path} (measured {profile.created}) may be stale: the machine's state, the software or "
            "the model changed since", f"re-run '{_PROFILE}'")
