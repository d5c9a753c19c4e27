"""The pipeline part of a plan's reports (planner.report): tables, a Gantt chart per rank, trace tracks.

Reads ``Plan.pipeline`` and the per-rank timeline planner.hetero_plan put in the plan
(streams ``compute:<rank>`` and ``link:<src>><dst>``); computes nothing. Tables come back as
(title, columns, rows, numeric columns) for planner.report to render in text and HTML alike.
"""

from __future__ import annotations

import html
import re
from collections import defaultdict

from memtrain.planner.plan import Action, Op, Plan, TimelineEvent
from memtrain.units import format_bytes, format_seconds

__all__ = ["pipeline_tables", "gantt_svg", "rank_of_stream", "pipeline_trace_events", "elided_label", "elided_svg",
           "ELIDED_DEFS"]

MAX_GANTT_RANKS = 32
"""Ranks drawn in the Gantt chart (the trace has them all)."""
_MAX_BOXES = 20_000
_COLOURS = {"F": "#4e79a7", "B": "#f28e2b", "W": "#e15759", "send": "#9c755f", "allreduce": "#59a14f",
            "optimizer": "#76b7b2", "fetch": "#edc948", "repeated": "#e8e8e8"}

Table = tuple[str, tuple[str, ...], tuple[tuple[str, ...], ...], tuple[int, ...]]

ELIDED_DEFS = ('<defs><pattern id="elided-hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
               'patternTransform="rotate(45)"><rect width="6" height="6" fill="#eeeeee"/>'
               '<line x1="0" y1="0" x2="0" y2="6" stroke="#bbbbbb" stroke-width="2"/></pattern></defs>')
"""The hatch an elided stretch is drawn with (an SVG's ``<defs>``): never mistaken for idle time."""


def elided_label(name: str) -> str:
    """A short visible label for a timeline event that stands for what is not drawn:
    ``repeated: micro-batches 3-6, each as micro-batch 2 (...)`` -> ``micro-batches 3–6: same as 2``;
    ``omitted: 2,680 events not kept ...`` -> ``2,680 events not kept in the plan``."""
    m = re.match(r"repeated: micro-batches (\d+)-(\d+), each as micro-batch (\d+)", name)
    if m:
        return f"micro-batches {m.group(1)}–{m.group(2)}: same as {m.group(3)}"
    m = re.match(r"repeated: micro-batches (\d+)-(\d+), each as the one before", name)
    if m:
        return f"micro-batches {m.group(1)}–{m.group(2)}: each as the one before"
    m = re.match(r"repeated: micro-batches (\d+)-(\d+)", name)
    if m:
        return f"micro-batches {m.group(1)}–{m.group(2)}: the steady state repeated, not drawn"
    m = re.match(r"omitted: ([\d,]+) events", name)
    if m:
        return f"{m.group(1)} events not kept in the plan"
    return name


def elided_svg(x: float, y: float, w: float, h: float, name: str, title: str, css: str = "elided") -> str:
    """A hatched box over an elided stretch, its label written in it when it fits (about 6 px a
    character at the page's 11 px), its full name as the tooltip."""
    label = elided_label(name)
    fits = int((w - 6) // 6)
    text = label if len(label) <= fits else (label[:fits - 1] + "…" if fits >= 12 else "")
    out = (f'<rect class="box-{css}" x="{x:.2f}" y="{y:.2f}" width="{w:.2f}" height="{h:.2f}" '
           f'fill="url(#elided-hatch)" stroke="#999" stroke-dasharray="3 2"><title>{html.escape(title)}</title></rect>')
    if text:
        out += (f'<text class="elided-label" x="{x + w / 2:.2f}" y="{y + h / 2 + 4:.2f}" text-anchor="middle">'
                f"{html.escape(text)}</text>")
    return out


def rank_of_stream(stream: str) -> tuple[int, str] | None:
    """``compute:3`` -> (3, 'compute'); ``link:3>4`` -> (3, 'send'); ``h2d:3`` (an offloaded
    stage's fetch on a GPU's copy stream) -> (3, 'send'), the thin lane under the rank's passes;
    other streams -> None."""
    m = re.fullmatch(r"(compute|link|h2d):(\d+)(?:>\d+)?", stream)
    if not m:
        return None
    return int(m.group(2)), "compute" if m.group(1) == "compute" else "send"


def _box_kind(e: TimelineEvent) -> str:
    if e.name.startswith("repeated"):
        return "repeated"
    if e.name in ("allreduce", "optimizer step"):
        return "allreduce" if e.name == "allreduce" else "optimizer"
    try:
        op = Action.parse(e.name).op
    except ValueError:
        return "optimizer"
    if op in (Op.SEND_F, Op.SEND_B):
        return "send"
    if op is Op.PREFETCH:
        return "fetch"
    return op.value if op.value in _COLOURS else "F"


def _used_of(used: int, budget: int) -> str:
    """``46.4 / 72.0 GiB`` (one unit written once when both share it)."""
    a, b = format_bytes(used), format_bytes(budget)
    unit = b.rsplit(" ", 1)[-1]
    return f"{a.rsplit(' ', 1)[0]} / {b}" if a.endswith(" " + unit) else f"{a} / {b}"


def pipeline_tables(plan: Plan) -> list[Table]:
    """The pipeline's shape, one row per pipeline rank, and the runners-up."""
    pipe = plan.pipeline
    assert pipe is not None
    kinds = defaultdict(int)
    for r in pipe.ranks:
        kinds[r.device.kind] += 1
    shape = (
        ("schedule", f"{pipe.schedule_kind}, {pipe.pipeline_degree} ranks × {pipe.data_parallel_degree} replicas, "
                     f"{len(pipe.partition)} stages"),
        ("devices", ", ".join(f"{n} × {k}" for k, n in kinds.items())),
        ("micro-batches", f"{plan.train.num_microbatches} of {plan.train.micro_batch_size} per replica"),
        ("bubble", f"{100 * pipe.bubble_fraction:.1f}% of the ranks' time in the pipeline passes"),
        ("why this plan", pipe.why or "—"),
    )
    rows = []
    preds = {d.rank: d for d in plan.prediction.devices}
    for r in pipe.ranks[:pipe.pipeline_degree]:
        blocks = "; ".join(f"{s}: {pipe.partition[s][0]}-{pipe.partition[s][1] - 1}" for s in r.stages)
        pred = preds.get(r.pipeline_rank)
        used = budget = 0
        if pred is not None:
            used, budget = pred.peak_bytes.get("device", 0), pred.budget_bytes.get("device", 0)
        rows.append((str(r.pipeline_rank), f"{r.device.kind} ({r.node})", blocks,
                     _used_of(used, budget), format_seconds(r.busy_s),
                     f"{100 * r.bubble_fraction:.1f}%", format_seconds(r.allreduce_s + r.optimizer_s),
                     r.offload or "—"))
    ranks = ("Ranks (replica 0; every replica runs the same)",
             ("rank", "device (node)", "stage: blocks", "memory / budget", "busy", "bubble", "tail", "offload"),
             tuple(rows), (3, 4, 5, 6))
    out: list[Table] = [("Pipeline", (), shape, ()), ranks]
    if pipe.alternatives:
        alts = tuple((a.description, "yes" if a.fits else "no",
                      "—" if a.step_time_s is None else format_seconds(a.step_time_s),
                      f"{100 * a.peak_fraction:.0f}%" if a.peak_fraction else "—",
                      f"{100 * a.bubble_fraction:.1f}%" if a.step_time_s is not None else "—", a.reason)
                     for a in pipe.alternatives)
        out.append(("Runners-up", ("candidate", "fits", "step time", "fullest rank", "bubble", "deciding difference"),
                    alts, (2, 3, 4)))
    return out


def gantt_svg(plan: Plan) -> str:
    """Per rank a lane of its passes (F, B, W), its all-reduce and optimizer step, and under it
    a thin lane of its sends; time on a shared axis."""
    events = [e for e in plan.prediction.timeline if rank_of_stream(e.stream) is not None]
    if not events:
        return '<p class="note">The plan carries no per-rank timeline.</p>'
    num = min(plan.pipeline.pipeline_degree if plan.pipeline else 1, MAX_GANTT_RANKS)
    t0 = min(e.start_s for e in events)
    span = max(max(e.end_s for e in events) - t0, 1e-12)
    label_w, plot_w, lane_h, send_h, axis_h = 80, 1000, 18, 6, 20
    row_h = lane_h + send_h + 4
    height = row_h * num + axis_h
    parts = [f'<svg id="gantt-chart" xmlns="http://www.w3.org/2000/svg" width="{label_w + plot_w + 10}" '
             f'height="{height}" role="img" aria-label="pipeline schedule per rank">', ELIDED_DEFS]
    for r in range(num):
        y = r * row_h
        parts.append(f'<text x="0" y="{y + 13}">rank {r}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{plot_w}" height="{lane_h}" fill="#f7f7f7"/>')
    drawn = 0
    for e in events:
        rank, lane = rank_of_stream(e.stream)
        if rank >= num or drawn >= _MAX_BOXES:
            continue
        drawn += 1
        kind = _box_kind(e)
        x = label_w + plot_w * (e.start_s - t0) / span
        w = max(plot_w * (e.end_s - e.start_s) / span, 0.5)
        y = rank * row_h + (lane_h + 1 if lane == "send" else 0)
        h = send_h if lane == "send" else lane_h
        title = f"rank {rank} {e.name}: {format_seconds(e.start_s - t0)} → {format_seconds(e.end_s - t0)}"
        if kind == "repeated":
            parts.append(elided_svg(x, y, w, h, e.name, title, "repeated"))
            continue
        parts.append(f'<rect class="box-{kind}" x="{x:.2f}" y="{y}" width="{w:.2f}" height="{h}" '
                     f'fill="{_COLOURS[kind]}"><title>{html.escape(title)}</title></rect>')
    axis_y = row_h * num
    for k in range(6):
        x = label_w + plot_w * k / 5
        parts.append(f'<text x="{x:.1f}" y="{axis_y + 14}" text-anchor="middle">{html.escape(format_seconds(span * k / 5))}</text>')
    parts.append("</svg>")
    legend = "".join(f'<span><i style="background:{c}"></i>{html.escape(k)}</span>' for k, c in _COLOURS.items())
    note = ""
    if plan.pipeline and plan.pipeline.pipeline_degree > num:
        note = f'<p class="note">First {num} of {plan.pipeline.pipeline_degree} ranks drawn; the trace has all.</p>'
    return "\n".join(parts) + f'\n<div class="legend">{legend}</div>' + note


def pipeline_trace_events(plan: Plan) -> list[dict]:
    """Trace Event Format: one process per rank (its compute thread, a thread per link it sends
    on) and, per tier it uses, its bytes in use over the step as a counter beside its budget."""
    out: list[dict] = []
    threads: dict[tuple[int, str], int] = {}
    kinds = {r.pipeline_rank: r.device.kind for r in plan.pipeline.ranks} if plan.pipeline else {}
    for e in plan.prediction.timeline:
        where = rank_of_stream(e.stream)
        if where is None:
            continue
        rank = where[0]
        if (rank, e.stream) not in threads:
            if not any(k[0] == rank for k in threads):
                out.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0,
                            "args": {"name": f"rank {rank} ({kinds.get(rank, '?')})"}})
                out.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0,
                            "args": {"sort_index": rank}})
            tid = threads[(rank, e.stream)] = sum(1 for k in threads if k[0] == rank)
            out.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": e.stream}})
        kind = _box_kind(e)
        out.append({"name": e.name, "cat": kind, "ph": "X", "pid": rank, "tid": threads[(rank, e.stream)],
                    "ts": e.start_s * 1e6, "dur": (e.end_s - e.start_s) * 1e6, "args": {"stream": e.stream}})
    for dev in plan.prediction.devices:
        for tier in sorted({p.tier for p in dev.memory_timeline}, key=("device", "host", "nvme").index):
            line = [p for p in dev.memory_timeline if p.tier == tier]
            out += [{"name": f"memory {tier}", "ph": "C", "pid": dev.rank, "ts": p.t_s * 1e6,
                     "args": {"in_use_bytes": p.bytes}} for p in line]
            budget = dev.budget_bytes.get(tier, 0)
            out += [{"name": f"budget {tier}", "ph": "C", "pid": dev.rank, "ts": ts * 1e6,
                     "args": {"budget_bytes": budget}} for ts in (line[0].t_s, line[-1].t_s)]
    return out
