"""Recompute and swap under the split-backward schedules (zb-h1, v-half, v-min) on a local Ray,
2 ranks, against one process (runtime.stage_activations [Note: recompute and swap under a split
backward]).

The tiny GPT (4 blocks, untied), 2 steps of 4 micro-batches of 2 sequences of 16 tokens, AdamW,
seed 0. Every stage's blocks recompute, swap to the host or swap to NVMe files (under a tmp
dir); the losses are bitwise the run that keeps everything and, without dropout, bitwise plain
PyTorch in one process; each rank's measured peak of activation bytes (the ledger) is the
pipeline simulator's for the program it ran with analyze's per-block bytes, within 10%
(planner.stage_cost [Note: activations between B and W]); the record equals the program.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pipeline_reference import config_reference_losses, reference_losses

from memtrain.config import ModelConfig
from memtrain.planner.analyze import analyze
from memtrain.planner.pipeline import placement
from memtrain.planner.plan import Action, Op, Plan
from memtrain.planner.simulate_pipeline import Link, StageCost, simulate_pipeline
from memtrain.runtime.config_file import load_config
from memtrain.runtime.distributed import run_distributed
from memtrain.runtime.pipeline_driver import PipelineResult, run_pipeline

STEPS, M, B, SEQ, SEED, LR = 2, 4, 2, 16, 0, 1e-3
UNTIED_2 = {"preset": "tiny", "overrides": {"num_layers": 2, "tie_embeddings": False}}
SWAPS = (Op.SWAP_OUT, Op.SWAP_IN)


def _run(schedule: str, model: dict = UNTIED_2, **kw) -> PipelineResult:
    return run_pipeline(model=model, schedule=schedule, num_ranks=2, num_microbatches=M, micro_batch_size=B,
                        seq_len=SEQ, num_steps=STEPS, seed=SEED, lr=LR, timeout_s=30, step_timeout_s=120, **kw)


def _predicted(schedule: str, got: PipelineResult, acts: tuple[tuple[str, ...], ...]) -> list[int]:
    """Per rank, the simulator's peak of activation bytes on the programs the ranks ran."""
    stats = analyze(ModelConfig(**UNTIED_2), seq_len=SEQ, micro_batch_size=B, dtype="fp32")
    place = placement(schedule, 2)
    programs = {r: tuple(a for a in map(Action.parse, prog) if a.op not in SWAPS)
                for r, prog in enumerate(got.programs)}
    costs, first = [], 0
    for ps in acts:
        blocks = stats.blocks[first:first + len(ps)]
        first += len(ps)
        held = sum(b.activation_bytes if p == "keep" else b.input_bytes if p == "recompute" else 0
                   for b, p in zip(blocks, ps))
        back = sum(b.activation_bytes for b, p in zip(blocks, ps) if p != "keep")
        costs.append(StageCost(fwd_s=1.0, bwd_s=1.0, wgrad_s=1.0, activation_bytes=held, bw_bytes=back,
                               output_bytes=blocks[-1].output_bytes))
    peaks = simulate_pipeline(programs, place, costs, Link(gbps=1.0)).act_peak_bytes  # the received buffers apart
    return [peaks[r] for r in range(2)]


MIXED = {"zb-h1": (("recompute", "swap_host"), ("swap_nvme", "recompute")),
         "v-half": (("recompute",), ("swap_host",), ("swap_nvme",), ("recompute",)),
         "v-min": (("swap_host",), ("recompute",), ("recompute",), ("swap_nvme",))}


@pytest.mark.parametrize("schedule", ["zb-h1", "v-half", "v-min"])
def test_split_backward_recompute_and_swaps_are_one_process(local_ray, schedule, tmp_path: Path) -> None:
    acts = MIXED[schedule]
    (tmp_path / "nvme").mkdir()
    got = _run(schedule, activations=acts, nvme_dir=str(tmp_path / "nvme" / "run"))
    want = reference_losses(UNTIED_2, num_steps=STEPS, num_microbatches=M, micro_batch_size=B, seq_len=SEQ,
                            seed=SEED, lr=LR)
    assert [list(x) for x in got.microbatch_losses] == want
    for step in got.records:
        assert [tuple(r) for r in step] == [tuple(p) for p in got.programs]
    ops = {Action.parse(a).op for prog in got.programs for a in prog}
    assert {Op.W, Op.SWAP_OUT, Op.SWAP_IN} <= ops
    measured = [got.peak_bytes[-1][r]["activations"] for r in range(2)]
    assert measured == [pytest.approx(x, rel=0.1) for x in _predicted(schedule, got, acts)]
    assert not list((tmp_path / "nvme").rglob("*.*")), "swap files left behind"


def test_bf16_recompute_with_dropout_is_bitwise_keep(local_ray) -> None:
    model = {"preset": "tiny", "overrides": {"num_layers": 2, "tie_embeddings": False, "dropout": 0.1}}
    keep = _run("zb-h1", model, dtype="bf16")
    rec = _run("zb-h1", model, dtype="bf16", activations="recompute")
    assert rec.microbatch_losses == keep.microbatch_losses  # the masks replayed, under the same autocast
    assert rec.programs == keep.programs  # the replay is inside the B: no action of its own


def test_memtrain_run_swaps_under_zb_h1_as_its_plan_says(local_ray, tmp_path: Path) -> None:
    """``parallel.schedule: zb-h1`` with ``memory.activations: swap_host``: planned (no longer
    refused), its program's ``SWAP_OUT``/``SWAP_IN`` in plan.json are what each rank ran."""
    cfg = load_config("examples/gpt-tiny-pp2.yaml", ["train.steps=2", "train.seq_len=16", "parallel.schedule=zb-h1",
                                                     "memory.activations=swap_host", f"run_dir={tmp_path}/run"])
    out = run_distributed(cfg, print_fn=lambda _: None)
    plan = Plan.load(tmp_path / "run" / "plan.json")
    assert plan.pipeline.schedule_kind == "zb-h1"
    assert [rp.offload for rp in plan.pipeline.ranks] == [f"stage {s}: activations swapped to the host" for s in (0, 1)]
    ops = {a.op for prog in plan.schedule.values() for a in prog}
    assert {Op.W, Op.SWAP_OUT, Op.SWAP_IN} <= ops
    for step in out["result"].records:
        assert [list(r) for r in step] == [[str(a) for a in plan.schedule[rank]] for rank in range(2)]
    ref = config_reference_losses(cfg)
    # tied embeddings across the two ranks: their gradients are summed in another order (1e-6)
    assert [list(x) for x in out["result"].microbatch_losses] == [pytest.approx(x, rel=1e-6, abs=0) for x in ref]
