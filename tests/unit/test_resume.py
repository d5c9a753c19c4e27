"""``memtrain run`` killed mid-run and ``memtrain resume``d continues exactly: the per-step losses
of the two runs together equal an uninterrupted run's, bitwise in fp32, with the model states on
the device, on the host and on NVMe, with dropout and recomputed activations."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from memtrain.runtime.config_file import load_config
from memtrain.runtime.train import train

STEPS = 30
INTERVAL = 5


def _config(tmp_path: Path, name: str, offload: str) -> Path:
    nvme = tmp_path / "nvme"
    nvme.mkdir(exist_ok=True)
    cfg = {
        "name": name,
        "model": {"source": "gpt", "preset": "tiny", "overrides": {"dropout": 0.1}},
        "data": {"source": "synthetic", "seed": 3},
        "train": {"global_batch_size": 4, "micro_batch_size": 2, "seq_len": 32, "steps": STEPS, "seed": 7,
                  "optimizer": {"name": "adamw", "lr": 3e-3}, "warmup_steps": 4, "lr_schedule": "cosine"},
        "cluster": {"nodes": [{"nvme": {"path": str(nvme)}}]},
        "memory": {"offload": offload, "activations": "recompute"},
        "checkpoint": {"interval_steps": INTERVAL},
        "run_dir": str(tmp_path / "runs" / "{name}"),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, len(lines) + 1))
    return [r["loss"] for r in lines]


def _memtrain(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "memtrain.runtime.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, **kw)


def _run_until(config: Path, run_dir: Path, step: int, sig: int) -> tuple[int, str]:
    """Start ``memtrain run``; send ``sig`` once the metrics show ``step`` steps; (status, output)."""
    proc = _memtrain("run", str(config))
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            proc.send_signal(sig)
            break
        time.sleep(0.002)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


@pytest.mark.parametrize("offload", ["device", "host", "nvme"])
def test_a_run_killed_by_sigkill_resumes_to_the_losses_of_an_uninterrupted_run(tmp_path, offload):
    whole = train(load_config(_config(tmp_path, "whole", offload)), print_fn=lambda s: None)
    assert whole["plan"].memory.activations == ("recompute",) * len(whole["plan"].memory.activations)
    assert {c.home for c in whole["plan"].memory.chunks} == {offload}
    config, run_dir = _config(tmp_path, "killed", offload), tmp_path / "runs" / "killed"
    status, out = _run_until(config, run_dir, 2 * INTERVAL + 2, signal.SIGKILL)
    assert status == -signal.SIGKILL, out
    killed_at = len(_losses(run_dir))
    assert 2 * INTERVAL + 2 <= killed_at < STEPS
    done = subprocess.run([sys.executable, "-m", "memtrain.runtime.cli", "resume", str(run_dir)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    resumed_from = int(done.stdout.split("resuming after step ")[1].split()[0])
    assert resumed_from % INTERVAL == 0 and resumed_from <= killed_at
    assert _losses(run_dir) == whole["losses"]  # bitwise: the same floats


def test_sigterm_checkpoints_the_step_in_progress_and_resume_continues_from_it(tmp_path):
    whole = train(load_config(_config(tmp_path, "whole", "host")), print_fn=lambda s: None)
    config, run_dir = _config(tmp_path, "stopped", "host"), tmp_path / "runs" / "stopped"
    status, out = _run_until(config, run_dir, 7, signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, out
    stopped_at = len(_losses(run_dir))
    assert f"stopped by SIGTERM after step {stopped_at}" in out and f"memtrain resume {run_dir}" in out
    assert (run_dir / "checkpoints" / f"step-{stopped_at:08d}").is_dir()  # not a multiple of the interval
    from memtrain.runtime.resume import resume

    lines = []
    resume(run_dir, print_fn=lines.append)
    assert f"resuming after step {stopped_at} " in lines[0] + " "
    assert _losses(run_dir) == whole["losses"]


def test_a_corrupt_newest_checkpoint_is_named_and_the_one_before_it_resumes_exactly(tmp_path):
    from memtrain.runtime.resume import resume

    whole = train(load_config(_config(tmp_path, "whole", "device")), print_fn=lambda s: None)
    train(load_config(_config(tmp_path, "broken", "device")), print_fn=lambda s: None)
    run_dir = tmp_path / "runs" / "broken"
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step-{STEPS - INTERVAL:08d}", f"step-{STEPS:08d}"]  # keep: 2
    newest = ckpts / f"step-{STEPS:08d}" / "rank-00000" / "state.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    shutil.copytree(ckpts / f"step-{STEPS - INTERVAL:08d}", ckpts / f".tmp-step-{STEPS + INTERVAL:08d}-1")
    lines = []
    resume(run_dir, print_fn=lines.append)
    assert any(f"step-{STEPS:08d}" in line and "does not match its checksum" in line for line in lines), lines
    assert any(f".tmp-step-{STEPS + INTERVAL:08d}-1" in line and "partial" in line for line in lines), lines
    assert any(f"resuming after step {STEPS - INTERVAL} " in line + " " for line in lines), lines
    assert _losses(run_dir) == whole["losses"]


def test_resume_refuses_a_change_that_breaks_exact_continuation_naming_the_field(tmp_path):
    from memtrain.errors import UserError
    from memtrain.runtime.resume import resume

    cfg = load_config(_config(tmp_path, "short", "device"), ["train.steps=6"])
    train(cfg, print_fn=lambda s: None)
    run_dir = tmp_path / "runs" / "short"
    with pytest.raises(UserError, match=r"^train.steps: changed from 6 to 9, which stretches the cosine"):
        resume(run_dir, overrides=["train.steps=9"], print_fn=lambda s: None)
    with pytest.raises(UserError, match=r"^train.optimizer.lr: differs from the run being resumed"):
        resume(run_dir, overrides=["train.optimizer.lr=0.1"], print_fn=lambda s: None)
    lines = []
    resume(run_dir, print_fn=lines.append)  # nothing left to do
    assert "already finished its 6 steps" in lines[-1]
    with pytest.raises(UserError, match="no config.json"):
        resume(tmp_path, print_fn=lambda s: None)


def test_the_plain_loop_example_stopped_and_run_again_gives_an_uninterrupted_runs_losses(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("wrap_resume", Path(__file__).parents[2] / "examples" / "wrap_resume.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--dir", str(tmp_path / "whole"), "--steps", "12", "--every", "5"]) == 0
    assert example.main(["--dir", str(tmp_path / "parts"), "--steps", "12", "--every", "5", "--stop-after", "7"]) == 0
    assert len(json.loads((tmp_path / "parts" / "losses.json").read_text())) == 7
    assert example.main(["--dir", str(tmp_path / "parts"), "--steps", "12", "--every", "5"]) == 0
    whole = json.loads((tmp_path / "whole" / "losses.json").read_text())
    assert len(whole) == 12 and json.loads((tmp_path / "parts" / "losses.json").read_text()) == whole
