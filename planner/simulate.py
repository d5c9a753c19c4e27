"""One discrete-event simulator with two users: the planner's cost and the user's dry run.

docs/DESIGN.md rule 4. The generic engine (``TaskGraph``, ``simulate_graph``: tasks on streams,
in order per stream, after their dependencies, allocating and freeing bytes per tier and
owner) lives in memtrain.planner.taskgraph and is re-exported here. ``simulate_step`` builds the
task graph of one training step on one device from a ``MemoryPolicy`` (planner.simulate_builder,
whose stream helpers are re-exported here), counting memory exactly as docs/memory-accounting.md
says (the runtime's ledger counts the same owners with the same rules), runs it and extrapolates
the micro-batches not simulated.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate, groupby

from memtrain.cluster.spec import DeviceSpec, HostSpec, NvmeSpec
from memtrain.planner import cost, footprint
from memtrain.planner.plan import (
    DEFAULT_SWAP_IN_AHEAD, DEFAULT_SWAP_WRITES_IN_FLIGHT, MemoryPoint, MemoryPolicy, TimelineEvent, Tier, TrainShape,
)
from memtrain.planner.simulate_builder import _StepBuilder, copy_streams, cpu_stream, grads_stream
from memtrain.planner.stats import BlockStats, ModelStats
from memtrain.planner.taskgraph import STREAMS, GraphResult, TaskGraph, simulate_graph

__all__ = [
    "STREAMS", "TaskGraph", "GraphResult", "simulate_graph", "SimResult", "simulate_step", "grads_stream",
    "SWAP_IN_BLOCKS_AHEAD", "SWAP_IN_LOOKAHEAD", "MAX_NVME_SWAP_WRITES_IN_FLIGHT", "NVME_OPTIM_STAGED_CHUNKS", "cpu_stream", "copy_streams",
]


SWAP_IN_BLOCKS_AHEAD = DEFAULT_SWAP_IN_AHEAD
"""The default of ``MemoryPolicy.swap_in_ahead`` ([Note: swap-in lookahead])."""
MAX_NVME_SWAP_WRITES_IN_FLIGHT = DEFAULT_SWAP_WRITES_IN_FLIGHT
"""The default of ``MemoryPolicy.swap_writes_in_flight`` ([Note: bounded NVMe writes])."""
NVME_OPTIM_STAGED_CHUNKS = 3
"""The default of ``MemoryPolicy.optim_staged_chunks``. [Note: early optimizer step] During the last micro-batch's backward, a host- or nvme-home
chunk's optimizer update starts when its gradients are complete (its grad buffer was added into
the host accumulator), on a background thread (the ``cpu`` stream; on a CPU device on the
training thread, the compute stream, where an nvme chunk's update runs at the next chunk's
queueing or at the step's end: offload.optim [Note: where early updates run]); an nvme chunk's
states are
read into host staging taken at that point of the training thread, after the write-backs the
program waits for there (``OPTIM_WAIT``, so at most ``MemoryPolicy.optim_staged_chunks`` chunks are
staged). Those points are the program's (planner.program_optim), which the engine runs and this
simulator times. Not under fp16, whose loss scaling needs every gradient first (the optimizer
then runs after the backward)."""
SWAP_IN_LOOKAHEAD = SWAP_IN_BLOCKS_AHEAD + 1
"""Swapped blocks whose activations may be on the device at once besides the running block's
(the search's footprint estimate): the one in backward and those brought back ahead."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SimResult:
    step_time_s: float
    """One optimizer step: from the first fetch or forward to the last optimizer write."""
    tokens_per_s: float
    """Tokens of the global batch / step time."""
    mfu: float
    """Model FLOPs per step (without recompute) / (step time × peak FLOP/s of the dtype)."""
    peak_bytes: dict[str, int]
    """Per tier (``device``, ``host``, ``nvme``), peak bytes of the ledger's owners (no workspace)."""
    breakdown: dict[str, dict[str, int]]
    """Per tier, bytes at the peak by owner kind (``chunk``, ``buffer``, ``act``, ``staging``)."""
    pooled_peak_bytes: int
    """The most bytes the device and host tiers' chunks, buffers and staging held at once (on a
    CPU device the chunk store's buffer pool serves them all: offload.bufpool)."""
    pooled_resident_bytes: int
    """Of ``pooled_peak_bytes``, the chunks that live on the device and host tiers all step."""
    act_peak_bytes: int
    """The most bytes activations held at once in memory, the device and host tiers together
    (torch allocates them; a swap_nvme block's file is on disk)."""
    mapped_peak_bytes: int
    """The most bytes the pooled owners (resident chunks included) and the activations in
    storages of their own mapping held at once ([Note: process memory])."""
    heap_act_peak_bytes: int
    """The most bytes activations in storages from the C heap held at once ([Note: process memory])."""
    timeline: tuple[TimelineEvent, ...]
    """Every simulated task; with extrapolation, the last simulated micro-batch and the
    optimizer are shifted to where they fall in the full step."""
    memory_timeline: tuple[MemoryPoint, ...]
    """Per tier, the ledger's bytes in use over the step (``_memory_line``); empty without a timeline."""
    num_simulated_microbatches: int
    """Micro-batches simulated event by event (the rest are extrapolated)."""



def _resident(policy: MemoryPolicy, train: TrainShape) -> dict[str, int]:
    out = {t.value: 0 for t in Tier}
    for c in policy.chunks:
        for tier, b in cost.chunk_bytes(c.home, c.num_elems, train.dtype, train.optimizer).items():
            out[tier.value] += b
        if c.home is Tier.NVME:  # the store's files: each with a header and padded (offload.nvme)
            out[Tier.NVME.value] += cost.nvme_chunk_file_bytes(c.num_elems, train.dtype, train.optimizer) - \
                cost.chunk_disk_bytes(c.num_elems, train.dtype, train.optimizer)
    return out


def _memory_groups(blocks: Sequence[BlockStats]) -> Callable[[str, str, int], tuple[tuple[str, int], ...]]:
    """The groups ``simulate_graph`` sums for the process's memory (planner.footprint [Note:
    process memory]), on the device and host tiers only (the NVMe tier's files are on disk):
    ``pooled``, the chunk store's own bytes; ``act``, activations (torch's allocations); of these,
    ``heap_act`` in storages the C heap keeps when freed; and ``mapped``, the pooled bytes with
    the activations in storages of their own mapping, returned when freed. A block's activations
    as its forward saved them split by ``footprint.returned_bytes`` of their storages; any other
    activation bytes (a recompute block's input, a swap's flat copy) are one storage."""
    returned = {b.name: (b.activation_bytes, footprint.returned_bytes(b.saved_storage_bytes))
                for b in blocks if b.saved_storage_bytes}

    def groups(tier: str, owner: str, nbytes: int) -> tuple[tuple[str, int], ...]:
        if tier not in (Tier.DEVICE.value, Tier.HOST.value):
            return ()
        if not owner.startswith("act"):
            return (("pooled", nbytes), ("mapped", nbytes))
        whole, part = returned.get(owner[4:].rsplit(":", 1)[0], (None, 0))
        if tier != Tier.DEVICE.value or nbytes != whole:
            part = footprint.returned_bytes((nbytes,))
        return ("act", nbytes), ("mapped", part), ("heap_act", nbytes - part)

    return groups


def simulate_step(
    stats: ModelStats,
    train: TrainShape,
    device: DeviceSpec,
    host: HostSpec,
    nvme: NvmeSpec | None,
    policy: MemoryPolicy,
    *,
    max_simulated_microbatches: int | None = 4,
    timeline: bool = True,
) -> SimResult:
    """Simulate one optimizer step on one device.

    The graph follows the step's program ([Note: program order]), its compute markers in the
    program's order (the engine's: per micro-batch, forward blocks in order, then backward
    blocks in reverse), with the rules of docs/memory-accounting.md. At each block's start in either
    pass its off-device chunks are fetched if not resident, then chunks of the following blocks
    of that pass are prefetched while fewer than ``prefetch_depth`` param buffers exist; a
    buffer is released after the last block of a run of consecutive blocks using the chunk (in
    backward: as soon as the chunk's gradients are complete). nvme chunks come disk -> host
    staging -> device, the copy out of staging when the block needs it. Activations follow the
    block's policy; a swapped block's copies out and back start at the program's ``SWAP_OUT`` and
    ``SWAP_IN`` (planner.program_swaps [Note: the swap rules], from ``policy.swap_in_ahead``),
    NVMe swap writes are waited for by its rule 4 (``policy.swap_writes_in_flight``). A chunk's
    grad buffer is taken at its first backward use and added into the host accumulator when its
    gradients are complete.
    In the last micro-batch each host/NVMe chunk's update starts when its gradients are flushed
    ([Note: early optimizer step]); after the backward the device chunks step and the early
    updates are waited for. Under fp16 the optimizer runs after the last micro-batch: device and
    host chunks, then NVMe chunks streamed, at the program's final points (planner.program_optim
    [Note: the step's end]; ``_StepBuilder._optimizer``).

    [Note: steady-state extrapolation] With more than ``max_simulated_microbatches`` (>= 3)
    micro-batches, only that many are simulated: from the second micro-batch on the step is
    periodic (same tasks, same dependencies across the boundary), so the step time is the
    simulated end plus (n - simulated) times the period measured between the ends of the
    middle micro-batches; memory peaks repeat each period, so they are the simulated ones. The
    timeline marks the micro-batches not simulated with one ``repeated: ...`` event over the
    time they take.
    ``None`` simulates every micro-batch (tests compare both). ``timeline=False`` skips
    building the event list (the search screens candidates without it).
    """
    s = stats.scaled(train.micro_batch_size)
    n = train.num_microbatches
    if n < 1:
        raise ValueError(f"train.num_microbatches: must be >= 1, got {n}")
    if max_simulated_microbatches is not None and max_simulated_microbatches < 3:
        raise ValueError("max_simulated_microbatches: must be >= 3 (or None to simulate all)")
    n_sim = n if max_simulated_microbatches is None else min(n, max_simulated_microbatches)
    graph = _StepBuilder(s, train, device, host, nvme, policy, n_sim).build()
    r = simulate_graph(graph, group=_memory_groups(s.blocks), record=timeline)
    shift = 0.0
    if n_sim < n:
        mb_end = [0.0] * (n_sim + 1)
        for tid, tag in enumerate(graph.tags):
            if 0 <= tag and r.finish_s[tid] > mb_end[tag]:
                mb_end[tag] = r.finish_s[tid]
        shift = (n - n_sim) * (mb_end[n_sim - 2] - mb_end[n_sim - 3])
    step_time_s = r.end_s + shift
    events = tuple(
        TimelineEvent(stream=graph.streams[t], name=graph.names[t],
                      start_s=r.start_s[t] + (shift if graph.tags[t] >= n_sim - 1 else 0.0),
                      end_s=r.finish_s[t] + (shift if graph.tags[t] >= n_sim - 1 else 0.0))
        for t in range(len(graph))
    ) if timeline else ()
    if timeline and shift > 0:  # the micro-batches not simulated, marked where they would run
        period = shift / (n - n_sim)
        events += (TimelineEvent(
            stream="compute", start_s=mb_end[n_sim - 2], end_s=mb_end[n_sim - 2] + shift,
            name=f"repeated: micro-batches {n_sim - 1}-{n - 2}, each as micro-batch {n_sim - 2} "
                 f"({period:.3g} s each; not drawn)"),)
    peak = {t.value: 0 for t in Tier}
    peak.update(r.peak_bytes)
    resident = _resident(policy, train)
    memory = _memory_line(graph, r, resident, shift, n_sim, n) if timeline else ()
    # Resident chunks are held all step; the graph only carries transient owners.
    breakdown = r.breakdown()
    for tier in peak:
        peak[tier] += resident[tier]
        if resident[tier]:
            breakdown.setdefault(tier, {})
            breakdown[tier]["chunk"] = breakdown[tier].get("chunk", 0) + resident[tier]
    model_flops = n * (s.fwd_flops + s.bwd_flops)
    peak_flops = device.peak_flops(str(train.dtype))
    return SimResult(
        step_time_s=step_time_s,
        tokens_per_s=train.tokens_per_step / step_time_s if step_time_s > 0 else 0.0,
        mfu=model_flops / (step_time_s * peak_flops) if step_time_s > 0 and peak_flops > 0 else 0.0,
        peak_bytes=peak,
        breakdown=breakdown,
        pooled_peak_bytes=r.group_peak_bytes.get("pooled", 0) + resident[Tier.DEVICE.value] + resident[Tier.HOST.value],
        pooled_resident_bytes=resident[Tier.DEVICE.value] + resident[Tier.HOST.value],
        act_peak_bytes=r.group_peak_bytes.get("act", 0),
        mapped_peak_bytes=r.group_peak_bytes.get("mapped", 0) + resident[Tier.DEVICE.value] + resident[Tier.HOST.value],
        heap_act_peak_bytes=r.group_peak_bytes.get("heap_act", 0),
        timeline=events,
        memory_timeline=memory,
        num_simulated_microbatches=n_sim,
    )


MAX_MEMORY_POINTS = 2000
"""Points kept per tier in ``SimResult.memory_timeline``."""


def _memory_line(graph: TaskGraph, r: GraphResult, resident: dict[str, int], shift: float,
                 n_sim: int, n: int) -> tuple[MemoryPoint, ...]:
    """Per tier, the bytes in use (resident chunks included) at each change over the whole step,
    the last simulated micro-batch and the optimizer shifted as the timeline is ([Note:
    steady-state extrapolation]). The micro-batches not simulated are drawn: each repeats the
    one before them (``n_sim - 2``), so its allocations and frees are that one's, a period later
    each. A line longer than ``MAX_MEMORY_POINTS`` keeps the highest point of each stretch, so
    the peak stays on it."""
    moves: dict[str, list[tuple[float, int]]] = defaultdict(list)
    period = shift / (n - n_sim) if n > n_sim else 0.0
    for t, tid, tier, b in r.memory_events:
        tag = graph.tags[tid]
        moves[tier].append((t + (shift if tag >= n_sim - 1 else 0.0), b))
        if tag == n_sim - 2 and period > 0:
            moves[tier] += [(t + k * period, b) for k in range(1, n - n_sim + 1)]
    out: list[MemoryPoint] = []
    for tier in sorted(set(moves) | {k for k, v in resident.items() if v}):
        level = resident.get(tier, 0)
        line: list[tuple[float, int]] = [(0.0, level)]
        for t, at in groupby(sorted(moves.get(tier, []), key=lambda m: m[0]), key=lambda m: m[0]):  # stable
            levels = list(accumulate((b for _, b in at), initial=level))[1:]
            high, level = max(levels), levels[-1]  # the most held within the instant, and after it
            line.append((t, high))
            if level != high:  # an allocation freed within the same instant: up, then down
                line.append((t, level))
        if len(line) > MAX_MEMORY_POINTS:
            size = -(-len(line) // MAX_MEMORY_POINTS)
            line = [max(line[k:k + size], key=lambda p: p[1]) for k in range(0, len(line), size)]
        out += [MemoryPoint(tier=tier, t_s=t, bytes=v) for t, v in line]
    return tuple(out)
