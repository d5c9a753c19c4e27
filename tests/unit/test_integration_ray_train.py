"""memtrain in a Ray Train TorchTrainer: a worker that fails mid-run is restarted by
``FailureConfig(max_failures=1)``, resumes from the last reported Ray Train Checkpoint, and every
step's loss equals a plain PyTorch loop's (docs/integrations.md). Local Ray on loopback, token
auth on."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("ray.train.torch")

from memtrain.models.gpt import GPT, causal_lm_loss, gpt_config  # noqa: E402

STEPS, EVERY, FAIL_AFTER = 6, 2, 3


def _batch(step: int):
    ids = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1000 + step))
    return ids[:, :-1], ids[:, 1:]


def _model():
    torch.manual_seed(0)
    return GPT(gpt_config("tiny"))


def train_loop_per_worker(config):
    """The user's loop: memtrain's engine, a report per step, a checkpoint every EVERY steps; the
    first attempt fails after step FAIL_AFTER (after the checkpoint of step 2, before step 4's)."""
    from memtrain.runtime import wrap
    from memtrain.runtime.integrations import ray_train as mt_ray

    torch.set_num_threads(1)
    engine = wrap(_model(), optimizer={"name": "adamw", "lr": 1e-3}, memory={"offload": "host"}, seq_len=32,
                  global_batch_size=4, host_kernel="single", verbose=False)
    start = mt_ray.restore(engine)
    log = Path(config["log"])
    with log.open("a") as f:
        f.write(json.dumps({"start": start}) + "\n")
    for step in range(start, STEPS):
        loss = engine.train_step(_batch(step))
        with log.open("a") as f:
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")
        if step + 1 == FAIL_AFTER and not Path(config["failed"]).exists():
            Path(config["failed"]).touch()
            raise RuntimeError("a worker lost mid-run")
        mt_ray.report(engine, {"loss": loss}, step=step + 1, checkpoint=(step + 1) % EVERY == 0)
    engine.close()


def _plain_losses() -> list[float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for step in range(STEPS):
            ids, labels = _batch(step)
            loss = causal_lm_loss(model(ids), labels)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def local_ray(monkeypatch):
    """Ray on 127.0.0.1 only, token authentication on, stopped after the test."""
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError:  # a Ray without token authentication
        pass
    else:
        _enable_token_auth()
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2,
             logging_level="ERROR", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_a_failed_worker_resumes_from_its_ray_train_checkpoint_to_the_plain_losses(tmp_path, local_ray):
    from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    log = tmp_path / "log.jsonl"
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"log": str(log), "failed": str(tmp_path / "failed")},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False),
        run_config=RunConfig(name="mt", storage_path=str(tmp_path / "storage"), failure_config=FailureConfig(max_failures=1)))
    result = trainer.fit()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["start"] for r in records if "start" in r] == [0, 2]  # restarted from step 2's checkpoint
    last = {r["step"]: r["loss"] for r in records if "step" in r}  # a step run twice: the resumed run's
    assert [r["step"] for r in records if "step" in r] == [0, 1, 2, 2, 3, 4, 5]
    assert [last[s] for s in range(STEPS)] == _plain_losses()
    assert [r["loss"] for r in records if r.get("step") == 2] == [last[2]] * 2  # the replayed step too
    assert isinstance(result.checkpoint, Checkpoint) and result.metrics["step"] == STEPS
    with result.checkpoint.as_directory() as d:
        assert (Path(d) / f"step-{STEPS:08d}" / "manifest.json").is_file()
    assert os.environ.get("RAY_AUTH_MODE") == "token"
