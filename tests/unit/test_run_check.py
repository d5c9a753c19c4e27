"""``memtrain run``'s closing comparison (``runtime.run_check``): measured against predicted step
time and peaks, and above 25% off a warning naming the likely cause and the command that fixes
it. Runs no training: the plan, step times and load are given."""

from __future__ import annotations

import dataclasses
from collections import namedtuple

import pytest

from memtrain.planner.analyze import analyze
from memtrain.planner.measure import Load, ProbeQuality
from memtrain.planner.profile_format import BlockTiming, Profile, machine_fingerprint, machine_id, model_key, save_profile
from memtrain.config import config_from_dict
from memtrain.runtime.planning import plan_from_config
from memtrain.runtime.run_check import STEP_TIME_TOLERANCE, closing_lines

# the same profiles as tests/unit/test_profile_trust.py's
QUIET = Load(other_cpus=0.05, num_cpus=2, load_avg=0.1)
BUSY = Load(other_cpus=1.6, num_cpus=2, load_avg=1.9)


def _cfg(tmp_path, seq_len=16):
    return config_from_dict({"name": "trust", "model": {"preset": "tiny"}, "cluster": "auto", "run_dir": str(tmp_path),
                             "train": {"seq_len": seq_len, "global_batch_size": 2, "micro_batch_size": 1}})


def _profile(cfg, **kw) -> Profile:
    """A profile of ``cfg``'s model on this machine, with plausible figures and no flags."""
    stats = analyze(cfg.model, seq_len=cfg.train.seq_len)
    blocks = tuple(BlockTiming(block=b.name, micro_batch_size=m, fwd_s=1e-3 * m, bwd_s=2e-3 * m)
                   for b in stats.blocks for m in (1, 2))
    fp = machine_fingerprint()
    quality = {"blocks": ProbeQuality(spread=0.02, other_cpus=0.05, num_cpus=2, load_avg=0.1, rounds=1)}
    fields = dict(machine_id=machine_id(fp), fingerprint=fp, model_key=model_key(cfg.model, cfg.train.seq_len, "fp32"),
                  model_name="gpt-tiny", seq_len=cfg.train.seq_len, dtype="fp32", created="2025-01-01T00:00:00+0000",
                  device="cpu", bandwidths={"h2d": 5.0, "d2h": 5.0, "device_memory": 10.0, "cpu_adam_params_per_s": 3e8},
                  overheads={}, blocks=blocks, quality=quality)
    fields.update(kw)
    return Profile(**fields)


def _other_machine(prof: Profile) -> Profile:
    fp = dict(prof.fingerprint, hostname="elsewhere", cpu="Another CPU")
    return dataclasses.replace(prof, fingerprint=fp, machine_id=machine_id(fp))


def _loaded(prof: Profile) -> Profile:
    q = ProbeQuality(spread=0.35, other_cpus=0.9, num_cpus=2, load_avg=1.9, rounds=3, under_load=True, noisy=True,
                     problem="measured under load (...); repeats spread 35% (limit 15%)")
    return dataclasses.replace(prof, quality={"blocks": q}, warnings=(f"block times: {q.problem}",))



Mem = namedtuple("Mem", "peak_bytes budget_bytes")


@pytest.fixture(scope="module")
def base_plan(tmp_path_factory):
    return plan_from_config(_cfg(tmp_path_factory.mktemp("plan")))


def _close(plan, ratio, **kw):
    predicted = plan.prediction.step_time_s
    steps = [10 * predicted] + [ratio * predicted] * 3  # the first (warm-up) step is left out
    return closing_lines(plan, step_times_s=steps, memory={"device": Mem(2**20, 2**30)}, **kw)


def _warning(lines):
    warnings = [line for line in lines if line.startswith("warning:")]
    return warnings[0] if warnings else None


def test_close_to_the_prediction_there_is_no_warning(base_plan, tmp_path):
    assert STEP_TIME_TOLERANCE == 0.25
    lines = _close(base_plan, 1.2)
    assert lines[0].startswith("step time: measured") and lines[0].endswith("(1.20×)")
    assert _warning(lines) is None
    assert any(line.startswith("(predictions from") for line in lines)  # catalog figures, said as before
    assert lines[-1].strip().startswith("device peak: measured 1.0 MiB")


def test_far_off_with_catalog_figures_the_fix_is_to_profile(base_plan):
    w = _warning(_close(base_plan, 2.0))
    assert w.startswith("warning: the step took 2.00× the predicted time (more than 25% off)")
    assert f"likely cause: the plan used {base_plan.source} figures" in w and "fix: run 'memtrain profile CONFIG'" in w


def test_far_off_with_a_profile_from_another_machine(base_plan, tmp_path):
    other = _other_machine(_profile(_cfg(tmp_path)))
    save_profile(other, tmp_path / "p.parquet")
    plan = dataclasses.replace(base_plan, source=f"profile:{tmp_path / 'p.parquet'}")
    w = _warning(_close(plan, 0.5, run_load=QUIET))
    assert w.startswith("warning: the step took 0.50× the predicted time")
    assert f"the profile {tmp_path / 'p.parquet'} was measured on another machine" in w
    assert other.machine_id in w and machine_id() in w and "on this machine" in w


def test_far_off_and_slower_under_load_blames_the_load_not_the_profile(base_plan, tmp_path):
    save_profile(_profile(_cfg(tmp_path)), tmp_path / "p.parquet")
    plan = dataclasses.replace(base_plan, source=f"profile:{tmp_path / 'p.parquet'}")
    w = _warning(_close(plan, 1.8, run_load=BUSY))
    assert "other processes used 1.6 of 2 cores during this run (0.1 while profiling)" in w
    assert "fix: run 'memtrain run CONFIG' again when the machine is quiet" in w
    # faster than predicted is not the run's load: with a clean profile it is a stale one
    w = _warning(_close(plan, 0.4, run_load=BUSY))
    assert "may be stale" in w and "measured 2025-01-01" in w and "re-run 'memtrain profile CONFIG'" in w


def test_far_off_with_a_flagged_profile_names_the_flag(base_plan, tmp_path):
    save_profile(_loaded(_profile(_cfg(tmp_path))), tmp_path / "p.parquet")
    plan = dataclasses.replace(base_plan, source=f"profile:{tmp_path / 'p.parquet'}")
    w = _warning(_close(plan, 0.3, run_load=QUIET))
    assert "is unreliable: measured under load (other processes used up to 0.9 of 2 cores" in w
    assert "fix: re-run 'memtrain profile CONFIG' on a quiet machine" in w


def test_far_off_with_a_profile_gone_since_planning(base_plan, tmp_path):
    plan = dataclasses.replace(base_plan, source=f"profile:{tmp_path / 'gone.parquet'}")
    w = _warning(_close(plan, 3.0))
    assert "the plan's profile cannot be read now" in w and "gone.parquet" in w


def test_the_process_line_sets_baseline_plus_plan_against_the_measured_peak(base_plan):
    from memtrain.runtime.run_check import process_line

    planned = base_plan.prediction.devices[0].process_bytes
    assert planned > 0
    lines = _close(base_plan, 1.0, process=(planned * 2, 100 * 2**20, True))
    assert lines[-1] == process_line(planned, planned * 2, 100 * 2**20)
    assert lines[-1].startswith("process peak: measured ")
    expected = (100 * 2**20 + planned - (100 * 2**20 + 2 * planned)) / (100 * 2**20 + 2 * planned)
    assert f"({expected:+.1%})" in lines[-1] and "100.0 MiB baseline" in lines[-1]
    assert "cannot reset the peak" in process_line(10, 10, 10, exact=False)
    assert not any(line.startswith("process peak") for line in _close(base_plan, 1.0))  # not measured: no line
