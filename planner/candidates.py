"""The search's space: the memory policies tried for one device, and the pacing tried for the chosen one.

``candidates_for`` enumerates, for one micro-batch size and chunking, how many leading chunks stay
on the device (the rest on host, then NVMe), the prefetch depth, a per-block activation policy
chosen greedily (with and without swaps), zstd for NVMe and the optimizer's NVMe staging, each
with its lower bound on step time (planner.bounds). ``swap_pacing`` gives the swap pacings the
search simulates for the policy it chose. planner.search ranks, simulates and picks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from memtrain.cluster.spec import DeviceSpec, HostSpec, NvmeSpec
from memtrain.planner import cost
from memtrain.planner.bounds import stream_work_s
from memtrain.planner.plan import (
    DEFAULT_SWAP_IN_AHEAD, DEFAULT_SWAP_WRITES_IN_FLIGHT, ActPolicy, ChunkPlan, MemoryPolicy, Tier, TrainShape,
)
from memtrain.planner.simulate import SWAP_IN_LOOKAHEAD
from memtrain.planner.stats import ModelStats, dtype_bytes

__all__ = [
    "CHUNK_SIZE_CANDIDATES", "OPTIM_STAGINGS", "MAX_OPTIM_STAGINGS", "MAX_CHUNKS_PER_BLOCK", "Candidate", "Context",
    "divisors_desc", "chunk_partitions", "greedy_activations", "movement", "describe", "candidates_for", "swap_pacing",
]

CHUNK_SIZE_CANDIDATES = (32 << 20, 64 << 20, 128 << 20)
"""Chunk sizes tried, in elements (plus one block's worth, and finer cuts for small models)."""
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
MAX_CHUNKS_PER_BLOCK = 2
"""Chunk counts above 2 per block (+ 8) are not tried: more chunks cost simulation time and
PCIe latency without saving device memory a larger prefetch depth would not."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Candidate:
    description: str
    policy: MemoryPolicy
    mbs: int
    bound_s: float
    """Lower bound on the step time (busiest stream)."""


@dataclass(kw_only=True, slots=True)
class Context:
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


def divisors_desc(n: int) -> list[int]:
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


def chunk_partitions(stats: ModelStats, param_numels: Mapping[str, int] | None, *, only: int | None = None,
                      ) -> list[tuple[int, list[tuple[tuple[str, ...], int]]]]:
    """Distinct chunkings to try, as ``(chunk_size_elems, packed)``; just ``only``'s when given."""
    total = sum(b.num_params for b in stats.blocks)
    biggest = max((b.num_params for b in stats.blocks), default=1)
    if only is not None:
        return [(only, cost.pack_chunks(stats, only, param_numels))]
    sizes = set(CHUNK_SIZE_CANDIDATES) | {max(1, biggest)}
    if total < 8 * CHUNK_SIZE_CANDIDATES[0]:  # small model: also cuts into ~8 and ~16 chunks
        sizes |= {max(1, math.ceil(total / 8)), max(1, math.ceil(total / 16))}
    limit = MAX_CHUNKS_PER_BLOCK * len(stats.blocks) + 8
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


def greedy_activations(ctx: Context, room_bytes: int, off_elems_per_mb: int, nvme_room: int, host_room: int, *,
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


def movement(policy: MemoryPolicy) -> tuple[int, int, int]:
    """How much a policy moves: off-device elements, blocks not kept, prefetch depth."""
    return (sum(c.num_elems for c in policy.chunks if c.home is not Tier.DEVICE),
            sum(1 for a in policy.activations if a is not ActPolicy.KEEP), policy.prefetch_depth)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def describe(mbs: int, policy: MemoryPolicy) -> str:
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


def candidates_for(ctx: Context, chunk_size: int, packed: list[tuple[tuple[str, ...], int]], *,
                    fixed_depth: int | None = None) -> list[Candidate]:
    """Memory policies for one micro-batch size and chunking; ``fixed_depth`` fixes the prefetch
    depth (a placement whose blocks need more buffers at once than that is left out)."""
    s, dt, opt = ctx.stats, ctx.train.dtype, ctx.train.optimizer
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
            options = [greedy_activations(ctx, room, sum(elems[c] for c in off), nvme_usable - nvme_need,
                                           host_room - host_need, swaps=swaps) for swaps in (True, False)]
            chunks = tuple(ChunkPlan(index=i, num_elems=n, param_names=names, home=homes[i]) for i, (names, n) in enumerate(packed))
            for acts in dict.fromkeys(a for a in options if a is not None):
                out += _policies(ctx, chunk_size, chunks, depth, acts, staged)
    return out


def fixed_candidates(ctx: Context, chunk_size: int, packed: list[tuple[tuple[str, ...], int]], *, home: Tier | None,
                     acts: ActPolicy | None, fixed_depth: int | None = None) -> list[Candidate]:
    """The candidates that keep every chunk on ``home`` and/or give every block ``acts``
    (``memory.offload``, ``memory.activations``; None leaves that choice to ``candidates_for``)."""
    nb = len(ctx.stats.blocks)
    if home is None:  # activations fixed: the placements the search would try, with those activations
        out = []
        for cand in candidates_for(ctx, chunk_size, packed, fixed_depth=fixed_depth):
            p = cand.policy
            if p.activations != (acts,) * nb:
                out += _policies(ctx, chunk_size, p.chunks, p.prefetch_depth, (acts,) * nb, p.optim_staged_chunks)
        return list({c.policy: c for c in out}.values())
    chunks = tuple(ChunkPlan(index=i, num_elems=n, param_names=names, home=home) for i, (names, n) in enumerate(packed))
    if home is Tier.DEVICE:
        depths: tuple[int, ...] = (1,)
    else:
        d0 = max((len(cs) for cs in cost.block_chunk_ids(ctx.stats, chunks)), default=1)
        depths = (d0, d0 + 1) if fixed_depth is None else (fixed_depth,) if fixed_depth >= d0 else ()
    act_options = [(acts,) * nb] if acts is not None else [(a,) * nb for a in (ActPolicy.KEEP, ActPolicy.RECOMPUTE)]
    return [c for d in depths for a in act_options for c in _policies(ctx, chunk_size, chunks, d, a, OPTIM_STAGINGS)]


def _policies(ctx: Context, chunk_size: int, chunks: tuple[ChunkPlan, ...], depth: int, acts: tuple[ActPolicy, ...],
              staged: int) -> list[Candidate]:
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
            out.append(Candidate(description=describe(train.micro_batch_size, policy),
                                  policy=policy, mbs=train.micro_batch_size, bound_s=max(work.values())))
    return out


def swap_pacing(policy: MemoryPolicy) -> list[MemoryPolicy]:
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
