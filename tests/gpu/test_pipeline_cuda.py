"""Pipeline workers on a GPU: two ranks sharing the one GPU (half a GPU each through Ray's
placement), fp32 and bf16, against the same pipeline on the CPU and plain PyTorch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import ray

from memtrain.runtime.pipeline_driver import run_pipeline
from memtrain.runtime.ray_cluster import Assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from pipeline_reference import reference_losses  # noqa: E402

KW = dict(model={"source": "gpt", "preset": "tiny"}, schedule="1f1b", num_ranks=2, num_microbatches=4,
          micro_batch_size=2, seq_len=32, num_steps=3, seed=0, lr=1e-3, timeout_s=60)


@pytest.fixture(scope="module")
def gpu_ray():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_two_ranks_on_the_gpu_train_as_plain_pytorch(gpu_ray, dtype):
    on_gpu = [Assignment(rank=r, resources={"CPU": 1.0, "GPU": 0.5}) for r in range(2)]
    got = run_pipeline(**KW, assignments=on_gpu, dtype=dtype)
    assert all(d.startswith("cuda:0") for d in got.devices), got.devices
    assert all(p["device"] > 0 for step in got.peak_bytes for p in step)
    cpu = run_pipeline(**KW, dtype=dtype)
    assert cpu.devices == ("cpu", "cpu")
    ref = reference_losses(KW["model"], num_steps=3, num_microbatches=4, micro_batch_size=2, seq_len=32, seed=0,
                           lr=1e-3, bf16=dtype == "bf16")
    tol = 1e-3 if dtype == "bf16" else 1e-4  # GPU kernels against CPU ones
    for step, want in zip(got.microbatch_losses, ref, strict=True):
        assert list(step) == pytest.approx(want, rel=tol)
    for a, b in zip(got.losses, cpu.losses, strict=True):
        assert a == pytest.approx(b, rel=tol)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_dropout_on_the_gpu_draws_one_processs_masks(gpu_ray, dtype):
    """Dropout 0.1: each rank walks the step's draws on the GPU's generator (runtime.stage_rng),
    so the losses are plain PyTorch's on the GPU, whose masks differ from the CPU's; a forward
    that drew other than its trace (another attention kernel) would fail the run."""
    model = {"source": "gpt", "preset": "tiny", "overrides": {"dropout": 0.1}}
    on_gpu = [Assignment(rank=r, resources={"CPU": 1.0, "GPU": 0.5}) for r in range(2)]
    got = run_pipeline(**{**KW, "model": model}, assignments=on_gpu, dtype=dtype)
    assert all(d.startswith("cuda:0") for d in got.devices), got.devices
    ref = reference_losses(model, num_steps=3, num_microbatches=4, micro_batch_size=2, seq_len=32, seed=0,
                           lr=1e-3, bf16=dtype == "bf16", device="cuda")
    for step, want in zip(got.microbatch_losses, ref, strict=True):
        assert list(step) == pytest.approx(want, rel=1e-4 if dtype == "bf16" else 1e-5)
