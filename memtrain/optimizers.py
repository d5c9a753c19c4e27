"""The optimizers memtrain steps: one descriptor each, the one place their facts are written.

An ``OptimizerKind`` says what an optimizer keeps per parameter (its fp32 state tensors, by
torch's names, so state dicts load into ``torch.optim``), what its update costs (bytes read and
written per element), which kernels update a flat chunk, and its hyper-parameters' defaults,
which are torch's: ``wrap()`` promises what plain PyTorch does (docs/optimizer.md).
``planner.cost`` and ``planner.stats`` size and time chunks from it; ``offload.optim`` allocates,
updates and saves states through it; ``memtrain.config`` takes its defaults from ``OptimizerSpec``.
``lookup`` is the only way from a name to a descriptor and refuses an unknown one with a
``UserError`` naming the field and the known names.

This module imports nothing of memtrain but ``memtrain.errors``, so every layer may use it, and
imports torch only when a kernel runs, so the planner and the config stay free of torch.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from memtrain.errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = [
    "Optimizer", "OptimizerKind", "OptimizerSpec", "ParamGroup", "GROUP_KEYS", "KINDS", "ADAMW", "SGD", "lookup",
    "KERNELS",
    "DEFAULT_HOST_KERNEL", "adamw_step", "host_adamw_step", "sgd_step", "KernelTiming", "measure_host_adamw",
]

KERNELS = ("single", "foreach", "fused")
"""Kernels over a flat chunk, as torch names its code paths: ``single`` (one tensor at a time,
torch's CPU default), ``foreach`` (multi-tensor, torch's CUDA default), ``fused``."""
DEFAULT_HOST_KERNEL = "fused"
"""The kernel of host and NVMe chunks (offload.optim [Note: host kernel choice])."""


# --- kernels over flat tensors -------------------------------------------------------------


def adamw_step(
    param: "torch.Tensor", grad: "torch.Tensor", exp_avg: "torch.Tensor", exp_avg_sq: "torch.Tensor",
    step: "torch.Tensor", *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
    kernel: str = "single",
) -> None:
    """One AdamW update of flat fp32 tensors in place; ``step`` (a 0-d float tensor) is incremented.

    Loshchilov & Hutter 2019, Algorithm 2 (AdamW), computed by torch's own kernels so the
    result is ``torch.optim.AdamW``'s (bitwise with ``single``/``foreach``; ``fused`` orders the
    arithmetic differently, within one ulp per step).
    """
    from torch.optim.adam import adam

    if kernel not in KERNELS:
        raise ValueError(f"kernel: must be one of {', '.join(KERNELS)}, got {kernel!r}")
    adam(
        [param], [grad], [exp_avg], [exp_avg_sq], [], [step], foreach=kernel == "foreach", fused=kernel == "fused",
        capturable=False, differentiable=False, grad_scale=None, found_inf=None, decoupled_weight_decay=True,
        amsgrad=False, beta1=betas[0], beta2=betas[1], lr=lr, weight_decay=weight_decay, eps=eps, maximize=False,
    )


def host_adamw_step(
    param: "torch.Tensor", grad: "torch.Tensor", exp_avg: "torch.Tensor", exp_avg_sq: "torch.Tensor",
    step: "torch.Tensor", *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
    kernel: str = DEFAULT_HOST_KERNEL,
) -> None:
    """The host-chunk AdamW step (the one ``runtime.profiling`` times for ``cpu_adam_params_per_s``)."""
    adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
               kernel=kernel)


def sgd_step(
    param: "torch.Tensor", grad: "torch.Tensor", momentum_buffer: "torch.Tensor | None", *, first: bool, lr: float,
    momentum: float, dampening: float, weight_decay: float, nesterov: bool,
) -> None:
    """One SGD update in place, the arithmetic of ``torch.optim.sgd._single_tensor_sgd``.

    Sutskever et al. 2013 momentum as torch writes it: ``b = μb + (1-τ)g`` (``b = g`` on the
    first step), ``p -= lr·b`` (or ``lr·(g + μb)`` with Nesterov); L2 decay adds ``λp`` to g.
    """
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    if momentum != 0:
        assert momentum_buffer is not None
        if first:
            momentum_buffer.copy_(grad)
        else:
            momentum_buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
        grad = grad.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    param.add_(grad, alpha=-lr)


def _adamw_update(param, grad, states, step, spec: "OptimizerSpec", kernel: str) -> None:
    adamw_step(param, grad, states["exp_avg"], states["exp_avg_sq"], step, lr=spec.lr, betas=spec.betas,
               eps=spec.eps, weight_decay=spec.decay, kernel=kernel)


def _sgd_update(param, grad, states, step, spec: "OptimizerSpec", kernel: str) -> None:
    sgd_step(param, grad, states.get("momentum_buffer"), first=int(step.item()) == 0, lr=spec.lr,
             momentum=spec.momentum, dampening=spec.dampening, weight_decay=spec.decay, nesterov=spec.nesterov)
    step += 1


# --- the descriptors ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizerKind:
    """What memtrain knows of one optimizer; ``KINDS`` holds one per ``Optimizer`` name."""

    name: str
    """The name configs, ``wrap()`` and plans use."""
    state_names: tuple[str, ...]
    """Its fp32 state tensors, one element per parameter element, by torch's names (the keys of
    ``torch.optim``'s per-parameter state, and of a chunk's state buffers and NVMe files)."""
    states_need: str | None = None
    """A hyper-parameter that must be nonzero for the states to exist (SGD keeps no momentum
    buffer at momentum 0); None: always held. The planner, which knows only the name, counts
    the states anyway (an upper bound)."""
    counts_steps: bool
    """torch keeps a per-parameter ``step`` beside the states (AdamW's bias correction); memtrain
    keeps one per chunk (``Chunk.step``) and writes it into each parameter's state."""
    defaults: Mapping[str, Any]
    """Its hyper-parameters and torch's defaults for them, in the order of torch's param group."""
    group_flags: Mapping[str, Any]
    """The rest of a ``torch.optim`` param group, flags memtrain leaves at torch's defaults."""
    kernels: tuple[str, ...]
    """The kernels (``KERNELS``) it has over a flat chunk; any other request runs the first."""
    unfused_bytes_per_elem: int
    """fp32 bytes one unfused update reads and writes per element ([Note: unfused optimizer])."""
    update: Callable[..., None]
    """``update(param, grad, states, step, spec, kernel)``: one step of a flat fp32 chunk in
    place, ``states`` by ``state_names``; ``step`` (a 0-d float tensor) is incremented."""

    @property
    def state_bytes_per_elem(self) -> int:
        """``o`` of docs/memory-accounting.md: 4 bytes per fp32 state tensor."""
        return 4 * len(self.state_names)

    @property
    def fused_bytes_per_elem(self) -> int:
        """fp32 bytes one fused update (one pass, the host chunks' kernel) reads and writes per
        element: read the gradient, parameter and states, write the parameter and states (AdamW
        28, SGD 20). The step is memory-bound (Williams et al. 2009, roofline), so the planner
        times it as bytes / bandwidth and scales the measured CPU AdamW rate by this figure."""
        return 4 + 2 * (4 + self.state_bytes_per_elem)

    def states_for(self, spec: "OptimizerSpec") -> tuple[str, ...]:
        """The states a run with these hyper-parameters holds (see ``states_need``)."""
        if self.states_need is not None and not getattr(spec, self.states_need):
            return ()
        return self.state_names

    def kernel(self, requested: str) -> str:
        """``requested`` if this optimizer has that kernel, else its first (see ``kernels``)."""
        return requested if requested in self.kernels else self.kernels[0]

    def torch_group(self, spec: "OptimizerSpec") -> dict[str, Any]:
        """The hyper-parameters as ``torch.optim`` writes a param group (without ``params``)."""
        values = {k: getattr(spec, k) for k in self.defaults}
        if "weight_decay" in values:
            values["weight_decay"] = spec.decay
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return {**values, **self.group_flags}


# [Note: unfused optimizer] torch's single-tensor and foreach kernels (the ones the runtime runs
# on device chunks: offload.optim) make one pass per op over fp32 tensors. AdamW
# (torch/optim/adamw.py, _single_tensor_adamw): param.mul_(1 - lr·wd) r4 w4; exp_avg.lerp_(grad)
# r8 w4; exp_avg_sq.mul_ r4 w4 and .addcmul_(grad, grad) r8 w4; denom = sqrt(v) r4 w4,
# / bias_correction r4 w4, .add_(eps) r4 w4; param.addcdiv_(m, denom) r12 w4: 80 bytes. SGD
# (torch/optim/sgd.py): grad + wd·param r8 w4; buf.mul_ r4 w4, .add_(grad) r8 w4;
# param.add_(buf) r8 w4: 44 bytes. planner.cost adds the mixed-precision compute copy.

DEFAULT_LR = 1e-3
"""torch's default learning rate of both ``AdamW`` and ``SGD`` in every torch memtrain supports
(>= 2.4; older ones required SGD's to be given)."""

ADAMW = OptimizerKind(
    name="adamw",
    state_names=("exp_avg", "exp_avg_sq"),
    counts_steps=True,
    defaults=MappingProxyType({"lr": DEFAULT_LR, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}),
    group_flags=MappingProxyType({"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                                  "differentiable": False, "fused": None, "decoupled_weight_decay": True}),
    kernels=KERNELS,
    unfused_bytes_per_elem=80,
    update=_adamw_update,
)
"""``torch.optim.AdamW`` (Loshchilov & Hutter 2019)."""

SGD = OptimizerKind(
    name="sgd",
    state_names=("momentum_buffer",),
    states_need="momentum",
    counts_steps=False,
    defaults=MappingProxyType({"lr": DEFAULT_LR, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
                               "nesterov": False}),
    group_flags=MappingProxyType({"maximize": False, "foreach": None, "differentiable": False, "fused": None}),
    kernels=("single",),
    unfused_bytes_per_elem=44,
    update=_sgd_update,
)
"""``torch.optim.SGD`` with momentum (Sutskever et al. 2013) and L2 weight decay."""


class Optimizer(StrEnum):
    """The names of the optimizers memtrain knows; ``Optimizer("lamb")`` raises a ``UserError``."""

    ADAMW = "adamw"
    SGD = "sgd"

    @classmethod
    def _missing_(cls, value: object) -> "Optimizer":
        lookup(value)  # raises: an unknown name
        raise AssertionError(value)


KINDS: Mapping[Optimizer, OptimizerKind] = MappingProxyType({Optimizer.ADAMW: ADAMW, Optimizer.SGD: SGD})
"""The registry: one descriptor per optimizer name."""
assert all(k.value == v.name for k, v in KINDS.items()) and len(KINDS) == len(Optimizer)


def lookup(name: object, field: str = "optimizer", *, error: type[UserError] = UserError) -> OptimizerKind:
    """The descriptor of ``name``; an unknown name raises ``error`` naming ``field`` and the known names."""
    for key, kind in KINDS.items():
        if name == key.value:
            return kind
    raise error(f"{field}: unknown optimizer {reprlib.repr(name)}; memtrain knows {', '.join(KINDS)}")


# --- hyper-parameters -----------------------------------------------------------------------------


GROUP_KEYS = ("params", "lr", "weight_decay")
"""What a parameter group may set (``OptimizerSpec.param_groups``); every other hyper-parameter
is the optimizer's, the same for all groups."""


def _check_lr(field: str, lr: object) -> None:
    # 0 is torch's lower bound too: a warmup schedule's first step runs with lr 0.
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and 0 <= lr < math.inf):
        raise UserError(f"{field}: must be a finite number >= 0, got {reprlib.repr(lr)}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ParamGroup:
    """One ``torch.optim`` parameter group: its parameters by ``model.named_parameters()`` name,
    and the learning rate and weight decay it sets (None: the optimizer's). AdamW's decoupled
    decay and the update are elementwise, so a chunk holding parameters of several groups steps
    each group's slots with that group's values and the result is torch's (offload.optim)."""

    params: tuple[str, ...]
    """Parameter names, in the group's order (a state dict's indices run over the groups in order)."""
    lr: float | None = None
    """This group's learning rate; None: the optimizer's ``lr``."""
    weight_decay: float | None = None
    """This group's weight decay; None: the optimizer's."""

    @staticmethod
    def from_value(value: object, field: str) -> "ParamGroup":
        """From a mapping such as ``{"params": ["h.0.ln.bias"], "weight_decay": 0.0}``."""
        if isinstance(value, ParamGroup):
            return value
        if not isinstance(value, Mapping):
            raise UserError(f"{field}: a mapping with 'params' (parameter names) and optionally 'lr' and "
                            f"'weight_decay', got {reprlib.repr(value)}")
        unknown = sorted(str(k) for k in set(value) - set(GROUP_KEYS))
        if unknown:
            raise UserError(f"{field}.{unknown[0]}: not settable per parameter group in memtrain; a group sets "
                            f"{', '.join(GROUP_KEYS)} and the rest is the optimizer's, the same for every group")
        params = value.get("params")
        if (isinstance(params, str) or not isinstance(params, (list, tuple))
                or not all(isinstance(n, str) for n in params)):
            raise UserError(f"{field}.params: a list of parameter names, got {reprlib.repr(params)}")
        lr, wd = value.get("lr"), value.get("weight_decay")
        if lr is not None:
            _check_lr(f"{field}.lr", lr)
        if wd is not None and (isinstance(wd, bool) or not isinstance(wd, (int, float)) or not 0 <= wd < math.inf):
            raise UserError(f"{field}.weight_decay: must be a finite number >= 0, got {reprlib.repr(wd)}")
        return ParamGroup(params=tuple(params), lr=None if lr is None else float(lr),
                          weight_decay=None if wd is None else float(wd))


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizerSpec:
    """Hyper-parameters; defaults are torch's, so ``{"name": "adamw", "lr": 3e-4}`` means what
    ``torch.optim.AdamW(params, lr=3e-4)`` means. A field another optimizer has is ignored."""

    name: str = Optimizer.ADAMW.value
    """``adamw`` or ``sgd``."""
    lr: float = DEFAULT_LR
    """Learning rate."""
    betas: tuple[float, float] = ADAMW.defaults["betas"]
    """AdamW coefficients of the running averages of the gradient and its square."""
    eps: float = ADAMW.defaults["eps"]
    """AdamW term added to the denominator."""
    weight_decay: float | None = None
    """None: the optimizer's default (AdamW: decoupled decay 0.01, Loshchilov & Hutter 2019;
    SGD: L2 added to the gradient, 0)."""
    momentum: float = SGD.defaults["momentum"]
    """SGD momentum (0 = plain SGD, no state)."""
    dampening: float = SGD.defaults["dampening"]
    """SGD dampening of the gradient added to the momentum buffer."""
    nesterov: bool = SGD.defaults["nesterov"]
    """SGD Nesterov momentum."""
    param_groups: tuple[ParamGroup, ...] = ()
    """torch's parameter groups, each with its own lr and weight decay (``ParamGroup``); () is one
    group of every parameter. When given, every trainable parameter is in exactly one group."""

    def __post_init__(self) -> None:
        lookup(self.name, "optimizer.name")
        _check_lr("optimizer.lr", self.lr)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"optimizer.betas: two numbers in [0, 1), got {self.betas!r}")
        if not self.eps >= 0:
            raise UserError(f"optimizer.eps: must be >= 0, got {self.eps!r}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise UserError(f"optimizer.weight_decay: must be >= 0, got {self.weight_decay!r}")
        if self.momentum < 0:
            raise UserError(f"optimizer.momentum: must be >= 0, got {self.momentum!r}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise UserError("optimizer.nesterov: needs momentum > 0 and dampening 0")

    @property
    def kind(self) -> OptimizerKind:
        return lookup(self.name, "optimizer.name")

    @property
    def decay(self) -> float:
        """The weight decay applied: ``weight_decay``, or the optimizer's default."""
        if self.weight_decay is not None:
            return float(self.weight_decay)
        return float(self.kind.defaults["weight_decay"])

    @property
    def state_names(self) -> tuple[str, ...]:
        """The state tensors a chunk holds under these hyper-parameters."""
        return self.kind.states_for(self)

    def group_specs(self) -> list["OptimizerSpec"]:
        """One spec per parameter group (one when there are no groups), each with that group's lr
        and weight decay and no groups of its own: what updates the group's parameters."""
        if not self.param_groups:
            return [self]
        return [dataclasses.replace(self, param_groups=(), lr=self.lr if g.lr is None else g.lr,
                                    weight_decay=self.weight_decay if g.weight_decay is None else g.weight_decay)
                for g in self.param_groups]

    def with_lr(self, lr: "float | Sequence[float]") -> "OptimizerSpec":
        """The spec with a new learning rate: a number for every group, or one per group (as a
        scheduler sets each of ``torch.optim``'s ``param_groups``)."""
        if isinstance(lr, (int, float)):
            _check_lr("lr", lr)
            return dataclasses.replace(self, lr=float(lr), param_groups=tuple(
                dataclasses.replace(g, lr=None) for g in self.param_groups))
        lrs = list(lr)
        if len(lrs) != max(1, len(self.param_groups)):
            raise UserError(f"lr: {len(lrs)} learning rates for {max(1, len(self.param_groups))} parameter group(s); "
                            "give one per group, or one number for all")
        for i, v in enumerate(lrs):
            _check_lr(f"lr[{i}]", v)
        if not self.param_groups:
            return dataclasses.replace(self, lr=float(lrs[0]))
        return dataclasses.replace(self, param_groups=tuple(
            dataclasses.replace(g, lr=float(v)) for g, v in zip(self.param_groups, lrs)))

    def torch_group(self) -> dict[str, Any]:
        """The hyper-parameters as a ``torch.optim`` param group (without ``params``)."""
        return self.kind.torch_group(self)

    @staticmethod
    def from_value(value: "OptimizerSpec | Mapping[str, Any] | str") -> "OptimizerSpec":
        """From a spec, a dict (``{"name": "adamw", "lr": 3e-4}``) or a name."""
        if isinstance(value, OptimizerSpec):
            return value
        if isinstance(value, str):
            return OptimizerSpec(name=value)
        if not isinstance(value, Mapping):
            raise UserError(f"optimizer: expected a dict such as {{'name': 'adamw', 'lr': 3e-4}}, got {reprlib.repr(value)}")
        known = set(OptimizerSpec.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise UserError(f"optimizer.{unknown[0]}: unknown field; known: {', '.join(sorted(known))}")
        kw = dict(value)
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        if "param_groups" in kw:
            groups = kw["param_groups"]
            if isinstance(groups, (str, Mapping)) or not isinstance(groups, (list, tuple)):
                raise UserError(f"optimizer.param_groups: a list of groups, got {reprlib.repr(groups)}")
            kw["param_groups"] = tuple(ParamGroup.from_value(g, f"optimizer.param_groups[{i}]")
                                       for i, g in enumerate(groups))
            seen: set[str] = set()
            for i, g in enumerate(kw["param_groups"]):
                twice = next((n for n in g.params if n in seen), None)
                if twice is not None:
                    raise UserError(f"optimizer.param_groups[{i}].params: {twice!r} is in an earlier group too; "
                                    "put each parameter in one group")
                seen.update(g.params)
        return OptimizerSpec(**kw)


# --- the host kernels' timings ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class KernelTiming:
    kernel: str
    """``single``, ``foreach`` or ``fused``."""
    step_s: float
    """Best of the timed steps."""
    params_per_s: float
    """Elements updated per second."""
    max_abs_diff: float
    """Largest |Δ| of the updated parameters against the single-tensor kernel (torch's CPU default)."""


def measure_host_adamw(num_elems: int = 64 * 2**20, reps: int = 3) -> list[KernelTiming]:
    """Time the AdamW kernels on one flat fp32 chunk of ``num_elems`` on the CPU.

    The figures behind offload.optim [Note: host kernel choice] (docs/optimizer.md).
    """
    import torch

    if num_elems < 1 or reps < 1:
        raise ValueError(f"num_elems and reps must be >= 1, got {num_elems}, {reps}")
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(num_elems, generator=gen)
    g = torch.randn(num_elems, generator=gen)
    out: list[KernelTiming] = []
    reference: torch.Tensor | None = None
    for kernel in ADAMW.kernels:
        p, m, v, step = p0.clone(), torch.zeros(num_elems), torch.zeros(num_elems), torch.tensor(0.0)
        hp = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, kernel=kernel)
        adamw_step(p, g, m, v, step, **hp)  # warm-up; also the step compared below
        first = p.clone()
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            adamw_step(p, g, m, v, step, **hp)
            best = min(best, time.perf_counter() - t0)
        if reference is None:
            reference = first
        diff = (first - reference).abs().max().item()
        out.append(KernelTiming(kernel=kernel, step_s=best, params_per_s=num_elems / best, max_abs_diff=diff))
    return out
