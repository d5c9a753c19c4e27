"""The Plan: what memtrain will do, as a frozen, versioned, JSON-serialisable value.

docs/DESIGN.md rule 1. The runtime interprets a Plan; it does not decide. Changing a field's
meaning or removing one bumps ``PLAN_VERSION``; readers refuse versions they do not know.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from memtrain.errors import UserError
from memtrain.cluster.spec import DeviceSpec, HostSpec, NvmeSpec
from memtrain.planner.serde import from_dict, to_dict
from memtrain.planner.stats import DType, ModelStats, Optimizer

__all__ = [
    "PLAN_VERSION", "Tier", "ActPolicy", "Op", "Action", "TrainShape", "ChunkPlan", "MemoryPolicy",
    "TimelineEvent", "MemoryPoint", "DevicePrediction", "Prediction", "Alternative", "RankPlan",
    "PipelineAlternative", "PipelinePlan", "Plan", "PlanFormatError",
    "schedule_to_csv", "schedule_from_csv", "pack_params", "pack_units",
]

PLAN_VERSION = 1


class PlanFormatError(UserError):
    """A plan file that cannot be read (wrong version, malformed JSON, unknown action)."""


class Tier(StrEnum):
    DEVICE = "device"
    HOST = "host"
    NVME = "nvme"


class ActPolicy(StrEnum):
    """What happens to a block's saved activations between its forward and its backward."""

    KEEP = "keep"
    SWAP_HOST = "swap_host"
    SWAP_NVME = "swap_nvme"
    RECOMPUTE = "recompute"


class Op(StrEnum):
    F = "F"
    B = "B"
    W = "W"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"
    PREFETCH = "PREFETCH"
    OFFLOAD = "OFFLOAD"
    SWAP_OUT = "SWAP_OUT"
    SWAP_IN = "SWAP_IN"
    SNAPSHOT = "SNAPSHOT"
    ALLREDUCE = "ALLREDUCE"
    REDUCE_SCATTER = "REDUCE_SCATTER"
    """ZeRO-2: the stage's gradients reduce-scattered bucket by bucket from here on, as the
    backward that follows finishes them; its ``ALLREDUCE`` waits for them (runtime.stage_zero)."""
    CLIP = "CLIP"
    """Gradient clipping by the global norm across a pipeline's ranks: after every ``ALLREDUCE``
    of the rank's stages and before their ``OFFLOAD``/``OPTIM``, the rank's per-parameter gradient
    norms are exchanged with every other rank's (one small all-gather), each rank takes the same
    global norm and multiplies its gradients by the same coefficient (runtime.stage_clip). One
    per rank, on its first stage: ``0CLIP``."""
    OPTIM = "OPTIM"
    OPTIM_READ = "OPTIM_READ"
    OPTIM_WAIT = "OPTIM_WAIT"


_ACTION_RE = re.compile(r"^(\d+)([A-Z_]+?)(\d+)?(?:/b(\d+))?(?:@c(\d+))?$")


@dataclass(frozen=True, slots=True)
class Action:
    """One step of a rank's schedule: ``(stage, op, microbatch)``, optionally on one block and
    on a chunk.

    Short form: ``"0F3"`` (stage 0, forward, micro-batch 3); ``"0F3/b2"`` (its block 2);
    ``"0PREFETCH3@c5"`` (stage 0, fetch chunk 5 during micro-batch 3); ``"0OPTIM1@c5"`` (chunk 5's
    early update in micro-batch 1's backward); ``"0OPTIM_READ0@c5"`` (its optimizer states read
    ahead); ``"0OPTIM_WAIT1@c5"`` (its write-back waited for); ``"0OPTIM"``. (Model:
    torch.distributed.pipelining ``_Action``.)
    """

    stage: int
    op: Op
    microbatch: int | None = None
    chunk: int | None = None
    block: int | None = None

    def __str__(self) -> str:
        mb = "" if self.microbatch is None else str(self.microbatch)
        blk = "" if self.block is None else f"/b{self.block}"
        ch = "" if self.chunk is None else f"@c{self.chunk}"
        return f"{self.stage}{self.op.value}{mb}{blk}{ch}"

    @staticmethod
    def parse(text: str) -> "Action":
        m = _ACTION_RE.match(text.strip())
        if not m or m.group(2) not in Op.__members__:
            raise PlanFormatError(f"cannot read schedule action {text!r} (expected e.g. '0F3', '0PREFETCH@c5')")
        return Action(
            int(m.group(1)),
            Op(m.group(2)),
            None if m.group(3) is None else int(m.group(3)),
            None if m.group(5) is None else int(m.group(5)),
            None if m.group(4) is None else int(m.group(4)),
        )


def schedule_to_csv(schedule: dict[int, tuple[Action, ...]]) -> str:
    """One row per rank: ``rank,action,action,...`` (torch pipelining's CSV shape)."""
    out = io.StringIO()
    writer = csv.writer(out)
    for rank in sorted(schedule):
        writer.writerow([rank, *map(str, schedule[rank])])
    return out.getvalue()


def schedule_from_csv(text: str) -> dict[int, tuple[Action, ...]]:
    return {
        int(row[0]): tuple(Action.parse(a) for a in row[1:] if a)
        for row in csv.reader(io.StringIO(text))
        if row
    }


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainShape:
    global_batch_size: int
    """Sequences per optimizer step."""
    micro_batch_size: int
    """Sequences per forward/backward pass."""
    num_microbatches: int
    """Micro-batches per step per data-parallel replica (gradient accumulation)."""
    seq_len: int
    dtype: DType
    optimizer: Optimizer
    clip_grad_norm: bool = False
    """The step clips gradients by their global norm (``train.max_grad_norm``): every gradient is
    needed before any update, so its program has no early updates (planner.program_optim)."""

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


@dataclass(frozen=True, kw_only=True, slots=True)
class ChunkPlan:
    """A fixed-size contiguous group of parameters in execution order (PatrickStar/ProTrain)."""

    index: int
    num_elems: int
    """Elements in the chunk (sum of its parameters' numel)."""
    param_names: tuple[str, ...]
    home: Tier
    """Where the chunk's fp32 master parameters, optimizer states and accumulated gradients
    live between uses, and so where its optimizer step runs (device, CPU Adam on host, or
    streamed from NVMe through host)."""


def pack_units(blocks: Iterable[Sequence[tuple[tuple[str, ...], int]]], chunk_size_elems: int) -> list[tuple[tuple[str, ...], int]]:
    """``pack_params``' rule over indivisible units. ``blocks``: per block, its units
    ``(names, numel)`` in execution order (a parameter, or a block whose sizes are unknown)."""
    if chunk_size_elems < 1:
        raise ValueError(f"chunk_size_elems: must be >= 1, got {chunk_size_elems}")
    chunks: list[tuple[tuple[str, ...], int]] = []
    names: list[str] = []
    count = 0
    for units in blocks:
        units = [(u, n) for u, n in units if n > 0]
        total = sum(n for _, n in units)
        # [Note: block-aligned chunks] a block that fits in one chunk never straddles two.
        if count and total <= chunk_size_elems and count + total > chunk_size_elems:
            chunks.append((tuple(names), count))
            names, count = [], 0
        for unit_names, numel in units:
            if count and count + numel > chunk_size_elems:
                chunks.append((tuple(names), count))
                names, count = [], 0
            names.extend(unit_names)
            count += numel
            if count >= chunk_size_elems:  # includes a unit larger than a chunk: a chunk of its own
                chunks.append((tuple(names), count))
                names, count = [], 0
    if count:
        chunks.append((tuple(names), count))
    return chunks


def pack_params(params: Iterable[tuple[str, int]] | Iterable[Sequence[tuple[str, int]]],
                chunk_size_elems: int) -> list[tuple[tuple[str, ...], int]]:
    """Pack parameters (execution order) into chunks of about ``chunk_size_elems``.

    The single packing rule shared by planner and runtime (docs/memory-accounting.md, Chunks):
    parameters are taken in order and appended to the current chunk while it stays within the
    chunk size; a parameter is never split; one larger than the chunk size gets a chunk of its
    own; and [Note: block-aligned chunks] when a block's parameters fit in one chunk but not in
    what is left of the current one, the current chunk is closed first, so a block touches as
    few chunks as it can: one block's fetch is one transfer, prefetching a chunk brings in a whole
    block, and a block needs one param buffer instead of two (the 100m model's layers straddled
    two 8Mi-element chunks, so depth 3 left a single fetch in flight).
    A block larger than a chunk is cut between parameters.

    ``params``: per block, ``[(name, numel), ...]``; or a flat ``[(name, numel), ...]``, where
    each parameter counts as a block of its own (no alignment). Returns
    ``[(param_names, num_elems), ...]`` in chunk order.
    """
    params = list(params)
    grouped = bool(params) and not isinstance(params[0][0], str)
    blocks = params if grouped else [[p] for p in params]
    return pack_units([[((name,), numel) for name, numel in b] for b in blocks], chunk_size_elems)


DEFAULT_SWAP_IN_AHEAD = 1
"""``MemoryPolicy.swap_in_ahead``'s default."""
DEFAULT_SWAP_WRITES_IN_FLIGHT = 1
"""``MemoryPolicy.swap_writes_in_flight``'s default."""


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryPolicy:
    chunk_size_elems: int
    """Target elements per chunk; a parameter larger than this gets a chunk of its own."""
    chunks: tuple[ChunkPlan, ...]
    prefetch_depth: int
    """How many non-resident chunks may be on the device at once (1 = no prefetch)."""
    activations: tuple[ActPolicy, ...]
    """Per block, in block order."""
    compress_nvme: bool = False
    """Compress chunks written to NVMe with zstandard."""
    optim_staged_chunks: int = 3
    """NVMe chunks whose optimizer states may be in host staging at once during the early updates
    of the last backward (read, updated, written back); the training thread waits for the oldest
    write-back when this many are staged (planner.simulate [Note: early optimizer step]). More
    keeps more reads and writes in flight, for host memory (the search uses what it has spare)."""
    swap_in_ahead: int = DEFAULT_SWAP_IN_AHEAD
    """[Note: swap-in lookahead] A swapped block's activations start coming back (host -> device
    copy, or NVMe read then copy) this many blocks ahead of its backward: the program's
    ``SWAP_IN`` of block k follows the backward marker of block k + this (planner.program_swaps
    [Note: the swap rules]), so its copy overlaps that block's backward. The engine and the
    simulator both act on those actions (docs/memory-accounting.md, "Activations")."""
    swap_writes_in_flight: int = DEFAULT_SWAP_WRITES_IN_FLIGHT
    """[Note: bounded NVMe writes] A swap_nvme block's activations wait in host staging until their
    NVMe write is waited for, and the training thread waits in program order: at a swap_nvme
    block's ``SWAP_OUT``, before its own copy-out, for the oldest writes until fewer than this
    remain; the writes left when the forward ends at the backward's first ``SWAP_IN``
    (planner.program_swaps [Note: the swap rules] 4). So at most this many blocks' staging exist
    at once on any disk (a slow one stalls the forward instead), and the host peak is the same on
    a fast and a slow disk. The activation manager takes it as its ``writes_in_flight``; the
    simulator waits at the same points."""

    def __post_init__(self) -> None:
        for name in ("optim_staged_chunks", "swap_writes_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"memory.{name}: must be >= 1, got {getattr(self, name)}")
        if self.swap_in_ahead < 0:
            raise ValueError(f"memory.swap_in_ahead: must be >= 0, got {self.swap_in_ahead}")


@dataclass(frozen=True, kw_only=True, slots=True)
class TimelineEvent:
    stream: str
    """``compute``, ``h2d``, ``d2h``, ``disk``, ``cpu``."""
    name: str
    start_s: float
    end_s: float


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryPoint:
    """A tier's bytes in use from ``t_s`` on (the ledger's owners: no workspace)."""

    tier: str
    t_s: float
    bytes: int


@dataclass(frozen=True, kw_only=True, slots=True)
class DevicePrediction:
    rank: int
    device: str
    """Device kind (catalog key)."""
    peak_bytes: dict[str, int]
    """Peak bytes per tier (``device``, ``host``, ``nvme``)."""
    budget_bytes: dict[str, int]
    """Budget per tier after the safety margin (0 = tier unavailable)."""
    breakdown: dict[str, dict[str, int]]
    """Per tier, bytes by owner at that tier's peak (e.g. ``chunks``, ``activations``, ``buffers``)."""
    process_bytes: int = 0
    """The process's memory at its peak above its baseline (planner.footprint [Note: process
    memory]): RSS on a CPU device, the device's reserved bytes on a GPU. 0 in older plans."""
    memory_timeline: tuple[MemoryPoint, ...] = ()
    """Per tier, the ledger's bytes in use over the simulated step, at each change (at most
    ``planner.simulate.MAX_MEMORY_POINTS`` per tier: a longer line keeps each stretch's highest
    point). Empty in older plans."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Prediction:
    step_time_s: float
    tokens_per_s: float
    mfu: float
    """Model FLOPs utilisation: model FLOPs per step (without recompute) / (step time × peak)."""
    devices: tuple[DevicePrediction, ...]
    timeline: tuple[TimelineEvent, ...] = ()
    """The simulated step; long steps are truncated to the first micro-batches and the optimizer."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Alternative:
    description: str
    fits: bool
    step_time_s: float | None
    reason: str
    """Why it was not chosen."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RankPlan:
    """One rank of a pipeline plan: its device, the stages it runs and how, what it costs."""

    rank: int
    """Global rank: ``replica * pipeline_degree + pipeline_rank``."""
    replica: int
    """Data-parallel replica (every replica runs the same stages and program)."""
    pipeline_rank: int
    """Position in its replica's pipeline; the key of its program in ``Plan.schedule``."""
    node: str
    device: DeviceSpec
    stages: tuple[int, ...]
    """The model stages it runs (two for interleaved and V schedules)."""
    policies: tuple[MemoryPolicy | None, ...] = ()
    """Per stage it runs, the single-device memory policy when that stage offloads or recomputes
    (its ``activations``: each block's policy, what the stage's worker runs); None: all on the
    device, activations kept."""
    offload: str = ""
    """What its stages move off the device or recompute, in words ('' when nothing)."""
    fwd_s: float = 0.0
    """Forward time of one micro-batch through its stages."""
    bwd_s: float = 0.0
    """Backward time of one micro-batch through its stages (recompute included)."""
    busy_s: float = 0.0
    """Its compute over the step's pipeline passes."""
    bubble_fraction: float = 0.0
    """The share of the pipeline part of the step it is idle."""
    allreduce_s: float = 0.0
    """Its gradients' all-reduce across the replicas after its last backward (0 without data parallelism)."""
    optimizer_s: float = 0.0
    """Its optimizer step after the all-reduce."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PipelineAlternative:
    """A pipeline candidate the heterogeneous planner did not choose."""

    description: str
    fits: bool
    step_time_s: float | None
    peak_fraction: float
    """The fullest rank's predicted device peak over its budget."""
    bubble_fraction: float
    reason: str
    """The deciding difference against the chosen plan."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PipelinePlan:
    """How a pipeline plan spreads the model over ranks (planner.hetero). ``Plan.schedule`` holds
    each pipeline rank's program with its sends and receives; every replica runs the same one."""

    schedule_kind: str
    """One of ``planner.pipeline.SCHEDULES``."""
    pipeline_degree: int
    data_parallel_degree: int
    stage_ranks: tuple[int, ...]
    """Per stage, the pipeline rank that runs it."""
    partition: tuple[tuple[int, int], ...]
    """Per stage, its blocks ``[first, end)``."""
    ranks: tuple[RankPlan, ...]
    """Every rank of every replica, by global rank."""
    bubble_fraction: float
    """The ranks' idle share of the pipeline part of the step."""
    why: str = ""
    """Why this candidate won, in a line."""
    alternatives: tuple[PipelineAlternative, ...] = ()
    """The runners-up, fastest first."""
    num_candidates: int = 0
    """Pipeline shapes (degrees, device order, micro-batch, schedule) the planner weighed."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    version: int = PLAN_VERSION
    name: str
    fits: bool
    """False when nothing fits; ``shortfall`` then says what is missing."""
    shortfall: str = ""
    model: ModelStats
    """Analysis at micro-batch size 1 (reports scale by ``train.micro_batch_size``)."""
    train: TrainShape
    device: DeviceSpec
    host: HostSpec
    nvme: NvmeSpec | None
    memory: MemoryPolicy
    schedule: dict[int, tuple[Action, ...]] = field(default_factory=dict)
    """Per rank, the lowered action list of one step."""
    prediction: Prediction
    alternatives: tuple[Alternative, ...] = ()
    source: str = "catalog"
    """Which hardware figures were used: ``catalog``, ``auto`` or ``profile:<path>``."""
    source_notes: tuple[str, ...] = ()
    """What is wrong with those figures, one line each: a profile skipped and why, one from
    another machine, one measured under load."""
    pipeline: PipelinePlan | None = None
    """A plan over several devices (planner.hetero); None for one device, whose JSON then has
    no such key (single-device plans read and write as before). In a pipeline plan ``device``,
    ``host``, ``nvme`` and ``memory`` are pipeline rank 0's, ``prediction.devices`` holds one
    entry per pipeline rank of replica 0, and ``train.num_microbatches`` is per replica."""

    def to_dict(self) -> dict:
        d = to_dict(self)
        if self.pipeline is None:
            del d["pipeline"]
        d["schedule"] = {str(rank): [str(a) for a in acts] for rank, acts in self.schedule.items()}
        return d

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @staticmethod
    def from_dict(data: dict) -> "Plan":
        version = data.get("version")
        if version != PLAN_VERSION:
            raise PlanFormatError(f"plan version {version!r} is not supported (this memtrain reads version {PLAN_VERSION})")
        data = dict(data)
        schedule = {int(r): tuple(Action.parse(a) for a in acts) for r, acts in data.pop("schedule", {}).items()}
        try:
            plan = from_dict(Plan, data)
        except (TypeError, ValueError, KeyError) as e:
            raise PlanFormatError(f"malformed plan: {e}") from e
        object.__setattr__(plan, "schedule", schedule)
        return plan

    @staticmethod
    def from_json(text: str) -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanFormatError(f"plan is not valid JSON: {e}") from e
        return Plan.from_dict(data)

    def save(self, path: str | Path) -> None:
        from memtrain.planner.atomic import atomic_write_text

        atomic_write_text(path, self.to_json())

    @staticmethod
    def load(path: str | Path) -> "Plan":
        return Plan.from_json(Path(path).read_text())
