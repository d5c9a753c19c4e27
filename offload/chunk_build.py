"""Building a chunk store and reading its parameters back: the plan's chunks checked against the
model, each chunk's memory on its home filled with the parameters, the chunks each block uses;
the fp32 master parameters gathered by name and loaded. ``store`` is an ``offload.chunks.ChunkStore``
(not imported: the store imports this module)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import torch
from torch import nn

from memtrain.offload.chunk_layout import Chunk, ParamSlot
from memtrain.planner.plan import ChunkPlan, Tier

__all__ = ["lay_out", "fill_chunk", "gather_flat", "block_uses", "gather_params", "load_params"]


def lay_out(model: nn.Module, plans: Sequence[ChunkPlan]) -> tuple[list[Chunk], dict[int, int]]:
    """The chunks of ``plans`` over ``model``'s parameters (nothing moved yet) and, by parameter
    id, the chunk holding it; a plan that does not fit the model is a ValueError naming it."""
    by_name = dict(model.named_parameters())
    placed: dict[int, int] = {}
    layout: list[Chunk] = []
    for pos, plan in enumerate(plans):
        if plan.index != pos:
            raise ValueError(f"memory.chunks: chunk at position {pos} has index {plan.index}; indices must be 0..n-1 in order")
        slots, offset = [], 0
        for name in plan.param_names:
            p = by_name.get(name)
            if p is None:
                raise ValueError(f"memory.chunks[{pos}]: no parameter {name!r} in the model; re-plan for this model")
            if id(p) in placed:
                raise ValueError(f"memory.chunks[{pos}]: parameter {name!r} is already in chunk {placed[id(p)]}")
            if not p.requires_grad:
                raise ValueError(f"parameter {name!r} has requires_grad=False; memtrain trains every parameter of the wrapped blocks")
            placed[id(p)] = pos
            slots.append(ParamSlot(name=name, param=p, offset=offset, numel=p.numel(), shape=p.shape))
            offset += p.numel()
        if offset != plan.num_elems:
            raise ValueError(f"memory.chunks[{pos}]: num_elems {plan.num_elems} but its parameters hold {offset}; re-plan")
        layout.append(Chunk(index=pos, home=plan.home, num_elems=offset, slots=slots))
    missing = [n for n, p in by_name.items() if id(p) not in placed]
    if missing:
        raise ValueError(f"memory.chunks: parameter {missing[0]!r} is in no chunk; re-plan for this model")
    return layout, placed


def block_uses(model: nn.Module, blocks: Sequence[tuple[str, nn.Module]], placed: dict[int, int]):
    """(per block, the chunks holding its parameters; the modules outside every block that own
    parameters, with their chunks). [Note: loose parameters] Such a module fetches its chunks when
    it runs; they count as the last block's, so they are released with its."""
    uses = [tuple(sorted({placed[id(p)] for p in block.parameters()})) for _, block in blocks]
    in_blocks = {id(p) for _, block in blocks for p in block.parameters()}
    loose_mods: list[tuple[nn.Module, tuple[int, ...]]] = []
    for mod in model.modules():
        loose = tuple(sorted({placed[id(p)] for p in mod.parameters(recurse=False) if id(p) not in in_blocks}))
        if loose:
            uses[-1] = tuple(sorted(set(uses[-1]) | set(loose)))
            loose_mods.append((mod, loose))
    return uses, loose_mods


def gather_flat(chunk: Chunk, out: torch.Tensor) -> None:
    """Copy ``chunk``'s parameters, flattened in slot order, into ``out``."""
    for s in chunk.slots:
        out[s.offset:s.offset + s.numel].copy_(s.param.detach().reshape(-1))


def fill_chunk(store, c: Chunk) -> None:
    """Allocate ``c``'s memory on its home (bytes and owners: docs/memory-accounting.md), copy its
    parameters in (an nvme chunk's go to its files through host staging) and point each
    parameter at the device copy, or at the released placeholder ([Note: released parameters])."""
    n_state = len(store.state_names)
    n, cd, owner = c.num_elems, store.compute_dtype, f"chunk:{c.index}"
    if c.home is Tier.DEVICE:
        c.compute = store._alloc(store.device_ledger, owner, n, cd)
        gather_flat(c, c.compute)
        c.master = c.compute
        if store.mixed:
            c.master = store._alloc(store.device_ledger, owner, n, torch.float32)
            gather_flat(c, c.master)
        c.grad = store._alloc(store.device_ledger, owner, n, torch.float32, zero=True)  # offload.grads [Note: fp32 accumulators]
        c.states = {k: store._alloc(store.device_ledger, owner, n, torch.float32, zero=True) for k in store.state_names}
        store._by_ptr[c.compute.untyped_storage().data_ptr()] = c.index
        for s in c.slots:
            s.param.data = c.compute[s.offset:s.offset + s.numel].view(s.shape)
            s.param.grad = None
        return
    if c.home is Tier.HOST:
        c.master = store._alloc(store.host_ledger, owner, n, torch.float32)
        gather_flat(c, c.master)
        c.grad = store._alloc(store.host_ledger, owner, n, torch.float32, zero=True)
        c.states = {k: store._alloc(store.host_ledger, owner, n, torch.float32, zero=True) for k in store.state_names}
        if store.mixed:
            c.compute = store._alloc(store.host_ledger, owner, n, cd)
            c.compute.copy_(c.master)
    else:
        staging = f"staging:{c.index}"
        master = store._alloc(store.host_ledger, staging, n, torch.float32)
        gather_flat(c, master)
        zeros = store._alloc(store.host_ledger, staging, n, torch.float32, zero=True) if n_state else None
        futs = [store.nvme.write(store.nvme_key(c, "master"), master)]
        futs += [store.nvme.write(store.nvme_key(c, k), zeros) for k in store.state_names]
        compute = None
        if store.mixed:
            compute = store._alloc(store.host_ledger, staging, n, cd)
            compute.copy_(master)
            futs.append(store.nvme.write(store.nvme_key(c, "compute"), compute))
        for f in futs:
            f.result()
        for t in (master, zeros, compute):
            if t is not None:
                store._free(store.host_ledger, staging, t)
    for s in c.slots:
        s.param.data = store.placeholder.expand(s.shape)
        s.param.grad = None


def gather_params(store) -> dict[str, torch.Tensor]:
    """fp32 master parameters by name, on the CPU, whichever tier holds them."""
    out = {}
    for c in store.chunks:
        flat = store._read(c, "master")
        for s in c.slots:
            out[s.name] = flat[s.offset:s.offset + s.numel].view(s.shape).clone()
    return out


def load_params(store, params: Mapping[str, torch.Tensor]) -> None:
    """Replace every chunk's master parameters with ``params`` (by name; all of them); a resident
    param buffer is released, so the next use fetches the new values."""
    for c in store.chunks:
        flat = store._read(c, "master")
        for s in c.slots:
            v = params.get(s.name)
            if v is None:
                raise ValueError(f"state_dict: parameter {s.name!r} is missing; pass a full state dict")
            if tuple(v.shape) != tuple(s.shape):
                raise ValueError(f"state_dict: {s.name!r} has shape {tuple(v.shape)}, the model's is {tuple(s.shape)}")
            flat[s.offset:s.offset + s.numel].copy_(v.detach().reshape(-1))
        store._write(c, "master", flat)
        if c.home is not Tier.DEVICE and c.buf is not None:
            store._release(c)
