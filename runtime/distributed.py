"""``memtrain run`` over several devices: connect to Ray, read the cluster, check it can hold the
run, then hand over to the pipeline driver (``runtime.pipeline_driver.run_pipeline``), which
creates the StageWorker actors and trains.

``cli.py`` calls ``run_distributed`` when ``parallel.pipeline × parallel.data`` is more than 1;
one worker trains in the calling process (``train.train``), inside a Ray job too.
"""

from __future__ import annotations

from typing import Any, Callable

from memtrain.config import Config, ConfigError
from memtrain.errors import UserError

__all__ = ["run_distributed", "check_devices", "PIPELINE_DRIVER"]

PIPELINE_DRIVER = "memtrain.runtime.pipeline_driver"
"""The module whose ``run_pipeline`` runs the workers (imported when a run needs it)."""


def _num_blocks(cfg: Config) -> tuple[int, str]:
    """The model's blocks (embedding, layers, head) and name, measured on the meta device."""
    from memtrain.planner.analyze import analyze

    stats = analyze(cfg.model, seq_len=cfg.train.seq_len, micro_batch_size=1, dtype=cfg.train.dtype)
    return len(stats.blocks), stats.name


def check_devices(cfg: Config, inventory: Any) -> list[Any]:
    """The first ``parallel.pipeline × parallel.data`` device slots of ``inventory`` (a
    ``ray_cluster.RayInventory``), one per rank in order; ``ConfigError`` naming both degrees
    and what the cluster has when it holds fewer."""
    p = cfg.parallel
    slots = inventory.slots
    if len(slots) < p.num_workers:
        raise ConfigError(
            f"parallel.pipeline × parallel.data: {p.pipeline} × {p.data} = {p.num_workers} workers need one device "
            f"each, but the Ray cluster has {len(slots)} ({inventory.describe()}); lower parallel.pipeline or "
            "parallel.data, or add nodes (in a cluster without GPUs each CPU Ray gives a node is a device)")
    return list(slots[: p.num_workers])


def _pipeline_runner() -> Callable[..., Any]:
    import importlib

    try:
        module = importlib.import_module(PIPELINE_DRIVER)
    except ModuleNotFoundError as e:
        if e.name != PIPELINE_DRIVER:
            raise  # a module the driver imports is missing: a failure of ours, with its traceback
        raise UserError(
            "parallel.pipeline / parallel.data: this memtrain has no distributed pipeline driver "
            f"({PIPELINE_DRIVER}), so it trains on one device only; set both to 1") from None
    return module.run_pipeline


def run_distributed(cfg: Config, address: str | None = None, *, overwrite: bool = False,
                    print_fn: Callable[[str], None] = print) -> Any:
    """Train ``cfg`` on ``parallel.pipeline × parallel.data`` Ray workers: check the model has a
    block for every stage, join the cluster at ``address`` (else ``RAY_ADDRESS``, else start the
    embedded one), check it has a device per worker, and run the pipeline driver; returns what
    ``run_pipeline`` returns (per-step losses)."""
    num_blocks, model_name = _num_blocks(cfg)
    cfg.parallel.check_blocks(num_blocks, model_name)
    run_pipeline = _pipeline_runner()
    from memtrain.runtime import ray_cluster  # Ray, once the run is known to need it
    with ray_cluster.connected(address) as line:
        print_fn(f"memtrain: {line}")
        inventory = ray_cluster.cluster_inventory(cfg.cluster.network_gbps)
        slots = check_devices(cfg, inventory)
        assignments = [ray_cluster.Assignment.of_slot(rank, slot) for rank, slot in enumerate(slots)]
        print_fn(f"memtrain: {cfg.parallel.num_workers} workers on {inventory.describe()}")
        return run_pipeline(cfg=cfg, inventory=inventory, assignments=assignments, overwrite=overwrite,
                            print_fn=print_fn)
