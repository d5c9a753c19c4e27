"""Offload I/O benchmark: raw disk bandwidth vs memtrain's chunk streaming, side by side.

    python bench/offload_io.py --path /mnt/nvme/tmp [--size 1GiB] [--chunk 64MiB] [--train 100m]

Part 1 (this file's ``measure_*`` functions): sequential write and read bandwidth of the disk
at ``--path`` with plain large-file I/O, then the same bytes written and read as chunks through
``NvmeStore`` (O_DIRECT if the filesystem allows, and buffered), and the ratio store / raw
(target >= 0.8). Every figure is measured in this run.

Part 2 (``measure_training``): a training step with every chunk NVMe-home (params, grads and
optimizer states streamed through ``NvmeStore``) against the two things it can at best overlap,
each measured alone in the same run: the compute (the same model and batches with everything on
the device) and the I/O (that step's chunk traffic, recorded op by op from the NVMe run, replayed
through a fresh ``NvmeStore`` with no compute). The step cannot beat max(compute, I/O) (the
overlap bound of ZeRO-Infinity, Rajbhandari et al. 2021, Sec. 6: time = max over the overlapped
streams); the printed ratio step / bound is how close the engine's overlap comes (target <= 1.3).
A step's NVMe write-backs run on into the next step, so NVMe steps are timed back to back in the
steady state (``RUN_STEPS``), each period carrying one step's traffic, as the replay does; the
replayed traffic is that of a step after a step (a second warm-up step).

It also prints how far this machine lets the two overlap at all: the all-device step and the
replay started at once, with no dependency between them (``together_s``). Without a GPU the
device is the CPU and both share its cores, so even this is above max(compute, I/O); the step
cannot be expected below it.

Cache treatment, the same for both: writes count until the data is on the disk (``fsync`` /
``fdatasync``); reads start after the file's pages were dropped from the page cache with
``posix_fadvise(POSIX_FADV_DONTNEED)`` (O_DIRECT reads bypass the cache anyway).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from memtrain.offload.nvme import URGENT, NvmeStore, aligned_empty
from memtrain.planner.search import MAX_OPTIM_STAGINGS
from memtrain.units import format_bytes, parse_bytes

__all__ = [
    "IoResult", "measure_raw", "measure_store", "median_result", "print_table",
    "IoOp", "TrainingResult", "record_step_traffic", "TrafficReplay", "overlap_prefetch_depth", "measure_training",
    "print_training", "main",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class IoResult:
    label: str
    """What was measured."""
    total_bytes: int
    """Bytes written, then read."""
    write_s: float
    """Wall seconds to write everything, until durable."""
    read_s: float
    """Wall seconds to read everything back from the disk (not the page cache)."""

    @property
    def write_gbps(self) -> float:
        return self.total_bytes / self.write_s / 1e9

    @property
    def read_gbps(self) -> float:
        return self.total_bytes / self.read_s / 1e9


def measure_raw(path: str, *, size_bytes: int, chunk_bytes: int) -> IoResult:
    """One file, written in ``chunk_bytes`` pieces then fsync-ed; dropped from cache; read back."""
    seed = os.urandom(min(chunk_bytes, 16 * 2**20))  # incompressible, and cheap to make
    buf = memoryview(bytearray(seed * -(-chunk_bytes // len(seed)))[:chunk_bytes])
    fname = os.path.join(path, f"raw-{os.getpid()}.bin")
    try:
        t0 = time.perf_counter()
        fd = os.open(fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            written = 0
            while written < size_bytes:
                piece = buf[: min(chunk_bytes, size_bytes - written)]
                written += os.write(fd, piece)
            os.fsync(fd)
        finally:
            os.close(fd)
        write_s = time.perf_counter() - t0
        _drop_cache(fname)
        t0 = time.perf_counter()
        fd = os.open(fname, os.O_RDONLY)
        try:
            got = 0
            while got < size_bytes:
                n = os.readv(fd, [buf])
                if n == 0:
                    break
                got += n
        finally:
            os.close(fd)
        read_s = time.perf_counter() - t0
        assert got == size_bytes, (got, size_bytes)
    finally:
        os.unlink(fname)
    return IoResult(label="raw file (write+fsync / read)", total_bytes=size_bytes, write_s=write_s, read_s=read_s)


def measure_store(
    path: str, *, size_bytes: int, chunk_bytes: int, direct: bool | None, compress: bool = False, num_threads: int = 8
) -> IoResult:
    """``size_bytes`` as ``chunk_bytes`` float32 chunks written then read through ``NvmeStore``."""
    num_chunks = max(1, size_bytes // chunk_bytes)
    numel = chunk_bytes // 4
    # Distinct random data per chunk: compression and dedup in the stack cannot flatter the figure.
    gen = torch.Generator().manual_seed(0)
    # Page-aligned, as the chunk store allocates its staging and CPU buffers, so O_DIRECT moves
    # them with no bounce copy (offload/nvme_format.py, [Note: zero-copy payload]).
    chunks = [aligned_empty(numel, torch.float32).copy_(torch.randn(numel, generator=gen)) for _ in range(num_chunks)]
    # Zeroed, so their pages exist: tier buffers are resident in use, and the raw read reuses
    # one resident buffer too (first-touch page faults would otherwise dominate the read time).
    outs = [aligned_empty(numel, torch.float32).zero_() for _ in range(num_chunks)]
    sub = tempfile.mkdtemp(prefix="memtrain-bench-", dir=path)
    store = NvmeStore(os.path.join(sub, "store"), budget_bytes=None, num_threads=num_threads,
                      compress=compress, direct=direct).start()
    try:
        t0 = time.perf_counter()
        wait([store.write(f"chunk:{i}", c) for i, c in enumerate(chunks)])
        store.flush()
        write_s = time.perf_counter() - t0
        for i in range(num_chunks):  # a no-op for O_DIRECT and already done by buffered writes
            _drop_cache(str(store.file_path(f"chunk:{i}")))
        t0 = time.perf_counter()
        wait([store.read(f"chunk:{i}", outs[i]) for i in range(num_chunks)])
        store.flush()
        read_s = time.perf_counter() - t0
        for c, o in zip(chunks, outs):
            assert torch.equal(c, o), "read back different bytes"
        mode = "O_DIRECT" if store.direct else "buffered"
    finally:
        store.close()
        shutil.rmtree(sub, ignore_errors=True)
    label = f"NvmeStore {mode}{' +zstd' if compress else ''}, {num_threads} threads"
    return IoResult(label=label, total_bytes=num_chunks * numel * 4, write_s=write_s, read_s=read_s)


def _drop_cache(fname: str) -> None:
    fd = os.open(fname, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def median_result(results: list[IoResult]) -> IoResult:
    """Median write and read time of repeated runs of one row (a single slow run does not decide)."""
    def med(xs: list[float]) -> float:
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2

    first = results[0]
    return IoResult(label=first.label, total_bytes=first.total_bytes,
                    write_s=med([r.write_s for r in results]), read_s=med([r.read_s for r in results]))


def print_table(raw: IoResult, rows: list[IoResult], *, chunk_bytes: int, repeat: int) -> None:
    print(f"sequential I/O, {format_bytes(raw.total_bytes)} in {format_bytes(chunk_bytes)} pieces, median of {repeat} runs; "
          "writes timed until fsync/fdatasync returns, reads after POSIX_FADV_DONTNEED (cold cache)")
    print(f"{'':44s} {'write GB/s':>10s} {'read GB/s':>10s} {'write/raw':>9s} {'read/raw':>9s}")
    for r in [raw, *rows]:
        print(f"{r.label:44s} {r.write_gbps:10.2f} {r.read_gbps:10.2f} "
              f"{r.write_gbps / raw.write_gbps:9.2f} {r.read_gbps / raw.read_gbps:9.2f}")
    print("target: NvmeStore >= 0.80 of raw")


# --- part 2: a training step with NVMe-home chunks vs compute alone and I/O alone ---------------


@dataclass(frozen=True, kw_only=True, slots=True)
class IoOp:
    """One ``NvmeStore`` operation a training step issued."""

    kind: str
    """``read`` or ``write``."""
    key: str
    """The store key (``chunk:<i>:<part>``)."""
    numel: int
    """Elements moved."""
    dtype: torch.dtype
    """Element type."""
    priority: int
    """``URGENT`` or ``BACKGROUND`` (memtrain.offload.io_queue), as the step issued it."""

    @property
    def num_bytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainingResult:
    label: str
    """Model and batch shape."""
    num_params: int
    """Parameters of the model."""
    num_steps: int
    """Timed steps per configuration (after two untimed warm-up steps each, the second one recorded)."""
    step_s: float
    """Wall seconds per step with every chunk NVMe-home, in the steady state: the median over
    runs of ``RUN_STEPS`` back-to-back steps (after a lead-in step) of the run's time per step."""
    compute_s: float
    """Median wall seconds of the same step with everything on the device."""
    io_s: float
    """Median wall seconds to replay one step's NVMe traffic through ``NvmeStore`` alone."""
    step_range_s: tuple[float, float]
    """Least and most of the runs' step times (``step_s`` is their median): the disk's spread."""
    io_range_s: tuple[float, float]
    """Least and most of the replays' times (``io_s`` is their median)."""
    together_s: float
    """Median wall seconds of the all-device step and the replay started at once, with no
    dependency between them: the overlap this machine allows (see the module doc)."""
    compute_cpu_s: float
    """Median CPU seconds (all threads) of the all-device step."""
    io_cpu_s: float
    """Median CPU seconds (all threads) of the I/O replay: copies, checksums, system calls."""
    num_cpus: int
    """CPU threads torch computes with (on a CPU-only machine compute and I/O share them)."""
    read_bytes: int
    """Bytes read from NVMe per step."""
    write_bytes: int
    """Bytes written to NVMe per step."""
    num_ops: int
    """NVMe operations per step."""
    direct: bool
    """Whether the store used O_DIRECT."""
    prefetch_depth: int
    """Param buffers the plan allows (``MemoryPolicy.prefetch_depth``)."""
    optim_staged_chunks: int
    """NVMe chunks the early optimizer updates may stage at once (``MemoryPolicy.optim_staged_chunks``)."""
    host_peak_bytes: int
    """The NVMe run's host ledger peak over its timed steps."""
    max_loss_diff: float
    """Max |Δloss| between the NVMe run and the all-device run (the default fused host AdamW
    kernel differs from the device kernel by about one ulp per step; offload/optim.py)."""

    @property
    def bound_s(self) -> float:
        return max(self.compute_s, self.io_s)

    @property
    def ratio(self) -> float:
        return self.step_s / self.bound_s

    @property
    def cpu_bound_s(self) -> float:
        """See [Note: shared CPUs]: the step's CPU work spread over every thread."""
        return (self.compute_cpu_s + self.io_cpu_s) / self.num_cpus


def record_step_traffic(store: NvmeStore) -> tuple[list[IoOp], Callable[[], None]]:
    """Log every read and write issued on ``store`` from now on; returns (log, stop)."""
    log: list[IoOp] = []
    read, write = store.read, store.write

    def rec_read(key, out, *, priority=URGENT):
        log.append(IoOp(kind="read", key=key, numel=out.numel(), dtype=out.dtype, priority=priority))
        return read(key, out, priority=priority)

    def rec_write(key, tensor, *, priority=URGENT, **kw):
        log.append(IoOp(kind="write", key=key, numel=tensor.numel(), dtype=tensor.dtype, priority=priority))
        return write(key, tensor, priority=priority, **kw)

    store.read, store.write = rec_read, rec_write  # instance attributes shadow the methods

    def stop() -> None:
        del store.read, store.write

    return log, stop


class TrafficReplay:
    """Replays one step's NVMe operations through a fresh ``NvmeStore``, with no compute.

    ``start()`` writes a file per key (untimed), as the chunk files exist before a training
    step; each ``run()`` drops them from the page cache, then submits every operation at once
    (the store keeps same-key order) and waits until all are read or durable.
    """

    def __init__(self, path: str, ops: list[IoOp], *, num_threads: int) -> None:
        self.ops, self.path, self.num_threads = ops, path, num_threads
        self.store: NvmeStore | None = None
        self._sub: str | None = None
        self._bufs: dict[str, torch.Tensor] = {}

    def start(self) -> "TrafficReplay":
        self._sub = tempfile.mkdtemp(prefix="memtrain-bench-replay-", dir=self.path)
        self.store = NvmeStore(os.path.join(self._sub, "store"), budget_bytes=None, num_threads=self.num_threads).start()
        gen = torch.Generator().manual_seed(0)
        for op in self.ops:  # one buffer per key, as the engine stages one chunk part at a time
            if op.key not in self._bufs:  # page-aligned, like the engine's buffers (zero-copy I/O)
                self._bufs[op.key] = aligned_empty(op.numel, op.dtype).copy_(torch.randn(op.numel, generator=gen))
        wait([self.store.write(k, b) for k, b in self._bufs.items()])
        self.store.flush()
        return self

    def run(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process's threads) for the step's traffic."""
        for k in self._bufs:
            _drop_cache(str(self.store.file_path(k)))
        bufs, store = self._bufs, self.store
        t0, c0 = time.perf_counter(), time.process_time()
        wait([store.read(o.key, bufs[o.key], priority=o.priority) if o.kind == "read"
              else store.write(o.key, bufs[o.key], priority=o.priority) for o in self.ops])
        store.flush()
        return time.perf_counter() - t0, time.process_time() - c0

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        if self._sub is not None:
            shutil.rmtree(self._sub, ignore_errors=True)


RUN_STEPS = 3
"""NVMe steps timed back to back in the steady state as one run, after an untimed lead-in step
(``measure_training``)."""


def overlap_prefetch_depth(uses: list[tuple[int, ...]]) -> int:
    """The smallest ``prefetch_depth`` that lets a chunk be fetched ahead of every block.

    ``uses[b]`` are the off-device chunks block ``b`` uses. A block keeps its own chunks in
    buffers while it runs (docs/memory-accounting.md, "Fetch and prefetch"), so with
    ``prefetch_depth`` equal to the most one block uses, a block using that many leaves no buffer
    for the next block's chunk and every fetch waits for the disk in full. The planner's search
    tries this depth as well (``planner.search``: the minimum, +1, +2).
    """
    return max(len(u) for u in uses) + 1


def _together(engine, batch, replay: "TrafficReplay") -> float:
    """Wall seconds of one step of ``engine`` and one ``replay.run()`` started at once."""
    with ThreadPoolExecutor(1, thread_name_prefix="memtrain-bench-replay") as pool:
        t0 = time.perf_counter()
        io = pool.submit(replay.run)
        engine.train_step(batch)
        io.result()  # a failed replay raises here
        return time.perf_counter() - t0


def _timed_step(engine, batch) -> tuple[float, float, float]:
    """(loss, wall seconds, CPU seconds of this process's threads) of one step."""
    t0, c0 = time.perf_counter(), time.process_time()
    loss = engine.train_step(batch)
    return loss, time.perf_counter() - t0, time.process_time() - c0


def measure_training(
    path: str, *, preset: str, seq_len: int, micro_batch_size: int, num_micro: int, num_steps: int,
    chunk_elems: int, prefetch_depth: int | None, num_threads: int = 8, optim_staged_chunks: int = MAX_OPTIM_STAGINGS,
) -> TrainingResult:
    """Step time of the all-NVMe plan, compute alone and I/O alone; see the module doc.

    ``prefetch_depth`` None: ``overlap_prefetch_depth`` of the model's chunks.
    ``optim_staged_chunks``: as a plan with that much spare host memory would give
    (planner.search [Note: spare host memory stages more])."""
    from memtrain.models.gpt import GPT, gpt_config
    from memtrain.offload.chunks import block_param_order, make_chunk_plans, named_blocks
    from memtrain.planner.plan import ActPolicy, MemoryPolicy, Tier
    from memtrain.runtime import wrap

    cfg = gpt_config(preset, dropout=0.0)
    gen = torch.Generator().manual_seed(0)
    batches = []
    num_runs = -(-num_steps // RUN_STEPS)
    for _ in range(1 + num_runs * (RUN_STEPS + 1)):  # the warm-up step, then per run a lead-in and RUN_STEPS
        ids = torch.randint(0, cfg.vocab_size, (num_micro * micro_batch_size, seq_len + 1), generator=gen)
        batches.append((ids[:, :-1], ids[:, 1:]))

    if prefetch_depth is None:
        with torch.device("meta"):  # only the layout is needed: no memory, no init time
            model = GPT(cfg)
        blocks = named_blocks(model, None)
        chunk_of = {n: c.index for c in make_chunk_plans(block_param_order(model, blocks), chunk_elems, Tier.NVME)
                    for n in c.param_names}
        names = {id(p): n for n, p in model.named_parameters()}
        prefetch_depth = overlap_prefetch_depth(
            [tuple({chunk_of[names[id(p)]] for p in block.parameters()}) for _, block in blocks])

    def run(home: Tier, nvme_dir: str | None):
        torch.manual_seed(0)
        model = GPT(cfg)
        blocks = named_blocks(model, None)
        plan = MemoryPolicy(chunk_size_elems=chunk_elems, prefetch_depth=prefetch_depth,
                            chunks=make_chunk_plans(block_param_order(model, blocks), chunk_elems, home),
                            activations=(ActPolicy.KEEP,) * len(blocks), optim_staged_chunks=optim_staged_chunks)
        memory = {"device": "1TiB", "host": "1TiB", **({"nvme_path": nvme_dir} if nvme_dir else {})}
        engine = wrap(model, optimizer=dict(name="adamw", lr=1e-4), memory=memory, plan=plan,
                      micro_batch_size=micro_batch_size, verbose=False)
        return engine, sum(p.numel() for p in model.parameters())

    sub = tempfile.mkdtemp(prefix="memtrain-bench-train-", dir=path)
    on_device = on_nvme = replay = None
    try:
        on_device, num_params = run(Tier.DEVICE, None)
        on_nvme, _ = run(Tier.NVME, os.path.join(sub, "nvme"))
        ref_losses = [_timed_step(on_device, batches[0])[0]]  # warm-up steps
        losses = [_timed_step(on_nvme, batches[0])[0]]
        # One steady-state step's traffic: a step after a step (its fetches of chunks whose
        # write-backs the step before left running copy from their staging: offload.optim
        # [Note: fetch from a write-back]), and its own write-backs, flushed after it.
        log, stop = record_step_traffic(on_nvme.nvme)
        ref_losses.append(_timed_step(on_device, batches[0])[0])
        losses.append(_timed_step(on_nvme, batches[0])[0])
        on_nvme.optimizer.flush()
        ops = list(log)
        on_nvme.store.host_ledger.reset_peak()
        replay = TrafficReplay(path, ops, num_threads=num_threads).start()
        replay.run()  # warm-up
        on_nvme.optimizer.flush()
        compute, step, io = [], [], []  # (wall s, CPU s) per timed step; step: per run
        # Interleaved, a run at a time, so load from other processes on the machine hits all three
        # alike. A step's write-backs run on into the next step (offload.optim [Note: write-backs
        # across the step end]), so the NVMe steps of a run go back to back and are timed in the
        # steady state: from the start of the run's second step to the end of its last, per step.
        # That window holds the write-backs its first step inherits and leaves out those its last
        # step passes on, one step's worth each (the same chunks every step).
        for r in range(num_runs):
            run_batches = batches[1 + r * (RUN_STEPS + 1): 1 + (r + 1) * (RUN_STEPS + 1)]
            for b in run_batches:
                loss, *t = _timed_step(on_device, b)
                ref_losses.append(loss)
                compute.append(t)
            losses.append(on_nvme.train_step(run_batches[0]))  # the lead-in, untimed
            start = len(log)
            t0, c0 = time.perf_counter(), time.process_time()
            for b in run_batches[1:]:
                losses.append(on_nvme.train_step(b))
            step.append(((time.perf_counter() - t0) / RUN_STEPS, (time.process_time() - c0) / RUN_STEPS))
            on_nvme.optimizer.flush()
            # Every step moves the same chunk parts the same way, so one replay stands for each.
            assert sorted((o.kind, o.key) for o in log[start:]) == sorted((o.kind, o.key) for o in ops * RUN_STEPS)
            for _ in range(RUN_STEPS):
                io.append(replay.run())
        # After every compared step: these device steps' losses are not compared.
        together = [_together(on_device, b, replay) for b in batches[1:1 + RUN_STEPS]]
        stop()
        direct = bool(on_nvme.nvme.direct)
        host_peak = on_nvme.store.host_ledger.peak_bytes
    finally:
        for closable in (on_device, on_nvme, replay):
            if closable is not None:
                closable.close()
        shutil.rmtree(sub, ignore_errors=True)
    return TrainingResult(
        label=f"gpt {preset}, {num_micro} x {micro_batch_size} x {seq_len} tokens, chunks of {chunk_elems:,}",
        num_params=num_params, num_steps=num_runs * RUN_STEPS, step_s=statistics.median(t for t, _ in step),
        compute_s=statistics.median(t for t, _ in compute), io_s=statistics.median(t for t, _ in io),
        step_range_s=(min(t for t, _ in step), max(t for t, _ in step)), io_range_s=(min(t for t, _ in io), max(t for t, _ in io)),
        together_s=statistics.median(together),
        compute_cpu_s=statistics.median(c for _, c in compute), io_cpu_s=statistics.median(c for _, c in io),
        num_cpus=torch.get_num_threads(),
        read_bytes=sum(o.num_bytes for o in ops if o.kind == "read"),
        write_bytes=sum(o.num_bytes for o in ops if o.kind == "write"), num_ops=len(ops), direct=direct,
        prefetch_depth=prefetch_depth, optim_staged_chunks=optim_staged_chunks, host_peak_bytes=host_peak,
        max_loss_diff=max(abs(a - b) for a, b in zip(losses, ref_losses)),
    )


def print_training(r: TrainingResult) -> None:
    mode = "O_DIRECT" if r.direct else "buffered"
    print(f"\ntraining step with every chunk NVMe-home: {r.label} ({r.num_params / 1e6:.1f}M params), "
          f"AdamW fp32, prefetch depth {r.prefetch_depth}, {r.num_steps} steps after two warm-up steps "
          f"(NVMe: steady state, median of runs of {RUN_STEPS} back-to-back steps after a lead-in)")
    print(f"  optimizer stages up to {r.optim_staged_chunks} NVMe chunks at once; host ledger peak "
          f"{format_bytes(r.host_peak_bytes)}")
    print(f"  per-step NVMe traffic: {format_bytes(r.read_bytes)} read + {format_bytes(r.write_bytes)} written "
          f"in {r.num_ops} ops ({mode})")
    print(f"  {'step, all chunks on NVMe':40s} {r.step_s:8.2f} s")
    print(f"  {'compute alone (everything on device)':40s} {r.compute_s:8.2f} s")
    print(f"  {'I/O alone (the step traffic replayed)':40s} {r.io_s:8.2f} s   "
          f"({(r.read_bytes + r.write_bytes) / r.io_s / 1e9:.2f} GB/s)")
    print(f"  {'lower bound max(compute, I/O)':40s} {r.bound_s:8.2f} s")
    print(f"  spread (least-most) over the run: step {r.step_range_s[0]:.2f}-{r.step_range_s[1]:.2f} s, "
          f"I/O replay {r.io_range_s[0]:.2f}-{r.io_range_s[1]:.2f} s")
    print(f"  step / lower bound = {r.ratio:.2f}  (target <= 1.30); max |Δloss| vs the all-device run: {r.max_loss_diff:.2g}")
    print(f"  {'compute and I/O at once, no dependencies':40s} {r.together_s:8.2f} s   ({r.together_s / r.bound_s:.2f} x the bound: "
          f"the overlap this machine allows; step / it = {r.step_s / r.together_s:.2f})")
    # [Note: shared CPUs] Without a GPU the "device" is the CPU, and the I/O path (copies into
    # aligned buffers, CRC-32, system calls) runs on the same cores; then compute and I/O can
    # overlap only as far as their summed CPU time allows: (CPU_compute + CPU_io) / cores.
    print(f"  CPU seconds: compute {r.compute_cpu_s:.2f}, I/O {r.io_cpu_s:.2f} on {r.num_cpus} threads -> "
          f"CPU-shared bound {r.cpu_bound_s:.2f} s; step / max(both bounds) = {r.step_s / max(r.bound_s, r.cpu_bound_s):.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--path", default=tempfile.gettempdir(), help="directory on the disk to measure")
    ap.add_argument("--size", default="1GiB", help="total bytes written then read (default 1GiB)")
    ap.add_argument("--chunk", default="64MiB", help="chunk size (default 64MiB)")
    ap.add_argument("--threads", type=int, default=8,
                    help="NvmeStore I/O threads, as the engine's store uses (default 8)")
    ap.add_argument("--compress", action="store_true", help="also measure zstd-compressed chunks")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row; the median is printed (default 3)")
    ap.add_argument("--train", default="100m", help="GPT preset for the training part, or 'none' (default 100m)")
    ap.add_argument("--train-steps", type=int, default=3 * RUN_STEPS,
                    help=f"timed steps per configuration, NVMe ones in runs of {RUN_STEPS} (default {3 * RUN_STEPS})")
    ap.add_argument("--train-seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    ap.add_argument("--train-micro-batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    ap.add_argument("--train-num-micro", type=int, default=2, help="micro-batches per step (default 2)")
    ap.add_argument("--train-chunk-elems", type=int, default=8 * 2**20, help="chunk size in elements (default 8Mi)")
    ap.add_argument("--train-staged", type=int, default=MAX_OPTIM_STAGINGS,
                    help="NVMe chunks the optimizer's early updates may stage in host memory at once "
                         f"(MemoryPolicy.optim_staged_chunks; default {MAX_OPTIM_STAGINGS}, the most the planner gives "
                         "when host memory is spare)")
    ap.add_argument("--train-prefetch", default="auto",
                    help="prefetch depths to measure, comma-separated, or 'auto': the smallest that leaves a "
                         "buffer for fetching ahead (the most chunks one block uses + 1; default)")
    args = ap.parse_args(argv)
    try:
        size_bytes = parse_bytes(args.size, field="--size")
        chunk_bytes = parse_bytes(args.chunk, field="--chunk")
        if chunk_bytes < 4096 or chunk_bytes % 4096 or size_bytes < chunk_bytes:
            raise ValueError("--chunk: must be a multiple of 4 KiB and at most --size")
        if args.repeat < 1 or args.threads < 1:
            raise ValueError("--repeat and --threads: must be >= 1")
        if not os.path.isdir(args.path):
            raise ValueError(f"--path: {args.path} is not a directory")
        if min(args.train_steps, args.train_seq_len, args.train_micro_batch, args.train_num_micro,
               args.train_chunk_elems, args.train_staged) < 1:
            raise ValueError("--train-*: counts and sizes must be >= 1")
        depths: list[int | None] = [None]
        if args.train_prefetch != "auto":
            try:
                depths = [int(d) for d in args.train_prefetch.split(",")]
            except ValueError:
                depths = [0]
            if min(depths) < 1:
                raise ValueError(f"--train-prefetch: 'auto' or depths >= 1 such as 2,3; got {args.train_prefetch!r}")
        if args.train != "none":
            from memtrain.models.gpt import gpt_config

            gpt_config(args.train)  # names the known presets if this one is not
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size_bytes -= size_bytes % chunk_bytes  # whole chunks, so raw and store move the same bytes
    kw = dict(size_bytes=size_bytes, chunk_bytes=chunk_bytes)
    runs: list[list[IoResult]] = []
    for _ in range(args.repeat):  # interleaved, so drifting disk/host state hits every row alike
        row = [
            measure_raw(args.path, **kw),
            measure_store(args.path, **kw, direct=None, num_threads=args.threads),
            measure_store(args.path, **kw, direct=False, num_threads=args.threads),
        ]
        if args.compress:
            row.append(measure_store(args.path, **kw, direct=None, compress=True, num_threads=args.threads))
        runs.append(row)
    medians = [median_result([run[i] for run in runs]) for i in range(len(runs[0]))]
    print_table(medians[0], medians[1:], chunk_bytes=chunk_bytes, repeat=args.repeat)
    for depth in depths if args.train != "none" else []:
        result = measure_training(
            args.path, preset=args.train, seq_len=args.train_seq_len, micro_batch_size=args.train_micro_batch,
            num_micro=args.train_num_micro, num_steps=args.train_steps, chunk_elems=args.train_chunk_elems,
            prefetch_depth=depth, num_threads=args.threads, optim_staged_chunks=args.train_staged)
        print_training(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
