"""Schedule generation, each lowering pass alone, validation, CSV and the grid."""

from __future__ import annotations

import dataclasses

from memtrain.planner.plan import Action, ActPolicy, ChunkPlan, MemoryPolicy, Op, Tier, schedule_from_csv, schedule_to_csv
from memtrain.planner.schedule import engine_program, format_grid, generate_single_device, lower_chunks, validate

# chunk 0 on the device, chunk 1 on the host, chunk 2 on NVMe; block 2 uses chunks 1 and 2
POLICY = MemoryPolicy(
    chunk_size_elems=10,
    chunks=(ChunkPlan(index=0, num_elems=10, param_names=("a",), home=Tier.DEVICE),
            ChunkPlan(index=1, num_elems=10, param_names=("b",), home=Tier.HOST),
            ChunkPlan(index=2, num_elems=10, param_names=("c",), home=Tier.NVME)),
    prefetch_depth=2,
    activations=(ActPolicy.KEEP, ActPolicy.KEEP, ActPolicy.RECOMPUTE),
)
BLOCK_CHUNKS = ((0,), (1,), (1, 2))


def text(schedule) -> str:
    return " ".join(map(str, schedule[0]))


def test_generate_single_device_alternates_f_and_b_then_optim():
    assert text(generate_single_device(3)) == "0F0 0B0 0F1 0B1 0F2 0B2 0OPTIM"
    assert validate(generate_single_device(3)) == []


def test_lower_chunks_alone():
    lowered = lower_chunks(generate_single_device(2), POLICY, BLOCK_CHUNKS, dtype="fp32")
    # blocks 1 and 2 share chunk 1; with depth 2 both off-device chunks stay from the forward into
    # the backward and from the first backward into the second forward: fetched once per step.
    # Each off-device chunk updates where its gradients complete in the last backward, the nvme
    # chunk after its write-back carried from the last step is waited for (planner.program_optim)
    assert text(lowered) == (
        "0PREFETCH0@c1 0PREFETCH0@c2 0F0/b0 0F0/b1 0F0/b2 "
        "0B0/b2 0B0/b1 0B0/b0 "
        "0F1/b0 0F1/b1 0F1/b2 "
        "0B1/b2 0OPTIM_WAIT1@c2 0OPTIM1@c2 0OFFLOAD1@c2 0B1/b1 0OPTIM1@c1 0OFFLOAD1@c1 0B1/b0 "
        "0OPTIM@c0 0OPTIM"  # the device chunk updates after the backward
    )
    assert validate(lowered) == []
    first = lower_chunks(generate_single_device(2), POLICY, BLOCK_CHUNKS, dtype="fp32", first_step=True)
    assert [a for a in first[0] if a.op is Op.OPTIM_WAIT] == []  # nothing carried into the first step
    # under fp16 the optimizer runs after the backward: the resident chunks, then the nvme one
    # through staging, then the final OPTIM
    assert text(lower_chunks(generate_single_device(2), POLICY, BLOCK_CHUNKS, dtype="fp16")).endswith(
        "0B1/b2 0OFFLOAD1@c2 0B1/b1 0OFFLOAD1@c1 0B1/b0 0OPTIM@c0 0OPTIM@c1 0OPTIM_READ@c2 0OPTIM@c2 0OPTIM_WAIT@c2 0OPTIM")
    # nothing to move when every chunk lives on the device
    on_device = MemoryPolicy(chunk_size_elems=10, chunks=(POLICY.chunks[0],), prefetch_depth=1, activations=(ActPolicy.KEEP,))
    assert text(lower_chunks(generate_single_device(1), on_device, ((0,),))) == "0F0/b0 0B0/b0 0OPTIM"


def test_swaps_are_lowered_per_block_with_their_look_ahead():
    """planner.program_swaps [Note: the swap rules]: a SWAP_OUT right after its block's forward; a
    SWAP_IN right after the backward marker swap_in_ahead blocks above (the top block's at the
    backward's start), or right after its own marker without a look-ahead."""
    swapping = MemoryPolicy(chunk_size_elems=10, chunks=POLICY.chunks, prefetch_depth=1,
                            activations=(ActPolicy.SWAP_NVME, ActPolicy.SWAP_HOST, ActPolicy.SWAP_HOST))
    lowered = lower_chunks(generate_single_device(1), swapping, BLOCK_CHUNKS)
    assert text(lowered) == (
        "0F0/b0 0SWAP_OUT0/b0 0PREFETCH0@c1 0F0/b1 0SWAP_OUT0/b1 0PREFETCH0@c2 0F0/b2 0SWAP_OUT0/b2 "
        "0SWAP_IN0/b2 0B0/b2 0SWAP_IN0/b1 0OFFLOAD0@c2 0B0/b1 0SWAP_IN0/b0 0OFFLOAD0@c1 0B0/b0 0OPTIM"
    )
    assert validate(lowered) == []
    assert validate(lower_chunks(generate_single_device(2), dataclasses.replace(swapping, swap_in_ahead=0), BLOCK_CHUNKS)) == []
    # the engine runs and records all of it
    assert engine_program(lowered) == lowered[0]
    # no look-ahead: each SWAP_IN right after its own marker (its first use claims it)
    none_ahead = lower_chunks(generate_single_device(1), dataclasses.replace(swapping, swap_in_ahead=0), BLOCK_CHUNKS)
    assert text(none_ahead).split(" 0OPTIM")[0].split("0SWAP_OUT0/b2 ")[1] == (
        "0B0/b2 0SWAP_IN0/b2 0OFFLOAD0@c2 0B0/b1 0SWAP_IN0/b1 0OFFLOAD0@c1 0B0/b0 0SWAP_IN0/b0")
    # two ahead, one keep block in the middle: block 0's comes back at the top block's start
    mixed = dataclasses.replace(swapping, activations=(ActPolicy.SWAP_NVME, ActPolicy.KEEP, ActPolicy.SWAP_HOST),
                                swap_in_ahead=2)
    swaps = [str(a) for a in lower_chunks(generate_single_device(1), mixed, BLOCK_CHUNKS)[0]
             if a.op in (Op.SWAP_IN, Op.B)]
    assert swaps == ["0SWAP_IN0/b2", "0B0/b2", "0SWAP_IN0/b0", "0B0/b1", "0B0/b0"]
    # with the optimizer's points, a marker's swap-ins still come right after it, before its read-aheads
    with_optim = lower_chunks(generate_single_device(1), dataclasses.replace(swapping, optim_staged_chunks=6),
                              BLOCK_CHUNKS, dtype="fp32")[0]
    for i, a in enumerate(with_optim):
        if a.op is Op.SWAP_IN and i and with_optim[i - 1].op is not Op.SWAP_IN:
            assert with_optim[i - 1].op is Op.B or a.block == 2, text({0: with_optim})
    # nothing swaps when no block's policy does
    assert not any(a.op in (Op.SWAP_OUT, Op.SWAP_IN) for a in lower_chunks(generate_single_device(2), POLICY, BLOCK_CHUNKS)[0])


def _problems(actions: str) -> list[str]:
    return validate({0: tuple(Action.parse(a) for a in actions.split())})


def test_validate_finds_broken_schedules():
    assert any("no backward" in p for p in _problems("0F0 0OPTIM"))
    assert any("before its forward" in p for p in _problems("0B0 0F0 0B0 0OPTIM"))
    assert any("SWAP_IN" in p for p in _problems("0F0 0SWAP_IN0 0B0 0OPTIM"))
    # block-level swaps pair per block: out after the block's forward, in before its backward
    assert any("without a SWAP_OUT" in p for p in _problems("0F0/b0 0F0/b1 0SWAP_OUT0/b1 0SWAP_IN0/b0 0B0/b1 0B0/b0 0OPTIM"))
    assert any("before its forward" in p for p in _problems("0SWAP_OUT0/b0 0F0/b0 0SWAP_IN0/b0 0B0/b0 0OPTIM"))
    assert _problems("0F0/b0 0SWAP_OUT0/b0 0SWAP_IN0/b0 0B0/b0 0OPTIM") == []
    assert any("never offloaded" in p for p in _problems("0PREFETCH0@c1 0F0 0B0 0OPTIM"))
    assert any("fetched again" in p for p in _problems("0PREFETCH0@c1 0PREFETCH0@c1 0F0 0OFFLOAD0@c1 0B0 0OPTIM"))
    assert any("without a PREFETCH" in p for p in _problems("0F0 0OFFLOAD0@c1 0B0 0OPTIM"))
    assert any("last action" in p for p in _problems("0F0 0OPTIM 0B0"))
    assert any("exactly one OPTIM" in p for p in _problems("0F0 0B0"))
    assert any("forward after an optimizer step" in p for p in _problems("0F0 0B0 0OPTIM@c1 0F1 0B1 0OPTIM"))
    assert any("OPTIM_READ needs a chunk" in p for p in _problems("0F0 0B0 0OPTIM_READ0 0OPTIM"))
    assert any("unknown op" in p for p in _problems("0F0 0SEND_F0 0B0 0OPTIM"))
    assert any("unknown op" in p for p in validate({0: (Action(0, "JUMP", 0), Action(0, Op.OPTIM))}))  # type: ignore[arg-type]
    # a problem names the rank and the step
    assert _problems("0F0 0OPTIM 0B0")[0].startswith("rank 0 step 1 (0OPTIM)")


def test_schedule_round_trips_through_csv():
    swapping = dataclasses.replace(POLICY, activations=(ActPolicy.SWAP_NVME, ActPolicy.KEEP, ActPolicy.SWAP_HOST))
    lowered = lower_chunks(generate_single_device(3), swapping, BLOCK_CHUNKS, dtype="bf16")
    assert any(a.op is Op.SWAP_IN for a in lowered[0]) and any(a.op is Op.OPTIM_WAIT for a in lowered[0])
    assert schedule_from_csv(schedule_to_csv(lowered)) == lowered
    assert str(Action.parse("0OPTIM_READ1@c5")) == "0OPTIM_READ1@c5" and Action.parse("0OPTIM_WAIT@c2").chunk == 2
    assert Action.parse("0F3/b2") == Action(0, Op.F, 3, block=2) and str(Action(0, Op.B, 1, 5, 2)) == "0B1/b2@c5"
    assert Action.parse("0SWAP_OUT3/b2") == Action(0, Op.SWAP_OUT, 3, block=2)
    assert str(Action.parse("0SWAP_IN13/b12")) == "0SWAP_IN13/b12"


def test_format_grid_golden():
    grid = format_grid({0: (Action(0, Op.F, 0, block=0), Action(0, Op.SWAP_OUT, 0, block=0), Action(0, Op.SWAP_IN, 0, block=0),
                            Action(0, Op.B, 0, block=0), Action(0, Op.OPTIM))})
    assert grid == (
        "step  rank 0\n"
        "0     0F0/b0\n"
        "1     0SWAP_OUT0/b0\n"
        "2     0SWAP_IN0/b0\n"
        "3     0B0/b0\n"
        "4     0OPTIM\n"
    )
    two = format_grid({0: (Action(0, Op.F, 0), Action(0, Op.B, 0)), 1: (Action(1, Op.F, 0),)})
    assert two == "step  rank 0  rank 1\n0     0F0     1F0\n1     0B0\n"
