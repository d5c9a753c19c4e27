"""The ``train`` and ``train.optimizer`` sections of the run configuration (re-exported by
``memtrain.config``, which builds and documents them with the others; kept apart so that file
stays within its size). The rules of ``memtrain.config`` hold here: ``kw_only, slots``
dataclasses, a docstring per field, ``__post_init__`` checks raising ``ConfigError`` that names
the dotted field.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

from memtrain.config_checks import (
    MAX_GLOBAL_BATCH_SIZE, MAX_SEED, MAX_STEPS, MAX_SEQ_LEN, ConfigError, _check_int, _check_number, _fraction, _positive,
)
from memtrain.optimizers import OptimizerSpec, ParamGroup, lookup
from memtrain.units import show

__all__ = ["ParamGroupConfig", "OptimizerConfig", "TrainConfig", "resolve_groups"]

_GROUPS = "train.optimizer.param_groups"
_WILDCARDS = frozenset("*?[")


@dataclass(kw_only=True, slots=True)
class ParamGroupConfig:
    """One parameter group (an item of ``train.optimizer.param_groups``): the parameters it takes
    and their learning rate and weight decay, as one of torch's param groups."""

    params: list[str] = field(default_factory=list)
    """Parameter names as the model's ``named_parameters()`` gives them (the built-in gpt:
    ``blocks.<i>.<name>``, block 0 the embedding, the last the head; the same in one process and in
    a pipeline), or patterns with ``*``, ``?`` and ``[...]`` matched against the whole name
    (``*`` crosses dots: ``*.bias``, ``*norm*``). A parameter goes to the first group, in list
    order, with a name or pattern matching it; each entry must take at least one parameter, and
    every trainable parameter must be in a group (a last group ``params: ['*']`` takes the rest)."""
    lr: float | None = None
    """This group's peak learning rate; unset: ``train.optimizer.lr``. ``train.lr_schedule`` and
    ``train.warmup_steps`` scale it as torch's ``LambdaLR`` does (group lr × the schedule's factor)."""
    weight_decay: float | None = None
    """This group's weight decay (0 for biases and norms is the usual choice); unset:
    ``train.optimizer.weight_decay``."""

    def __post_init__(self) -> None:
        where = "train.optimizer.param_groups[].params"
        if not self.params:
            raise ConfigError(f"{where}: a list of parameter names or patterns such as ['*.bias', '*norm*'], "
                              "got none; give at least one or remove the group")
        for i, entry in enumerate(self.params):
            if not entry.strip():
                raise ConfigError(f"{where}[{i}]: an empty name; write a parameter name or a pattern such as '*.bias'")
        if self.lr is not None:
            _check_number("train.optimizer.param_groups[].lr", self.lr, "a finite number >= 0", lambda v: v >= 0)
        _check_number("train.optimizer.param_groups[].weight_decay", self.weight_decay, "a finite number >= 0",
                      lambda v: v >= 0)


def resolve_groups(groups: Sequence[ParamGroupConfig], names: Sequence[str]) -> tuple[ParamGroup, ...]:
    """The config's groups as ``OptimizerSpec.param_groups``: each of the model's parameter
    ``names`` (in the model's order) in the first group with an entry matching it, each group's
    names in the model's order. A ``ConfigError`` names the entry that takes no parameter (it
    matches none, or only ones an earlier group took) or the parameter in no group."""
    owner: dict[str, tuple[int, int]] = {}  # name -> (group, entry) that took it
    for gi, group in enumerate(groups):
        for ei, entry in enumerate(group.params):
            field_ = f"{_GROUPS}[{gi}].params[{ei}]"
            matched = [n for n in names if n == entry] if not _WILDCARDS & set(entry) \
                else [n for n in names if fnmatch.fnmatchcase(n, entry)]
            if not matched:
                kind = "pattern" if _WILDCARDS & set(entry) else "name"
                example = f" such as {names[0]!r}" if names else ""
                raise ConfigError(f"{field_}: the {kind} {show(entry)} matches no parameter of the model (names as "
                                  f"model.named_parameters() gives them{example}); correct it or remove it")
            new = [n for n in matched if n not in owner]
            earlier = sorted({owner[n][0] for n in matched if n in owner} - {gi})
            if not new and earlier:  # taken whole by earlier groups (by this group's own entries: redundant, kept)
                raise ConfigError(f"{field_}: every parameter {show(entry)} matches is already in group "
                                  f"{earlier[0]} (a parameter goes to the first group that matches it); move "
                                  f"this group before group {earlier[0]} or remove the entry")
            for n in new:
                owner[n] = (gi, ei)
    missing = next((n for n in names if n not in owner), None)
    if missing is not None:
        raise ConfigError(f"{_GROUPS}: the parameter {missing!r} is in no group; add it (or a pattern matching it) "
                          "to a group, or end the list with a group of params: ['*'] for the rest")
    return tuple(ParamGroup(params=tuple(n for n in names if owner[n][0] == gi), lr=g.lr,
                            weight_decay=g.weight_decay) for gi, g in enumerate(groups))


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
    param_groups: list[ParamGroupConfig] = field(default_factory=list)
    """Parameter groups, each with its own lr and weight decay (section
    ``train.optimizer.param_groups[]``); empty: one group of every parameter."""

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

        seen: dict[str, int] = {}
        for gi, group in enumerate(self.param_groups):
            for ei, entry in enumerate(group.params):
                if entry in seen:
                    raise ConfigError(f"{_GROUPS}[{gi}].params[{ei}]: {show(entry)} is also in group {seen[entry]}; "
                                      "give each name or pattern once (the first group that matches takes it)")
                seen[entry] = gi

    def spec(self, names: Sequence[str] | None = None) -> OptimizerSpec:
        """These hyper-parameters as ``wrap()`` takes them; with ``param_groups``, ``names`` (the
        model's trainable parameters, in order) resolves the groups' names and patterns
        (``resolve_groups``)."""
        groups: tuple[ParamGroup, ...] = ()
        if self.param_groups:
            assert names is not None, "train.optimizer.param_groups needs the model's parameter names"
            groups = resolve_groups(self.param_groups, names)
        return OptimizerSpec(name=self.name, lr=self.lr, betas=tuple(self.betas), eps=self.eps,
                             weight_decay=self.weight_decay, momentum=self.momentum, param_groups=groups)


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
