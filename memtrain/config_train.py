"""The ``train`` and ``train.optimizer`` sections of the run configuration (re-exported by
``memtrain.config``, which builds and documents them with the others; kept apart so that file
stays within its size). The rules of ``memtrain.config`` hold here: ``kw_only, slots``
dataclasses, a docstring per field, ``__post_init__`` checks raising ``ConfigError`` that names
the dotted field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memtrain.config_checks import (
    MAX_GLOBAL_BATCH_SIZE, MAX_SEED, MAX_STEPS, MAX_SEQ_LEN, ConfigError, _check_int, _check_number, _fraction, _positive,
)
from memtrain.optimizers import OptimizerSpec, lookup
from memtrain.units import show

__all__ = ["OptimizerConfig", "TrainConfig"]


_OPTIMIZER = OptimizerSpec()  # the defaults: torch's (memtrain.optimizers, docs/optimizer.md)


@dataclass(kw_only=True, slots=True)
class OptimizerConfig:
    """The optimizer's hyper-parameters; the defaults are torch's, as in ``wrap()``."""

    name: str = _OPTIMIZER.name
    """``adamw`` or ``sgd``; every other key defaults to torch's value (docs/wrap.md, "Optimizer")."""
    lr: float = _OPTIMIZER.lr
    """Peak learning rate."""
    betas: tuple[float, float] = _OPTIMIZER.betas
    """AdamW coefficients of the running averages of the gradient and its square."""
    eps: float = _OPTIMIZER.eps
    """AdamW term added to the denominator."""
    weight_decay: float | None = _OPTIMIZER.weight_decay
    """Weight decay; unset: the optimizer's default (adamw 0.01, decoupled, Loshchilov & Hutter
    2019; sgd 0, L2)."""
    momentum: float = _OPTIMIZER.momentum
    """For ``sgd`` (0: no momentum buffer)."""

    def __post_init__(self) -> None:
        lookup(self.name, "train.optimizer.name", error=ConfigError)
        _positive("train.optimizer.lr", self.lr)
        if not isinstance(self.betas, tuple) or len(self.betas) != 2:
            raise ConfigError(f"train.optimizer.betas: two numbers in [0, 1), got {show(self.betas)}")
        for i, beta in enumerate(self.betas):
            _fraction(f"train.optimizer.betas[{i}]", beta)
        _positive("train.optimizer.eps", self.eps)
        _check_number("train.optimizer.weight_decay", self.weight_decay, "a finite number >= 0", lambda v: v >= 0)
        _fraction("train.optimizer.momentum", self.momentum)

    def spec(self) -> OptimizerSpec:
        """These hyper-parameters as ``wrap()`` takes them."""
        return OptimizerSpec(name=self.name, lr=self.lr, betas=tuple(self.betas), eps=self.eps,
                             weight_decay=self.weight_decay, momentum=self.momentum)


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
    max_grad_norm: float = 0.0
    """Clip each step's gradients to this global 2-norm, as ``torch.nn.utils.clip_grad_norm_``;
    0: no clipping. Clipping needs every gradient first, so no update overlaps the backward."""

    def __post_init__(self) -> None:
        _check_int("train.global_batch_size", self.global_batch_size, 1, MAX_GLOBAL_BATCH_SIZE)
        _check_int("train.seq_len", self.seq_len, 1, MAX_SEQ_LEN)
        _check_int("train.steps", self.steps, 1, MAX_STEPS)
        _check_int("train.warmup_steps", self.warmup_steps, 0, MAX_STEPS)
        _check_int("train.seed", self.seed, 0, MAX_SEED)
        _check_int("train.micro_batch_size", self.micro_batch_size, 0, self.global_batch_size)
        if self.micro_batch_size and self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.micro_batch_size: must divide train.global_batch_size ({self.global_batch_size}), "
                f"got {self.micro_batch_size}; use 0 to let the planner choose"
            )
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"train.dtype: must be 'fp32', 'bf16' or 'fp16', got {show(self.dtype)}")
        _check_number("train.max_grad_norm", self.max_grad_norm, "a finite number >= 0 (0: no clipping)",
                      lambda v: v >= 0)
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"train.lr_schedule: must be 'constant' or 'cosine', got {show(self.lr_schedule)}")
