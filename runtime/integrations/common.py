"""What the trainer integrations share.

[Note: the trainer's step inside the engine] A trainer computes the loss its own way (a
``compute_loss``, a ``training_step``); memtrain must run that code inside the engine's forward,
where the chunk store fetches each block's parameters. ``StepCall`` is the engine's ``call``: on
the wrapped model it runs the trainer's step that ``run`` was given, and on the planner's
weightless twin (``wrap`` traces one forward to plan) it runs the model's plain forward, since
the trainer's batch lives on a real device and the twin on ``meta``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from memtrain.errors import UserError
from memtrain.optimizers import GROUP_KEYS

__all__ = ["StepCall", "LazyEngine", "load_plan", "optimizer_of", "with_group", "restore_group"]


class StepCall:
    """The engine's ``call`` running a trainer's own step ([Note: the trainer's step inside the engine])."""

    def __init__(self, model: nn.Module, trace: Callable[[nn.Module, torch.Tensor], Any]) -> None:
        self.model, self.trace = model, trace
        self._step: Callable[[], Any] | None = None

    def __call__(self, model: nn.Module, input_ids: torch.Tensor) -> Any:
        if model is self.model and self._step is not None:
            return self._step()
        return self.trace(model, input_ids)

    def run(self, engine, input_ids: torch.Tensor, step: Callable[[], Any]) -> Any:
        """``step()``'s result, run as the engine's forward of ``input_ids`` (whose shape plans)."""
        self._step = step
        try:
            return engine(input_ids)
        finally:
            self._step = None


def load_plan(plan) -> Any:
    """``plan=`` of an integration: a ``Plan``, a ``MemoryPolicy``, a path to ``memtrain plan
    --json``'s file, or None."""
    if plan is None or not isinstance(plan, (str, os.PathLike)):
        return plan
    from memtrain.planner.plan import Plan

    if not os.path.isfile(plan):
        raise UserError(f"plan: {os.fspath(plan)!r} is not a file; pass the file `memtrain plan --json` wrote")
    return Plan.load(plan)


class LazyEngine:
    """``wrap(model, **kwargs)`` made at the first batch; a state restored before then (a
    resume) is loaded into it before that batch runs."""

    def __init__(self, **wrap_kwargs: Any) -> None:
        self.wrap_kwargs = wrap_kwargs
        self.engine = None
        self._pending: Mapping[str, Any] | None = None

    @property
    def built(self) -> bool:
        return self.engine is not None and self.engine.store is not None

    def get(self, model: nn.Module, input_ids: torch.Tensor):
        """The engine of ``model``, planned and built from ``input_ids``' shape if not yet."""
        if self.engine is None:
            from memtrain.runtime.wrapping import wrap

            self.engine = wrap(model, **self.wrap_kwargs)
        self.engine.prepare(input_ids)
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load(state)
        return self.engine

    def load(self, state: Mapping[str, Any]) -> None:
        """Load ``{"model": ..., "optimizer": ...}`` (either may be missing) now or at the build."""
        if not self.built:
            self._pending = {**(self._pending or {}), **state}
            return
        full = dict(state)
        if "model" not in full:  # Engine.load_state_dict reads a dict without "model" as the model's
            full["model"] = self.engine.model_state_dict()
        self.engine.load_state_dict(full)

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer states in ``torch.optim``'s format, gathered from every tier (or the
        restored ones not yet loaded)."""
        if not self.built:
            return dict((self._pending or {}).get("optimizer") or {})
        return self.engine.state_dict()["optimizer"]

    def close(self, *, keep_optimizer: bool = False) -> None:
        """The parameters go back to the model (fp32, on the CPU); the next batch wraps again.
        ``keep_optimizer``: the optimizer states are kept, for a checkpoint saved after training
        and for the next engine, as a torch optimizer keeps its states across ``fit`` calls."""
        if self.built and keep_optimizer:
            self._pending = {"optimizer": self.optimizer_state()}
        if self.engine is not None:
            self.engine.close()
        self.engine = None


def with_group(state: dict[str, Any], groups: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """An optimizer state whose parameter groups carry the trainer's ``groups``' values (lr,
    initial_lr, ...), one for each, or one for all: as torch's, the saved lr is the next step's,
    which the scheduler has already set."""
    if state:
        state["param_groups"] = [
            {**saved, **{k: v for k, v in groups[min(i, len(groups) - 1)].items() if k != "params"}}
            for i, saved in enumerate(state["param_groups"])]
    return state


def restore_group(groups: Sequence[dict[str, Any]], state: Mapping[str, Any]) -> None:
    """Set the trainer's ``groups``' values (lr, initial_lr, ...) from a state saved by
    ``with_group``, each from its saved group."""
    for group, saved in zip(groups, state["param_groups"]):
        group.update({k: saved[k] for k in group if k != "params" and k in saved})


_ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")
_SGD_KEYS = ("lr", "momentum", "dampening", "nesterov", "weight_decay")


def optimizer_of(opt: torch.optim.Optimizer, where: str) -> dict[str, Any]:
    """wrap's ``optimizer=`` for a ``torch.optim.AdamW`` or ``SGD`` the user built: its
    hyper-parameters, and with several parameter groups each group's parameters, lr and weight
    decay (memtrain.optimizers ``ParamGroup``); the rest must be the same for every group."""
    if type(opt) is torch.optim.AdamW:
        name, keys = "adamw", _ADAMW_KEYS
        unsupported = ("amsgrad", "maximize", "capturable", "differentiable")
    elif type(opt) is torch.optim.SGD:
        name, keys = "sgd", _SGD_KEYS
        unsupported = ("maximize", "differentiable")
    else:
        raise UserError(f"{where}: memtrain runs torch.optim.AdamW or SGD, got {type(opt).__name__}; "
                        "return one of those")
    first = opt.param_groups[0]
    for group in opt.param_groups[1:]:
        differ = [k for k in keys if k not in GROUP_KEYS and group[k] != first[k]]
        if differ:
            raise UserError(f"{where}: parameter groups with different {differ[0]} are not supported by memtrain; "
                            f"a group may set only {', '.join(k for k in GROUP_KEYS if k != 'params')}")
    for group in opt.param_groups:
        on = [k for k in unsupported if group.get(k)]
        if on:
            raise UserError(f"{where}: {type(opt).__name__}({on[0]}=True) is not supported by memtrain; leave it off")
    out = {"name": name, **{k: first[k] for k in keys}}
    if len(opt.param_groups) > 1:
        out["param_groups"] = [{k: g[k] for k in GROUP_KEYS} for g in opt.param_groups]
    return out
