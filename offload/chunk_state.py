"""A ChunkStore's state by chunk, for checkpoints: what is on the device or the host as tensors,
what is on NVMe as the store's own files.

[Note: NVMe chunks in a checkpoint] An NVMe-home chunk's master parameters and optimizer states
are never gathered into memory for a checkpoint: the model may not fit there, which is why those
chunks are on NVMe. ``chunk_state`` hands out an ``NvmeFile`` per file instead: a read-only
descriptor of the file as it is at that moment (offload.nvme [Note: file snapshots]), which the
checkpoint writer links or copies in the kernel, no byte passing through Python.
``load_chunk_state`` gives each kept file back to the store (``NvmeStore.adopt``). Both sides
need the same chunk layout, as a run resumed with its own plan has; a different layout is
refused, naming the chunk.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memtrain.planner.plan import Tier

__all__ = ["NvmeFile", "chunk_state", "load_chunk_state"]


@dataclass(eq=False, slots=True)
class NvmeFile:
    """One NVMe store file as it was when the state was taken: ``fd`` reads it."""

    key: str
    fd: int
    size: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _parts(store) -> tuple[str, ...]:
    return ("master", *(("compute",) if store.mixed else ()), *store.state_names)


def chunk_state(store) -> dict[str, Any]:
    """Per chunk: its layout, step count, and master parameters and optimizer states (tensors on
    the device and host tiers, ``NvmeFile``s on NVMe). Call with no update or write-back in
    flight (the optimizer flushed)."""
    chunks = []
    for c in store.chunks:
        entry: dict[str, Any] = {"index": c.index, "home": str(c.home), "num_elems": c.num_elems,
                                 "params": [s.name for s in c.slots], "step": c.step.detach().clone()}
        if c.home is Tier.NVME:
            files = {}
            for part in _parts(store):
                key = store.nvme_key(c, part)
                if key in store.nvme:
                    fd = store.nvme.snapshot(key)
                    files[part] = NvmeFile(key=key, fd=fd, size=os.fstat(fd).st_size)
            entry["files"] = files
        else:
            entry["master"] = store._read(c, "master")
            entry["states"] = {k: store._read(c, k) for k in store.state_names if k in c.states}
        chunks.append(entry)
    return {"chunks": chunks}


def load_chunk_state(store, state: Mapping[str, Any], files: Mapping[str, Path] | None = None) -> None:
    """Put a ``chunk_state`` back; ``files`` maps each NVMe file's key to where the checkpoint
    keeps it."""
    saved = state["chunks"]
    if len(saved) != len(store.chunks):
        raise ValueError(f"checkpoint: {len(saved)} chunks, this engine has {len(store.chunks)}; resume with the plan "
                         "the checkpoint was taken with")
    for c, s in zip(store.chunks, saved):
        if (s["home"], s["num_elems"], list(s["params"])) != (str(c.home), c.num_elems, [p.name for p in c.slots]):
            raise ValueError(f"checkpoint: chunk {c.index} differs from this engine's ({s['home']}, {s['num_elems']} "
                             f"elements vs {c.home}, {c.num_elems}); resume with the plan the checkpoint was taken with")
    for c, s in zip(store.chunks, saved):
        c.step.copy_(s["step"])
        if c.home is Tier.NVME:
            for part in s["files"]:
                key = store.nvme_key(c, part)
                if files is None or key not in files:
                    raise ValueError(f"checkpoint: the file of {key!r} is missing")
                store.nvme.adopt(key, files[key])
        else:
            store._write(c, "master", s["master"])
            for k, t in s["states"].items():
                store._write(c, k, t)
        if c.home is not Tier.DEVICE and c.buf is not None:  # a resident copy is stale: the next use fetches
            store._release(c)
