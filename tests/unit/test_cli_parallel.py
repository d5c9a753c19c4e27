"""``memtrain run`` and the ``parallel`` section, up to where Ray starts: one worker stays in the
process (even with RAY_ADDRESS set, as in a Ray job), and a run the model cannot split is refused
before any Ray is started."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def memtrain(*args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "memtrain.runtime.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, env={**os.environ, **(env or {})})


def test_one_worker_trains_in_the_process_even_inside_a_ray_job(tmp_path):
    # RAY_ADDRESS (set by ray job submit) points nowhere: a one-device run must not try to join it
    r = memtrain("run", "examples/tiny-cpu.yaml", "--set", "train.steps=2", "--set", f"run_dir={tmp_path}",
                 env={"RAY_ADDRESS": "127.0.0.1:1"})
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert "Ray" not in r.stdout


def test_a_pipeline_longer_than_the_model_is_refused_naming_the_field(tmp_path):
    r = memtrain("run", "examples/gpt-tiny-pp2.yaml", "--address", "127.0.0.1:1", "--set", "parallel.pipeline=5",
                 "--set", f"run_dir={tmp_path}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "memtrain: error: parallel.pipeline: 5 rank(s) of schedule '1f1b' make 5 stages, but gpt-tiny has 4" in r.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_batch_that_does_not_split_over_the_copies_is_refused(tmp_path):
    r = memtrain("run", "examples/gpt-tiny-pp2.yaml", "--set", "parallel.data=3", "--set", f"run_dir={tmp_path}")
    assert r.returncode == 2
    assert "train.global_batch_size: 8 does not split over parallel.data 3 copies; make it a multiple of 3" in r.stderr


def test_run_help_names_address_and_the_token():
    r = memtrain("run", "--help")
    assert r.returncode == 0 and "--address ADDR" in r.stdout and "RAY_AUTH_TOKEN" in r.stdout


def test_zero_without_data_parallel_copies_exits_2_naming_the_field(tmp_path):
    r = memtrain("run", "examples/gpt-tiny-pp2.yaml", "--set", "parallel.zero=2", "--set", f"run_dir={tmp_path}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "parallel.zero: 2 shards the optimizer states across the parallel.data copies, and there is one" in r.stderr
