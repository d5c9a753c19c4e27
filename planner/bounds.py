"""Per-stream work of a step without simulating it, and the param-buffer fetches it makes.

``stream_work_s`` is the search's lower bound (planner.search screens candidates with it before
simulating them); ``fetch_counts`` counts the fetches of the step's program (planner.program),
which the engine runs and the simulator times. Both use the durations ``simulate_step`` uses, and the
tests check them against the simulated graph.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from memtrain.cluster.spec import DeviceSpec, HostSpec, NvmeSpec
from memtrain.planner import cost
from memtrain.planner.plan import ActPolicy, MemoryPolicy, Op, Tier, TrainShape
from memtrain.planner.program import Layout, lower_passes
from memtrain.planner.program_optim import early_updates
from memtrain.planner.simulate_builder import _flush_copy_s, copy_streams, cpu_stream, grads_stream
from memtrain.planner.stats import ModelStats
from memtrain.planner.taskgraph import STREAMS

__all__ = ["stream_work_s", "fetch_counts"]


def stream_work_s(
    stats: ModelStats, train: TrainShape, device: DeviceSpec, host: HostSpec, nvme: NvmeSpec | None, policy: MemoryPolicy
) -> dict[str, float]:
    """Total busy time per stream over one step, with the durations ``simulate_step`` uses.

    Each stream runs its tasks one at a time, so the step takes at least the largest of these:
    the search's lower bound for skipping candidates before simulating them.
    """
    s = stats.scaled(train.micro_batch_size)
    n, dt, opt = train.num_microbatches, train.dtype, train.optimizer
    comp = cost.zstd_model(host.num_cpus) if policy.compress_nvme else None
    work = dict.fromkeys(STREAMS, 0.0)
    cpu = cpu_stream(device)
    copy_in, copy_out = copy_streams(device)
    bc = cost.block_chunk_ids(s, policy.chunks)
    work["compute"] += n * s.overhead_microbatch_s
    disk_r = disk_w = 0.0  # seconds of NVMe reads and writes
    for b, pol in zip(s.blocks, policy.activations):
        fwd_s = cost.block_fwd_time_s(b, device, dt, s.micro_batch_size) + cost.block_overhead_s(s, b, backward=False)
        work["compute"] += n * fwd_s * (2 if pol is ActPolicy.RECOMPUTE else 1)
        work["compute"] += n * (cost.block_bwd_time_s(b, device, dt, s.micro_batch_size) + cost.block_overhead_s(s, b, backward=True))
        if pol in (ActPolicy.SWAP_HOST, ActPolicy.SWAP_NVME):
            work[copy_out] += n * cost.d2h_time_s(b.activation_bytes, device)
            work[copy_in] += n * cost.h2d_time_s(b.activation_bytes, device)
        if pol is ActPolicy.SWAP_NVME:
            disk_w += n * cost.disk_write_time_s(b.activation_bytes, nvme, comp)
            disk_r += n * cost.disk_read_time_s(b.activation_bytes, nvme, comp)
    off = [c.home is not Tier.DEVICE for c in policy.chunks]
    uses = [tuple(c for c in cs if off[c]) for cs in bc]
    num_fetches = fetch_counts(uses, policy.prefetch_depth, n)
    # offload.optim [Note: fetch from a write-back]: these chunks' fetches copy from host until the
    # training thread waits for their write-backs, which may be as late as their next update
    # ([Note: carried write-backs released lazily]); so, for a lower bound, none of them reads.
    early = early_updates(dt, train.clip_grad_norm)
    on_nvme = [c.index for c in policy.chunks if c.home is Tier.NVME]
    carried = set(cost.carried_write_backs(uses, on_nvme, policy.optim_staged_chunks)) if early and on_nvme else set()
    resident = 0
    for c in policy.chunks:
        ne = c.num_elems
        if c.home is Tier.DEVICE:
            resident += ne
            continue
        if c.index not in num_fetches:
            continue
        nbytes = cost.param_buffer_bytes(ne, dt)
        fetches = num_fetches[c.index]
        work[copy_in] += fetches * cost.h2d_time_s(nbytes, device)
        work["compute"] += fetches * s.overhead_chunk_fetch_s
        flush_s = _flush_copy_s(nbytes, device)
        if flush_s:
            work[copy_out] += n * flush_s
        work[grads_stream(device)] += n * cost.host_grad_accum_time_s(ne, dt, host)
        work[cpu] += cost.cpu_optimizer_time_s(ne, opt, host, clip=train.clip_grad_norm)
        if c.home is Tier.NVME:
            disk_bytes = cost.chunk_disk_bytes(ne, dt, opt)
            read_bytes = cost.nvme_optim_read_bytes(ne, dt, opt, early=early)
            if c.index not in carried:
                disk_r += fetches * cost.disk_read_time_s(nbytes, nvme, comp)
            disk_r += cost.disk_read_time_s(read_bytes, nvme, comp)
            disk_w += cost.disk_write_time_s(disk_bytes, nvme, comp)
    work["compute"] += cost.device_optimizer_time_s(resident, dt, opt, device, clip=train.clip_grad_norm)
    work["disk"] += disk_r + disk_w
    if device.kind == "cpu" and nvme is not None:  # simulate_builder [Note: the store's CPU on a CPU device]
        work["compute"] += nvme.read_cpu_share * disk_r + nvme.write_cpu_share * disk_w
    return work


def fetch_counts(uses: Sequence[Sequence[int]], prefetch_depth: int, num_microbatches: int) -> dict[int, int]:
    """Param-buffer fetches per chunk over one step: the ``PREFETCH`` actions of the step's
    program (planner.program), counted without building a graph. ``uses[j]``: block ``j``'s
    off-device chunks. The first micro-batch starts with nothing resident, the last releases
    everything, and those between repeat one another (what each leaves resident depends only on
    the rules), so at most three are lowered and the middle one counts ``num_microbatches - 2``
    times."""
    layout = Layout(uses=tuple(tuple(u) for u in uses), off=frozenset(c for u in uses for c in u),
                    prefetch_depth=prefetch_depth)
    n = num_microbatches
    walked = min(n, 3)
    counts: dict[int, int] = defaultdict(int)
    for m, (fwd, bwd) in enumerate(lower_passes(layout, walked)):
        weight = n - 2 if walked == 3 and m == 1 else 1
        for a in fwd + bwd:
            if a.op is Op.PREFETCH:
                counts[a.chunk] += weight
    return dict(counts)
