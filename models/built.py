"""A model split into blocks (``BuiltModel``) and the helpers every model source uses to build one.

The sources (``models.source`` for ``gpt`` and ``python``, ``models.hf`` for Hugging Face
configs) each import this module; it imports neither of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from memtrain.models.gpt import causal_lm_loss

__all__ = ["BuiltModel", "LossFn", "first_tensor", "first_names"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The primary tensor of a module's output or input: the tensor itself, ``.logits`` /
    ``.last_hidden_state`` of a Hugging Face output, or the first tensor of a tuple/list."""
    if isinstance(obj, torch.Tensor):
        return obj
    for attr in ("logits", "last_hidden_state"):
        value = getattr(obj, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(obj, (tuple, list)):
        for item in obj:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def first_names(module: nn.Module) -> dict[int, str]:
    """id(submodule) → its first fully qualified name (a module registered twice keeps the first)."""
    names: dict[int, str] = {}
    for name, sub in module.named_modules(remove_duplicate=False):
        if name:
            names.setdefault(id(sub), name)
    return names


def _logits_of(output: Any) -> torch.Tensor:
    logits = first_tensor(output)
    if logits is None:
        raise ValueError(f"model.factory: the model's forward returned {type(output).__name__}; "
                         "return the logits tensor (or an object with .logits)")
    return logits


@dataclass(kw_only=True, slots=True)
class BuiltModel:
    """A model and its blocks, ready for analysis, profiling or training."""

    name: str
    """Model name for reports (``gpt-125m``, ``hf-llama``, the factory path)."""
    module: nn.Module
    """The whole model; ``forward(input_ids)`` runs it."""
    blocks: tuple[tuple[str, nn.Module], ...]
    """Fully qualified module names and modules in execution order: embedding, each layer, head.
    Parameters outside every block belong to the block running when they are first used, else to
    the last block (planner.analyze)."""
    vocab_size: int
    """Token ids are in ``[0, vocab_size)``."""
    loss_fn: LossFn = causal_lm_loss
    """``loss_fn(logits, labels) -> scalar``; labels are already shifted by one."""
    call: Callable[[nn.Module, torch.Tensor], Any] | None = None
    """How to run ``module`` on input ids (HF: keyword arguments, no KV cache); None means
    ``module(input_ids)``."""
    output: Callable[[Any], Any] = _logits_of
    """What ``forward`` returns of the module's output, for ``loss_fn``: the logits by default;
    ``wrap()`` passes the output on as it is, since its ``loss_fn`` reads that."""

    def forward(self, input_ids: torch.Tensor, module: nn.Module | None = None) -> Any:
        """``output`` of the module's output: logits of shape (batch, seq_len, vocab_size) by default.
        ``module``: run this module (a wrapped copy of ``self.module``) the same way instead."""
        module = self.module if module is None else module
        return self.output(module(input_ids) if self.call is None else self.call(module, input_ids))

    def make_batch(
        self, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded random tokens ``(input_ids, labels)`` with ``labels[:, t] = input_ids[:, t+1]``
        (the last label is the token after the window), on the generator's device."""
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"make_batch: batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        seq = torch.randint(0, self.vocab_size, (batch_size, seq_len + 1), generator=generator,
                            device=generator.device)
        return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
