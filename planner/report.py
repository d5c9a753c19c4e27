"""Reports on a Plan: a terminal summary, JSON, one self-contained HTML page, a Chrome trace.

All four read the Plan only (docs/DESIGN.md, data flow: Plan → report); none recomputes a cost.
The terminal summary and the HTML page are rendered from the same tables
(planner.report_tables ``_sections``), so they always show the same figures.
"""

from __future__ import annotations

import html
import io
import json
import re
from importlib import resources
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING

from memtrain.planner.atomic import atomic_write_text
from memtrain.planner.plan import Action, Op, Plan, TimelineEvent
from memtrain.planner.report_pipeline import (
    ELIDED_DEFS, elided_svg, gantt_svg, pipeline_trace_events, rank_of_stream,
)
from memtrain.planner.report_tables import _fit_line, _grouped_breakdown, _percent, _sections, _Table, _tiers_of
from memtrain.units import format_bytes, format_seconds

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "EVENT_KINDS", "STREAMS", "event_kind", "summary_text", "print_summary",
    "write_json", "write_html", "write_trace", "render_html", "trace_events",
]

STREAMS = ("compute", "h2d", "d2h", "disk", "cpu", "grads")
"""Streams of the simulated timeline, in lane order (others follow, sorted by name)."""

EVENT_KINDS = ("forward", "backward", "recompute", "fetch", "offload", "swap", "optimizer", "comm", "snapshot",
               "elided", "other")
"""What a timeline box is doing; the colour of its box in the HTML page and its trace category."""

_KIND_COLOURS = {
    "forward": "#4e79a7", "backward": "#f28e2b", "recompute": "#b07aa1", "fetch": "#59a14f",
    "offload": "#e15759", "swap": "#edc948", "optimizer": "#76b7b2", "comm": "#9c755f",
    "snapshot": "#bab0ac", "elided": "#e8e8e8", "other": "#999999",
}
_OWNER_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
_OP_KINDS = {
    Op.F: "forward", Op.B: "backward", Op.W: "backward", Op.PREFETCH: "fetch", Op.OFFLOAD: "offload",
    Op.SWAP_OUT: "swap", Op.SWAP_IN: "swap", Op.OPTIM: "optimizer", Op.SEND_F: "comm", Op.RECV_F: "comm",
    Op.SEND_B: "comm", Op.RECV_B: "comm", Op.ALLREDUCE: "comm", Op.CLIP: "comm", Op.SNAPSHOT: "snapshot",
}
# Keyword → kind, tried in this order: "recompute" before "forward" (a recompute is a forward
# pass), "swap" before "fetch" (a swap-in reads), so the more specific word wins.
_KEYWORD_KINDS = (
    ({"repeated", "omitted"}, "elided"),  # what the timeline stands for without drawing it
    ({"recompute", "recomp"}, "recompute"),
    ({"optim", "optimizer", "optimiser", "adam", "adamw", "sgd"}, "optimizer"),
    ({"swap", "swapin", "swapout"}, "swap"),
    ({"prefetch", "fetch", "read", "load", "upload"}, "fetch"),
    ({"offload", "write", "store", "evict"}, "offload"),
    ({"send", "recv", "allreduce", "reduce", "allgather"}, "comm"),
    ({"snapshot"}, "snapshot"),
    ({"backward", "bwd"}, "backward"),
    ({"forward", "fwd"}, "forward"),
)
_FIRST_WORD_KINDS = {"f": "forward", "b": "backward", "w": "backward", "r": "recompute"}
_STREAM_KINDS = {"h2d": "fetch", "d2h": "offload", "cpu": "optimizer", "grads": "offload"}

_MAX_TIMELINE_BOXES = 20_000
"""HTML boxes drawn at most (keeps the page a few MB for the largest plans; the trace has all)."""
_MAX_RANKS_DRAWN = 32


def event_kind(event: TimelineEvent) -> str:
    """Classify a timeline event into one of ``EVENT_KINDS``.

    An explicit ``kind`` attribute wins; else the name is read as a schedule action
    (``"0F3"``, ``"0PREFETCH@c5"``); else by keywords ("recompute blocks.3", "adam c2");
    else by its first word (``F``/``B``/``W``/``R``); else by the stream it ran on.
    """
    kind = getattr(event, "kind", None)
    if kind in EVENT_KINDS:
        return kind
    first = event.name.split(maxsplit=1)[0] if event.name.strip() else ""
    try:
        return _OP_KINDS[Action.parse(first).op]
    except ValueError:
        pass
    words = re.findall(r"[a-z]+", event.name.lower())
    for keywords, kind in _KEYWORD_KINDS:
        if keywords.intersection(words):
            return kind
    if words and words[0] in _FIRST_WORD_KINDS:
        return _FIRST_WORD_KINDS[words[0]]
    return _STREAM_KINDS.get(event.stream, "other")


# ---------------------------------------------------------------------------------------------
# Terminal (rich).


def print_summary(plan: Plan, console: Console | None = None) -> None:
    """Print the plan's summary to ``console`` (a ``rich.console.Console``; stdout by default)."""
    from rich import box
    from rich.console import Console  # noqa: F811  (runtime import; rich is slow to import)
    from rich.table import Table
    from rich.text import Text

    console = console if console is not None else Console()
    # Text objects, never markup strings: a model or owner name with "[...]" stays literal.
    console.print(Text(f"memtrain plan: {plan.name}", style="bold"))
    console.print(Text(_fit_line(plan), style="bold green" if plan.fits else "bold red"))
    for section in _sections(plan):
        console.print()
        if section.columns:
            table = Table(title=Text(section.title, style="bold"), title_justify="left", box=box.SIMPLE_HEAD)
            for i, col in enumerate(section.columns):
                table.add_column(Text(col), justify="right" if i in section.numeric else "left", overflow="fold")
        else:
            table = Table(title=Text(section.title, style="bold"), title_justify="left", box=None,
                          show_header=False, padding=(0, 2, 0, 0))
            table.add_column(style="dim", no_wrap=True)
            table.add_column(overflow="fold")
        for row in section.rows:
            table.add_row(*(Text(cell) for cell in row))
        console.print(table)


def summary_text(plan: Plan) -> str:
    """The summary of ``print_summary`` as plain text, 100 columns wide (no colour codes)."""
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, width=100, color_system=None, force_terminal=False, highlight=False,
                      emoji=False, soft_wrap=False)
    print_summary(plan, console)
    # rich pads table lines to the full width; trailing blanks are noise in logs and diffs.
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines()) + "\n"


# ---------------------------------------------------------------------------------------------
# JSON.


def write_json(plan: Plan, path: str | Path) -> None:
    """Write ``plan.to_json()`` to ``path`` atomically (readable again with ``Plan.load``)."""
    atomic_write_text(path, plan.to_json())


# ---------------------------------------------------------------------------------------------
# HTML: one file, inline CSS and SVG, no scripts or external references.


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _html_table(section: _Table) -> str:
    out = [f"<h2>{_e(section.title)}</h2>"]
    if section.columns:
        out.append("<table><thead><tr>" + "".join(f"<th>{_e(c)}</th>" for c in section.columns) + "</tr></thead><tbody>")
        for row in section.rows:
            cells = "".join(
                f'<td class="num">{_e(c)}</td>' if i in section.numeric else f"<td>{_e(c)}</td>"
                for i, c in enumerate(row)
            )
            out.append(f"<tr>{cells}</tr>")
    else:
        out.append('<table class="kv"><tbody>')
        for label, value in section.rows:
            out.append(f"<tr><th>{_e(label)}</th><td>{_e(value)}</td></tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _legend(items: list[tuple[str, str]]) -> str:
    spans = "".join(f'<span><i style="background:{colour}"></i>{_e(label)}</span>' for label, colour in items)
    return f'<div class="legend">{spans}</div>'


def _memory_svg(plan: Plan) -> str:
    """Stacked horizontal bars, one per (rank, tier), owners grouped, with the budget line.

    Each bar has its own scale (max of peak and budget): tiers differ by orders of magnitude
    (GiB of device memory, TiB of NVMe), so a shared axis would hide the device bar.
    """
    devices = plan.prediction.devices[:_MAX_RANKS_DRAWN]
    owners = sorted({o for d in devices for t in d.breakdown.values() for o, b in _grouped_breakdown(t) if b > 0})
    colour = {o: _OWNER_PALETTE[i % len(_OWNER_PALETTE)] for i, o in enumerate(owners)}
    colour["unattributed"] = "#dddddd"
    label_w, bar_w, text_w, row_h = 120, 560, 260, 28
    rows = [(i, d, t) for i, d in enumerate(devices) for t in _tiers_of(plan, i)]
    height = row_h * len(rows) + 10
    parts = [f'<svg id="memory-chart" xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + text_w}" '
             f'height="{height}" role="img" aria-label="memory per tier">']
    for r, (i, dev, tier) in enumerate(rows):
        y = 5 + r * row_h
        peak, budget = dev.peak_bytes.get(tier, 0), dev.budget_bytes.get(tier, 0)
        groups = [(o, b) for o, b in _grouped_breakdown(dev.breakdown.get(tier, {})) if b > 0]
        attributed = sum(b for _, b in groups)
        if peak > attributed:
            groups.append(("unattributed", peak - attributed))
        scale = max(peak, budget, attributed, 1)
        label = f"rank {dev.rank} {tier}" if len(devices) > 1 else tier
        parts.append(f'<text x="0" y="{y + 16}">{_e(label)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{bar_w}" height="18" fill="#f3f3f3"/>')
        x = float(label_w)
        for owner, num_bytes in groups:
            w = bar_w * num_bytes / scale
            parts.append(f'<rect x="{x:.2f}" y="{y + 3}" width="{w:.2f}" height="18" fill="{colour[owner]}">'
                         f"<title>{_e(f'{tier}: {owner} {format_bytes(num_bytes)} ({_percent(num_bytes, peak)} of peak)')}"
                         "</title></rect>")
            x += w
        if budget:
            bx = label_w + bar_w * budget / scale
            parts.append(f'<line x1="{bx:.2f}" x2="{bx:.2f}" y1="{y}" y2="{y + 24}" stroke="#c62828" '
                         f'stroke-width="2" stroke-dasharray="4 2"><title>{_e(f"{tier} budget {format_bytes(budget)}")}'
                         "</title></line>")
        summary = f"{format_bytes(peak)} / {format_bytes(budget) if budget else 'unavailable'} ({_percent(peak, budget)})"
        parts.append(f'<text x="{label_w + bar_w + 10}" y="{y + 16}">{_e(summary)}</text>')
    parts.append("</svg>")
    legend = [(o, colour[o]) for o in owners] + [("budget", "#c62828")]
    return "\n".join(parts) + "\n" + _legend(legend)


def _memory_lines_svg(plan: Plan) -> str:
    """Per (rank, tier), the bytes in use over the simulated step as a step line under its
    budget, on the timeline's time axis; each row has its own scale, as ``_memory_svg``'s bars."""
    devices = [d for d in plan.prediction.devices[:_MAX_RANKS_DRAWN] if d.memory_timeline]
    if not devices:
        return '<p class="note">The plan carries no memory over time.</p>'
    events = plan.prediction.timeline
    t0 = min([e.start_s for e in events] + [p.t_s for d in devices for p in d.memory_timeline])
    t1 = max([e.end_s for e in events] + [p.t_s for d in devices for p in d.memory_timeline])
    span_s = max(t1 - t0, 1e-12)
    label_w, plot_w, row_h = 80, 1000, 70
    rows = [(d, t) for d in devices for t in _tiers_of(plan, plan.prediction.devices.index(d))
            if any(p.tier == t for p in d.memory_timeline)]
    parts = [f'<svg id="memory-line-chart" xmlns="http://www.w3.org/2000/svg" width="{label_w + plot_w + 10}" '
             f'height="{row_h * len(rows) + 4}" role="img" aria-label="memory in use over the step">', ELIDED_DEFS]
    for r, (dev, tier) in enumerate(rows):
        y0 = r * row_h + 4
        line = [p for p in dev.memory_timeline if p.tier == tier]
        budget = dev.budget_bytes.get(tier, 0)
        top = max([p.bytes for p in line] + [budget, 1])
        h = row_h - 14

        def x(t: float) -> float:
            return label_w + plot_w * (t - t0) / span_s

        def y(b: int) -> float:
            return y0 + h - h * b / top

        label = f"rank {dev.rank} {tier}" if len(devices) > 1 else tier
        parts.append(f'<text x="0" y="{y0 + 16}">{_e(label)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y0}" width="{plot_w}" height="{h}" fill="#f7f7f7"/>')
        for e in _repeated_marks(plan, dev.rank):  # the micro-batches the simulator extrapolated
            parts.append(elided_svg(x(e.start_s), y0, max(x(e.end_s) - x(e.start_s), 0.5), h, e.name,
                                    f"{e.name} ({format_seconds(e.start_s - t0)} → {format_seconds(e.end_s - t0)})"))
        pts = []
        for k, p in enumerate(line):
            if k:
                pts.append(f"{x(p.t_s):.1f},{y(line[k - 1].bytes):.1f}")
            pts.append(f"{x(p.t_s):.1f},{y(p.bytes):.1f}")
        pts.append(f"{x(t1):.1f},{y(line[-1].bytes):.1f}")
        peak = max(line, key=lambda p: p.bytes)
        parts.append(f'<polyline fill="none" stroke="#4e79a7" stroke-width="1.5" points="{" ".join(pts)}">'
                     f"<title>{_e(f'{tier} in use; peak {format_bytes(peak.bytes)} at {format_seconds(peak.t_s - t0)}')}"
                     "</title></polyline>")
        if budget:
            parts.append(f'<line x1="{label_w}" x2="{label_w + plot_w}" y1="{y(budget):.1f}" y2="{y(budget):.1f}" '
                         f'stroke="#c62828" stroke-dasharray="4 2"><title>{_e(f"{tier} budget {format_bytes(budget)}")}'
                         "</title></line>")
    parts.append("</svg>")
    return "\n".join(parts) + "\n" + _legend([("in use", "#4e79a7"), ("budget", "#c62828")])


def _repeated_marks(plan: Plan, rank: int) -> list[TimelineEvent]:
    """The ``repeated:`` marks on ``rank``'s compute lane (its own for a pipeline plan)."""
    def mine(e: TimelineEvent) -> bool:
        return e.stream == "compute" if plan.pipeline is None else rank_of_stream(e.stream) == (rank, "compute")
    return [e for e in plan.prediction.timeline if e.name.startswith("repeated:") and mine(e)]


def _ordered_streams(events: tuple[TimelineEvent, ...]) -> list[str]:
    present = {e.stream for e in events}
    return [s for s in STREAMS if s in present] + sorted(present - set(STREAMS))


def _timeline_svg(plan: Plan) -> str:
    events = plan.prediction.timeline
    if not events:
        return '<p class="note">The plan carries no simulated timeline.</p>'
    drawn = events[:_MAX_TIMELINE_BOXES]
    streams = _ordered_streams(drawn)
    lane = {s: i for i, s in enumerate(streams)}
    t0 = min(e.start_s for e in drawn)
    span_s = max(max(e.end_s for e in drawn) - t0, 1e-12)
    label_w, plot_w, lane_h, axis_h = 80, 1000, 24, 24
    height = lane_h * len(streams) + axis_h
    parts = [f'<svg id="timeline-chart" xmlns="http://www.w3.org/2000/svg" width="{label_w + plot_w + 10}" '
             f'height="{height}" role="img" aria-label="simulated timeline">', ELIDED_DEFS]
    for s, i in lane.items():
        y = i * lane_h
        parts.append(f'<rect x="{label_w}" y="{y + 2}" width="{plot_w}" height="{lane_h - 4}" fill="#f7f7f7"/>')
        parts.append(f'<text x="0" y="{y + 16}">{_e(s)}</text>')
    axis_y = lane_h * len(streams)
    for k in range(6):
        x = label_w + plot_w * k / 5
        anchor = "start" if k == 0 else "end" if k == 5 else "middle"
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{axis_y + 4}" stroke="#ccc"/>')
        parts.append(f'<text x="{x:.1f}" y="{axis_y + 16}" text-anchor="{anchor}">{_e(format_seconds(span_s * k / 5))}</text>')
    for e in drawn:
        x = label_w + plot_w * (e.start_s - t0) / span_s
        # Sub-pixel boxes are widened to stay visible and hoverable; their titles carry the true time.
        w = max(plot_w * (e.end_s - e.start_s) / span_s, 0.5)
        kind = event_kind(e)
        title = (f"{e.name} [{kind}, {e.stream}] {format_seconds(e.start_s - t0)} → "
                 f"{format_seconds(e.end_s - t0)} ({format_seconds(e.end_s - e.start_s)})")
        if kind == "elided":  # hatched and labelled where it happens: what this stretch stands for
            parts.append(elided_svg(x, lane[e.stream] * lane_h + 4, w, lane_h - 8, e.name, title))
            continue
        parts.append(f'<rect x="{x:.2f}" y="{lane[e.stream] * lane_h + 4}" width="{w:.2f}" height="{lane_h - 8}" '
                     f'fill="{_KIND_COLOURS[kind]}"><title>{_e(title)}</title></rect>')
    parts.append("</svg>")
    kinds = sorted({event_kind(e) for e in drawn}, key=EVENT_KINDS.index)
    out = "\n".join(parts) + "\n" + _legend([(k, _KIND_COLOURS[k]) for k in kinds])
    if len(events) > len(drawn):
        out += f'\n<p class="note">First {len(drawn):,} of {len(events):,} events drawn; the Chrome trace has all.</p>'
    return out


def render_html(plan: Plan) -> str:
    """The HTML page of ``write_html`` as a string."""
    fit_class = "fits" if plan.fits else "nofit"
    body = [
        f"<h1>memtrain plan: {_e(plan.name)}</h1>",
        f'<p class="{fit_class}">{_e(_fit_line(plan))}</p>',
    ]
    sections = _sections(plan)
    body.append(_html_table(sections[0]))
    body.append("<h2>Memory at peak, by owner</h2>")
    body.append(_memory_svg(plan))
    body.extend(_html_table(s) for s in sections[1:])
    body.append("<h2>Simulated step</h2>")
    body.append(gantt_svg(plan) if plan.pipeline is not None else _timeline_svg(plan))
    body.append("<h2>Memory over the step</h2>")
    body.append(_memory_lines_svg(plan))
    template = Template(resources.files("memtrain.planner").joinpath("report_template.html").read_text())
    return template.substitute(title=_e(f"memtrain plan: {plan.name}"), version=_e(plan.version), body="\n".join(body))


def write_html(plan: Plan, path: str | Path) -> None:
    """Write one self-contained HTML page (tables, memory chart, timeline) to ``path`` atomically."""
    atomic_write_text(path, render_html(plan))


# ---------------------------------------------------------------------------------------------
# Chrome / Perfetto trace (Trace Event Format: "X" complete events, µs timestamps).


def trace_events(plan: Plan) -> list[dict]:
    """Trace Event Format events for the plan's timeline: metadata, one "X" per event, counters
    (a pipeline plan: one process per rank, planner.report_pipeline)."""
    if plan.pipeline is not None:
        return pipeline_trace_events(plan)
    pid = plan.prediction.devices[0].rank if plan.prediction.devices else 0
    events = plan.prediction.timeline
    streams = _ordered_streams(events) if events else list(STREAMS)
    tid = {s: i for i, s in enumerate(streams)}
    out: list[dict] = [
        {"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
         "args": {"name": f"{plan.name}: rank {pid} ({plan.device.kind})"}},
    ]
    for s, i in tid.items():
        out.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": i, "args": {"name": s}})
        out.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": i, "args": {"sort_index": i}})
    for e in events:
        kind = event_kind(e)
        out.append({"name": e.name, "cat": kind, "ph": "X", "pid": pid, "tid": tid[e.stream],
                    "ts": e.start_s * 1e6, "dur": (e.end_s - e.start_s) * 1e6,
                    "args": {"stream": e.stream, "kind": kind}})
    # Memory over the step: each tier's bytes in use at each change (the ledger's owners, so the
    # device line leaves out the workspace the peak adds), beside its budget. A plan from before
    # the line was kept shows the peak and the budget as flat tracks instead.
    if events and plan.prediction.devices:
        dev = plan.prediction.devices[0]
        t_first = min(e.start_s for e in events) * 1e6
        t_last = max(e.end_s for e in events) * 1e6
        for tier in _tiers_of(plan, 0):
            budget = dev.budget_bytes.get(tier, 0)
            line = [p for p in dev.memory_timeline if p.tier == tier]
            if line:
                out += [{"name": f"memory {tier}", "ph": "C", "pid": pid, "ts": p.t_s * 1e6,
                         "args": {"in_use_bytes": p.bytes}} for p in line]
                out += [{"name": f"budget {tier}", "ph": "C", "pid": pid, "ts": ts, "args": {"budget_bytes": budget}}
                        for ts in (t_first, t_last)]
                continue
            args = {"peak_bytes": dev.peak_bytes.get(tier, 0), "budget_bytes": budget}
            for ts in (t_first, t_last):
                out.append({"name": f"memory {tier}", "ph": "C", "pid": pid, "ts": ts, "args": args})
    return out


def write_trace(plan: Plan, path: str | Path) -> None:
    """Write the timeline as a Chrome trace (chrome://tracing, ui.perfetto.dev) to ``path`` atomically."""
    doc = {
        "traceEvents": trace_events(plan),
        "displayTimeUnit": "ms",
        "otherData": {"plan": plan.name, "model": plan.model.name, "step_time_s": plan.prediction.step_time_s},
    }
    atomic_write_text(path, json.dumps(doc, separators=(",", ":")))
