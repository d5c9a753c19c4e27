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



class _Checked(ChunkReducer):
    """A reducer that checks its running count against a full recount at every reading of it."""

    checks = 0

    def _note(self) -> None:
        assert self.held_bytes == self.grad_bytes, (self.held_bytes, self.grad_bytes)
        type(self).checks += 1
        super()._note()


@pytest.mark.parametrize("microbatches", [1, 2])
def test_running_gradient_count_equals_a_recount_at_every_reading(group, microbatches: int) -> None:
    """[Note: gradient bytes counted as they change]: with one micro-batch every .grad appears
    after ``arm`` (the tied chunk's without a report), with two they were there before."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(8, 8) for _ in range(5)))
    x = torch.randn(3, 8)
    chunks = _chunks(model)
    red = _Checked(chunks, (0,) * 5, replica=0, group=group, rank=0, timeout_s=10, deferred={id(model[0].weight)})
    for _ in range(microbatches - 1):
        _step(model, x)
    red.arm("0REDUCE_SCATTER1")
    _step(model, x)
    model[0].bias.grad = None  # a tied chunk's .grad changed without a report: recounted at reduce
    red.reduce("0ALLREDUCE")
    assert _Checked.checks >= 5 + 5  # every chunk's report and wait was checked
    full = sum(c.num_elems for c in chunks) * 4
    assert red.peak_grad_bytes >= full  # the whole gradient was held once


class _CountedSlot:
    """A chunk slot that counts the reads of its parameter."""

    reads = 0

    def __init__(self, param: nn.Parameter, offset: int) -> None:
        self._param, self.offset, self.numel = param, offset, param.numel()

    @property
    def param(self) -> nn.Parameter:
        type(self).reads += 1
        return self._param


def test_gradient_bookkeeping_is_linear_in_the_parameters(group) -> None:
    """A step's reads of the parameters grow with their number, not its square (a recount per
    report read every parameter per report: about 2 * 80 * 80 reads here, against 80 * 10)."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(2, 2) for _ in range(40)))
    chunks = [SimpleNamespace(index=i, num_elems=6, slots=[_CountedSlot(layer.weight, 0), _CountedSlot(layer.bias, 4)])
              for i, layer in enumerate(model)]
    red = ChunkReducer(chunks, (0,) * 40, replica=0, group=group, rank=0, timeout_s=10, deferred=set())
    _CountedSlot.reads = 0
    red.arm("0REDUCE_SCATTER1")
    _step(model, torch.randn(3, 2))
    red.reduce("0ALLREDUCE")
    assert _CountedSlot.reads <= 10 * 80, _CountedSlot.reads
    assert red.peak_grad_bytes >= 40 * 6 * 4
