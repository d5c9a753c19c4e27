"""``memtrain run`` over Ray workers (``runtime.distributed.run_distributed``) on the embedded
local Ray: the config's optimizer, learning-rate schedule and data reach every stage, so the
losses equal plain PyTorch's on one process; the run directory holds the plan, config and a
metrics line per step; the program each worker ran is its rank's list in the saved plan."""

from __future__ import annotations

import json

import pytest

from memtrain.config import ConfigError
from memtrain.errors import UserError
from memtrain.planner.plan import Plan
from memtrain.runtime.config_file import load_config
from memtrain.runtime.distributed import run_distributed
from memtrain.runtime.train import lr_at

from pipeline_reference import reference_losses


def _config(tmp_path, *sets):
    return load_config("examples/gpt-tiny-pp2.yaml", ["train.steps=4", "train.warmup_steps=2",
                                                      "train.lr_schedule=cosine", f"run_dir={tmp_path}/run", *sets])


def test_the_readme_pipeline_example_trains_as_one_process_does(local_ray, tmp_path):
    cfg = _config(tmp_path)
    lines: list[str] = []
    out = run_distributed(cfg, print_fn=lines.append)
    opt = cfg.train.optimizer
    ref = reference_losses({"source": "gpt", "preset": "tiny"}, num_steps=4, num_microbatches=4, micro_batch_size=2,
                           seq_len=cfg.train.seq_len, seed=0, lr=opt.lr,
                           adamw={"betas": tuple(opt.betas), "weight_decay": opt.weight_decay},
                           lr_at=lambda k: lr_at(k, cfg))
    assert [list(x) for x in out["result"].microbatch_losses] == ref  # bitwise: the same arithmetic in order
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert [m["loss"] for m in metrics] == pytest.approx([sum(x) / 4 for x in ref], rel=1e-12)
    assert [m["lr"] for m in metrics] == [lr_at(k, cfg) for k in range(4)]
    assert all(m["peak_bytes"][r]["host"] > 0 for m in metrics for r in range(2))
    plan = Plan.load(run / "plan.json")
    assert plan.pipeline is not None and plan.pipeline.schedule_kind == "1f1b"
    for step in out["result"].records:
        assert [list(r) for r in step] == [[str(a) for a in plan.schedule[rank]] for rank in range(2)]
    assert json.loads((run / "config.json").read_text())["parallel"]["pipeline"] == 2
    assert any(line.startswith("step     4/4  loss") for line in lines)
    assert any(line.startswith("step time: measured") and "predicted" in line for line in lines)
    with pytest.raises(UserError, match="run_dir: .* holds an earlier run.s"):  # nothing overwritten
        run_distributed(cfg, print_fn=lines.append)


def test_a_pipeline_in_mixed_precision_is_refused_naming_the_field(local_ray, tmp_path):
    with pytest.raises(ConfigError, match="train.dtype: the pipeline workers train in fp32 for now, got bf16"):
        run_distributed(_config(tmp_path, "train.dtype=bf16"), print_fn=lambda line: None)
