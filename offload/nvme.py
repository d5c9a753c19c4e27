"""The NVMe I/O engine: tensors to files and back, asynchronously, checked and atomic.

``NvmeStore`` keeps one file per key in a directory on a fast local disk. It is the NVMe tier's
storage (docs/memory-accounting.md, "nvme" column): chunks whose home is NVMe and activations
swapped to NVMe are written and read here.

    store = NvmeStore("/mnt/nvme/memtrain/rank0", budget_bytes=200 * 2**30)
    store.start()                       # creates the directory, takes a lock, probes O_DIRECT,
                                        # removes an earlier run's files ([Note: stale files])
    fut = store.write("chunk:3", t)     # returns at once; ``t`` must not change until fut is done
    store.read("chunk:3", out).result() # fills ``out`` (same dtype and numel), checksum verified
    store.delete("chunk:3"); store.close()

Contract
- ``write`` and ``read`` run on a pool of ``num_threads`` threads and return a
  ``concurrent.futures.Future``; the caller is never blocked by a write in flight (double
  buffering is the caller writing chunk i+1 while chunk i is still going out). ``URGENT``
  operations (the default: fetches the compute waits for) run before ``BACKGROUND`` ones
  (optimizer-state traffic); operations on the same key run in the order they were submitted,
  whatever their priorities (a read after a write sees that write; a rewrite of a key after an
  in-place update replaces it atomically; memtrain.offload.io_queue). ``flush()`` waits for all.
  ``num_threads`` defaults to 8, so the fetches have reads in flight beside the optimizer's
  (docs/nvme.md).
- Source tensors must be CPU, contiguous, and left unchanged until the write's future is done;
  nothing is copied at submit time, so no untracked host memory appears behind the ledger.
  Tensors from ``aligned_empty`` (or pinned) move under O_DIRECT with no bounce copy at all
  (memtrain.offload.nvme_format, [Note: zero-copy payload]).
- ``.ledger`` (tier ``nvme``) holds the bytes on disk by key: header plus payload rounded up to
  4 KiB. A write reserves its upper bound before it is queued, so ``BudgetExceeded`` is raised
  in the caller, before any byte hits the disk; a rewrite holds both copies until the rename.
- Errors a user can act on (bad path, disk full, corrupt file, wrong ``out``) are ``NvmeError``
  (a ``ValueError``) naming the path or key and the fix.

The file format (header, checksum, compressed frames, aligned block I/O) lives in
memtrain.offload.nvme_format.

[Note: durability and the page cache] Every file is written to ``.<name>.<id>.tmp`` in the same
directory, ``fdatasync``-ed, and renamed over the final name, so a reader never sees a
half-written file; a crash leaves temp files and complete ones, both removed by the next
``start()`` ([Note: stale files]). With
O_DIRECT (used when the filesystem accepts it, probed once in ``start()``) data bypasses the
page cache; buffers are page-aligned anonymous mmaps. Without it (``direct=False`` or tmpfs-like
filesystems) writes are buffered, then ``fdatasync`` + ``POSIX_FADV_DONTNEED`` drop the file's
pages, and reads drop them afterwards too: offloading to NVMe is meant to free host RAM, so the
store must not keep a second, unaccounted copy in the page cache.

[Note: stale files] Files are a store's working memory, not a format kept across runs: ``close()``
removes them all. Files found by ``start()`` are therefore an earlier store's that never closed
(a crash, a kill): the directory lock, which the kernel drops when a process dies, proves no
live store uses them. ``start()`` removes them (the ``.mt`` files whose header is memtrain's, and
temp files) and says so once with a ``StaleFilesWarning`` naming the directory, the number of
files and their bytes; none of them enters the ledger, so leftovers never count against a new
run's budget. Other files in the directory are left alone.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import math
import os
import shutil
import threading
import uuid
from pathlib import Path
from urllib.parse import quote

import torch
import zstandard

from memtrain.offload.io_queue import BACKGROUND, URGENT, KeyedPool
from memtrain.offload.ledger import Ledger
from memtrain.offload.nvme_format import (
    _FRAME,
    _ZSTD_LEVEL,
    ALIGN_BYTES,
    HEADER_BYTES,
    NvmeEntry,
    NvmeError,
    _as_bytes,
    _BlockReader,
    _BlockWriter,
    _crc32,  # noqa: F401 - re-exported: tools and tests check which CRC-32 the store computes
    _disk_bytes,
    _pack_header,
    _parse_header,
    _read_frames,
    _Staging,
    _write_frames,
    aligned_empty,
    is_aligned,
)
from memtrain.offload.nvme_dir import (
    _LOCK_NAME, _SUFFIX, StaleFilesWarning, _lock_directory, _probe_direct, _pwrite_all, _remove_stale,
)

__all__ = [
    "NvmeError", "NvmeEntry", "NvmeStore", "StaleFilesWarning", "ALIGN_BYTES", "HEADER_BYTES", "aligned_empty",
    "is_aligned", "URGENT", "BACKGROUND",
]


_fdatasync = getattr(os, "fdatasync", os.fsync)


def _drop_cache(fd: int) -> None:
    """Ask the kernel to drop a (clean) file's pages: see [Note: durability and the page cache]."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"key: must be a non-empty string, got {key!r}")
    if len(quote(key, safe="")) + len(_SUFFIX) > 200:
        raise ValueError(f"key {key[:40]!r}...: too long for a file name; use a key under ~60 characters")


def _check_out(entry: NvmeEntry, out: torch.Tensor) -> None:
    if out.dtype != entry.dtype or out.numel() != entry.numel:
        raise ValueError(
            f"read({entry.key!r}): out is {out.dtype} x {out.numel()}, the stored tensor is "
            f"{entry.dtype} x {entry.numel}; pass a buffer of that dtype and size"
        )


class NvmeStore:
    """Tensors in files under one directory, written and read by a thread pool. See module doc."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        budget_bytes: int | None,
        num_threads: int = 8,
        compress: bool = False,
        direct: bool | None = None,
        block_bytes: int = 8 * 2**20,
    ) -> None:
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"budget_bytes: must be >= 0 or None (unlimited), got {budget_bytes}")
        if num_threads < 1:
            raise ValueError(f"num_threads: must be >= 1, got {num_threads}")
        if block_bytes < ALIGN_BYTES or block_bytes % ALIGN_BYTES or block_bytes >= 2**32:
            raise ValueError(f"block_bytes: must be a multiple of {ALIGN_BYTES} below 4 GiB, got {block_bytes}")
        if not str(path):
            raise NvmeError("nvme path is empty; set it to a directory on a fast local disk")
        self.path = Path(path)
        self.num_threads = num_threads
        self.compress = compress
        self.block_bytes = block_bytes
        self._direct_request = direct
        self.direct: bool | None = None
        """Whether O_DIRECT is in use; known after ``start()``."""
        self.ledger = Ledger("nvme", budget_bytes)
        self._lock = threading.Lock()
        self._entries: dict[str, NvmeEntry] = {}
        self._keys: set[str] = set()  # written or being written
        self._tails: dict[str, cf.Future] = {}  # last op submitted per key
        self._pending: set[cf.Future] = set()
        self._failed: list[BaseException] = []
        self._local = threading.local()
        self._pool: KeyedPool | None = None
        self._lock_fd = -1
        self._created_dir = False

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> NvmeStore:
        """Create the directory, lock it, probe O_DIRECT, remove an earlier run's files ([Note: stale files])."""
        if self._pool is not None:
            return self
        p = self.path
        if p.exists() and not p.is_dir():
            raise NvmeError(f"nvme path {p} exists and is not a directory; point it at a directory")
        if not p.exists():
            if not p.parent.is_dir():
                raise NvmeError(f"nvme path {p}: parent directory {p.parent} does not exist; create it or choose another path")
            try:
                p.mkdir()
                self._created_dir = True
            except FileExistsError:
                pass
            except OSError as e:
                raise NvmeError(f"nvme path {p}: cannot create the directory ({e.strerror}); choose a writable directory") from None
        self._lock_fd = _lock_directory(p)
        try:
            self.direct = _probe_direct(p, self._direct_request)
            _remove_stale(p)
        except BaseException:
            self._release_lock()
            raise
        self._pool = KeyedPool(self.num_threads, name="memtrain-nvme")
        return self

    def close(self) -> None:
        """Wait for everything in flight, stop the threads, and remove the files and the lock."""
        if self._pool is None:
            return
        cf.wait(list(self._pending))
        self._pool.shutdown()
        self._pool = None
        for key in list(self._entries):
            self._file(key).unlink(missing_ok=True)
            self.ledger.free(key)
        self._entries.clear()
        self._keys.clear()
        self._release_lock()
        if self._created_dir:
            try:
                self.path.rmdir()
            except OSError:
                pass  # something else lives there; leave it
        self._local = threading.local()

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            (self.path / _LOCK_NAME).unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> NvmeStore:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- public operations ---------------------------------------------------------------

    def write(self, key: str, tensor: torch.Tensor, *, priority: int = URGENT, reserved: bool = False) -> cf.Future:
        """Write ``tensor`` under ``key`` (replacing any earlier version atomically).

        The future's result is the ``NvmeEntry``. ``tensor`` must stay unchanged until then.
        ``priority``: ``URGENT`` (compute waits for it) runs before ``BACKGROUND``
        (memtrain.offload.io_queue). ``reserved``: the caller has reserved the new copy's bytes
        in ``ledger`` under an owner of its own and frees them itself (offload.optim: a rewrite's
        second copy over a window of the program, as the simulator books it); honoured for an
        uncompressed rewrite of the same size, else the write reserves as usual.
        """
        self._check_started()
        _check_key(key)
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
            raise ValueError(f"write({key!r}): tensor must be a CPU tensor; stage device memory through the host tier")
        if not tensor.is_contiguous():
            raise ValueError(f"write({key!r}): tensor must be contiguous; call .contiguous() on it first")
        nbytes = tensor.numel() * tensor.element_size()
        num_frames = math.ceil(nbytes / self.block_bytes)
        reserve = _disk_bytes(nbytes + (_FRAME.size * num_frames if self.compress else 0))
        if reserved and not self.compress:
            with self._lock:
                old = self._entries.get(key)
            if old is not None and old.disk_bytes == reserve:
                reserve = 0  # the caller's reservation covers the second copy
        self.ledger.alloc(key, reserve)  # BudgetExceeded here, in the caller
        with self._lock:
            self._keys.add(key)
        try:
            return self._submit(key, priority, self._write_op, key, tensor, reserve)
        except BaseException:
            self.ledger.free(key, reserve)
            raise

    def read(self, key: str, out: torch.Tensor, *, priority: int = URGENT) -> cf.Future:
        """Read ``key`` into ``out`` (CPU, contiguous, same dtype and numel); result is ``out``.

        The checksum is verified; on any error the contents of ``out`` are unspecified.
        ``priority`` as for ``write``.
        """
        self._check_started()
        _check_key(key)
        with self._lock:
            if key not in self._keys:
                raise NvmeError(f"read({key!r}): no such key in {self.path}; write it first")
            entry = self._entries.get(key) if key not in self._tails else None
        if not isinstance(out, torch.Tensor) or out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError(f"read({key!r}): out must be a contiguous CPU tensor")
        if entry is not None:
            _check_out(entry, out)
        return self._submit(key, priority, self._read_op, key, out)

    def write_sync(self, key: str, tensor: torch.Tensor) -> NvmeEntry:
        return self.write(key, tensor).result()

    def read_sync(self, key: str, out: torch.Tensor) -> torch.Tensor:
        return self.read(key, out).result()

    def delete(self, key: str, *, wait: bool = True) -> cf.Future:
        """Remove ``key``'s file (after anything in flight on it) and release its bytes. If the
        file cannot be removed (``NvmeError``), its bytes stay on the ledger until ``close()``.
        ``wait=False`` returns at once: the key is gone (a new write may reuse it), and its file
        and ledger bytes go when the returned future is done."""
        self._check_started()
        _check_key(key)
        with self._lock:
            if key not in self._keys:
                raise NvmeError(f"delete({key!r}): no such key in {self.path}")
            self._keys.discard(key)
        fut = self._submit(key, URGENT, self._delete_op, key)
        if wait:
            fut.result()
        return fut

    def flush(self) -> None:
        """Wait for every operation submitted so far; raise the first failure among them."""
        while True:
            with self._lock:
                pending = list(self._pending)
            if not pending:
                break
            cf.wait(pending)
        with self._lock:
            failed, self._failed = self._failed, []
        if failed:
            raise failed[0]

    def snapshot(self, key: str) -> int:
        """A read-only descriptor of ``key``'s file as it is now, once the key's queued operations
        are done. [Note: file snapshots] Every write goes to a new file renamed over the old one
        (never in place), so the descriptor keeps this version's bytes readable even after a later
        write replaces the name: a checkpoint can copy it while training goes on. The caller
        closes it."""
        self._check_started()
        with self._lock:
            tail = self._tails.get(key)
        if tail is not None:
            tail.result()
        with self._lock:
            if key not in self._entries:
                raise NvmeError(f"snapshot({key!r}): no data for this key in {self.path}")
        return os.open(self._file(key), os.O_RDONLY)

    def adopt(self, key: str, src: str | os.PathLike[str]) -> NvmeEntry:
        """Make the store file ``src`` (written by a store, e.g. kept in a checkpoint) the data of
        ``key``: copied in under a temporary name and renamed into place, its header checked and
        its bytes charged to the ledger; reads verify its payload's checksum as for any file."""
        self._check_started()
        src = Path(src)
        with open(src, "rb") as fh:
            entry, _ = _parse_header(fh.read(HEADER_BYTES), src, key)
        final = self._file(key)
        tmp = self.path / f".{final.name}.{uuid.uuid4().hex}.tmp"
        with self._lock:
            tail = self._tails.get(key)
        if tail is not None:
            tail.result()
        self.ledger.alloc(key, entry.disk_bytes)
        try:
            shutil.copyfile(src, tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                _fdatasync(fd)
                _drop_cache(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            self.ledger.free(key, entry.disk_bytes)
            if isinstance(e, OSError):
                raise self._io_error(e, "adopting", src, key) from e
            raise
        with self._lock:
            old = self._entries.get(key)
            self._entries[key] = entry
            self._keys.add(key)
        if old is not None:
            self.ledger.free(key, old.disk_bytes)
        return entry

    def entry(self, key: str) -> NvmeEntry:
        """The last completed write of ``key``."""
        with self._lock:
            if key not in self._entries:
                raise NvmeError(f"no completed write of key {key!r} in {self.path}")
            return self._entries[key]

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def file_path(self, key: str) -> Path:
        """Where ``key`` lives on disk (for tools and tests)."""
        return self._file(key)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._keys

    # --- internals -------------------------------------------------------------------------

    def _check_started(self) -> None:
        if self._pool is None:
            raise NvmeError(f"NvmeStore({self.path}) is not started; call start() first")

    def _file(self, key: str) -> Path:
        # Percent-encoding keeps ':' and '/' out of names, so a key can never leave the directory.
        return self.path / (quote(key, safe="") + _SUFFIX)

    def _thread_state(self) -> tuple[_Staging, zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
        """This worker thread's bounce buffer and zstandard contexts (neither is shared)."""
        st = getattr(self._local, "state", None)
        if st is None:
            st = self._local.state = (
                _Staging(self.block_bytes), zstandard.ZstdCompressor(level=_ZSTD_LEVEL), zstandard.ZstdDecompressor()
            )
        return st

    def _submit(self, key: str, priority: int, fn, *args) -> cf.Future:
        assert self._pool is not None
        with self._lock:
            # The pool runs one op per key at a time, in submission order (io_queue [Note: per-key order]).
            fut = self._pool.submit(key, priority, fn, *args)
            self._tails[key] = fut
            self._pending.add(fut)
        fut.add_done_callback(lambda f: self._on_done(key, f))
        return fut

    def _on_done(self, key: str, fut: cf.Future) -> None:
        with self._lock:
            if self._tails.get(key) is fut:
                del self._tails[key]
            self._pending.discard(fut)
            if not fut.cancelled() and fut.exception() is not None:
                self._failed.append(fut.exception())

    def _write_op(self, key: str, tensor: torch.Tensor, reserve: int) -> NvmeEntry:
        final = self._file(key)
        tmp = self.path / f".{final.name}.{uuid.uuid4().hex}.tmp"
        staging, cctx, _ = self._thread_state()
        src = _as_bytes(tensor)
        src_mv = memoryview(src.numpy()) if src.numel() else memoryview(b"")
        fd = -1
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | (os.O_DIRECT if self.direct else 0)
            fd = os.open(tmp, flags, 0o600)
            writer = _BlockWriter(fd, staging, direct=bool(self.direct), offset=HEADER_BYTES, pwrite=_pwrite_all)
            if self.compress:
                _write_frames(writer, src_mv, self.block_bytes, cctx)
            else:
                writer.append(src_mv, aligned=is_aligned(tensor))
            stored, crc = writer.finish()
            staging.mv[:HEADER_BYTES] = _pack_header(
                dtype=tensor.dtype, numel=tensor.numel(), nbytes=len(src_mv), stored_bytes=stored,
                payload_crc=crc, compressed=self.compress,
            )
            _pwrite_all(fd, staging.mv[:HEADER_BYTES], 0)
            _fdatasync(fd)  # [Note: durability and the page cache]
            if not self.direct:
                _drop_cache(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, final)
        except BaseException as e:
            if fd >= 0:
                os.close(fd)
            tmp.unlink(missing_ok=True)
            self.ledger.free(key, reserve)
            with self._lock:
                if key not in self._entries:
                    self._keys.discard(key)
            if isinstance(e, OSError):
                raise self._io_error(e, "writing", tmp, key) from e
            raise
        entry = NvmeEntry(
            key=key, dtype=tensor.dtype, numel=tensor.numel(), nbytes=len(src_mv), stored_bytes=stored,
            disk_bytes=_disk_bytes(stored), compressed=self.compress,
        )
        with self._lock:
            old = self._entries.get(key)
            self._entries[key] = entry
        # The key held old + reserve during the write; keep only the new file's bytes.
        self.ledger.free(key, (old.disk_bytes if old else 0) + reserve - entry.disk_bytes)
        return entry

    def _io_error(self, e: OSError, doing: str, path: Path, key: str) -> NvmeError:
        if e.errno == errno.ENOSPC:
            return NvmeError(
                f"no space left on device {doing} {path} (key {key!r}); free space under {self.path} "
                "or lower the NVMe budget (memory.nvme) so the planner keeps less there"
            )
        return NvmeError(f"{doing} {path} (key {key!r}) failed: {e.strerror or e}")

    def _read_op(self, key: str, out: torch.Tensor) -> torch.Tensor:
        with self._lock:
            known = key in self._entries
        path = self._file(key)
        if not known:
            raise NvmeError(f"read({key!r}): no data for this key in {self.path} (its write failed or it was deleted)")
        staging, _, dctx = self._thread_state()
        fd = -1
        try:
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if self.direct else 0))
            got = os.preadv(fd, [staging.mv[:HEADER_BYTES]], 0)
            entry, payload_crc = _parse_header(bytes(staging.mv[:got]), path, key)
            _check_out(entry, out)
            dst = memoryview(_as_bytes(out).numpy()) if entry.nbytes else memoryview(bytearray(0))
            reader = _BlockReader(fd, staging, direct=bool(self.direct), offset=HEADER_BYTES,
                                  length=entry.stored_bytes, path=path)
            if entry.compressed:
                _read_frames(reader, dst, dctx, path)
            else:
                reader.readinto(dst, aligned=is_aligned(out))
            if reader.crc != payload_crc or reader.left or reader.pos != reader.end:
                raise NvmeError(f"{path}: checksum mismatch (file corrupt); delete it and write key {key!r} again")
            if not self.direct:
                _drop_cache(fd)
        except OSError as e:
            raise self._io_error(e, "reading", path, key) from e
        finally:
            if fd >= 0:
                os.close(fd)
        return out

    def _delete_op(self, key: str) -> None:
        path = self._file(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as e:  # the file and its bytes stay known, so close() tries again
            raise self._io_error(e, "removing", path, key) from e
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is not None:
            self.ledger.free(key, entry.disk_bytes)
