"""runtime.stage_offload_zero's ChunkReducer in one process (a gloo group of one): chunks reduced
as the backward finishes them, in the order every replica uses, a tied chunk only at ALLREDUCE,
the sums the gradients of a plain backward bit for bit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from memtrain.runtime.stage_offload_zero import ChunkReducer


@pytest.fixture
def group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.new_group([0])
    finally:
        dist.destroy_process_group()


def _chunks(model: nn.Sequential) -> list[SimpleNamespace]:
    """A chunk per layer (weight and bias), as the chunk store lays them out."""
    out = []
    for i, layer in enumerate(model):
        slots, offset = [], 0
        for q in layer.parameters():
            slots.append(SimpleNamespace(param=q, offset=offset, numel=q.numel()))
            offset += q.numel()
        out.append(SimpleNamespace(index=i, num_elems=offset, slots=slots))
    return out


def _step(model: nn.Sequential, x: torch.Tensor) -> None:
    model(x).square().sum().backward()


def test_chunks_go_under_the_backward_and_sum_bitwise(group) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4))
    x = torch.randn(3, 8)
    _step(model, x)
    want = [torch.cat([q.grad.reshape(-1) for q in layer.parameters()]) for layer in model]
    model.zero_grad(set_to_none=True)
    chunks = _chunks(model)
    tied = {id(model[0].weight)}  # a weight tied across ranks: its chunk is final only at ALLREDUCE
    red = ChunkReducer(chunks, (0, 0, 0), replica=0, group=group, rank=0, timeout_s=10, deferred=tied)
    assert red.order == [2, 1, 0]
    _step(model, x)  # an earlier micro-batch: not armed, the gradients stay
    assert all(q.grad is not None for q in model.parameters())
    red.arm("0REDUCE_SCATTER1")
    _step(model, x)  # the last micro-batch: chunks 2 and 1 leave during it
    assert model[2].weight.grad is None and model[1].weight.grad is None
    assert model[0].weight.grad is not None  # the tied chunk waits for ALLREDUCE
    red.reduce("0ALLREDUCE")
    assert all(q.grad is None for q in model.parameters())
    for k in range(3):  # two micro-batches' gradients, summed over one replica
        assert torch.equal(red.summed[k], want[k] + want[k])
    assert red.peak_grad_bytes >= sum(c.num_elems for c in chunks) * 4

