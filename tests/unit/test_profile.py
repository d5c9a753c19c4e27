"""The profiler's file format and how measured figures replace catalog ones."""

import threading
import time
from pathlib import Path

import pytest
import torch

from memtrain.models import build_model
from memtrain.planner import profile_inputs
from memtrain.runtime import profiling as prof
from memtrain.planner.analyze import analyze
from memtrain.cluster.catalog import default_host_spec, default_nvme_spec, device_spec
from memtrain.planner.measure import Load
from memtrain.config import ModelConfig, config_from_dict


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One measured profile of the tiny preset, shared by the tests of this module."""
    return _tiny_profile(tmp_path_factory.mktemp("profile"))


class BusyMeter:
    """A load meter that always reads other processes busy on 1.5 of 2 cores."""

    def read(self):
        return Load(other_cpus=1.5, num_cpus=2, load_avg=3.0)


def _tiny_profile(tmp_path):
    """One round per probe (no re-measuring: fast), under a load meter that always reads busy, so
    the flags a loaded machine gets are in the profile whatever the load here."""
    cfg = config_from_dict({"model": {"preset": "tiny"}, "train": {"seq_len": 16, "global_batch_size": 2},
                            "cluster": {"auto": True, "nodes": [{"nvme": {"path": str(tmp_path)}}]}})
    return cfg, prof.run_profile(cfg, progress=lambda msg: None, copy_bytes=8 * 2**20, disk_bytes=16 * 2**20,
                                 adam_elems=2**20, rounds=1, meter=BusyMeter)


def test_profile_measures_and_round_trips(tiny, tmp_path):
    cfg, p = tiny
    assert p.machine_id == prof.machine_id()
    assert p.model_key == prof.model_key(cfg.model, 16, "fp32")
    names = {t.block for t in p.blocks}
    assert names == {f"blocks.{i}" for i in range(4)}
    assert all(t.fwd_s > 0 and t.bwd_s > 0 for t in p.blocks)
    for key in ("h2d", "d2h", "device_memory", "nvme_read", "nvme_write", "cpu_adam_params_per_s"):
        assert p.bandwidths[key] > 0, key
    # a durable write (fdatasync) costs more than nothing on any disk; the probe left no file behind
    assert 0 < p.bandwidths["nvme_write_latency_s"] < 1 and 0 <= p.bandwidths["nvme_read_latency_s"] < 1
    # the store's threads use some CPU per second of transfer (checksums, the kernel's side), at
    # most all of its 8 threads' worth (runtime.disk_probe)
    assert 0 < p.bandwidths["nvme_write_cpu_share"] <= 8 and 0 < p.bandwidths["nvme_read_cpu_share"] <= 8
    assert list(Path(cfg.cluster.nodes[0].nvme.path).iterdir()) == []
    path = tmp_path / "profile.parquet"
    prof.save_profile(p, path)
    assert prof.load_profile(path) == p
    found = prof.find_profile(tmp_path, cfg.model, 16, "fp32")
    assert (found.path, found.profile, found.skipped) == (path, p, "")
    other = prof.find_profile(tmp_path, cfg.model, 32, "fp32")  # another shape: not this profile, and said so
    assert other.path is None and other.profile is None
    assert other.skipped.startswith(f"skipped {path}: measured at seq_len 16, not this config's 32")


def test_profile_records_each_probes_spread_and_load_and_flags_the_loaded_ones(tiny, tmp_path):
    """Every probe's quality is in the file; the CPU-bound probes run under (injected) load are
    flagged as measured under load, the NVMe ones are not (their load is not checked)."""
    _, p = tiny
    assert set(p.quality) == {"blocks", "copy", "nvme", "nvme_latency", "cpu_adam", "overheads"}
    for name, q in p.quality.items():
        assert q.rounds == 1 and q.other_cpus == 1.5 and q.num_cpus == 2 and q.spread >= 0
        assert q.under_load == (name not in ("nvme", "nvme_latency")), name
    loaded = [w for w in p.warnings if "measured under load (other processes used 1.5 of 2 cores" in w]
    assert sorted(w.split(":")[0] for w in loaded) == ["CPU AdamW rate", "block times", "copy bandwidths",
                                                        "runtime overheads"]
    assert all(t.fwd_spread >= 0 and t.bwd_spread >= 0 for t in p.blocks)
    assert prof.profile_flag(p).startswith("measured under load (other processes used up to 1.5 of 2 cores")
    prof.save_profile(p, tmp_path / "flagged.parquet")
    back = prof.load_profile(tmp_path / "flagged.parquet")
    assert back.quality == p.quality and back.warnings == p.warnings


def test_apply_profile_replaces_catalog_figures(tiny, tmp_path):
    cfg, p = tiny
    stats = analyze(cfg.model, seq_len=16, micro_batch_size=1, dtype="fp32")
    device = device_spec("rtx4090")
    host = default_host_spec(8, 32 * 2**30)
    nvme = default_nvme_spec(str(tmp_path), 2**40)
    s2, d2, h2, n2 = profile_inputs.apply_profile(p, stats, device, host, nvme)
    assert d2.h2d_gbps == p.bandwidths["h2d"] and d2.memory_bw_gbps == p.bandwidths["device_memory"]
    assert h2.cpu_adam_params_per_s == p.bandwidths["cpu_adam_params_per_s"]
    assert n2.read_gbps == p.bandwidths["nvme_read"] and n2.write_gbps == p.bandwidths["nvme_write"]
    assert n2.read_latency_s == p.bandwidths["nvme_read_latency_s"]
    assert n2.write_latency_s == p.bandwidths["nvme_write_latency_s"]
    assert n2.read_cpu_share == p.bandwidths["nvme_read_cpu_share"]
    assert n2.write_cpu_share == p.bandwidths["nvme_write_cpu_share"]
    by_block = {}
    for t in p.blocks:
        by_block.setdefault(t.block, {})[t.micro_batch_size] = t
    for b in s2.blocks:
        assert b.measured
        points = sorted(by_block[b.name].items())
        assert (b.fwd_fixed_s, b.fwd_per_sample_s) == profile_inputs._fit_line([(m, t.fwd_s) for m, t in points])
        assert (b.bwd_fixed_s, b.bwd_per_sample_s) == profile_inputs._fit_line([(m, t.bwd_s) for m, t in points])


def test_fit_line_is_least_squares_and_never_negative():
    a, b = profile_inputs._fit_line([(1, 3.0), (2, 5.0), (4, 9.0)])
    assert (a, b) == pytest.approx((1.0, 2.0))
    a, b = profile_inputs._fit_line([(1, 1.0), (2, 4.0), (4, 10.0)])  # a negative intercept is refused
    assert a == 0.0 and b > 0


def test_bad_profile_files_are_clear_errors(tiny, tmp_path):
    with pytest.raises(prof.ProfileError, match="memtrain profile"):
        prof.load_profile(tmp_path / "missing.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(prof.ProfileError, match="not a memtrain profile"):
        prof.load_profile(tmp_path / "junk.parquet")
    _, p = tiny
    stats = analyze(ModelConfig(preset="tiny", overrides={"num_layers": 3}), seq_len=16, micro_batch_size=1)
    with pytest.raises(prof.ProfileError, match="another model"):
        profile_inputs.apply_profile(p, stats, device_spec("rtx4090"), default_host_spec(8, 2**35), None)


def test_measure_blocks_times_each_distinct_block_once(tmp_path):
    with torch.device("meta"):
        built = build_model(ModelConfig(preset="tiny", overrides={"num_layers": 3}))
    calls = []
    timings = prof.measure_blocks(built, seq_len=8, dtype=torch.float32, device=torch.device("cpu"),
                                  micro_batch_sizes=(1,), reps=1, progress=calls.append)
    assert len(timings) == 5  # every block reported
    assert len(calls) == 3  # embedding, one layer (its twins share it), head
    layer_times = {(t.fwd_s, t.bwd_s) for t in timings if t.block in ("blocks.1", "blocks.2", "blocks.3")}
    assert len(layer_times) == 1


def test_disk_bandwidth_goes_through_the_store_with_files_in_flight(tmp_path, monkeypatch):
    """[Note: the store's bandwidth, not one stream's]: the probe writes and reads its files
    through ``NvmeStore``, all submitted at once (several in flight on its threads), verifies
    every read, and leaves nothing behind."""
    from memtrain.offload.nvme import NvmeStore

    lock, running, most, calls = threading.Lock(), [0], [0], {"w": 0, "r": 0}

    def spy(orig, kind):
        def op(self, *a):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
                calls[kind] += 1
            try:
                time.sleep(0.02)  # long enough for the other threads to start theirs
                return orig(self, *a)
            finally:
                with lock:
                    running[0] -= 1
        return op

    monkeypatch.setattr(NvmeStore, "_write_op", spy(NvmeStore._write_op, "w"))
    monkeypatch.setattr(NvmeStore, "_read_op", spy(NvmeStore._read_op, "r"))
    bw = prof.measure_disk_gbps(tmp_path / "disk", num_bytes=4 * 2**20, file_bytes=2**20, reps=2)
    assert bw["nvme_write"] > 0 and bw["nvme_read"] > 0
    assert calls == {"w": 1 + 2 * 4, "r": 2 * 4}  # a warm-up write, then 4 files per round
    assert most[0] > 1
    assert list((tmp_path / "disk").iterdir()) == []
