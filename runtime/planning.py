"""From a Config to a Plan: resolve the cluster, analyse the model, search (no Ray here)."""

from __future__ import annotations

from pathlib import Path

from memtrain.planner.plan import Plan
from memtrain.units import format_bytes
from memtrain.planner.profile_inputs import apply_profile
from memtrain.planner.profile_format import (
    Profile, ProfileError, find_profile, load_profile, model_mismatch, other_machine, profile_flag,
)
from memtrain.config import Config, ConfigError
from memtrain.optimizers import OptimizerSpec

__all__ = ["optimizer_spec", "param_names", "plan_config", "plans_a_cluster", "run_devices", "plan_from_config",
           "plan_cluster_from_config", "profile_for", "budgets_for", "run_dir"]


def run_dir(cfg: Config) -> Path:
    return Path(cfg.run_dir.replace("{name}", cfg.name))


def param_names(cfg: Config) -> tuple[str, ...]:
    """The model's trainable parameters by ``named_parameters()`` name, in its order, built on the
    meta device (no weights): the names ``train.optimizer.param_groups`` use. For the built-in gpt
    they are the pipeline's too (``models.gpt_blocks.param_names``: ``blocks.<i>.<name>``)."""
    import torch

    from memtrain.models import build_model

    with torch.device("meta"):
        built = build_model(cfg.model, max_seq_len=cfg.train.seq_len)
    return tuple(n for n, q in built.module.named_parameters() if q.requires_grad)


def optimizer_spec(cfg: Config, names: tuple[str, ...] | None = None) -> OptimizerSpec:
    """``train.optimizer`` as ``wrap()`` and ``run_pipeline`` take it (``OptimizerSpec``), its
    ``param_groups`` resolved against ``names`` (default: ``param_names(cfg)``); a group naming no
    parameter, or a parameter in no group, is a ``ConfigError`` naming the field."""
    opt = cfg.train.optimizer
    if opt.param_groups and names is None:
        names = param_names(cfg)
    return opt.spec(names)


def budgets_for(cfg: Config, device, host, nvme) -> dict[str, int]:
    """Per-tier budgets: the config's ``memory`` section, else the hardware's capacity."""
    if device.kind == "cpu":
        # [Note: CPU as device] On a CPU-only machine the device tier and the host tier are the
        # same RAM: split it (half each by default) and refuse budgets that add up to more.
        device_budget = cfg.memory.device if cfg.memory.device is not None else host.memory_bytes // 2
        if device_budget > host.memory_bytes:
            raise ConfigError(
                f"memory.device: {format_bytes(device_budget)} is more than this machine's "
                f"{format_bytes(host.memory_bytes)} of RAM (the device tier of a CPU-only machine); lower it"
            )
        host_budget = cfg.memory.host if cfg.memory.host is not None else max(host.memory_bytes - device_budget, 0)
        if device_budget + host_budget > host.memory_bytes:
            raise ConfigError(
                f"memory.host: device ({format_bytes(device_budget)}) + host ({format_bytes(host_budget)}) budgets "
                f"exceed this machine's {format_bytes(host.memory_bytes)} of RAM, which both tiers share on a "
                "CPU-only machine; lower one"
            )
    else:
        device_budget = cfg.memory.device if cfg.memory.device is not None else device.memory_bytes
        host_budget = cfg.memory.host if cfg.memory.host is not None else host.memory_bytes
    if nvme is None:
        if cfg.memory.nvme:
            raise ConfigError(
                "memory.nvme: a budget is set but no NVMe path is configured; "
                "add cluster.nodes[].nvme.path (or remove memory.nvme)"
            )
        nvme_budget = 0
    else:
        nvme_budget = cfg.memory.nvme if cfg.memory.nvme is not None else nvme.capacity_bytes
    if device_budget > device.memory_bytes:
        raise ConfigError(
            f"memory.device: budget {format_bytes(device_budget)} exceeds the {device.kind}'s memory "
            f"({format_bytes(device.memory_bytes)}); lower it or leave it unset"
        )
    return {"device": device_budget, "host": host_budget, "nvme": nvme_budget}


def plan_from_config(cfg: Config, *, profile_path: str | None = None) -> Plan:
    """Plan ``cfg`` with the figures of ``profile_path``, else of the run directory's profile when
    it was measured on this machine for this model, else of the catalog. What the plan's figures
    come from, and anything wrong with them (a profile skipped and why, one from another machine,
    one measured under load), is in ``Plan.source`` and ``Plan.source_notes``."""
    import dataclasses

    from memtrain.cluster.inventory import resolve_cluster
    from memtrain.planner.analyze import analyze
    from memtrain.planner.search import plan as search_plan

    cluster = resolve_cluster(cfg.cluster)
    node = cluster.nodes[0]
    device, host, nvme = node.devices[0], node.host, node.nvme
    source = cluster.source
    stats = analyze(cfg.model, seq_len=cfg.train.seq_len, micro_batch_size=1, dtype=cfg.train.dtype)
    path, prof, notes = profile_for(cfg, profile_path)
    if prof is not None:
        stats, device, host, nvme = apply_profile(prof, stats, device, host, nvme)
        source = f"profile:{path}"
    plan = search_plan(
        stats,
        name=cfg.name,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        dtype=cfg.train.dtype,
        optimizer=cfg.train.optimizer.name,
        device=device,
        host=host,
        nvme=nvme,
        budgets=budgets_for(cfg, device, host, nvme),
        safety_margin=cfg.memory.safety_margin,
        source=source,
        chunk_size_elems=cfg.memory.chunk_elems,
        prefetch_depth=cfg.memory.prefetch_depth,
        offload=cfg.memory.offload,
        activations=cfg.memory.activations,
        clip_grad_norm=cfg.train.max_grad_norm > 0,
    )
    return dataclasses.replace(plan, source_notes=tuple(notes)) if notes else plan


def plans_a_cluster(cfg: Config, num_devices: int) -> bool:
    """[Note: which planner] ``memtrain plan`` plans a pipeline over the cluster when the config
    asks for more than one worker (``parallel.pipeline × parallel.data > 1``), or leaves a degree
    to the planner (0, ``parallel: auto``) over a cluster of ``num_devices`` > 1; else one device."""
    p = cfg.parallel
    if max(p.pipeline, 1) * max(p.data, 1) > 1:
        return True
    return (p.pipeline == 0 or p.data == 0) and num_devices > 1


def plan_config(cfg: Config, *, profile_path: str | None = None) -> Plan:
    """The plan ``memtrain plan`` shows: a cluster plan or a one-device plan ([Note: which planner]).
    The optimizer's ``param_groups`` are checked against the model first, as ``memtrain run`` does."""
    from memtrain.cluster.inventory import resolve_cluster

    optimizer_spec(cfg)

    cluster = resolve_cluster(cfg.cluster)
    if not plans_a_cluster(cfg, sum(len(n.devices) for n in cluster.nodes)):
        return plan_from_config(cfg, profile_path=profile_path)
    if profile_path is not None:
        raise ConfigError("--profile: a measured profile describes one device of one machine, and this config plans "
                          "a pipeline over the cluster (parallel section) with the catalog's figures; drop --profile, "
                          "or set parallel.pipeline and parallel.data to 1 to plan one device with it")
    return plan_cluster_from_config(cfg, cluster=cluster)


def plan_cluster_from_config(cfg: Config, *, pipeline_degree: int | None = None,
                             data_parallel_degree: int | None = None, schedules: tuple[str, ...] | None = None,
                             cluster=None) -> Plan:
    """A pipeline plan of ``cfg`` over the devices of its cluster (planner.hetero): the degrees,
    device order, partition, schedule and micro-batches chosen for the shortest predicted step.
    The config's ``parallel`` section fixes what it sets: degrees other than 0 (the first
    ``pipeline × data`` devices ``memtrain run`` would use are planned over when both are fixed), a
    schedule other than ``auto``, ``microbatches`` and ``partition``; ``pipeline_degree``,
    ``data_parallel_degree`` and ``schedules`` override it. Figures from the catalog or this
    machine; a profile measures one device, so none is applied here, but a pipeline's measured
    costs are when ``parallel.profile`` names the file a run kept (planner.measured)."""
    import dataclasses

    from memtrain.cluster.inventory import resolve_cluster
    from memtrain.planner.analyze import analyze
    from memtrain.planner.hetero import plan_cluster

    par = cfg.parallel
    pipeline_degree = pipeline_degree or par.pipeline or None
    data_parallel_degree = data_parallel_degree or par.data or None
    schedules = schedules or _schedules(cfg)
    cluster = cluster if cluster is not None else resolve_cluster(cfg.cluster)
    notes: list[str] = []
    if pipeline_degree and data_parallel_degree:
        cluster, notes = _devices_for(cluster, pipeline_degree * data_parallel_degree, cfg)
    stats = analyze(cfg.model, seq_len=cfg.train.seq_len, micro_batch_size=1, dtype=cfg.train.dtype)
    from memtrain.planner.measured import MEASURED_FILE, MEASURED_SOURCE, load_measured

    measured, source = None, cluster.source
    if par.profile_file is not None:
        from memtrain.planner.profile_format import model_key

        measured = load_measured(par.profile_file)
        why = measured.mismatch(model_key(cfg.model, cfg.train.seq_len, cfg.train.dtype))
        if why:
            raise ConfigError(f"parallel.profile: {par.profile_file} was {why}, not this config's; set "
                              "parallel.profile: auto (a run measures) or catalog")
        source = f"{cluster.source}; {MEASURED_SOURCE} ({par.profile_file})"
    elif par.profile == "measure" or (par.profile == "auto" and all(d.kind == "cpu" for n in cluster.nodes
                                                                     for d in n.devices)):
        notes.append(f"'memtrain run' measures the workers first (parallel.profile: {par.profile}) and plans with "
                     f"what it measures; parallel.profile: {run_dir(cfg) / MEASURED_FILE} plans with a "
                     "run's figures here")
    plan = plan_cluster(
        stats, cluster, name=cfg.name, global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size, dtype=cfg.train.dtype, optimizer=cfg.train.optimizer.name,
        safety_margin=cfg.memory.safety_margin, device_budget=cfg.memory.device, host_budget=cfg.memory.host,
        nvme_budget=cfg.memory.nvme, schedules=schedules, pipeline_degree=pipeline_degree,
        data_parallel_degree=data_parallel_degree, num_microbatches=par.microbatches, stage_blocks=par.partition,
        source=source, activations=cfg.memory.activations, zero=par.zero, measured=measured,
        clip_grad_norm=cfg.train.max_grad_norm > 0, offload=cfg.memory.offload)
    return dataclasses.replace(plan, source_notes=tuple(notes)) if notes else plan


def run_devices(kinds: list[str], pipeline: int, data: int) -> list[int]:
    """Indices of the ``pipeline × data`` devices (of ``kinds``, node by node) a run with these
    degrees uses, as ``runtime.distributed.check_devices`` chooses Ray's device slots: the first
    ones, or with data parallelism whole multiples of ``data`` of each kind (the most plentiful
    kinds first) so every replica can get the same devices, else the first ones."""
    need = pipeline * data
    first = list(range(need))
    if data == 1:
        return first
    by_kind: dict[str, list[int]] = {}
    for i, kind in enumerate(kinds):
        by_kind.setdefault(kind, []).append(i)
    chosen = []
    for kind in sorted(by_kind, key=lambda k: -len(by_kind[k])):
        take = min(len(by_kind[kind]) // data * data, need)
        take -= take % data
        chosen += by_kind[kind][:take]
        need -= take
    return sorted(chosen) if need == 0 else first


def _schedules(cfg: Config) -> tuple[str, ...]:
    """The schedules to weigh: the config's, or with ``auto`` every one the planner lays out."""
    from memtrain.planner.pipeline import SCHEDULES

    par = cfg.parallel
    if par.schedule == "interleaved-1f1b" and par.stages_per_rank != 2:
        raise ConfigError(f"parallel.stages_per_rank: the planner lays interleaved-1f1b out with 2 stages per rank, "
                          f"got {par.stages_per_rank}; set it to 2 to plan it, or choose another parallel.schedule")
    if par.schedule != "auto":
        return (par.schedule,)
    return tuple(s for s in SCHEDULES if s != "interleaved-1f1b" or par.stages_per_rank == 2)


def _devices_for(cluster, num_workers: int, cfg: Config):
    """The cluster cut to the ``num_workers`` devices a run with fixed degrees uses
    (``run_devices``), and a note saying so. This machine's CPU alone (``cluster: auto`` without
    a GPU) is shared by the workers as Ray's CPU workers share it: each gets 1/n of its compute
    and of each half of its RAM ([Note: CPU as device])."""
    import dataclasses

    from memtrain.cluster.spec import ClusterSpec

    devices = [(i, d) for i, node in enumerate(cluster.nodes) for d in node.devices]
    n = len(devices)
    if n == 1 and devices[0][1].kind == "cpu" and cfg.cluster.auto:
        node, cpu = cluster.nodes[0], devices[0][1]
        share = dataclasses.replace(
            cpu, name=f"{cpu.name}, 1/{num_workers}", memory_bytes=cpu.memory_bytes // (2 * num_workers),
            bf16_flops=cpu.bf16_flops / num_workers, fp16_flops=cpu.fp16_flops / num_workers,
            fp32_flops=cpu.fp32_flops / num_workers)
        host = dataclasses.replace(node.host, memory_bytes=node.host.memory_bytes // 2)
        node = dataclasses.replace(node, host=host, devices=(share,) * num_workers)
        note = (f"this machine's CPU shared by the {num_workers} workers (parallel.pipeline × parallel.data): "
                f"each 1/{num_workers} of its compute and of each half of its RAM")
        return dataclasses.replace(cluster, nodes=(node,)), [note]
    if n < num_workers:
        p = cfg.parallel
        raise ConfigError(
            f"parallel.pipeline × parallel.data: {p.pipeline} × {p.data} = {num_workers} workers need one device each, "
            f"but the cluster lists {n}; lower parallel.pipeline or parallel.data, set them to 0 to let the planner "
            "choose, or list more devices under cluster.nodes")
    if n == num_workers:
        return cluster, []
    chosen = set(run_devices([d.kind for _, d in devices], cfg.parallel.pipeline, cfg.parallel.data))
    nodes, k = [], 0
    for node in cluster.nodes:
        kept = tuple(d for j, d in enumerate(node.devices) if k + j in chosen)
        k += len(node.devices)
        if kept:
            nodes.append(dataclasses.replace(node, devices=kept))
    note = (f"planned over {num_workers} of the cluster's {n} devices, those 'memtrain run' would use "
            "(parallel.pipeline × parallel.data; 0 for either lets the planner use them all)")
    return ClusterSpec(nodes=tuple(nodes), network_gbps=cluster.network_gbps, source=cluster.source), [note]


def profile_for(cfg: Config, profile_path: str | None = None) -> tuple[str | None, Profile | None, list[str]]:
    """(path, profile, notes) of the profile to plan ``cfg`` with: ``profile_path`` when given (one
    measured for another model or shape is refused, one from another machine is used with a
    note naming both machines), else the run directory's when it matches (else a note saying
    which file was skipped and why). The notes also carry the profile's own warnings."""
    notes: list[str] = []
    if profile_path is not None:
        prof = load_profile(profile_path)
        why = model_mismatch(prof, cfg.model, cfg.train.seq_len, cfg.train.dtype)
        if why:
            raise ProfileError(f"--profile {profile_path}: {why}; profile this config with 'memtrain profile CONFIG' "
                               "(or plan without --profile)")
        other = other_machine(prof)
        if other:
            notes.append(f"{profile_path} was {other}: its figures may not hold here; "
                         "'memtrain profile CONFIG' measures this machine")
        path = profile_path
    else:
        found = find_profile(run_dir(cfg), cfg.model, cfg.train.seq_len, cfg.train.dtype)
        if found.skipped:
            notes.append(found.skipped)
        prof, path = found.profile, (str(found.path) if found.path else None)
    flag = profile_flag(prof) if prof is not None else ""
    if flag:
        notes.append(f"profile flagged: {flag}; re-run 'memtrain profile CONFIG' on a quiet machine")
    return path, prof, notes
