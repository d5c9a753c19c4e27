"""planner.pipeline_sends on a local Ray: a worker lets go of each sent tensor where the
programs prove its transfer over ([Note: a send known to be over]), so the sent tensors a rank
holds at once are what the planner's walk of its program says, not every micro-batch's, and the
losses stay plain PyTorch's."""

from __future__ import annotations

import pytest
from pipeline_reference import reference_losses

from memtrain.models.gpt import gpt_config
from memtrain.planner.pipeline_sends import send_releases, sent_peak_bytes
from memtrain.planner.plan import Op
from memtrain.runtime.pipeline_driver import run_pipeline, stage_programs

M, B, SEQ = 8, 2, 16
UNTIED_2 = {"preset": "tiny", "overrides": {"num_layers": 2, "tie_embeddings": False}}


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_a_rank_holds_the_sent_tensors_its_program_says(local_ray, schedule: str) -> None:
    got = run_pipeline(model=UNTIED_2, schedule=schedule, num_ranks=2, num_microbatches=M, micro_batch_size=B,
                       seq_len=SEQ, num_steps=2, seed=0, lr=1e-3, timeout_s=30, step_timeout_s=120)
    want = reference_losses(UNTIED_2, num_steps=2, num_microbatches=M, micro_batch_size=B, seq_len=SEQ, seed=0,
                            lr=1e-3)
    assert [list(x) for x in got.microbatch_losses] == want
    place, programs = stage_programs(schedule, 2, M)
    releases = send_releases(programs, place.rank_of)
    hidden = gpt_config(UNTIED_2["preset"], **UNTIED_2["overrides"]).hidden_size
    boundary = B * SEQ * hidden * 4  # fp32 hidden states and their gradients
    for r in range(2):
        sends = sum(a.op in (Op.SEND_F, Op.SEND_B) for a in programs[r])
        want_peak = sent_peak_bytes(programs[r], releases[r], lambda a: boundary)
        assert want_peak <= 3 * boundary < sends * boundary  # a few, not all of the step's
        assert [step[r]["sent"] for step in got.peak_bytes] == [want_peak] * 2, f"rank {r}"
