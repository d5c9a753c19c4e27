import dataclasses
import json
import re
from html.parser import HTMLParser

import pytest

from memtrain.cluster.spec import DeviceSpec, HostSpec, NvmeSpec
from memtrain.planner import report
from memtrain.planner.plan import (
    Action, ActPolicy, Alternative, ChunkPlan, DevicePrediction, MemoryPolicy, Op, Plan, Prediction, Tier,
    TimelineEvent, TrainShape,
)
from memtrain.planner.stats import BlockStats, DType, ModelStats, Optimizer
from memtrain.units import format_bytes, format_seconds

GiB = 1024**3
MiB = 1024**2


def _block(name, num_params, act_bytes):
    return BlockStats(name=name, num_params=num_params, param_bytes=2 * num_params, activation_bytes=act_bytes,
                      input_bytes=act_bytes // 8, output_bytes=act_bytes // 8, fwd_flops=6 * num_params,
                      bwd_flops=12 * num_params)


TIMELINE = (
    TimelineEvent(stream="h2d", name="0PREFETCH@c1", start_s=0.000, end_s=0.004),
    TimelineEvent(stream="compute", name="0F0", start_s=0.004, end_s=0.020),
    TimelineEvent(stream="disk", name="read c3", start_s=0.000, end_s=0.030),
    TimelineEvent(stream="d2h", name="swap out blocks.1 mb0", start_s=0.020, end_s=0.026),
    TimelineEvent(stream="compute", name="recompute blocks.2 mb0", start_s=0.030, end_s=0.040),
    TimelineEvent(stream="compute", name="0B0", start_s=0.040, end_s=0.075),
    TimelineEvent(stream="d2h", name="0OFFLOAD@c1", start_s=0.075, end_s=0.080),
    TimelineEvent(stream="cpu", name="adam c1", start_s=0.080, end_s=0.125),
)


@pytest.fixture
def plan():
    model = ModelStats(
        name="gpt-tiny", num_params=1_234_567_890, dtype=DType.BF16, micro_batch_size=1, seq_len=1024,
        blocks=(_block("blocks.0", 400_000_000, 64 * MiB), _block("blocks.1", 300_000_000, 512 * MiB),
                _block("blocks.2", 300_000_000, 512 * MiB), _block("blocks.3", 234_567_890, 256 * MiB)),
    )
    chunks = tuple(
        ChunkPlan(index=i, num_elems=300_000_000, param_names=(f"p{i}",), home=home)
        for i, home in enumerate((Tier.DEVICE, Tier.HOST, Tier.HOST, Tier.NVME))
    )
    device_pred = DevicePrediction(
        rank=0, device="rtx4090",
        peak_bytes={"device": 20 * GiB, "host": 48 * GiB, "nvme": 12 * GiB},
        budget_bytes={"device": 22 * GiB, "host": 60 * GiB, "nvme": 900 * GiB},
        breakdown={
            "device": {"chunk:0": 5 * GiB, "act:blocks.1:0": 6 * GiB, "act:blocks.2:0": 3 * GiB,
                       "buffer:param:1": 4 * GiB, "workspace": 2 * GiB},
            "host": {"chunk:1": 24 * GiB, "chunk:2": 24 * GiB},
            "nvme": {"chunk:3": 12 * GiB},
        },
    )
    return Plan(
        name="tiny-run", fits=True, model=model,
        train=TrainShape(global_batch_size=32, micro_batch_size=4, num_microbatches=8, seq_len=1024,
                         dtype=DType.BF16, optimizer=Optimizer.ADAMW),
        device=DeviceSpec(kind="rtx4090", name="NVIDIA GeForce RTX 4090", memory_bytes=24 * GiB,
                          bf16_flops=165e12, fp16_flops=165e12, fp32_flops=82e12, memory_bw_gbps=1008,
                          h2d_gbps=25, d2h_gbps=25),
        host=HostSpec(memory_bytes=64 * GiB, num_cpus=16, memory_bw_gbps=50, cpu_adam_params_per_s=1e9),
        nvme=NvmeSpec(path="/mnt/nvme", capacity_bytes=1000 * GiB, read_gbps=6.5, write_gbps=5.0),
        memory=MemoryPolicy(chunk_size_elems=300_000_000, chunks=chunks, prefetch_depth=2,
                            activations=(ActPolicy.KEEP, ActPolicy.SWAP_HOST, ActPolicy.RECOMPUTE, ActPolicy.KEEP)),
        schedule={0: (Action(0, Op.PREFETCH, None, 1), Action(0, Op.F, 0), Action(0, Op.B, 0), Action(0, Op.OPTIM))},
        prediction=Prediction(step_time_s=1.2345, tokens_per_s=26_541.0, mfu=0.412,
                              devices=(device_pred,), timeline=TIMELINE),
        alternatives=(
            Alternative(description="all chunks on host, prefetch 1", fits=True, step_time_s=1.9,
                        reason="slower: 1.90 s vs 1.23 s"),
            Alternative(description="all chunks on device", fits=False, step_time_s=None,
                        reason="device peak 61.0 GiB over budget 22.0 GiB"),
        ),
        source="profile:/tmp/prof.parquet",
    )


# --- summary -------------------------------------------------------------------------------------


def test_summary_has_the_key_figures(plan):
    text = report.summary_text(plan)
    for needle in ("tiny-run", "gpt-tiny", "1.23 B", "NVIDIA GeForce RTX 4090", "profile:/tmp/prof.parquet",
                   format_bytes(20 * GiB), format_bytes(22 * GiB), "90.9%", format_seconds(1.2345), "26,541",
                   "41.2%", "micro-batch 4 × 8", "prefetch depth", "all chunks on device", "over budget"):
        assert needle in text, needle
    assert re.search(r"^fits$", text, re.M)
    assert "does not fit" not in text
    # Top owners are grouped by kind and ranked by bytes: activations (9 GiB) before chunk (5 GiB).
    device_row = next(line for line in text.splitlines() if line.strip().startswith("device") and "%" in line)
    assert device_row.index("act 9.0 GiB") < device_row.index("chunk 5.0 GiB")


def test_summary_counts_homes_and_policies(plan):
    text = report.summary_text(plan)
    assert "device 1 (300.00 M elems), host 2 (600.00 M elems), nvme 1" in text
    assert "keep 2, swap_host 1, recompute 1" in text
    # Per-block rows (4 blocks), activations scaled from micro-batch 1 to the plan's 4.
    assert re.search(r"blocks\.1\s+300\.00 M\s+2\.0 GiB\s+swap_host", text)
    assert all(len(line) <= 100 for line in text.splitlines())


def test_summary_shows_shortfall(plan):
    bad = dataclasses.replace(plan, fits=False, shortfall="device needs 31.0 GiB, budget 22.0 GiB")
    text = report.summary_text(bad)
    assert "does not fit: device needs 31.0 GiB, budget 22.0 GiB" in text


def test_shortfall_is_red_and_markup_is_literal(plan):
    from rich.console import Console

    bad = dataclasses.replace(plan, fits=False, shortfall="host short by [bold]5 GiB[/bold]")
    console = Console(record=True, width=100, force_terminal=True, color_system="truecolor")
    report.print_summary(bad, console)
    exported = console.export_text(styles=True)
    assert "[bold]5 GiB[/bold]" in exported
    line = next(ln for ln in exported.splitlines() if "does not fit" in ln)
    assert "\x1b[1;31m" in line  # bold red


def test_many_blocks_hide_the_block_table(plan):
    blocks = tuple(dataclasses.replace(plan.model.blocks[1], name=f"blocks.{i}") for i in range(40))
    big = dataclasses.replace(plan, model=dataclasses.replace(plan.model, blocks=blocks),
                              memory=dataclasses.replace(plan.memory, activations=(ActPolicy.RECOMPUTE,) * 40))
    text = report.summary_text(big)
    assert "recompute 40" in text
    assert "blocks.39" not in text


# --- JSON ---------------------------------------------------------------------------------------------


def test_json_has_required_keys_and_round_trips(plan, tmp_path):
    path = tmp_path / "out" / "plan.json"
    report.write_json(plan, path)
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["fits"] is True
    assert data["model"]["num_params"] == 1_234_567_890
    block = data["model"]["blocks"][1]
    assert block == {**block, "name": "blocks.1", "num_params": 300_000_000, "param_bytes": 600_000_000,
                     "activation_bytes": 512 * MiB, "fwd_flops": 1_800_000_000}
    assert data["prediction"]["step_time_s"] == 1.2345
    assert data["prediction"]["tokens_per_s"] == 26_541.0
    assert data["prediction"]["devices"][0]["peak_bytes"] == {"device": 20 * GiB, "host": 48 * GiB, "nvme": 12 * GiB}
    assert Plan.from_json(path.read_text()) == plan
    assert Plan.load(path) == plan
    assert not [p for p in path.parent.iterdir() if p.name != "plan.json"]  # no temp file left behind


# --- HTML ---------------------------------------------------------------------------------------------


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []
        self.titles = []
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.titles.append(data)


def test_html_is_self_contained_with_both_charts(plan, tmp_path):
    path = tmp_path / "plan.html"
    report.write_html(plan, path)
    page = path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["plan.html"]
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page, re.I)
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    parser = _Collect()
    parser.feed(page)
    svg_ids = [a.get("id") for t, a in parser.tags if t == "svg"]
    assert svg_ids == ["memory-chart", "timeline-chart"]
    rects = [a for t, a in parser.tags if t == "rect"]
    colours = {k: report._KIND_COLOURS[k] for k in ("fetch", "forward", "swap", "recompute", "backward",
                                                     "offload", "optimizer")}
    assert set(colours.values()) <= {a.get("fill") for a in rects}
    # Hover titles: one per timeline box, one per memory segment; the budget line has its own.
    assert sum("[backward, compute]" in t for t in parser.titles) == 1
    assert any(t.startswith("device: act 9.0 GiB") for t in parser.titles)
    assert any(t == f"device budget {format_bytes(22 * GiB)}" for t in parser.titles)
    assert format_seconds(1.2345) in page and "90.9%" in page and "all chunks on device" in page


def test_html_escapes_names(plan, tmp_path):
    evil = dataclasses.replace(plan, name="<script>alert(1)</script>",
                               model=dataclasses.replace(plan.model, name='gpt"<script>x</script>'),
                               prediction=dataclasses.replace(plan.prediction, timeline=(
                                   TimelineEvent(stream="compute", name="F <img src=x>", start_s=0, end_s=1),)))
    page = report.render_html(evil)
    assert "<script" not in page.lower()
    assert "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "gpt&quot;&lt;script&gt;x&lt;/script&gt;" in page


def test_html_without_timeline_says_so(plan):
    empty = dataclasses.replace(plan, prediction=dataclasses.replace(plan.prediction, timeline=()))
    page = report.render_html(empty)
    assert 'id="timeline-chart"' not in page and "no simulated timeline" in page
    assert 'id="memory-line-chart"' not in page and "no memory over time" in page  # a plan without the line


def test_html_size_bounded_for_long_timelines(plan):
    events = tuple(TimelineEvent(stream=("compute", "h2d")[i % 2], name=f"0F{i}", start_s=i * 1e-3, end_s=(i + 1) * 1e-3)
                   for i in range(60_000))
    big = dataclasses.replace(plan, prediction=dataclasses.replace(plan.prediction, timeline=events))
    page = report.render_html(big)
    assert page.count("[forward, ") == report._MAX_TIMELINE_BOXES
    assert "First 20,000 of 60,000 events drawn" in page
    assert len(page.encode()) < 6 * 1024**2


# --- trace --------------------------------------------------------------------------------------------


def test_trace_events_match_timeline(plan, tmp_path):
    path = tmp_path / "trace.json"
    report.write_trace(plan, path)
    doc = json.loads(path.read_text())
    events = doc["traceEvents"]
    xs = [e for e in events if e["ph"] == "X"]
    assert len(xs) == len(TIMELINE)
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert sorted(names.values()) == sorted({"compute", "h2d", "d2h", "disk", "cpu"})
    for x, ev in zip(xs, TIMELINE):
        assert x["name"] == ev.name
        assert names[x["tid"]] == ev.stream
        assert x["ts"] == pytest.approx(ev.start_s * 1e6)
        assert x["dur"] == pytest.approx((ev.end_s - ev.start_s) * 1e6)
        assert x["dur"] >= 0
    assert [x["cat"] for x in xs] == ["fetch", "forward", "fetch", "swap", "recompute", "backward", "offload",
                                      "optimizer"]
    counters = [e for e in events if e["ph"] == "C"]
    assert {c["name"] for c in counters} == {"memory device", "memory host", "memory nvme"}
    device = next(c for c in counters if c["name"] == "memory device")
    assert device["args"] == {"peak_bytes": 20 * GiB, "budget_bytes": 22 * GiB}
    assert all({"ph", "pid", "name"} <= set(e) for e in events)


@pytest.mark.parametrize("name,stream,kind", [
    ("0F3", "compute", "forward"), ("1B0", "compute", "backward"), ("0W2", "compute", "backward"),
    ("0SWAP_IN4@c1", "h2d", "swap"), ("0SEND_F1", "compute", "comm"), ("recompute blocks.3", "compute", "recompute"),
    ("F blocks.3 mb0", "compute", "forward"), ("B blocks.1 mb2", "compute", "backward"),
    ("fetch c7", "h2d", "fetch"), ("write c2", "disk", "offload"), ("grads c4", "d2h", "offload"),
    ("adamw c0", "cpu", "optimizer"), ("c5", "h2d", "fetch"), ("mystery", "compute", "other"),
])
def test_event_kind(name, stream, kind):
    assert report.event_kind(TimelineEvent(stream=stream, name=name, start_s=0, end_s=1)) == kind


def test_a_searched_plans_trace_draws_each_tiers_memory_as_a_line(tmp_path):
    """The plan carries each tier's bytes in use over the step; the trace's counters follow it, so
    the peak shows when it happens: the line's highest point is the tier's tracked peak, and the
    device line goes up and down with the buffers and activations of the step."""
    from memtrain.cluster import catalog
    from memtrain.cluster.spec import HostSpec
    from memtrain.config import ModelConfig
    from memtrain.planner.analyze import analyze
    from memtrain.planner.search import plan as search_plan, tracked_peak_bytes

    cpu = catalog.cpu_device_spec(num_cpus=2, memory_bytes=8 << 30)
    host = HostSpec(memory_bytes=8 << 30, num_cpus=2, memory_bw_gbps=10.0, cpu_adam_params_per_s=1e8)
    stats = analyze(ModelConfig(preset="tiny"), seq_len=64)
    p = search_plan(stats, name="t", global_batch_size=4, micro_batch_size=2, dtype="fp32", optimizer="adamw",
                    device=cpu, host=host, nvme=None, budgets={"device": 2700 << 10, "host": 8 << 20, "nvme": 0},
                    safety_margin=0.1)
    assert p.fits
    dev = p.prediction.devices[0]
    peaks = tracked_peak_bytes(dev)
    path = tmp_path / "trace.json"
    report.write_trace(p, path)
    counters = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "C"]
    for tier in ("device", "host"):
        line = [c["args"]["in_use_bytes"] for c in counters if c["name"] == f"memory {tier}"]
        assert line and max(line) == peaks[tier] == max(q.bytes for q in dev.memory_timeline if q.tier == tier)
        assert [c["args"]["budget_bytes"] for c in counters if c["name"] == f"budget {tier}"] == [dev.budget_bytes[tier]] * 2
    device_line = [c["args"]["in_use_bytes"] for c in counters if c["name"] == "memory device"]
    assert len(device_line) > 10 and min(device_line[1:]) < max(device_line) > device_line[0]
    # the HTML page draws it under each tier's budget
    page = report.render_html(p)
    chart = page[page.index('<svg id="memory-line-chart"'):]
    chart = chart[:chart.index("</svg>")]
    assert chart.count("<polyline") == len({q.tier for q in dev.memory_timeline})
    assert f"peak {format_bytes(peaks['device'])}" in chart
    # and the plan keeps it through its JSON form
    from memtrain.planner.plan import Plan

    report.write_json(p, tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json").prediction.devices[0].memory_timeline == dev.memory_timeline
