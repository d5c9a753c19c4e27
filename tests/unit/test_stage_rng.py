"""runtime.stage_rng: a block's random draws traced once and replayed move the generator as its
real forward does, and a rank's forwards in any order draw one process's masks."""

from __future__ import annotations

import pytest
import torch

from memtrain.models.gpt import GPT, gpt_config
from memtrain.runtime.stage_rng import StageRng, drawing, get_state, offset_steps, replay, trace_draws, trace_gpt

CPU = torch.device("cpu")
B, T = 2, 16


def _model(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(gpt_config("tiny", **overrides)).train()


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("overrides", [{"dropout": 0.1},
                                       {"dropout": 0.2, "fused_attention": False, "position": "rotary",
                                        "activation": "swiglu", "norm": "rmsnorm"}])
def test_replay_moves_the_generator_as_the_forward(bf16: bool, overrides: dict) -> None:
    model = _model(**overrides)
    before = get_state(CPU)
    draws = trace_gpt(model.config, B, T, CPU, bf16=bf16)
    assert torch.equal(get_state(CPU), before), "tracing drew from the real generator"
    assert [len(d) for d in draws] == [1, 3, 3, 0]  # embedding; attention probs, its output, the MLP's; head
    ids = torch.randint(0, model.config.vocab_size, (B, T))
    start = get_state(CPU)
    x = ids
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for block, block_draws in zip(model.blocks, draws, strict=True):
            at = get_state(CPU)
            x = block(x)
            after = get_state(CPU)
            torch.set_rng_state(at)
            replay(block_draws)
            assert torch.equal(get_state(CPU), after), type(block).__name__
    assert not torch.equal(get_state(CPU), start)


def test_no_dropout_no_draws() -> None:
    """dropout 0: nothing traced; the attention op is tagged random but draws nothing at p=0,
    which ``drawing`` finds by replaying it."""
    cfg = gpt_config("tiny")
    assert trace_gpt(cfg, B, T, CPU) == [(), (), (), ()]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), torch.device(CPU):
        model = GPT(cfg).train()
        draws = trace_draws(model.blocks, torch.zeros(B, T, dtype=torch.long))
    tagged = {d for ds in draws for d in ds}
    assert tagged and not any(drawing(tagged, CPU).values())
    rng = StageRng([(), (), (), ()], {0: range(0, 2)}, replica=0, dp=1, num_microbatches=2, device=CPU)
    assert not rng.on
    rng.begin()
    rng.enter(0, 1)  # nothing saved, nothing set or checked
    rng.leave(0, 1)
    rng.finish()


@pytest.mark.parametrize(("dp", "replica"), [(1, 0), (2, 1)])
def test_forwards_in_any_order_draw_one_processs_masks(dp: int, replica: int) -> None:
    """One process runs the global batch's micro-batches in order; a 'rank' holding two stages
    (blocks 0-1 and 2-3) of replica ``replica`` runs its micro-batches in reverse, with a
    foreign draw between: each output is bitwise, and the step ends at one process's state."""
    m = 3
    model = _model(dropout=0.1)
    ids = torch.randint(0, model.config.vocab_size, (dp * m, B, T))
    start = get_state(CPU)
    want = [model(ids[k]) for k in range(dp * m)]
    end = get_state(CPU)
    torch.set_rng_state(start)
    rng = StageRng(trace_gpt(model.config, B, T, CPU), {0: range(0, 2), 1: range(2, 4)}, replica=replica, dp=dp,
                   num_microbatches=m, device=CPU)
    rng.begin()
    assert torch.equal(get_state(CPU), start)
    for i in reversed(range(m)):
        rng.enter(0, i)
        x = model.blocks[1](model.blocks[0](ids[replica * m + i]))
        rng.leave(0, i)
        torch.rand(7)  # anything else a rank draws between forwards changes nothing
        rng.enter(1, i)
        x = model.blocks[3](model.blocks[2](x))
        rng.leave(1, i)
        assert torch.equal(x, want[replica * m + i]), i
    rng.finish()
    assert torch.equal(get_state(CPU), end)


def test_a_stage_of_no_blocks_starts_where_the_next_would() -> None:
    """Two stages starting at the same block (the first empty) and one after the last block get
    the state there: where micro-batch ``i``'s forward has reached."""
    model = _model(dropout=0.1)
    draws = trace_gpt(model.config, B, T, CPU)
    start = get_state(CPU)
    after = [start]  # the state after each micro-batch's whole forward
    for _ in range(2):
        for ds in draws:
            replay(ds)
        after.append(get_state(CPU))
    torch.set_rng_state(start)
    rng = StageRng(draws, {0: range(0, 0), 1: range(0, 4), 2: range(4, 4)}, replica=0, dp=1, num_microbatches=2,
                   device=CPU)
    rng.begin()
    for i in range(2):
        for s, want in ((0, after[i]), (1, after[i]), (2, after[i + 1])):
            rng.enter(s, i)
            assert torch.equal(get_state(CPU), want), (s, i)
            if s == 1:
                for ds in draws:
                    replay(ds)
            rng.leave(s, i)
    rng.finish()
    assert torch.equal(get_state(CPU), after[2])


def test_a_forward_that_draws_other_than_its_trace_fails_loudly() -> None:
    """A trace that missed a random op (here: the embedding's dropout) is found at the forward
    that draws it, naming the stage, the micro-batch and the blocks."""
    model = _model(dropout=0.1)
    draws = trace_gpt(model.config, B, T, CPU)
    rng = StageRng([(), *draws[1:]], {0: range(0, 2), 1: range(2, 4)}, replica=0, dp=1, num_microbatches=1,
                   device=CPU)
    rng.begin()
    rng.enter(0, 0)
    model.blocks[1](model.blocks[0](torch.randint(0, model.config.vocab_size, (B, T))))
    with pytest.raises(RuntimeError, match=r"stage 0's forward of micro-batch 0 \(blocks 0\.\.1\) drew other random"):
        rng.leave(0, 0)


class _Counter:
    """A counter generator as CUDA's Philox: its state is (seed, offset)."""

    def __init__(self) -> None:
        self.seed, self.offset = 7, 0

    def get_offset(self) -> int:
        return self.offset

    def set_offset(self, offset: int) -> None:
        self.offset = offset

    def get_state(self) -> torch.Tensor:
        return torch.tensor([self.seed, self.offset])

    def set_state(self, state: torch.Tensor) -> None:
        self.seed, self.offset = (int(x) for x in state)


def test_a_counter_generator_is_walked_by_arithmetic(monkeypatch) -> None:
    """With ``offset_steps`` (found on a counter generator: CUDA's), the walk adds each block's
    step, replaying nothing: stage 1 (blocks 1-2) of replica 1 of 2, 2 micro-batches of blocks
    stepping 4, 0 and 8."""
    import memtrain.runtime.stage_rng as stage_rng

    gen = _Counter()
    monkeypatch.setattr(stage_rng, "_generator", lambda device: gen)
    monkeypatch.setattr(stage_rng, "get_state", lambda device: gen.get_state())
    monkeypatch.setattr(stage_rng, "set_state", lambda device, state: gen.set_state(state))
    monkeypatch.setattr(stage_rng, "replay", lambda *a: pytest.fail("a counter's walk replays nothing"))
    dummy = (object(),)
    gen.offset = 100
    rng = StageRng([dummy, (), dummy], {1: range(1, 3)}, replica=1, dp=2, num_microbatches=2,
                   device=torch.device("meta"), steps=[4, 0, 8])
    rng.begin()
    assert gen.offset == 100
    for i in range(2):
        rng.enter(1, i)
        assert gen.offset == 100 + 12 * (2 + i) + 4  # two micro-batches of replica 0, i of its own, block 0
        gen.offset += 8  # the forward of blocks 1 and 2
        rng.leave(1, i)
    rng.finish()
    assert gen.offset == 100 + 12 * 4
    assert offset_steps([dummy], CPU) is None  # the CPU's generator is no counter
