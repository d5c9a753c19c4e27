"""The search: enumerate memory policies for one device, prune, simulate, pick the fastest that fits.

docs/DESIGN.md data flow: ``planner.search`` drives ``planner.cost`` + ``planner.simulate``.
The space (ProTrain-style, Sun et al. 2024): micro-batch size, chunk size, how many leading
chunks stay resident on the device (the rest live on host, then NVMe), prefetch depth,
a per-block activation policy chosen greedily, and zstd for NVMe. Candidates are ranked by a
lower bound on step time (the busiest stream's total work) and simulated best-first; a
candidate whose bound is no better than the best simulated time is never simulated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from memtrain.cluster.spec import DeviceSpec, HostSpec, NvmeSpec
from memtrain.config import MAX_GLOBAL_BATCH_SIZE
from memtrain.errors import UserError
from memtrain.planner import cost, footprint
from memtrain.planner.plan import (
    DEFAULT_SWAP_IN_AHEAD, DEFAULT_SWAP_WRITES_IN_FLIGHT, ActPolicy, Alternative, ChunkPlan, DevicePrediction, MemoryPolicy, Plan, Prediction, Tier, TimelineEvent, TrainShape,
)
from memtrain.planner.schedule import generate_single_device, lower_chunks
from memtrain.planner.bounds import stream_work_s
from memtrain.planner.simulate import SWAP_IN_LOOKAHEAD, SimResult, simulate_step
from memtrain.units import format_bytes
from memtrain.planner.stats import DType, ModelStats, Optimizer, dtype_bytes

__all__ = ["plan", "tracked_peak_bytes", "predicted_process_bytes", "MAX_GLOBAL_BATCH_SIZE", "OPTIM_STAGINGS", "MAX_OPTIM_STAGINGS", "CHUNK_SIZE_CANDIDATES", "MAX_SIMULATIONS", "MAX_TIMELINE_EVENTS", "NEAR_TIE"]

CHUNK_SIZE_CANDIDATES = (32 << 20, 64 << 20, 128 << 20)
"""Chunk sizes tried, in elements (plus one block's worth, and finer cuts for small models)."""
MAX_SIMULATIONS = 64
"""Simulations per search at most (candidates are simulated best bound first)."""
MAX_TIMELINE_EVENTS = 2000
"""Timeline events kept in the plan: the first three quarters and the last quarter in time."""
NEAR_TIE = 0.05
"""[Note: near-ties] Plans within 5% of the fastest simulated time are treated as equally fast
(the cost model is not that accurate: bench/plan_accuracy.py measures a median step-time error of
5-9% on a shared CPU machine, up to 16% on single configurations); among them the one that moves the least data wins
(fewest off-device parameters, then fewest blocks not kept, then the smallest prefetch depth),
then the larger micro-batch. So offloading a sliver of parameters to shave the device
optimizer step by a few percent (hiding it behind the backward as CPU updates) does not happen
when the model fits."""
OPTIM_STAGINGS = 3
"""NVMe chunks staged in host memory at once by the optimizer step at least
(``MemoryPolicy.optim_staged_chunks``' default): the one being stepped, the next one being read,
the previous one being written back (offload.optim; the simulator's ``_StepBuilder._optimizer``)."""
MAX_OPTIM_STAGINGS = 12
"""[Note: spare host memory stages more] The most NVMe chunks a candidate lets the optimizer stage
at once. More staged chunks keep more state reads and write-backs in flight during the last
backward, and the training thread waits for a write-back less often, for more host memory
(docs/optimizer.md has the measurements). A candidate with NVMe chunks takes
the largest count up to this that its host estimate still fits (never fewer than OPTIM_STAGINGS),
and the same candidate with OPTIM_STAGINGS follows it, in case the simulated host peak says no."""
_MAX_CHUNKS_PER_BLOCK = 2
"""Chunk counts above 2 per block (+ 8) are not tried: more chunks cost simulation time and
PCIe latency without saving device memory a larger prefetch depth would not."""


@dataclass(frozen=True, kw_only=True, slots=True)
class _Candidate:
    description: str
    policy: MemoryPolicy
    mbs: int
    bound_s: float
    """Lower bound on the step time (busiest stream)."""


@dataclass(kw_only=True, slots=True)
class _Context:
    stats: ModelStats
    """At micro-batch size ``mbs``."""
    train: TrainShape
    device: DeviceSpec
    host: HostSpec
    nvme: NvmeSpec | None
    usable: dict[str, int]
    workspace_bytes: int
    ram_bytes: int = 0
    """On a CPU device, the device and host budgets together (before the safety margin)."""


def _gib(num_bytes: float) -> str:
    return format_bytes(num_bytes)


def _divisors_desc(n: int) -> list[int]:
    """The divisors of ``n``, largest first, in O(√n): each d <= √n that divides n gives n // d too."""
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d != n // d:
                large.append(n // d)
        d += 1
    return large + small[::-1]


def _chunk_partitions(stats: ModelStats, param_numels: Mapping[str, int] | None, *, only: int | None = None,
                      ) -> list[tuple[int, list[tuple[tuple[str, ...], int]]]]:
    """Distinct chunkings to try, as ``(chunk_size_elems, packed)``; just ``only``'s when given."""
    total = sum(b.num_params for b in stats.blocks)
    biggest = max((b.num_params for b in stats.blocks), default=1)
    if only is not None:
        return [(only, cost.pack_chunks(stats, only, param_numels))]
    sizes = set(CHUNK_SIZE_CANDIDATES) | {max(1, biggest)}
    if total < 8 * CHUNK_SIZE_CANDIDATES[0]:  # small model: also cuts into ~8 and ~16 chunks
        sizes |= {max(1, math.ceil(total / 8)), max(1, math.ceil(total / 16))}
    limit = _MAX_CHUNKS_PER_BLOCK * len(stats.blocks) + 8
    seen, out = set(), []
    for size in sorted(sizes):
        packed = cost.pack_chunks(stats, min(size, max(total, 1)), param_numels)
        key = tuple(n for _, n in packed)
        if len(packed) <= limit and key not in seen:
            seen.add(key)
            out.append((min(size, max(total, 1)), packed))
    if not out:  # every size cuts too finely: one chunk per block is always simulable
        size = max(1, biggest)
        out.append((size, cost.pack_chunks(stats, size, param_numels)))
    return out


def _greedy_activations(ctx: _Context, room_bytes: int, off_elems_per_mb: int, nvme_room: int, host_room: int, *,
                        swaps: bool = True) -> tuple[ActPolicy, ...] | None:
    """Per-block activation policies whose device footprint fits ``room_bytes``, cheapest first.

    Estimated device footprint of one micro-batch (F and B alternate per micro-batch):
    sum of kept A + sum of recomputed inputs I + the largest recomputed A (rebuilt during its B)
    + (SWAP_IN_LOOKAHEAD + 1) of the largest swapped A in flight. Order: (1) swap blocks to
    host, then NVMe, while the copies hide under compute (their window, the compute between
    the block's F and B, and the stream's spare time per micro-batch cover them), earliest
    blocks first since their window is longest; (2) recompute, cheapest forward per byte saved
    first (Chen et al. 2016); (3) recompute the swapped blocks too. None when nothing fits.
    ``swaps=False`` skips (1): the search tries both, since a swap the estimate hides may not
    hide in the simulation.
    """
    s, dev, dt = ctx.stats, ctx.device, ctx.train.dtype
    blocks = s.blocks
    acts = [ActPolicy.KEEP] * len(blocks)
    fwd = [cost.block_fwd_time_s(b, dev, dt, s.micro_batch_size) for b in blocks]
    bwd = [cost.block_bwd_time_s(b, dev, dt, s.micro_batch_size) for b in blocks]
    compute_mb = sum(fwd) + sum(bwd)
    pcie_spare = compute_mb - 2 * cost.h2d_time_s(off_elems_per_mb * dtype_bytes(dt), dev)

    def footprint() -> int:
        keep = sum(b.activation_bytes for b, p in zip(blocks, acts) if p is ActPolicy.KEEP)
        rec = [b for b, p in zip(blocks, acts) if p is ActPolicy.RECOMPUTE]
        swp = [b.activation_bytes for b, p in zip(blocks, acts) if p in (ActPolicy.SWAP_HOST, ActPolicy.SWAP_NVME)]
        return (keep + sum(b.input_bytes for b in rec) + max((b.activation_bytes for b in rec), default=0)
                + (SWAP_IN_LOOKAHEAD + 1) * max(swp, default=0))

    if footprint() <= room_bytes:
        return tuple(acts)
    after = [0.0] * len(blocks)  # compute between a block's F end and its B start
    for j in range(len(blocks) - 2, -1, -1):
        after[j] = after[j + 1] + fwd[j + 1] + bwd[j + 1]
    disk_spare = compute_mb
    for j, b in enumerate(blocks if swaps else ()):
        a = b.activation_bytes
        copy_s = cost.h2d_time_s(a, dev)
        if a <= b.input_bytes or copy_s > pcie_spare or 2 * copy_s > after[j]:
            continue
        if a <= host_room:
            acts[j], host_room, pcie_spare = ActPolicy.SWAP_HOST, host_room - a, pcie_spare - copy_s
        elif ctx.nvme is not None and a <= nvme_room and a <= host_room:  # host staging while in flight
            disk_s = cost.disk_write_time_s(a, ctx.nvme) + cost.disk_read_time_s(a, ctx.nvme)
            if disk_s > disk_spare or disk_s + 2 * copy_s > after[j]:
                continue
            acts[j], nvme_room, pcie_spare, disk_spare = ActPolicy.SWAP_NVME, nvme_room - a, pcie_spare - copy_s, disk_spare - disk_s
        else:
            continue
        if footprint() <= room_bytes:
            return tuple(acts)
    for stage in (ActPolicy.KEEP, ActPolicy.SWAP_HOST, ActPolicy.SWAP_NVME):
        order = sorted((j for j, p in enumerate(acts) if p is stage and blocks[j].activation_bytes > blocks[j].input_bytes),
                       key=lambda j: fwd[j] / (blocks[j].activation_bytes - blocks[j].input_bytes))
        for j in order:
            acts[j] = ActPolicy.RECOMPUTE
            if footprint() <= room_bytes:
                return tuple(acts)
    return None


def _movement(policy: MemoryPolicy) -> tuple[int, int, int]:
    """How much a policy moves: off-device elements, blocks not kept, prefetch depth."""
    return (sum(c.num_elems for c in policy.chunks if c.home is not Tier.DEVICE),
            sum(1 for a in policy.activations if a is not ActPolicy.KEEP), policy.prefetch_depth)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _describe(mbs: int, policy: MemoryPolicy) -> str:
    homes = [c.home for c in policy.chunks]
    counts = {p: sum(1 for a in policy.activations if a is p) for p in ActPolicy}
    acts = ", ".join(f"{p.value} {n}" for p, n in counts.items() if n)
    largest = max((c.num_elems for c in policy.chunks), default=0)
    text = (f"micro-batch {mbs}, {len(homes)} chunks (≤{_count(largest)} elements): "
            f"{homes.count(Tier.DEVICE)} device / {homes.count(Tier.HOST)} host / {homes.count(Tier.NVME)} NVMe")
    if any(h is not Tier.DEVICE for h in homes):
        text += f", prefetch depth {policy.prefetch_depth}"
    if Tier.NVME in homes:
        text += f", optimizer stages {policy.optim_staged_chunks} NVMe chunks"
    text += f"; activations: {acts}"
    if any(p in (ActPolicy.SWAP_HOST, ActPolicy.SWAP_NVME) for p in policy.activations):
        text += f" (swap-ins {policy.swap_in_ahead} block{'s' * (policy.swap_in_ahead != 1)} ahead"
        if ActPolicy.SWAP_NVME in policy.activations:
            text += f", {policy.swap_writes_in_flight} NVMe write{'s' * (policy.swap_writes_in_flight != 1)} in flight"
        text += ")"
    return text + (", zstd on NVMe" if policy.compress_nvme else "")


def _candidates_for(ctx: _Context, chunk_size: int, packed: list[tuple[tuple[str, ...], int]], *,
                    fixed_depth: int | None = None) -> list[_Candidate]:
    """Memory policies for one micro-batch size and chunking; ``fixed_depth`` fixes the prefetch
    depth (a placement whose blocks need more buffers at once than that is left out)."""
    s, train, dt, opt = ctx.stats, ctx.train, ctx.train.dtype, ctx.train.optimizer
    nc, c_bytes = len(packed), dtype_bytes(dt)
    elems = [n for _, n in packed]
    proto = tuple(ChunkPlan(index=i, num_elems=n, param_names=names, home=Tier.DEVICE) for i, (names, n) in enumerate(packed))
    bc = cost.block_chunk_ids(s, proto)
    dev_bytes = [cost.chunk_bytes(Tier.DEVICE, n, dt, opt)[Tier.DEVICE] for n in elems]
    host_bytes = [cost.chunk_bytes(Tier.HOST, n, dt, opt)[Tier.HOST] for n in elems]
    nvme_bytes = [cost.chunk_bytes(Tier.NVME, n, dt, opt)[Tier.NVME] for n in elems]
    act_min = sum(b.input_bytes for b in s.blocks) + max((b.activation_bytes for b in s.blocks), default=0)
    act_keep = sum(b.activation_bytes for b in s.blocks)
    prefix = [0]
    for b in dev_bytes:
        prefix.append(prefix[-1] + b)

    host_pre = [0]
    for b in host_bytes:
        host_pre.append(host_pre[-1] + b)
    accum_suf, nvme_suf, elems_max_suf = [0] * (nc + 1), [0] * (nc + 1), [0] * (nc + 1)
    # staged_suf[c][k - 1]: host staging of the optimizer with k of chunks [c, nc) staged at once
    staged_suf: list[list[int]] = [[0] * MAX_OPTIM_STAGINGS for _ in range(nc + 1)]
    top: list[int] = []
    for c in range(nc - 1, -1, -1):
        accum_suf[c] = accum_suf[c + 1] + cost.host_grad_accum_bytes(elems[c])
        nvme_suf[c] = nvme_suf[c + 1] + nvme_bytes[c]
        elems_max_suf[c] = max(elems_max_suf[c + 1], elems[c])
        top = sorted(top + [cost.nvme_optim_staging_bytes(elems[c], dt, opt)], reverse=True)[:MAX_OPTIM_STAGINGS]
        staged_suf[c] = [sum(top[:k]) for k in range(1, MAX_OPTIM_STAGINGS + 1)]

    def min_depth(k: int) -> int:
        return max((sum(1 for c in cs if c >= k) for cs in bc), default=0)

    def buffers(k: int, depth: int) -> int:
        off = sorted((elems[c] for c in range(k, nc)), reverse=True)
        if not off:
            return 0
        grads = off[: min(len(off), min_depth(k) + 1)]
        return (sum(off[:depth]) + sum(grads)) * c_bytes

    def fixed(k: int, depth: int) -> int:
        return prefix[k] + buffers(k, depth) + ctx.workspace_bytes

    budget = ctx.usable["device"]
    k_top = next((k for k in range(nc, -1, -1) if fixed(k, max(1, min_depth(k))) + act_min <= budget), None)
    if k_top is None:
        return []
    k_keep = next((k for k in range(k_top, -1, -1) if fixed(k, max(1, min_depth(k))) + act_keep <= budget), None)
    ks = {k_top} | ({k_keep} if k_keep is not None else set())
    step = 1
    while k_top - step > 0:
        ks.add(k_top - step)
        step *= 2
    ks.add(0)
    out = []
    nvme_usable = ctx.usable["nvme"] if ctx.nvme is not None else 0
    for k in sorted(ks, reverse=True):
        d0 = max(1, min_depth(k))
        depths = (d0, d0 + 1, d0 + 2) if fixed_depth is None else (fixed_depth,) if fixed_depth >= d0 else ()
        for depth in ((1,) if k == nc else depths):
            room = budget - fixed(k, depth)
            # host takes the off-device chunks nearest the front, NVMe the rest (as many on host as fit)
            host_room = ctx.usable["host"]
            split = None
            for h in range(nc, k - 1, -1):  # chunks [k, h) on host, [h, nc) on NVMe
                host_base = (host_pre[h] - host_pre[k] + accum_suf[h] + depth * elems_max_suf[h] * c_bytes
                             + cost.grad_landing_bytes(elems_max_suf[k], dt, ctx.device))  # one flush in flight
                host_need = host_base + staged_suf[h][OPTIM_STAGINGS - 1]
                nvme_need = nvme_suf[h]
                if host_need <= host_room and (h == nc or (ctx.nvme is not None and nvme_need <= nvme_usable)):
                    split = h
                    break
            if split is None:
                continue
            # [Note: spare host memory stages more]
            staged = max(s for s in range(OPTIM_STAGINGS, min(MAX_OPTIM_STAGINGS, max(nc - split, OPTIM_STAGINGS)) + 1)
                         if host_base + staged_suf[split][s - 1] <= host_room)
            j = split - k
            off = list(range(k, nc))
            homes = [Tier.DEVICE] * k + [Tier.HOST] * j + [Tier.NVME] * (len(off) - j)
            options = [_greedy_activations(ctx, room, sum(elems[c] for c in off), nvme_usable - nvme_need,
                                           host_room - host_need, swaps=swaps) for swaps in (True, False)]
            chunks = tuple(ChunkPlan(index=i, num_elems=n, param_names=names, home=homes[i]) for i, (names, n) in enumerate(packed))
            for acts in dict.fromkeys(a for a in options if a is not None):
                out += _policies(ctx, chunk_size, chunks, depth, acts, staged)
    return out


def _policies(ctx: _Context, chunk_size: int, chunks: tuple[ChunkPlan, ...], depth: int, acts: tuple[ActPolicy, ...],
              staged: int) -> list[_Candidate]:
    """The candidates of one placement and activation choice: with and without zstd where NVMe
    is used, and the optimizer's staging."""
    s, train = ctx.stats, ctx.train
    out = []
    uses_nvme = any(c.home is Tier.NVME for c in chunks) or ActPolicy.SWAP_NVME in acts
    for compress in ((False, True) if uses_nvme else (False,)):
        for stages in dict.fromkeys((staged, OPTIM_STAGINGS)):
            policy = MemoryPolicy(chunk_size_elems=chunk_size, chunks=chunks, prefetch_depth=depth,
                                  activations=acts, compress_nvme=compress, optim_staged_chunks=stages)
            work = stream_work_s(s, train, ctx.device, ctx.host, ctx.nvme, policy)
            out.append(_Candidate(description=_describe(train.micro_batch_size, policy),
                                  policy=policy, mbs=train.micro_batch_size, bound_s=max(work.values())))
    return out


def _swap_pacing(policy: MemoryPolicy) -> list[MemoryPolicy]:
    """[Note: swap pacing] The pacings tried for the chosen policy when it swaps activations,
    besides its own (the defaults): one block more brought back ahead of the backward (a
    swap-in hides better behind compute, for one more block's activations on the device) and,
    with swap_nvme blocks, two NVMe writes in flight (the disk has queued work while the next
    block runs, for one more block's host staging). Pacing changes no stream's total work, so
    no candidate's bound tells them apart: the search simulates these after choosing the policy
    and keeps the fastest that fits (their peaks are checked like any candidate's)."""
    acts = policy.activations
    if not any(p in (ActPolicy.SWAP_HOST, ActPolicy.SWAP_NVME) for p in acts):
        return []
    aheads = (DEFAULT_SWAP_IN_AHEAD, DEFAULT_SWAP_IN_AHEAD + 1)
    writes = (DEFAULT_SWAP_WRITES_IN_FLIGHT, DEFAULT_SWAP_WRITES_IN_FLIGHT + 1) if ActPolicy.SWAP_NVME in acts \
        else (DEFAULT_SWAP_WRITES_IN_FLIGHT,)
    return [dataclasses.replace(policy, swap_in_ahead=a, swap_writes_in_flight=w) for a in aheads for w in writes
            if (a, w) != (policy.swap_in_ahead, policy.swap_writes_in_flight)]


def _peaks(ctx: _Context, sim: SimResult, policy: MemoryPolicy) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Per tier, the peak with the untracked workspace on the device tier: the backward's
    (``ctx.workspace_bytes``) or, when larger, the device chunks' optimizer temporaries."""
    workspace = max(ctx.workspace_bytes, footprint.optimizer_workspace_bytes(policy, ctx.device))
    peaks = dict(sim.peak_bytes)
    peaks["device"] = peaks.get("device", 0) + workspace
    breakdown = {t: dict(d) for t, d in sim.breakdown.items()}
    breakdown.setdefault("device", {})["workspace"] = workspace
    return peaks, breakdown


def _process_bytes(ctx: _Context, policy: MemoryPolicy, peaks: Mapping[str, int], sim: SimResult, *,
                   threads: bool = True) -> int:
    """``footprint.process_bytes`` of a simulated step; ``threads``: with the NVMe store's threads."""
    uses_nvme = threads and (any(c.home is Tier.NVME for c in policy.chunks) or ActPolicy.SWAP_NVME in policy.activations)
    return footprint.process_bytes(device_peak_bytes=peaks["device"], pooled_peak_bytes=sim.pooled_peak_bytes,
                                   pooled_resident_bytes=sim.pooled_resident_bytes,
                                   act_peak_bytes=sim.act_peak_bytes, workspace_bytes=ctx.workspace_bytes,
                                   optimizer_workspace_bytes=footprint.optimizer_workspace_bytes(policy, ctx.device),
                                   optimizer_temporary_bytes=footprint.optimizer_temporary_bytes(policy),
                                   device=ctx.device, uses_nvme=uses_nvme)


def predicted_process_bytes(stats: ModelStats, train: TrainShape, device: DeviceSpec, policy: MemoryPolicy,
                            sim: SimResult) -> int:
    """``DevicePrediction.process_bytes`` of ``sim``, a step of ``policy`` simulated without the
    search (``stats`` at micro-batch size 1, as ``plan`` takes it)."""
    ctx = _Context(stats=stats.scaled(train.micro_batch_size), train=train, device=device, host=None, nvme=None,
                   usable={}, workspace_bytes=footprint.workspace_bytes(stats.scaled(train.micro_batch_size)))
    return _process_bytes(ctx, policy, _peaks(ctx, sim, policy)[0], sim)


def tracked_peak_bytes(prediction: DevicePrediction) -> dict[str, int]:
    """Per tier, the predicted peak of the ledger's own owners: ``prediction.peak_bytes`` less
    the untracked ``workspace`` estimate that the budget check adds to the device tier. This is
    the figure to compare with ``Ledger.peak_bytes`` (docs/memory-accounting.md)."""
    out = dict(prediction.peak_bytes)
    for tier, owners in prediction.breakdown.items():
        out[tier] = out.get(tier, 0) - owners.get("workspace", 0)
    return out


def _overflow(peaks: dict[str, int], usable: dict[str, int]) -> str:
    """'' when every tier fits, else what does not, in user terms."""
    for tier in ("device", "host", "nvme"):
        if peaks.get(tier, 0) > usable[tier]:
            return f"does not fit: {tier} needs {_gib(peaks[tier])}, budget {_gib(usable[tier])}"
    return ""


_RAM_SHORT = "does not fit: the process needs "


def _ram_overflow(ctx: _Context, policy: MemoryPolicy, peaks: Mapping[str, int], breakdown, sim: SimResult) -> str:
    """On a CPU device both tiers are one RAM: '' when what the process holds for the model (both
    tiers' peaks, the buffer pool's slack, the C heap: ``process_bytes`` less the NVMe store's
    fixed threads, which like the interpreter are no part of any budget) fits the two budgets
    together, else why not. Each tier's peak fits its budget less the safety margin, the margin
    kept for what the allocators hold; this checks that what they hold fits the budgets."""
    if ctx.device.kind != "cpu":
        return ""
    need = _process_bytes(ctx, policy, peaks, sim, threads=False)
    if need <= ctx.ram_bytes:
        return ""
    return (f"{_RAM_SHORT}{_gib(need)} of RAM (both tiers, the buffer pool's slack, "
            f"temporaries), the device and host budgets together {_gib(ctx.ram_bytes)}")


def _shortfall(stats: ModelStats, mbs: int, dtype: DType, optimizer: Optimizer, usable: dict[str, int],
               budgets: Mapping[str, int], safety_margin: float, nvme: NvmeSpec | None, device: DeviceSpec) -> str:
    """What is missing, from the smallest footprint memtrain can run: the smallest micro-batch,
    every activation recomputed, buffers for the largest block's parameters, and as many
    parameters resident on the device as the rest of its budget holds."""
    s = stats.scaled(mbs)
    c_bytes = dtype_bytes(dtype)
    biggest = max((b.num_params for b in s.blocks), default=0)
    # workspace + recompute footprint + param and grad buffers of the largest block, twice over
    device_min = (footprint.workspace_bytes(s) + sum(b.input_bytes for b in s.blocks)
                  + max((b.activation_bytes for b in s.blocks), default=0) + 2 * 2 * biggest * c_bytes)

    def has(tier: str) -> str:
        return f"has {_gib(usable[tier])} ({_gib(budgets.get(tier, 0))} budget less the {safety_margin:.0%} safety margin)"

    if device_min > usable["device"]:
        return f"needs {_gib(device_min)} device memory even with every activation recomputed and all parameters offloaded; {has('device')}"
    total = sum(b.num_params for b in s.blocks)
    resident = min(total, (usable["device"] - device_min) // cost.chunk_bytes(Tier.DEVICE, 1, dtype, optimizer)[Tier.DEVICE])
    off = total - resident
    landing = cost.grad_landing_bytes(min(off, biggest), dtype, device)  # one gradient flush in flight
    host_all = cost.chunk_bytes(Tier.HOST, off, dtype, optimizer)[Tier.HOST] + landing
    if nvme is None or usable["nvme"] <= 0:
        return f"needs {_gib(host_all)} host memory or an NVMe path; {has('host')}" if host_all > usable["host"] else ""
    host_min = (cost.host_grad_accum_bytes(off) + 2 * biggest * c_bytes + landing
                + cost.nvme_optim_staging_bytes(biggest, dtype, optimizer))  # at least one staged
    if host_min > usable["host"]:
        return (f"needs {_gib(host_min)} host memory for the gradient accumulators and staging of NVMe-resident "
                f"parameters; {has('host')}")
    nvme_need = cost.chunk_bytes(Tier.NVME, off, dtype, optimizer)[Tier.NVME]
    if nvme_need > usable["nvme"]:
        return f"needs {_gib(nvme_need)} NVMe space; {has('nvme')}"
    return ""


def plan(
    stats: ModelStats,
    *,
    name: str,
    global_batch_size: int,
    micro_batch_size: int = 0,
    dtype: DType | str,
    optimizer: Optimizer | str,
    device: DeviceSpec,
    host: HostSpec,
    nvme: NvmeSpec | None,
    budgets: Mapping[str, int],
    safety_margin: float,
    source: str = "catalog",
    param_numels: Mapping[str, int] | None = None,
    max_alternatives: int = 6,
    chunk_size_elems: int | None = None,
    prefetch_depth: int | None = None,
) -> Plan:
    """The fastest single-device plan whose predicted peaks fit every tier's usable budget.

    ``stats`` is the analysis at micro-batch size 1; ``micro_batch_size`` 0 lets the search
    choose a divisor of ``global_batch_size``. ``budgets`` maps ``device``/``host``/``nvme`` to
    bytes (0 = tier unavailable); usable = budget × (1 − ``safety_margin``). The device peak
    includes the untracked ``workspace`` estimate (``footprint.workspace_bytes``, listed in the
    breakdown) on top of the ledger's owners. ``param_numels`` (name -> numel) lets chunks
    be cut between parameters instead of between blocks (``cost.pack_chunks``).
    ``chunk_size_elems`` and ``prefetch_depth`` fix those choices (``memory.chunk_elems``,
    ``memory.prefetch_depth``) instead of searching them. When nothing fits, the Plan has
    ``fits=False`` and ``shortfall`` says which tier lacks how much.
    """
    dtype, optimizer = DType(dtype), Optimizer(optimizer)
    if not 1 <= global_batch_size <= MAX_GLOBAL_BATCH_SIZE:
        raise UserError(f"train.global_batch_size: must be from 1 to {MAX_GLOBAL_BATCH_SIZE}, got {global_batch_size}")
    if micro_batch_size < 0 or (micro_batch_size and global_batch_size % micro_batch_size):
        raise UserError(f"train.micro_batch_size: must divide train.global_batch_size ({global_batch_size}), "
                        f"got {micro_batch_size}; use 0 to let the planner choose")
    if not 0 <= safety_margin < 1:
        raise UserError(f"memory.safety_margin: must be in [0, 1), got {safety_margin}")
    for field, value in (("memory.chunk_elems", chunk_size_elems), ("memory.prefetch_depth", prefetch_depth)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"{field}: must be a whole number >= 1, got {value!r}")
    if DType(stats.dtype) is not dtype:
        raise ValueError(f"train.dtype: the model was analysed in {stats.dtype}, not {dtype}; analyse it in {dtype}")
    unknown = set(budgets) - {"device", "host", "nvme"}
    if unknown:
        raise ValueError(f"budgets: unknown tier {sorted(unknown)[0]!r}; use device, host and nvme")
    if device.peak_flops(str(dtype)) <= 0:
        raise UserError(f"train.dtype: {device.kind} has no {dtype} throughput; choose another dtype")
    usable = {t: int(max(0, budgets.get(t, 0)) * (1 - safety_margin)) for t in ("device", "host", "nvme")}
    if nvme is None:
        usable["nvme"] = 0
    base = stats.scaled(1) if stats.micro_batch_size != 1 else stats
    mbs_options = [micro_batch_size] if micro_batch_size else _divisors_desc(global_batch_size)
    partitions = _chunk_partitions(base, param_numels, only=chunk_size_elems)

    def context(mbs: int) -> _Context:
        s = base.scaled(mbs)
        train = TrainShape(global_batch_size=global_batch_size, micro_batch_size=mbs,
                           num_microbatches=global_batch_size // mbs, seq_len=base.seq_len, dtype=dtype, optimizer=optimizer)
        return _Context(stats=s, train=train, device=device, host=host, nvme=nvme, usable=usable,
                        ram_bytes=budgets.get("device", 0) + budgets.get("host", 0),
                        workspace_bytes=footprint.workspace_bytes(s))

    contexts = {mbs: context(mbs) for mbs in mbs_options}
    candidates: list[_Candidate] = []
    for mbs in mbs_options:
        for size, packed in partitions:
            candidates += _candidates_for(contexts[mbs], size, packed, fixed_depth=prefetch_depth)
    # best bound first; among equals, the larger micro-batch (better kernel efficiency in practice).
    # The near-tie rule prefers the plan that moves least, so each micro-batch size's least-moving
    # candidate is simulated first, whatever its bound: a loose bound of plans that offload (device
    # optimizer work moved to the host) must not crowd it out of the MAX_SIMULATIONS.
    candidates.sort(key=lambda c: (c.bound_s, -c.mbs))
    least: dict[int, _Candidate] = {}
    for cand in candidates:
        if cand.mbs not in least or _movement(cand.policy) < _movement(least[cand.mbs].policy):
            least[cand.mbs] = cand
    first = sorted(least.values(), key=lambda c: (c.bound_s, -c.mbs))
    chosen = {id(c) for c in first}
    candidates = first + [c for c in candidates if id(c) not in chosen]

    fastest_s: float | None = None
    tried: list[tuple[_Candidate, SimResult, str]] = []
    for cand in candidates:
        if len(tried) >= MAX_SIMULATIONS:
            break
        if len(tried) >= len(first) and fastest_s is not None and cand.bound_s > fastest_s * (1 + NEAR_TIE):
            break
        ctx = contexts[cand.mbs]
        sim = simulate_step(ctx.stats, ctx.train, device, host, nvme, cand.policy, timeline=False)
        peaks, breakdown = _peaks(ctx, sim, cand.policy)
        why = _overflow(peaks, usable) or _ram_overflow(ctx, cand.policy, peaks, breakdown, sim)
        tried.append((cand, sim, why))
        if not why and (fastest_s is None or sim.step_time_s < fastest_s):
            fastest_s = sim.step_time_s
    best = None
    if fastest_s is not None:
        near = [(c, r) for c, r, why in tried if not why and r.step_time_s <= fastest_s * (1 + NEAR_TIE)]
        best = min(near, key=lambda t: (_movement(t[0].policy), -t[0].mbs, t[1].step_time_s))
        ctx = contexts[best[0].mbs]
        for paced in _swap_pacing(best[0].policy):  # [Note: swap pacing]
            sim = simulate_step(ctx.stats, ctx.train, device, host, nvme, paced, timeline=False)
            peaks, breakdown = _peaks(ctx, sim, paced)
            if sim.step_time_s < best[1].step_time_s and not (
                    _overflow(peaks, usable) or _ram_overflow(ctx, paced, peaks, breakdown, sim)):
                best = (dataclasses.replace(best[0], policy=paced, description=_describe(best[0].mbs, paced)), sim)

    if best is None:
        mbs = min(mbs_options)
        # a placement whose every tier fitted but not the process as a whole: the RAM is what is short
        ram = [why for _, _, why in tried if why.startswith(_RAM_SHORT)]
        shortfall = (ram[0][len("does not fit: "):] + "; raise memory.device or memory.host" if ram
                     else _shortfall(base, mbs, dtype, optimizer, usable, budgets, safety_margin, nvme, device))
        if not shortfall and not candidates and (chunk_size_elems or prefetch_depth):
            fixed = " and ".join(f"memory.{k} = {v}" for k, v in (("chunk_elems", chunk_size_elems),
                                                                  ("prefetch_depth", prefetch_depth)) if v)
            shortfall = (f"no placement fits with {fixed} (a block may use more off-device chunks at once than "
                         "the prefetch depth, or their buffers may not fit the device budget); unset them to let "
                         "the planner choose")
        if not shortfall:
            closest = min(tried, key=lambda t: t[1].peak_bytes.get("device", 0)) if tried else None
            shortfall = closest[2] if closest else "no memory policy fits the budgets; raise memory.device or add host/NVMe"
        ctx = contexts[mbs]
        size, packed = partitions[0]
        chunks = tuple(ChunkPlan(index=i, num_elems=n, param_names=nm, home=Tier.DEVICE) for i, (nm, n) in enumerate(packed))
        policy = MemoryPolicy(chunk_size_elems=size, chunks=chunks, prefetch_depth=1,
                              activations=(ActPolicy.RECOMPUTE,) * len(base.blocks))
        chosen = _Candidate(description=_describe(mbs, policy), policy=policy, mbs=mbs, bound_s=0.0)
        sim = simulate_step(ctx.stats, ctx.train, device, host, nvme, policy)
        return _build_plan(name, base, contexts[mbs], chosen, sim, tried, source, False, shortfall, max_alternatives)
    ctx = contexts[best[0].mbs]
    sim = simulate_step(ctx.stats, ctx.train, device, host, nvme, best[0].policy)  # again, with its timeline
    return _build_plan(name, base, ctx, best[0], sim, tried, source, True, "", max_alternatives)


def _truncate(timeline: tuple[TimelineEvent, ...]) -> tuple[TimelineEvent, ...]:
    if len(timeline) <= MAX_TIMELINE_EVENTS:
        return timeline
    by_start = sorted(timeline, key=lambda e: (e.start_s, e.end_s))
    head = MAX_TIMELINE_EVENTS * 3 // 4
    return tuple(by_start[:head] + by_start[-(MAX_TIMELINE_EVENTS - head):])


def _family(cand: _Candidate) -> tuple:
    policy = cand.policy
    return (cand.mbs, frozenset(c.home for c in policy.chunks), frozenset(policy.activations), policy.compress_nvme)


def _build_plan(name: str, base: ModelStats, ctx: _Context, chosen: _Candidate, sim: SimResult,
                tried: list[tuple[_Candidate, SimResult, str]], source: str, fits: bool, shortfall: str,
                max_alternatives: int) -> Plan:
    peaks, breakdown = _peaks(ctx, sim, chosen.policy)
    bc = cost.block_chunk_ids(ctx.stats, chosen.policy.chunks)
    schedule = generate_single_device(ctx.train.num_microbatches)
    schedule = lower_chunks(schedule, chosen.policy, bc, dtype=ctx.train.dtype)
    alternatives: list[Alternative] = []
    # One alternative per family (micro-batch, tiers used, activation policies, compression):
    # the best of each, so the report shows different strategies, not prefetch-depth twins.
    seen = {_family(chosen)}
    losers = sorted(tried, key=lambda t: (bool(t[2]), t[1].step_time_s))
    for cand, other, why in losers:
        if len(alternatives) >= max_alternatives or _family(cand) in seen:
            continue
        seen.add(_family(cand))
        if not why and other.step_time_s < sim.step_time_s:
            why = (f"{100 * (1 - other.step_time_s / sim.step_time_s):.1f}% faster in the model, within the "
                   f"{NEAR_TIE:.0%} tie margin; the chosen plan moves less data")
        elif not why:
            why = f"slower by {100 * (other.step_time_s / sim.step_time_s - 1):.1f}%"
        alternatives.append(Alternative(description=cand.description, fits=not why.startswith("does not fit"),
                                        step_time_s=other.step_time_s, reason=why))
    everything = sum(cost.chunk_bytes(Tier.DEVICE, c.num_elems, ctx.train.dtype, ctx.train.optimizer)[Tier.DEVICE]
                     for c in chosen.policy.chunks)
    need = everything + ctx.stats.activation_bytes + ctx.workspace_bytes
    if fits and need > ctx.usable["device"] and len(alternatives) < max_alternatives + 1:
        alternatives.append(Alternative(
            description=f"micro-batch {ctx.train.micro_batch_size}, everything on the device, all activations kept",
            fits=False, step_time_s=None,
            reason=f"does not fit: device needs {_gib(need)}, budget {_gib(ctx.usable['device'])}"))
    prediction = Prediction(
        step_time_s=sim.step_time_s, tokens_per_s=sim.tokens_per_s, mfu=sim.mfu,
        devices=(DevicePrediction(rank=0, device=ctx.device.kind, peak_bytes=peaks, budget_bytes=dict(ctx.usable),
                                  breakdown=breakdown,
                                  process_bytes=_process_bytes(ctx, chosen.policy, peaks, sim)),),
        timeline=_truncate(sim.timeline),
    )
    return Plan(name=name, fits=fits, shortfall=shortfall, model=base, train=ctx.train, device=ctx.device,
                host=ctx.host, nvme=ctx.nvme, memory=chosen.policy, schedule=schedule, prediction=prediction,
                alternatives=tuple(alternatives), source=source)
