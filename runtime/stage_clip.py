"""Gradient clipping by the global norm across a pipeline's ranks (the program's ``CLIP``).

[Note: the global norm of a pipeline] One process clips as ``torch.nn.utils.clip_grad_norm_``
does (offload.clip [Note: the norm of the chunks]): each parameter's gradient norm
(``torch._foreach_norm``), then the 2-norm of those norms stacked in ``model.parameters()``
order, and every gradient multiplied by ``clamp(max_norm / (total + 1e-6), max=1)``. A pipeline
rank holds some stages' parameters only, so at its ``CLIP`` (after every ``ALLREDUCE`` of its
stages: the gradients are the step's sums) each rank computes its parameters' norms with the
same kernels, every rank all-gathers every other's (one collective over the world, with the
run's timeout), and each stacks them in the whole model's order (``models.gpt_blocks
.param_names``) and takes the same ``vector_norm``: every rank gets the one-process total bit for
bit, and the same coefficient.

A parameter appears once: the head's copy of a tied table on another rank is left out (its
gradient is the table's after the tied all-reduce, and is scaled all the same), and with data
parallelism every replica's norms are the same numbers (the all-reduce gives every replica the
same sums), of which the first replica's is taken. Under ZeRO a device stage's replica holds only
its shard of the summed gradients (runtime.stage_zero): a parameter wholly inside one shard has
its norm as above, one cut between shards sends each piece's sum of squares in fp64 and its norm
is the square root of their sum, rounded to fp32 (not torch's fp32 reduction: within a few ulps
of it, test_pipeline_clip.py states the tolerance). The exchange carries fp64, so a norm (fp32)
goes through exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from memtrain.comm import all_gather
from memtrain.offload.clip import clip_coefficient
from memtrain.runtime.stage_zero import ShardedOptimizer

__all__ = ["WHOLE", "PIECE", "local_norms", "combine", "global_norm", "exchange_and_clip", "clip_rank"]

WHOLE, PIECE = 1.0, 2.0
"""What a rank's entry for a parameter is: its whole gradient's norm, or a shard's piece's sum of
squares (0: the rank has nothing of it)."""


def local_norms(entries: Sequence[tuple[int, torch.Tensor, bool]], num_params: int) -> torch.Tensor:
    """A rank's part of the exchange: a (2, ``num_params``) fp64 CPU tensor, row 0 the values and
    row 1 their kind, from ``entries`` (global index, gradient or piece of one, whether it is the
    whole gradient). Whole gradients' norms come from ``torch._foreach_norm``, grouped by device
    and dtype as torch groups them, in the entries' order."""
    out = torch.zeros(2, num_params, dtype=torch.float64)
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[int, torch.Tensor]]] = {}
    for j, g, w in entries:
        if w:
            groups.setdefault((g.device, g.dtype), []).append((j, g))
    for items in groups.values():  # one copy to the host per group (fp32 -> fp64 is exact)
        norms = torch.stack(torch._foreach_norm([g for _, g in items], 2.0)).to("cpu", torch.float64)
        idx = torch.tensor([j for j, _ in items])
        out[0, idx], out[1, idx] = norms, WHOLE
    pieces = [(j, g) for j, g, w in entries if not w]
    if pieces:
        sums = torch.stack([g.detach().double().pow(2).sum().cpu() for _, g in pieces])
        for (j, _), v in zip(pieces, sums):
            out[0, j] += v
            out[1, j] = PIECE
    return out


def combine(gathered: torch.Tensor) -> torch.Tensor:
    """Every rank's ``local_norms`` stacked (ranks × 2 × parameters) → the per-parameter norms in
    the whole model's order, fp32, of the parameters some rank has a gradient of: a whole
    gradient's norm from the first rank that has it, else the square root of the pieces' sum of
    squares."""
    values, kinds = gathered[:, 0, :], gathered[:, 1, :]
    out: list[float] = []
    for j in range(values.shape[1]):
        whole = (kinds[:, j] == WHOLE).nonzero()
        if len(whole):
            out.append(float(values[whole[0, 0], j]))
        elif bool((kinds[:, j] == PIECE).any()):
            out.append(float(values[kinds[:, j] == PIECE, j].sum().sqrt()))
    return torch.tensor(out, dtype=torch.float32)


def global_norm(norms: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """torch's total: ``vector_norm`` of the per-parameter norms stacked, on ``device`` (the
    first gradient's, as torch takes it)."""
    if norms.numel() == 0:
        return torch.tensor(0.0, device=device)
    return torch.linalg.vector_norm(norms.to(device), 2.0)


def exchange_and_clip(entries: Sequence[tuple[int, torch.Tensor, bool]], num_params: int, max_norm: float | None,
                      *, device: torch.device, group: dist.ProcessGroup | None, rank: int, what: str,
                      timeout_s: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[Note: the global norm of a pipeline] This rank's ``entries`` exchanged with every rank of
    ``group`` (None: the world); returns the global norm and the coefficient to multiply the
    gradients by (None: no clipping, ``max_norm`` None)."""
    mine = local_norms(entries, num_params)
    whole = all_gather(mine.reshape(1, 2, num_params), group, rank=rank, what=what, timeout_s=timeout_s)
    total = global_norm(combine(whole), device)
    return total, (clip_coefficient(max_norm, total) if max_norm is not None else None)


def clip_rank(worker: Any, what: str) -> float:
    """A ``StageWorker``'s ``CLIP``: its stages' parameters' gradients (a ZeRO stage's pieces of
    its shard, runtime.stage_zero ``grad_pieces``) by their index in the whole model, in that
    order as torch lists them, exchanged over the world; every gradient it holds, a tied copy's
    too, multiplied by the coefficient (``PipelineSpec.max_grad_norm``; None: measured only).
    Returns the global norm before clipping."""
    entries: list[tuple[int, torch.Tensor, bool]] = []
    for s in worker.stages:
        opt = worker.optims.get(s)
        reducer = worker.offloaded[s].reducer if s in worker.offloaded else None
        if reducer is not None:  # ZeRO-2 of an offloaded stage: its own chunks' sums, whole parameters
            entries += [(worker.gindex[id(q)], g, True) for q, g in reducer.entries() if id(q) in worker.gindex]
        elif isinstance(opt, ShardedOptimizer):
            entries += [(worker.gindex[id(opt.params[i])], g, whole) for i, g, whole in opt.grad_pieces()
                        if id(opt.params[i]) in worker.gindex]
        else:
            entries += [(worker.gindex[id(q)], q.grad, True) for q in worker.owns[s]
                        if q.grad is not None and id(q) in worker.gindex]
    entries.sort(key=lambda e: e[0])  # the whole model's order, as torch's list of gradients
    spec = worker.spec
    total, coef = exchange_and_clip(entries, len(worker.names), spec.max_grad_norm, device=worker.device, group=None,
                                    rank=worker.rank, what=what, timeout_s=spec.timeout_s)
    if coef is not None:
        for s in worker.stages:
            opt = worker.optims.get(s)
            if s in worker.offloaded and worker.offloaded[s].reducer is not None:
                worker.offloaded[s].reducer.scale(coef)
            elif isinstance(opt, ShardedOptimizer):
                opt.scale_grads(coef)
            else:
                for q in worker.owns[s]:
                    if q.grad is not None:
                        q.grad.mul_(coef.to(q.grad.device))
    return float(total)
