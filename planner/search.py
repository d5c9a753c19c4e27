"""The search: enumerate memory policies for one device, prune, simulate, pick the fastest that fits.

docs/DESIGN.md data flow: ``planner.search`` drives ``planner.cost`` + ``planner.simulate``.
The space (ProTrain-style, Sun et al. 2024; planner.candidates): micro-batch size, chunk size,
how many leading chunks stay resident on the device (the rest live on host, then NVMe),
prefetch depth, a per-block activation policy chosen greedily, zstd for NVMe, the optimizer's
staging, and the swap pacing of the chosen policy. Candidates are ranked by a
lower bound on step time (the busiest stream's total work) and simulated best-first; a
candidate whose bound is no better than the best simulated time is never simulated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from memtrain.cluster.spec import DeviceSpec, HostSpec, NvmeSpec
from memtrain.config import MAX_GLOBAL_BATCH_SIZE
from memtrain.errors import UserError
from memtrain.planner import cost, footprint
from memtrain.planner.plan import (
    ActPolicy, Alternative, ChunkPlan, DevicePrediction, MemoryPolicy, Plan, Prediction, Tier, TimelineEvent, TrainShape,
)
from memtrain.planner.candidates import (
    CHUNK_SIZE_CANDIDATES, MAX_OPTIM_STAGINGS, OPTIM_STAGINGS, Candidate, Context, candidates_for, chunk_partitions,
    describe, divisors_desc, fixed_candidates, movement, swap_pacing,
)
from memtrain.planner.schedule import generate_single_device, lower_chunks
from memtrain.planner.simulate import SimResult, simulate_step
from memtrain.units import format_bytes
from memtrain.planner.stats import DType, ModelStats, Optimizer, dtype_bytes

__all__ = ["plan", "tracked_peak_bytes", "predicted_process_bytes", "MAX_GLOBAL_BATCH_SIZE", "OPTIM_STAGINGS", "MAX_OPTIM_STAGINGS", "CHUNK_SIZE_CANDIDATES", "MAX_SIMULATIONS", "MAX_TIMELINE_EVENTS", "NEAR_TIE"]

MAX_SIMULATIONS = 64
"""Simulations per search at most (candidates are simulated best bound first)."""
MAX_TIMELINE_EVENTS = 2000
"""Timeline events kept in the plan: the first three quarters and the last quarter in time."""
NEAR_TIE = 0.05
"""[Note: near-ties] Plans within 5% of the fastest simulated time are treated as equally fast
(the cost model is not that accurate: bench/plan_accuracy.py's median step-time error is about
10% on a 2-core CPU machine, and single configurations are off by up to a third); among them the one that moves the least data wins
(fewest off-device parameters, then fewest blocks not kept, then the smallest prefetch depth),
then the larger micro-batch. So offloading a sliver of parameters to shave the device
optimizer step by a few percent (hiding it behind the backward as CPU updates) does not happen
when the model fits."""
def _gib(num_bytes: float) -> str:
    return format_bytes(num_bytes)


def _peaks(ctx: Context, sim: SimResult, policy: MemoryPolicy) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Per tier, the peak with the untracked workspace on the device tier: the backward's
    (``ctx.workspace_bytes``) or, when larger, the device chunks' optimizer temporaries."""
    workspace = max(ctx.workspace_bytes, footprint.optimizer_workspace_bytes(policy, ctx.device))
    peaks = dict(sim.peak_bytes)
    peaks["device"] = peaks.get("device", 0) + workspace
    breakdown = {t: dict(d) for t, d in sim.breakdown.items()}
    breakdown.setdefault("device", {})["workspace"] = workspace
    return peaks, breakdown


def _process_bytes(ctx: Context, policy: MemoryPolicy, peaks: Mapping[str, int], sim: SimResult, *,
                   threads: bool = True) -> int:
    """``footprint.process_bytes`` of a simulated step; ``threads``: with the NVMe store's threads."""
    uses_nvme = threads and (any(c.home is Tier.NVME for c in policy.chunks) or ActPolicy.SWAP_NVME in policy.activations)
    return footprint.process_bytes(device_peak_bytes=peaks["device"], pooled_peak_bytes=sim.pooled_peak_bytes,
                                   pooled_resident_bytes=sim.pooled_resident_bytes,
                                   act_peak_bytes=sim.act_peak_bytes, workspace_bytes=ctx.workspace_bytes,
                                   mapped_peak_bytes=sim.mapped_peak_bytes, heap_act_peak_bytes=sim.heap_act_peak_bytes,
                                   optimizer_workspace_bytes=footprint.optimizer_workspace_bytes(policy, ctx.device),
                                   optimizer_temporary_bytes=footprint.optimizer_temporary_bytes(policy),
                                   device=ctx.device, uses_nvme=uses_nvme)


def predicted_process_bytes(stats: ModelStats, train: TrainShape, device: DeviceSpec, policy: MemoryPolicy,
                            sim: SimResult) -> int:
    """``DevicePrediction.process_bytes`` of ``sim``, a step of ``policy`` simulated without the
    search (``stats`` at micro-batch size 1, as ``plan`` takes it)."""
    ctx = Context(stats=stats.scaled(train.micro_batch_size), train=train, device=device, host=None, nvme=None,
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


def _simulate(ctx: Context, policy: MemoryPolicy) -> tuple[SimResult, str]:
    """Simulate ``policy`` (no timeline) and say why it does not fit ("" when it does)."""
    sim = simulate_step(ctx.stats, ctx.train, ctx.device, ctx.host, ctx.nvme, policy, timeline=False)
    peaks, breakdown = _peaks(ctx, sim, policy)
    return sim, _overflow(peaks, ctx.usable) or _ram_overflow(ctx, policy, peaks, breakdown, sim)


def _ram_overflow(ctx: Context, policy: MemoryPolicy, peaks: Mapping[str, int], breakdown, sim: SimResult) -> str:
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
    offload: Tier | str | None = None,
    activations: ActPolicy | str | None = None,
    clip_grad_norm: bool = False,
) -> Plan:
    """The fastest single-device plan whose predicted peaks fit every tier's usable budget.

    ``stats`` is the analysis at micro-batch size 1; ``micro_batch_size`` 0 lets the search
    choose a divisor of ``global_batch_size``. ``budgets`` maps ``device``/``host``/``nvme`` to
    bytes (0 = tier unavailable); usable = budget × (1 − ``safety_margin``). The device peak
    includes the untracked ``workspace`` estimate (``footprint.workspace_bytes``, listed in the
    breakdown) on top of the ledger's owners. ``param_numels`` (name -> numel) lets chunks
    be cut between parameters instead of between blocks (``cost.pack_chunks``).
    ``chunk_size_elems`` and ``prefetch_depth`` fix those choices (``memory.chunk_elems``,
    ``memory.prefetch_depth``) instead of searching them; ``offload`` (a tier) and ``activations``
    (a policy) fix every chunk's home and every block's activations (``memory.offload``,
    ``memory.activations``; None or ``auto`` searches them); ``clip_grad_norm``: the step clips
    gradients by their global norm, so no update runs early (``TrainShape.clip_grad_norm``).
    When nothing fits, the Plan has
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
    home = None if offload in (None, "auto") else Tier(offload)
    act = None if activations in (None, "auto") else ActPolicy(activations)
    if nvme is None and (home is Tier.NVME or act is ActPolicy.SWAP_NVME):
        field = "memory.offload" if home is Tier.NVME else "memory.activations"
        raise UserError(f"{field}: uses NVMe but no NVMe path is configured; add cluster.nodes[].nvme.path")
    usable = {t: int(max(0, budgets.get(t, 0)) * (1 - safety_margin)) for t in ("device", "host", "nvme")}
    if nvme is None:
        usable["nvme"] = 0
    base = stats.scaled(1) if stats.micro_batch_size != 1 else stats
    mbs_options = [micro_batch_size] if micro_batch_size else divisors_desc(global_batch_size)
    partitions = chunk_partitions(base, param_numels, only=chunk_size_elems)

    def context(mbs: int) -> Context:
        s = base.scaled(mbs)
        train = TrainShape(global_batch_size=global_batch_size, micro_batch_size=mbs,
                           num_microbatches=global_batch_size // mbs, seq_len=base.seq_len, dtype=dtype,
                           optimizer=optimizer, clip_grad_norm=clip_grad_norm)
        return Context(stats=s, train=train, device=device, host=host, nvme=nvme, usable=usable,
                        ram_bytes=budgets.get("device", 0) + budgets.get("host", 0),
                        workspace_bytes=footprint.workspace_bytes(s))

    contexts = {mbs: context(mbs) for mbs in mbs_options}
    candidates: list[Candidate] = []
    for mbs in mbs_options:
        for size, packed in partitions:
            if home is None and act is None:
                candidates += candidates_for(contexts[mbs], size, packed, fixed_depth=prefetch_depth)
            else:
                candidates += fixed_candidates(contexts[mbs], size, packed, home=home, acts=act, fixed_depth=prefetch_depth)
    # best bound first; among equals, the larger micro-batch (better kernel efficiency in practice).
    # The near-tie rule prefers the plan that moves least, so each micro-batch size's least-moving
    # candidate is simulated first, whatever its bound: a loose bound of plans that offload (device
    # optimizer work moved to the host) must not crowd it out of the MAX_SIMULATIONS.
    candidates.sort(key=lambda c: (c.bound_s, -c.mbs))
    least: dict[int, Candidate] = {}
    for cand in candidates:
        if cand.mbs not in least or movement(cand.policy) < movement(least[cand.mbs].policy):
            least[cand.mbs] = cand
    first = sorted(least.values(), key=lambda c: (c.bound_s, -c.mbs))
    chosen = {id(c) for c in first}
    candidates = first + [c for c in candidates if id(c) not in chosen]

    fastest_s: float | None = None
    tried: list[tuple[Candidate, SimResult, str]] = []
    for cand in candidates:
        if len(tried) >= MAX_SIMULATIONS:
            break
        if len(tried) >= len(first) and fastest_s is not None and cand.bound_s > fastest_s * (1 + NEAR_TIE):
            break
        sim, why = _simulate(contexts[cand.mbs], cand.policy)
        tried.append((cand, sim, why))
        if not why and (fastest_s is None or sim.step_time_s < fastest_s):
            fastest_s = sim.step_time_s
    best = None
    if fastest_s is not None:
        near = [(c, r) for c, r, why in tried if not why and r.step_time_s <= fastest_s * (1 + NEAR_TIE)]
        best = min(near, key=lambda t: (movement(t[0].policy), -t[0].mbs, t[1].step_time_s))
        ctx = contexts[best[0].mbs]
        for paced in swap_pacing(best[0].policy):  # [Note: swap pacing]
            sim, why = _simulate(ctx, paced)
            if not why and sim.step_time_s < best[1].step_time_s:
                best = (dataclasses.replace(best[0], policy=paced, description=describe(best[0].mbs, paced)), sim)

    if best is None:
        mbs = min(mbs_options)
        # a placement whose every tier fitted but not the process as a whole: the RAM is what is short
        ram = [why for _, _, why in tried if why.startswith(_RAM_SHORT)]
        shortfall = (ram[0][len("does not fit: "):] + "; raise memory.device or memory.host" if ram
                     else _shortfall(base, mbs, dtype, optimizer, usable, budgets, safety_margin, nvme, device))
        if not shortfall and (home is not None or act is not None) and tried:
            shortfall = f"{tried[0][2]}; with memory.offload = {offload} and memory.activations = {activations}: set them to auto"
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
        chosen = Candidate(description=describe(mbs, policy), policy=policy, mbs=mbs, bound_s=0.0)
        sim = simulate_step(ctx.stats, ctx.train, device, host, nvme, policy)
        return _build_plan(name, base, contexts[mbs], chosen, sim, tried, source, False, shortfall, max_alternatives)
    ctx = contexts[best[0].mbs]
    sim = simulate_step(ctx.stats, ctx.train, device, host, nvme, best[0].policy)  # again, with its timeline
    return _build_plan(name, base, ctx, best[0], sim, tried, source, True, "", max_alternatives)


def _truncate(timeline: tuple[TimelineEvent, ...]) -> tuple[TimelineEvent, ...]:
    """At most ``MAX_TIMELINE_EVENTS``: the first three quarters and the last quarter in time, the
    ``repeated:`` marks of micro-batches not simulated, and ``omitted:`` marks over the stretch
    left out, one on each side of a ``repeated:`` mark inside it (each counting its events), so
    every stretch of the picture says what it stands for."""
    if len(timeline) <= MAX_TIMELINE_EVENTS:
        return timeline
    marks = [e for e in timeline if e.name.startswith("repeated:")]  # always kept (simulate_step)
    by_start = sorted((e for e in timeline if not e.name.startswith("repeated:")), key=lambda e: (e.start_s, e.end_s))
    room = MAX_TIMELINE_EVENTS - 2 * len(marks) - 1  # a mark inside the gap cuts it in two
    head = room * 3 // 4
    kept_head, kept_tail = by_start[:head], by_start[head - room:]
    left = by_start[head:len(by_start) - len(kept_tail)]
    start = min(max(e.end_s for e in kept_head), kept_tail[0].start_s)
    pieces, t = [], start
    for m in sorted(marks, key=lambda e: e.start_s):
        if t < m.start_s < kept_tail[0].start_s:
            pieces.append((t, m.start_s))
        t = max(t, m.end_s)
    if t < kept_tail[0].start_s or not pieces:
        pieces.append((min(t, kept_tail[0].start_s), kept_tail[0].start_s))
    gaps = []
    for k, (a, b) in enumerate(pieces):
        count = sum(1 for e in left if _piece_of(e.start_s, pieces) == k)
        gaps.append(TimelineEvent(stream="compute", start_s=a, end_s=b,
                                  name=f"omitted: {count:,} events not kept in the plan (the first three quarters "
                                       f"and the last quarter of {MAX_TIMELINE_EVENTS:,} are)"))
    return tuple(sorted(kept_head + gaps + marks + kept_tail, key=lambda e: (e.start_s, e.end_s)))


def _piece_of(t: float, pieces: list[tuple[float, float]]) -> int:
    """The stretch of ``pieces`` an event starting at ``t`` is counted in: the last that starts at
    or before it (the first for one before them all)."""
    k = 0
    for i, (a, _) in enumerate(pieces):
        if a <= t:
            k = i
    return k


def _family(cand: Candidate) -> tuple:
    policy = cand.policy
    return (cand.mbs, frozenset(c.home for c in policy.chunks), frozenset(policy.activations), policy.compress_nvme)


def _build_plan(name: str, base: ModelStats, ctx: Context, chosen: Candidate, sim: SimResult,
                tried: list[tuple[Candidate, SimResult, str]], source: str, fits: bool, shortfall: str,
                max_alternatives: int) -> Plan:
    peaks, breakdown = _peaks(ctx, sim, chosen.policy)
    bc = cost.block_chunk_ids(ctx.stats, chosen.policy.chunks)
    schedule = generate_single_device(ctx.train.num_microbatches)
    schedule = lower_chunks(schedule, chosen.policy, bc, dtype=ctx.train.dtype, clip_grad_norm=ctx.train.clip_grad_norm)
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
                                  process_bytes=_process_bytes(ctx, chosen.policy, peaks, sim),
                                  memory_timeline=sim.memory_timeline),),
        timeline=_truncate(sim.timeline),
    )
    return Plan(name=name, fits=fits, shortfall=shortfall, model=base, train=ctx.train, device=ctx.device,
                host=ctx.host, nvme=ctx.nvme, memory=chosen.policy, schedule=schedule, prediction=prediction,
                alternatives=tuple(alternatives), source=source)
