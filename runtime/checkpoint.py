"""Durable checkpoints: what a run needs to continue bit for bit, written atomically and verified.

[Note: checkpoint layout] A checkpoint is a directory ``step-<8 digits>`` under the checkpoint
root, holding ``manifest.json`` (format version, step, world size, compression, each file's
size and SHA-256, and what the saving code chose to record: the run's config) and one state file
per rank, ``rank-<5 digits>/state.pt`` (``.pt.zst`` when compressed). A rank's state is a plain
dict of tensors and numbers (``torch.load(weights_only=True)`` reads it): the fp32 master
parameters and the optimizer states of every chunk wherever it lives (``Engine.state_dict``),
the loss scaler, the RNG states of every generator (CPU, each CUDA device, Python's, NumPy's),
the data position and the step. Dropout in a recomputed block needs nothing more: the
activation manager's recompute replays the RNG state it saved in the forward of the same step,
and a checkpoint is taken between steps.

[Note: atomic checkpoints] Everything is written into a temporary directory ``.tmp-step-…``
beside the final one, each file fsynced, the manifest last, then the directory is renamed into
place and its parent fsynced: a crash leaves either the complete checkpoint or a temporary
directory that ``latest`` skips, naming it. A write that fails (disk full, a read-only
directory) removes the temporary directory and raises ``CheckpointError``; the previous
checkpoints are untouched, and old ones are pruned (``keep``) only after a new one is in place.

``Checkpointer`` writes in a background thread so the next steps overlap the disk: the state is
copied when ``save`` is called (the training goes on changing the live tensors), and one write is
in flight at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import numpy as np
import torch

from memtrain.errors import UserError
from memtrain.offload.chunk_state import NvmeFile

__all__ = ["FORMAT_VERSION", "CheckpointError", "Loaded", "save", "latest", "list_checkpoints", "Checkpointer",
           "capture_rng", "restore_rng", "engine_state", "restore_engine_state"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_HASH_BLOCK = 8 * 2**20


class CheckpointError(UserError):
    """A checkpoint could not be written or read; the message names the path and the fix."""


@dataclasses.dataclass(frozen=True, slots=True)
class Loaded:
    path: Path
    step: int
    manifest: dict
    states: dict[int, dict]
    """Per rank, its state dict."""
    nvme_files: dict[int, dict[str, Path]] = dataclasses.field(default_factory=dict)
    """Per rank, each NVMe store file the checkpoint keeps, by store key."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _rank_file(rank: int, compress: bool) -> str:
    return f"rank-{rank:05d}/state.pt" + (".zst" if compress else "")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> str:
    """Write ``data`` durably; its SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _serialize(state: Mapping[str, Any], compress: bool) -> bytes:
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    data = buf.getvalue()
    if compress:
        import zstandard

        data = zstandard.ZstdCompressor(level=3, threads=-1).compress(data)
    return data


def _deserialize(data: bytes, compressed: bool) -> dict:
    if compressed:
        import zstandard

        data = zstandard.ZstdDecompressor().decompress(data)
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _nvme_name(rank: int, key: str) -> str:
    return f"rank-{rank:05d}/nvme/{quote(key, safe='')}.mt"


def _take_files(rank: int, value: Any, found: dict[str, Any]) -> Any:
    """``value`` with each ``NvmeFile`` replaced by a reference to where the checkpoint keeps it
    (collected in ``found``: name -> NvmeFile)."""
    if isinstance(value, NvmeFile):
        name = _nvme_name(rank, value.key)
        found[name] = value
        return {"nvme_file": name, "key": value.key}
    if isinstance(value, Mapping):
        return {k: _take_files(rank, v, found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_take_files(rank, v, found) for v in value)
    return value


def _copy_fd(src: NvmeFile, path: Path) -> str:
    """Stream ``src`` into ``path`` durably, block by block; the SHA-256 of its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        offset = 0
        while True:
            block = os.pread(src.fd, _HASH_BLOCK, offset)
            if not block:
                break
            digest.update(block)
            out.write(block)
            offset += len(block)
        out.flush()
        os.fsync(out.fileno())
    if offset != src.size:
        raise OSError(f"{src.key}: read {offset} of {src.size} bytes")
    return digest.hexdigest()


def save(root: str | Path, step: int, states: Mapping[int, Mapping[str, Any]], *, meta: Mapping[str, Any] | None = None,
         compress: bool = False, keep: int | None = None) -> Path:
    """Write the checkpoint of ``step`` (``states``: per rank, its state dict) under ``root``
    atomically ([Note: atomic checkpoints]); prune to the newest ``keep``. Returns its path.
    An ``NvmeFile`` in a state is streamed into ``rank-<r>/nvme/`` and closed
    (offload.chunk_state [Note: NVMe chunks in a checkpoint])."""
    files_in: dict[str, NvmeFile] = {}
    states = {rank: _take_files(rank, state, files_in) for rank, state in states.items()}
    try:
        return _save(Path(root), step, states, files_in, meta, compress, keep)
    finally:
        for f in files_in.values():
            f.close()


def _save(root: Path, step: int, states: Mapping[int, Mapping[str, Any]], nvme_in: Mapping[str, NvmeFile],
          meta: Mapping[str, Any] | None, compress: bool, keep: int | None) -> Path:
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files = {}
        for rank, state in sorted(states.items()):
            data = _serialize(state, compress)
            name = _rank_file(rank, compress)
            files[name] = {"bytes": len(data), "sha256": _write_file(tmp / name, data)}
            _fsync_dir((tmp / name).parent)
        for name, src in sorted(nvme_in.items()):
            files[name] = {"bytes": src.size, "sha256": _copy_fd(src, tmp / name), "kind": "nvme"}
        for sub in {(tmp / name).parent for name in nvme_in}:
            _fsync_dir(sub)
        manifest = {"format": FORMAT_VERSION, "step": step, "world_size": len(states), "compression": "zstd" if compress else None,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files, **dict(meta or {})}
        _write_file(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again: the old one moves aside first (a crash between the
            # two renames leaves the earlier checkpoints, which latest() then takes)
            old = root / f".old-{step_dir_name(step)}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = [p.name for p in list_checkpoints(root) if p != final] if root.is_dir() else []
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(
            f"checkpoint: could not write {final}: {e.strerror or e}; {kept}. Free space there, make it writable, "
            "or set checkpoint.dir to another directory") from None
    if keep is not None:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete-looking checkpoint directories under ``root``, oldest first (not verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def _verify(path: Path) -> tuple[dict, dict[int, dict], dict[int, dict[str, Path]]]:
    """The manifest and the states of the checkpoint at ``path``; ValueError naming what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"its {MANIFEST} cannot be read ({e})") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"format {manifest.get('format')!r}, this memtrain reads format {FORMAT_VERSION}")
    states, nvme_files = {}, {}
    for name, entry in manifest["files"].items():
        rank = int(name.split("/")[0].split("-")[1])
        if entry.get("kind") == "nvme":
            if _file_sha256(path / name) != (entry["bytes"], entry["sha256"]):
                raise ValueError(f"{name} does not match its checksum")
            nvme_files.setdefault(rank, {})[unquote(Path(name).name[:-len(".mt")])] = path / name
            continue
        try:
            data = (path / name).read_bytes()
        except OSError as e:
            raise ValueError(f"{name} cannot be read ({e.strerror or e})") from None
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError(f"{name} does not match its checksum")
        states[rank] = _deserialize(data, manifest.get("compression") == "zstd")
    if len(states) != manifest.get("world_size"):
        raise ValueError(f"it holds {len(states)} of {manifest.get('world_size')} ranks' states")
    return manifest, states, nvme_files


def _file_sha256(path: Path) -> tuple[int, str] | None:
    """(size, SHA-256) of a file read block by block; None when it cannot be read."""
    digest, size = hashlib.sha256(), 0
    try:
        with open(path, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                digest.update(block)
                size += len(block)
    except OSError:
        return None
    return size, digest.hexdigest()


def latest(root: str | Path, *, warn: Callable[[str], None] = print) -> Loaded | None:
    """The newest checkpoint under ``root`` whose files match their checksums, or None. Each one
    skipped on the way (corrupt, partial: a temporary directory left by a crash) is named through
    ``warn``."""
    root = Path(root)
    if not root.is_dir():
        return None
    for tmp in sorted(p for p in root.iterdir() if p.name.startswith(".tmp-step-")):
        warn(f"memtrain: skipping {tmp}: a partial checkpoint (its write did not finish)")
    for path in reversed(list_checkpoints(root)):
        try:
            manifest, states, nvme_files = _verify(path)
        except ValueError as e:
            warn(f"memtrain: skipping checkpoint {path}: {e}; trying the one before it")
            continue
        return Loaded(path=path, step=int(manifest["step"]), manifest=manifest, states=states, nvme_files=nvme_files)
    return None


# --- what a rank's state holds ------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """The states of every random generator a training step may draw from."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _python_rng_state(),
                             "numpy": _numpy_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal.tolist()), None if gauss is None else float(gauss)))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))


def _python_rng_state() -> tuple:
    """Python's generator state as tensors and numbers (what ``weights_only`` loading accepts)."""
    version, internal, gauss = random.getstate()
    return (version, torch.tensor(internal, dtype=torch.int64), gauss)


def _numpy_rng_state() -> tuple:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def engine_state(engine, *, step: int, data: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> dict:
    """A rank's state after ``step`` steps ([Note: checkpoint layout]): ``Engine.checkpoint_state``
    (NVMe chunks as their files), the generators, the data position and ``extra``. Its tensors
    are copies, so training on changes nothing in it; give it to ``save`` or
    ``Checkpointer.save(..., copy=False)``, which close its files."""
    state = {"step": step, "engine": engine.checkpoint_state(), "rng": capture_rng()}
    if data is not None:
        state["data"] = dict(data)
    if extra:
        state["extra"] = dict(extra)
    return state


def restore_engine_state(engine, loaded: Loaded, rank: int = 0) -> dict:
    """Load rank ``rank``'s state of ``loaded`` into a built engine (the same plan) and restore
    the generators; returns that state (its ``data`` and ``extra``)."""
    state = loaded.states[rank]
    engine.load_checkpoint_state(state["engine"], loaded.nvme_files.get(rank, {}))
    restore_rng(state["rng"])
    return state


def _copied(value: Any) -> Any:
    """A deep copy of the tensors in a state (the training goes on changing the live ones)."""
    if isinstance(value, NvmeFile):  # already a snapshot (offload.nvme [Note: file snapshots])
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(v) for v in value)
    return value


class Checkpointer:
    """Writes checkpoints under ``root`` in a background thread, one at a time ([Note: atomic
    checkpoints]); ``wait`` raises a failed write's error."""

    def __init__(self, root: str | Path, *, keep: int = 2, compress: bool = False, meta: Mapping[str, Any] | None = None,
                 background: bool = True) -> None:
        self.root, self.keep, self.compress, self.meta, self.background = Path(root), keep, compress, dict(meta or {}), background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.saved: list[Path] = []
        self.seconds_blocked = 0.0
        """Training time spent in ``save`` and ``wait`` (copying the state, waiting for a write)."""

    def save(self, step: int, states: Mapping[int, Mapping[str, Any]], *, copy: bool = True) -> None:
        """Write ``states`` as step ``step``'s checkpoint. ``copy=False`` when no tensor in them is
        the training's own (``engine_state`` gathers copies), so they are not copied twice."""
        t0 = time.perf_counter()
        try:
            self.wait()
            copied = {r: _copied(s) for r, s in states.items()} if copy else dict(states)
        except BaseException:  # the state's NVMe file descriptors are ours to close
            found: dict[str, NvmeFile] = {}
            _take_files(0, states, found)
            for f in found.values():
                f.close()
            raise

        def write() -> None:
            try:
                self.saved.append(save(self.root, step, copied, meta=self.meta, compress=self.compress, keep=self.keep))
            except BaseException as e:  # raised in the training thread at the next wait
                self._error = e

        if self.background:
            self._thread = threading.Thread(target=write, name=f"memtrain-checkpoint-{step}", daemon=True)
            self._thread.start()
        else:
            write()
        self.seconds_blocked += time.perf_counter() - t0
        if not self.background:
            self._raise()

    def wait(self) -> None:
        """Wait for the write in flight; raise its error."""
        t0 = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.seconds_blocked += time.perf_counter() - t0
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
