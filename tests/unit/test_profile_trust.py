"""A profile a user can trust: the profiler's spread and load checks and re-measuring, and
profiles that are flagged, skipped or from another machine said so by ``plan``. Measurements and
load are injected: nothing here depends on how busy the machine running the tests is."""

from __future__ import annotations

import dataclasses
from collections import namedtuple

import pytest

from memtrain.planner import report
from memtrain.planner.analyze import analyze
from memtrain.planner.measure import MAX_SPREAD, Load, LoadMeter, ProbeQuality, measure_reliably, spread
from memtrain.runtime.profiling import (
    BlockTiming, Profile, ProfileError, blocks_spread, find_profile, machine_fingerprint, machine_id, model_key,
    save_profile,
)
from memtrain.config import config_from_dict
from memtrain.runtime.planning import plan_from_config

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


# --- spread, load, re-measuring -----------------------------------------------------------------


def test_spread_is_the_relative_interquartile_range():
    assert spread([1.0, 1.0, 1.0, 1.0]) == 0.0
    assert spread([1.0]) == 0.0
    # inclusive quartiles of 1..5 are 2 and 4, the median 3
    assert spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2 / 3)
    # one late outlier among many repeats does not make a timing noisy
    assert spread([1.0] * 19 + [100.0]) == 0.0


def test_the_block_timings_spread_is_weighted_by_time():
    quiet_big = BlockTiming(block="blocks.0", micro_batch_size=1, fwd_s=0.9, bwd_s=0.9, fwd_spread=0.0, bwd_spread=0.0)
    noisy_small = BlockTiming(block="head", micro_batch_size=1, fwd_s=0.1, bwd_s=0.1, fwd_spread=1.0, bwd_spread=1.0)
    # weights: forward 0.9 and 0.1, forward + backward 1.8 and 0.2; only the small block is noisy
    assert blocks_spread([quiet_big, noisy_small]) == pytest.approx((0.1 + 0.2) / 3.0)
    assert blocks_spread([]) == 0.0


class _FakePs:
    """psutil's few calls LoadMeter makes, with CPU times the test sets."""

    Times = namedtuple("Times", "user nice system idle iowait irq softirq steal guest guest_nice")
    Own = namedtuple("Own", "user system children_user children_system")

    def __init__(self):
        self.busy_s, self.own_s = 100.0, 10.0

    def cpu_times(self):
        return self.Times(self.busy_s, 0.0, 0.0, 1000.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0)

    def Process(self):  # noqa: N802  (psutil's name)
        ps = self

        class _P:
            def cpu_times(self):
                return ps.Own(ps.own_s, 0.0, 0.0, 0.0)
        return _P()

    def cpu_count(self):
        return 2

    def getloadavg(self):
        return (1.5, 1.0, 0.5)


def test_load_meter_counts_other_processes_not_this_one():
    ps, now = _FakePs(), [0.0]
    meter = LoadMeter(ps=ps, clock=lambda: now[0])
    now[0] = 2.0  # 2 s later: the machine was busy 3 CPU-seconds, 1.4 of them this process's own
    ps.busy_s += 3.0
    ps.own_s += 1.4
    load = meter.read()
    assert load.other_cpus == pytest.approx(0.8) and load.num_cpus == 2 and load.load_avg == 1.5
    assert load.busy()  # 0.8 of 2 cores is over MAX_OTHER_CPU_SHARE
    ps.own_s += 10.0  # this process alone busy: no other load, never negative
    now[0] = 4.0
    assert meter.read().other_cpus == 0.0


def _scripted(loads, spreads):
    """A probe returning the given spreads in turn, and a meter whose readings are the given
    loads in the order meters are made (each round's, and each wait's before a round), counting
    the probe's rounds."""
    calls, loads = [], list(loads)

    class Meter:
        def __init__(self):
            self.load = loads.pop(0)

        def read(self):
            return self.load

    def probe():
        calls.append(len(calls))
        return f"figures {len(calls)}", spreads[len(calls) - 1]

    return probe, Meter, calls


def test_a_reliable_probe_runs_once():
    probe, meter, calls = _scripted([QUIET], [0.02])
    slept = []
    figures, q = measure_reliably("block times", probe, meter=meter, sleep=slept.append)
    assert (figures, calls, slept) == ("figures 1", [0], [])
    assert q.rounds == 1 and not q.problem and not q.under_load and not q.noisy


def test_an_unreliable_probe_is_measured_again_after_a_quiet_wait_until_it_is_reliable():
    probe, meter, calls = _scripted([BUSY, QUIET, QUIET], [0.02, 0.03])  # round 1, the wait, round 2
    slept, said = [], []
    figures, q = measure_reliably("block times", probe, meter=meter, sleep=slept.append, wait_s=2.0,
                                  progress=said.append)
    assert figures == "figures 2" and len(calls) == 2 and slept == [2.0]
    assert q.rounds == 2 and not q.problem and q.other_cpus == QUIET.other_cpus
    assert "measured under load (other processes used 1.6 of 2 cores, load average 1.9)" in said[0]
    assert "measuring again (round 2 of 3)" in said[0]


def test_a_probe_unreliable_every_round_keeps_the_best_round_and_says_why():
    # round 2 is the least bad: its load is lower than round 1's and its spread than round 3's
    loads = [BUSY, QUIET, Load(other_cpus=0.7, num_cpus=2, load_avg=1.0), QUIET, QUIET]
    probe, meter, calls = _scripted(loads, [0.20, 0.18, 0.60])
    figures, q = measure_reliably("block times", probe, meter=meter, sleep=lambda s: None)
    assert len(calls) == 3 and figures == "figures 2"
    assert q.rounds == 3 and q.under_load and q.noisy and q.spread == 0.18
    assert q.problem == (f"measured under load (other processes used 0.7 of 2 cores, load average 1.0); "
                         f"repeats spread 18% (limit {MAX_SPREAD:.0%})")


def test_a_probe_is_not_measured_again_while_the_load_lasts():
    probe, meter, calls = _scripted([BUSY, BUSY], [0.40])  # still busy during the wait: no second round
    said = []
    _, q = measure_reliably("block times", probe, meter=meter, sleep=lambda s: None, progress=said.append)
    assert len(calls) == 1 and q.rounds == 1 and q.under_load and q.noisy
    assert "not measuring again: other processes are still busy (other processes used 1.6 of 2 cores" in said[0]


def test_a_probe_whose_load_is_not_checked_is_judged_by_its_spread_only():
    probe, meter, calls = _scripted([BUSY], [0.3])
    _, q = measure_reliably("NVMe bandwidths", probe, meter=meter, max_spread=0.5, check_load=False)
    assert len(calls) == 1 and not q.problem and not q.under_load and q.other_cpus == BUSY.other_cpus
    probe, meter, calls = _scripted([BUSY, BUSY, BUSY], [0.9, 0.2])  # noisy: measured again, load or not
    _, q = measure_reliably("NVMe bandwidths", probe, meter=meter, max_spread=0.5, check_load=False,
                            sleep=lambda s: None)
    assert len(calls) == 2 and q.rounds == 2 and not q.problem and q.spread == 0.2


# --- skipped profiles: find_profile and plan say which file and why ----------------------------------


def test_find_profile_says_which_file_it_skipped_and_why(tmp_path):
    cfg = _cfg(tmp_path)
    path = tmp_path / "profile.parquet"
    assert find_profile(tmp_path, cfg.model, 16, "fp32").skipped == ""  # none there: nothing to say
    path.write_bytes(b"not parquet")
    found = find_profile(tmp_path, cfg.model, 16, "fp32")
    assert found.path is None and found.skipped.startswith(f"skipped {path}: not a memtrain profile")
    save_profile(_other_machine(_profile(cfg)), path)
    found = find_profile(tmp_path, cfg.model, 16, "fp32")
    assert found.path is None and "measured on another machine (elsewhere" in found.skipped
    assert machine_id() in found.skipped and "cpu Another CPU here" in found.skipped
    save_profile(_profile(cfg), path)
    found = find_profile(tmp_path, cfg.model, 32, "fp32")
    assert found.path is None and found.skipped == (
        f"skipped {path}: measured at seq_len 16, not this config's 32; "
        "'memtrain profile CONFIG' measures this model on this machine")
    assert find_profile(tmp_path, cfg.model, 16, "fp32").path == path


def test_plan_says_an_old_profile_in_the_run_directory_was_skipped(tmp_path):
    import json

    import pyarrow.parquet as pq

    cfg = _cfg(tmp_path)
    path = tmp_path / "profile.parquet"
    save_profile(_profile(cfg), path)
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"memtrain.profile"])
    meta["version"] = 3
    pq.write_table(table.replace_schema_metadata({b"memtrain.profile": json.dumps(meta).encode()}), path)
    plan = plan_from_config(cfg)
    assert not plan.source.startswith("profile:")
    (note,) = plan.source_notes
    assert note.startswith(f"skipped {path}: profile version 3 (it does not record how noisy")
    figures_line = next(line for line in report.summary_text(plan).splitlines() if line.startswith("figures from"))
    assert figures_line.startswith(f"figures from  {plan.source} — skipped")


def test_explicit_profile_from_another_machine_is_used_with_a_warning_naming_both(tmp_path):
    cfg = _cfg(tmp_path)
    other = _other_machine(_profile(cfg))
    save_profile(other, tmp_path / "theirs.parquet")
    plan = plan_from_config(cfg, profile_path=str(tmp_path / "theirs.parquet"))
    assert plan.source == f"profile:{tmp_path / 'theirs.parquet'}"
    (note,) = plan.source_notes
    assert other.machine_id in note and machine_id() in note and "may not hold here" in note


def test_explicit_profile_of_another_model_is_refused_naming_the_file(tmp_path):
    cfg = _cfg(tmp_path)
    save_profile(_profile(_cfg(tmp_path, seq_len=32)), tmp_path / "p32.parquet")
    with pytest.raises(ProfileError, match=r"--profile .*p32\.parquet: measured at seq_len 32, not this config's 16"):
        plan_from_config(cfg, profile_path=str(tmp_path / "p32.parquet"))


def test_plan_with_a_flagged_profile_says_so_on_its_source_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a short run directory: the summary's lines fold long paths anywhere
    cfg = _cfg("r")
    save_profile(_loaded(_profile(cfg)), "r/profile.parquet")
    plan = plan_from_config(cfg)
    assert plan.source == "profile:r/profile.parquet"
    assert plan.source_notes == (
        "profile flagged: measured under load (other processes used up to 0.9 of 2 cores, load average up to 1.9); "
        "repeats spread: block times 35%; re-run 'memtrain profile CONFIG' on a quiet machine",)
    text = " ".join(report.summary_text(plan).split())
    assert "figures from profile:r/profile.parquet — profile flagged: measured under load (other processes" in text
    save_profile(_profile(cfg), "r/profile.parquet")  # a clean profile: nothing to say
    assert plan_from_config(cfg).source_notes == ()
