"""The heterogeneous planner: one model over many devices of different speed and memory.

``plan_cluster`` chooses the pipeline and data-parallel degrees, the order of the device groups
along the pipeline, a contiguous partition of the blocks into stages, the schedule and the
micro-batch size and count, minimising the predicted step time (Metis, Um et al. 2024;
Cephalo, Guo et al. 2024):

1. every shape of planner.partition (degrees, device order, micro-batch, schedule) gets a lower
   bound; they are visited best bound first and one whose bound exceeds the best estimate so
   far by ``PRUNE_MARGIN`` is skipped;
2. the others are partitioned by dynamic programming over the blocks with memoised stage costs
   (planner.partition [Note: partition by dynamic programming]; the cost of a stage on its
   device, its states offloaded whole where the device is short, is planner.stage_cost's), so
   faster devices get more blocks and a stage that does not fit offloads or gives blocks away,
   whichever the model predicts faster;
3. the ``NUM_SIMULATED`` best estimates are refined and simulated over their ranks and links
   (planner.hetero_plan [Note: pipeline step]); the fastest that fits is the plan, the others
   its runners-up with the deciding difference.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from memtrain.cluster.spec import ClusterSpec
from memtrain.errors import UserError
from memtrain.planner import pipeline
from memtrain.planner.hetero_plan import build_plan, simulate_candidate
from memtrain.planner.measured import MeasuredPipeline
from memtrain.planner.partition import (
    Candidate, device_groups, flat_devices, layout, partition, shapes, stage_budgets,
)
from memtrain.planner.plan import Plan, TrainShape
from memtrain.planner.stage_cost import StageModel
from memtrain.planner.stage_estimate import StageBudget
from memtrain.planner.stats import DType, ModelStats, Optimizer

__all__ = ["plan_cluster", "NUM_SIMULATED", "MAX_SIMULATED", "PRUNE_MARGIN"]

NUM_SIMULATED = 4
"""Candidates simulated over their ranks after the estimate ranks them."""
MAX_SIMULATED = 12
"""Candidates simulated at most when the best ones do not fit once simulated."""
PRUNE_MARGIN = 0.15
"""A shape whose lower bound is this much above the best estimate is not partitioned (the
estimate's bubble is the equal-stage one, so it can be off by about this much)."""


def plan_cluster(
    stats: ModelStats,
    cluster: ClusterSpec,
    *,
    name: str,
    global_batch_size: int,
    dtype: DType | str,
    optimizer: Optimizer | str,
    micro_batch_size: int = 0,
    safety_margin: float = 0.1,
    device_budget: int | None = None,
    host_budget: int | None = None,
    nvme_budget: int | None = None,
    schedules: Sequence[str] = pipeline.SCHEDULES,
    pipeline_degree: int | None = None,
    data_parallel_degree: int | None = None,
    num_microbatches: int = 0,
    stage_blocks: Sequence[int] | None = None,
    source: str = "catalog",
    max_alternatives: int = 5,
    activations: str = "auto",
    zero: int = 0,
    clip_grad_norm: bool = False,
    measured: MeasuredPipeline | None = None,
    offload: str = "auto",
) -> Plan:
    """The fastest predicted pipeline plan of ``stats`` (analysed at micro-batch size 1) over
    every device of ``cluster`` (see the module doc). ``device_budget`` caps each device's
    memory, ``host_budget`` and ``nvme_budget`` each node's (config ``memory.device``/``host``/
    ``nvme``); each is used less ``safety_margin``, a node's host and NVMe shared evenly by
    its devices. ``pipeline_degree``/``data_parallel_degree``, ``num_microbatches`` (per
    replica) and ``stage_blocks`` (blocks per stage, in order) fix those choices (config:
    ``parallel`` section); ``activations`` (config ``memory.activations``) fixes every block's
    activation policy in every stage (``auto``: keep, or recompute where a stage is short);
    ``zero`` (``parallel.zero``) shards the states of each shape's data-parallel copies
    (planner.stage_cost [Note: ZeRO in a stage's estimate]; ZeRO-2's reduce under the last
    backward, planner.hetero_plan); ``clip_grad_norm`` (``train.max_grad_norm``): every rank's
    programs get their ``CLIP``, costed as the collective it is (planner.hetero_plan [Note:
    pipeline step]); ``measured`` (runtime.pipeline_probe) replaces the catalog's figures for the
    devices of its kind, their links and the step's own time (planner.measured [Note: measured
    pipeline]); ``offload`` (``memory.offload``) other than ``auto`` puts every stage's model
    states there (planner.stage_offload_cost [Note: an offloaded stage's residency]). Raises ``UserError`` naming what does not fit when nothing does."""
    dtype, optimizer = DType(dtype), Optimizer(optimizer)
    devices = flat_devices(cluster)
    _check(stats, cluster, devices, global_batch_size, micro_batch_size, dtype, safety_margin, schedules,
           pipeline_degree, data_parallel_degree)
    fixed = _fixed_partition(stats, stage_blocks, schedules, pipeline_degree)
    base = stats.scaled(1) if stats.micro_batch_size != 1 else stats
    groups = device_groups(devices)
    counts: dict[str, list[int]] = {}
    for idx, (_, dev) in enumerate(devices):
        counts.setdefault(groups[dev], []).append(idx)
    budgets = stage_budgets(cluster, devices, safety_margin, device_budget, host_budget, nvme_budget)
    models: dict[tuple[int, int], StageModel] = {}
    candidates: list[Candidate] = []
    for shape in shapes(base, counts, global_batch_size, micro_batch_size, schedules, pipeline_degree,
                        data_parallel_degree, num_microbatches):
        key = (shape.micro_batch_size, shape.data_parallel if zero else 1)
        if key not in models:
            train = TrainShape(global_batch_size=global_batch_size, micro_batch_size=shape.micro_batch_size,
                               num_microbatches=shape.num_microbatches, seq_len=base.seq_len, dtype=dtype,
                               optimizer=optimizer, clip_grad_norm=clip_grad_norm)
            models[key] = StageModel(base.scaled(shape.micro_batch_size), train, activations, shards=key[1], zero=zero,
                                     measured=measured, home=offload)
        cand = layout(shape, counts, devices, cluster, budgets, models[key])
        if cand is not None:
            cand.fixed = fixed
            candidates.append(cand)
    candidates.sort(key=lambda c: c.bound_s)
    best_s = math.inf
    for cand in candidates:
        if cand.bound_s > best_s * (1 + PRUNE_MARGIN):
            cand.problem = cand.problem or "pruned"
            continue
        partition(cand)
        if not cand.problem:
            best_s = min(best_s, cand.estimate_s)
    ranked = sorted((c for c in candidates if not c.problem), key=lambda c: c.estimate_s)
    if not candidates and num_microbatches:
        raise UserError(f"parallel.microbatches: {num_microbatches} micro-batches split no data-parallel share of "
                        f"train.global_batch_size {global_batch_size} over the cluster's {len(devices)} devices into "
                        "whole micro-batches (of train.micro_batch_size, when set); choose another count, or 0 to let "
                        "the planner choose")
    if not ranked:
        raise UserError(_nothing_fits(candidates, cluster))
    # the best estimates, and past them until one fits (a refined stage may not fit after all)
    simulated = []
    for c in ranked[:MAX_SIMULATED]:
        if len(simulated) >= NUM_SIMULATED and any(s.fits for s in simulated):
            break
        sim = simulate_candidate(c, cluster)
        simulated.append(sim if sim.fits else _tighter(c, sim, cluster) or sim)
    return build_plan(name, base, cluster, simulated, ranked, candidates, source, max_alternatives)


def _tighter(cand: Candidate, sim, cluster: ClusterSpec):
    """[Note: a simulated rank over its budget] A stage's estimate leaves out the boundary tensors
    its rank receives and sends (planner.simulate_pipeline [Note: received buffers], [Note: sent
    tensors]), which only the simulation places; where they take a rank past its device budget,
    the candidate is partitioned once more with that rank's stages given its budget less the
    excess (so a stage there recomputes, offloads or gives blocks away), and simulated again.
    The simulation that fits, else None (a fixed partition is kept as given)."""
    over = {r: need - cand.ranks[r][4].device for r, need in enumerate(sim.device_bytes)
            if need > cand.ranks[r][4].device}
    if not over or cand.fixed or cand.model is None:
        return None
    ranks = [(n, d, h, v, dataclasses.replace(b, device=b.device - over.get(r, 0)))
             for r, (n, d, h, v, b) in enumerate(cand.ranks)]
    k = cand.shape.stages_per_rank
    where = [cand.model.place(ranks[r][1], ranks[r][2], ranks[r][3],
                              StageBudget(device=ranks[r][4].device // k, host=ranks[r][4].host // k,
                                          nvme=ranks[r][4].nvme // k)) for r in cand.stage_ranks]
    again = dataclasses.replace(cand, ranks=ranks, where=where, partition=(), estimates=[], estimate_s=math.inf,
                                problem="")
    partition(again)
    if again.problem:
        return None
    # the budgets the simulation checks are the devices' own
    again.ranks = cand.ranks
    redone = simulate_candidate(again, cluster)
    return redone if redone.fits else None


def _check(stats: ModelStats, cluster: ClusterSpec, devices, global_batch_size: int, micro_batch_size: int,
           dtype: DType, safety_margin: float, schedules: Sequence[str], pipeline_degree: int | None,
           data_parallel_degree: int | None) -> None:
    if not devices:
        raise UserError("cluster.nodes[].devices: the cluster lists no device; list at least one")
    if global_batch_size < 1:
        raise UserError(f"train.global_batch_size: must be >= 1, got {global_batch_size}")
    if micro_batch_size < 0 or (micro_batch_size and global_batch_size % micro_batch_size):
        raise UserError(f"train.micro_batch_size: must divide train.global_batch_size ({global_batch_size}), "
                        f"got {micro_batch_size}; use 0 to let the planner choose")
    if not 0 <= safety_margin < 1:
        raise UserError(f"memory.safety_margin: must be in [0, 1), got {safety_margin}")
    if DType(stats.dtype) is not dtype:
        raise ValueError(f"train.dtype: the model was analysed in {stats.dtype}, not {dtype}; analyse it in {dtype}")
    for i, node in enumerate(cluster.nodes):
        for dev in node.devices:
            if dev.peak_flops(str(dtype)) <= 0:
                raise UserError(f"train.dtype: {dev.kind} on cluster.nodes[{i}] ({node.name}) has no {dtype} "
                                "throughput; choose another dtype or leave that device out")
    unknown = [s for s in schedules if s not in pipeline.SCHEDULES]
    if unknown or not schedules:
        raise UserError(f"parallel.schedule: must be among {', '.join(pipeline.SCHEDULES)}, got {list(schedules)}")
    n = len(devices)
    if data_parallel_degree is not None and (data_parallel_degree < 1 or n % data_parallel_degree):
        raise UserError(f"parallel.data: must divide the {n} devices, got {data_parallel_degree}")
    if pipeline_degree is not None and (pipeline_degree < 1 or n % pipeline_degree
                                        or pipeline_degree > len(stats.blocks)):
        raise UserError(f"parallel.pipeline: must divide the {n} devices and be at most the model's "
                        f"{len(stats.blocks)} blocks, got {pipeline_degree}")


def _fixed_partition(stats: ModelStats, stage_blocks: Sequence[int] | None, schedules: Sequence[str],
                     pipeline_degree: int | None) -> tuple[tuple[int, int], ...]:
    """``stage_blocks`` as (first, end) block ranges, checked against the model and the fixed shape."""
    if stage_blocks is None:
        return ()
    if pipeline_degree is None or len(schedules) != 1:
        raise UserError("parallel.partition: fixes the blocks of each stage, so it needs a fixed parallel.pipeline "
                        "and parallel.schedule; set both, or remove the partition")
    stages = pipeline_degree * (2 if schedules[0] in ("interleaved-1f1b", "v-half", "v-min") and pipeline_degree > 1
                                else 1)
    n = len(stats.blocks)
    if len(stage_blocks) != stages or min(stage_blocks, default=0) < 1 or sum(stage_blocks) != n:
        raise UserError(f"parallel.partition: {schedules[0]} over {pipeline_degree} ranks has {stages} stages over the "
                        f"model's {n} blocks (embedding, layers, head); give {stages} counts of at least 1 that add "
                        f"up to {n}, got {list(stage_blocks)}")
    ends = [sum(stage_blocks[:i + 1]) for i in range(len(stage_blocks))]
    return tuple(zip([0] + ends[:-1], ends))


def _nothing_fits(candidates: Sequence[Candidate], cluster: ClusterSpec) -> str:
    tried = [c for c in candidates if c.problem and c.problem != "pruned"]
    num_devices = sum(len(n.devices) for n in cluster.nodes)
    if not tried:
        return (f"cluster: no pipeline shape fits the model over the {num_devices} devices (check "
                "train.global_batch_size against the devices and the model's blocks)")
    # the candidate that came closest: the most pipeline stages spread the model thinnest
    closest = max(tried, key=lambda c: (c.shape.pipeline, -c.shape.micro_batch_size))
    if closest.fixed:
        return (f"parallel.partition: {closest.problem} ({closest.shape.describe()}); give that stage fewer blocks, "
                "or remove the partition to let the planner balance the stages")
    return (f"the model does not fit the cluster's {num_devices} devices even in the thinnest pipeline "
            f"({closest.shape.describe()}): {closest.problem}; add devices, host memory or an NVMe path "
            "(cluster.nodes[].nvme), or lower train.seq_len")
