"""ZeRO-2 of offloaded pipeline stages (runtime.stage_offload_zero), on a local Ray.

The tiny GPT, 2 steps of 4 micro-batches of 2 sequences of 16 tokens per replica, AdamW, seed 0,
2 pipeline ranks × 2 replicas, stages' states in host chunks and NVMe files (real files under
tmp). Tolerance: bitwise against ZeRO-1 and against data parallelism without sharding (a reduce
of two terms is the all-reduce's sum; the update is elementwise, [Note: ZeRO-2 of an offloaded
stage]).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from memtrain.planner.plan import Op
from memtrain.runtime.pipeline_driver import PipelineResult, run_pipeline
from memtrain.runtime.stage_offload_zero import MAX_IN_FLIGHT
from pipeline_reference import check_zero2_records  # noqa: E402 (tests/integration on the path)

STEPS, M, B, SEQ, SEED, LR = 2, 4, 2, 16, 0, 1e-3
UNTIED_2 = {"preset": "tiny", "overrides": {"num_layers": 2, "tie_embeddings": False}}
TIED_2 = {"preset": "tiny", "overrides": {"num_layers": 2}}
CHUNK = 8192
"""Elements per chunk: several chunks per stage of the tiny GPT (the table, 256 × 64, is two)."""


def _run(model: dict, schedule: str, zero: int, homes: tuple[str, ...], nvme_dir: Path) -> PipelineResult:
    return run_pipeline(model=model, schedule=schedule, num_ranks=2, dp=2, num_microbatches=M, micro_batch_size=B,
                        seq_len=SEQ, num_steps=STEPS, seed=SEED, lr=LR, timeout_s=30, step_timeout_s=120, zero=zero,
                        offload=homes, nvme_dir=str(nvme_dir / f"z{zero}"), offload_chunk_elems=CHUNK)


def _check_records(got: PipelineResult) -> None:
    check_zero2_records(got, M, [Op.ALLREDUCE, Op.OFFLOAD, Op.OPTIM])


def test_zero2_of_host_and_nvme_stages_is_bitwise_zero1_and_zero0(local_ray, tmp_path: Path) -> None:
    """pp2 × dp2, stage 0 in host chunks, stage 1 in NVMe files, 1f1b (the backward's hooks):
    losses bitwise ZeRO-1's and ZeRO-0's; executed == programs; after the sum each replica holds
    about half its stage's gradients (ZeRO-0 and -1 all of them), while summing less than ZeRO-1's
    gradient and flat copy; optimizer states about half (as ZeRO-1)."""
    homes = ("host", "nvme")
    runs = {z: _run(UNTIED_2, "1f1b", z, homes, tmp_path) for z in (0, 1, 2)}
    assert runs[2].microbatch_losses == runs[1].microbatch_losses == runs[0].microbatch_losses
    assert runs[2].losses[-1] < runs[2].losses[0]
    _check_records(runs[2])
    assert not any(Op.REDUCE_SCATTER.value in a for p in runs[1].programs for a in p)
    for step in range(STEPS):
        for rank in range(4):
            full, g1, g2 = (runs[z].grad_bytes[step][rank] for z in (0, 1, 2))
            assert g1["offloaded_after"] == full["offloaded_after"] > 0
            assert 0.3 < g2["offloaded_after"] / full["offloaded_after"] < 0.7, (rank, g2, full)
            assert g1["reduce_peak"] == 2 * full["offloaded_after"]
            assert g2["reduce_peak"] <= full["offloaded_after"] + MAX_IN_FLIGHT * CHUNK * 4 * 2, (g2, full)
            assert g2["reduce_peak"] < g1["reduce_peak"]
    for r in (0, 1):  # per stage, the replicas' states add up to one replica's without sharding
        full = runs[0].state_bytes[r]["optimizer_states"]
        halves = [runs[2].state_bytes[rank]["optimizer_states"] for rank in (r, r + 2)]
        assert sum(halves) == full and all(0.3 < h / full < 0.7 for h in halves), (full, halves)
        assert [runs[2].state_bytes[k][t] for k in (r, r + 2) for t in ("host", "nvme")] == [
            runs[1].state_bytes[k][t] for k in (r, r + 2) for t in ("host", "nvme")]


@pytest.mark.slow
def test_zero2_of_offloaded_tied_stages_under_a_split_backward(local_ray, tmp_path: Path) -> None:
    """zb-h1 (the W reports its parameters), the tied embedding across the ranks (its chunks go at
    ALLREDUCE, after the tie's sum), stage 0 in NVMe files, stage 1 in host chunks: bitwise ZeRO-1."""
    homes = ("nvme", "host")
    zero1, zero2 = (_run(TIED_2, "zb-h1", z, homes, tmp_path) for z in (1, 2))
    assert zero2.microbatch_losses == zero1.microbatch_losses
    _check_records(zero2)


@pytest.mark.slow
def test_zero2_of_an_offloaded_stage_clips_as_zero1(local_ray, tmp_path: Path) -> None:
    """``max_grad_norm``: the CLIP takes an offloaded ZeRO-2 stage's norms from its own chunks'
    sums (runtime.stage_clip) and scales them: norms and losses bitwise ZeRO-1's."""
    homes = ("host", "device")
    got = {z: run_pipeline(model=UNTIED_2, schedule="1f1b", num_ranks=2, dp=2, num_microbatches=M,
                           micro_batch_size=B, seq_len=SEQ, num_steps=STEPS, seed=SEED, lr=LR, timeout_s=30,
                           step_timeout_s=120, zero=z, offload=homes, offload_chunk_elems=CHUNK, max_grad_norm=0.05)
           for z in (1, 2)}
    assert got[2].grad_norms == got[1].grad_norms and all(n > 0.05 for n in got[2].grad_norms)
    assert got[2].microbatch_losses == got[1].microbatch_losses
