"""runtime/stage_worker.py and the driver's lowering, in this process without Ray: a one-rank
world (gloo over loopback) runs its program through the handler table and records it."""

from __future__ import annotations

import os

import pytest
import torch

from memtrain.config import ConfigError, ModelConfig
from memtrain.planner.plan import Action, Op
from memtrain.runtime.pipeline_driver import even_partition, stage_programs
from memtrain.runtime.stage_worker import PipelineSpec, StageWorker, block_ranges


def test_programs_end_with_each_stages_sum_and_step() -> None:
    place, programs = stage_programs("v-half", 2, 4)
    assert place.rank_of == (0, 1, 1, 0)
    for r, acts in programs.items():
        stages = place.stages_of(r)
        assert [str(a) for a in acts[-2 * len(stages):]] == [f"{s}{op}" for s in stages for op in ("ALLREDUCE", "OPTIM")]
    # the V's turn (stages 1 and 2, both on rank 1) passes its tensors locally; the other links send
    assert Action(1, Op.SEND_F, 0) not in programs[1] and Action(2, Op.RECV_F, 0) not in programs[1]
    assert Action(0, Op.SEND_F, 0) in programs[0] and Action(1, Op.RECV_F, 0) in programs[1]


def test_even_partition() -> None:
    assert even_partition(8, 3) == (3, 3, 2)
    assert [list(r) for r in block_ranges((3, 3, 2))] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    with pytest.raises(ConfigError, match="partition: 9 stages"):
        even_partition(8, 9)


def _one_rank(program: tuple[Action, ...]) -> StageWorker:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    spec = PipelineSpec(model=ModelConfig(preset="tiny", overrides={"num_layers": 1}), partition=(3,), rank_of=(0,),
                        num_ranks=1, dp=1, num_microbatches=2, micro_batch_size=1, seq_len=8, seed=0, timeout_s=10)
    worker = StageWorker(spec, 0, program)
    worker.build(*worker.open_store("127.0.0.1"))
    return worker


def test_one_rank_records_its_program_and_fails_loudly_on_an_unknown_op() -> None:
    threads = torch.get_num_threads()
    _, programs = stage_programs("1f1b", 1, 2)
    worker = _one_rank(programs[0])
    try:
        first = worker.run_step(0)
        assert first.record == tuple(str(a) for a in programs[0])
        assert len(first.losses) == 2 and all(torch.isfinite(torch.tensor(first.losses)))
        assert worker.run_step(0).losses != first.losses  # the step updated the weights
        worker.program = programs[0] + (Action(0, Op.SNAPSHOT),)
        with pytest.raises(RuntimeError, match=r"rank 0: no handler for op SNAPSHOT \(0SNAPSHOT\)"):
            worker.run_step(1)
    finally:
        worker.close()
        torch.set_num_threads(threads)


def test_busy_time_counts_compute_actions_only():
    from memtrain.runtime.stage_worker import StepResult

    r = StepResult(record=("0F0", "0SEND_F0", "1RECV_B0", "0B0", "0W0", "0ALLREDUCE", "0OPTIM"), losses=(), time_s=30.0,
                   action_s=(1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0))
    assert r.busy_s == 1.0 + 8.0 + 16.0 + 64.0
