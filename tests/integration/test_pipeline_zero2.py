"""ZeRO-2 in the pipeline runtime (runtime.stage_zero [Note: ZeRO-2 in a pipeline]), on a local Ray.

Same cases as test_pipeline_offload.py (the tiny GPT, 2 steps of 4 micro-batches of 2 sequences of
16 tokens per replica, AdamW, seed 0), 2 pipeline ranks × 2 replicas. Tolerance: bitwise against
ZeRO-1 and against data parallelism without sharding ([Note: ZeRO-1 parity]: with 2 replicas each
sum is of two terms, and the update is elementwise whatever the buckets).
"""

from __future__ import annotations

import pytest

from memtrain.config import ConfigError
from memtrain.planner.plan import Op
from memtrain.runtime.pipeline_driver import PipelineResult, run_pipeline
from memtrain.runtime.stage_zero import MAX_IN_FLIGHT
from pipeline_reference import check_zero2_records  # noqa: E402 (tests/integration on the path)

STEPS, M, B, SEQ, SEED, LR = 2, 4, 2, 16, 0, 1e-3
UNTIED_2 = {"preset": "tiny", "overrides": {"num_layers": 2, "tie_embeddings": False}}
TIED_2 = {"preset": "tiny", "overrides": {"num_layers": 2}}
BUCKET = 4096
"""Elements per ZeRO-2 bucket here: several buckets per stage of the tiny GPT."""
TABLE = 256 * 64
"""The tiny GPT's embedding table (vocabulary × width): a bucket of its own."""


def _run(model: dict, schedule: str, zero: int, **kw) -> PipelineResult:
    return run_pipeline(model=model, schedule=schedule, num_ranks=2, dp=2, num_microbatches=M, micro_batch_size=B,
                        seq_len=SEQ, num_steps=STEPS, seed=SEED, lr=LR, timeout_s=30, step_timeout_s=120, zero=zero,
                        **kw)


def _check_records(got: PipelineResult) -> None:
    check_zero2_records(got, M, [Op.ALLREDUCE, Op.OPTIM])


@pytest.mark.parametrize(("model", "schedule"), [(UNTIED_2, "1f1b"), (TIED_2, "zb-h1")])
def test_zero2_is_bitwise_zero1_and_plain_data_parallelism(local_ray, model, schedule) -> None:
    """pp2 × dp2: ZeRO-2's losses bitwise ZeRO-1's and plain data parallelism's (1f1b: hooks on
    the whole backward; zb-h1: the split W reporting its parameters, and the tied embedding's
    bucket started at ALLREDUCE after the tie's sum); the executed records are the programs; after
    the sum each rank holds half its stages' gradients, and while summing never the gradient
    twice over (ZeRO-0 and ZeRO-1 copy it whole into one flat buffer)."""
    plain = _run(model, schedule, 0)
    zero1 = _run(model, schedule, 1)
    zero2 = _run(model, schedule, 2, zero_bucket_elems=BUCKET)
    assert zero2.microbatch_losses == zero1.microbatch_losses == plain.microbatch_losses
    assert zero2.losses[-1] < zero2.losses[0]
    _check_records(zero2)
    assert not any(Op.REDUCE_SCATTER.value in a for p in zero1.programs for a in p)
    for step in range(STEPS):
        for rank in range(4):
            full, g1, g2 = (res.grad_bytes[step][rank] for res in (plain, zero1, zero2))
            # after the sum: the shard, half the stage's gradients (to half an element per bucket)
            assert 0.49 < g2["at_optim"] / full["at_optim"] < 0.51 and 0.49 < g1["at_optim"] / full["at_optim"] < 0.51
            # while summing: ZeRO-0/1 the gradient and its flat copy, ZeRO-2 the gradient and a few buckets
            assert full["reduce_peak"] == 2 * full["at_optim"] and g1["reduce_peak"] >= 2 * full["at_optim"] - 8
            assert g2["reduce_peak"] <= full["at_optim"] + 4 * MAX_IN_FLIGHT * max(BUCKET, TABLE), (g2, full)
            assert g2["reduce_peak"] < g1["reduce_peak"]


def test_zero2_refusals(local_ray) -> None:
    """What ZeRO-2 does not combine with is refused before any worker starts, naming the field."""
    with pytest.raises(ConfigError, match=r"zero: 2 shards across the data-parallel replicas and dp is 1"):
        run_pipeline(model=UNTIED_2, num_ranks=2, dp=1, zero=2, num_steps=1)
    with pytest.raises(ConfigError, match=r"zero_bucket_elems: a whole number >= 1"):
        _run(UNTIED_2, "1f1b", 2, zero_bucket_elems=0)
