"""Model sources: turn a ``ModelConfig`` into a model split into blocks.

Three sources (docs/config.md, section ``model``):

- ``gpt``: the built-in family (``models/gpt.py``); blocks are ``blocks.0`` … ``blocks.L+1``.
- ``hf``: a Hugging Face config built with ``AutoModelForCausalLM.from_config`` (no download);
  see ``models/hf.py``.
- ``python``: ``package.module:function`` returning an ``nn.Module`` with ``.blocks``, or
  ``(module, blocks)``, or ``(module, blocks, loss_fn)``.

``build_model`` builds on the current default device: analysis wraps it in
``with torch.device("meta"):`` so no weights are allocated; the runtime builds on CPU after
``torch.manual_seed`` so every run starts from the same weights.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from memtrain.models.gpt import GPT, causal_lm_loss, gpt_config
from memtrain.config import ConfigError, ModelConfig

__all__ = ["BuiltModel", "build_model", "first_tensor", "first_names"]

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


def build_model(cfg: ModelConfig, *, max_seq_len: int | None = None) -> BuiltModel:
    """Build the model ``cfg`` names on the current default device.

    ``max_seq_len``: the longest sequence the caller will feed; a ``ConfigError`` says how to fix
    a model whose position table is shorter (rotary models have no such limit).
    """
    if cfg.source == "gpt":
        return _build_gpt(cfg, max_seq_len)
    if cfg.source == "hf":
        from memtrain.models.hf import build_hf

        return build_hf(cfg, max_seq_len=max_seq_len)
    if cfg.source == "python":
        return _build_python(cfg)
    raise ConfigError(f"model.source: must be 'gpt', 'hf' or 'python', got {cfg.source!r}")


def _build_gpt(cfg: ModelConfig, max_seq_len: int | None) -> BuiltModel:
    gcfg = gpt_config(cfg.preset, **cfg.overrides)
    if max_seq_len is not None and gcfg.position == "learned" and max_seq_len > gcfg.max_seq_len:
        raise ConfigError(
            f"train.seq_len ({max_seq_len}) exceeds the model's learned position table ({gcfg.max_seq_len}); "
            f"lower train.seq_len or set model.overrides.max_seq_len: {max_seq_len}"
        )
    model = GPT(gcfg)
    name = f"gpt-{cfg.preset}"
    if cfg.overrides:
        name += "(" + ",".join(f"{k}={v}" for k, v in sorted(cfg.overrides.items())) + ")"
    blocks = tuple((f"blocks.{i}", blk) for i, blk in enumerate(model.blocks))
    return BuiltModel(name=name, module=model, blocks=blocks, vocab_size=gcfg.vocab_size)


def _resolve_factory(path: str) -> Callable[[], Any]:
    module_name, sep, func_name = path.partition(":")
    if not sep or not module_name or not func_name:
        raise ConfigError(f"model.factory: write 'package.module:function', got {path!r}")
    try:
        mod = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"model.factory: cannot import module {module_name!r} ({e}); install it or add its folder to PYTHONPATH"
        ) from e
    func = getattr(mod, func_name, None)
    if func is None:
        raise ConfigError(f"model.factory: module {module_name!r} has no {func_name!r}; check the function name")
    if not callable(func):
        raise ConfigError(f"model.factory: {path!r} is a {type(func).__name__}, not a function; name a function")
    return func


def _build_python(cfg: ModelConfig) -> BuiltModel:
    result = _resolve_factory(cfg.factory)()
    shape_hint = "return an nn.Module with .blocks, (module, blocks) or (module, blocks, loss_fn)"
    loss_fn: LossFn = causal_lm_loss
    if isinstance(result, nn.Module):
        module, blocks = result, getattr(result, "blocks", None)
        if blocks is None:
            raise ConfigError(f"model.factory: {cfg.factory} returned a {type(result).__name__} without .blocks; {shape_hint}")
    elif isinstance(result, tuple) and len(result) in (2, 3) and isinstance(result[0], nn.Module):
        module, blocks = result[0], result[1]
        if len(result) == 3:
            if not callable(result[2]):
                raise ConfigError(f"model.factory: the loss_fn {cfg.factory} returned is not callable; {shape_hint}")
            loss_fn = result[2]
    else:
        raise ConfigError(f"model.factory: {cfg.factory} returned {type(result).__name__}; {shape_hint}")
    if not isinstance(blocks, (nn.ModuleList, list, tuple)) or not blocks or not all(isinstance(b, nn.Module) for b in blocks):
        raise ConfigError(f"model.factory: blocks must be a non-empty nn.ModuleList or list of modules; {shape_hint}")
    names = first_names(module)
    named = []
    for i, blk in enumerate(blocks):
        if id(blk) not in names:
            raise ConfigError(f"model.factory: block {i} ({type(blk).__name__}) is not a submodule of the model; "
                              "register the blocks as attributes of the returned module")
        named.append((names[id(blk)], blk))
    return BuiltModel(name=cfg.factory, module=module, blocks=tuple(named), vocab_size=_vocab_size(module, cfg.factory),
                      loss_fn=loss_fn)


def _vocab_size(module: nn.Module, where: str) -> int:
    for obj in (module, getattr(module, "config", None), getattr(module, "cfg", None)):
        value = getattr(obj, "vocab_size", None) if obj is not None else None
        if isinstance(value, int) and value > 0:
            return value
    for m in module.modules():
        if isinstance(m, nn.Embedding):
            return m.num_embeddings
    raise ConfigError(f"model.factory: cannot tell the vocabulary size of {where}; give the module a vocab_size attribute")
