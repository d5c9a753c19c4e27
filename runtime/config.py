"""The run configuration: YAML → validated dataclasses, with ``--set`` overrides.

Every section is a ``kw_only, slots`` dataclass with a docstring per field (docs/config.md is
the reference). A user mistake raises ``ConfigError`` naming the dotted field and the fix;
the CLI prints it and exits 2.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from memtrain.errors import UserError
from memtrain.planner.units import parse_bytes

__all__ = [
    "ConfigError", "ModelConfig", "DataConfig", "OptimizerConfig", "TrainConfig", "DeviceConfig",
    "NvmeConfig", "NodeConfig", "ClusterConfig", "MemoryConfig", "SnapshotConfig", "Config",
    "load_config", "apply_overrides", "config_from_dict",
]


class ConfigError(UserError):
    """A user mistake in the configuration; the message names the field and the fix."""


Size = int  # a field annotated Size accepts "24GiB" strings


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    source: str = "gpt"
    """Where the model comes from: ``gpt`` (built-in family), ``hf`` (a Hugging Face config) or
    ``python`` (a factory function)."""
    preset: str = "tiny"
    """For ``gpt``: a preset name (tiny, 100m, 125m, 350m, 760m, 1.3b, 2.7b, 6.7b, 13b, 175b,
    llama-7b, llama-13b, llama-70b)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """For ``gpt``: fields that replace the preset's (num_layers, hidden_size, num_heads,
    num_kv_heads, ffn_hidden_size, vocab_size, max_seq_len, position, norm, activation,
    tie_embeddings, bias, dropout, fused_attention)."""
    hf_config: dict[str, Any] = field(default_factory=dict)
    """For ``hf``: a transformers config dict (must contain ``model_type``)."""
    factory: str = ""
    """For ``python``: ``package.module:function`` returning an nn.Module (with ``.blocks``) or
    ``(module, blocks)``."""

    def __post_init__(self) -> None:
        if self.source not in ("gpt", "hf", "python"):
            raise ConfigError(f"model.source: must be 'gpt', 'hf' or 'python', got {self.source!r}")
        if self.source == "hf" and "model_type" not in self.hf_config:
            raise ConfigError("model.hf_config: needs a 'model_type' (e.g. llama, gpt2) for source 'hf'")
        if self.source == "python" and ":" not in self.factory:
            raise ConfigError("model.factory: write 'package.module:function' for source 'python'")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    source: str = "synthetic"
    """``synthetic`` (seeded walks of a random sparse Markov chain: learnable) or ``tokens`` (a flat
    .npy/.bin file of token ids)."""
    path: str = ""
    """For ``tokens``: the file of token ids."""
    seed: int = 0
    """Seed of the synthetic data and the sampling order."""

    def __post_init__(self) -> None:
        if self.source not in ("synthetic", "tokens"):
            raise ConfigError(f"data.source: must be 'synthetic' or 'tokens', got {self.source!r}")
        if self.source == "tokens" and not self.path:
            raise ConfigError("data.path: set the token file for data.source 'tokens'")


@dataclass(kw_only=True, slots=True)
class OptimizerConfig:
    name: str = "adamw"
    """``adamw`` or ``sgd``."""
    lr: float = 3e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW coefficients of the running averages of the gradient and its square."""
    eps: float = 1e-8
    """AdamW term added to the denominator."""
    weight_decay: float = 0.1
    """Decoupled weight decay (Loshchilov & Hutter 2019)."""
    momentum: float = 0.9
    """For ``sgd``."""

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "sgd"):
            raise ConfigError(f"train.optimizer.name: must be 'adamw' or 'sgd', got {self.name!r}")
        if not self.lr > 0:
            raise ConfigError(f"train.optimizer.lr: must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.optimizer.betas: two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.optimizer.weight_decay: must be >= 0, got {self.weight_decay}")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    global_batch_size: int = 8
    """Sequences per optimizer step."""
    micro_batch_size: int = 0
    """Sequences per forward/backward; 0 lets the planner choose a divisor of the global batch."""
    seq_len: int = 64
    """Tokens per sequence."""
    steps: int = 10
    """Optimizer steps to run."""
    dtype: str = "fp32"
    """Compute dtype: ``fp32``, ``bf16`` or ``fp16`` (mixed precision with fp32 master weights)."""
    seed: int = 0
    """Seed of model initialisation, dropout and data."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """The optimizer (section ``train.optimizer``)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""
    lr_schedule: str = "constant"
    """``constant`` or ``cosine`` (decay to 10% of lr over ``steps``)."""

    def __post_init__(self) -> None:
        for name in ("global_batch_size", "seq_len", "steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size < 0 or (self.micro_batch_size and self.global_batch_size % self.micro_batch_size):
            raise ConfigError(
                f"train.micro_batch_size: must divide train.global_batch_size ({self.global_batch_size}), "
                f"got {self.micro_batch_size}; use 0 to let the planner choose"
            )
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"train.dtype: must be 'fp32', 'bf16' or 'fp16', got {self.dtype!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"train.lr_schedule: must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps: must be >= 0, got {self.warmup_steps}")


@dataclass(kw_only=True, slots=True)
class DeviceConfig:
    kind: str = "cpu"
    """Catalog key: h100-sxm, h100-pcie, h200, gh200, a100-40gb, a100-80gb, l40s, a10, rtx4090,
    rtx3090, v100, v100-16gb, t4, or cpu."""
    count: int = 1
    """Devices of this kind on the node."""
    memory: Size | None = None
    """Override the catalog's device memory (e.g. ``24GiB``)."""
    bf16_tflops: float | None = None
    """Override dense bf16 peak, TFLOP/s."""
    fp16_tflops: float | None = None
    """Override dense fp16 peak, TFLOP/s."""
    fp32_tflops: float | None = None
    """Override fp32 peak, TFLOP/s."""
    memory_bw_gbps: float | None = None
    """Override device memory bandwidth, GB/s."""
    h2d_gbps: float | None = None
    """Override host→device bandwidth, GB/s."""
    d2h_gbps: float | None = None
    """Override device→host bandwidth, GB/s."""
    compute_efficiency: float | None = None
    """Override the fraction of peak FLOP/s reached by transformer blocks (0, 1]."""

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError(f"cluster.nodes[].devices[].count: must be >= 1, got {self.count}")
        if self.compute_efficiency is not None and not 0 < self.compute_efficiency <= 1:
            raise ConfigError(
                f"cluster.nodes[].devices[].compute_efficiency: must be in (0, 1], got {self.compute_efficiency}"
            )


@dataclass(kw_only=True, slots=True)
class NvmeConfig:
    path: str = ""
    """Directory for offloaded chunks and swapped activations (a fast local disk)."""
    capacity: Size | None = None
    """Bytes memtrain may use there; default: the free space of the path's filesystem."""
    read_gbps: float | None = None
    """Override sequential read bandwidth, GB/s."""
    write_gbps: float | None = None
    """Override sequential write bandwidth, GB/s."""


@dataclass(kw_only=True, slots=True)
class NodeConfig:
    name: str = "node0"
    """Node name, used in reports."""
    host_memory: Size | None = None
    """Host RAM; default: the catalog host's (or this machine's for ``auto``)."""
    num_cpus: int | None = None
    """CPU cores for the CPU optimizer step; default: the catalog host or this machine."""
    host_memory_bw_gbps: float | None = None
    """Override host memory bandwidth, GB/s."""
    cpu_adam_params_per_s: float | None = None
    """Override the CPU AdamW throughput, parameters per second."""
    devices: list[DeviceConfig] = field(default_factory=lambda: [DeviceConfig()])
    """The node devices."""
    nvme: NvmeConfig | None = None
    """Local NVMe used for offload (none by default)."""


@dataclass(kw_only=True, slots=True)
class ClusterConfig:
    auto: bool = True
    """Read this machine (psutil, nvidia-ml-py) instead of ``nodes``. ``cluster: auto`` in YAML."""
    nodes: list[NodeConfig] = field(default_factory=list)
    """Explicit nodes (each with host memory, devices and an optional NVMe)."""
    network_gbps: float = 12.5
    """Inter-node bandwidth, GB/s."""

    def __post_init__(self) -> None:
        if not self.auto and not self.nodes:
            raise ConfigError("cluster.nodes: list at least one node, or write 'cluster: auto'")


@dataclass(kw_only=True, slots=True)
class MemoryConfig:
    device: Size | None = None
    """Device-tier budget per device; default: the device's memory."""
    host: Size | None = None
    """Host-tier budget per node; default: the node's host memory."""
    nvme: Size | None = None
    """NVMe-tier budget; default: the NVMe capacity (0 without an NVMe path)."""
    safety_margin: float = 0.1
    """Fraction of each budget kept free for fragmentation and untracked workspace."""

    def __post_init__(self) -> None:
        if not 0 <= self.safety_margin < 1:
            raise ConfigError(f"memory.safety_margin: must be in [0, 1), got {self.safety_margin}")


@dataclass(kw_only=True, slots=True)
class SnapshotConfig:
    interval_steps: int = 0
    """Take an in-memory erasure-coded snapshot every N steps; 0 = off."""
    k: int = 4
    """Data stripes of the erasure code."""
    m: int = 2
    """Parity stripes (losses survived)."""

    def __post_init__(self) -> None:
        if self.interval_steps < 0 or self.k < 1 or self.m < 0:
            raise ConfigError("snapshot: interval_steps >= 0, k >= 1 and m >= 0 are required")


@dataclass(kw_only=True, slots=True)
class Config:
    name: str = "run"
    """Run name (used in reports and the run directory)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    run_dir: str = "runs/{name}"
    """Where checkpoints, profiles and reports go; ``{name}`` is replaced by the run name."""


# --- loading ---------------------------------------------------------------------------


def _build(tp: Any, data: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return data
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _build(inner, data, path)
    if tp is Size:
        try:
            return parse_bytes(data, field=path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if dataclasses.is_dataclass(tp):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of fields, got {data!r}")
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            where = f"{path}." if path else ""
            raise ConfigError(f"{where}{unknown[0]}: unknown field; known fields here: {', '.join(names)}")
        kwargs = {k: _build(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
        try:
            return tp(**kwargs)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{path or 'config'}: {e}") from None
    if origin is list:
        if not isinstance(data, list):
            raise ConfigError(f"{path}: expected a list, got {data!r}")
        return [_build(args[0], v, f"{path}[{i}]") for i, v in enumerate(data)]
    if origin is tuple:
        if not isinstance(data, (list, tuple)) or len(data) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {data!r}")
        return tuple(_build(a, v, path) for a, v in zip(args, data))
    if origin is dict:
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping, got {data!r}")
        return dict(data)
    if tp is bool:
        if not isinstance(data, bool):
            raise ConfigError(f"{path}: expected true or false, got {data!r}")
        return data
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise ConfigError(f"{path}: expected a whole number, got {data!r}")
        return data
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {data!r}")
        return float(data)
    if tp is str:
        if not isinstance(data, (str, int, float)) or isinstance(data, bool):
            raise ConfigError(f"{path}: expected text, got {data!r}")
        return str(data)
    raise AssertionError(f"unhandled config type {tp} at {path}")


def config_from_dict(data: dict[str, Any]) -> Config:
    data = dict(data or {})
    cluster = data.get("cluster")
    if cluster == "auto" or cluster is None:
        data["cluster"] = {"auto": True}
    elif isinstance(cluster, dict):
        data["cluster"] = {"auto": False, **cluster}
    return _build(Config, data, "")


_PART_RE = __import__("re").compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b[0].c`` in the raw config mapping; list items must already exist."""
    node: Any = data
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        m = _PART_RE.match(part)
        if not m:
            raise ConfigError(f"--set {dotted}: cannot read {part!r}; write names and [index], e.g. cluster.nodes[0].host_memory")
        name, indices = m.group(1), [int(i) for i in __import__("re").findall(r"\d+", m.group(2))]
        last = depth == len(parts) - 1
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(parts[:depth])} is not a section")
        if last and not indices:
            node[name] = value
            return
        if name not in node or node[name] is None or node[name] == "auto":
            if indices:
                raise ConfigError(f"--set {dotted}: {name} has no item {indices[0]}; write the list in the config file")
            node[name] = {}
        node = node[name]
        for k, i in enumerate(indices):
            if not isinstance(node, list) or i >= len(node):
                raise ConfigError(f"--set {dotted}: {name} has no item {i}; write the list in the config file")
            if last and k == len(indices) - 1:
                node[i] = value
                return
            node = node[i]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` overrides; values are read as YAML (``2``, ``bf16``, ``[0.9, 0.99]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: write section.field=value, e.g. --set train.steps=20")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if key.strip() == "cluster" and value == "auto":
            data["cluster"] = "auto"
            continue
        _set_dotted(data, key.strip(), value)
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass a YAML file such as examples/tiny-cpu.yaml")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (model, train, ...)")
        data.setdefault("name", p.stem)
    return config_from_dict(apply_overrides(data, list(overrides)))


# --- reference documentation -------------------------------------------------------------

_SECTIONS: list[tuple[str, type]] = [
    ("", Config), ("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig),
    ("train.optimizer", OptimizerConfig), ("cluster", ClusterConfig), ("cluster.nodes[]", NodeConfig),
    ("cluster.nodes[].devices[]", DeviceConfig), ("cluster.nodes[].nvme", NvmeConfig),
    ("memory", MemoryConfig), ("snapshot", SnapshotConfig),
]


def field_docs() -> list[tuple[str, str, str, str]]:
    """``(dotted name, type, default, docstring)`` for every config field, read from this file."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(__import__(__name__, fromlist=["_"])))
    docs: dict[tuple[str, str], str] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            body = node.body
            for a, b in zip(body, body[1:]):
                if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                    docs[(node.name, a.target.id)] = " ".join(str(b.value.value).split())
    rows = []
    for prefix, cls in _SECTIONS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in ("model", "data", "train", "cluster", "memory", "snapshot", "optimizer", "nodes", "devices", "nvme") and prefix != "memory":
                continue
            if f.default is not dataclasses.MISSING:
                default = repr(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = repr(f.default_factory())
            else:
                default = "required"
            type_name = "size" if f.name in _size_fields(cls) else _type_name(hints[f.name])
            dotted = f"{prefix}.{f.name}" if prefix else f.name
            rows.append((dotted, type_name, default, docs.get((cls.__name__, f.name), "")))
    return rows


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return _type_name(args[0]) + " (optional)"
    return getattr(tp, "__name__", str(tp))


def _size_fields(cls: type) -> set[str]:
    import inspect

    src = inspect.getsource(cls)
    return {line.split(":")[0].strip() for line in src.splitlines() if ": Size" in line}


def config_reference_markdown() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `runtime/config.py` by `python -m memtrain.runtime.config` (a test checks it is current).",
        "Every field can be set on the command line with `--set dotted.name=value` (values are read as YAML; list items by index, e.g. `--set cluster.nodes[0].devices[0].kind=a100-80gb`).",
        "Sizes accept `24GiB`, `512MB`, `1.5TiB` or a number of bytes. `cluster: auto` reads this machine.",
        "",
        "| field | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for dotted, type_name, default, doc in field_docs():
        lines.append(f"| `{dotted}` | {type_name} | `{default}` | {doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(config_reference_markdown(), end="")
