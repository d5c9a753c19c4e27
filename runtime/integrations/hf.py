"""memtrain in a Hugging Face ``transformers.Trainer`` script: ``Trainer`` → ``MemtrainTrainer``.

    from memtrain.runtime.integrations.hf import MemtrainTrainer
    trainer = MemtrainTrainer(model=model, args=args, train_dataset=ds,
                              memory={"device": "8GiB", "host": "64GiB"})   # or plan="plan.json"
    trainer.train()                                   # or train(resume_from_checkpoint=True)

As transformers' DeepSpeed and FSDP integrations do, the Trainer keeps its loop, data, logging,
LR schedule and checkpoints, and memtrain takes the model's forward, backward and optimizer step:
``training_step`` runs the Trainer's ``compute_loss`` inside the engine's forward ([Note: the
trainer's step inside the engine]) and the engine's backward; the optimizer is a stand-in whose
``step`` sets the scheduler's learning rate and runs the engine's offloaded step. A checkpoint
holds the model's fp32 weights from every tier (``model.safetensors``, through ``_save`` as the
DeepSpeed path does) and the optimizer states in ``torch.optim.AdamW``'s format
(``optimizer.pt``), so ``resume_from_checkpoint`` loads the weights into the model before the
engine is built and the states into it before its first batch. At the end of ``train`` the
parameters go back to the model, so ``evaluate``, ``predict`` and ``save_model`` afterwards see
the trained weights. ``max_grad_norm`` clips in the engine's step, by the global norm of every
gradient (the Trainer's ``_clip_grad_norm`` returns the engine's norm, which it logs as
``grad_norm``), and ``weight_decay`` applies to the Trainer's decay group (all but biases and
norms, ``get_decay_parameter_names``), as its ``create_optimizer`` groups them. What is refused
(and why) is listed in docs/integrations.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

try:
    import transformers
except ImportError as e:  # an extra, not a dependency of memtrain
    raise ImportError('memtrain.runtime.integrations.hf needs transformers: pip install "memtrain[hf]"') from e

from memtrain.errors import UserError
from memtrain.models.built import first_names
from memtrain.models.hf import _call_causal_lm, decoder_layers
from memtrain.runtime.integrations.common import LazyEngine, StepCall, load_plan, restore_group, with_group

__all__ = ["MemtrainTrainer", "hf_blocks"]

_ADAMW_OPTIMS = ("adamw_torch", "adamw_torch_fused")


def hf_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """A causal LM's blocks in order: input embeddings, each decoder layer, output embeddings."""
    names = first_names(model)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is None or head is None:
        raise UserError(f"MemtrainTrainer: {type(model).__name__} has no input/output embeddings; pass blocks=")
    layers_name, layers = decoder_layers(model)
    return [(names[id(embed)], embed), *((f"{layers_name}.{i}", m) for i, m in enumerate(layers)),
            (names[id(head)], head)]


def _trace(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The planner's forward of the weightless twin: the logits, for next-token cross entropy."""
    return _call_causal_lm(model, input_ids).logits


def _check_args(args: transformers.TrainingArguments, decay: list[str] | None = None) -> dict[str, Any]:
    """wrap's ``optimizer=`` from the arguments, with the Trainer's two parameter groups when
    ``weight_decay`` is set (decay on the parameters ``decay`` names, none on the rest); a
    setting memtrain would not honour is refused."""
    refuse = [
        (args.max_grad_norm is not None and args.max_grad_norm < 0, "max_grad_norm",
         "must be >= 0 (0: no clipping)"),
        (args.optim not in _ADAMW_OPTIMS, "optim", f"memtrain runs AdamW; use one of {', '.join(_ADAMW_OPTIMS)}"),
        (args.fp16 or args.bf16, "fp16/bf16", "mixed precision is memtrain's wrap(dtype=) and not wired here yet; "
                                              "train in fp32"),
        (args.world_size > 1, "world_size", "MemtrainTrainer runs one process; launch without torchrun/accelerate"),
        (args.gradient_checkpointing, "gradient_checkpointing",
         "memtrain chooses recompute per block; set memory={'activations': 'recompute'} instead"),
        (str(args.eval_strategy) not in ("no", "IntervalStrategy.NO"), "eval_strategy",
         "evaluation during training is not supported yet; evaluate after train()"),
    ]
    for bad, field, fix in refuse:
        if bad:
            raise UserError(f"TrainingArguments.{field}: {fix}")
    optimizer = {"name": "adamw", "lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2),
                 "eps": args.adam_epsilon, "weight_decay": args.weight_decay}
    if args.weight_decay and decay is not None:
        optimizer["param_groups"] = [{"params": decay[0], "weight_decay": args.weight_decay},
                                     {"params": decay[1], "weight_decay": 0.0}]
    return optimizer


def _decay_groups(trainer: transformers.Trainer) -> tuple[list[str], list[str]]:
    """The names the Trainer's ``create_optimizer`` puts in its decay and no-decay groups (in
    ``named_parameters`` order), from its own ``get_decay_parameter_names``."""
    decay = set(trainer.get_decay_parameter_names(trainer.model))
    named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    return [n for n, _ in named if n in decay], [n for n, _ in named if n not in decay]


class _EngineOptimizer(torch.optim.Optimizer):
    """The Trainer's optimizer: a parameter group per engine group (so the scheduler's state is
    the plain Trainer's), each carrying the learning rate the scheduler sets; ``step`` runs the
    engine's step with them; its state is the engine's optimizer states."""

    def __init__(self, lazy: LazyEngine, lr: float, num_groups: int = 1) -> None:
        super().__init__([{"params": [torch.zeros(0, requires_grad=True)]} for _ in range(num_groups)], {"lr": lr})
        self._lazy = lazy

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "the Trainer calls step() without a closure"
        engine = self._lazy.engine
        lrs = [float(g["lr"]) for g in self.param_groups]
        engine.set_lr(lrs[0] if len(lrs) == 1 else lrs)
        engine.step()

    def state_dict(self) -> dict[str, Any]:
        return with_group(self._lazy.optimizer_state(), self.param_groups)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if not state_dict:  # accelerate's prepare() loads back the empty state of an engine not built yet
            return
        restore_group(self.param_groups, state_dict)
        self._lazy.load({"optimizer": dict(state_dict)})


class MemtrainTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose forward, backward and optimizer step run on memtrain.

    ``memory``: wrap's ``memory=`` (``device``/``host``/``nvme`` budgets, ``offload``,
    ``activations``, ...; docs/wrap.md); ``plan``: a ``Plan`` or the path of ``memtrain plan
    --json``'s file instead of planning; ``blocks``: the model's blocks (default: embeddings,
    decoder layers, output head); ``host_kernel``: the AdamW kernel of host and NVMe chunks.
    """

    def __init__(self, *args, memory: Mapping[str, Any] | None = None, plan=None, blocks=None,
                 host_kernel: str | None = None, **kwargs) -> None:
        if kwargs.get("optimizers", (None, None)) != (None, None) or kwargs.get("optimizer_cls_and_kwargs"):
            raise UserError("MemtrainTrainer: optimizers=: memtrain runs the optimizer; set it through "
                            "TrainingArguments (optim, learning_rate, adam_beta1/2, adam_epsilon)")
        super().__init__(*args, **kwargs)
        optimizer = _check_args(self.args, _decay_groups(self))
        self._memtrain_call = StepCall(self.model, _trace)
        self._memtrain = LazyEngine(
            optimizer=optimizer, memory=memory, plan=load_plan(plan), call=self._memtrain_call,
            blocks=blocks if blocks is not None else hf_blocks(self.model), host_kernel=host_kernel, verbose=False,
            max_grad_norm=self.args.max_grad_norm or None)

    @property
    def memtrain_engine(self):
        """The engine while ``train`` runs (built at its first batch); None otherwise."""
        return self._memtrain.engine

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = len(self._memtrain.wrap_kwargs["optimizer"].get("param_groups", ())) or 1
            self.optimizer = _EngineOptimizer(self._memtrain, self.args.learning_rate, groups)
        return self.optimizer

    def _clip_grad_norm(self, model):
        """The Trainer's clip (transformers >= 5): the engine's step clips with this norm, the
        norm of every gradient before clipping, which the Trainer logs as ``grad_norm``."""
        return self._memtrain.engine.grad_norm()

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's ``grad_norm`` without clipping: the engine's gradients' global norm."""
        return self._memtrain.engine.grad_norm() if grad_norm is None else grad_norm

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:  # the trained weights go back to the model; a later train() wraps it again
            self._memtrain.close()
            self.optimizer, self.lr_scheduler = None, None

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """The Trainer's step (``compute_loss``, the loss scaled for gradient accumulation as the
        Trainer scales it) with the engine's forward and backward."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        ids = inputs["input_ids"]
        engine = self._memtrain.get(self.model, ids)

        def compute() -> torch.Tensor:
            with self.compute_loss_context_manager():
                return self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)

        loss = self._memtrain_call.run(engine, ids, compute)
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        if not scaled:
            loss = loss / self.current_gradient_accumulation_steps
        engine.backward(loss)
        return loss.detach()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # As the DeepSpeed path of save_model: the weights come from the engine (every tier).
        if state_dict is None and self._memtrain.built:
            state_dict = self._memtrain.engine.model_state_dict()
        super()._save(output_dir, state_dict=state_dict)
