"""Atomic file writes: temp file in the same directory, fsync, rename.

Every caller writes to a path a user chose (a report, a plan, a profile), so an OS error is
raised as a ``UserError`` naming the path and what would fix it; nothing is left behind (the
temp file and any folder this write created are removed).
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from memtrain.errors import UserError

__all__ = ["atomic_write_bytes", "atomic_write_text"]

_FIXES = {
    errno.EROFS: "the file system is read-only; choose a writable path",
    errno.EACCES: "permission denied; choose a path you may write",
    errno.EPERM: "permission denied; choose a path you may write",
    errno.ENOSPC: "no space left on the device; free some or choose another path",
    errno.EDQUOT: "disk quota exceeded; free some or choose another path",
    errno.EISDIR: "it is a directory; give a file name",
    errno.ENOTDIR: "a parent of it is a file, not a directory; choose another path",
    errno.EEXIST: "a parent of it is a file, not a directory; choose another path",
    errno.ENAMETOOLONG: "the name is too long",
}


def _missing_parents(path: Path) -> list[Path]:
    """The folders above ``path`` that do not exist yet, nearest first."""
    out, parent = [], path.parent
    while parent != parent.parent and not parent.exists():
        out.append(parent)
        parent = parent.parent
    return out


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    try:
        created = _missing_parents(path.absolute())
    except (OSError, ValueError):
        created = []
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        for folder in created:  # nearest first: each is empty once the one below is gone
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(e, (OSError, ValueError)):  # ValueError: a NUL byte in the name
            shown = str(path) if len(str(path)) <= 200 else str(path)[:197] + "..."
            why = _FIXES.get(getattr(e, "errno", None)) or getattr(e, "strerror", None) or str(e)
            raise UserError(f"cannot write {shown!r}: {why}") from e
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
