"""Per-stage activation policies in the pipeline runtime, on a local Ray, against one process.

The tiny GPT, 3 steps of 4 micro-batches of 2 sequences of 16 tokens, AdamW, seed 0 (as
test_pipeline_run.py). A stage's blocks keep, recompute or swap their saved activations
(runtime.stage_activations, the single-process engine's ActivationManager); recompute replays
the RNG state of the forward and a swap copies byte for byte, so the losses are bitwise the
run that keeps everything (with dropout too) and, without dropout or cross-rank tied weights,
bitwise one process's. Each rank's measured peak of activation bytes
(``StepResult.peak_bytes["activations"]``, the ledger of docs/memory-accounting.md) is what the
planner's stage model predicts (planner.stage_cost: a held micro-batch keeps every block's A,
or under recompute only the blocks' inputs I plus the largest A while it is rebuilt), within
10%; analyze's bytes are per-tensor estimates of the same saved tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pipeline_reference import config_reference_losses, reference_losses

from memtrain.config import ConfigError, ModelConfig
from memtrain.planner.analyze import analyze
from memtrain.planner.plan import Plan
from memtrain.runtime.config_file import load_config
from memtrain.runtime.distributed import run_distributed
from memtrain.runtime.pipeline_driver import PipelineResult, run_pipeline
from memtrain.runtime.stage_worker import block_ranges

STEPS, M, B, SEQ, SEED, LR = 3, 4, 2, 16, 0, 1e-3
UNTIED_2 = {"preset": "tiny", "overrides": {"num_layers": 2, "tie_embeddings": False}}


def _run(model: dict, schedule: str, p: int, **kw) -> PipelineResult:
    return run_pipeline(model=model, schedule=schedule, num_ranks=p, num_microbatches=M, micro_batch_size=B,
                        seq_len=SEQ, num_steps=STEPS, seed=SEED, lr=LR, timeout_s=30, step_timeout_s=120, **kw)


def _records_are_programs(got: PipelineResult) -> None:
    p = len(got.programs)
    for step in got.records:
        for rank, record in enumerate(step):
            assert record == got.programs[rank % p], f"rank {rank}: the record differs from its program"


def _predicted(model: dict, partition: tuple[int, ...], held: list[int], recompute: bool) -> list[int]:
    """Per rank (one stage each), the activation bytes the stage model holds at its peak."""
    stats = analyze(ModelConfig(**model), seq_len=SEQ, micro_batch_size=B, dtype="fp32")
    out = []
    for k, blocks in zip(held, block_ranges(partition)):
        a = [stats.blocks[i].activation_bytes for i in blocks]
        i_ = [stats.blocks[i].input_bytes for i in blocks]
        out.append(k * sum(i_) + max(a) if recompute else k * sum(a))
    return out


def test_recompute_two_stages_bitwise_keep_and_one_process(local_ray) -> None:
    keep = _run(UNTIED_2, "1f1b", 2)
    rec = _run(UNTIED_2, "1f1b", 2, activations="recompute")
    want = reference_losses(UNTIED_2, num_steps=STEPS, num_microbatches=M, micro_batch_size=B, seq_len=SEQ,
                            seed=SEED, lr=LR)
    assert [list(x) for x in keep.microbatch_losses] == want
    assert [list(x) for x in rec.microbatch_losses] == want
    assert rec.programs == keep.programs  # recompute happens inside B: no action of its own
    _records_are_programs(rec)
    held = [2, 1]  # 1F1B over 2 ranks: rank r holds p - r micro-batches at most
    measured = {name: [peaks[r]["activations"] for r in range(2)] for name, peaks in
                (("keep", keep.peak_bytes[-1]), ("recompute", rec.peak_bytes[-1]))}
    predicted = {"keep": _predicted(UNTIED_2, (2, 2), held, False),
                 "recompute": _predicted(UNTIED_2, (2, 2), held, True)}
    for name in measured:
        assert measured[name] == [pytest.approx(x, rel=0.1) for x in predicted[name]], (name, measured, predicted)
    assert measured["recompute"][0] < 0.65 * measured["keep"][0]  # rank 0 holds two micro-batches


def test_mixed_policies_with_dropout_are_bitwise_keep(local_ray, tmp_path: Path) -> None:
    model = {"preset": "tiny", "overrides": {"num_layers": 6, "tie_embeddings": False, "dropout": 0.1}}
    acts = (("recompute", "keep"), ("swap_host", "recompute"), ("swap_nvme", "keep"), ("keep", "swap_host"))
    keep = _run(model, "interleaved-1f1b", 2)
    (tmp_path / "nvme").mkdir()
    got = _run(model, "interleaved-1f1b", 2, activations=acts, nvme_dir=str(tmp_path / "nvme" / "run"))
    assert got.microbatch_losses == keep.microbatch_losses  # dropout replayed, swaps byte for byte
    _records_are_programs(got)
    swaps = {a for prog in got.programs for a in prog if "SWAP" in a}
    assert {a.split("/")[1] for a in swaps if a.startswith("1SWAP_OUT")} == {"b0"}
    assert {a for a in swaps if a.startswith("2SWAP_IN0")} == {"2SWAP_IN0/b0"}
    assert {a for a in swaps if a.startswith("3SWAP_OUT3")} == {"3SWAP_OUT3/b1"}
    assert not {a for a in swaps if a[0] == "0"}
    assert all("activations_host" in got.peak_bytes[-1][r] for r in range(2))


def test_activation_mistakes_are_config_errors(local_ray) -> None:
    with pytest.raises(ConfigError, match=r"activations: one of keep, .* \(blocks per stage \[2, 2\]\)"):
        _run(UNTIED_2, "1f1b", 2, activations=(("recompute",),) * 2)
    with pytest.raises(ConfigError, match="nvme_dir: swap_nvme blocks"):
        _run(UNTIED_2, "1f1b", 2, activations="swap_nvme")


def test_memtrain_run_recomputes_as_the_config_and_plan_say(local_ray, tmp_path: Path) -> None:
    """``memory.activations: recompute``: the plan recomputes every stage (its report and
    timing say so), the workers do, the run's plan.json keeps the program they ran, and the
    losses are one process's. (A stage the planner chooses to recompute reaches the workers the
    same way: tests/unit/test_stage_activations.py.)"""
    cfg = load_config("examples/gpt-tiny-pp2.yaml", ["train.steps=2", "train.seq_len=16",
                                                     "memory.activations=recompute", f"run_dir={tmp_path}/run"])
    lines: list[str] = []
    out = run_distributed(cfg, print_fn=lines.append)
    plan = Plan.load(tmp_path / "run" / "plan.json")
    assert [rp.offload for rp in plan.pipeline.ranks] == [f"stage {s}: activations recomputed" for s in (0, 1)]
    assert any("activations stage 0: recompute, stage 1: recompute" in line for line in lines), lines
    for step in out["result"].records:
        assert [list(r) for r in step] == [[str(a) for a in plan.schedule[rank]] for rank in range(2)]
    ref = config_reference_losses(cfg)
    # tied embeddings across the two ranks: their gradients are summed in another order (1e-6)
    assert [list(x) for x in out["result"].microbatch_losses] == [pytest.approx(x, rel=1e-6, abs=0) for x in ref]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["peak_bytes"][r]["activations"] > 0 for m in metrics for r in range(2))
