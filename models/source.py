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
from typing import Any, Callable

from torch import nn

from memtrain.config import ConfigError, ModelConfig
from memtrain.models.built import BuiltModel, LossFn, first_names
from memtrain.models.gpt import GPT, causal_lm_loss, gpt_config

__all__ = ["build_model"]


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
