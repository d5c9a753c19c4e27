"""NVMe probes of the profiler (``runtime.profiling``): bandwidth and per-request cost at a path,
measured through ``offload.nvme.NvmeStore`` as the runtime moves chunks."""

from __future__ import annotations

import contextlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from memtrain.planner.measure import spread

__all__ = ["measure_disk_gbps", "measure_disk_latency_s", "disk_probe", "disk_latency_probe"]


@contextlib.contextmanager
def _probe_store(path: str | Path, **kw) -> Iterator:
    """A started ``NvmeStore`` in a fresh directory under ``path``; closed and removed after."""
    from memtrain.offload.nvme import NvmeStore

    Path(path).mkdir(parents=True, exist_ok=True)
    sub = tempfile.mkdtemp(prefix=".memtrain-profile-", dir=path)
    store = NvmeStore(sub, budget_bytes=None, **kw).start()
    try:
        yield store
    finally:
        store.close()
        shutil.rmtree(sub, ignore_errors=True)


def measure_disk_gbps(path: str | Path, num_bytes: int = 512 * 2**20, file_bytes: int = 32 * 2**20,
                      reps: int = 3) -> dict[str, float]:
    """Write and read bandwidth of the NVMe store at ``path``, GB/s (``disk_probe``'s figures)."""
    return disk_probe(path, num_bytes, file_bytes, reps)[0]


def disk_probe(path: str | Path, num_bytes: int = 512 * 2**20, file_bytes: int = 32 * 2**20,
               reps: int = 3) -> tuple[dict[str, float], float]:
    """Write and read bandwidth of the NVMe store at ``path``, GB/s, as the runtime streams
    chunks, and the wider spread (``planner.measure.spread``) of the write and the read rounds.

    [Note: the store's bandwidth, not one stream's] ``num_bytes`` in files of ``file_bytes`` go
    through ``offload.nvme.NvmeStore`` with its default threads, all submitted at once: O_DIRECT
    where the filesystem allows (else buffered, page cache dropped after each write), a checksum,
    ``fdatasync`` and a rename per file, as a chunk's write-back does. The writes are timed until
    every file is durable, then every file is read back and verified; each figure is the median
    of ``reps`` rounds (a shared virtual disk varies by tens of percent from one second to the
    next). The simulator puts NVMe transfers on one in-order disk stream, so this aggregate rate
    is the one it needs. The process's CPU seconds per second of each round (the store's threads:
    checksums and the kernel's side of each request; nothing else runs) are its CPU shares
    (``NvmeSpec.read_cpu_share``/``write_cpu_share``, [Note: the store's CPU on a CPU device]).
    One buffered stream with one ``fsync`` would measure far less than the store moves
    (docs/nvme.md).
    """
    from memtrain.offload.nvme import aligned_empty

    num_files = max(1, num_bytes // file_bytes)
    with _probe_store(path) as store:
        bufs = [aligned_empty(file_bytes // 4, torch.float32) for _ in range(num_files)]
        gen = torch.Generator().manual_seed(0)
        for b in bufs:  # incompressible, like trained weights (the store does not compress here)
            b.uniform_(generator=gen)
        store.write("warm-up", bufs[0][: 2**20]).result()
        write_s, read_s, write_cpu, read_cpu = [], [], [], []
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.process_time()
            for f in [store.write(f"probe{i}", b) for i, b in enumerate(bufs)]:
                f.result()
            t1, c1 = time.perf_counter(), time.process_time()
            for f in [store.read(f"probe{i}", b) for i, b in enumerate(bufs)]:
                f.result()
            t2, c2 = time.perf_counter(), time.process_time()
            write_s.append(t1 - t0)
            read_s.append(t2 - t1)
            write_cpu.append((c1 - c0) / (t1 - t0))
            read_cpu.append((c2 - c1) / (t2 - t1))
    moved = num_files * file_bytes
    return ({"nvme_write": moved / statistics.median(write_s) / 1e9, "nvme_read": moved / statistics.median(read_s) / 1e9,
             "nvme_write_cpu_share": statistics.median(write_cpu), "nvme_read_cpu_share": statistics.median(read_cpu)},
            max(spread(write_s), spread(read_s)))


def measure_disk_latency_s(path: str | Path, *, read_gbps: float, write_gbps: float, num_bytes: int = 64 * 2**10,
                           reps: int = 9) -> dict[str, float]:
    """Fixed seconds of one read and one durable write through the NVMe store at ``path``
    (``disk_latency_probe``'s figures)."""
    return disk_latency_probe(path, read_gbps=read_gbps, write_gbps=write_gbps, num_bytes=num_bytes, reps=reps)[0]


def disk_latency_probe(path: str | Path, *, read_gbps: float, write_gbps: float, num_bytes: int = 64 * 2**10,
                       reps: int = 9) -> tuple[dict[str, float], float]:
    """Fixed seconds of one read and one durable write through the NVMe store at ``path``, and the
    wider spread of the two's requests.

    The store's real path (a file per key, O_DIRECT where the filesystem allows, a checksummed
    header, ``fdatasync`` and a rename per write) on ``num_bytes`` requests: the median time of
    each, less the bytes' transfer at the measured bandwidths, is what every request costs on
    top of its bytes (``NvmeSpec.read_latency_s``/``write_latency_s``); on a virtual disk it can
    be several times the catalog's 0.1 ms (docs/nvme.md).
    """
    from memtrain.offload.nvme import aligned_empty

    buf = aligned_empty(num_bytes // 4, torch.float32).fill_(1.0)
    writes, reads = [], []
    with _probe_store(path, num_threads=1) as store:
        for rep in range(reps + 1):  # the first of each is a warm-up
            t0 = time.perf_counter()
            store.write("probe", buf).result()
            t1 = time.perf_counter()
            store.read("probe", buf).result()
            t2 = time.perf_counter()
            if rep:
                writes.append(t1 - t0)
                reads.append(t2 - t1)
    return ({"nvme_read_latency_s": max(statistics.median(reads) - num_bytes / (read_gbps * 1e9), 0.0),
             "nvme_write_latency_s": max(statistics.median(writes) - num_bytes / (write_gbps * 1e9), 0.0)},
            max(spread(reads), spread(writes)))
