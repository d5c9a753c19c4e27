"""memtrain in a PyTorch Lightning script: ``Trainer(strategy=MemtrainStrategy(memory=...))``.

    from memtrain.runtime.integrations.lightning import MemtrainStrategy
    trainer = L.Trainer(strategy=MemtrainStrategy(memory={"device": "8GiB", "offload": "host"}),
                        accelerator="cpu", max_steps=1000)
    trainer.fit(lit_module, train_loader)                       # ckpt_path=... resumes

A single-device strategy: the LightningModule's ``model`` attribute (``module=``) is wrapped at
the first batch; the module's ``training_step`` runs inside the engine's forward ([Note: the
trainer's step inside the engine]), the strategy's ``backward`` is the engine's, and
``optimizer_step`` runs the closure then the engine's offloaded step. The optimizer
``configure_optimizers`` returns (``torch.optim.AdamW`` or ``SGD``) gives the hyper-parameters
and its parameter groups (each its own lr and weight decay), and each group's lr, which
Lightning's LR schedulers set, is that group's lr at each step; its own ``step`` never runs.
``gradient_clip_val`` clips by the global norm in the engine's step, over the optimizer's
parameters in its groups' order, as Lightning's ``clip_gradients`` does. Checkpoints hold the
module's state dict with the wrapped model's fp32 weights from every tier, and
``optimizer_states`` in torch's format from every tier; restoring loads the weights into the
module before it is wrapped and the states at its first batch. What is refused (and why) is
listed in docs/integrations.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import SingleDeviceStrategy
    from lightning.pytorch.utilities.model_helpers import is_overridden
except ImportError as e:  # an extra, not a dependency of memtrain
    raise ImportError('memtrain.runtime.integrations.lightning needs Lightning: pip install "memtrain[lightning]"') from e

from memtrain.errors import UserError
from memtrain.runtime.integrations.common import LazyEngine, StepCall, load_plan, optimizer_of, restore_group, with_group

__all__ = ["MemtrainStrategy"]


def _first_tensor(batch: Any) -> torch.Tensor:
    """The batch's input ids: the tensor, ``batch["input_ids"]`` or the first element."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping) and "input_ids" in batch:
        return batch["input_ids"]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise UserError("MemtrainStrategy: cannot find the input ids in the batch; pass input_ids=lambda batch: ...")


class MemtrainStrategy(SingleDeviceStrategy):
    """A Lightning strategy training ``lightning_module.<module>`` with memtrain.

    ``memory``/``plan``/``blocks``/``host_kernel``: as ``wrap()`` (docs/wrap.md); ``module``: the
    attribute holding the ``nn.Module`` to wrap; ``input_ids(batch)``: the tensor whose shape
    plans (default: the batch, its ``input_ids`` or its first element); ``call``/``loss_fn``: how
    the planner's weightless trace runs the model (default ``model(ids)`` and next-token cross
    entropy of its output).
    """

    strategy_name = "memtrain"

    def __init__(self, *, memory: Mapping[str, Any] | None = None, plan=None, module: str = "model", blocks=None,
                 host_kernel: str | None = None, input_ids: Callable[[Any], torch.Tensor] = _first_tensor,
                 call: Callable | None = None, loss_fn: Callable | None = None, device: str = "cpu") -> None:
        super().__init__(device=device)
        self._wrap_kwargs = dict(memory=memory, plan=load_plan(plan), blocks=blocks, host_kernel=host_kernel,
                                 loss_fn=loss_fn, verbose=False, device=device)
        self._module_attr, self._input_ids, self._trace = module, input_ids, call or (lambda m, ids: m(ids))
        self._lazy: LazyEngine | None = None
        self._call: StepCall | None = None

    @property
    def engine(self):
        """The engine while fitting (built at the first batch); None otherwise."""
        return None if self._lazy is None else self._lazy.engine

    def _inner(self) -> nn.Module:
        inner = getattr(self.lightning_module, self._module_attr, None)
        if not isinstance(inner, nn.Module):
            raise UserError(f"MemtrainStrategy(module={self._module_attr!r}): the LightningModule has no nn.Module "
                            "by that name; name the attribute that holds the model")
        return inner

    def setup(self, trainer: "pl.Trainer") -> None:
        super().setup(trainer)
        if trainer.state.fn != "fit":
            return
        lm = self.lightning_module
        clip = trainer.gradient_clip_val or None
        refuse = [
            (not lm.automatic_optimization, "automatic_optimization",
             "manual optimization is not supported yet; use automatic optimization"),
            (len(self.optimizers) != 1, "configure_optimizers", "return exactly one optimizer"),
            (clip and str(trainer.gradient_clip_algorithm or "norm").lower().endswith("value"),
             "gradient_clip_algorithm", "memtrain clips by the global norm only; use gradient_clip_algorithm='norm'"),
            (clip and is_overridden("configure_gradient_clipping", lm, pl.LightningModule),
             "configure_gradient_clipping",
             "a custom configure_gradient_clipping does not run under memtrain, which clips by the global norm; "
             "remove the override and set gradient_clip_val"),
            (str(trainer.precision) != "32-true", "precision", "mixed precision is not wired here yet; use 32-true"),
        ]
        for bad, field, fix in refuse:
            if bad:
                raise UserError(f"Trainer({field}): {fix}")
        inner = self._inner()
        optimizer = optimizer_of(self.optimizers[0], "configure_optimizers")
        if self._lazy is None:
            self._lazy = LazyEngine(optimizer=optimizer, **self._wrap_kwargs)
        # clip_gradients passes the optimizer's parameters, group by group (offload.clip)
        self._lazy.wrap_kwargs.update(optimizer=optimizer, call=StepCall(inner, self._trace), max_grad_norm=clip,
                                      clip_order="groups")
        self._call = self._lazy.wrap_kwargs["call"]

    def training_step(self, *args: Any, **kwargs: Any):
        batch = args[0] if args else kwargs["batch"]
        ids = self._input_ids(batch)
        engine = self._lazy.get(self._inner(), ids)
        return self._call.run(engine, ids, lambda: super(MemtrainStrategy, self).training_step(*args, **kwargs))

    def validation_step(self, *args: Any, **kwargs: Any):
        if self._lazy is not None and self._lazy.built:  # the module's weights are in memtrain's chunks now
            raise UserError("MemtrainStrategy: validation during fit is not supported yet; pass no val_dataloaders "
                            "to fit() and call trainer.validate() after it")
        return super().validation_step(*args, **kwargs)

    def backward(self, closure_loss: torch.Tensor, optimizer, *args: Any, **kwargs: Any) -> torch.Tensor:
        # The precision plugin's backward would call loss.backward(); the engine's runs it.
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        self._lazy.engine.backward(closure_loss)
        closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        self.post_backward(closure_loss)
        return closure_loss

    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        result = closure()  # training_step and backward of the batch (each accumulated one's ran before)
        engine = self._lazy.engine
        groups = optimizer.param_groups
        engine.set_lr(float(groups[0]["lr"]) if len(groups) == 1 else [float(g["lr"]) for g in groups])
        engine.step()
        return result

    # --- checkpoints ------------------------------------------------------------------------

    def lightning_module_state_dict(self) -> dict[str, Any]:
        sd = self.lightning_module.state_dict()
        if self._lazy is not None and self._lazy.built:
            for name, value in self._lazy.engine.model_state_dict().items():
                sd[f"{self._module_attr}.{name}"] = value
        return sd

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        if self._lazy is None:
            return super().optimizer_state(optimizer)
        return with_group(self._lazy.optimizer_state(), getattr(optimizer, "_optimizer", optimizer).param_groups)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if self._lazy is not None and self._lazy.built:
            prefix = f"{self._module_attr}."
            self._lazy.load({"model": {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items()
                                       if k.startswith(prefix)}})
            return
        super().load_model_state_dict(checkpoint, strict=strict)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        (state,) = checkpoint["optimizer_states"]
        if state:
            restore_group(self.optimizers[0].param_groups, state)
            self._lazy.load({"optimizer": state})

    def teardown(self) -> None:
        if self._lazy is not None:  # the weights go back to the module; the states stay for a later save
            self._lazy.close(keep_optimizer=True)
        super().teardown()
