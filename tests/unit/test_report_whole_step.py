"""The 175B example's report shows the whole step, honestly (issue: "the timeline shows the whole
step"; "memory is a line over time"): the simulator extrapolates micro-batches 3-6 from micro-batch
2 and the plan keeps 2,000 of its events, and every stretch of the picture says what it stands for,
the memory line moves through the extrapolated micro-batches, and the trace's memory counters are
a line per tier over the step."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from memtrain.planner import report
from memtrain.runtime.config_file import load_config
from memtrain.runtime.planning import plan_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plan_175b():
    cfg = load_config(ROOT / "examples" / "gpt-175b.yaml", ["run_dir=/nonexistent/memtrain-test"])
    t0 = time.perf_counter()
    plan = plan_config(cfg)
    return plan, time.perf_counter() - t0


def _marks(plan, prefix):
    return sorted((e for e in plan.prediction.timeline if e.name.startswith(prefix)), key=lambda e: e.start_s)


def test_the_dry_run_takes_seconds_and_extrapolates(plan_175b):
    plan, elapsed = plan_175b
    assert plan.fits and plan.pipeline is None
    assert elapsed < 30, f"the 175B dry run took {elapsed:.1f} s"
    assert _marks(plan, "repeated:"), "the example no longer extrapolates: this test checks nothing"


def test_every_stretch_of_the_compute_lane_is_drawn_or_marked(plan_175b):
    plan, _ = plan_175b
    step = plan.prediction.step_time_s
    lane = sorted((e.start_s, e.end_s) for e in plan.prediction.timeline if e.stream == "compute")
    covered = 0.0
    for start, end in lane:
        # the device waits for NVMe reads a few seconds at a time at the end; nothing longer is blank
        assert start - covered < 0.01 * step, f"an unmarked blank from {covered:.1f} s to {start:.1f} s"
        covered = max(covered, end)
    assert covered == pytest.approx(step, rel=1e-6)
    # the marks do not overlap: each stretch stands for one thing, said where it happens
    marks = sorted(_marks(plan, "repeated:") + _marks(plan, "omitted:"), key=lambda e: e.start_s)
    assert len(marks) == 3
    assert all(a.end_s <= b.start_s + 1e-9 for a, b in zip(marks, marks[1:]))
    repeated = _marks(plan, "repeated:")[0]
    assert repeated.name.startswith("repeated: micro-batches 3-6, each as micro-batch 2")


def test_the_html_labels_each_elided_stretch_where_it_is(plan_175b):
    plan, _ = plan_175b
    page = report.render_html(plan)
    timeline = page[page.index('id="timeline-chart"'):]
    timeline = timeline[:timeline.index("</svg>")]
    assert 'id="elided-hatch"' in timeline
    assert '>micro-batches 3–6: same as 2</text>' in timeline  # visible, not only a tooltip
    assert "events not kept in the plan</text>" in timeline
    memory = page[page.index('id="memory-line-chart"'):]
    memory = memory[:memory.index("</svg>")]
    assert memory.count(">micro-batches 3–6: same as 2</text>") >= 2  # on each tier's row


def test_the_trace_memory_is_a_line_per_tier_through_the_repeated_micro_batches(plan_175b):
    plan, _ = plan_175b
    events = report.trace_events(plan)
    repeated = _marks(plan, "repeated:")[0]
    step_us = plan.prediction.step_time_s * 1e6
    for tier in ("device", "host"):
        line = sorted((e["ts"], e["args"]["in_use_bytes"]) for e in events
                      if e["ph"] == "C" and e["name"] == f"memory {tier}")
        assert len(line) > 100 and line[0][0] == 0 and line[-1][0] > 0.95 * step_us
        inside = {b for t, b in line if repeated.start_s * 1e6 < t < repeated.end_s * 1e6}
        assert len(inside) > 2, tier  # it moves through micro-batches 3-6, as it does through 2
        assert max(b for _, b in line) == plan.prediction.devices[0].peak_bytes[tier] or tier == "device"
        budget = [e for e in events if e["ph"] == "C" and e["name"] == f"budget {tier}"]
        assert len(budget) == 2 and "in_use_bytes" not in budget[0]["args"]
