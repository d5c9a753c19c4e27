"""runtime/stage_worker.py [Note: one weight cast a step]: a bf16 worker's stages share one
autocast cast of each weight over the step. The losses and the trained weights are bitwise those
of the worker that casts per micro-batch (built with no shared cast, as before), for a whole and a
split backward, a rank holding both tied ends, recomputed blocks and an offloaded stage (whose
parameters point elsewhere each step); nothing of the cache is left after a step, failed or not."""

from __future__ import annotations

import os

import pytest
import torch

from memtrain.config import ModelConfig
from memtrain.planner.pipeline import add_offload_points
from memtrain.planner.plan import Action, Op
from memtrain.runtime.pipeline_driver import stage_programs
from memtrain.runtime.stage_failure import StepFailed
from memtrain.runtime.stage_worker import PipelineSpec, StageWorker

M = 3


def _worker(kind: str, *, shared: bool, offload: bool = False, tmp=None, **kw) -> StageWorker:
    """One rank, the tiny GPT (one layer, tied head) in one stage, or two for a V."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    place, programs = stage_programs(kind, 1, M)
    program = add_offload_points(programs, [0])[0] if offload else programs[0]
    partition = (3,) if place.num_stages == 1 else (2, 1)
    spec = PipelineSpec(model=ModelConfig(preset="tiny", overrides={"num_layers": 1, "dropout": 0.1}),
                        partition=partition, rank_of=place.rank_of, num_ranks=1, dp=1, num_microbatches=M,
                        micro_batch_size=2, seq_len=16, seed=0, timeout_s=10, dtype="bf16",
                        **({"offload": ("host",) * place.num_stages} if offload else {}), **kw)
    worker = StageWorker(spec, 0, program)
    if not shared:
        worker._casts_until = None  # before the build: a cast per micro-batch, as before
    worker.build(*worker.open_store("127.0.0.1"))
    return worker


def _nesting() -> int:
    """Autocast's nesting count now (0: the cache is cleared at the next region's end)."""
    n = torch.autocast_increment_nesting() - 1
    torch.autocast_decrement_nesting()
    return n


def _train(worker: StageWorker, steps: int = 3) -> tuple[list, list[torch.Tensor], frozenset[int] | None]:
    """The steps' losses, the weights after them and the stages that shared their casts
    (None: the program shares none); the worker closed."""
    threads = torch.get_num_threads()
    shared = worker.acts.shared if worker._casts_until is not None else None
    try:
        losses = []
        for k in range(steps):
            losses.append(worker.run_step(k).losses)
            assert _nesting() == 0
        if worker.offloaded:
            got = worker.offloaded[0].parameters()
        else:
            got = [q.detach().clone() for s in worker.stages for q in worker.owns[s]]
        return losses, got, shared
    finally:
        worker.close()
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kind,kw", [("gpipe", {}), ("1f1b", {}), ("zb-h1", {}), ("v-half", {}),
                                     ("1f1b", {"activations": (("keep", "recompute", "keep"),)})])
def test_shared_casts_are_bitwise_a_cast_per_micro_batch(kind: str, kw: dict) -> None:
    """The steps' losses and the weights after them, bit for bit, with dropout."""
    got = _train(_worker(kind, shared=True, **kw))
    want = _train(_worker(kind, shared=False, **kw))
    assert got[2] == (frozenset() if kw else frozenset({0, 1} if kind == "v-half" else {0})) and want[2] is None
    assert got[0] == want[0]
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1], strict=True))


def test_an_offloaded_stage_shares_its_casts_bitwise(tmp_path) -> None:
    """Its parameters point into new buffers each step (released in between): the cache kept
    over a step and cleared at its end never hands a step the last one's casts."""
    want = _train(_worker("1f1b", shared=False, offload=True, nvme_dir=str(tmp_path)))
    got = _train(_worker("1f1b", shared=True, offload=True, nvme_dir=str(tmp_path)))
    assert got[2] == {0} and got[0] == want[0] and all(torch.equal(a, b) for a, b in zip(got[1], want[1], strict=True))


def test_a_failed_step_leaves_no_cast_behind() -> None:
    """A step failing after its first forwards: the nesting count (and so the cache) let go."""
    worker = _worker("gpipe", shared=True)
    threads = torch.get_num_threads()
    try:
        program = worker.program
        first_b = next(k for k, a in enumerate(program) if a.op is Op.B)
        worker.program = program[:first_b] + (Action(0, Op.SNAPSHOT),) + program[first_b:]
        worker._casts_until = next(k for k, a in reversed(list(enumerate(worker.program))) if a.op is Op.F)
        with pytest.raises(RuntimeError, match="no handler for op SNAPSHOT"):
            worker.run_step(0)
        assert _nesting() == 0 and not worker._casts_held
        assert worker.acts.device_ledger.in_use_bytes == 0
        with pytest.raises(StepFailed):
            worker.run_step(1)
    finally:
        worker.close()
        torch.set_num_threads(threads)


def test_no_cast_is_shared_where_a_step_changes_parameters_before_its_last_forward() -> None:
    """An ``OPTIM`` or ``OFFLOAD`` before the last ``F``: the cache would hand out casts of the
    old values, so that program shares none."""
    from memtrain.runtime.stage_worker import _casts_until

    _, programs = stage_programs("1f1b", 1, M)
    program = programs[0]
    last_f = max(k for k, a in enumerate(program) if a.op is Op.F)
    assert _casts_until(program) == last_f
    assert _casts_until(program[:1] + (Action(0, Op.OPTIM),) + program[1:]) is None
    assert _casts_until(program[:1] + (Action(0, Op.OFFLOAD),) + program[1:]) is None
    assert _casts_until(tuple(a for a in program if a.op is not Op.F)) is None
