"""The ``memtrain`` command as a user runs it (subprocesses, real files)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memtrain.planner.plan import Plan

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def memtrain(*args, cwd=ROOT, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "memtrain.runtime.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=timeout,
    )


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_plan_every_example(example, tmp_path):
    out = {k: tmp_path / f"plan.{k}" for k in ("json", "html", "trace")}
    r = memtrain("plan", example, "--json", out["json"], "--html", out["html"], "--trace", out["trace"],
                 "--set", f"run_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert "step time" in r.stdout and "fits" in r.stdout
    data = json.loads(out["json"].read_text())
    assert data["version"] == 1 and data["fits"] is True
    assert data["model"]["num_params"] == sum(b["num_params"] for b in data["model"]["blocks"])
    assert {"name", "num_params", "param_bytes", "activation_bytes", "fwd_flops"} <= set(data["model"]["blocks"][0])
    assert data["prediction"]["step_time_s"] > 0 and data["prediction"]["tokens_per_s"] > 0
    peaks = data["prediction"]["devices"][0]["peak_bytes"]
    budgets = data["prediction"]["devices"][0]["budget_bytes"]
    assert set(peaks) >= {"device", "host"}
    assert all(peaks[t] <= budgets[t] for t in peaks if budgets.get(t))
    plan = Plan.load(out["json"])
    assert plan.fits and plan.name == example.stem
    assert out["html"].read_text().lstrip().lower().startswith("<!doctype html")
    assert json.loads(out["trace"].read_text())["traceEvents"]


def test_plan_that_cannot_fit_exits_2_naming_the_shortfall(tmp_path):
    r = memtrain("plan", ROOT / "examples" / "gpt-1b-on-4090.yaml", "--set", "cluster.nodes[0]=x", "--set", f"run_dir={tmp_path}")
    assert r.returncode == 2  # a node that is not a mapping is a user error, reported cleanly
    assert "cluster.nodes[0]" in r.stderr and "Traceback" not in r.stderr
    r = memtrain("plan", ROOT / "examples" / "gpt-175b.yaml", "--set", "model.preset=175b",
                 "--set", f"run_dir={tmp_path}", "--set", "memory.host=64GiB", "--set", "memory.nvme=100GiB")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "does not fit" in r.stderr and "GiB" in r.stderr
    assert "Traceback" not in r.stderr


def test_run_tiny_trains_and_writes_metrics(tmp_path):
    r = memtrain("run", ROOT / "examples" / "tiny-cpu.yaml", "--set", "train.steps=12", "--set", f"run_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 13))
    assert lines[-1]["loss"] < lines[0]["loss"]  # the synthetic data is learnable
    assert Plan.load(tmp_path / "plan.json").fits
    assert "step time: measured" in r.stdout


def test_profile_then_plan_uses_it(tmp_path):
    r = memtrain("profile", ROOT / "examples" / "tiny-cpu.yaml", "--set", f"run_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "profile.parquet").is_file()
    r = memtrain("plan", ROOT / "examples" / "tiny-cpu.yaml", "--set", f"run_dir={tmp_path}", "--json", tmp_path / "p.json")
    assert r.returncode == 0, r.stderr
    assert Plan.load(tmp_path / "p.json").source == f"profile:{tmp_path / 'profile.parquet'}"
    # another model does not match this profile: catalog/auto figures are used and said so
    r = memtrain("plan", ROOT / "examples" / "tiny-cpu.yaml", "--set", f"run_dir={tmp_path}",
                 "--set", "train.seq_len=32", "--json", tmp_path / "q.json")
    assert r.returncode == 0, r.stderr
    assert not Plan.load(tmp_path / "q.json").source.startswith("profile:")


def test_resume_not_yet_available_is_a_clear_message():
    r = memtrain("resume", ROOT / "examples" / "tiny-cpu.yaml")
    assert r.returncode == 2 and "not yet available" in r.stderr
