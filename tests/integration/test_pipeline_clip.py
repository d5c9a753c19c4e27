"""Gradient clipping by the global norm and parameter groups across pipeline ranks on a local
Ray, against plain PyTorch (``pipeline_reference``: ``clip_grad_norm_(model.parameters())`` and
AdamW's groups by name) on the tiny GPT, 3 steps of 4 micro-batches of 2 sequences of 16 tokens,
``max_grad_norm`` 0.05 (below every step's norm, so every step clips).

Tolerances (runtime.stage_clip [Note: the global norm of a pipeline]): without data parallelism
or tied embeddings the losses, each step's norm and the final weights are bitwise one process's
(a device stage, a host-offloaded one, and a split backward). With 2 replicas the gradients are
the replicas' sums, as without clipping (test_pipeline_run.py [Note: pipeline tolerances]):
losses within 1e-5, norms within 1e-6 relative (measured 4.8e-7 and 8.5e-8). ZeRO-1 and -2
(groups too: each group's stretch of a shard) against the same run unsharded: the parameters cut
between the two shards take their norm from fp64 sums of squares, not torch's fp32 reduction:
norms within 1e-6 relative, losses within 1e-5 (measured: 0 and 0, the cut parameters' norms
rounding to torch's).
"""

from __future__ import annotations

import json

import pytest
import torch
from pipeline_reference import config_reference_losses, reference_losses

from memtrain.models.gpt import gpt_config
from memtrain.models.gpt_blocks import param_names
from memtrain.planner.plan import Plan
from memtrain.runtime.config_file import load_config
from memtrain.runtime.distributed import run_distributed
from memtrain.runtime.pipeline_driver import run_pipeline

STEPS, M, B, SEQ, SEED, LR, CLIP = 3, 4, 2, 16, 0, 1e-2, 0.05
UNTIED_2 = {"preset": "tiny", "overrides": {"num_layers": 2, "tie_embeddings": False}}
NAMES = param_names(gpt_config("tiny", num_layers=2, tie_embeddings=False))
DECAY = [n for n in NAMES if n.endswith("weight") and "norm" not in n]
GROUPS = [{"params": DECAY, "weight_decay": 0.1}, {"params": [n for n in NAMES if n not in DECAY], "weight_decay": 0.0,
                                                   "lr": 3e-3}]
"""Hugging Face's default split (no decay for biases and norms), the second group at its own rate."""


def _pipeline(schedule: str, *, dp: int = 1, groups: list | None = GROUPS, states: dict | None = None,
              model: dict = UNTIED_2, **kw):
    """The run's result; ``states`` receives every world rank's state after the last step."""
    optimizer = {"name": "adamw", "lr": LR, **({"param_groups": groups} if groups else {})}
    return run_pipeline(model=model, schedule=schedule, num_ranks=2, dp=dp, num_microbatches=M, micro_batch_size=B,
                        seq_len=SEQ, num_steps=STEPS, seed=SEED, optimizer=optimizer, max_grad_norm=CLIP,
                        timeout_s=30, step_timeout_s=120, save_after=lambda k: k == STEPS,
                        on_states=lambda k, st: states.update(st) if states is not None else None, **kw)


def _weights(states: dict, p: int) -> dict[str, torch.Tensor]:
    """Replica 0's final parameters by name: its stages' ``owns`` in stage order are the whole
    model's parameters in order (untied)."""
    stages = sorted((s, st) for r in range(p) for s, st in states[r]["stages"].items())
    flat = [q for _, st in stages for q in st["params"]]
    return dict(zip(NAMES, flat, strict=True))


def _reference(dp: int = 1, groups: list | None = GROUPS, model: dict = UNTIED_2) -> tuple[list, dict]:
    out: dict = {}
    losses = reference_losses(model, num_steps=STEPS, num_microbatches=M * dp, micro_batch_size=B, seq_len=SEQ,
                              seed=SEED, lr=LR, max_grad_norm=CLIP, param_groups=groups, out=out)
    return losses, out


def _executed_is_the_program(got, p: int) -> None:
    for step in got.records:
        for rank, record in enumerate(step):
            assert record == got.programs[rank % p], f"rank {rank}: the record differs from its program"
    assert all(sum(a.endswith("CLIP") for a in prog) == 1 for prog in got.programs)


@pytest.mark.parametrize(("schedule", "offload"), [pytest.param("gpipe", None, marks=pytest.mark.slow),
                                                  ("1f1b", ("host", "device")), ("zb-h1", None),
                                                  pytest.param("v-half", None, marks=pytest.mark.slow),
                                                  pytest.param("interleaved-1f1b", None, marks=pytest.mark.slow)])
def test_two_ranks_clip_and_step_their_groups_as_one_process_bitwise(local_ray, schedule: str, offload) -> None:
    states: dict = {}
    got = _pipeline(schedule, states=states, offload=offload)
    want, ref = _reference()
    assert [list(x) for x in got.microbatch_losses] == want, f"{schedule}: losses differ"
    assert list(got.grad_norms) == ref["grad_norms"] and min(ref["grad_norms"]) > CLIP  # every step clipped
    weights = _weights(states, 2)
    diff = max((weights[n] - ref["weights"][n]).abs().max().item() for n in NAMES)
    assert diff == 0.0, f"{schedule}: final weights max |Δ| {diff}"
    _executed_is_the_program(got, 2)


@pytest.mark.slow
def test_an_nvme_stage_clips_bitwise(local_ray, tmp_path) -> None:
    """The last stage's states in NVMe files: its CLIP reads the gradients before its OFFLOAD."""
    states: dict = {}
    got = _pipeline("1f1b", states=states, offload=("device", "nvme"), nvme_dir=str(tmp_path / "nvme"))
    want, ref = _reference()
    assert [list(x) for x in got.microbatch_losses] == want and list(got.grad_norms) == ref["grad_norms"]
    weights = _weights(states, 2)
    assert all(torch.equal(weights[n], ref["weights"][n]) for n in NAMES)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b", "v-half"])
def test_tied_embeddings_count_the_table_once(local_ray, schedule: str) -> None:
    """1f1b: the table on ranks 0 and 1, its copies' gradients summed by ALLREDUCE (the head's copy
    is not counted); v-half: one table on rank 0. Within the tied tolerance of test_pipeline_run.py."""
    tied = {"preset": "tiny", "overrides": {"num_layers": 2}}
    got = _pipeline(schedule, groups=None, model=tied)
    want, ref = _reference(groups=None, model=tied)
    diff = max(abs(a - b) for g, w in zip(got.microbatch_losses, want) for a, b in zip(g, w, strict=True))
    rel = max(abs(a - b) / b for a, b in zip(got.grad_norms, ref["grad_norms"], strict=True))
    assert diff <= 1e-5 and rel <= 1e-6, f"{schedule} tied: max |Δloss| {diff}, relative Δnorm {rel}"
    _executed_is_the_program(got, 2)


@pytest.fixture(scope="module")
def replicas(local_ray):
    """The 2-replica run without ZeRO (the sharded runs are compared with it)."""
    return _pipeline("1f1b", dp=2)


def test_two_replicas_clip_the_summed_gradients(replicas) -> None:
    got = replicas
    want, ref = _reference(dp=2)
    diff = max(abs(a - b) for g, w in zip(got.microbatch_losses, want) for a, b in zip(g, w, strict=True))
    assert diff <= 1e-5, f"dp=2: max |Δloss| {diff}"
    rel = max(abs(a - b) / b for a, b in zip(got.grad_norms, ref["grad_norms"], strict=True))
    print(f"dp=2: max |Δloss| {diff:.3g}, max relative Δnorm {rel:.3g}")
    assert rel <= 1e-6, f"dp=2: max relative Δnorm {rel}"
    _executed_is_the_program(got, 2)


@pytest.mark.parametrize(("zero", "offload"), [(1, None), pytest.param(2, None, marks=pytest.mark.slow),
                                               pytest.param(1, ("host", "device"), marks=pytest.mark.slow)])
def test_zero_shards_norms_within_the_stated_tolerance(replicas, zero: int, offload) -> None:
    """Parameter groups too: a device stage's shard steps each group's stretch (runtime.stage_zero)."""
    unsharded = replicas
    sharded = _pipeline("1f1b", dp=2, zero=zero, offload=offload)
    rel = max(abs(a - b) / b for a, b in zip(sharded.grad_norms, unsharded.grad_norms, strict=True))
    diff = max(abs(a - b) for g, w in zip(sharded.microbatch_losses, unsharded.microbatch_losses) for a, b in zip(g, w))
    print(f"ZeRO-{zero} offload={offload}: max relative Δnorm {rel:.3g}, max |Δloss| {diff:.3g}")
    assert rel <= 1e-6, f"ZeRO-{zero}: max relative Δnorm {rel}"
    assert diff <= 1e-5, f"ZeRO-{zero}: max |Δloss| {diff}"
    _executed_is_the_program(sharded, 2)


def test_memtrain_run_clips_and_logs_the_norm(local_ray, tmp_path) -> None:
    cfg = load_config("examples/gpt-tiny-pp2.yaml", ["train.steps=3", f"train.max_grad_norm={CLIP}",
                                                     f"run_dir={tmp_path}/run"])
    out = run_distributed(cfg, print_fn=lambda line: None)
    ref: dict = {}
    want = config_reference_losses(cfg, max_grad_norm=CLIP, out=ref)
    # tied embeddings across the two ranks: the table's gradient summed in another order (1e-6 relative)
    assert [list(x) for x in out["result"].microbatch_losses] == [pytest.approx(x, rel=1e-6, abs=0) for x in want]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["grad_norm"] for m in metrics] == pytest.approx(ref["grad_norms"], rel=1e-6)
    plan = Plan.load(tmp_path / "run" / "plan.json")
    assert plan.train.clip_grad_norm and all(any(a.op.value == "CLIP" for a in plan.schedule[r]) for r in (0, 1))
    for step in out["result"].records:
        assert [list(r) for r in step] == [[str(a) for a in plan.schedule[rank]] for rank in range(2)]
