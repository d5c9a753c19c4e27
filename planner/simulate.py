"""One discrete-event simulator with two users: the planner's cost and the user's dry run.

docs/DESIGN.md rule 4. ``TaskGraph`` + ``simulate_graph`` are a generic engine: tasks run on
streams (``compute``, ``h2d``, ``d2h``, ``disk``, ``cpu``), in order per stream like CUDA
streams, after their dependencies, for a fixed duration, and allocate/free bytes per tier and
owner. ``simulate_step`` builds the task graph of one training step on one device from a
``MemoryPolicy``, counting memory exactly as docs/memory-accounting.md says (the runtime's
ledger counts the same owners with the same rules).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from memtrain.cluster.spec import DeviceSpec, HostSpec, NvmeSpec
from memtrain.planner import cost
from memtrain.planner.plan import ActPolicy, MemoryPolicy, TimelineEvent, Tier, TrainShape
from memtrain.planner.stats import ModelStats

__all__ = [
    "STREAMS", "TaskGraph", "GraphResult", "simulate_graph", "SimResult", "simulate_step", "stream_work_s",
    "SWAP_IN_LOOKAHEAD", "DISK_LOOKAHEAD", "cpu_stream",
]

STREAMS = ("compute", "h2d", "d2h", "disk", "cpu")

SWAP_IN_LOOKAHEAD = 2
"""A swapped block's copy-in may start when the backward of the block this many places above
it has ended, i.e. while the block just above runs its backward (one block of prefetch)."""
DISK_LOOKAHEAD = 3
"""Likewise for the NVMe read of a ``swap_nvme`` block: one block earlier than its copy-in."""

_END_ALLOC, _END_FREE, _START_ALLOC = 0, 1, 2  # order of memory events at the same instant


def cpu_stream(device: DeviceSpec) -> str:
    """The stream host-side CPU work (gradient accumulation, CPU Adam) runs on.

    [Note: CPU as device] When the device is the CPU itself (kind ``cpu``), the "device"
    compute and the host's CPU work share the same cores, so CPU work is serialised with
    compute on the ``compute`` stream instead of overlapping it on its own ``cpu`` stream.
    """
    return "compute" if device.kind == "cpu" else "cpu"


class TaskGraph:
    """Tasks in program order. A task may depend only on tasks added before it."""

    __slots__ = ("names", "streams", "durations", "deps", "mem", "tags")

    def __init__(self) -> None:
        self.names: list[str] = []
        self.streams: list[str] = []
        self.durations: list[float] = []
        self.deps: list[tuple[int, ...]] = []
        self.mem: list[tuple[tuple[int, str, str, int], ...]] = []
        self.tags: list[int] = []

    def __len__(self) -> int:
        return len(self.names)

    def add(
        self,
        name: str,
        stream: str,
        duration_s: float,
        *,
        deps: tuple[int, ...] | list[int] = (),
        alloc_start: tuple | list = (),
        alloc_end: tuple | list = (),
        free_end: tuple | list = (),
        tag: int = -1,
    ) -> int:
        """Add a task; memory items are ``(tier, owner, bytes)``. Returns the task's id.

        ``alloc_start`` bytes are taken when the task starts, ``alloc_end`` and ``free_end``
        when it ends (an owner allocated by one task is usually freed by another).
        """
        tid = len(self.names)
        assert stream in STREAMS, stream
        assert not deps or (min(deps) >= 0 and max(deps) < tid), (name, deps)
        self.names.append(name)
        self.streams.append(stream)
        self.durations.append(duration_s)
        self.deps.append(tuple(deps))
        mem: tuple = ()
        if alloc_start or alloc_end or free_end:
            mem = (tuple((_START_ALLOC, t, o, b) for t, o, b in alloc_start if b)
                   + tuple((_END_ALLOC, t, o, b) for t, o, b in alloc_end if b)
                   + tuple((_END_FREE, t, o, b) for t, o, b in free_end if b))
        self.mem.append(mem)
        self.tags.append(tag)
        return tid


@dataclass(frozen=True, kw_only=True, slots=True)
class GraphResult:
    """What ``simulate_graph`` found: task times and per-tier memory peaks."""

    end_s: float
    """When the last task ends."""
    start_s: tuple[float, ...]
    """Per task id."""
    finish_s: tuple[float, ...]
    """Per task id."""
    peak_bytes: dict[str, int]
    """Per tier, the most bytes held at once."""
    peak_owners: dict[str, dict[str, int]]
    """Per tier, bytes by owner at that tier's (first) peak."""

    def breakdown(self) -> dict[str, dict[str, int]]:
        """Per tier, bytes at the peak summed by owner kind (``chunk``, ``buffer``, ``act``,
        ``staging``), as ``Ledger.peak_breakdown(group=True)`` reports them."""
        out: dict[str, dict[str, int]] = {}
        for tier, owners in self.peak_owners.items():
            grouped: dict[str, int] = defaultdict(int)
            for owner, b in owners.items():
                grouped[owner.split(":", 1)[0]] += b
            out[tier] = dict(grouped)
        return out


def simulate_graph(graph: TaskGraph) -> GraphResult:
    """Run the graph: each task starts when its stream is free and its dependencies are done."""
    n = len(graph)
    start = [0.0] * n
    finish = [0.0] * n
    stream_free: dict[str, float] = dict.fromkeys(STREAMS, 0.0)
    events: list[tuple[float, int, int, int, str, str, int]] = []
    streams, durations, deps, mem = graph.streams, graph.durations, graph.deps, graph.mem
    for tid in range(n):
        t0 = stream_free[streams[tid]]
        for d in deps[tid]:
            if finish[d] > t0:
                t0 = finish[d]
        t1 = t0 + durations[tid]
        start[tid], finish[tid] = t0, t1
        stream_free[streams[tid]] = t1
        for kind, tier, owner, b in mem[tid]:
            signed = -b if kind == _END_FREE else b
            if kind == _START_ALLOC:
                events.append((t0, _START_ALLOC, tid, 0, tier, owner, signed))
            elif t1 > t0:
                events.append((t1, kind, tid, 0, tier, owner, signed))
            else:  # a zero-length task ends right after its own start, before later tasks start
                events.append((t1, _START_ALLOC, tid, 1 + kind, tier, owner, signed))
    # At one instant: ends of running tasks (their allocations, then frees), then starts in
    # program order; so a task waiting for bytes to be freed never counts them twice.
    events.sort(key=lambda e: e[:4])

    in_use: dict[str, int] = defaultdict(int)
    peak: dict[str, int] = defaultdict(int)
    peak_at: dict[str, int] = {}
    for pos, (_, _, _, _, tier, _, b) in enumerate(events):
        in_use[tier] += b
        assert in_use[tier] >= 0, f"{tier}: more freed than allocated at event {pos}"
        if in_use[tier] > peak[tier]:
            peak[tier] = in_use[tier]
            peak_at[tier] = pos
    peak_owners: dict[str, dict[str, int]] = {}
    for tier, at in peak_at.items():
        owners: dict[str, int] = defaultdict(int)
        for _, _, _, _, t, owner, b in events[: at + 1]:
            if t == tier:
                owners[owner] += b
        peak_owners[tier] = {o: b for o, b in owners.items() if b}
    return GraphResult(
        end_s=max(finish, default=0.0),
        start_s=tuple(start),
        finish_s=tuple(finish),
        peak_bytes=dict(peak),
        peak_owners=peak_owners,
    )


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
    timeline: tuple[TimelineEvent, ...]
    """Every simulated task; with extrapolation, the last simulated micro-batch and the
    optimizer are shifted to where they fall in the full step."""
    num_simulated_microbatches: int
    """Micro-batches simulated event by event (the rest are extrapolated)."""


class _StepBuilder:
    """Builds the task graph of one step (see simulate_step for the rules it follows)."""

    def __init__(self, stats: ModelStats, train: TrainShape, device: DeviceSpec, host: HostSpec,
                 nvme: NvmeSpec | None, policy: MemoryPolicy, num_microbatches: int) -> None:
        self.s, self.train, self.device, self.host, self.nvme, self.policy = stats, train, device, host, nvme, policy
        self.n = num_microbatches
        self.g = TaskGraph()
        blocks = stats.blocks
        if len(policy.activations) != len(blocks):
            raise ValueError(
                f"memory.activations: has {len(policy.activations)} entries for {len(blocks)} blocks; give one per block"
            )
        if policy.prefetch_depth < 1:
            raise ValueError(f"memory.prefetch_depth: must be >= 1, got {policy.prefetch_depth}")
        self.chunks = policy.chunks
        self.bc = cost.block_chunk_ids(stats, self.chunks)
        self.off = [c.home is not Tier.DEVICE for c in self.chunks]
        uses_nvme = any(c.home is Tier.NVME for c in self.chunks) or ActPolicy.SWAP_NVME in policy.activations
        if uses_nvme and nvme is None:
            raise ValueError("memory: the policy puts data on NVMe but no NVMe is configured; add cluster.nodes[].nvme")
        self.comp = cost.zstd_model(host.num_cpus) if policy.compress_nvme else None
        dt = train.dtype
        self.fwd = [cost.block_fwd_time_s(b, device, dt, stats.micro_batch_size) for b in blocks]
        self.bwd = [cost.block_bwd_time_s(b, device, dt, stats.micro_batch_size) for b in blocks]
        # Fetch order and last use of each off-device chunk, per pass (forward, backward).
        self.fwd_fetch, self.last_f = self._pass_order(range(len(blocks)))
        self.bwd_fetch, self.last_b = self._pass_order(range(len(blocks) - 1, -1, -1))
        # per chunk: buffer bytes (param and grad buffers are both N·c), copy times, owner names
        self.pbytes = [cost.param_buffer_bytes(c.num_elems, dt) for c in self.chunks]
        self.h2d_s = [cost.h2d_time_s(b, device) for b in self.pbytes]
        self.d2h_s = [cost.d2h_time_s(b, device) for b in self.pbytes]
        self.read_s = [cost.disk_read_time_s(b, nvme, self.comp) if c.home is Tier.NVME else 0.0
                       for b, c in zip(self.pbytes, self.chunks)]
        self.accum_s = [cost.host_grad_accum_time_s(c.num_elems, dt, host) for c in self.chunks]
        self.buf_owner = [f"buffer:param:{i}" for i in range(len(self.chunks))]
        self.grad_owner = [f"buffer:grad:{i}" for i in range(len(self.chunks))]
        self.staging_owner = [f"staging:{i}" for i in range(len(self.chunks))]
        self.cpu = cpu_stream(device)
        need = max((sum(self.off[c] for c in cs) for cs in self.bc), default=0)
        if need > policy.prefetch_depth:
            raise ValueError(
                f"memory.prefetch_depth: a block uses {need} off-device chunks at once but only "
                f"{policy.prefetch_depth} param buffers may exist; set prefetch_depth >= {need} or use larger chunks"
            )

    def _pass_order(self, order) -> tuple[list[int], dict[int, int]]:
        fetch, last = [], {}
        for j in order:
            for c in (self.bc[j] if order.step > 0 else reversed(self.bc[j])):
                if self.off[c]:
                    if c not in last:
                        fetch.append(c)
                    last[c] = j
        return fetch, last

    # -- fetch slots ------------------------------------------------------------------------

    def _issue_fetches(self) -> None:
        depth = self.policy.prefetch_depth
        while self.next_fetch < len(self.fetch_seq):
            k = self.next_fetch
            slot_dep = ()
            if k >= depth:
                rel = self.release[k - depth]
                if rel is None:
                    return
                slot_dep = (rel,)
            m, p, c = self.fetch_seq[k]
            buf = ("device", self.buf_owner[c], self.pbytes[c])
            if self.chunks[c].home is Tier.NVME:
                staging = ("host", self.staging_owner[c], self.pbytes[c])
                rd = self.g.add(f"read{m}@c{c}:{'FB'[p]}", "disk", self.read_s[c], deps=slot_dep,
                                alloc_start=(buf, staging), tag=m)
                h = self.g.add(f"PREFETCH{m}@c{c}:{'FB'[p]}", "h2d", self.h2d_s[c], deps=(rd,), free_end=(staging,), tag=m)
            else:
                h = self.g.add(f"PREFETCH{m}@c{c}:{'FB'[p]}", "h2d", self.h2d_s[c], deps=slot_dep, alloc_start=(buf,), tag=m)
            self.fetch_task[(m, p, c)] = (k, h)
            self.next_fetch += 1

    def _fetched(self, m: int, p: int, j: int) -> list[int]:
        deps = []
        for c in self.bc[j]:
            if self.off[c]:
                got = self.fetch_task.get((m, p, c))
                assert got is not None, "a fetch was not issued before its use (prefetch depth check missed it)"
                deps.append(got[1])
        return deps

    def _released(self, m: int, p: int, j: int, tid: int) -> list:
        frees = []
        last = self.last_f if p == 0 else self.last_b
        for c in self.bc[j]:
            if self.off[c] and last[c] == j:
                k, _ = self.fetch_task[(m, p, c)]
                self.release[k] = tid
                frees.append(("device", self.buf_owner[c], self.pbytes[c]))
        return frees

    # -- the step ---------------------------------------------------------------------------

    def build(self) -> TaskGraph:
        g, s, n, L = self.g, self.s, self.n, len(self.s.blocks)
        dt, acts = self.train.dtype, self.policy.activations
        self.fetch_seq = [(m, p, c) for m in range(n) for p, seq in ((0, self.fwd_fetch), (1, self.bwd_fetch)) for c in seq]
        self.release: list[int | None] = [None] * len(self.fetch_seq)
        self.fetch_task: dict[tuple[int, int, int], tuple[int, int]] = {}
        self.next_fetch = 0
        prev_accum: dict[int, int] = {}
        self._issue_fetches()
        dev, hst, nvm = Tier.DEVICE.value, Tier.HOST.value, Tier.NVME.value
        for m in range(n):
            swap_out: dict[int, int] = {}
            disk_write: dict[int, int] = {}
            disk_read: dict[int, int] = {}
            swap_in: dict[int, int] = {}
            # forward, blocks in order
            for j in range(L):
                b, pol, owner = s.blocks[j], acts[j], f"act:{s.blocks[j].name}:{m}"  # the runtime's act_owner
                held = b.input_bytes if pol is ActPolicy.RECOMPUTE else b.activation_bytes
                tid = len(g)  # the id this F will get (needed to record releases before adding it)
                frees = self._released(m, 0, j, tid)
                f = g.add(f"F{m}:{j}", "compute", self.fwd[j], deps=self._fetched(m, 0, j),
                          alloc_end=[(dev, owner, held)], free_end=frees, tag=m)
                assert f == tid
                if j == L - 1:
                    last_fwd_task = f
                if pol in (ActPolicy.SWAP_HOST, ActPolicy.SWAP_NVME):
                    a = b.activation_bytes
                    so = g.add(f"SWAP_OUT{m}:{j}", "d2h", cost.d2h_time_s(a, self.device), deps=(f,),
                               alloc_start=[(hst, owner, a)], free_end=[(dev, owner, a)], tag=m)
                    swap_out[j] = so
                    if pol is ActPolicy.SWAP_NVME:
                        disk_write[j] = g.add(f"write{m}:{j}", "disk", cost.disk_write_time_s(a, self.nvme, self.comp),
                                              deps=(so,), alloc_start=[(nvm, owner, a)], free_end=[(hst, owner, a)], tag=m)
                self._issue_fetches()

            def trigger(j: int, ahead: int, trig_b: dict[int, int]) -> int:
                return trig_b[j + ahead] if j + ahead <= L - 1 else last_fwd_task

            b_task: dict[int, int] = {}

            def owner_of(j: int) -> str:
                return f"act:{s.blocks[j].name}:{m}"

            def issue_swaps(upto_read: int, upto_in: int) -> None:
                # NVMe reads for blocks >= upto_read and copy-ins for blocks >= upto_in not yet issued
                for j in range(L - 1, upto_read - 1, -1):
                    if j >= 0 and acts[j] is ActPolicy.SWAP_NVME and j not in disk_read:
                        a = s.blocks[j].activation_bytes
                        disk_read[j] = g.add(f"read{m}:{j}", "disk", cost.disk_read_time_s(a, self.nvme, self.comp),
                                             deps=(disk_write[j], trigger(j, DISK_LOOKAHEAD, b_task)),
                                             alloc_start=[(hst, owner_of(j), a)], free_end=[(nvm, owner_of(j), a)], tag=m)
                for j in range(L - 1, upto_in - 1, -1):
                    if j >= 0 and acts[j] in (ActPolicy.SWAP_HOST, ActPolicy.SWAP_NVME) and j not in swap_in:
                        a = s.blocks[j].activation_bytes
                        src = disk_read[j] if acts[j] is ActPolicy.SWAP_NVME else swap_out[j]
                        swap_in[j] = g.add(f"SWAP_IN{m}:{j}", "h2d", cost.h2d_time_s(a, self.device),
                                           deps=(src, trigger(j, SWAP_IN_LOOKAHEAD, b_task)),
                                           alloc_start=[(dev, owner_of(j), a)], free_end=[(hst, owner_of(j), a)], tag=m)

            issue_swaps(L - DISK_LOOKAHEAD, L - SWAP_IN_LOOKAHEAD)
            # backward, blocks in reverse
            for j in range(L - 1, -1, -1):
                b, pol, owner = s.blocks[j], acts[j], f"act:{s.blocks[j].name}:{m}"
                deps = self._fetched(m, 1, j)
                if j in swap_in:
                    deps.append(swap_in[j])
                if pol is ActPolicy.RECOMPUTE:
                    g.add(f"R{m}:{j}", "compute", self.fwd[j], deps=deps, alloc_start=[(dev, owner, b.activation_bytes)], tag=m)
                    deps = []
                grads, host_acc = [], []
                for c in self.bc[j]:
                    if self.off[c] and self.last_f[c] == j:  # first use in backward order
                        ne = self.chunks[c].num_elems
                        grads.append((dev, f"buffer:grad:{c}", cost.grad_buffer_bytes(ne, dt)))
                        if m == 0 and self.chunks[c].home is Tier.NVME:
                            host_acc.append((hst, f"chunk:{c}", cost.host_grad_accum_bytes(ne)))
                held = b.activation_bytes + (b.input_bytes if pol is ActPolicy.RECOMPUTE else 0)
                tid = len(g)
                frees = self._released(m, 1, j, tid)
                bt = g.add(f"B{m}:{j}", "compute", self.bwd[j], deps=deps, alloc_start=grads + host_acc,
                           free_end=[(dev, owner, held)] + frees, tag=m)
                assert bt == tid
                b_task[j] = bt
                for c in self.bc[j]:
                    if self.off[c] and self.last_b[c] == j:
                        prev_accum[c] = self._grad_out(m, c, bt, prev_accum.get(c))
                        if m == n - 1:
                            self._optimizer(c, prev_accum[c])
                issue_swaps(j - DISK_LOOKAHEAD, j - SWAP_IN_LOOKAHEAD)
                self._issue_fetches()
        resident = sum(c.num_elems for c in self.chunks if c.home is Tier.DEVICE)
        if resident:
            g.add("OPTIM@device", "compute", cost.device_optimizer_time_s(resident, dt, self.train.optimizer, self.device), tag=n)
        return g

    def _grad_out(self, m: int, c: int, bt: int, prev: int | None) -> int:
        """Copy the chunk's grad buffer to the host and add it into the fp32 accumulator."""
        deps = (bt,) if prev is None else (bt, prev)  # the pinned landing buffer is reused
        d = self.g.add(f"OFFLOAD{m}@c{c}", "d2h", self.d2h_s[c], deps=deps,
                       free_end=(("device", self.grad_owner[c], self.pbytes[c]),), tag=m)
        return self.g.add(f"accum{m}@c{c}", self.cpu, self.accum_s[c], deps=(d,), tag=m)

    def _optimizer(self, c: int, after: int) -> None:
        chunk, dt, opt, tag = self.chunks[c], self.train.dtype, self.train.optimizer, self.n
        if chunk.home is Tier.HOST:
            self.g.add(f"OPTIM@c{c}", self.cpu, cost.cpu_optimizer_time_s(chunk.num_elems, opt, self.host),
                                            deps=(after,), tag=tag)
            return
        nbytes = cost.chunk_disk_bytes(chunk.num_elems, dt, opt)
        staging = (Tier.HOST.value, f"staging:{c}", cost.nvme_optim_staging_bytes(chunk.num_elems, dt, opt))
        rd = self.g.add(f"read-states@c{c}", "disk", cost.disk_read_time_s(nbytes, self.nvme, self.comp), deps=(after,),
                        alloc_start=[staging], tag=tag)
        op = self.g.add(f"OPTIM@c{c}", self.cpu, cost.cpu_optimizer_time_s(chunk.num_elems, opt, self.host), deps=(rd,), tag=tag)
        acc = (Tier.HOST.value, f"chunk:{c}", cost.host_grad_accum_bytes(chunk.num_elems))
        self.g.add(f"write-states@c{c}", "disk", cost.disk_write_time_s(nbytes, self.nvme, self.comp),
                                        deps=(op,), free_end=[staging, acc], tag=tag)


def _resident(policy: MemoryPolicy, train: TrainShape) -> dict[str, int]:
    out = {t.value: 0 for t in Tier}
    for c in policy.chunks:
        for tier, b in cost.chunk_bytes(c.home, c.num_elems, train.dtype, train.optimizer).items():
            out[tier.value] += b
    return out


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

    Per micro-batch, forward blocks in order then backward blocks in reverse (F and B alternate
    per micro-batch, so one micro-batch's activations are alive at a time). Off-device chunks
    are fetched before their first use in each pass, at most ``prefetch_depth`` param buffers
    at once (a fetch waits for the buffer freed ``prefetch_depth`` fetches earlier); nvme
    chunks come disk -> host staging -> device. Activations follow the block's policy; swap-ins
    are prefetched in backward order (``SWAP_IN_LOOKAHEAD``). After a chunk's last backward use
    its grad buffer is copied to the host accumulator; after the last micro-batch each
    off-device chunk's optimizer step runs on the CPU (nvme: read states, CPU Adam, write back)
    overlapping the rest of the backward, and device chunks step on the device at the end.

    [Note: steady-state extrapolation] With more than ``max_simulated_microbatches`` (>= 3)
    micro-batches, only that many are simulated: from the second micro-batch on the step is
    periodic (same tasks, same dependencies across the boundary), so the step time is the
    simulated end plus (n - simulated) times the period measured between the ends of the
    middle micro-batches; memory peaks repeat each period, so they are the simulated ones.
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
    r = simulate_graph(graph)
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
    peak = {t.value: 0 for t in Tier}
    peak.update(r.peak_bytes)
    resident = _resident(policy, train)
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
        timeline=events,
        num_simulated_microbatches=n_sim,
    )


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
    bc = cost.block_chunk_ids(s, policy.chunks)
    for b, pol in zip(s.blocks, policy.activations):
        work["compute"] += n * cost.block_fwd_time_s(b, device, dt, s.micro_batch_size) * (2 if pol is ActPolicy.RECOMPUTE else 1)
        work["compute"] += n * cost.block_bwd_time_s(b, device, dt, s.micro_batch_size)
        if pol in (ActPolicy.SWAP_HOST, ActPolicy.SWAP_NVME):
            work["d2h"] += n * cost.d2h_time_s(b.activation_bytes, device)
            work["h2d"] += n * cost.h2d_time_s(b.activation_bytes, device)
        if pol is ActPolicy.SWAP_NVME:
            work["disk"] += n * (cost.disk_write_time_s(b.activation_bytes, nvme, comp) + cost.disk_read_time_s(b.activation_bytes, nvme, comp))
    used = {c for cs in bc for c in cs}
    resident = 0
    for c in policy.chunks:
        ne = c.num_elems
        if c.home is Tier.DEVICE:
            resident += ne
            continue
        nbytes = cost.param_buffer_bytes(ne, dt)
        passes = 2 * n if c.index in used else 0
        work["h2d"] += passes * cost.h2d_time_s(nbytes, device)
        work["d2h"] += (n if c.index in used else 0) * cost.d2h_time_s(nbytes, device)
        work[cpu] += (n if c.index in used else 0) * cost.host_grad_accum_time_s(ne, dt, host)
        work[cpu] += cost.cpu_optimizer_time_s(ne, opt, host) if c.index in used else 0.0
        if c.home is Tier.NVME and c.index in used:
            disk_bytes = cost.chunk_disk_bytes(ne, dt, opt)
            work["disk"] += passes * cost.disk_read_time_s(nbytes, nvme, comp)
            work["disk"] += cost.disk_read_time_s(disk_bytes, nvme, comp) + cost.disk_write_time_s(disk_bytes, nvme, comp)
    work["compute"] += cost.device_optimizer_time_s(resident, dt, opt, device)
    return work
