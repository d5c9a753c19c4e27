"""How a model's parameters are laid out into chunks: blocks, execution order, chunk plans.

Pure functions over an ``nn.Module`` (no memory is moved here); ``offload.chunks.ChunkStore``
builds the chunks these describe, as the records at the end of this file. [Note: loose
parameters] is in this file; the notes the records cite are in offload.chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memtrain.errors import UserError
from memtrain.planner.plan import ChunkPlan, Tier, pack_params
from memtrain.planner.stats import DType

__all__ = [
    "ParamRef", "ParamSlot", "Chunk", "named_blocks", "block_param_order", "param_order", "make_chunk_plans",
    "torch_dtype",
]

_TORCH_DTYPES = {DType.FP32: torch.float32, DType.BF16: torch.bfloat16, DType.FP16: torch.float16}


def torch_dtype(dtype: DType | str) -> torch.dtype:
    try:
        return _TORCH_DTYPES[DType(dtype)]
    except ValueError:
        raise ValueError(f"dtype: must be 'fp32', 'bf16' or 'fp16', got {dtype!r}") from None


def named_blocks(model: nn.Module, blocks: Sequence[nn.Module] | Sequence[tuple[str, nn.Module]] | None) -> list[tuple[str, nn.Module]]:
    """``[(label, block), ...]``; default ``model.blocks``. A block given without a label is
    labelled with its path inside ``model``; a given label is any unique text (everything else
    finds a block by the module itself, never by its label)."""
    if blocks is None:
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            raise UserError("blocks: the model has no .blocks; pass blocks=[module, ...] in execution order")
    paths = {id(m): name for name, m in model.named_modules()}
    out: list[tuple[str, nn.Module]] = []
    for item in blocks:
        if isinstance(item, tuple):
            if len(item) != 2 or not isinstance(item[0], str) or not item[0]:
                raise UserError(f"blocks: {_show(item)} is not a (label, module) pair with a non-empty text label")
            name, mod = item
        else:
            name, mod = paths.get(id(item)), item
        if not isinstance(mod, nn.Module) or id(mod) not in paths:
            raise UserError(f"blocks: {_show(name or mod)} is not a submodule of the model; pass the model's own blocks")
        out.append((name or paths[id(mod)], mod))
    if not out:
        raise UserError("blocks: empty; pass the model's blocks in execution order")
    for kind, keys in (("label", [n for n, _ in out]), ("module", [id(m) for _, m in out])):
        seen = set()
        for (name, _), key in zip(out, keys):
            if key in seen:
                raise UserError(f"blocks: {kind} of block {name!r} appears twice; give each block once, with its own label")
            seen.add(key)
    return out


def _show(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def block_param_order(model: nn.Module, blocks: Sequence[tuple[str, nn.Module]]) -> list[list[tuple[str, int]]]:
    """Per block, ``[(name, numel), ...]`` in execution order: each block's parameters in
    registration order, a tied parameter at its first block, under ``model.named_parameters()``'s
    name. [Note: loose parameters] A parameter outside every block (an HF model's final norm)
    counts with the last block, as planner.analyze attributes it when no block is running."""
    names = {id(p): n for n, p in model.named_parameters()}
    seen: set[int] = set()
    out: list[list[tuple[str, int]]] = []
    for _, block in blocks:
        group = []
        for p in block.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                group.append((names[id(p)], p.numel()))
        out.append(group)
    out[-1].extend((n, p.numel()) for n, p in model.named_parameters() if id(p) not in seen)
    return out


def param_order(model: nn.Module, blocks: Sequence[tuple[str, nn.Module]]) -> list[tuple[str, int]]:
    """``block_param_order`` flattened: ``[(name, numel), ...]`` in execution order."""
    return [p for group in block_param_order(model, blocks) for p in group]


def make_chunk_plans(params: Sequence[tuple[str, int]] | Sequence[Sequence[tuple[str, int]]], chunk_size_elems: int,
                     homes: Tier | str | Sequence[Tier | str]) -> tuple[ChunkPlan, ...]:
    """Pack ``params`` with the planner's rule (``planner.plan.pack_params``): grouped by block
    (``block_param_order``, the planner's chunks: blocks never straddle chunks needlessly) or flat
    (``param_order``: parameters packed one by one). ``homes`` is one tier for all chunks or one
    per chunk."""
    packed = pack_params(params, chunk_size_elems)
    if isinstance(homes, (str, Tier)):
        homes = [homes] * len(packed)
    if len(homes) != len(packed):
        raise ValueError(f"homes: {len(homes)} given for {len(packed)} chunks")
    return tuple(ChunkPlan(index=i, num_elems=n, param_names=tuple(names), home=Tier(h))
                 for i, ((names, n), h) in enumerate(zip(packed, homes)))


# --- the chunk store's records (offload.chunks.ChunkStore builds and moves them) -------------


@dataclass(frozen=True, slots=True)
class ParamRef:
    """A saved view of chunk memory: see [Note: saved views of parameters]."""

    chunk: int
    offset: int
    """Elements from the start of the chunk's flat buffer."""
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(kw_only=True, slots=True)
class ParamSlot:
    name: str
    """The parameter's name in ``model.named_parameters()``."""
    param: nn.Parameter
    offset: int
    """First element of the parameter in the chunk's flat buffers."""
    numel: int
    shape: torch.Size


@dataclass(kw_only=True, slots=True)
class Chunk:
    index: int
    home: Tier
    num_elems: int
    slots: list[ParamSlot]
    master: torch.Tensor | None = None
    """fp32 master parameters on the home tier (None for nvme: on disk)."""
    compute: torch.Tensor | None = None
    """Compute-dtype copy on the home tier: the parameters' memory for device chunks (the master
    itself in fp32); the copy fetched from for mixed-precision host chunks; else None."""
    grad: torch.Tensor | None = None
    """Accumulated gradients of this step, fp32 on every tier (offload.grads [Note: fp32
    accumulators]): device chunks on the device; host and nvme chunks on the host (nvme: only from
    the first flush to the step's end)."""
    states: dict[str, torch.Tensor] = field(default_factory=dict)
    """Optimizer states on the home tier (empty for nvme: on disk)."""
    step: torch.Tensor = field(default_factory=lambda: torch.tensor(0.0))
    """Optimizer steps taken (torch keeps this per parameter; here all of a chunk step together)."""
    buf: torch.Tensor | None = None
    """Device param buffer while resident (non-device homes)."""
    grad_buf: torch.Tensor | None = None
    """Device grad buffer of the current micro-batch (non-device homes)."""
    fetch: Any = None
    """Handle of the fetch in flight, if any."""
    has_grad: bool = False
    mb_seen: set[int] = field(default_factory=set)
    step_seen: set[int] = field(default_factory=set)

    @property
    def memory(self) -> torch.Tensor | None:
        """The flat tensor the parameters point into now (None when released)."""
        return self.compute if self.home is Tier.DEVICE else (self.buf if self.fetch is None else None)
