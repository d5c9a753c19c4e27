"""The profile file: what ``memtrain profile`` measured, whose it is, and how it is stored.

A ``Profile`` is keyed by a machine fingerprint (``machine_id``) and a model key (the model
config, sequence length and dtype: ``model_key``); ``find_profile`` uses a run directory's
profile only when both match.

File format (``PROFILE_VERSION`` 4): one row per (block, micro-batch size) with ``block``,
``micro_batch_size``, ``fwd_s``, ``bwd_s``, ``fwd_spread``, ``bwd_spread``; the schema metadata
key ``memtrain.profile`` holds JSON with ``version``, ``machine_id``, ``fingerprint``,
``model_key``, ``model_name``, ``seq_len``, ``dtype``, ``created``, ``device``, ``bandwidths``,
``overheads``, ``quality`` (per probe: the repeats' spread, the load other processes put on the
machine, the rounds run; ``planner.measure``) and ``warnings`` (what is still unreliable). Older
files are refused with a request to re-profile: version 1 has no overheads and times the head
without the loss; version 2 measured NVMe bandwidth on one buffered stream, not through the
store; version 3 does not record how noisy its measurements were or the load they ran under.
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
from memtrain.planner.measure import ProbeQuality
from memtrain.planner.serde import from_dict, to_dict

__all__ = [
    "PROFILE_VERSION", "OVERHEAD_KEYS", "BlockTiming", "Profile", "ProfileError", "machine_fingerprint", "machine_id",
    "model_key", "save_profile", "load_profile", "find_profile", "FoundProfile", "model_mismatch", "other_machine",
    "PROBES", "profile_flag",
]

PROFILE_VERSION = 4
"""4: each probe's spread and load (``quality``) and ``warnings`` recorded; 3: NVMe bandwidth
measured through the store; 2: ``overheads`` added and the last block timed with the loss. Older
versions are refused."""
_OLD_VERSIONS = {
    1: "it has no runtime overheads and times the head without the loss",
    2: "its NVMe bandwidths are of one buffered stream, not of the store",
    3: "it does not record how noisy its measurements were or the load they ran under",
}
_META_KEY = b"memtrain.profile"
OVERHEAD_KEYS = ("block_fwd_s", "block_bwd_s", "param_s", "microbatch_s", "chunk_fetch_s")
"""Keys of ``Profile.overheads``, applied to the ``ModelStats.overhead_*`` fields of the same names."""
PROBES = {"blocks": "block times", "copy": "copy bandwidths", "nvme": "NVMe bandwidths",
          "nvme_latency": "NVMe request latency", "cpu_adam": "CPU AdamW rate", "overheads": "runtime overheads"}
"""The probes of ``run_profile`` (keys of ``Profile.quality``) and what each measures, for people."""


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
    fwd_spread: float = 0.0
    """Relative interquartile range of the forward runs (``planner.measure.spread``)."""
    bwd_spread: float = 0.0
    """The same of the forward + backward runs the backward time is taken from."""


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
    ``cpu_adam_params_per_s``, ``nvme_read_latency_s`` and ``nvme_write_latency_s`` (seconds),
    ``nvme_read_cpu_share`` and ``nvme_write_cpu_share`` (CPU seconds per second of NVMe transfer)."""
    overheads: dict[str, float] = field(default_factory=dict)
    """Measured runtime overhead, seconds (``measure_runtime_overhead``): ``block_fwd_s`` and
    ``block_bwd_s`` per block call, ``param_s`` per parameter tensor per micro-batch backward,
    ``microbatch_s`` per micro-batch. Absent keys are 0."""
    blocks: tuple[BlockTiming, ...] = ()
    quality: dict[str, ProbeQuality] = field(default_factory=dict)
    """Per probe (``blocks``, ``copy``, ``nvme``, ``nvme_latency``, ``cpu_adam``, ``overheads``): how
    far its figures can be trusted."""
    warnings: tuple[str, ...] = ()
    """What is unreliable in this profile, one line per probe (empty: nothing found)."""


def profile_flag(profile: Profile) -> str:
    """What is unreliable in ``profile``, in one clause for a plan's summary (empty: nothing):
    "measured under load (other processes used up to 1.3 of 2 cores, load average up to 2.5);
    repeats spread: block times 54%, copy bandwidths 27%"."""
    loaded = [q for q in profile.quality.values() if q.under_load]
    noisy = [(PROBES.get(name, name), q) for name, q in profile.quality.items() if q.noisy]
    parts = []
    if loaded:
        parts.append(f"measured under load (other processes used up to {max(q.other_cpus for q in loaded):.1f} of "
                     f"{loaded[0].num_cpus} cores, load average up to {max(q.load_avg for q in loaded):.1f})")
    if noisy:
        parts.append("repeats spread: " + ", ".join(f"{label} {q.spread:.0%}" for label, q in noisy))
    if not parts and profile.warnings:  # warnings without per-probe flags: show them as written
        parts = list(profile.warnings)
    return "; ".join(parts)


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
            "fwd_spread": pa.array([r["fwd_spread"] for r in rows], pa.float64()),
            "bwd_spread": pa.array([r["bwd_spread"] for r in rows], pa.float64()),
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
        raise ProfileError(f"{path}: not a memtrain profile ({e}); re-run 'memtrain profile CONFIG'") from None
    if meta.get("version") != PROFILE_VERSION:
        version = meta.get("version")
        why = f" ({_OLD_VERSIONS[version]})" if isinstance(version, int) and version in _OLD_VERSIONS else ""
        raise ProfileError(f"{path}: profile version {meta.get('version')!r}{why}; this memtrain reads "
                           f"{PROFILE_VERSION}; re-run 'memtrain profile CONFIG'")
    meta["blocks"] = table.to_pylist()
    try:
        return from_dict(Profile, meta)
    except (TypeError, ValueError, KeyError) as e:
        raise ProfileError(f"{path}: not a memtrain profile ({e}); re-run 'memtrain profile CONFIG'") from None


@dataclass(frozen=True, kw_only=True, slots=True)
class FoundProfile:
    """What ``find_profile`` found in a run directory."""

    path: Path | None = None
    """The profile to use; None when there is none that fits."""
    profile: Profile | None = None
    skipped: str = ""
    """Which file was not used and why (empty when there was none, or it was used)."""


def find_profile(run_dir: str | Path, model_cfg, seq_len: int, dtype: str) -> FoundProfile:
    """The run directory's profile if it was measured on this machine for this model; else why
    not, naming the file (unreadable, an old version, another machine, another model or shape)."""
    path = Path(run_dir) / "profile.parquet"
    if not path.is_file():
        return FoundProfile()
    try:
        prof = load_profile(path)
    except ProfileError as e:
        return FoundProfile(skipped=f"skipped {e}")
    why = model_mismatch(prof, model_cfg, seq_len, dtype) or other_machine(prof)
    if why:
        return FoundProfile(skipped=f"skipped {path}: {why}; 'memtrain profile CONFIG' measures this model on this machine")
    return FoundProfile(path=path, profile=prof)


def model_mismatch(prof: Profile, model_cfg, seq_len: int, dtype: str) -> str:
    """Why ``prof`` was not measured for this model, sequence length and dtype; empty if it was."""
    if prof.model_key == model_key(model_cfg, seq_len, dtype):
        return ""
    if prof.seq_len != seq_len:
        return f"measured at seq_len {prof.seq_len}, not this config's {seq_len}"
    if prof.dtype != dtype:
        return f"measured in {prof.dtype}, not this config's {dtype}"
    return f"measured for another model ({prof.model_name}; the config's model section differs)"


def other_machine(prof: Profile, fingerprint: dict[str, str] | None = None) -> str:
    """How the machine ``prof`` was measured on differs from this one (``fingerprint``: this
    machine's); empty when it is this machine."""
    here = fingerprint or machine_fingerprint()
    if prof.machine_id == machine_id(here):
        return ""
    theirs = prof.fingerprint
    diffs = [f"{k} {theirs.get(k, '?')} here {here.get(k, '?')}" for k in sorted(set(theirs) | set(here))
             if k != "hostname" and theirs.get(k) != here.get(k)]
    return (f"measured on another machine ({theirs.get('hostname', '?')}, id {prof.machine_id}; this is "
            f"{here.get('hostname', '?')}, id {machine_id(here)}{': ' + ', '.join(diffs[:3]) if diffs else ''})")
