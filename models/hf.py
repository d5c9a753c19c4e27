"""The ``hf`` model source: a causal LM from a Hugging Face config, built without downloading.

Blocks are the input embedding, each decoder layer (the model's largest ``nn.ModuleList``) and
the output embedding as the head. Modules outside those (GPT-2's position table and dropout,
the final norm, Llama's rotary table) run between blocks; planner.analyze gives their work and
parameters to the block running at the time, and the final norm to the head.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

import torch
from torch import nn

from memtrain.models.built import BuiltModel, first_names
from memtrain.config import ConfigError, ModelConfig

__all__ = ["build_hf", "decoder_layers"]


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ConfigError(
            "model.source 'hf' needs the transformers package; pip install memtrain[hf] "
            "(or pip install transformers)"
        ) from e
    return transformers


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder layers: its longest ``nn.ModuleList`` (ties broken by parameter count)."""
    best: tuple[int, int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod):
            key = (len(mod), sum(p.numel() for p in mod.parameters()))
            if best is None or key > best[:2]:
                best = (*key, name, mod)
    if best is None:
        raise ConfigError(f"model.hf_config: {type(model).__name__} has no nn.ModuleList of layers to split into blocks")
    return best[2], best[3]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def build_hf(cfg: ModelConfig, *, max_seq_len: int | None = None) -> BuiltModel:
    """``AutoConfig.for_model(**cfg.hf_config)`` + ``AutoModelForCausalLM.from_config`` on the
    current default device."""
    transformers = _import_transformers()
    hf_config = dict(cfg.hf_config)
    model_type = hf_config.pop("model_type")
    # [Note: transformers' refusals] transformers checks a config with exceptions of many kinds
    # (ValueError, TypeError, huggingface_hub's StrictDataclassError, torch's RuntimeError for a
    # negative size): each is the config's fault here, so each becomes the field's message.
    try:
        config = transformers.AutoConfig.for_model(model_type, **hf_config)
    except Exception as e:
        raise ConfigError(f"model.hf_config: transformers rejected it ({_one_line(e)}); fix model_type or the fields") from e
    positions = getattr(config, "max_position_embeddings", None)
    if max_seq_len is not None and isinstance(positions, int) and max_seq_len > positions:
        raise ConfigError(
            f"train.seq_len ({max_seq_len}) exceeds the model's max_position_embeddings ({positions}); "
            f"lower train.seq_len or set model.hf_config.max_position_embeddings: {max_seq_len}"
        )
    try:
        model = transformers.AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise ConfigError(f"model.hf_config: {model_type!r} has no causal-LM model in transformers ({_one_line(e)})") from e
        raise ConfigError(f"model.hf_config: transformers cannot build {model_type!r} from it ({_one_line(e)}); fix the fields") from e
    except MemoryError:
        raise
    except Exception as e:  # [Note: transformers' refusals]
        raise ConfigError(f"model.hf_config: transformers cannot build {model_type!r} from it "
                          f"({type(e).__name__}: {_one_line(e)}); fix the fields") from e

    names = first_names(model)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is None or head is None or id(embed) not in names or id(head) not in names:
        raise ConfigError(f"model.hf_config: {type(model).__name__} lacks input/output embeddings; use a causal LM type")
    layers_name, layers = decoder_layers(model)
    blocks = (
        (names[id(embed)], embed),
        *((f"{layers_name}.{i}", layer) for i, layer in enumerate(layers)),
        (names[id(head)], head),
    )
    return BuiltModel(
        name=f"hf-{model_type}",
        module=model,
        blocks=blocks,
        vocab_size=int(config.vocab_size),
        call=_call_causal_lm,
    )


def _call_causal_lm(model: nn.Module, input_ids: torch.Tensor) -> Any:
    if input_ids.device.type != "meta":
        return model(input_ids=input_ids, use_cache=False)
    with _plain_batches_on_meta():
        return model(input_ids=input_ids, use_cache=False)


@contextlib.contextmanager
def _plain_batches_on_meta() -> Iterator[None]:
    """Let a meta-device forward pass transformers' packed-sequence check.

    With no attention mask, transformers looks at ``position_ids`` to see whether several
    sequences are packed into one row, reading tensor values (``.all()``), which meta tensors
    do not have. Our batches hold one sequence per row, which is what the check concludes on
    real ids, so on meta it is answered directly. Versions without the check are unaffected.
    """
    masking = sys.modules.get("transformers.masking_utils")
    original = getattr(masking, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return
    masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = original
