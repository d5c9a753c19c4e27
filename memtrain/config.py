"""The run configuration: validated dataclasses, built from a mapping (``runtime.config_file``
reads the YAML file and ``--set`` overrides into one). It sits at the bottom of the layers
(docs/DESIGN.md, Layers): every layer may read config types, and this module imports only
``memtrain.errors``, ``memtrain.units``, its limits and checks (``memtrain.config_checks``) and
the ``train`` sections (``memtrain.config_train``, which imports ``memtrain.optimizers``).

Every section is a ``kw_only, slots`` dataclass with a docstring per field (docs/config.md is
the reference). Each ``__post_init__`` checks its fields' values (finite, in range), so a
config refused by ``run`` is refused by ``plan`` too; ``_build`` checks their types (whole
numbers for ``int``, no size strings outside ``Size`` fields, bools are not numbers). A user
mistake raises ``ConfigError`` naming the dotted field and the fix; the CLI prints it and exits
2. Messages quote a user's value through ``units.show``, never whole.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from memtrain.config_checks import (  # noqa: F401 - re-exported: the sections' limits and checks
    ConfigError, Size, MAX_GLOBAL_BATCH_SIZE, MAX_SEQ_LEN, MAX_STEPS, MAX_SEED, MAX_DEVICES_PER_NODE,
    MAX_NUM_CPUS, MAX_STRIPES, MAX_CHECKPOINTS_KEPT, MAX_TEXT, MAX_CONFIG_BYTES, MAX_CHUNK_ELEMS,
    MAX_PREFETCH_DEPTH, MAX_PARALLEL_DEGREE, MAX_TIMEOUT_S, PIPELINE_SCHEDULES, _V_SCHEDULES, _check_number,
    _positive, _fraction, _check_int, _check_path, check_parallel_batch, check_parallel,
)
from memtrain.config_train import OptimizerConfig, ParamGroupConfig, TrainConfig
from memtrain.errors import UserError
from memtrain.units import parse_bytes, show

__all__ = [
    "ConfigError", "Size", "ModelConfig", "DataConfig", "OptimizerConfig", "ParamGroupConfig", "TrainConfig", "DeviceConfig",
    "NvmeConfig", "NodeConfig", "ClusterConfig", "MemoryConfig", "SnapshotConfig", "CheckpointConfig", "ParallelConfig",
    "Config", "config_from_dict", "section_from_dict", "PARALLEL_AUTO", "MAX_CONFIG_BYTES", "MAX_GLOBAL_BATCH_SIZE", "PIPELINE_SCHEDULES",
]


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
            raise ConfigError(f"model.source: must be 'gpt', 'hf' or 'python', got {show(self.source)}")
        if self.source == "hf" and "model_type" not in self.hf_config:
            raise ConfigError("model.hf_config: needs a 'model_type' (e.g. llama, gpt2) for source 'hf'")
        if self.source == "python" and not _FACTORY_RE.match(self.factory):
            raise ConfigError(f"model.factory: write 'package.module:function' for source 'python', got {show(self.factory)}")


_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


DATA_SOURCES = ("synthetic", "tokens", "parquet", "arrow")
"""The kinds of training data ``data.source`` names."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    source: str = "synthetic"
    """``synthetic`` (seeded walks of a random sparse Markov chain: learnable), ``tokens`` (a flat
    .npy/.bin file of token ids), ``parquet`` (a Parquet file, or a folder of them read in name
    order) or ``arrow`` (an Arrow IPC/Feather file) whose ``column`` holds token ids."""
    path: str = ""
    """For ``tokens``, ``parquet`` and ``arrow``: the file (or, for ``parquet``, folder) to read."""
    column: str = "input_ids"
    """For ``parquet`` and ``arrow``: the column of token ids, a list of ids per row (a tokenized
    document; rows are joined end to end) or one id per row."""
    seed: int = 0
    """Seed of the synthetic data and the sampling order."""

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ConfigError(f"data.source: must be one of {', '.join(DATA_SOURCES)}, got {show(self.source)}")
        if self.source != "synthetic" and not self.path:
            raise ConfigError(f"data.path: set the file to read for data.source {self.source!r}")
        if not isinstance(self.column, str) or not self.column:
            raise ConfigError(f"data.column: the name of the column of token ids, got {show(self.column)}")
        if self.path:
            _check_path("data.path", self.path)
        _check_int("data.seed", self.seed, 0, MAX_SEED)


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
        where = "cluster.nodes[].devices[]"
        _check_int(f"{where}.count", self.count, 1, MAX_DEVICES_PER_NODE)
        _check_number(f"{where}.memory", self.memory, "a size > 0, e.g. 24GiB", lambda v: v > 0)
        for name in ("bf16_tflops", "fp16_tflops"):  # 0 declares that the device lacks the dtype
            _check_number(f"{where}.{name}", getattr(self, name), "a finite number >= 0", lambda v: v >= 0)
        for name in ("fp32_tflops", "memory_bw_gbps", "h2d_gbps", "d2h_gbps"):
            _positive(f"{where}.{name}", getattr(self, name))
        _check_number(f"{where}.compute_efficiency", self.compute_efficiency, "a number in (0, 1]", lambda v: 0 < v <= 1)


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

    def __post_init__(self) -> None:
        if self.path:
            _check_path("cluster.nodes[].nvme.path", self.path)
        _check_number("cluster.nodes[].nvme.capacity", self.capacity, "a size >= 0", lambda v: v >= 0)
        _positive("cluster.nodes[].nvme.read_gbps", self.read_gbps)
        _positive("cluster.nodes[].nvme.write_gbps", self.write_gbps)


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

    def __post_init__(self) -> None:
        where = "cluster.nodes[]"
        _check_number(f"{where}.host_memory", self.host_memory, "a size > 0, e.g. 64GiB", lambda v: v > 0)
        _check_int(f"{where}.num_cpus", self.num_cpus, 1, MAX_NUM_CPUS)
        _positive(f"{where}.host_memory_bw_gbps", self.host_memory_bw_gbps)
        _positive(f"{where}.cpu_adam_params_per_s", self.cpu_adam_params_per_s)


@dataclass(kw_only=True, slots=True)
class ClusterConfig:
    auto: bool = True
    """Read this machine (psutil, nvidia-ml-py) instead of ``nodes``. ``cluster: auto`` in YAML."""
    nodes: list[NodeConfig] = field(default_factory=list)
    """Explicit nodes (each with host memory, devices and an optional NVMe)."""
    network_gbps: float = 12.5
    """Inter-node bandwidth, GB/s."""

    def __post_init__(self) -> None:
        _positive("cluster.network_gbps", self.network_gbps)
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
    chunk_elems: int | None = None
    """Elements per chunk of parameters (with their gradients and optimizer states); default: the
    planner tries several sizes and keeps the fastest."""
    prefetch_depth: int | None = None
    """Off-device chunks held in device buffers at most, fetched ahead of use; at least the most
    off-device chunks one block uses. Default: the planner chooses."""
    offload: str = "auto"
    """Where every chunk of parameters, gradients and optimizer states lives: ``device``,
    ``host`` or ``nvme``; ``auto`` lets the planner choose per chunk (a pipeline: per stage,
    whose parameters and gradients then stay on its device for the step, docs/cluster.md)."""
    activations: str = "auto"
    """What every block does with its activations: ``keep``, ``swap_host``, ``swap_nvme`` or
    ``recompute``; ``auto`` lets the planner choose per block."""

    def __post_init__(self) -> None:
        _fraction("memory.safety_margin", self.safety_margin)
        if self.offload not in ("auto", "device", "host", "nvme"):
            raise ConfigError(f"memory.offload: must be 'auto', 'device', 'host' or 'nvme', got {show(self.offload)}")
        if self.activations not in ("auto", "keep", "swap_host", "swap_nvme", "recompute"):
            raise ConfigError("memory.activations: must be 'auto', 'keep', 'swap_host', 'swap_nvme' or 'recompute', "
                              f"got {show(self.activations)}")
        _check_int("memory.chunk_elems", self.chunk_elems, 1, MAX_CHUNK_ELEMS)
        _check_int("memory.prefetch_depth", self.prefetch_depth, 1, MAX_PREFETCH_DEPTH)


@dataclass(kw_only=True, slots=True)
class SnapshotConfig:
    interval_steps: int = 0
    """Take an in-memory erasure-coded snapshot every N steps; 0 = off."""
    k: int = 4
    """Data stripes of the erasure code."""
    m: int = 2
    """Parity stripes (losses survived)."""

    def __post_init__(self) -> None:
        _check_int("snapshot.interval_steps", self.interval_steps, 0, MAX_STEPS)
        _check_int("snapshot.k", self.k, 1, MAX_STRIPES)
        _check_int("snapshot.m", self.m, 0, MAX_STRIPES)


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    interval_steps: int = 0
    """Write a durable checkpoint every N steps; 0 = only at the end of the run and when the run is
    stopped by SIGTERM or SIGINT (which it always does)."""
    keep: int = 2
    """Newest checkpoints kept; older ones are removed once a newer one is complete."""
    compress: bool = False
    """Compress the checkpoint's state with zstandard (smaller files, more CPU time)."""
    dir: str = ""
    """Where checkpoints go; default: ``<run_dir>/checkpoints``."""

    def __post_init__(self) -> None:
        _check_int("checkpoint.interval_steps", self.interval_steps, 0, MAX_STEPS)
        _check_int("checkpoint.keep", self.keep, 1, MAX_CHECKPOINTS_KEPT)
        if self.dir:
            _check_path("checkpoint.dir", self.dir)


PROFILE_MODES = ("auto", "measure", "catalog")
"""``parallel.profile``'s words; anything else is a file."""


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """How the model is spread over devices: ``pipeline`` × ``data`` workers, one per device.

    1 × 1 trains in this process; more runs one Ray actor per device (docs/DESIGN.md, Runtime).
    0 for a degree, or ``auto`` for the schedule, leaves that choice to ``memtrain plan``'s
    cluster planner (``parallel: auto`` leaves all three); ``memtrain run`` needs them fixed."""

    pipeline: int = 1
    """Pipeline degree: ranks the model's blocks are split over, in order; 0: the planner chooses
    (``memtrain plan``, over every device of the cluster)."""
    data: int = 1
    """Data-parallel degree: copies of the pipeline, each on its share of the global batch; 0: the
    planner chooses (``memtrain plan``)."""
    schedule: str = "1f1b"
    """Pipeline schedule: gpipe, 1f1b, interleaved-1f1b, zb-h1, v-half or v-min; auto: the planner
    chooses (``memtrain plan``)."""
    microbatches: int = 0
    """Micro-batches per pipeline per step; 0: global batch / (data × micro_batch_size), or the
    planner's choice when train.micro_batch_size is 0 too."""
    stages_per_rank: int = 2
    """Model stages per rank for ``interleaved-1f1b`` (v-half and v-min always hold 2; the others 1)."""
    partition: list[int] | None = None
    """Blocks per stage, in order (embedding and head count as blocks); default: the planner balances them."""
    comm_timeout_s: float = 300.0
    """Seconds a worker waits for a peer's message or a collective before failing with an error naming it."""
    zero: int = 0
    """Sharding across the ``data`` copies: 0 none; 1 each copy keeps its share of every stage's optimizer
    states (ZeRO-1); 2 also of its gradients, reduce-scattered under the last micro-batch's backward (ZeRO-2)."""
    nvme_dir: str = ""
    """For stages whose states live on NVMe (``memory.offload: nvme``, or a plan that puts them
    there): a directory on each node's local NVMe; each worker writes under it."""
    profile: str = "auto"
    """Figures a pipeline run plans with: ``auto`` measures the blocks, the link and Ray's round trip on
    the workers first when they compute on CPUs (the catalog's figures for a CPU are rough), ``measure``
    on any devices, ``catalog`` uses the catalog's; or the path of a ``pipeline-profile.json`` an earlier
    run wrote in its run directory (used as is, nothing measured; ``memtrain plan`` uses it too)."""

    def __post_init__(self) -> None:
        _check_int("parallel.pipeline", self.pipeline, 0, MAX_PARALLEL_DEGREE)
        _check_int("parallel.data", self.data, 0, MAX_PARALLEL_DEGREE)
        if self.schedule not in (*PIPELINE_SCHEDULES, "auto"):
            raise ConfigError(f"parallel.schedule: one of {', '.join(PIPELINE_SCHEDULES)} or auto, "
                              f"got {show(self.schedule)}")
        _check_int("parallel.microbatches", self.microbatches, 0, MAX_GLOBAL_BATCH_SIZE)
        _check_int("parallel.stages_per_rank", self.stages_per_rank, 1, MAX_PARALLEL_DEGREE)
        _check_int("parallel.zero", self.zero, 0, 2)
        if self.nvme_dir:
            _check_path("parallel.nvme_dir", self.nvme_dir)
        if not self.profile:
            raise ConfigError("parallel.profile: auto, measure, catalog or the path of a pipeline-profile.json; got ''")
        _check_path("parallel.profile", self.profile)
        _check_number("parallel.comm_timeout_s", self.comm_timeout_s, f"a number of seconds in (0, {MAX_TIMEOUT_S:g}]",
                      lambda v: 0 < v <= MAX_TIMEOUT_S)
        if self.partition is not None:
            for i, count in enumerate(self.partition):
                _check_int(f"parallel.partition[{i}]", count, 1, MAX_PARALLEL_DEGREE)
            if self.pipeline == 0 or self.schedule == "auto":
                raise ConfigError("parallel.partition: fixes the blocks of each stage, so it needs a fixed "
                                  "parallel.pipeline and parallel.schedule; set both, or remove the partition")
            if len(self.partition) != self.num_stages:
                raise ConfigError(
                    f"parallel.partition: lists {len(self.partition)} stage(s), but parallel.schedule "
                    f"{self.schedule!r} over parallel.pipeline {self.pipeline} has {self.num_stages}; "
                    f"give one block count per stage, or remove it to let the planner split the blocks")

    @property
    def num_workers(self) -> int:
        """Devices the run needs: one worker per pipeline rank per data-parallel copy (0 when a
        degree is left to the planner)."""
        return self.pipeline * self.data

    @property
    def profile_file(self) -> str | None:
        """``profile`` when it names a file (not ``auto``, ``measure`` or ``catalog``)."""
        return None if self.profile in PROFILE_MODES else self.profile

    @property
    def planner_chooses(self) -> bool:
        """A degree, or the schedule of several workers, is left to ``memtrain plan``."""
        return self.pipeline == 0 or self.data == 0 or (self.schedule == "auto" and self.num_workers > 1)
    @property
    def num_stages(self) -> int:
        """Model stages of one pipeline: ``pipeline`` ranks times the stages each holds."""
        if self.schedule in _V_SCHEDULES:
            return 2 * self.pipeline
        if self.schedule == "interleaved-1f1b":
            return self.stages_per_rank * self.pipeline
        return self.pipeline

    def check_batch(self, train: TrainConfig) -> None:
        """The global batch splits into ``data`` shares of whole micro-batches (and, for
        ``interleaved-1f1b``, into groups of ``pipeline`` micro-batches); a degree left to the
        planner (0) is checked by the planner."""
        check_parallel_batch(self, train.global_batch_size, train.micro_batch_size)

    def check_blocks(self, num_blocks: int, model: str = "the model") -> None:
        """Every stage gets at least one of the model's ``num_blocks`` blocks, and ``partition``
        (when given) shares out exactly those; called where the model is known."""
        if self.num_stages > num_blocks:
            raise ConfigError(
                f"parallel.pipeline: {self.pipeline} rank(s) of schedule {self.schedule!r} make {self.num_stages} "
                f"stages, but {model} has {num_blocks} blocks (embedding, layers, head); lower parallel.pipeline to "
                f"at most {num_blocks // (self.num_stages // self.pipeline)} or use a model with more layers")
        if self.partition is not None and sum(self.partition) != num_blocks:
            raise ConfigError(f"parallel.partition: the block counts add up to {sum(self.partition)}, but {model} "
                              f"has {num_blocks} blocks (embedding, layers, head); make them add up to {num_blocks}")


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
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run_dir: str = "runs/{name}"
    """Where checkpoints, profiles and reports go; ``{name}`` is replaced by the run name."""

    def __post_init__(self) -> None:
        _check_path("run_dir", self.run_dir.replace("{name}", self.name))
        check_parallel(self)


# --- loading ---------------------------------------------------------------------------

PARALLEL_AUTO = {"pipeline": 0, "data": 0, "schedule": "auto"}
"""What ``parallel: auto`` stands for: every choice the cluster planner can make, left to it."""

_FLOAT_TEXT = re.compile(r"^\s*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*$")
"""A number written as text: YAML 1.1 reads ``1e-3`` (an exponent, no dot) as a string."""


def _cut(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _at(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _located(message: str, tp: type, path: str) -> str:
    """Put the item's real path (``cluster.nodes[0].devices[1]``) for the generic one a section's
    ``__post_init__`` names (``cluster.nodes[].devices[]``)."""
    generic = _GENERIC_PATHS.get(tp)
    if generic and path and message.startswith(generic + "."):
        return path + message[len(generic):]
    return message


def _check_plain(value: Any, path: str) -> None:
    """A free-form mapping (model.overrides, model.hf_config): text keys, no inf or NaN inside."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{path}: keys are names, got {show(k)}")
            _check_plain(v, _at(path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_plain(v, f"{path}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: must be a finite number, got {show(value)}")


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
        except UserError as e:
            raise ConfigError(str(e)) from None
    if dataclasses.is_dataclass(tp):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path or 'config'}: expected a mapping of fields, got {show(data)}")
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        unknown = [k for k in data if k not in names]
        if unknown:
            name = _cut(unknown[0]) if isinstance(unknown[0], str) else show(unknown[0])
            raise ConfigError(f"{_at(path, name)}: unknown field; known fields here: {', '.join(names)}")
        kwargs = {k: _build(hints[k], v, _at(path, k)) for k, v in data.items()}
        try:
            return tp(**kwargs)
        except ConfigError as e:
            raise ConfigError(_located(str(e), tp, path)) from None
    if origin is list:
        if not isinstance(data, list):
            raise ConfigError(f"{path}: expected a list, got {show(data)}")
        return [_build(args[0], v, f"{path}[{i}]") for i, v in enumerate(data)]
    if origin is tuple:
        if not isinstance(data, (list, tuple)) or len(data) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {show(data)}")
        return tuple(_build(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, data)))
    if origin is dict:
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping, got {show(data)}")
        _check_plain(data, path)
        return dict(data)
    if tp is bool:
        if not isinstance(data, bool):
            raise ConfigError(f"{path}: expected true or false, got {show(data)}")
        return data
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            hint = "; write it without a decimal point or exponent" if isinstance(data, float) else ""
            raise ConfigError(f"{path}: expected a whole number, got {show(data)}{hint}")
        return data
    if tp is float:
        if isinstance(data, str) and _FLOAT_TEXT.match(data):
            data = float(data)
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise ConfigError(f"{path}: expected a number such as 0.1 or 1e-3, got {show(data)}")
        try:
            value = float(data)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{path}: must be a finite number, got {show(data)}")
        return value
    if tp is str:
        if not isinstance(data, (str, int, float)) or isinstance(data, bool):
            raise ConfigError(f"{path}: expected text, got {show(data)}")
        text = str(data)
        if len(text) > MAX_TEXT:
            raise ConfigError(f"{path}: {len(text)} characters of text; at most {MAX_TEXT} are read here")
        return text
    raise AssertionError(f"unhandled config type {tp} at {path}")


def section_from_dict(tp: type, data: Any, path: str) -> Any:
    """One config section (``MemoryConfig``, ...) from a mapping, read and checked as in a config
    file; messages name fields as ``<path>.<field>``. ``wrap(memory=...)`` reads its budgets so."""
    return _build(tp, data, path)


def config_from_dict(data: dict[str, Any]) -> Config:
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config: the top level must be a mapping of sections (model, train, ...), got {show(data)}")
    data = dict(data or {})
    cluster = data.get("cluster")
    if cluster == "auto" or cluster is None:
        data["cluster"] = {"auto": True}
    elif isinstance(cluster, dict):
        data["cluster"] = {"auto": False, **cluster}
    if data.get("parallel") == "auto":
        data["parallel"] = dict(PARALLEL_AUTO)
    return _build(Config, data, "")


# --- reference documentation -------------------------------------------------------------

_SECTIONS: list[tuple[str, type]] = [
    ("", Config), ("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig),
    ("train.optimizer", OptimizerConfig), ("train.optimizer.param_groups[]", ParamGroupConfig),
    ("cluster", ClusterConfig), ("cluster.nodes[]", NodeConfig),
    ("cluster.nodes[].devices[]", DeviceConfig), ("cluster.nodes[].nvme", NvmeConfig),
    ("memory", MemoryConfig), ("snapshot", SnapshotConfig), ("checkpoint", CheckpointConfig),
    ("parallel", ParallelConfig),
]
_GENERIC_PATHS: dict[type, str] = {cls: prefix for prefix, cls in _SECTIONS if "[]" in prefix}
