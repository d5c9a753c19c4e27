"""The NVMe store's directory: its lock, the O_DIRECT probe and the removal of an earlier run's
files (offload.nvme [Note: stale files])."""

from __future__ import annotations

import errno
import fcntl
import os
import uuid
import warnings
from pathlib import Path

from memtrain.offload.nvme_format import _MAGIC, ALIGN_BYTES, NvmeError, _Staging
from memtrain.units import format_bytes

__all__ = ["StaleFilesWarning"]

_SUFFIX = ".mt"
_LOCK_NAME = ".memtrain-nvme.lock"


class StaleFilesWarning(UserWarning):
    """``start()`` removed files an earlier store left in its directory ([Note: stale files])."""


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    """Write all of ``buf`` at ``offset`` (a short write is retried from where it stopped)."""
    while len(buf):
        n = os.pwrite(fd, buf, offset)
        if n <= 0:
            raise OSError(errno.EIO, "write returned 0 bytes")
        buf, offset = buf[n:], offset + n


def _lock_directory(path: Path) -> int:
    """An exclusive lock on ``path`` for this store's life: two stores must not share a directory."""
    try:
        fd = os.open(path / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise NvmeError(f"nvme path {path} is not writable ({e.strerror}); choose a writable directory") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise NvmeError(f"nvme path {path} is in use by another NvmeStore; give each worker its own directory") from None
    return fd


def _probe_direct(path: Path, request: bool | None) -> bool:
    """Write one aligned block to a probe file: O_DIRECT if asked for (or None) and accepted."""
    has_direct = hasattr(os, "O_DIRECT")
    if request and not has_direct:
        raise NvmeError("direct=True: this platform has no O_DIRECT; pass direct=None or False")
    probe = path / f".probe-{uuid.uuid4().hex}.tmp"
    block = _Staging(ALIGN_BYTES).mv
    try:
        for direct in ([True, False] if request is None and has_direct else [bool(request)]):
            try:
                fd = os.open(probe, os.O_WRONLY | os.O_CREAT | (os.O_DIRECT if direct else 0), 0o600)
                try:
                    _pwrite_all(fd, block, 0)
                finally:
                    os.close(fd)
                return direct
            except OSError as e:
                if not direct or e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                if request:
                    raise NvmeError(f"direct=True: the filesystem at {path} does not accept O_DIRECT; "
                                    "pass direct=None (probe) or direct=False") from None
        raise AssertionError("unreachable: the buffered probe returns or raises")
    except OSError as e:
        raise NvmeError(f"nvme path {path} is not writable ({e.strerror}); choose a writable directory") from None
    finally:
        probe.unlink(missing_ok=True)


def _remove_stale(path: Path) -> None:
    """Remove the files an earlier store left in ``path``, and say so ([Note: stale files])."""
    num_files = num_bytes = 0
    for f in sorted(path.iterdir()):
        temp = f.name.startswith(".") and f.name.endswith(".tmp")
        if not (temp or f.name.endswith(_SUFFIX)) or not f.is_file():
            continue
        try:
            if not temp:
                with open(f, "rb") as fh:
                    if fh.read(len(_MAGIC)) != _MAGIC:
                        continue  # not a memtrain file: not ours to remove
            size = f.stat().st_size
            f.unlink()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise NvmeError(f"nvme path {path}: cannot remove {f.name}, left by an earlier run ({e.strerror}); "
                            "remove it by hand or choose another directory") from None
        num_files += 1
        num_bytes += size
    if num_files:
        warnings.warn(
            f"nvme path {path}: removed {num_files} file(s), {format_bytes(num_bytes)}, left by an earlier "
            "run that did not close its store (a crash or a kill)", StaleFilesWarning, stacklevel=3,
        )
