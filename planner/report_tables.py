"""The summary of a Plan as data (planner.report): tables of formatted cells, shared by the
terminal and HTML renderers so both show the same figures.

``_sections`` gives the tables in the order the reports show them (a pipeline plan's per-rank
ones from planner.report_pipeline); the helpers (``_tiers_of``, ``_grouped_breakdown``,
``_percent``) are the HTML page's too. Reads the Plan only; computes no cost.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from memtrain.planner.plan import ActPolicy, Plan, Tier
from memtrain.planner.report_pipeline import pipeline_tables
from memtrain.units import format_bytes, format_seconds

__all__ = ["_Table", "_sections", "_fit_line", "_tiers_of", "_grouped_breakdown", "_percent"]

_MAX_BLOCK_ROWS = 16
"""The per-block activation table is shown up to this many blocks (counts are always shown)."""
_MAX_ALTERNATIVES = 5


@dataclass(frozen=True, kw_only=True, slots=True)
class _Table:
    title: str
    """Section heading."""
    columns: tuple[str, ...]
    """Column headers; empty for a key/value table (two columns: label, value)."""
    rows: tuple[tuple[str, ...], ...]
    """Cells, already formatted for people."""
    numeric: tuple[int, ...] = ()
    """Indices of right-aligned (numeric) columns."""


def _format_count(n: float) -> str:
    """1_300_000_000 -> '1.30 B' (parameters, elements)."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f}"


def _percent(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole > 0 else "—"


def _owner_group(owner: str) -> str:
    # Ledger owners are "chunk:<i>", "act:<block>:<mb>", "buffer:param:<i>" (docs/memory-accounting.md);
    # a summary groups them by their leading word so a 175B plan gives a handful of rows, not thousands.
    return owner.split(":", 1)[0]


def _grouped_breakdown(breakdown: dict[str, int]) -> list[tuple[str, int]]:
    groups: Counter[str] = Counter()
    for owner, num_bytes in breakdown.items():
        groups[_owner_group(owner)] += num_bytes
    return sorted(groups.items(), key=lambda kv: (-kv[1], kv[0]))


def _top_owners(breakdown: dict[str, int], peak_bytes: int, limit: int = 3) -> str:
    groups = [(o, b) for o, b in _grouped_breakdown(breakdown) if b > 0]
    parts = [f"{owner} {format_bytes(b)} ({_percent(b, peak_bytes)})" for owner, b in groups[:limit]]
    if len(groups) > limit:
        parts.append(f"+{len(groups) - limit} more")
    return ", ".join(parts) if parts else "—"


def _tiers_of(plan: Plan, dev_index: int) -> list[str]:
    dev = plan.prediction.devices[dev_index]
    known = [t.value for t in Tier]
    extra = sorted((set(dev.peak_bytes) | set(dev.budget_bytes)) - set(known))
    return [t for t in known + extra if dev.peak_bytes.get(t, 0) or dev.budget_bytes.get(t, 0) or t in known[:2]]


def _header_table(plan: Plan) -> _Table:
    dev, host, nvme = plan.device, plan.host, plan.nvme
    rows = [
        ("plan", plan.name),
        ("model", plan.model.name),
        ("parameters", f"{_format_count(plan.model.num_params)} ({plan.model.num_params:,})"),
        ("device", f"{dev.name} ({dev.kind}), {format_bytes(dev.memory_bytes)}"),
        ("host", f"{format_bytes(host.memory_bytes)} RAM, {host.num_cpus} CPUs"),
        ("nvme", "none" if nvme is None else f"{nvme.path}, {format_bytes(nvme.capacity_bytes)}, "
                                              f"read {nvme.read_gbps:g} GB/s, write {nvme.write_gbps:g} GB/s"),
        ("figures from", " — ".join((plan.source, *plan.source_notes))),
    ]
    return _Table(title="Plan", columns=(), rows=tuple(rows))


def _memory_table(plan: Plan) -> _Table:
    many = len(plan.prediction.devices) > 1
    rows = []
    for i, dev in enumerate(plan.prediction.devices):
        for tier in _tiers_of(plan, i):
            peak, budget = dev.peak_bytes.get(tier, 0), dev.budget_bytes.get(tier, 0)
            budget_text = format_bytes(budget) if budget else "unavailable"
            row = (tier, format_bytes(peak), budget_text, _percent(peak, budget),
                   _top_owners(dev.breakdown.get(tier, {}), peak))
            rows.append(((str(dev.rank), dev.device) + row) if many else row)
    columns = ("tier", "peak", "budget", "used", "top owners at peak")
    if many:
        columns = ("rank", "device") + columns
    first_num = 3 if many else 1
    return _Table(title="Memory per tier", columns=columns, rows=tuple(rows),
                  numeric=(first_num, first_num + 1, first_num + 2))


def _step_table(plan: Plan) -> _Table:
    pred, train = plan.prediction, plan.train
    rows = [
        ("step time", format_seconds(pred.step_time_s)),
        ("tokens/s", f"{pred.tokens_per_s:,.0f}"),
        ("MFU", f"{100.0 * pred.mfu:.1f}%"),
        ("batch", f"micro-batch {train.micro_batch_size} × {train.num_microbatches} micro-batches "
                  f"(global {train.global_batch_size} sequences × {train.seq_len} tokens = "
                  f"{train.tokens_per_step:,} tokens/step)"),
        ("precision", f"{train.dtype.value}, {train.optimizer.value}"),
    ]
    for dev in pred.devices:
        if dev.process_bytes:
            what = "RSS" if dev.device == "cpu" else "reserved device memory"
            rank = f" (rank {dev.rank})" if len(pred.devices) > 1 else ""
            rows.append((f"process memory{rank}", f"{format_bytes(dev.process_bytes)} above the process's "
                                                  f"baseline ({what}; docs/memory-accounting.md)"))
    return _Table(title="Predicted step", columns=(), rows=tuple(rows))


def _policy_table(plan: Plan) -> _Table:
    mem = plan.memory
    homes = Counter(c.home.value for c in mem.chunks)
    elems = Counter()
    for c in mem.chunks:
        elems[c.home.value] += c.num_elems
    home_text = ", ".join(
        f"{t.value} {homes[t.value]} ({_format_count(elems[t.value])} elems)" for t in Tier if homes[t.value]
    ) or "no chunks"
    acts = Counter(p.value for p in mem.activations)
    act_text = ", ".join(f"{p.value} {acts[p.value]}" for p in ActPolicy if acts[p.value]) or "none"
    rows = [
        ("chunk size", f"{_format_count(mem.chunk_size_elems)} elems"),
        ("chunks", f"{len(mem.chunks)}: {home_text}"),
        ("prefetch depth", str(mem.prefetch_depth)),
        ("nvme compression", "zstd" if mem.compress_nvme else "off"),
        ("optimizer staging", f"{mem.optim_staged_chunks} NVMe chunks at once" if any(c.home is Tier.NVME for c in mem.chunks)
         else "no NVMe chunks"),
        ("activations", act_text),
    ]
    if ActPolicy.SWAP_HOST in mem.activations or ActPolicy.SWAP_NVME in mem.activations:
        pacing = f"swap-ins {mem.swap_in_ahead} block(s) ahead of the backward"
        if ActPolicy.SWAP_NVME in mem.activations:
            pacing += f", {mem.swap_writes_in_flight} NVMe write(s) in flight"
        rows.append(("swap pacing", pacing))
    return _Table(title="Memory policy", columns=(), rows=tuple(rows))


def _blocks_table(plan: Plan) -> _Table | None:
    blocks = plan.model.scaled(plan.train.micro_batch_size).blocks
    if len(blocks) > _MAX_BLOCK_ROWS:
        return None
    policies = plan.memory.activations
    rows = tuple(
        (b.name, _format_count(b.num_params), format_bytes(b.activation_bytes),
         policies[i].value if i < len(policies) else "—")
        for i, b in enumerate(blocks)
    )
    return _Table(title=f"Blocks (activations per micro-batch of {plan.train.micro_batch_size})",
                  columns=("block", "params", "activations", "policy"), rows=rows, numeric=(1, 2))


def _alternatives_table(plan: Plan) -> _Table | None:
    if not plan.alternatives:
        return None
    alts = plan.alternatives[:_MAX_ALTERNATIVES]
    rows = tuple(
        (a.description, "yes" if a.fits else "no",
         "—" if a.step_time_s is None else format_seconds(a.step_time_s), a.reason)
        for a in alts
    )
    more = len(plan.alternatives) - len(alts)
    title = "Alternatives not chosen" + (f" (top {len(alts)} of {len(plan.alternatives)})" if more else "")
    return _Table(title=title, columns=("alternative", "fits", "step time", "why not chosen"), rows=rows,
                  numeric=(2,))


def _sections(plan: Plan) -> list[_Table]:
    if plan.pipeline is not None:  # per rank instead of one device's policy (planner.report_pipeline)
        pipe = [_Table(title=t, columns=c, rows=r, numeric=n) for t, c, r, n in pipeline_tables(plan)]
        return [_header_table(plan), *pipe[:2], _memory_table(plan), _step_table(plan), *pipe[2:]]
    tables = [_header_table(plan), _memory_table(plan), _step_table(plan), _policy_table(plan),
              _blocks_table(plan), _alternatives_table(plan)]
    return [t for t in tables if t is not None]


def _fit_line(plan: Plan) -> str:
    return "fits" if plan.fits else f"does not fit: {plan.shortfall or 'no shortfall given'}"
