"""``memtrain plan`` over a cluster, as a user runs it: the mixed A100/4090 example plans a
pipeline (the planner chooses what ``parallel: auto`` leaves open), prints why it won and one
row per rank, and writes an HTML page with a Gantt chart per rank and a Perfetto trace with a
process per rank and its memory over the step; fixed ``parallel`` fields are kept to, and
mistakes exit 2 with one message naming the field."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from memtrain.runtime.cli import main

ROOT = Path(__file__).resolve().parents[2]
MIXED = str(ROOT / "examples" / "mixed-a100-4090.yaml")
TINY_PP2 = str(ROOT / "examples" / "gpt-tiny-pp2.yaml")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The issue's command, run once as a user would (a subprocess, 120 columns)."""
    out = tmp_path_factory.mktemp("mixed")
    r = subprocess.run([sys.executable, "-m", "memtrain.runtime.cli", "plan", MIXED, "--html", str(out / "plan.html"),
                        "--trace", str(out / "plan.json"), "--json", str(out / "plan-data.json")],
                       capture_output=True, text=True, cwd=out, timeout=300, env={**os.environ, "COLUMNS": "120"})
    return r, out


def test_the_mixed_example_prints_the_pipeline_why_it_won_and_every_rank(mixed):
    r, _ = mixed
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "memtrain plan: mixed-a100-4090" in out and "fits" in out
    shape = re.search(r"schedule\s+(\S+), (\d+) ranks × (\d+) replicas", out)
    assert shape, out
    assert shape.group(1) in ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "v-half", "v-min")
    p, d = int(shape.group(2)), int(shape.group(3))
    assert p * d == 16 and p > 1  # every device; 13B's states fit no single one
    assert "8 × a100-80gb, 8 × rtx4090" in out
    why = out[out.index("why this plan"):out.index("Ranks (replica 0")]
    assert "simulated candidates" in why and "runner-up" in why and "slower by" in why
    rows = re.findall(r"^\s+(\d+)\s+(a100-80gb|rtx4090) \((a100-\d|rtx-\d)\)\s", out, re.M)
    assert [int(r[0]) for r in rows] == list(range(p))
    assert {r[1] for r in rows} == {"a100-80gb", "rtx4090"}
    assert "Runners-up" in out and "deciding difference" in out
    assert re.search(r"planned in \d+\.\d\d s", out)
    assert "Traceback" not in r.stderr


def test_the_html_page_draws_a_gantt_lane_and_a_memory_line_per_rank(mixed):
    _, out = mixed
    page = (out / "plan.html").read_text()
    plan = json.loads((out / "plan-data.json").read_text())
    p = plan["pipeline"]["pipeline_degree"]
    gantt = page[page.index('id="gantt-chart"'):]
    gantt = gantt[:gantt.index("</svg>")]
    for r in range(p):  # each rank's lane, with its forward and backward passes in it
        assert f">rank {r}</text>" in gantt
        assert re.search(rf'class="box-F"[^>]*><title>rank {r} {r}F\d+', gantt), r
        assert re.search(rf'class="box-B"[^>]*><title>rank {r} {r}B\d+', gantt), r
    assert 'class="box-send"' in gantt
    lines = page[page.index('id="memory-line-chart"'):]
    lines = lines[:lines.index("</svg>")]
    for r in range(p):
        assert f">rank {r} device</text>" in lines
    assert lines.count("<polyline") >= p


def test_the_trace_has_a_process_per_rank_and_its_memory_over_the_step(mixed):
    _, out = mixed
    doc = json.loads((out / "plan.json").read_text())
    events = doc["traceEvents"]
    p = json.loads((out / "plan-data.json").read_text())["pipeline"]["pipeline_degree"]
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    assert sorted(names) == list(range(p))
    assert names[0].startswith("rank 0 (") and any("rtx4090" in n for n in names.values())
    step_us = doc["otherData"]["step_time_s"] * 1e6
    for r in range(p):
        passes = [e for e in events if e["ph"] == "X" and e["pid"] == r and e["cat"] in ("F", "B", "W")]
        assert passes, r
        mem = sorted((e for e in events if e["ph"] == "C" and e["pid"] == r and e["name"] == "memory device"),
                     key=lambda e: e["ts"])
        values = [e["args"]["in_use_bytes"] for e in mem]
        assert len(mem) > 2 and len(set(values)) > 2, r  # a line that moves, not a peak at both ends
        assert mem[0]["ts"] == 0 and mem[-1]["ts"] == pytest.approx(step_us, rel=1e-6)  # the whole step
        # it rises with each held micro-batch's activations and falls with its backward
        assert any(b > a for a, b in zip(values, values[1:])) and any(b < a for a, b in zip(values, values[1:]))
        budget = [e for e in events if e["ph"] == "C" and e["pid"] == r and e["name"] == "budget device"]
        assert budget and max(values) <= budget[0]["args"]["budget_bytes"]


def _plan(capsys, *args) -> tuple[int, str, str]:
    code = main(["plan", *map(str, args)])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_fixed_degrees_schedule_and_micro_batches_are_kept(capsys, tmp_path):
    code, out, err = _plan(capsys, MIXED, "--set", "parallel.pipeline=8", "--set", "parallel.data=2",
                           "--set", "parallel.schedule=1f1b", "--set", "parallel.microbatches=16",
                           "--json", tmp_path / "p.json", "--quiet")
    assert code == 0, err
    pipe = json.loads((tmp_path / "p.json").read_text())["pipeline"]
    assert (pipe["pipeline_degree"], pipe["data_parallel_degree"], pipe["schedule_kind"]) == (8, 2, "1f1b")
    train = json.loads((tmp_path / "p.json").read_text())["train"]
    assert train["num_microbatches"] == 16 and train["micro_batch_size"] == 2


def test_a_fixed_partition_is_kept_and_one_that_does_not_fit_names_the_field(capsys, tmp_path):
    fixed = ["--set", "parallel.pipeline=2", "--set", "parallel.data=1", "--set", "parallel.schedule=gpipe"]
    code, out, err = _plan(capsys, TINY_PP2, *fixed, "--set", "parallel.partition=[1,3]", "--json", tmp_path / "p.json")
    assert code == 0, err
    assert json.loads((tmp_path / "p.json").read_text())["pipeline"]["partition"] == [[0, 1], [1, 4]]
    assert "CPU shared by the 2 workers" in out  # this machine's CPU, one share per worker as Ray runs them
    # 13B over the first two A100s, all but the head on the first: it cannot hold them, even offloading
    # to its share of 64 GiB of host memory
    code, out, err = _plan(capsys, MIXED, "--set", "parallel.pipeline=2", "--set", "parallel.data=1",
                           "--set", "parallel.schedule=1f1b", "--set", "parallel.partition=[41,1]",
                           "--set", "memory.host=64GiB")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("memtrain: error: parallel.partition: stage 0 (blocks 0-40) on a100-80gb: needs")
    assert "give that stage fewer blocks" in err


@pytest.mark.parametrize("sets,message", [
    (["parallel.pipeline=3"], "parallel.pipeline: must divide the 16 devices"),
    (["parallel.pipeline=4", "parallel.data=8"],
     "parallel.pipeline × parallel.data: 4 × 8 = 32 workers need one device each, but the cluster lists 16"),
    (["parallel.partition=[1,2]"], "parallel.partition: fixes the blocks of each stage, so it needs a fixed"),
    (["parallel.pipeline=16", "parallel.data=1", "parallel.schedule=1f1b", f"parallel.partition=[2{',1' * 15}]"],
     "parallel.partition: 1f1b over 16 ranks has 16 stages over the model's 42 blocks"),
    (["parallel.schedule=2f2b"], "parallel.schedule: one of gpipe, 1f1b"),
    (["parallel.pipeline=16", "parallel.schedule=interleaved-1f1b", "parallel.stages_per_rank=3"],
     "parallel.stages_per_rank: the planner lays interleaved-1f1b out with 2 stages per rank"),
    (["model.preset=175b"], "the model does not fit the cluster"),
    (["parallel.microbatches=5"], "parallel.microbatches: 5 micro-batches split no data-parallel share"),
])
def test_mistakes_exit_2_with_one_message_naming_the_field(capsys, sets, message):
    args = [a for s in sets for a in ("--set", s)]
    code, out, err = _plan(capsys, MIXED, *args)
    assert code == 2, out
    assert err.startswith("memtrain: error: ") and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err


def test_a_profile_is_refused_for_a_cluster_plan(capsys, tmp_path):
    prof = tmp_path / "p.parquet"
    prof.write_bytes(b"not read")
    code, _, err = _plan(capsys, MIXED, "--profile", prof)
    assert code == 2 and "--profile: a measured profile describes one device" in err


def test_one_device_configs_keep_their_one_device_plan(capsys):
    # no parallel section: one device, even over a cluster that lists several
    code, out, err = _plan(capsys, MIXED, "--set", "parallel.pipeline=1", "--set", "parallel.data=1",
                           "--set", "model.preset=tiny", "--set", "train.seq_len=64")
    assert code == 0, err
    assert "Memory policy" in out and "Pipeline" not in out and "Ranks (replica" not in out


@pytest.mark.parametrize("kinds,pipeline,data", [
    (["a"] * 4 + ["b"] * 4, 2, 1), (["a"] * 4 + ["b"] * 4, 2, 2), (["a"] * 8 + ["b"] * 4, 3, 4),
    (["a", "b", "a", "b", "a", "b"], 3, 2), (["a"] * 3 + ["b"] * 3, 2, 2), (["a"] * 5 + ["b"] * 2, 3, 2),
])
def test_plan_uses_the_devices_run_would(kinds, pipeline, data):
    """With both degrees fixed, ``memtrain plan`` plans over the devices ``memtrain run`` takes
    from Ray's (runtime.distributed.check_devices), so the two show the same plan."""
    from types import SimpleNamespace

    from memtrain.config import config_from_dict
    from memtrain.runtime.distributed import check_devices
    from memtrain.runtime.planning import run_devices

    cfg = config_from_dict({"train": {"global_batch_size": 48}, "parallel": {"pipeline": pipeline, "data": data}})
    inventory = SimpleNamespace(slots=[SimpleNamespace(kind=k) for k in kinds], describe=lambda: "")
    assert run_devices(kinds, pipeline, data) == check_devices(cfg, inventory)
