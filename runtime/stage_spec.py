"""What a pipeline rank is given and what each of its steps returns: ``PipelineSpec`` (the run,
the same for every rank) and ``StepResult``, plain values that cross Ray's actor boundary
(runtime.stage_worker runs them, runtime.pipeline_driver makes and reads them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from memtrain.config import DataConfig, ModelConfig
from memtrain.optimizers import OptimizerSpec
from memtrain.runtime.stage_activations import check_activations
from memtrain.runtime.stage_offload import OFFLOAD_HOMES
from memtrain.runtime.stage_zero import BUCKET_ELEMS

__all__ = ["PipelineSpec", "StepResult", "block_ranges", "PIPELINE_DTYPES"]

_COMPUTE = ("F", "B", "W", "OPTIM")

PIPELINE_DTYPES = ("fp32", "bf16")
"""What the stages compute in (fp16 needs a loss scale agreed across the ranks: not yet)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PipelineSpec:
    """What every rank of one pipeline run shares; plain values, so Ray can ship it."""

    model: ModelConfig
    """The model (``gpt`` source: its blocks run one after another)."""
    partition: tuple[int, ...]
    """Blocks per stage, in stage order; they sum to the model's blocks."""
    rank_of: tuple[int, ...]
    """Per stage, the pipeline rank that runs it."""
    num_ranks: int
    """Pipeline ranks per replica (``p``)."""
    dp: int
    """Data-parallel replicas; world rank ``replica * p + pipeline rank``."""
    num_microbatches: int
    """Micro-batches per replica per step (``m``)."""
    micro_batch_size: int
    """Sequences per micro-batch."""
    seq_len: int
    """Tokens per sequence."""
    seed: int
    """``torch.manual_seed`` before the model is built."""
    data: DataConfig = field(default_factory=DataConfig)
    """The training data; step ``k`` reads ``TokenBatches.batch(k)`` of the global batch."""
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    """Each stage's optimizer (``adamw`` or ``sgd``) and its hyper-parameters; ``lr`` is the
    rate of a step run without one."""
    timeout_s: float = 60.0
    """The longest a transfer or collective may wait."""
    num_threads: int = 1
    """``torch.set_num_threads`` on each worker."""
    pin_cores: bool = False
    """Each single-threaded CPU worker binds itself to one core of its node, its world rank's
    (runtime.stage_device [Note: a worker per core]): for the embedded Ray, whose workers take
    every core (``stage_device.pins_cores``)."""
    offload: tuple[str, ...] = ()
    """Per stage, where its model states live between steps: ``device`` (the worker's own
    tensors, a ``torch.optim`` optimizer), ``host`` (host-memory chunks) or ``nvme`` (files in
    ``nvme_dir``), the last two stepped by memtrain's offloaded optimizer
    (runtime.stage_offload); empty: every stage on the device."""
    nvme_dir: str | None = None
    """Where ``nvme`` stages keep their files: world rank ``r``'s stage ``s`` in
    ``nvme_dir/rank<r>/stage<s>`` on the worker's node (the directory must exist there)."""
    offload_chunk_elems: int | None = None
    """Elements per chunk of an offloaded stage; None: about one block a chunk."""
    zero: int = 0
    """1: ZeRO-1, each replica keeps the optimizer states of its shard of each stage
    (runtime.stage_zero; an offloaded stage's: runtime.stage_offload [Note: ZeRO-1 of an
    offloaded stage]); 2: ZeRO-2, the gradients too (an offloaded stage's chunk by chunk,
    runtime.stage_offload_zero); 0: every
    replica keeps them all."""
    zero_bucket_elems: int = BUCKET_ELEMS
    """ZeRO-2: elements per gradient bucket (runtime.stage_zero)."""
    dtype: str = "fp32"
    """``fp32``, or ``bf16``: each block's forward under ``torch.autocast`` in bfloat16 (fp32
    parameters, gradients and optimizer states; the loss in fp32)."""
    max_grad_norm: float | None = None
    """Clip each step's gradients to this global 2-norm at the program's ``CLIP`` (runtime.stage_clip);
    None: no clipping (a ``CLIP`` still measures the norm)."""
    activations: tuple[tuple[str, ...], ...] = ()
    """Per stage, per block of it, ``keep``, ``recompute``, ``swap_host`` or ``swap_nvme`` (files in
    ``nvme_dir``): what the block does with its saved activations between F and B
    (runtime.stage_activations); empty: every block keeps them."""

    def __post_init__(self) -> None:
        if self.dtype not in PIPELINE_DTYPES:
            raise ValueError(f"dtype: one of {', '.join(PIPELINE_DTYPES)}, got {self.dtype!r}")
        if self.offload and (len(self.offload) != len(self.rank_of) or not set(self.offload) <= set(OFFLOAD_HOMES)):
            raise ValueError(f"offload: one of {', '.join(OFFLOAD_HOMES)} per stage ({len(self.rank_of)}), "
                             f"got {self.offload!r}")
        if self.zero not in (0, 1, 2):
            raise ValueError(f"zero: 0, 1 or 2, got {self.zero!r}")
        check_activations(self.activations, self.partition, nvme_dir=self.nvme_dir)

    @property
    def num_stages(self) -> int:
        return len(self.rank_of)

    def home(self, stage: int) -> str:
        """Where ``stage``'s model states live between steps (``offload``)."""
        return self.offload[stage] if self.offload else "device"

    @property
    def world_size(self) -> int:
        return self.num_ranks * self.dp


@dataclass(frozen=True, slots=True)
class StepResult:
    """One rank's step: what it ran and what it measured."""

    record: tuple[str, ...]
    """The actions run, in order (short forms)."""
    losses: tuple[float, ...]
    """The last stage's per-micro-batch losses (before scaling), else empty."""
    time_s: float
    """Wall time of the step on this rank."""
    peak_bytes: dict[str, int] = field(default_factory=dict)
    """``host``: the worker process's peak resident memory so far; ``device``: on a GPU, the
    step's peak CUDA allocation; ``nvme`` (a rank with ``nvme`` stages): the most bytes its chunk
    files held during the step; ``activations``: the most bytes its stages' saved activations held
    at once on the device (runtime.stage_activations; ``activations_host``: swapped ones on the host);
    ``offload_device`` and ``offload_host`` (a rank with offloaded stages): the most bytes their
    chunk stores' ledgers held during the step, param and grad buffers on the device, chunks and
    staging on the host (what planner.stage_offload_cost charges them); ``sent``: the most bytes of
    tensors it had sent and not yet let go of at once (host memory; planner.pipeline_sends)."""
    device: str = "cpu"
    """Where the stages computed: ``cpu``, or ``cuda:0 (<GPU name>)``."""
    action_s: tuple[float, ...] = ()
    """Wall time of each action of ``record`` (a receive's includes its wait for the peer)."""
    grad_bytes: dict[str, int] = field(default_factory=dict)
    """The device stages' gradient bytes: ``reduce_peak``, the most held while they were summed
    (from a ZeRO-2 stage's ``REDUCE_SCATTER``, else its ``ALLREDUCE``, to the sum's end; the
    parameters' ``.grad`` included), and ``at_optim``, what they held when the first ``OPTIM``
    began (ZeRO-1 and -2: the shards' sums)."""
    grad_norm: float | None = None
    """The step's global gradient norm before clipping (its program's ``CLIP``; None without one)."""
    core: int | None = None
    """The core this worker is bound to (``PipelineSpec.pin_cores``); None: not bound."""
    between_s: float = 0.0
    """Time from the end of this worker's previous step to the start of this one: its wait for
    the driver's call (runtime.pipeline_driver [Note: a step queued ahead]); 0 for its first."""

    @property
    def busy_s(self) -> float:
        """Time in compute actions (F, B, W, OPTIM): the step less waits and transfers."""
        return sum(t for a, t in zip(self.record, self.action_s) if a.strip("0123456789") in _COMPUTE)


def block_ranges(partition: tuple[int, ...]) -> list[range]:
    """Per stage, the indices of its blocks."""
    out, start = [], 0
    for n in partition:
        out.append(range(start, start + n))
        start += n
    return out

