"""The step's program (planner.program, planner.schedule.lower_chunks) against what the engine
does: for every parity case the engine's record of its fetches, releases, swaps and block passes
(``ChunkStore.executed``) equals the program lowered from the plan, action for action."""

from __future__ import annotations

import functools

import pytest
import torch

from memtrain.models.gpt import GPT, gpt_config
from memtrain.offload.chunks import make_chunk_plans, named_blocks, param_order
from memtrain.planner import cost
from memtrain.planner.analyze import analyze
from memtrain.planner.plan import Action, ActPolicy, ChunkPlan, MemoryPolicy, Op, Tier
from memtrain.planner.program import Layout, lower_backward, lower_forward, lower_step
from memtrain.planner.program_optim import OptimLayout, lower_step_optim
from memtrain.planner.schedule import engine_program, generate_single_device, lower_chunks, validate
from memtrain.runtime import wrap
from memtrain.config import ModelConfig

# chunk 0 on the device, 1 on the host, 2 and 3 on NVMe; blocks use (0), (1), (1, 2), (3)
POLICY = MemoryPolicy(
    chunk_size_elems=10, prefetch_depth=2, activations=(ActPolicy.KEEP,) * 4,
    chunks=tuple(ChunkPlan(index=i, num_elems=10, param_names=(n,), home=h)
                 for i, (n, h) in enumerate(zip("abcd", (Tier.DEVICE, Tier.HOST, Tier.NVME, Tier.NVME))))
)
LAYOUT = Layout.of(POLICY, ((0,), (1,), (1, 2), (3,)))


def text(actions) -> str:
    return " ".join(map(str, actions))


def test_a_forward_fetches_ahead_to_the_depth_and_keeps_what_the_backward_starts_with():
    fwd = lower_forward(LAYOUT, 0)
    # block 0 (a device chunk) fetches ahead chunks 1 and 2 (depth 2); block 1 keeps 1 for block 2;
    # after block 2, chunk 1 is among the next two distinct chunks (3, then the backward's 3, 1):
    # kept; chunk 2 is not: released
    assert text(fwd.actions) == "0PREFETCH0@c1 0PREFETCH0@c2 0F0/b0 0F0/b1 0F0/b2 0OFFLOAD0@c2 0PREFETCH0@c3 0F0/b3"
    assert fwd.resident == (1, 3) and fwd.held


def test_a_backward_releases_each_chunk_where_its_gradients_complete():
    fwd = lower_forward(LAYOUT, 0)
    last = lower_backward(LAYOUT, 0, fwd.resident)
    # chunk 3's gradients complete in block 3's backward, 2's in block 2's, 1's in block 1's
    assert text(last.actions) == "0B0/b3 0OFFLOAD0@c3 0PREFETCH0@c2 0B0/b2 0OFFLOAD0@c2 0B0/b1 0OFFLOAD0@c1 0B0/b0"
    assert last.resident == ()
    # followed by a forward, the chunks it starts with (1, then 2) stay
    more = lower_backward(LAYOUT, 0, fwd.resident, next_forward=True)
    assert text(more.actions) == "0B0/b3 0OFFLOAD0@c3 0PREFETCH0@c2 0B0/b2 0B0/b1 0B0/b0" and more.resident == (1, 2)
    # the optimizer takes an nvme chunk's buffer when its gradients are complete: it goes then
    handed = lower_backward(LAYOUT, 0, (2, 3), hand_off=True)
    assert text(handed.actions) == "0B0/b3 0OFFLOAD0@c3 0PREFETCH0@c1 0B0/b2 0OFFLOAD0@c2 0B0/b1 0OFFLOAD0@c1 0B0/b0"


def test_lower_chunks_strings_the_passes_together_and_validates():
    sched = lower_chunks(generate_single_device(2), POLICY, LAYOUT.uses)
    assert validate(sched) == []
    prog = engine_program(sched)
    assert prog == lower_step(LAYOUT, 2)  # without a dtype: no optimizer points
    # with one, the early updates sit in the last backward, where each chunk's gradients complete
    sched = lower_chunks(generate_single_device(2), POLICY, LAYOUT.uses, dtype="fp32")
    assert validate(sched) == []
    opt = OptimLayout(staged_chunks=POLICY.optim_staged_chunks, early=True)
    assert engine_program(sched) == lower_step_optim(LAYOUT, opt, 2, hand_off=True)
    # the device chunk after the backward ([Note: the step's end])
    assert [a for a in sched[0] if a.op is Op.OPTIM] == \
        [Action(0, Op.OPTIM, 1, c) for c in (3, 2, 1)] + [Action(0, Op.OPTIM, None, 0), Action(0, Op.OPTIM)]
    # under fp16 every update waits for the backward's end: resident chunks in chunk order, then
    # the nvme ones streamed, the next one's states read during each update
    fp16 = lower_chunks(generate_single_device(2), POLICY, LAYOUT.uses, dtype="fp16")[0]
    assert not any(a.op is Op.OPTIM and a.microbatch is not None for a in fp16)
    homes = {c.index: c.home for c in POLICY.chunks}
    resident = [c for c in sorted(homes) if homes[c] is not Tier.NVME]
    nvme = [c for c in sorted(homes) if homes[c] is Tier.NVME]
    assert [a.chunk for a in fp16 if a.op is Op.OPTIM and a.chunk is not None] == resident + nvme
    tail = [str(a) for a in fp16 if a.microbatch is None and a.chunk in nvme]
    assert tail[:2] == [f"0OPTIM_READ@c{nvme[0]}", f"0OPTIM_READ@c{nvme[1]}"] and tail[-1] == f"0OPTIM_WAIT@c{nvme[-1]}"
    # nothing moves when every chunk lives on the device: the program is the blocks' passes
    on_device = MemoryPolicy(chunk_size_elems=10, chunks=(POLICY.chunks[0],), prefetch_depth=1, activations=(ActPolicy.KEEP,))
    assert text(engine_program(lower_chunks(generate_single_device(1), on_device, ((0,),)))) == "0F0/b0 0B0/b0 0OPTIM"


def _cycle(n: int) -> list[Tier]:
    return [(Tier.NVME, Tier.HOST, Tier.DEVICE)[i % 3] for i in range(n)]


K, SH, SN, RC = ActPolicy.KEEP, ActPolicy.SWAP_HOST, ActPolicy.SWAP_NVME, ActPolicy.RECOMPUTE
MIXED = (K, SN, RC, SH)  # per block, cycled: swapped blocks apart, the top one swapped to host
GOLDEN = [  # (homes, activations, micro-batches, dtype, prefetch depth, swap-in look-ahead, optimizer staged chunks)
    (Tier.DEVICE, K, 2, "fp32", 2, 1, 3), (Tier.HOST, K, 1, "fp32", 2, 1, 3), (Tier.HOST, K, 3, "fp32", 2, 1, 3),
    (Tier.NVME, K, 2, "fp32", 2, 1, 3), (Tier.NVME, SH, 2, "fp32", 2, 1, 3), (Tier.NVME, SN, 2, "fp32", 3, 1, 3),
    (Tier.NVME, RC, 3, "fp32", 1, 1, 3), ("cycle", RC, 2, "fp32", 5, 1, 3), ("cycle", SH, 2, "bf16", 2, 1, 3),
    (Tier.NVME, K, 2, "bf16", 2, 1, 3), (Tier.HOST, RC, 2, "fp16", 2, 1, 3), ("cycle", K, 3, "fp16", 3, 1, 3),
    ("cycle", SN, 3, "bf16", 3, 2, 3), (Tier.HOST, SN, 3, "fp32", 2, 0, 3), ("cycle", MIXED, 3, "fp32", 2, 1, 3),
    (Tier.DEVICE, MIXED, 2, "fp16", 1, 2, 3),
    (Tier.NVME, K, 2, "fp32", 2, 1, 6), (Tier.NVME, K, 1, "bf16", 2, 1, 5),  # states read ahead (staged > 3)
    (Tier.NVME, MIXED, 2, "fp32", 2, 2, 6),  # read-aheads and swap-ins after the same markers
]
GOLDEN = [(*g, False) for g in GOLDEN] + [  # gradient clipping: no early updates (offload.clip)
    ("cycle", K, 2, "fp32", 2, 1, 3, True), (Tier.NVME, RC, 2, "fp32", 2, 1, 6, True),
    (Tier.HOST, SH, 1, "bf16", 2, 1, 3, True),
]


def _golden_id(h, a, m, d, p, ahead, staged, clip) -> str:
    acts = "mixed" if isinstance(a, tuple) else a.value
    home = h if isinstance(h, str) else h.value
    return (f"{home}-{acts}-m{m}-{d}-p{p}-a{ahead}" + (f"-s{staged}" if staged != 3 else "")
            + ("-clip" if clip else ""))


@pytest.mark.parametrize("homes, act, num_micro, dtype, depth, ahead, staged, clip", GOLDEN,
                         ids=[_golden_id(*g) for g in GOLDEN])
def test_the_engine_runs_the_plans_program(tmp_path, homes, act, num_micro, dtype, depth, ahead, staged, clip):
    chunk = 8000
    torch.manual_seed(0)
    cfg = gpt_config("tiny", dropout=0.1)
    model = GPT(cfg)
    params = param_order(model, named_blocks(model, None))
    homes = _cycle(len(make_chunk_plans(params, chunk, Tier.HOST))) if homes == "cycle" else homes
    acts = tuple(act[j % len(act)] for j in range(len(model.blocks))) if isinstance(act, tuple) else (act,) * len(model.blocks)
    policy = MemoryPolicy(chunk_size_elems=chunk, chunks=make_chunk_plans(params, chunk, homes), prefetch_depth=depth,
                          activations=acts, swap_in_ahead=ahead, optim_staged_chunks=staged)
    # the plan's program, from the analysis as the planner makes it
    stats = analyze(ModelConfig(preset="tiny", overrides={"dropout": 0.1}), seq_len=16)
    lower = functools.partial(lower_chunks, generate_single_device(num_micro), policy,
                              cost.block_chunk_ids(stats, policy.chunks), dtype=dtype, clip_grad_norm=clip)
    # the first step has no write-backs carried in; the next ones wait for those the last left
    programs = [engine_program(lower(first_step=True)), engine_program(lower())]
    assert all(validate({0: p}) == [] for p in programs)
    swapped = {j for j, p in enumerate(acts) if p in (SH, SN)}
    swaps = [a for a in programs[1] if a.op in (Op.SWAP_OUT, Op.SWAP_IN)]
    assert len(swaps) == 2 * num_micro * len(swapped) and {a.block for a in swaps} == swapped
    if homes is not Tier.DEVICE and dtype != "fp16" and not clip:  # the optimizer's points are in the record
        assert all(any(a.op is Op.OPTIM and a.chunk is not None for a in p) for p in programs)
        assert any(a.op is Op.OPTIM_READ for a in programs[0]) == (staged > 3)
    if clip:  # every update at the step's end, after the last backward
        points = [a for p in programs for a in p if a.op in (Op.OPTIM, Op.OPTIM_READ, Op.OPTIM_WAIT)]
        assert all(a.microbatch is None for a in points)
    engine = wrap(model, optimizer={"name": "adamw", "lr": 1e-3}, plan=policy, micro_batch_size=2, dtype=dtype,
                  memory={"device": "64GiB", "host": "64GiB", "nvme_path": str(tmp_path / "nvme")}, verbose=False,
                  max_grad_norm=0.5 if clip else None)
    try:
        for step in range(2):
            ids = torch.randint(0, cfg.vocab_size, (2 * num_micro, 17), generator=torch.Generator().manual_seed(step))
            engine.train_step((ids[:, :-1], ids[:, 1:]))
            assert [str(a) for a in engine.store.executed] == [str(a) for a in programs[step]]
        # every update ran at a point of the program, the step's end included ([Note: the step's end])
        assert engine.optimizer.num_unplanned == 0 and engine.store.runner.num_unplanned == 0
    finally:
        engine.close()
