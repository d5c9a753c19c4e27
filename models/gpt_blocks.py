"""Some blocks of a built-in GPT, with the values the whole model gets under the same seed.

A pipeline worker needs only its stages' blocks. ``build_blocks`` makes the model on the meta
device (its structure, no memory), then replays the random draws ``GPT.__init__`` makes on the
CPU generator, in its order, one module at a time, and keeps the values of the requested
blocks only: each parameter equals the whole model's bit for bit, and the memory is those
blocks plus the largest single module of the others.

``GPT.__init__`` draws twice per ``nn.Linear``/``nn.Embedding``, in the order they are
registered (a block's modules in order, blocks in order): first their own initialisation at
construction (``reset_parameters``: Kaiming-uniform weights and uniform biases for a linear
layer, a standard normal table for an embedding), then ``GPT._init`` (``apply``: children
first, which visits them in the same order) redraws every weight from N(0, 0.02) and zeroes
every bias. With tied embeddings the head's ``lm_head.weight`` is the embedding's table, so the
table's final value is the head's redraw. Norms are ones (and zero biases); nothing else draws.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from memtrain.models.gpt import GPT, GPTConfig, RMSNorm

__all__ = ["build_blocks", "TIED_NAMES", "param_names", "global_names"]

TIED_NAMES = ("wte.weight", "lm_head.weight")
"""With ``tie_embeddings``: the names, in the first and in the last block, of the one table."""


def _leaves(model: GPT) -> list[tuple[int, nn.Module]]:
    """Every linear layer and embedding with its block's index, in registration order."""
    return [(i, m) for i, block in enumerate(model.blocks) for m in block.modules()
            if isinstance(m, (nn.Linear, nn.Embedding))]


def _construction_draw(m: nn.Module) -> None:
    """The draws ``m``'s constructor made, on a throwaway module of its shape."""
    if isinstance(m, nn.Linear):
        nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    else:
        nn.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx)


def build_blocks(cfg: GPTConfig, keep: Collection[int], seed: int) -> dict[int, nn.Module]:
    """Blocks ``keep`` (0: the embedding, 1..L: the layers, L+1: the head) of ``GPT(cfg)`` built
    after ``torch.manual_seed(seed)``, on the CPU, in training mode; the others are never made.
    Kept blocks share what the whole model shares (the tied table when both ends are kept)."""
    keep = set(keep)
    with torch.device("meta"):
        meta = GPT(cfg)  # meta tensors: no draw, no memory
    n = len(meta.blocks)
    if not keep <= set(range(n)):
        raise ValueError(f"keep: block indices in 0..{n - 1}, got {sorted(keep)}")
    if any(True for _ in meta.buffers()):
        raise AssertionError("GPT gained a buffer: build_blocks must initialise it")
    leaves = _leaves(meta)
    torch.manual_seed(seed)
    for _, m in leaves:  # the constructors' draws, in order
        _construction_draw(m)
    values: dict[int, torch.Tensor] = {}  # id(meta weight) -> its final value, for kept blocks
    for i, m in leaves:  # GPT._init's redraws, in order (a tied table: the head's wins)
        w = torch.empty(m.weight.shape)
        nn.init.normal_(w, mean=0.0, std=0.02)
        if i in keep or (id(m.weight) in values):
            values[id(m.weight)] = w
    out: dict[int, nn.Module] = {}
    for i in sorted(keep):
        block = meta.blocks[i]
        weights = {name: id(p) for name, p in block.named_parameters(remove_duplicate=False)}
        block.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in block.named_parameters(remove_duplicate=False):
                owner = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
                if weights[name] in values and name.endswith("weight") and isinstance(owner, (nn.Linear, nn.Embedding)):
                    p.copy_(values[weights[name]])
                elif isinstance(owner, (nn.LayerNorm, RMSNorm)) and name.endswith("weight"):
                    p.fill_(1.0)
                else:  # biases of linear layers and norms
                    p.zero_()
        block.train()
        out[i] = block
    last = n - 1
    if cfg.tie_embeddings and 0 in out and last in out:
        out[last].lm_head.weight = out[0].wte.weight
    return out


def param_names(cfg: GPTConfig) -> tuple[str, ...]:
    """The parameters of ``GPT(cfg)`` by name, in ``model.parameters()`` order (a tied table once,
    as the embedding's ``blocks.0.wte.weight``): the order one process clips them in, and the
    names its ``optimizer.param_groups`` use. Built on the meta device."""
    with torch.device("meta"):
        meta = GPT(cfg)
    return tuple(n for n, _ in meta.named_parameters())


def global_names(blocks: dict[int, nn.Module], cfg: GPTConfig) -> dict[int, str]:
    """Per parameter of ``blocks`` (``build_blocks``'s; by ``id``), its name in the whole model
    (``param_names``): block ``i``'s ``name`` is ``blocks.<i>.<name>``, and the head's copy of a
    tied table, on another rank than the embedding, is named as the table
    (``blocks.0.wte.weight``)."""
    last = cfg.num_layers + 1
    out: dict[int, str] = {}
    for i in sorted(blocks):
        for name, q in blocks[i].named_parameters():
            if id(q) not in out:
                out[id(q)] = f"blocks.0.{TIED_NAMES[0]}" if cfg.tie_embeddings and i == last and name == TIED_NAMES[1] \
                    else f"blocks.{i}.{name}"
    return out
