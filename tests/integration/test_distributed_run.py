"""``memtrain run`` over Ray workers (``runtime.distributed.run_distributed``) on the embedded
local Ray: the config's optimizer, learning-rate schedule and data reach every stage, so the
losses equal plain PyTorch's on one process; the run directory holds the plan, config and a
metrics line per step; the program each worker ran is its rank's list in the saved plan."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memtrain.config import ConfigError
from memtrain.errors import UserError
from memtrain.planner.plan import Plan
from memtrain.runtime.config_file import load_config
from memtrain.runtime.distributed import run_distributed
from memtrain.runtime.train import lr_at, lr_factor

from pipeline_reference import config_reference_losses, reference_losses
from ray_helpers import subprocess_env

MEMTRAIN = [sys.executable, "-m", "memtrain.runtime.cli"]
ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path, *sets):
    # the catalog's figures: these runs check what is trained, not the prediction (test_measured_run.py)
    return load_config("examples/gpt-tiny-pp2.yaml", ["train.steps=4", "train.warmup_steps=2",
                                                      "train.lr_schedule=cosine", f"run_dir={tmp_path}/run",
                                                      "parallel.profile=catalog", *sets])


def _reference(cfg, *, bf16: bool = False) -> list[list[float]]:
    """Plain PyTorch's per-micro-batch losses for ``cfg`` (the tiny GPT, 4 micro-batches of 2)."""
    return config_reference_losses(cfg, bf16=bf16)


def test_the_readme_pipeline_example_trains_as_one_process_does(local_ray, tmp_path):
    cfg = _config(tmp_path)
    lines: list[str] = []
    out = run_distributed(cfg, print_fn=lines.append)
    ref = _reference(cfg)
    # the tiny GPT ties its embedding to its head across the two ranks: their gradients are summed
    # in another order than one process's autograd does, so equal to rounding (docs/DESIGN.md)
    assert [list(x) for x in out["result"].microbatch_losses] == [pytest.approx(x, rel=1e-6, abs=0) for x in ref]
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert [m["loss"] for m in metrics] == list(out["result"].losses)
    assert [m["lr"] for m in metrics] == [lr_at(k, cfg) for k in range(4)]
    assert all(m["peak_bytes"][r]["host"] > 0 for m in metrics for r in range(2))
    assert all(0 < m["rank_busy_s"][r] < m["rank_step_time_s"][r] for m in metrics for r in range(2))
    plan = Plan.load(run / "plan.json")
    assert plan.pipeline is not None and plan.pipeline.schedule_kind == "1f1b"
    for step in out["result"].records:
        assert [list(r) for r in step] == [[str(a) for a in plan.schedule[rank]] for rank in range(2)]
    assert json.loads((run / "config.json").read_text())["parallel"]["pipeline"] == 2
    assert any(line.startswith("step     4/4  loss") for line in lines)
    assert any(line.startswith("step time: measured") and "predicted" in line for line in lines)
    with pytest.raises(UserError, match="run_dir: .* holds an earlier run.s"):  # nothing overwritten
        run_distributed(cfg, print_fn=lines.append)


def test_bf16_trains_as_one_process_under_autocast(local_ray, tmp_path):
    cfg = _config(tmp_path, "train.dtype=bf16", "train.steps=3")
    out = run_distributed(cfg, print_fn=lambda line: None)
    ref = _reference(cfg, bf16=True)
    assert out["result"].microbatch_losses[0] == tuple(ref[0])  # the first step: the same arithmetic
    # later steps: the tied table's gradient summed in another order, then rounded to bfloat16
    assert [list(x) for x in out["result"].microbatch_losses] == [pytest.approx(x, rel=1e-3, abs=0) for x in ref]
    assert out["result"].devices == ("cpu", "cpu")


def test_fp16_is_refused_naming_the_field(local_ray, tmp_path):
    with pytest.raises(ConfigError, match="train.dtype: the pipeline workers train in fp32 or bf16; fp16 needs"):
        run_distributed(_config(tmp_path, "train.dtype=fp16"), print_fn=lambda line: None)


def test_a_pipeline_run_stopped_by_sigterm_resumes_to_the_uninterrupted_losses(local_ray, tmp_path):
    """SIGTERM mid-run: the workers' states are checkpointed after the step in progress and the
    run exits 143; ``memtrain resume`` continues on a new embedded Ray, and the steps' losses
    equal an uninterrupted run's bitwise. The tiny example's steps take milliseconds (and each is
    queued ahead of the last one's end), so the run is long enough that the signal, sent once
    three steps are written, lands well before its end."""
    run = tmp_path / "run"
    steps = 16
    sets = ["--set", f"train.steps={steps}", "--set", "checkpoint.interval_steps=2", "--set", f"run_dir={run}",
            "--set", "train.warmup_steps=2", "--set", "train.lr_schedule=cosine"]
    env = subprocess_env(HOME=str(tmp_path))
    proc = subprocess.Popen([*MEMTRAIN, "run", "examples/gpt-tiny-pp2.yaml", *sets], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    stopped_at = len(metrics.read_text().splitlines())
    assert 3 <= stopped_at < steps and f"step-{stopped_at:08d}" in out, out[-3000:]
    r = subprocess.run([*MEMTRAIN, "resume", str(run)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert f"resuming after step {stopped_at}" in r.stdout
    whole = [s for s in sets if s != "--set" and not s.startswith("run_dir=")] + [f"run_dir={tmp_path}/whole"]
    uninterrupted = run_distributed(load_config(ROOT / "examples/gpt-tiny-pp2.yaml", whole), print_fn=lambda line: None)
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, steps + 1))
    assert [m["loss"] for m in lines] == uninterrupted["losses"]
    # the CLI started the embedded Ray: its 2 workers bound to cores where they take them all
    # (runtime.stage_device [Note: a worker per core]); run_distributed on this test's Ray: not bound
    cores = sorted(os.sched_getaffinity(0))
    assert lines[0]["rank_core"] == (cores[:2] if len(cores) <= 2 else [None, None])
    whole_lines = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["rank_core"] == [None, None] for m in whole_lines)


def test_states_offloaded_to_nvme_train_as_one_process(local_ray, tmp_path):
    (tmp_path / "nvme").mkdir()
    cfg = _config(tmp_path, "memory.offload=nvme", f"parallel.nvme_dir={tmp_path}/nvme", "train.steps=3")
    lines: list[str] = []
    out = run_distributed(cfg, print_fn=lines.append)
    assert any("states offloaded (stage 0: nvme, stage 1: nvme)" in line for line in lines)
    saved = Plan.load(tmp_path / "run" / "plan.json").schedule  # the program run, its PREFETCH and OFFLOAD too
    for step in out["result"].records:
        assert [list(r) for r in step] == [[str(a) for a in saved[rank]] for rank in range(2)]
    assert any("PREFETCH" in a for a in out["result"].records[0][0])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["peak_bytes"][r].get("nvme", 0) > 0 for m in metrics for r in range(2))  # the files held the states
    ref = _reference(cfg)
    assert [list(x) for x in out["result"].microbatch_losses] == [pytest.approx(x, rel=1e-6, abs=0) for x in ref]
    with pytest.raises(ConfigError, match="parallel.nvme_dir: stages keep their states on NVMe"):
        run_distributed(_config(tmp_path / "again", "memory.offload=nvme"), print_fn=lambda line: None)


@pytest.mark.slow
def test_zero1_and_zero2_over_two_copies_train_as_plain_data_parallelism(local_ray, tmp_path):
    sets = ("parallel.data=2", "train.global_batch_size=16", "train.steps=3")
    plain = run_distributed(_config(tmp_path / "plain", *sets), print_fn=lambda line: None)
    sharded = run_distributed(_config(tmp_path / "zero", *sets, "parallel.zero=1"), print_fn=lambda line: None)
    assert sharded["losses"] == plain["losses"]  # bitwise: the same sums, each copy updating its share
    zero2 = run_distributed(_config(tmp_path / "zero2", *sets, "parallel.zero=2"), print_fn=lambda line: None)
    assert zero2["losses"] == plain["losses"]
    # plan.json keeps the program that ran, each stage's REDUCE_SCATTER included
    saved = Plan.load(tmp_path / "zero2" / "run" / "plan.json")
    programs = {r: tuple(str(a) for a in acts) for r, acts in saved.schedule.items()}
    assert all("REDUCE_SCATTER" in " ".join(p) for p in programs.values())
    p = saved.pipeline.pipeline_degree
    assert all(rec == programs[r % p] for step in zero2["result"].records for r, rec in enumerate(step))


def test_choices_left_to_the_planner_are_planned_over_every_device_and_kept(local_ray, tmp_path):
    """``parallel: auto`` with ``memtrain run``: the planner chooses over the local Ray's 4 CPU
    devices, the run trains its choice, and config.json holds it for a resume."""
    cfg = _config(tmp_path, "parallel.pipeline=0", "parallel.data=0", "parallel.schedule=auto",
                  "parallel.microbatches=0", "train.micro_batch_size=0", "train.steps=2")
    lines: list[str] = []
    out = run_distributed(cfg, print_fn=lines.append)
    pipe = out["plan"].pipeline
    assert pipe.pipeline_degree * pipe.data_parallel_degree == 4  # every device
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["parallel"]
    assert (saved["pipeline"], saved["data"], saved["schedule"]) == (pipe.pipeline_degree, pipe.data_parallel_degree,
                                                                     pipe.schedule_kind)
    assert len(out["losses"]) == 2 and any(line.startswith("memtrain: the planner chose") for line in lines)


def test_config_param_groups_reach_every_stage_by_the_whole_models_names(local_ray, tmp_path):
    """``train.optimizer.param_groups`` of the config (patterns, the first matching group wins)
    name the whole model's parameters, as one process does; each stage steps its share of each
    group at the group's peak × the schedule's factor. Untied, so bitwise one process's loop
    with torch's groups set by hand; resumed from its step-2 checkpoint, step 3 is the same."""
    groups = "[{params: ['*.bias', '*norm*'], weight_decay: 0.0}, {params: ['blocks.3.*'], lr: 0.01}, {params: ['*']}]"
    cfg = _config(tmp_path, "train.steps=3", "model.overrides={num_layers: 2, tie_embeddings: false}",
                  f"train.optimizer.param_groups={groups}", "checkpoint.interval_steps=2")
    out = run_distributed(cfg, print_fn=lambda line: None)
    names = [n for n, _ in _untied_named()]
    no_decay = [n for n in names if n.endswith(".bias") or "norm" in n]
    head = [n for n in names if n.startswith("blocks.3.") and n not in no_decay]
    rest = [n for n in names if n not in no_decay and n not in head]
    assert head == ["blocks.3.lm_head.weight"] and len(no_decay) == 19
    opt = cfg.train.optimizer
    ref = reference_losses({"source": "gpt", "preset": "tiny", "overrides": {"num_layers": 2, "tie_embeddings": False}},
                           num_steps=3, num_microbatches=4, micro_batch_size=2, seq_len=cfg.train.seq_len, seed=0,
                           lr=opt.lr, adamw={"betas": tuple(opt.betas), "weight_decay": opt.weight_decay},
                           param_groups=[{"params": no_decay, "weight_decay": 0.0}, {"params": head, "lr": 0.01},
                                         {"params": rest}],
                           lr_at=lambda k: [opt.lr * lr_factor(k, cfg), 0.01 * lr_factor(k, cfg),
                                            opt.lr * lr_factor(k, cfg)])
    assert [list(x) for x in out["result"].microbatch_losses] == ref  # bitwise
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["group_lrs"] for m in metrics] == [[opt.lr * lr_factor(k, cfg), 0.01 * lr_factor(k, cfg),
                                                  opt.lr * lr_factor(k, cfg)] for k in range(3)]
    assert lr_factor(0, cfg) == 0.5  # the warm-up's first step: every group at half its own rate
    # a checkpoint keeps the groups' states: the run resumed after step 2 gives step 3's losses again
    import shutil

    from memtrain.runtime.resume import resume

    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "run", cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000003")
    again = resume(cut, print_fn=lambda line: None)
    assert again["first_step"] == 3 and [list(x) for x in again["result"].microbatch_losses] == ref[2:]


def _untied_named():
    import torch

    from memtrain.models.gpt import GPT, gpt_config

    with torch.device("meta"):
        return list(GPT(gpt_config("tiny", num_layers=2, tie_embeddings=False)).named_parameters())

