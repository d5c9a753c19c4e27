"""The task graph of one simulated step on one device (planner.simulate): ``_StepBuilder`` walks
the step's program ([Note: program order]) and adds a task per compute marker, fetch, release,
swap and optimizer point, on the streams of ``copy_streams``/``cpu_stream``/``grads_stream``.
``simulate.simulate_step`` runs the graph and turns it into a ``SimResult``; the builder's
optimizer side is ``simulate_optim._OptimizerSteps``.
"""

from __future__ import annotations

from collections import defaultdict

from memtrain.cluster.spec import DeviceSpec, HostSpec, NvmeSpec
from memtrain.planner import cost
from memtrain.planner.plan import ActPolicy, MemoryPolicy, Tier, TrainShape
from memtrain.planner.stats import DType, ModelStats
from memtrain.planner.program import Layout
from memtrain.planner.program_optim import OptimLayout, early_updates, lower_steady_step
from memtrain.planner.simulate_optim import _OptimizerSteps
from memtrain.planner.simulate_program import index_program
from memtrain.planner.taskgraph import TaskGraph

__all__ = ["_StepBuilder", "_flush_copy_s", "copy_streams", "cpu_stream", "grads_stream"]


def copy_streams(device: DeviceSpec) -> tuple[str, str]:
    """Streams of host -> device and device -> host copies: ``h2d``/``d2h`` side streams on a GPU;
    on a CPU device ([Note: CPU as device]) a copy is a memcpy the training thread makes, so it
    runs on the compute stream in program order."""
    return ("compute", "compute") if device.kind == "cpu" else ("h2d", "d2h")


def cpu_stream(device: DeviceSpec) -> str:
    """The stream host-side CPU work (gradient accumulation, CPU Adam) runs on.

    [Note: CPU as device] When the device is the CPU itself (kind ``cpu``), the "device"
    compute and the host's CPU work share the same cores, so CPU work is serialised with
    compute on the ``compute`` stream instead of overlapping it on its own ``cpu`` stream.
    """
    return "compute" if device.kind == "cpu" else "cpu"


def grads_stream(device: DeviceSpec) -> str:
    """The stream gradient adds into host accumulators run on: their own host thread on a GPU
    (offload.grads [Note: asynchronous gradient flush]), the training thread's on a CPU device."""
    return cpu_stream(device) if device.kind == "cpu" else "grads"

class _StepBuilder(_OptimizerSteps):
    """Builds the task graph of one step in the runtime's program order (see simulate_step).

    [Note: program order] The ledgers record allocations when the training thread makes them,
    so every allocation and free is put on a task that runs where the runtime's call runs:
    zero-length markers on the compute stream hold the bytes taken at a block boundary (param
    buffers, NVMe staging, grad buffers), and the copies and reads they start depend on them.
    A task on another stream (a disk read, a GPU side-stream copy) then cannot shift an
    allocation later than the runtime makes it.
    """

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
        off = [c.home is not Tier.DEVICE for c in self.chunks]
        # Per block, the off-device chunks it uses (tied parameters included), as the runtime's uses.
        self.uses = [tuple(c for c in cs if off[c]) for cs in cost.block_chunk_ids(stats, self.chunks)]
        users: dict[int, list[int]] = defaultdict(list)
        for j, cs in enumerate(self.uses):
            for c in cs:
                users[c].append(j)
        # The grad buffer is taken at the chunk's first use in backward order; its gradients are
        # complete (flush, release) at its last: the first block using it in forward order.
        self.grad_at = {c: max(js) for c, js in users.items()}
        self.flush_at: dict[int, list[int]] = defaultdict(list)
        for c in cost.early_update_order(self.uses, users):  # in the order they complete
            self.flush_at[min(users[c])].append(c)
        uses_nvme = any(c.home is Tier.NVME for c in self.chunks) or ActPolicy.SWAP_NVME in policy.activations
        if uses_nvme and nvme is None:
            raise ValueError("memory: the policy puts data on NVMe but no NVMe is configured; add cluster.nodes[].nvme")
        self.comp = cost.zstd_model(host.num_cpus) if policy.compress_nvme else None
        dt = train.dtype
        # Block compute plus the runtime's overhead around each call (0 without a profile).
        self.fwd = [cost.block_fwd_time_s(b, device, dt, stats.micro_batch_size)
                    + cost.block_overhead_s(stats, b, backward=False) for b in blocks]
        self.bwd = [cost.block_bwd_time_s(b, device, dt, stats.micro_batch_size)
                    + cost.block_overhead_s(stats, b, backward=True) for b in blocks]
        self.pbytes = [cost.param_buffer_bytes(c.num_elems, dt) for c in self.chunks]
        self.h2d_s = [cost.h2d_time_s(b, device) for b in self.pbytes]
        self.flush_s = [_flush_copy_s(b, device) for b in self.pbytes]
        self.read_s = [cost.disk_read_time_s(b, nvme, self.comp) if c.home is Tier.NVME else 0.0
                       for b, c in zip(self.pbytes, self.chunks)]
        self.accum_s = [cost.host_grad_accum_time_s(c.num_elems, dt, host) for c in self.chunks]
        self.cpu = cpu_stream(device)
        self.grads = grads_stream(device)
        self.copy_in, self.copy_out = copy_streams(device)
        self.early = early_updates(train.dtype, train.clip_grad_norm)  # [Note: early optimizer step]
        self.optim_tasks: list[int] = []  # early updates queued on the background thread
        self.writing: list[tuple[int, int | None]] = []  # (chunk, update task or None: deferred) whose staging is held
        self.inline = device.kind == "cpu"  # offload.optim [Note: where early updates run]
        self.deferred: dict[int, tuple[int, int]] = {}  # inline nvme chunk -> (its states read, its accumulation)
        # offload.optim [Note: write-backs across the step end]: those the last step left running
        layout = Layout.of(policy, self.uses)
        opt = OptimLayout(staged_chunks=policy.optim_staged_chunks, early=self.early)
        self.behind: dict[int, int] = {}  # carried chunk -> its write, not yet waited for; oldest first
        self.carried_copies: dict[int, list[int]] = defaultdict(list)  # [Note: fetch from a write-back]
        self.ahead: dict[int, int] = {}  # chunk -> its states read ahead
        # The step's program (planner.program, planner.program_optim), which the engine runs: per
        # pass and block, the chunks fetched before the block and released after it, and the
        # optimizer's points after a backward block's marker.
        hand_off = self.early and DType(train.dtype) is DType.FP32
        program, carried = lower_steady_step(layout, opt, num_microbatches, hand_off=hand_off)
        self.carried = list(carried)
        # and its swaps (planner.program_swaps [Note: the swap rules]), filed per marker
        # (planner.simulate_program: one handler per op; an op without a cost fails)
        at = index_program(program)
        self.fetch_at, self.release_at, self.optim_at = at.fetch_at, at.release_at, at.optim_at
        self.markers, self.final_points = at.markers, at.final_points
        self.swap_out_at, self.swap_in_before, self.swap_in_after = at.swap_out_at, at.swap_in_before, at.swap_in_after
        need = max((len(cs) for cs in self.uses), default=0)
        if need > policy.prefetch_depth:
            raise ValueError(
                f"memory.prefetch_depth: a block uses {need} off-device chunks at once but only "
                f"{policy.prefetch_depth} param buffers may exist; set prefetch_depth >= {need} or use larger chunks"
            )

    def _disk_read(self, name: str, seconds: float, **kw) -> int:
        """A read on the in-order disk stream ([Note: the store's CPU on a CPU device])."""
        return self._disk(name, seconds, self.nvme.read_cpu_share, **kw)

    def _disk_write(self, name: str, seconds: float, **kw) -> int:
        """A durable write on the in-order disk stream ([Note: the store's CPU on a CPU device])."""
        return self._disk(name, seconds, self.nvme.write_cpu_share, **kw)

    def _disk(self, name: str, seconds: float, cpu_share: float, *, deps: tuple[int, ...], tag: int, **mem) -> int:
        """[Note: the store's CPU on a CPU device] The NVMe store's threads spend ``cpu_share`` CPU
        seconds per second of transfer (checksums, the kernel's side: ``runtime.disk_probe``). A
        CPU device's compute uses every core, its threads meeting at each op's end, so that time is
        taken from it one for one: a task of that length joins the compute stream where the
        transfer is issued (free where the compute would wait for the transfer anyway)."""
        task = self.g.add(name, "disk", seconds, deps=deps, tag=tag, **mem)
        if self.device.kind == "cpu" and cpu_share > 0:
            self.g.add(f"io-cpu:{name}", "compute", cpu_share * seconds, deps=deps, tag=tag)
        return task

    # -- chunk residency (offload.chunks.ChunkStore: _start, _ensure, _prefetch, _release) ---

    def _buf(self, c: int) -> tuple[str, str, int]:
        return ("device", f"buffer:param:{c}", self.pbytes[c])

    def _staging(self, c: int) -> tuple[str, str, int]:
        return ("host", f"staging:{c}", self.pbytes[c])

    def _start(self, m: int, p: int, chunks, extra: list | tuple = ()) -> None:
        """Take the param buffers of ``chunks`` not resident (nvme: and host staging) at this
        point of the program, with ``extra`` bytes, then begin their copies or disk reads."""
        new = [c for c in dict.fromkeys(chunks) if c not in self.res]
        allocs = list(extra)
        for c in new:
            allocs.append(self._buf(c))
            if self.chunks[c].home is Tier.NVME and c not in self.behind:
                allocs.append(self._staging(c))
        if not allocs:
            return
        # The training thread's own work per fetch (runtime.overhead_probe [Note: runtime overhead]).
        mark = self.g.add(f"alloc{m}:{'FB'[p]}", "compute", len(new) * self.s.overhead_chunk_fetch_s,
                          alloc_start=allocs, tag=m)
        for c in new:
            if self.chunks[c].home is Tier.NVME and c not in self.behind:
                # disk -> staging now; staging -> buffer when used
                self.reads[c] = self._disk_read(f"read{m}@c{c}:{'FB'[p]}", self.read_s[c], deps=(mark,), tag=m)
                self.res[c] = None
            else:  # a host chunk, or an nvme chunk copied out of its carried write-back's staging
                self.res[c] = self.g.add(f"PREFETCH{m}@c{c}:{'FB'[p]}", self.copy_in, self.h2d_s[c], deps=(mark,), tag=m)
                if c in self.behind:
                    self.carried_copies[c].append(self.res[c])

    def _ensure(self, m: int, p: int, c: int) -> int:
        """The task after which chunk ``c`` is usable (an nvme chunk's copy out of staging starts here)."""
        ready = self.res[c]
        if ready is None:
            ready = self.res[c] = self.g.add(f"PREFETCH{m}@c{c}:{'FB'[p]}", self.copy_in, self.h2d_s[c],
                                             deps=(self.reads.pop(c),), free_end=(self._staging(c),), tag=m)
        return ready

    def _release(self, chunks) -> list:
        frees = []
        for c in chunks:
            if c in self.res:
                assert self.res[c] is not None, "a chunk released before it was used"
                del self.res[c]
                frees.append(self._buf(c))
        return frees

    # -- the step ---------------------------------------------------------------------------

    def build(self) -> TaskGraph:
        g, s, n = self.g, self.s, self.n
        self.res: dict[int, int | None] = {}
        self.reads: dict[int, int] = {}
        prev_accum: dict[int, int] = {}
        self._carry_in()
        # Per (micro-batch, block): a swapped block's copy out, write, copy in and read; the
        # swap_nvme blocks whose write is not waited for yet, oldest first.
        self.swap_out: dict[tuple[int, int], int] = {}
        self.disk_write: dict[tuple[int, int], int] = {}
        self.unwaited: list[tuple[int, int]] = []
        self.swap_in: dict[tuple[int, int], int] = {}
        self.disk_read: dict[tuple[int, int], int] = {}  # swap_nvme reads not claimed yet
        self.prev_b: dict[int, int] = {}  # per micro-batch, the block of its last backward marker
        started: set[int] = set()
        last_b = -1
        # The program's compute markers in its order ([Note: program order]): nothing here
        # assumes which pass or micro-batch comes next.
        for m, p, j in self.markers:
            if m not in started:
                started.add(m)
                if s.overhead_microbatch_s > 0:  # the engine's bookkeeping around the micro-batch
                    g.add(f"engine{m}", "compute", s.overhead_microbatch_s, tag=m)
            if p == "F":
                self._forward_block(m, j)
            else:
                last_b = self._backward_block(m, j, prev_accum)
                self.prev_b[m] = j
        # end_backward: anything still resident at the step's end is released
        left = self._release(list(self.res))
        if left:
            g.add(f"release{n - 1}", "compute", 0.0, deps=(last_b,), free_end=left, tag=n - 1)
        self._optimizer(prev_accum)
        return g

    def _forward_block(self, m: int, j: int) -> None:
        g, b, pol = self.g, self.s.blocks[j], self.policy.activations[j]
        dev, hst, nvm = Tier.DEVICE.value, Tier.HOST.value, Tier.NVME.value
        owner = f"act:{b.name}:{m}"  # the runtime's act_owner
        need = self.uses[j]
        fetch = self.fetch_at[(m, "F", j)]  # the program's fetches: the block's own, then ahead
        self._start(m, 0, [c for c in fetch if c in need])
        deps = [self._ensure(m, 0, c) for c in need]
        self._start(m, 0, [c for c in fetch if c not in need])
        frees = self._release(self.release_at[(m, "F", j)])  # post-forward
        held = b.input_bytes if pol is ActPolicy.RECOMPUTE else b.activation_bytes
        swaps = (m, j) in self.swap_out_at  # the program's SWAP_OUT, right after the marker
        on_f = frees if not (swaps and self.copy_out == "compute") else []
        g.add(f"F{m}:{j}", "compute", self.fwd[j], deps=deps, alloc_end=[(dev, owner, held)], free_end=on_f, tag=m)
        if swaps:
            if pol is ActPolicy.SWAP_NVME:  # [Note: the swap rules] 4: the oldest writes are waited for
                self._wait_writes(m, keep=self.policy.swap_writes_in_flight - 1)
            a = b.activation_bytes
            file = [(nvm, owner, cost.nvme_file_bytes(a))] if pol is ActPolicy.SWAP_NVME else []
            so = g.add(f"SWAP_OUT{m}:{j}", self.copy_out, cost.d2h_time_s(a, self.device), deps=(g.last_on["compute"],),
                       alloc_start=[(hst, owner, a)], alloc_end=file,
                       free_end=[(dev, owner, a)] + (frees if not on_f else []), tag=m)
            self.swap_out[(m, j)] = so
            if pol is ActPolicy.SWAP_NVME:  # submitted at the copy-out's end; staging freed when waited for
                self.disk_write[(m, j)] = self._disk_write(f"write{m}:{j}",
                                                cost.disk_write_time_s(a, self.nvme, self.comp), deps=(so,), tag=m)
                self.unwaited.append((m, j))

    def _wait_writes(self, m: int, keep: int) -> None:
        """The training thread waits for the oldest swap_nvme writes until ``keep`` are left; each
        one's host staging goes when it is waited for ([Note: bounded NVMe writes])."""
        while len(self.unwaited) > keep:
            mk, k = self.unwaited.pop(0)
            b = self.s.blocks[k]
            self.g.add(f"wait{m}:{k}", "compute", 0.0, deps=(self.disk_write[(mk, k)],),
                       free_end=[(Tier.HOST.value, f"act:{b.name}:{mk}", b.activation_bytes)], tag=m)

    def _bring_back(self, m: int, k: int) -> None:
        """The program's SWAP_IN of block ``k``: every write still staged is waited for, then the
        activation manager starts bringing its activations back ([Note: the swap rules] 2, 4)."""
        g, b, pol = self.g, self.s.blocks[k], self.policy.activations[k]
        self._wait_writes(m, keep=0)
        if pol not in (ActPolicy.SWAP_HOST, ActPolicy.SWAP_NVME) or (m, k) in self.swap_in or (m, k) in self.disk_read:
            return
        a, owner = b.activation_bytes, f"act:{b.name}:{m}"
        dev, hst = Tier.DEVICE.value, Tier.HOST.value
        if pol is ActPolicy.SWAP_HOST:
            self.swap_in[(m, k)] = g.add(f"SWAP_IN{m}:{k}", self.copy_in, cost.h2d_time_s(a, self.device),
                                         deps=(self.swap_out[(m, k)], g.last_on["compute"]), alloc_start=[(dev, owner, a)],
                                    free_end=[(hst, owner, a)], tag=m)
            return
        # The training thread (its write waited for already) takes host
        # staging and starts the read; the rest waits for the block's claim (_claim).
        mark = g.add(f"alloc{m}:{k}:act", "compute", 0.0, deps=(self.disk_write[(m, k)],),
                     alloc_start=[(hst, owner, a)], tag=m)
        self.disk_read[(m, k)] = self._disk_read(f"read{m}:{k}", cost.disk_read_time_s(a, self.nvme, self.comp),
                                  deps=(mark,), tag=m)

    def _claim(self, m: int, j: int) -> None:
        """Block ``j``'s backward starts: a swap_nvme record's read is waited for, its file goes and
        its copy-in starts, taking its device bytes; the host staging goes when the copy ends
        (memtrain.offload.swap, [Note: NVMe swap-in claims]): points of the program, not of the disk."""
        b = self.s.blocks[j]
        if self.policy.activations[j] is not ActPolicy.SWAP_NVME or (m, j) not in self.disk_read:
            return
        owner, a = f"act:{b.name}:{m}", b.activation_bytes
        claim = self.g.add(f"claim{m}:{j}", "compute", 0.0, deps=(self.disk_read.pop((m, j)),),
                           alloc_start=[(Tier.DEVICE.value, owner, a)],
                           free_end=[(Tier.NVME.value, owner, cost.nvme_file_bytes(a))], tag=m)
        self.swap_in[(m, j)] = self.g.add(f"SWAP_IN{m}:{j}", self.copy_in, cost.h2d_time_s(a, self.device), deps=(claim,),
                                     free_end=[(Tier.HOST.value, owner, a)], tag=m)

    def _backward_block(self, m: int, j: int, prev_accum: dict[int, int]) -> int:
        g, b, pol = self.g, self.s.blocks[j], self.policy.activations[j]
        dev = Tier.DEVICE.value
        owner, dt = f"act:{b.name}:{m}", self.train.dtype
        need = self.uses[j]
        above = self.prev_b.get(m)  # the previous backward block's releases (not at its gradients)
        if above is not None:
            done_above = set(self.flush_at.get(above, []))
            frees = self._release([c for c in self.release_at[(m, "B", above)] if c not in done_above])
            if frees:
                g.add(f"release{m}:{above}", "compute", 0.0, free_end=frees, tag=m)
        for k in self.swap_in_before[(m, j)]:  # the program's swap-ins before the block's fetches
            self._bring_back(m, k)
        fetch = self.fetch_at[(m, "B", j)]  # the program's fetches: the block's own, then ahead
        self._start(m, 1, [c for c in fetch if c in need])
        deps = [self._ensure(m, 1, c) for c in need]
        grads = [(dev, f"buffer:grad:{c}", cost.grad_buffer_bytes(self.chunks[c].num_elems, dt))
                 for c in need if self.grad_at[c] == j]
        self._start(m, 1, [c for c in fetch if c not in need], extra=grads)
        # The marker claims the block's record, then the swap-ins after it run ([Note: the swap
        # rules] 3); a record coming back only from those is claimed by its first use. Then the
        # optimizer's points at the block's start: read-aheads and their waits.
        after = self.swap_in_after[(m, j)]
        if j not in after:
            self._claim(m, j)
        for k in after:
            self._bring_back(m, k)
        if j in after:
            self._claim(m, j)
        points = self.optim_at.get((m, j), [])
        self._optim_points(m, points, upto=None)
        if (m, j) in self.swap_in:
            deps.append(self.swap_in[(m, j)])
        if pol is ActPolicy.RECOMPUTE:
            g.add(f"R{m}:{j}", "compute", self.fwd[j], deps=deps, alloc_start=[(dev, owner, b.activation_bytes)], tag=m)
            deps = []
        held = [(dev, owner, b.activation_bytes)]  # as allocated: a recompute block's input apart
        if pol is ActPolicy.RECOMPUTE:
            held.append((dev, owner, b.input_bytes))
        done = self.flush_at.get(j, [])  # gradients complete in this block: flush and release
        gone = [c for c in self.release_at[(m, "B", j)] if c in done]
        bt = g.add(f"B{m}:{j}", "compute", self.bwd[j], deps=deps, free_end=held + self._release(gone), tag=m)
        for c in done:
            prev_accum[c] = self._grad_out(m, c, bt, prev_accum.get(c))
            self._optim_points(m, points, upto=c, bt=bt, acc=prev_accum[c])
        return bt


def _flush_copy_s(num_bytes: int, device: DeviceSpec) -> float:
    """Device -> host copy of a grad buffer before it is added to the accumulator (none on a CPU device)."""
    return 0.0 if device.kind == "cpu" else cost.d2h_time_s(num_bytes, device)
