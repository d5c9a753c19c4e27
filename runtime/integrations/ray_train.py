"""memtrain inside a Ray Train ``TorchTrainer``: checkpoints as Ray Train ``Checkpoint``s.

    from memtrain.runtime.integrations import ray_train as mt_ray

    def train_loop_per_worker(config):
        engine = wrap(model, optimizer=..., memory=..., seq_len=..., global_batch_size=...)
        start = mt_ray.restore(engine)                      # 0, or the step a restart continues after
        for step in range(start, config["steps"]):
            loss = engine.train_step(batch(step))
            mt_ray.report(engine, {"loss": loss}, step=step + 1, checkpoint=(step + 1) % 5 == 0)
        engine.close()

    TorchTrainer(train_loop_per_worker, scaling_config=ScalingConfig(num_workers=1),
                 run_config=RunConfig(storage_path=..., failure_config=FailureConfig(max_failures=1))).fit()

``report`` writes the engine's state (``runtime.checkpoint``: the fp32 weights and optimizer
states from every tier, the RNG states, the data position; a checksummed step directory) into a
temporary directory and hands it to ``ray.train.report`` as a ``Checkpoint``, which Ray copies
to the run's storage. After a worker fails, Ray Train restarts the loop; ``restore`` finds the
last reported checkpoint (``ray.train.get_checkpoint``), verifies it and loads it, so the run
continues from there as if uninterrupted. One worker per run: memtrain's engine is one process
(its data-parallel runtime is not this one), so only rank 0's state is written.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from typing import Any

import ray.train

from memtrain.errors import UserError
from memtrain.runtime import checkpoint as ckpt

__all__ = ["report", "restore"]


def _single_worker() -> None:
    size = ray.train.get_context().get_world_size()
    if size != 1:
        raise UserError(f"ScalingConfig(num_workers={size}): memtrain's engine runs in one worker; use num_workers=1")


def report(engine, metrics: Mapping[str, Any], *, step: int, checkpoint: bool = True,
           data: Mapping[str, Any] | None = None) -> None:
    """``ray.train.report(metrics)``, with a ``Checkpoint`` of the engine after ``step`` steps
    when ``checkpoint`` (``data``: the data position to keep with it)."""
    _single_worker()
    metrics = {**metrics, "step": step}
    if not checkpoint:
        ray.train.report(dict(metrics))
        return
    with tempfile.TemporaryDirectory(prefix="memtrain-ray-ckpt-") as tmp:
        ckpt.save(tmp, step, {0: ckpt.engine_state(engine, step=step, data=data)})
        ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restore(engine, *, batch=None) -> int:
    """Load the run's last reported checkpoint into ``engine``; the step it was taken after, or
    0 when there is none (a first attempt). ``batch``: one batch, for an engine that plans from
    the first batch's shape (``wrap`` without ``seq_len``/``global_batch_size``)."""
    found = ray.train.get_checkpoint()
    if found is None:
        return 0
    with found.as_directory() as directory:  # NVMe chunk files are read from it: load inside
        loaded = ckpt.latest(directory)
        if loaded is None:
            raise UserError(f"ray.train.get_checkpoint(): {found.path} holds no valid memtrain checkpoint; it was "
                            "not written by memtrain.runtime.integrations.ray_train.report")
        if batch is not None:
            engine.prepare(batch)
        ckpt.restore_engine_state(engine, loaded)
    return loaded.step

