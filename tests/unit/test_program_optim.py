"""The optimizer's points of a step's program (planner.program_optim), alone: where states are read
ahead, where each chunk updates, where write-backs are waited for; the engine's record of them is
tests/unit/test_program.py's golden test."""

from __future__ import annotations

import pytest

from memtrain.planner import cost
from memtrain.planner.plan import Op
from memtrain.planner.program import Layout
from memtrain.planner.program_optim import OptimLayout, early_updates, lower_step_optim, steady_carried

# six nvme chunks, one per block
NVME6 = Layout(uses=tuple((i,) for i in range(6)), off=frozenset(range(6)), prefetch_depth=2, nvme=frozenset(range(6)))


def _staged_along(program, carried) -> list[int]:
    """Nvme chunks holding staging after each action, counted from the actions alone."""
    ahead, writing, behind, out = set(), [], list(carried), []
    for a in program:
        if a.op is Op.OPTIM_READ:
            ahead.add(a.chunk)
        elif a.op is Op.OPTIM_WAIT:
            (behind if a.chunk in behind else writing).remove(a.chunk)
        elif a.op is Op.OPTIM and a.chunk is not None:
            ahead.discard(a.chunk)
            writing.append(a.chunk)
        out.append(len(ahead) + len(writing) + len(behind))
    return out


@pytest.mark.parametrize("staged", [1, 3, 5, 8])
@pytest.mark.parametrize("num_micro", [1, 3])
def test_staging_stays_within_the_plans_slots_and_every_chunk_updates_once(staged, num_micro):
    opt = OptimLayout(staged_chunks=staged, early=True)
    carried = steady_carried(NVME6, opt, num_micro)
    # the step leaves the last updates' write-backs running: the last `staged` in completion order
    assert list(carried) == cost.carried_write_backs(NVME6.uses, range(6), staged)
    program = lower_step_optim(NVME6, opt, num_micro, hand_off=True)
    assert max(_staged_along(program, carried)) <= staged
    updates = [a for a in program if a.op is Op.OPTIM and a.chunk is not None]
    assert [a.chunk for a in updates] == cost.early_update_order(NVME6.uses, range(6))
    assert {a.microbatch for a in updates} == {num_micro - 1}
    # each update sits right after the marker of the block completing its gradients (or after the
    # waits and updates before it there), and before its release
    for a in updates:
        i = program.index(a)
        j = i - 1
        while program[j].op in (Op.OPTIM_WAIT, Op.OPTIM_READ):
            j -= 1
        assert (program[j].op, program[j].block) == (Op.B, NVME6.complete_at(a.chunk))
        assert program[i + 1].op is Op.OFFLOAD and program[i + 1].chunk == a.chunk
    # a chunk's own carried write-back is waited for before its update
    for c in carried:
        waits = [k for k, a in enumerate(program) if a.op is Op.OPTIM_WAIT and a.chunk == c]
        assert waits and waits[0] < program.index(next(a for a in updates if a.chunk == c))
    # nothing is waited for that is not in flight: the first step has no carried waits
    first = lower_step_optim(NVME6, opt, num_micro, hand_off=True, carried=())
    assert max(_staged_along(first, ())) <= staged
    for k, a in enumerate(first):  # every wait there is for a write-back of this step's
        if a.op is Op.OPTIM_WAIT:
            assert any(b.op is Op.OPTIM and b.chunk == a.chunk for b in first[:k])


@pytest.mark.parametrize("staged", [3, 5, 6])
def test_states_are_read_ahead_in_the_first_backward_last_updates_first(staged):
    opt = OptimLayout(staged_chunks=staged, early=True)
    program = lower_step_optim(NVME6, opt, 2)
    reads = [a for a in program if a.op is Op.OPTIM_READ]
    slots = cost.optim_read_ahead_slots(staged)
    assert [a.chunk for a in reads] == cost.read_ahead_order(NVME6.uses, range(6))[:slots]
    assert all(a.microbatch == 0 for a in reads)  # in the first backward, one per block start
    for a in reads:
        assert program[program.index(a) - 1].op in (Op.B, Op.OPTIM_WAIT)


def test_no_early_updates_under_fp16():
    assert early_updates("fp32") and early_updates("bf16") and not early_updates("fp16")
    program = lower_step_optim(NVME6, OptimLayout(staged_chunks=6, early=False), 2)
    # nothing in the backwards: every update at the step's end, the nvme chunks streamed in chunk
    # order, each next one's states read during an update, one write-back in flight besides the
    # last one queued ([Note: the step's end])
    assert [a for a in program if a.microbatch is not None and a.op in (Op.OPTIM, Op.OPTIM_READ, Op.OPTIM_WAIT)] == []
    end = " ".join(str(a) for a in program if a.microbatch is None)
    assert end == ("0OPTIM_READ@c0 0OPTIM_READ@c1 0OPTIM@c0 0OPTIM_READ@c2 0OPTIM@c1 0OPTIM_WAIT@c0 "
                   "0OPTIM_READ@c3 0OPTIM@c2 0OPTIM_WAIT@c1 0OPTIM_READ@c4 0OPTIM@c3 0OPTIM_WAIT@c2 "
                   "0OPTIM_READ@c5 0OPTIM@c4 0OPTIM_WAIT@c3 0OPTIM@c5 0OPTIM_WAIT@c4 0OPTIM_WAIT@c5 0OPTIM")
    assert steady_carried(NVME6, OptimLayout(staged_chunks=6, early=False), 2) == ()


def test_host_chunks_update_without_staging_and_loose_chunks_at_the_backwards_end():
    # chunk 0 host, 1 nvme, 2 a loose module's (host): its gradients may complete after block 0's
    layout = Layout(uses=((0,), (1, 2)), off=frozenset({0, 1, 2}), prefetch_depth=3, nvme=frozenset({1}), loose=(2,))
    program = lower_step_optim(layout, OptimLayout(staged_chunks=3, early=True), 1)
    text = " ".join(map(str, program))
    assert "0B0/b1 0OPTIM_WAIT0@c1 0OPTIM0@c1" in text and text.endswith("0B0/b0 0OPTIM0@c0 0OFFLOAD0@c0 0OPTIM0@c2 0OPTIM")
