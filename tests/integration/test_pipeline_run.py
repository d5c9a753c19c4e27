"""The distributed pipeline runtime on a local Ray against one process (docs/DESIGN.md rule 8).

Each case trains the tiny GPT for 3 steps (4 micro-batches of 2 sequences of 16 tokens per
replica, AdamW, seed 0) on one ``StageWorker`` actor per rank and compares every micro-batch's
loss with ``pipeline_reference``'s plain-PyTorch run of the same global batch, and each rank's
executed record with its program.

[Note: pipeline tolerances] Without data parallelism or tied embeddings every parameter's
gradient is summed in the same order as in one process (each stage's backwards and ``W``s run in
micro-batch order, a split ``W`` is the same arithmetic as a whole backward), so those cases are
bitwise (tolerance 0). Tied embeddings with their two ends in two stages (on two ranks, or two
stages of one rank, as a V's first and last) add the two ends' sums in another order than one
process (at the step's end across ranks; each stage's part as its pass runs on one rank:
runtime.stage_split), and data parallelism adds the replicas' sums, a different order: those
cases allow max |Δloss| <= 1e-5 (measured: 0 for tied embeddings, 9.5e-7 for pp=2 × dp=2).
"""

from __future__ import annotations

import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
from pipeline_reference import reference_losses

from memtrain.config import ConfigError, DataConfig, ModelConfig
from memtrain.planner.pipeline import SCHEDULES
from memtrain.planner.plan import Action, Op
from memtrain.runtime import pipeline_driver
from memtrain.runtime.pipeline_driver import PipelineError, PipelineRun, run_pipeline, stage_programs
from memtrain.runtime.stage_worker import PipelineSpec

STEPS, M, B, SEQ, SEED, LR = 3, 4, 2, 16, 0, 1e-3
UNTIED_2 = {"preset": "tiny", "overrides": {"num_layers": 2, "tie_embeddings": False}}
"""4 blocks: a stage each for the 2-rank loops and V's."""
UNTIED_6 = {"preset": "tiny", "overrides": {"num_layers": 6, "tie_embeddings": False}}
"""8 blocks: enough for the 4-rank V's 8 stages."""
TIED_2 = {"preset": "tiny", "overrides": {"num_layers": 2}}
"""The tiny preset as it is: tied embeddings."""


def _check(model: dict, schedule: str, p: int, dp: int, tol: float) -> None:
    got = run_pipeline(model=model, schedule=schedule, num_ranks=p, dp=dp, num_microbatches=M, micro_batch_size=B,
                       seq_len=SEQ, num_steps=STEPS, seed=SEED, lr=LR, timeout_s=30, step_timeout_s=120)
    want = reference_losses(model, num_steps=STEPS, num_microbatches=M * dp, micro_batch_size=B, seq_len=SEQ,
                            seed=SEED, lr=LR)
    diff = max(abs(a - b) for g, w in zip(got.microbatch_losses, want) for a, b in zip(g, w, strict=True))
    if tol == 0.0:
        assert [list(x) for x in got.microbatch_losses] == want, f"{schedule} p={p} dp={dp}: max |Δ| {diff}"
    else:
        assert diff <= tol, f"{schedule} p={p} dp={dp}: max |Δloss| {diff} > {tol}"
    assert got.losses[-1] < got.losses[0], "the loss falls"
    for step in got.records:
        for rank, record in enumerate(step):
            assert record == got.programs[rank % p], f"rank {rank}: the record differs from its program"


FAST = ("zb-h1", "v-half")
"""The two-stage cases in the default suite: a split W on a loop, and a V's local turn."""


@pytest.mark.parametrize("schedule", [pytest.param(s, marks=() if s in FAST else pytest.mark.slow) for s in SCHEDULES])
def test_two_stages_bitwise(local_ray, schedule: str) -> None:
    _check(UNTIED_2, schedule, p=2, dp=1, tol=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_four_stages_bitwise(local_ray, schedule: str) -> None:
    _check(UNTIED_6, schedule, p=4, dp=1, tol=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b", "v-half"])
def test_tied_embeddings(local_ray, schedule: str) -> None:
    """1f1b: the tied weight on ranks 0 and 1 (summed by ALLREDUCE); v-half: both on rank 0."""
    _check(TIED_2, schedule, p=2, dp=1, tol=1e-5)


@pytest.mark.slow
def test_two_stages_two_replicas(local_ray) -> None:
    _check(UNTIED_2, "1f1b", p=2, dp=2, tol=1e-5)


def test_the_next_step_runs_while_the_driver_takes_the_last_ones_results(local_ray, monkeypatch) -> None:
    """[Note: a step queued ahead] While the driver sleeps 1 s over step 2's results, the workers
    already run step 3: each waited well under that since step 2 ended (``between_s``); the first
    step, whose length is not known yet, and a step after a checkpoint are not queued ahead, so
    the workers wait for the driver before them; nor is a step after one of QUEUE_AHEAD_MAX_S or
    more."""
    def run(**kw) -> dict[int, list[float]]:
        between: dict[int, list[float]] = {}

        def on_step(k: int, loss: float, results: list, wall: float) -> None:
            between[k] = [r.between_s for r in results]
            if k == 1:
                time.sleep(1.0)

        run_pipeline(model=UNTIED_2, schedule="1f1b", num_ranks=2, num_microbatches=2, micro_batch_size=1,
                     seq_len=8, num_steps=4, timeout_s=30, step_timeout_s=60, on_step=on_step, **kw)
        return between

    saved: list[int] = []

    def on_states(done: int, states: dict) -> None:
        saved.append(done)
        time.sleep(1.0)

    between = run(save_after=lambda done: done == 3, on_states=on_states)
    assert between[0] == [0.0, 0.0]
    assert all(b < 0.5 for b in between[2]), between
    assert all(b >= 1.0 for b in between[3]), between  # after the checkpoint of step 3
    assert saved == [3]
    monkeypatch.setattr(pipeline_driver, "QUEUE_AHEAD_MAX_S", 0.0)  # every step too long to queue ahead
    between = run()
    assert all(b >= 1.0 for b in between[2]), between


def test_pinned_cpu_workers_each_run_on_a_core_of_their_own(local_ray) -> None:
    """runtime.stage_device [Note: a worker per core]: rank r on the r-th core it may use; the
    losses are those of unbound workers, bit for bit."""
    kw = dict(model=UNTIED_2, schedule="1f1b", num_ranks=2, num_microbatches=2, micro_batch_size=1, seq_len=8,
              num_steps=1, timeout_s=30, step_timeout_s=60)
    cores: list = []
    pinned = run_pipeline(**kw, pin_cores=True, on_step=lambda k, loss, res, wall: cores.append([r.core for r in res]))
    free: list = []
    loose = run_pipeline(**kw, on_step=lambda k, loss, res, wall: free.append([r.core for r in res]))
    mine = sorted(os.sched_getaffinity(0))
    assert cores == [[mine[0], mine[1 % len(mine)]]] and free == [[None, None]]
    assert pinned.microbatch_losses == loose.microbatch_losses


def _run(programs_edit=None, *, timeout_s: float = 30.0, step_timeout_s: float = 60.0) -> PipelineRun:
    place, programs = stage_programs("1f1b", 2, 2)
    if programs_edit is not None:
        programs = programs_edit(programs)
    spec = PipelineSpec(model=ModelConfig(**UNTIED_2), partition=(2, 2), rank_of=place.rank_of, num_ranks=2, dp=1,
                        num_microbatches=2, micro_batch_size=1, seq_len=8, seed=0, data=DataConfig(),
                        timeout_s=timeout_s)
    return PipelineRun(spec, programs, step_timeout_s=step_timeout_s)


def _receive_never_sent(programs):
    return {0: programs[0], 1: (Action(1, Op.RECV_F, 9),) + programs[1]}


def test_worker_killed_mid_step_is_named_without_waiting_for_timeouts(local_ray) -> None:
    """Rank 1 waits on a receive (comm timeout 60 s) when rank 0 is killed: the run stops within
    seconds, naming rank 0's death first and rank 1's lost transfer."""
    with _run(_receive_never_sent, timeout_s=60.0) as run:
        run.step_timeout_s = 60.0
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(run.step, 0)
            time.sleep(1.0)
            t0 = time.monotonic()
            ray.kill(run.workers[0], no_restart=True)
            with pytest.raises(PipelineError) as err:
                future.result()
        assert time.monotonic() - t0 < 30.0
    assert re.match(r"pipeline: rank 0 \(stages 0\) died during step 1: .*; "
                    r"rank 1 \(stages 1\) failed during step 1: CommError: rank 1: 1RECV_F9 from rank 0 failed", str(err.value)), \
        str(err.value)


@pytest.mark.slow
def test_killed_worker_is_named_at_the_next_step(local_ray) -> None:
    with _run() as run:
        run.step(0)
        ray.kill(run.workers[1], no_restart=True)
        with pytest.raises(PipelineError, match=r"rank 1 \(stages 1\) died during step 2"):
            run.step(1)


@pytest.mark.slow
def test_comm_timeout_names_rank_peer_and_action(local_ray) -> None:
    with _run(_receive_never_sent, timeout_s=2.0) as run:
        # both ranks wait 2 s on a receive; whichever times out first is named (the other may then
        # see its peer's connection close instead)
        with pytest.raises(PipelineError, match=r"rank (1: 1RECV_F9 from rank 0|0: 0RECV_B0 from rank 1) timed out after 2 s"):
            run.step(0)


@pytest.mark.slow
def test_hung_worker_is_named(local_ray) -> None:
    with _run(_receive_never_sent, timeout_s=600.0, step_timeout_s=3.0) as run:
        with pytest.raises(PipelineError, match=r"rank 0 \(stages 0\), rank 1 \(stages 1\) did not finish step 1 within 3 s"):
            run.step(0)


def test_bad_partition_or_too_few_cpus_is_a_config_error(local_ray) -> None:
    with pytest.raises(ConfigError, match=r"partition: 1f1b over 2 ranks has 2 stages"):
        run_pipeline(model=UNTIED_2, schedule="1f1b", num_ranks=2, partition=(1, 1, 2))
    with pytest.raises(ConfigError, match=r"num_ranks × dp: 8 workers of 1 CPU need 8 CPUs, the Ray cluster has 4"):
        run_pipeline(model=UNTIED_6, schedule="1f1b", num_ranks=4, dp=2)
