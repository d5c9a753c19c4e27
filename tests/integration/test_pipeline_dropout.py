"""Dropout in the distributed pipeline draws what one process draws (runtime.stage_rng).

The tiny GPT with dropout 0.1 trains 3 steps on a local Ray (4 micro-batches of 2 sequences of
16 tokens per replica, AdamW, seed 0); every micro-batch's loss equals ``pipeline_reference``'s
plain-PyTorch run of the same global batch (its masks drawn from one generator, micro-batch by
micro-batch, block by block): bitwise where the arithmetic is the same, within
test_pipeline_run's [Note: pipeline tolerances] where replicas or tied ends on two ranks sum
gradients in another order (the first step's losses, before any update, bitwise there too).
Dropout moves the losses far more than those tolerances (``test_dropout_masks_matter``); each
worker drawing from its own stream, as before the walk, is 3e-2 off from step 1 on
(``bench/pipeline_dropout.py``'s ``own stream``).
"""

from __future__ import annotations

import pytest
from pipeline_reference import reference_losses

from memtrain.planner.pipeline import SCHEDULES
from memtrain.runtime.pipeline_driver import PipelineResult, run_pipeline

STEPS, M, B, SEQ, SEED, LR = 3, 4, 2, 16, 0, 1e-3
UNTIED = {"preset": "tiny", "overrides": {"num_layers": 2, "tie_embeddings": False, "dropout": 0.1}}
TIED = {"preset": "tiny", "overrides": {"num_layers": 2, "dropout": 0.1}}


def _run(model: dict, schedule: str, dp: int = 1, **kw) -> PipelineResult:
    return run_pipeline(model=model, schedule=schedule, num_ranks=2, dp=dp, num_microbatches=M, micro_batch_size=B,
                        seq_len=SEQ, num_steps=STEPS, seed=SEED, lr=LR, timeout_s=30, step_timeout_s=120, **kw)


def _want(model: dict, dp: int = 1, **kw) -> list[list[float]]:
    return reference_losses(model, num_steps=STEPS, num_microbatches=M * dp, micro_batch_size=B, seq_len=SEQ,
                            seed=SEED, lr=LR, **kw)


def _check(got: PipelineResult, want: list[list[float]], tol: float = 0.0) -> None:
    got_losses = [list(x) for x in got.microbatch_losses]
    diff = max(abs(a - b) for g, w in zip(got_losses, want, strict=True) for a, b in zip(g, w, strict=True))
    assert got_losses[0] == want[0], f"step 1: max |Δ| {diff}"
    if tol == 0.0:
        assert got_losses == want, f"max |Δ| {diff}"
    else:
        assert diff <= tol, f"max |Δloss| {diff} > {tol}"
    for step in got.records:
        for rank, record in enumerate(step):
            assert record == got.programs[rank % 2], f"rank {rank}: the record differs from its program"


FAST = ("1f1b", "interleaved-1f1b")
"""In the default suite: a loop, virtual stages (two per rank); a split backward (zb-h1) is
there under recompute (``test_dropout_recompute_and_swap``)."""


@pytest.mark.parametrize("schedule", [pytest.param(s, marks=() if s in FAST else pytest.mark.slow) for s in SCHEDULES])
def test_dropout_bitwise(local_ray, schedule: str) -> None:
    _check(_run(UNTIED, schedule), _want(UNTIED))


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["v-half", "1f1b"])
def test_dropout_tied_embeddings(local_ray, schedule: str) -> None:
    """v-half: both ends on rank 0; 1f1b: the table on both ranks, summed at ALLREDUCE. Either
    sums the table's two gradients in another order than one process (with dropout measured
    4.8e-7 from step 2 on for v-half), so the first step only is bitwise."""
    _check(_run(TIED, schedule), _want(TIED), tol=1e-5)


def test_dropout_two_replicas(local_ray) -> None:
    """Replica ``d``'s micro-batch ``i`` draws as one process's global micro-batch ``d * m + i``."""
    _check(_run(UNTIED, "1f1b", dp=2), _want(UNTIED, dp=2), tol=1e-5)


def test_dropout_masks_matter() -> None:
    """The checks have teeth: dropout moves one process's losses far more than the tolerances."""
    no_dropout = {**UNTIED, "overrides": {**UNTIED["overrides"], "dropout": 0.0}}
    want, plain = _want(UNTIED), _want(no_dropout)
    assert min(abs(a - b) for a, b in zip(plain[0], want[0])) > 1e-3


def test_dropout_resume(local_ray) -> None:
    """A checkpoint after step 1 holds the generator at one process's state there: the resumed
    run's steps 2 and 3 are bitwise the run that went on; tied embeddings on both ranks, as one
    process within the tolerance."""
    saved: dict[int, dict] = {}
    whole = _run(TIED, "1f1b", save_after=lambda k: k == 1, on_states=lambda k, states: saved.update(states))
    resumed = _run(TIED, "1f1b", start_step=1, states=saved)
    assert resumed.microbatch_losses == whole.microbatch_losses[1:]
    _check(whole, _want(TIED), tol=1e-5)


@pytest.mark.parametrize(("schedule", "acts"), [("zb-h1", "recompute"),
                                                pytest.param("1f1b", "swap_host", marks=pytest.mark.slow),
                                                pytest.param("v-min", "recompute", marks=pytest.mark.slow)])
def test_dropout_recompute_and_swap(local_ray, schedule: str, acts: str) -> None:
    """A recomputed block replays its forward's masks (checkpoint restores the generator after),
    a swapped one keeps them: bitwise keep's, so one process's."""
    _check(_run(UNTIED, schedule, activations=acts), _want(UNTIED))


@pytest.mark.slow
@pytest.mark.parametrize(("homes", "dp", "zero"), [(("host", "device"), 1, 0), (("host", "device"), 2, 2)])
def test_dropout_offloaded_stages(local_ray, homes, dp: int, zero: int) -> None:
    _check(_run(UNTIED, "1f1b", dp=dp, zero=zero, offload=homes), _want(UNTIED, dp=dp), tol=0.0 if dp == 1 else 1e-5)


@pytest.mark.slow
def test_dropout_bf16(local_ray) -> None:
    """Under autocast the masks are drawn at the dtypes one process's are (traced under it)."""
    _check(_run(UNTIED, "1f1b", dtype="bf16"), _want(UNTIED, bf16=True))
