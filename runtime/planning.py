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

__all__ = ["plan_from_config", "plan_cluster_from_config", "profile_for", "budgets_for", "run_dir"]


def run_dir(cfg: Config) -> Path:
    return Path(cfg.run_dir.replace("{name}", cfg.name))


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
    )
    return dataclasses.replace(plan, source_notes=tuple(notes)) if notes else plan


def plan_cluster_from_config(cfg: Config, *, pipeline_degree: int | None = None,
                             data_parallel_degree: int | None = None, schedules: tuple[str, ...] | None = None) -> Plan:
    """A pipeline plan of ``cfg`` over every device its cluster lists (planner.hetero): the
    degrees, device order, partition, schedule and micro-batches chosen for the shortest
    predicted step; ``pipeline_degree``, ``data_parallel_degree`` and ``schedules`` fix those
    choices (the config's ``parallel`` section). Figures from the catalog or this machine; a
    profile measures one machine, so none is applied here."""
    from memtrain.cluster.inventory import resolve_cluster
    from memtrain.planner.analyze import analyze
    from memtrain.planner.hetero import plan_cluster
    from memtrain.planner.pipeline import SCHEDULES

    cluster = resolve_cluster(cfg.cluster)
    stats = analyze(cfg.model, seq_len=cfg.train.seq_len, micro_batch_size=1, dtype=cfg.train.dtype)
    return plan_cluster(
        stats, cluster, name=cfg.name, global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size, dtype=cfg.train.dtype, optimizer=cfg.train.optimizer.name,
        safety_margin=cfg.memory.safety_margin, device_budget=cfg.memory.device, host_budget=cfg.memory.host,
        nvme_budget=cfg.memory.nvme, schedules=schedules or SCHEDULES, pipeline_degree=pipeline_degree,
        data_parallel_degree=data_parallel_degree, source=cluster.source)


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
