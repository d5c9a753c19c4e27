"""Parameter groups (``OptimizerSpec.param_groups``) on a pipeline's stages.

The groups name parameters as the whole model does (``model.named_parameters()``:
``blocks.<i>.<name>``, ``models.gpt_blocks.param_names``); the driver checks every name once, as
the single-process engine does (offload.optim [Note: parameter groups]: an unknown name, or a
parameter in no group, is refused naming the field). Each stage then steps only the groups' parameters
it holds: a device stage's ``torch.optim`` optimizer gets one param group per group with some
parameter on the stage (a group with none there is left out of that stage's optimizer), an
offloaded stage's ``OffloadedOptimizer`` the groups by its store's local names. Each group keeps
its own learning rate and weight decay; a step's learning rate from the driver is one number for
every group or one per group, as ``engine.set_lr`` takes them, and a step without one runs each
group at its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from memtrain.config import ConfigError
from memtrain.optimizers import OptimizerSpec, ParamGroup

__all__ = ["check_groups", "stage_groups", "local_spec", "group_lr", "step_lr"]


def check_groups(optim: OptimizerSpec, names: Sequence[str]) -> None:
    """Every name of ``optim``'s groups is a parameter of the model (``names``), and every
    parameter is in a group; else a ``ConfigError`` naming ``optimizer.param_groups``."""
    if not optim.param_groups:
        return
    known = set(names)
    grouped = {n for g in optim.param_groups for n in g.params}
    unknown = next((n for g in optim.param_groups for n in g.params if n not in known), None)
    if unknown is not None:
        raise ConfigError(f"optimizer.param_groups: {unknown!r} is not a trainable parameter of the model "
                          f"(names as model.named_parameters() gives them, such as {names[0]!r})")
    missing = next((n for n in names if n not in grouped), None)
    if missing is not None:
        raise ConfigError(f"optimizer.param_groups: parameter {missing!r} is in no group; put every trainable "
                          "parameter in one group")


def stage_groups(optim: OptimizerSpec, params: Sequence[object], name_of: Mapping[int, str]) -> list[tuple[int, list]]:
    """A stage's ``params`` (its own, in order) by group: ``(group index, its params here)`` for
    each group with some (one group ``0`` of all without ``param_groups``)."""
    if not optim.param_groups:
        return [(0, list(params))]
    group_of = {n: gi for gi, g in enumerate(optim.param_groups) for n in g.params}
    out: dict[int, list] = {}
    for q in params:
        out.setdefault(group_of[name_of[id(q)]], []).append(q)
    return sorted(out.items())


def local_spec(optim: OptimizerSpec, local: Mapping[str, str]) -> OptimizerSpec:
    """``optim`` with its groups' names turned into an offloaded stage's store's (``local``: each
    store name → the parameter's name in the whole model), keeping only the stage's: every group
    stays (an empty one updates nothing), so group ``i`` is the run's group ``i``."""
    if not optim.param_groups:
        return optim
    inverse = {g: n for n, g in local.items()}
    groups = tuple(dataclasses.replace(g, params=tuple(inverse[n] for n in g.params if n in inverse))
                   for g in optim.param_groups)
    return dataclasses.replace(optim, param_groups=groups)


def step_lr(optim: OptimizerSpec, lr: object) -> float | tuple[float, ...] | None:
    """A step's learning rate as the driver passes it, checked: None (each group's own), one
    number for every group, or one per group (as ``engine.set_lr`` takes them)."""
    if lr is None:
        return None
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        return float(lr)
    lrs = tuple(float(v) for v in lr)  # type: ignore[union-attr]
    if len(lrs) != max(1, len(optim.param_groups)):
        raise ConfigError(f"lr_at: {len(lrs)} learning rates for {max(1, len(optim.param_groups))} parameter "
                          "group(s); give one per group, or one number for all")
    return lrs


def group_lr(optim: OptimizerSpec, group: int, lr: float | Sequence[float] | None) -> float:
    """The learning rate of group ``group`` in a step at ``lr`` (``step_lr``'s: None, the
    group's own; a number, every group's; a sequence, one per group)."""
    if isinstance(lr, (int, float)):
        return float(lr)
    if lr is not None:
        return float(lr[group])
    if not optim.param_groups:
        return float(optim.lr)
    g: ParamGroup = optim.param_groups[group]
    return float(optim.lr if g.lr is None else g.lr)
