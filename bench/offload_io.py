"""Offload I/O benchmark: raw disk bandwidth vs memtrain's chunk streaming, side by side.

    python bench/offload_io.py --path /mnt/nvme/tmp [--size 1GiB] [--chunk 64MiB]

Part 1 (this file's ``measure_*`` functions): sequential write and read bandwidth of the disk
at ``--path`` with plain large-file I/O, then the same bytes written and read as chunks through
``NvmeStore`` (O_DIRECT if the filesystem allows, and buffered), and the ratio store / raw
(target >= 0.8). Every figure is measured in this run.

Cache treatment, the same for both: writes count until the data is on the disk (``fsync`` /
``fdatasync``); reads start after the file's pages were dropped from the page cache with
``posix_fadvise(POSIX_FADV_DONTNEED)`` (O_DIRECT reads bypass the cache anyway).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import wait
from dataclasses import dataclass

import torch

from memtrain.offload.nvme import NvmeStore
from memtrain.planner.units import format_bytes, parse_bytes

__all__ = ["IoResult", "measure_raw", "measure_store", "median_result", "print_table", "main"]


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
    path: str, *, size_bytes: int, chunk_bytes: int, direct: bool | None, compress: bool = False, num_threads: int = 4
) -> IoResult:
    """``size_bytes`` as ``chunk_bytes`` float32 chunks written then read through ``NvmeStore``."""
    num_chunks = max(1, size_bytes // chunk_bytes)
    numel = chunk_bytes // 4
    # Distinct random data per chunk: compression and dedup in the stack cannot flatter the figure.
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(numel, generator=gen) for _ in range(num_chunks)]
    # Zeroed, so their pages exist: tier buffers are resident in use, and the raw read reuses
    # one resident buffer too (first-touch page faults would otherwise dominate the read time).
    outs = [torch.zeros(numel) for _ in range(num_chunks)]
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--path", default=tempfile.gettempdir(), help="directory on the disk to measure")
    ap.add_argument("--size", default="1GiB", help="total bytes written then read (default 1GiB)")
    ap.add_argument("--chunk", default="64MiB", help="chunk size (default 64MiB)")
    ap.add_argument("--threads", type=int, default=4, help="NvmeStore I/O threads (default 4)")
    ap.add_argument("--compress", action="store_true", help="also measure zstd-compressed chunks")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row; the median is printed (default 3)")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
