"""The profile file: what ``memtrain profile`` measured, whose it is, and how it is stored.

A ``Profile`` is keyed by a machine fingerprint (``machine_id``) and a model key (the model
config, sequence length and dtype: ``model_key``); ``find_profile`` uses a run directory's
profile only when both match.

File format (``PROFILE_VERSION`` 3): one row per (block, micro-batch size) with ``block``,
``micro_batch_size``, ``fwd_s``, ``bwd_s``; the schema metadata key ``memtrain.profile`` holds
JSON with ``version``, ``machine_id``, ``fingerprint``, ``model_key``, ``model_name``,
``seq_len``, ``dtype``, ``created``, ``device``, ``bandwidths`` and ``overheads``. Older files
are refused with a request to re-profile: version 1 has no overheads and times the head without
the loss; version 2 measured NVMe bandwidth on one buffered stream, not through the store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memtrain.errors import UserError
from memtrain.planner.serde import from_dict, to_dict

__all__ = [
    "PROFILE_VERSION", "OVERHEAD_KEYS", "BlockTiming", "Profile", "ProfileError", "machine_fingerprint", "machine_id",
    "model_key", "save_profile", "load_profile", "find_profile",
]

PROFILE_VERSION = 3
"""3: NVMe bandwidth measured through the store; 2: ``overheads`` added and the last block timed
with the loss. Older versions are refused."""
_META_KEY = b"memtrain.profile"
OVERHEAD_KEYS = ("block_fwd_s", "block_bwd_s", "param_s", "microbatch_s", "chunk_fetch_s")
"""Keys of ``Profile.overheads``, applied to the ``ModelStats.overhead_*`` fields of the same names."""


class ProfileError(UserError):
    """A profile file that cannot be used (missing, wrong version, another machine or model)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class BlockTiming:
    block: str
    micro_batch_size: int
    fwd_s: float
    """Median forward time of the block for one micro-batch."""
    bwd_s: float
    """Median backward time (input and weight gradients)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Profile:
    version: int = PROFILE_VERSION
    machine_id: str
    """Hash of the fingerprint: profiles of another machine are not used."""
    fingerprint: dict[str, str]
    model_key: str
    """Hash of the model config, sequence length and dtype."""
    model_name: str
    seq_len: int
    dtype: str
    created: str
    device: str
    """``cuda:<name>`` or ``cpu``."""
    bandwidths: dict[str, float] = field(default_factory=dict)
    """Measured GB/s: ``h2d``, ``d2h``, ``device_memory``, ``nvme_read``, ``nvme_write``; and
    ``cpu_adam_params_per_s``, ``nvme_read_latency_s`` and ``nvme_write_latency_s`` (seconds)."""
    overheads: dict[str, float] = field(default_factory=dict)
    """Measured runtime overhead, seconds (``measure_runtime_overhead``): ``block_fwd_s`` and
    ``block_bwd_s`` per block call, ``param_s`` per parameter tensor per micro-batch backward,
    ``microbatch_s`` per micro-batch. Absent keys are 0."""
    blocks: tuple[BlockTiming, ...] = ()


# --- identity ------------------------------------------------------------------------------


def machine_fingerprint() -> dict[str, str]:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    fp = {
        "hostname": platform.node(),
        "cpu": cpu,
        "num_cpus": str(psutil.cpu_count(logical=True)),
        "memory_bytes": str(psutil.virtual_memory().total),
        "torch": torch.__version__.split("+")[0],
    }
    if torch.cuda.is_available():
        fp["gpus"] = ",".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return fp


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def machine_id(fingerprint: dict[str, str] | None = None) -> str:
    return _hash(fingerprint or machine_fingerprint())


def model_key(model_cfg: object, seq_len: int, dtype: str) -> str:
    cfg = to_dict(model_cfg) if dataclasses.is_dataclass(model_cfg) else model_cfg
    return _hash({"model": cfg, "seq_len": seq_len, "dtype": dtype})



# --- the file ------------------------------------------------------------------------------


def save_profile(profile: Profile, path: str | Path) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from memtrain.planner.atomic import atomic_write_bytes

    meta = to_dict(profile)
    rows = meta.pop("blocks")
    table = pa.table(
        {
            "block": pa.array([r["block"] for r in rows], pa.string()),
            "micro_batch_size": pa.array([r["micro_batch_size"] for r in rows], pa.int32()),
            "fwd_s": pa.array([r["fwd_s"] for r in rows], pa.float64()),
            "bwd_s": pa.array([r["bwd_s"] for r in rows], pa.float64()),
        }
    ).replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_profile(path: str | Path) -> Profile:
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"profile {str(path)!r} does not exist; create it with 'memtrain profile CONFIG'")
    try:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[_META_KEY])
    except Exception as e:  # a truncated or foreign file
        raise ProfileError(f"{path}: not a memtrain profile ({e})") from None
    if meta.get("version") != PROFILE_VERSION:
        why = {1: " (it has no runtime overheads and times the head without the loss)",
               2: " (its NVMe bandwidths are of one buffered stream, not of the store)"}.get(meta.get("version"), "")
        raise ProfileError(f"{path}: profile version {meta.get('version')!r}{why}; this memtrain reads "
                           f"{PROFILE_VERSION}; re-run 'memtrain profile'")
    meta["blocks"] = table.to_pylist()
    return from_dict(Profile, meta)


def find_profile(run_dir: str | Path, model_cfg, seq_len: int, dtype: str) -> Path | None:
    """The run directory's profile if it was measured on this machine for this model."""
    path = Path(run_dir) / "profile.parquet"
    if not path.is_file():
        return None
    try:
        prof = load_profile(path)
    except ProfileError:
        return None
    if prof.machine_id != machine_id() or prof.model_key != model_key(model_cfg, seq_len, dtype):
        return None
    return path

