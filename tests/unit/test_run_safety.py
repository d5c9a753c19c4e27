"""``memtrain run`` when things go wrong: what it exits with, what it says, what it leaves on disk.

runtime/train.py [Note: the run directory] and [Note: closing the engine]; offload/nvme.py
[Note: stale files]. Most runs here call the CLI's ``main`` in this process (fast); the kill
test needs a real process to kill.
"""

import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from memtrain.offload.nvme import NvmeStore
from memtrain.planner.profile_format import FoundProfile
from memtrain.runtime import engine as engine_mod
from memtrain.runtime import wrapping as wrapping_mod
from memtrain.runtime.cli import main
from memtrain.runtime.config_file import load_config
from memtrain.runtime.planning import plan_from_config
from memtrain.runtime.train import EXIT_NON_FINITE_LOSS

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "tiny-cpu.yaml"
SMALL = ["--set", "train.global_batch_size=2", "--set", "train.seq_len=32"]

# The tiny GPT with budgets that leave most chunks no room but NVMe; memory.nvme holds one run's
# chunk files with room to spare, not two runs' (so leftovers charged to it would not fit).
NVME_CONFIG = """\
name: nvtest
model: {{source: gpt, preset: tiny}}
train: {{global_batch_size: 2, seq_len: 32, steps: 2,
        optimizer: {{name: adamw, lr: 1.0e-3, betas: [0.9, 0.95], weight_decay: 0.1}}}}
cluster:
  auto: true
  nodes:
    - nvme: {{path: {nvme}}}
memory: {{device: 1800KiB, host: 1600KiB, nvme: 3MiB}}
run_dir: {run_dir}
"""


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("MEMTRAIN_DEBUG", raising=False)


@pytest.fixture
def nvme_run(tmp_path):
    """A config whose plan homes chunks on NVMe, its store's directory and its run directory."""
    nvme, run_dir = tmp_path / "nvme", tmp_path / "run"
    nvme.mkdir()
    config = tmp_path / "nvtest.yaml"
    config.write_text(NVME_CONFIG.format(nvme=nvme, run_dir=run_dir))
    plan = plan_from_config(load_config(config))
    assert sum(c.home == "nvme" for c in plan.memory.chunks) >= 4, "adjust NVME_CONFIG's budgets: no NVMe chunks"
    return SimpleNamespace(config=str(config), store_dir=nvme / "memtrain-nvtest", run_dir=run_dir)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _stale_file(store_dir: Path) -> int:
    """One chunk file as a killed run leaves it (a copy of a real one); returns its size."""
    with NvmeStore(store_dir.parent / "donor", budget_bytes=None) as donor:
        donor.write_sync("chunk:0", torch.arange(1000.0))
        data = donor.file_path("chunk:0").read_bytes()
    store_dir.mkdir(exist_ok=True)
    (store_dir / "chunk%3A0.mt").write_bytes(data)
    return len(data)


@pytest.mark.parametrize("bad", ["missing", "outside_vocabulary"])
def test_a_failure_after_wrap_closes_the_engine_and_leaves_nothing(nvme_run, tmp_path, capsys, bad):
    """The data source is built after wrap(): its error exits 2 naming data.path, and the NVMe
    store's files and lock are gone, as are the run's plan.json and metrics.jsonl (no step ran).
    The bad-content case also proves the store had started: it removed a planted leftover."""
    path = tmp_path / "tokens.npy"
    if bad == "outside_vocabulary":
        np.save(path, np.full(1000, 999, dtype=np.int64))  # the tiny GPT has 256 token ids
        _stale_file(nvme_run.store_dir)
    rc = main(["run", nvme_run.config, "--set", "data.source=tokens", "--set", f"data.path={path}"])
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert err.startswith("memtrain: error: data.path:") and "Traceback" not in err
    if bad == "missing":
        assert "tokens.npy" in err
    else:
        assert "token id 999" in err
        assert f"nvme path {nvme_run.store_dir}: removed 1 file(s)" in out
    assert not nvme_run.store_dir.exists() or list(nvme_run.store_dir.iterdir()) == []  # no chunk file, no lock
    assert not nvme_run.run_dir.exists()  # made by this run, which wrote nothing worth keeping


def test_a_killed_run_keeps_its_metrics_and_the_next_run_clears_what_it_left(nvme_run, tmp_path, capsys):
    """SIGKILL mid-run: every finished step's metrics line is on disk and parses. The killed run's
    chunk files and lock stay; the next run in the same directory is refused without --overwrite,
    and with it removes them (saying so) instead of charging them to memory.nvme."""
    metrics = nvme_run.run_dir / "metrics.jsonl"
    out_path = tmp_path / "out.txt"
    with open(out_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "memtrain.runtime.cli", "run", nvme_run.config,
                                 "--set", "train.steps=1000"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 200
        try:  # killed as soon as it has printed its third step
            while not re.search(r"step +3/1000", out_path.read_text()):
                assert proc.poll() is None, out_path.read_text()
                assert time.monotonic() < deadline, "the run did not finish 3 steps in time"
                time.sleep(0.05)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    lines = _metrics(nvme_run.run_dir)  # every line whole
    assert len(lines) >= 3 and [x["step"] for x in lines] == list(range(1, len(lines) + 1))
    assert all(math.isfinite(x["loss"]) for x in lines)
    left = [f for f in nvme_run.store_dir.iterdir() if f.name.endswith((".mt", ".tmp"))]
    assert len(left) >= 4 and (nvme_run.store_dir / ".memtrain-nvme.lock").exists()
    before = metrics.read_text()

    rc = main(["run", nvme_run.config])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"run_dir: {nvme_run.run_dir} holds an earlier run's plan.json and metrics.jsonl" in err
    assert "--overwrite" in err and "--set name=" in err and "--set run_dir=" in err
    assert metrics.read_text() == before

    rc = main(["run", nvme_run.config, "--overwrite"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert re.search(rf"memtrain: nvme path {re.escape(str(nvme_run.store_dir))}: removed {len(left)} file\(s\), "
                     r"[\d.]+ [KM]iB, left by an earlier run", out)
    assert [x["step"] for x in _metrics(nvme_run.run_dir)] == [1, 2]  # this run's lines only
    assert list(nvme_run.store_dir.iterdir()) == []  # the directory was there before this run: kept, empty


def test_overwrite_replaces_only_the_earlier_runs_artifacts(tmp_path, capsys, monkeypatch):
    # The stand-in profile.parquet below must not be read as a measurement.
    monkeypatch.setattr("memtrain.runtime.planning.find_profile", lambda *args: FoundProfile())
    run_dir = tmp_path / "run"
    args = ["run", str(TINY), *SMALL, "--set", f"run_dir={run_dir}", "--set", "train.steps=2"]
    assert main(args) == 0
    (run_dir / "profile.parquet").write_bytes(b"measured by memtrain profile")
    first = (run_dir / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(args) == 2
    assert "holds an earlier run's" in capsys.readouterr().err
    # A plan that does not fit changes nothing: the earlier run's files go only once the new plan fits.
    assert main([*args, "--overwrite", "--set", "memory.device=1KiB"]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert (run_dir / "metrics.jsonl").read_text() == first
    assert main([*args, "--overwrite", "--set", "train.steps=3"]) == 0
    assert [x["step"] for x in _metrics(run_dir)] == [1, 2, 3]
    assert (run_dir / "profile.parquet").read_bytes() == b"measured by memtrain profile"
    assert sorted(f.name for f in run_dir.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl", "plan.json",
                                                         "profile.parquet"]
    assert sorted(f.name for f in (run_dir / "checkpoints").iterdir()) == ["step-00000003"]  # the earlier run's went


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_a_non_finite_loss_stops_the_run_with_status_3_naming_the_step(tmp_path, capsys, dtype):
    run_dir = tmp_path / "run"
    rc = main(["run", str(TINY), *SMALL, "--set", f"run_dir={run_dir}", "--set", "train.steps=20",
               "--set", "train.optimizer.lr=1000000.0", "--set", f"train.dtype={dtype}"])
    err = capsys.readouterr().err
    assert rc == EXIT_NON_FINITE_LOSS == 3, err
    m = re.search(r"memtrain: error: step (\d+): the loss is (nan|inf|-inf) \(not finite\), so training stopped", err)
    assert m, err
    assert "lower train.optimizer.lr (peak 1e+06)" in err and ("train.dtype=bf16" in err) == (dtype == "fp16")
    lines = _metrics(run_dir)
    assert len(lines) == int(m[1]) < 20  # the step's own line is written before the stop
    assert lines[-1]["loss"] is None and lines[-1]["non_finite_loss"] == m[2]
    assert all(math.isfinite(x["loss"]) for x in lines[:-1])


def test_an_fp16_step_skipped_by_the_loss_scaler_is_not_a_failure(tmp_path, capsys, monkeypatch):
    """A loss scale so large that every step's fp16 gradients overflow: the scaler skips each
    step by design (its loss is finite), and the run ends normally."""
    monkeypatch.setattr(wrapping_mod, "wrap", functools.partial(wrapping_mod.wrap, loss_scale={"scale": 2.0**40}))
    stepped = []
    step = engine_mod.Engine.step
    monkeypatch.setattr(engine_mod.Engine, "step", lambda self: stepped.append(step(self)) or stepped[-1])
    run_dir = tmp_path / "run"
    rc = main(["run", str(TINY), *SMALL, "--set", f"run_dir={run_dir}", "--set", "train.steps=3",
               "--set", "train.dtype=fp16"])
    assert rc == 0, capsys.readouterr().err
    assert stepped == [False, False, False]  # every step skipped for overflow
    assert [x["step"] for x in _metrics(run_dir)] == [1, 2, 3]


def test_a_run_ends_with_the_process_peak_within_10_percent_of_baseline_plus_plan(tmp_path, capsys):
    """issue: the plan's process figure plus the baseline measured before the model is built is
    within 10% of the process's real peak (RSS on this CPU machine)."""
    run_dir = tmp_path / "run"
    assert main(["run", str(TINY), *SMALL, "--set", f"run_dir={run_dir}", "--set", "train.steps=3"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("process peak:")]
    assert len(line) == 1
    error = float(re.search(r"\(([+-][\d.]+)%\)", line[0]).group(1)) / 100
    assert abs(error) <= 0.10, line[0]
