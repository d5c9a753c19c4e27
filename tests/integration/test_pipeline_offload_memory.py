"""``memtrain run`` of a pipeline whose stages are offloaded to the host (``memory.offload: host``),
on a local Ray (loopback, token authentication on): what the workers measure against what the
plan charged (planner.stage_offload_cost [Note: an offloaded stage's residency]; planner.hetero_plan
[Note: gradient copies after the passes]; bench/pipeline_offload_memory.py).

On this machine the device is the CPU, whose peak the runtime does not measure as a whole, so the
figures compared are those it measures on any device, per rank, the most over the steps after
the first (the plan's figures for a pipeline rank are its busiest replica's: the first, under
ZeRO; the others' are checked not to exceed them): the chunk stores' host ledgers against the rank's predicted host peak; their device
ledgers (every chunk's param buffer for the whole step, one grad buffer at ``OFFLOAD``) against
the plan's chunks; the gradients held while summed against ``4 · n`` (twice over two replicas
without ZeRO-2: the all-reduce's flat copy; under ZeRO-2 one chunk's copy more); with NVMe homes
the chunk files' ledger against the rank's predicted NVMe peak. Tolerance: 2% (the figures are whole tensors'
bytes; under ZeRO-1 a replica's share is whole parameters, about half).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from memtrain.runtime.config_file import load_config
from memtrain.runtime.distributed import run_distributed

from ray_helpers import token_auth

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from pipeline_offload_memory import compare  # noqa: E402

TOLERANCE = 0.02


@pytest.fixture(scope="module")
def token_ray():
    """An embedded Ray on 127.0.0.1 with token authentication on (4 logical CPUs: a 2 × 2 run)."""
    import ray

    from memtrain.runtime.ray_cluster import _loopback_only

    with token_auth():
        _loopback_only()
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
        try:
            yield ray
        finally:
            ray.shutdown()


def _run(tmp_path: Path, *sets: str, home: str = "host") -> list[dict]:
    cfg = load_config("examples/gpt-tiny-pp2.yaml", ["train.steps=3", f"run_dir={tmp_path}/run", f"memory.offload={home}",
                                                     "parallel.profile=catalog", f"parallel.nvme_dir={tmp_path}", *sets])
    lines: list[str] = []
    out = run_distributed(cfg, print_fn=lines.append)
    plan = out["plan"]
    said = [line for line in lines if "offloaded states, measured: host" in line]  # the closing lines say it
    assert len(said) == len(plan.pipeline.ranks), lines
    for rp in plan.pipeline.ranks:  # the plan offloads every stage whole to its home, as the run did
        assert "params off the device" in rp.offload and all(str(c.home) == home for p in rp.policies for c in p.chunks)
    rows = compare(tmp_path / "run")
    assert [r["rank"] for r in rows] == list(range(len(plan.pipeline.ranks)))
    return rows


def _check(rows: list[dict], p: int = 2) -> None:
    """Replica 0's ranks within the tolerance; another replica's never above it (the plan charges
    each pipeline rank its busiest replica's figures: under ZeRO the first replica's share and
    its first chunk's ``OFFLOAD`` grad buffer)."""
    for row in rows:
        for key in ("host", "buffers", "grads", "nvme"):
            if key not in row:
                continue
            got, want = row[key]
            assert got > 0 and got - want <= TOLERANCE * got, (row["rank"], key, got, want)
            if row["rank"] < p:
                assert want - got <= TOLERANCE * got, (row["rank"], key, got, want)


def test_a_host_offloaded_pipeline_measures_what_its_plan_charges(token_ray, tmp_path):
    rows = _run(tmp_path)
    _check(rows)
    for row in rows:  # the gradients on the device: every parameter's, the step's whole backward
        assert row["buffers"][0] >= row["grads"][0]


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 1, 2])
def test_two_replicas_measure_what_their_plan_charges(token_ray, tmp_path, zero):
    """Over two replicas the gradient sum holds a flat copy (ZeRO-0 and -1 alike), under ZeRO-2 a
    chunk's copy for its reduce; under ZeRO-1 and -2 each replica keeps the accumulators and
    states of about half the parameters."""
    rows = _run(tmp_path, "parallel.data=2", f"parallel.zero={zero}")
    assert len(rows) == 4
    _check(rows)


@pytest.mark.slow
def test_an_nvme_offloaded_pipeline_measures_what_its_plan_charges(token_ray, tmp_path):
    """Six layers: several chunks a stage; on NVMe the chunk files (4 KiB header and pages) and the
    optimizer's rewrites in flight, old and new, against the plan's NVMe peak."""
    rows = _run(tmp_path, "model.overrides.num_layers=6", "model.overrides.tie_embeddings=false", home="nvme")
    assert all("nvme" in row for row in rows)
    _check(rows)
