"""The profiler's version-2 additions (kept since): overheads in the file, what
apply_profile hands the planner, the head timed with the loss, and the runtime-overhead
measurement and fit; older profiles refused."""

from __future__ import annotations

import dataclasses
import json

import pyarrow.parquet as pq
import pytest
import torch

from memtrain.cluster.spec import HostSpec
from memtrain.models import build_model
from memtrain.cluster import catalog
from memtrain.planner.analyze import analyze
from memtrain.planner.profile_format import (
    OVERHEAD_KEYS, PROFILE_VERSION, BlockTiming, Profile, ProfileError, load_profile, save_profile,
)
from memtrain.planner.profile_inputs import apply_profile
from memtrain.runtime.overhead_probe import _lstsq_nonneg, measure_runtime_overhead
from memtrain.runtime.profiling import measure_blocks
from memtrain.config import ModelConfig

TINY = ModelConfig(preset="tiny")
DEV = catalog.cpu_device_spec(num_cpus=2, memory_bytes=2**34)
HOST = HostSpec(memory_bytes=2**35, num_cpus=2, memory_bw_gbps=10.0, cpu_adam_params_per_s=1e8)
OVER = {"block_fwd_s": 2e-4, "block_bwd_s": 5e-5, "param_s": 6e-6, "microbatch_s": 1e-4, "chunk_fetch_s": 1.5e-4}


def _profile(**kw) -> Profile:
    stats = analyze(TINY, seq_len=16)
    blocks = tuple(BlockTiming(block=b.name, micro_batch_size=m, fwd_s=1e-3 * m, bwd_s=2e-3 * m)
                   for b in stats.blocks for m in (1, 2))
    fields = dict(machine_id="m", fingerprint={"cpu": "x"}, model_key="k", model_name="tiny", seq_len=16, dtype="fp32",
                  created="now", device="cpu", bandwidths={"h2d": 5.0}, overheads=dict(OVER), blocks=blocks)
    fields.update(kw)
    return Profile(**fields)


def test_profile_round_trips_with_its_overheads(tmp_path):
    prof = _profile()
    save_profile(prof, tmp_path / "p.parquet")
    back = load_profile(tmp_path / "p.parquet")
    assert back == prof
    assert back.version == PROFILE_VERSION == 4


@pytest.mark.parametrize("version, why", [
    (1, r"version 1 \(it has no runtime overheads"),
    (2, r"version 2 \(its NVMe bandwidths are of one buffered stream, not of the store\)"),
    (3, r"version 3 \(it does not record how noisy its measurements were or the load they ran under\)"),
])
def test_an_older_profile_is_refused_with_the_fix(tmp_path, version, why):
    save_profile(_profile(), tmp_path / "p.parquet")
    table = pq.read_table(tmp_path / "p.parquet")
    meta = json.loads(table.schema.metadata[b"memtrain.profile"])
    meta["version"] = version
    if version == 1:
        del meta["overheads"]
    pq.write_table(table.replace_schema_metadata({b"memtrain.profile": json.dumps(meta).encode()}), tmp_path / "old.parquet")
    with pytest.raises(ProfileError, match=why + r".*re-run 'memtrain profile CONFIG'"):
        load_profile(tmp_path / "old.parquet")


def test_apply_profile_sets_the_overheads_and_none_means_zero():
    stats = analyze(TINY, seq_len=16)
    assert (stats.overhead_block_fwd_s, stats.overhead_block_bwd_s, stats.overhead_param_s,
            stats.overhead_microbatch_s) == (0.0, 0.0, 0.0, 0.0)  # catalog figures: no overhead
    got, *_ = apply_profile(_profile(), stats, DEV, HOST, None)
    assert {k: getattr(got, f"overhead_{k}") for k in OVERHEAD_KEYS} == OVER
    # Scaling to another micro-batch size keeps them (they are per call, not per sequence).
    assert got.scaled(4).overhead_block_fwd_s == OVER["block_fwd_s"]
    assert got.blocks[1].fwd_fixed_s == pytest.approx(0.0) and got.blocks[1].fwd_per_sample_s == pytest.approx(1e-3)
    none, *_ = apply_profile(_profile(overheads={}), stats, DEV, HOST, None)
    assert none.overhead_param_s == 0.0 and none.overhead_microbatch_s == 0.0
    with pytest.raises(ProfileError, match="unknown key 'per_hook_s'"):
        apply_profile(_profile(overheads={"per_hook_s": 1.0}), stats, DEV, HOST, None)


def test_nonnegative_fit_recovers_known_coefficients_and_drops_negative_ones():
    rows = [[1.0, b, p] for b in (3, 5, 8) for p in (20, 30)]
    truth = [1e-4, 2e-4, 6e-6]
    ys = [sum(r * t for r, t in zip(row, truth)) for row in rows]
    assert _lstsq_nonneg(rows, ys) == pytest.approx(truth, rel=1e-9)
    # An intercept that fits negative is set to 0 and the slope refitted through the origin.
    rows = [[1.0, x] for x in (1.0, 2.0, 3.0)]
    got = _lstsq_nonneg(rows, [0.5, 2.5, 4.5])  # unconstrained: -1.5 + 2x
    assert got[0] == 0.0 and got[1] == pytest.approx((0.5 + 5.0 + 13.5) / 14.0)


def test_the_last_block_is_timed_with_the_loss():
    with torch.device("meta"):
        built = build_model(TINY, max_seq_len=16)
    calls = []

    def loss_fn(logits, labels):
        calls.append((tuple(logits.shape), tuple(labels.shape)))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))

    built = dataclasses.replace(built, loss_fn=loss_fn)
    timings = measure_blocks(built, seq_len=16, dtype=torch.float32, device=torch.device("cpu"), micro_batch_sizes=(2,),
                             reps=1)
    assert [t.block for t in timings] == [name for name, _ in built.blocks]
    assert all(t.fwd_s > 0 and t.bwd_s > 0 for t in timings)
    # Only the head's timing runs the loss: on its (2, 16, vocab) logits, against (2, 16) labels.
    assert calls and set(calls) == {((2, 16, built.vocab_size), (2, 16))}


def test_runtime_overhead_is_measured_on_this_machine():
    got = measure_runtime_overhead(torch.device("cpu"), reps=10, num_layers=(1, 4))
    assert set(got) == set(OVERHEAD_KEYS)
    assert all(v >= 0 for v in got.values())
    # The engine runs Python hooks around every block call: more than a microsecond each, and
    # far less than the milliseconds a block of real size computes for.
    assert 1e-6 < got["block_fwd_s"] < 5e-2
    assert got["block_fwd_s"] + got["block_bwd_s"] + got["param_s"] > 0
    # each host-home chunk fetch is Python work on the training thread: microseconds, not milliseconds
    assert 1e-6 < got["chunk_fetch_s"] < 5e-3
    with pytest.raises(ValueError, match="num_layers"):
        measure_runtime_overhead(torch.device("cpu"), num_layers=(2,))
