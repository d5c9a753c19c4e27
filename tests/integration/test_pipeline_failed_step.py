"""A failed step on a local Ray (runtime.stage_failure [Note: a failed step poisons the worker]).

pp 2 × dp 2, zb-h1, ZeRO-2 in buckets of 4096 elements, the tiny GPT (2 layers, tied embeddings,
dropout 0.1), 4 micro-batches of 2 sequences of 16 tokens per replica, transfers and collectives
bounded by 3 s. Step 0 runs (so the fixed-shape channels post their receives early from step 1
on); in step 1, world rank 1 (stage 1, replica 0) fails after its first backward, with a receive
posted and not taken, and world rank 3 (stage 1, replica 1) after its last ``W``, with ZeRO-2
buckets under way; the other two then fail on their transfers and collectives (a peer's
``CommError``). Every rank must have given back what the step held and refuse the next step,
naming itself and the failed step.
"""

from __future__ import annotations

import sys

import pytest
import ray

from memtrain.config import ModelConfig
from memtrain.planner.plan import Op
from memtrain.runtime.pipeline_driver import PipelineError, PipelineRun, stage_programs
from memtrain.runtime.stage_worker import PipelineSpec

M, B, SEQ, TIMEOUT_S = 4, 2, 16, 3.0
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # its functions run in the workers (__ray_call__)


def _fail_at(op: Op, microbatch: int):
    """For ``__ray_call__``: the worker's ``op`` handler raises after running at ``microbatch``."""
    def install(worker) -> None:
        inner = worker.handlers[op]

        def handler(a):
            inner(a)
            if a.microbatch == microbatch:
                raise ValueError(f"rank {worker.rank}: a bad batch found after {a}")
        worker.handlers[op] = handler
    return install


def _generator(worker):
    from memtrain.runtime.stage_rng import get_state

    return get_state(worker.device)


def _left(worker) -> dict:
    """What the worker holds of its failed step (all empty or zero when it gave everything back)."""
    from memtrain.runtime.stage_rng import get_state

    return {
        "per-step": [k for k in ("inbox", "outbox", "saved", "for_w") if getattr(worker, k)],
        "grads": sum(q.grad is not None for ps in worker.uses.values() for q in ps),
        "zero": [(s, len(o._pending), len(o._pieces), o._grad is not None, o._armed, o._grads.total)
                 for s, o in worker.optims.items() if o._pending or o._pieces or o._grad is not None or o._armed
                 or o._grads.total],
        "activations": worker.acts.device_ledger.in_use_bytes,
        "rng": (worker.rng._at, worker.rng._end),
        "generator": get_state(worker.device),
        "posted": sorted(worker.channel._posted),
        "failed": worker.failed_step,
    }


def test_a_failed_step_leaves_every_rank_poisoned_and_empty(local_ray) -> None:
    model = ModelConfig(preset="tiny", overrides={"num_layers": 2, "dropout": 0.1})
    place, programs = stage_programs("zb-h1", 2, M, zero=2)
    spec = PipelineSpec(model=model, partition=(2, 2), rank_of=place.rank_of, num_ranks=2, dp=2, num_microbatches=M,
                        micro_batch_size=B, seq_len=SEQ, seed=0, timeout_s=TIMEOUT_S, zero=2, zero_bucket_elems=4096)
    with PipelineRun(spec, programs, step_timeout_s=120) as run:
        first = run.step(0)
        assert all(len(r.losses) == M for r in (first[1], first[3]))
        w = run.workers
        start = ray.get([x.__ray_call__.remote(_generator) for x in w])  # each generator at step 1's start
        ray.get([w[1].__ray_call__.remote(_fail_at(Op.B, 0)), w[3].__ray_call__.remote(_fail_at(Op.W, M - 1))])
        with pytest.raises(PipelineError) as failed:
            run.step(1)
        text = str(failed.value)
        assert "ValueError: rank 1: a bad batch found after 1B0" in text
        assert f"ValueError: rank 3: a bad batch found after 1W{M - 1}" in text
        left = ray.get([x.__ray_call__.remote(_left) for x in w])  # after each rank's step ended (the driver's
        # grace may end first: ranks 0 and 2 wait out their transfers' and collectives' timeouts)
        for r, got in enumerate(left):
            assert got["per-step"] == [] and got["grads"] == 0 and got["zero"] == [], (r, got)
            assert got["activations"] == 0 and got["rng"] == ({}, None), (r, got)
            assert (got["generator"] == start[r]).all(), f"rank {r}: the dropout walk was not undone"
            cause = "ValueError" if r in (1, 3) else f"CommError: rank {r}:"  # ranks 0 and 2: a peer's failure
            assert got["failed"].startswith(f"rank {r}: run_step(1) failed ({cause}"), got["failed"]
        # why no retry: rank 1's receives posted early for the step are still posted (gloo cannot
        # take them back); a retry's receive on one of those tags would not be the one it waits for
        assert left[1]["posted"], "rank 1 failed after 1B0, before which it posted 1RECV_F1"
        with pytest.raises(PipelineError) as again:
            run.step(2)
        for r in range(4):
            assert f"StepFailed: run_step(2) refused: rank {r}: run_step(1) failed" in str(again.value)
        with pytest.raises(PipelineError, match=r"StepFailed: state\(\) refused: rank 0: run_step\(1\) failed"):
            run.states()
        # what a poisoned worker still does: leave its world, its receives posted or not
        closed, _ = ray.wait([x.close.remote() for x in w], num_returns=4, timeout=20)
        assert ray.get(closed) == [None] * 4
