"""``memtrain run`` over several devices: connect to Ray, read the cluster, choose the devices,
plan the pipeline over them, place one worker per device and hand over to the pipeline driver
(``runtime.pipeline_driver.run_pipeline``); the run directory gets the plan, the config, a
metrics line per step and checkpoints, and ``memtrain resume`` continues it.

``cli.py`` calls ``run_distributed`` when ``parallel.pipeline × parallel.data`` is more than 1
or the config leaves a choice to the planner; one worker trains in the calling process
(``train.train``), inside a Ray job too.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

from memtrain.config import Config, ConfigError
from memtrain.errors import UserError
from memtrain.planner.measured import planned_from_measured
from memtrain.runtime.planning import optimizer_spec, run_devices, run_dir
from memtrain.units import format_bytes, format_seconds

__all__ = ["run_distributed", "check_devices", "plan_run", "assignments_for", "PIPELINE_DRIVER"]

PIPELINE_DRIVER = "memtrain.runtime.pipeline_driver"
"""The module whose ``run_pipeline`` runs the workers (imported when a run needs it)."""


def _num_blocks(cfg: Config) -> tuple[int, str]:
    """The model's blocks (embedding, layers, head) and name, measured on the meta device."""
    from memtrain.planner.analyze import analyze

    stats = analyze(cfg.model, seq_len=cfg.train.seq_len, micro_batch_size=1, dtype=cfg.train.dtype)
    return len(stats.blocks), stats.name


def check_devices(cfg: Config, inventory: Any) -> list[int]:
    """Indices into ``inventory.slots`` of the ``parallel.pipeline × parallel.data`` devices the
    run uses: the first ones, or with data parallelism whole multiples of ``parallel.data`` of
    each kind (the most plentiful kinds first), so every replica can get the same devices.
    ``ConfigError`` naming both degrees and what the cluster has when it holds fewer."""
    p = cfg.parallel
    slots = inventory.slots
    if len(slots) < p.num_workers:
        raise ConfigError(
            f"parallel.pipeline × parallel.data: {p.pipeline} × {p.data} = {p.num_workers} workers need one device "
            f"each, but the Ray cluster has {len(slots)} ({inventory.describe()}); lower parallel.pipeline or "
            "parallel.data, or add nodes (in a cluster without GPUs each CPU Ray gives a node is a device)")
    return run_devices([slot.kind for slot in slots], p.pipeline, p.data)  # as 'memtrain plan' chooses


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


def _micro_batch_size(cfg: Config) -> int:
    """The micro-batch size the config fixes (``parallel.microbatches`` or ``train.micro_batch_size``);
    0 leaves it to the planner."""
    p, t = cfg.parallel, cfg.train
    if p.microbatches:
        return t.global_batch_size // (p.data * p.microbatches)
    return t.micro_batch_size


def _chosen_cluster(inventory: Any, chosen: list[int]) -> Any:
    """The planner's ``ClusterSpec`` of the devices the run uses (``chosen``: indices into
    ``inventory.slots``), node by node."""
    from memtrain.cluster.spec import ClusterSpec, NodeSpec

    wanted, start, nodes = set(chosen), 0, []
    for node in inventory.nodes:
        devices = tuple(dev for j, dev in enumerate(node.spec.devices) if start + j in wanted)
        start += len(node.slots)
        if devices:
            nodes.append(NodeSpec(name=node.spec.name, host=node.spec.host, devices=devices, nvme=node.spec.nvme))
    return ClusterSpec(nodes=tuple(nodes), network_gbps=inventory.spec.network_gbps, source="ray")


def plan_run(cfg: Config, inventory: Any, chosen: list[int], measured: Any = None) -> Any:
    """The pipeline plan of ``cfg`` over the devices ``chosen`` (indices into ``inventory.slots``;
    the heterogeneous planner, ``planner.hetero``): the config's degrees and schedule fixed, the
    partition balanced for the devices (or the config's ``parallel.partition``), the programs the
    workers run; ``measured`` (runtime.pipeline_probe) in place of the catalog's figures."""
    from memtrain.planner.analyze import analyze
    from memtrain.planner.hetero import plan_cluster
    from memtrain.planner.measured import MEASURED_SOURCE
    from memtrain.planner.pipeline import SCHEDULES

    par = cfg.parallel
    stats = analyze(cfg.model, seq_len=cfg.train.seq_len, micro_batch_size=1, dtype=cfg.train.dtype)
    plan = plan_cluster(
        stats, _chosen_cluster(inventory, chosen), name=cfg.name, global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=_micro_batch_size(cfg), dtype=cfg.train.dtype, optimizer=cfg.train.optimizer.name,
        safety_margin=cfg.memory.safety_margin, device_budget=cfg.memory.device, host_budget=cfg.memory.host,
        nvme_budget=cfg.memory.nvme, schedules=SCHEDULES if par.schedule == "auto" else (par.schedule,),
        pipeline_degree=par.pipeline or None, data_parallel_degree=par.data or None,
        num_microbatches=par.microbatches, stage_blocks=par.partition, activations=cfg.memory.activations,
        source=f"ray; {MEASURED_SOURCE}" if measured is not None else "ray", zero=par.zero, measured=measured,
        clip_grad_norm=cfg.train.max_grad_norm > 0, offload=cfg.memory.offload)
    if plan.pipeline is None or not plan.fits:
        raise ConfigError(f"the model does not fit the cluster's devices: {plan.shortfall}")
    if par.planner_chooses:
        return plan
    if len(plan.pipeline.stage_ranks) != cfg.parallel.num_stages:
        raise ConfigError(
            f"parallel.stages_per_rank: the planner runs {cfg.parallel.schedule} with "
            f"{len(plan.pipeline.stage_ranks) // cfg.parallel.pipeline} stage(s) per rank, the config asks for "
            f"{cfg.parallel.stages_per_rank}; set parallel.stages_per_rank to "
            f"{len(plan.pipeline.stage_ranks) // cfg.parallel.pipeline}")
    return plan


def _with_choices(cfg: Config, plan: Any) -> Config:
    """``cfg`` with what its ``parallel`` section left to the planner set to the plan's choice
    (what the run directory's config.json then says, so a resume runs the same)."""
    pipe = plan.pipeline
    parallel = dataclasses.replace(cfg.parallel, pipeline=pipe.pipeline_degree, data=pipe.data_parallel_degree,
                                   schedule=pipe.schedule_kind, microbatches=plan.train.num_microbatches,
                                   zero=cfg.parallel.zero if pipe.data_parallel_degree > 1 else 0)  # one copy: none
    train = dataclasses.replace(cfg.train, micro_batch_size=plan.train.micro_batch_size)
    return dataclasses.replace(cfg, parallel=parallel, train=train)


def assignments_for(plan: Any, inventory: Any, chosen: list[int]) -> list[Any]:
    """Per world rank, where it runs: a chosen slot of the node and device kind the plan gave it
    (of that kind on any node when the node is gone: a resumed run on a new cluster)."""
    from memtrain.runtime import ray_cluster

    free = [inventory.slots[i] for i in chosen]
    out = []
    for rp in plan.pipeline.ranks:
        node_ids = [n.node_id for n in inventory.nodes if n.spec.name == rp.node]
        i = next((i for i, s in enumerate(free) if s.node_id in node_ids and s.kind == rp.device.kind), None)
        if i is None:  # a resumed run's plan names the nodes of another cluster: its kind anywhere
            i = next((i for i, s in enumerate(free) if s.kind == rp.device.kind), None)
        if i is None:
            raise ConfigError(f"cluster: the plan puts rank {rp.rank} on a {rp.device.kind}, which the Ray cluster "
                              f"has no free one of ({inventory.describe()}); run on a cluster with the plan's devices")
        out.append(ray_cluster.Assignment.of_slot(rp.rank, free.pop(i)))
    return out


def run_distributed(cfg: Config, address: str | None = None, *, overwrite: bool = False,
                    print_fn: Callable[[str], None] = print, resume_from: Any = None, plan: Any = None) -> dict:
    """Train ``cfg`` on ``parallel.pipeline × parallel.data`` Ray workers: check the model has a
    block for every stage, join the cluster at ``address`` (else ``RAY_ADDRESS``, else start the
    embedded one), check it has a device per worker, plan the pipeline over those devices, place
    one worker per device and train, writing ``plan.json``, ``config.json``, a line per step to
    ``metrics.jsonl`` and checkpoints (``checkpoint`` section, SIGTERM/SIGINT, the end) in the
    run directory; returns a summary (losses, step times, plan). ``resume_from`` (a
    ``runtime.checkpoint.Loaded``) with the ``plan`` the run saved continues that run."""
    num_blocks, model_name = _num_blocks(cfg)
    cfg.parallel.check_blocks(num_blocks, model_name)
    if cfg.train.dtype == "fp16":
        raise ConfigError("train.dtype: the pipeline workers train in fp32 or bf16; fp16 needs a loss scale the ranks "
                          "agree on (not yet): set train.dtype: bf16, or parallel.pipeline and parallel.data to 1")
    from memtrain.runtime.train import check_run_dir, checkpoint_root

    out_dir = run_dir(cfg)
    if resume_from is None:
        check_run_dir(out_dir, overwrite, checkpoint_root(cfg))
    optimizer = optimizer_spec(cfg)  # param_groups by the whole model's names, refused before Ray starts
    run_pipeline = _pipeline_runner()
    from memtrain.runtime import ray_cluster  # Ray, once the run is known to need it
    from memtrain.runtime.stage_device import pins_cores
    with ray_cluster.connected(address) as line:
        print_fn(f"memtrain: {line}")
        inventory = ray_cluster.cluster_inventory(cfg.cluster.network_gbps)
        chooses = plan is None and cfg.parallel.planner_chooses
        chosen = list(range(len(inventory.slots))) if chooses else check_devices(cfg, inventory)
        measured = None
        # runtime.stage_device [Note: a worker per core]: on the embedded Ray, whose workers take every core
        pin = ray_cluster.embedded() and pins_cores(cfg.parallel.num_workers, 1)
        if plan is None:  # the figures to plan with (runtime.pipeline_probe; a resumed run has its plan)
            from memtrain.runtime.pipeline_probe import measured_for_run

            measured = measured_for_run(cfg, [inventory.slots[i].kind for i in chosen],
                                        [ray_cluster.Assignment.of_slot(r, inventory.slots[i])
                                         for r, i in enumerate(chosen[:2])], out_dir, print_fn,
                                        pin_cores=pin)
            plan = plan_run(cfg, inventory, chosen, measured)
        if chooses:  # over every device; the plan's choices then fixed
            cfg = _with_choices(cfg, plan)
            print_fn(f"memtrain: the planner chose {plan.pipeline.why or plan.pipeline.schedule_kind}")
        assignments = assignments_for(plan, inventory, chosen)
        return _train(cfg, plan, assignments, run_pipeline, out_dir, overwrite, print_fn,
                      f"{cfg.parallel.num_workers} workers on {inventory.describe()}", resume_from, optimizer,
                      measured, pin_cores=pin)


def stage_homes(cfg: Config, plan: Any) -> tuple[str, ...]:
    """Per stage, where its model states live between steps: ``memory.offload`` when it fixes
    one home, else (``auto``) the plan's choice for the stage (a stage whose policy moves chunks
    to NVMe: ``nvme``; to the host: ``host``; none: ``device``)."""
    n = len(plan.pipeline.stage_ranks)
    if cfg.memory.offload != "auto":
        homes = (cfg.memory.offload,) * n
    else:
        found = ["device"] * n
        for rp in plan.pipeline.ranks[: plan.pipeline.pipeline_degree]:
            for stage, policy in zip(rp.stages, rp.policies or (None,) * len(rp.stages)):
                chunk_homes = {str(c.home) for c in policy.chunks} if policy is not None else set()
                found[stage] = "nvme" if "nvme" in chunk_homes else "host" if "host" in chunk_homes else "device"
        homes = tuple(found)
    if "nvme" in homes and not cfg.parallel.nvme_dir:
        raise ConfigError("parallel.nvme_dir: stages keep their states on NVMe "
                          f"({'memory.offload: nvme' if cfg.memory.offload == 'nvme' else 'the plan puts them there'}); "
                          "set parallel.nvme_dir to a directory on each node's local NVMe")
    return homes


def stage_activations(cfg: Config, plan: Any) -> tuple[tuple[str, ...], ...]:
    """Per stage, per block of it, what it does with its saved activations: ``memory.activations``
    when it fixes one policy for every block, else (``auto``) the plan's per-stage policy
    (``RankPlan.policies``: planner.stage_cost [Note: offload within a stage]; a stage without
    one keeps them). Empty when every block keeps them."""
    partition = plan.pipeline.partition
    if cfg.memory.activations != "auto":
        acts = tuple((cfg.memory.activations,) * (e - b) for b, e in partition)
    else:
        found: list[tuple[str, ...]] = [("keep",) * (e - b) for b, e in partition]
        for rp in plan.pipeline.ranks[: plan.pipeline.pipeline_degree]:
            for stage, policy in zip(rp.stages, rp.policies or (None,) * len(rp.stages)):
                if policy is not None and len(policy.activations) == len(found[stage]):
                    found[stage] = tuple(str(p) for p in policy.activations)
        acts = tuple(found)
    if all(p == "keep" for ps in acts for p in ps):
        return ()
    if "swap_nvme" in {p for ps in acts for p in ps} and not cfg.parallel.nvme_dir:
        why = "memory.activations: swap_nvme" if cfg.memory.activations == "swap_nvme" else "the plan swaps them there"
        raise ConfigError(f"parallel.nvme_dir: stages swap activations to NVMe ({why}); "
                          "set parallel.nvme_dir to a directory on each node's local NVMe")
    return acts


def _train(cfg: Config, plan: Any, assignments: list[Any], run_pipeline: Callable[..., Any], out_dir: Path,
           overwrite: bool, print_fn: Callable[[str], None], where: str, resume_from: Any, optimizer: Any,
           measured: Any = None, pin_cores: bool = False) -> dict:
    from memtrain.planner import report
    from memtrain.runtime.checkpoint import Checkpointer
    from memtrain.runtime.train import (StopSignals, Stopped, checkpoint_root, lr_at, non_finite, remove_artifacts,
                                        step_lrs, truncate_metrics, write_config)

    report.print_summary(plan)
    pipe, train = plan.pipeline, plan.train
    homes = stage_homes(cfg, plan)
    offloaded = [s for s, h in enumerate(homes) if h != "device"]
    # the program that runs, PREFETCH, OFFLOAD and REDUCE_SCATTER included, is the one plan.json keeps
    from memtrain.planner.pipeline import add_clip_points, add_offload_points, add_reduce_scatter_points

    if offloaded:
        plan = dataclasses.replace(plan, schedule=add_offload_points(plan.schedule, offloaded))
    acts = stage_activations(cfg, plan)
    if acts:  # and its SWAP_OUT/SWAP_IN (runtime.stage_activations)
        from memtrain.planner.pipeline import add_swap_points

        plan = dataclasses.replace(plan, schedule=add_swap_points(plan.schedule, dict(enumerate(acts))))
    if cfg.parallel.zero == 2:
        plan = dataclasses.replace(plan, schedule=add_reduce_scatter_points(plan.schedule, range(len(homes))))
    if cfg.train.max_grad_norm:  # the norm exchange before the updates (runtime.stage_clip)
        plan = dataclasses.replace(plan, schedule=add_clip_points(plan.schedule))
    partition = tuple(e - b for b, e in pipe.partition)  # the config's parallel.partition when it sets one
    ckpt_root = checkpoint_root(cfg)
    start = resume_from.step if resume_from is not None else 0
    metrics_path = out_dir / "metrics.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume_from is None:
        if overwrite:
            remove_artifacts(out_dir, created=False, checkpoints=ckpt_root)
        plan.save(out_dir / "plan.json")
        write_config(out_dir / "config.json", cfg)
    else:
        truncate_metrics(metrics_path, start)
        print_fn(f"resuming after step {start} from {resume_from.path}")
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
    steps = cfg.train.steps
    offloaded = ", ".join(f"stage {i}: {h}" for i, h in enumerate(homes) if h != "device")
    moved = ", ".join(f"stage {i}: {'/'.join(sorted(set(ps)))}" for i, ps in enumerate(acts) if set(ps) != {"keep"})
    print_fn(f"memtrain: {where}; {pipe.schedule_kind}, partition {list(partition)}, "
             f"{train.num_microbatches} micro-batches of {train.micro_batch_size}"
             + (f"; states offloaded ({offloaded})" if offloaded else "")
             + (f"; activations {moved}" if moved else "")
             + (f"; ZeRO-{cfg.parallel.zero} over {pipe.data_parallel_degree} copies" if cfg.parallel.zero else "")
             + ("; each CPU worker bound to a core" if pin_cores else ""))
    print_fn(f"training {steps - start} steps of {tokens_per_step:,} tokens; run directory {out_dir}")
    checkpoints = Checkpointer(ckpt_root, keep=cfg.checkpoint.keep, compress=cfg.checkpoint.compress,
                               meta={"config": dataclasses.asdict(cfg), "pipeline": True})
    interval = cfg.checkpoint.interval_steps
    step_times: list[float] = []
    from memtrain.runtime.progress import StepProgress

    with (metrics_path.open("a") as metrics, StopSignals(print_fn) as stop,
          StepProgress(steps, start, print_fn) as progress):
        def on_step(k: int, loss: float, results: list[Any], dt: float) -> None:
            step_times.append(dt)
            peaks = [dict(r.peak_bytes) for r in results]
            finite = math.isfinite(loss)
            record = {"step": k + 1, "loss": loss if finite else None, "step_time_s": dt,
                      "tokens_per_s": tokens_per_step / dt, "lr": lr_at(k, cfg),
                      "predicted_step_time_s": plan.prediction.step_time_s,
                      "rank_step_time_s": [r.time_s for r in results], "rank_busy_s": [r.busy_s for r in results],
                      "rank_between_s": [r.between_s for r in results], "rank_core": [r.core for r in results],
                      "peak_bytes": peaks, "grad_bytes": [dict(r.grad_bytes) for r in results],
                      "rank_device": [r.device for r in results]}
            if cfg.train.optimizer.param_groups:
                record["group_lrs"] = list(step_lrs(k, cfg))
            if cfg.train.max_grad_norm:
                record["grad_norm"] = results[0].grad_norm  # before clipping, as one process logs it
            if not finite:
                record["non_finite_loss"] = str(loss)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if not finite:
                raise non_finite(loss, k + 1, cfg, metrics_path)
            host = max(p.get("host", 0) for p in peaks)
            progress.step(k + 1, f"step {k + 1:>5}/{steps}  loss {loss:.4f}  {dt:6.3f} s  "
                                 f"{tokens_per_step / dt:10,.0f} tok/s  peak per rank: host {format_bytes(host)}", loss)

        def save_after(done: int) -> bool:
            return stop.signum is not None or done == steps or bool(interval and done % interval == 0)

        def on_states(done: int, states: dict[int, dict]) -> None:
            checkpoints.save(done, {r: {"step": done, "worker": st} for r, st in states.items()}, copy=False)
            if stop.signum is not None:
                checkpoints.wait()
                raise Stopped(stop.signum, step=done, path=ckpt_root / f"step-{done:08d}")

        states = None
        if resume_from is not None:
            states = {r: st["worker"] for r, st in resume_from.states.items()}
        result = run_pipeline(
            model=cfg.model, schedule=pipe.schedule_kind, num_ranks=pipe.pipeline_degree, dp=pipe.data_parallel_degree,
            num_microbatches=train.num_microbatches, micro_batch_size=train.micro_batch_size,
            seq_len=cfg.train.seq_len, num_steps=steps, seed=cfg.train.seed, partition=partition,
            stages_per_rank=cfg.parallel.stages_per_rank, data=cfg.data, timeout_s=cfg.parallel.comm_timeout_s,
            step_timeout_s=max(cfg.parallel.comm_timeout_s * 2, 60.0), optimizer=optimizer,
            lr_at=lambda k: step_lrs(k, cfg), programs=plan.schedule, assignments=assignments, on_step=on_step,
            start_step=start, states=states, save_after=save_after, on_states=on_states, dtype=cfg.train.dtype,
            offload=homes, nvme_dir=(str(Path(cfg.parallel.nvme_dir) / f"memtrain-{cfg.name}")
                                     if cfg.parallel.nvme_dir else None), zero=cfg.parallel.zero, activations=acts,
            max_grad_norm=cfg.train.max_grad_norm or None, pin_cores=pin_cores)
        checkpoints.wait()
    if checkpoints.saved:
        print_fn(f"checkpoint {checkpoints.saved[-1]} ({checkpoints.seconds_blocked:.2f} s of training time spent on "
                 "checkpoints)")
    for line in closing_lines(plan, step_times, result):
        print_fn(line)
    return {"losses": list(result.losses), "step_times_s": step_times, "plan": plan, "result": result,
            "first_step": start + 1, "measured_step_time_s": _median_step(step_times),
            "predicted_step_time_s": plan.prediction.step_time_s,
            "predicted_from": "measured" if planned_from_measured(plan) else "catalog", "measured_costs": measured}


def _offload_memory_lines(plan: Any, result: Any, rank: int) -> list[str]:
    """A rank with offloaded stages: what their chunk stores held at most (after the first step),
    against the plan's figures for its pipeline rank (planner.stage_offload_cost [Note: an
    offloaded stage's residency]; bench/pipeline_offload_memory.py sets the rest against it)."""
    steps = result.peak_bytes[1:] or result.peak_bytes
    if not steps or rank >= len(steps[0]) or "offload_host" not in steps[0][rank]:
        return []
    pred = plan.prediction.devices[rank % plan.pipeline.pipeline_degree].peak_bytes
    parts = [f"host {format_bytes(max(s[rank]['offload_host'] for s in steps))} (predicted "
             f"{format_bytes(pred.get('host', 0))})"]
    if "nvme" in steps[0][rank]:
        parts.append(f"NVMe {format_bytes(max(s[rank]['nvme'] for s in steps))} (predicted "
                     f"{format_bytes(pred.get('nvme', 0))})")
    parts.append(f"device buffers {format_bytes(max(s[rank]['offload_device'] for s in steps))}")
    return [f"  offloaded states, measured: {', '.join(parts)}"]


def _median_step(step_times: list[float]) -> float:
    """The median step time after the first step, which warms up."""
    import statistics

    return statistics.median(step_times[1:] or step_times) if step_times else 0.0


def closing_lines(plan: Any, step_times: list[float], result: Any) -> list[str]:
    """Measured against predicted: the median step time (after the first step, which warms up),
    with what the prediction was made from (costs measured on the workers, runtime.pipeline_probe,
    or the catalog's figures), and, per rank, its share of the step spent idle (waiting on its peers)."""
    import statistics

    timed = step_times[1:] or step_times
    got = _median_step(step_times)
    predicted = plan.prediction.step_time_s
    source = "costs measured on the workers" if planned_from_measured(plan) else "the catalog's figures"
    lines = [f"step time: measured {format_seconds(got)} (median of {len(timed)}), predicted "
             f"{format_seconds(predicted)} from {source} ({got / predicted:.2f}x)" if predicted else
             f"step time: measured {format_seconds(got)} (median of {len(timed)})"]
    per_rank = list(zip(*result.step_times_s[1:] or result.step_times_s))
    ranks = {rp.rank: rp for rp in plan.pipeline.ranks}
    for rank, times in enumerate(per_rank):
        node = f" on {result.nodes[rank]}" if rank < len(result.nodes) else ""
        device = result.devices[rank] if rank < len(result.devices) else "?"
        rp = ranks.get(rank)
        busy = statistics.median(b[rank] for b in (result.busy_s[1:] or result.busy_s))
        step = statistics.median(times)
        waits = [b[rank] for b in result.between_s[1:]]
        between = f", {format_seconds(statistics.median(waits))} between steps" if waits else ""
        lines.append(f"rank {rank}{node} ({device}): busy {format_seconds(busy)} of its {format_seconds(step)} step, "
                     f"idle {1 - busy / step:.0%} measured{between}; predicted busy "
                     f"{format_seconds(rp.busy_s + rp.optimizer_s if rp else 0.0)}, "
                     f"idle {rp.bubble_fraction if rp else 0.0:.0%}")
        lines += _offload_memory_lines(plan, result, rank)
        if rp is not None and rp.device.kind != "cpu" and device == "cpu":
            lines.append(f"  note: rank {rank} computed on the CPU although the plan puts it on a {rp.device.kind}: torch "
                         "in its worker sees no GPU (CUDA_VISIBLE_DEVICES, the driver, or a simulated device)")
    return lines
