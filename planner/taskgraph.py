"""The generic discrete-event engine behind the simulator (planner.simulate).

Tasks run on streams (``compute``, ``h2d``, ``d2h``, ``disk``, ``cpu``, ``grads``; one of them
per rank as ``compute:2``, and links as ``link:0>1``, in a multi-rank graph), in order per stream
like CUDA streams, after their dependencies, for a fixed duration, and allocate/free bytes per
tier and owner. ``simulate_graph`` gives every task's start and end and each tier's peak with
the owners holding it. Nothing here knows about models or policies: ``planner.simulate``
builds the graph of a training step.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["STREAMS", "TaskGraph", "GraphResult", "simulate_graph"]

STREAMS = ("compute", "h2d", "d2h", "disk", "cpu", "grads")

_END_ALLOC, _END_FREE, _START_ALLOC = 0, 1, 2  # order of memory events at the same instant


class TaskGraph:
    """Tasks in program order. A task may depend only on tasks added before it."""

    __slots__ = ("names", "streams", "durations", "deps", "mem", "tags", "last_on")

    def __init__(self) -> None:
        self.names: list[str] = []
        self.streams: list[str] = []
        self.durations: list[float] = []
        self.deps: list[tuple[int, ...]] = []
        self.mem: list[tuple[tuple[int, str, str, int], ...]] = []
        self.tags: list[int] = []
        self.last_on: dict[str, int] = {}
        """Per stream, the last task added to it."""

    def __len__(self) -> int:
        return len(self.names)

    def add(
        self,
        name: str,
        stream: str,
        duration_s: float,
        *,
        deps: tuple[int, ...] | list[int] = (),
        alloc_start: tuple | list = (),
        alloc_end: tuple | list = (),
        free_end: tuple | list = (),
        tag: int = -1,
    ) -> int:
        """Add a task; memory items are ``(tier, owner, bytes)``. Returns the task's id.

        ``alloc_start`` bytes are taken when the task starts, ``alloc_end`` and ``free_end``
        when it ends (an owner allocated by one task is usually freed by another).
        """
        tid = len(self.names)
        assert stream in STREAMS or stream.split(":", 1)[0] in STREAMS + ("link",), stream
        assert not deps or (min(deps) >= 0 and max(deps) < tid), (name, deps)
        self.names.append(name)
        self.streams.append(stream)
        self.durations.append(duration_s)
        self.deps.append(tuple(deps))
        mem: tuple = ()
        if alloc_start or alloc_end or free_end:
            mem = (tuple((_START_ALLOC, t, o, b) for t, o, b in alloc_start if b)
                   + tuple((_END_ALLOC, t, o, b) for t, o, b in alloc_end if b)
                   + tuple((_END_FREE, t, o, b) for t, o, b in free_end if b))
        self.mem.append(mem)
        self.tags.append(tag)
        self.last_on[stream] = tid
        return tid


@dataclass(frozen=True, kw_only=True, slots=True)
class GraphResult:
    """What ``simulate_graph`` found: task times and per-tier memory peaks."""

    end_s: float
    """When the last task ends."""
    start_s: tuple[float, ...]
    """Per task id."""
    finish_s: tuple[float, ...]
    """Per task id."""
    peak_bytes: dict[str, int]
    """Per tier, the most bytes held at once."""
    peak_owners: dict[str, dict[str, int]]
    """Per tier, bytes by owner at that tier's (first) peak."""
    group_peak_bytes: dict[str, int]
    """Per group of ``simulate_graph``'s ``group`` (owners across tiers), the most bytes the group
    held at once, whenever that was."""
    memory_events: tuple[tuple[float, int, str, int], ...] = ()
    """With ``simulate_graph(record=True)``: every allocation and free as (time, task id, tier,
    signed bytes), in the order they count."""

    def breakdown(self) -> dict[str, dict[str, int]]:
        """Per tier, bytes at the peak summed by owner kind (``chunk``, ``buffer``, ``act``,
        ``staging``), as ``Ledger.peak_breakdown(group=True)`` reports them."""
        out: dict[str, dict[str, int]] = {}
        for tier, owners in self.peak_owners.items():
            grouped: dict[str, int] = defaultdict(int)
            for owner, b in owners.items():
                grouped[owner.split(":", 1)[0]] += b
            out[tier] = dict(grouped)
        return out


def simulate_graph(graph: TaskGraph,
                   group: Callable[[str, str, int], Iterable[tuple[str, int]]] | None = None,
                   record: bool = False) -> GraphResult:
    """Run the graph: each task starts when its stream is free and its dependencies are done.
    ``group(tier, owner, bytes)`` names the groups an allocation of ``bytes`` (or its free)
    counts in, with the part of it each one counts, for ``GraphResult.group_peak_bytes``;
    ``record`` keeps every memory event (``GraphResult.memory_events``)."""
    n = len(graph)
    start = [0.0] * n
    finish = [0.0] * n
    stream_free: dict[str, float] = defaultdict(float)
    events: list[tuple[float, int, int, int, str, str, int]] = []
    streams, durations, deps, mem = graph.streams, graph.durations, graph.deps, graph.mem
    for tid in range(n):
        t0 = stream_free[streams[tid]]
        for d in deps[tid]:
            if finish[d] > t0:
                t0 = finish[d]
        t1 = t0 + durations[tid]
        start[tid], finish[tid] = t0, t1
        stream_free[streams[tid]] = t1
        for kind, tier, owner, b in mem[tid]:
            signed = -b if kind == _END_FREE else b
            if kind == _START_ALLOC:
                events.append((t0, _START_ALLOC, tid, 0, tier, owner, signed))
            elif t1 > t0:
                events.append((t1, kind, tid, 0, tier, owner, signed))
            else:  # a zero-length task ends right after its own start, before later tasks start
                events.append((t1, _START_ALLOC, tid, 1 + kind, tier, owner, signed))
    # At one instant: ends of running tasks (their allocations, then frees), then starts in
    # program order; so a task waiting for bytes to be freed never counts them twice.
    events.sort(key=lambda e: e[:4])

    in_use: dict[str, int] = defaultdict(int)
    peak: dict[str, int] = defaultdict(int)
    peak_at: dict[str, int] = {}
    group_use: dict[str, int] = defaultdict(int)
    group_peak: dict[str, int] = defaultdict(int)
    for pos, (_, _, _, _, tier, owner, b) in enumerate(events):
        in_use[tier] += b
        assert in_use[tier] >= 0, f"{tier}: more freed than allocated at event {pos}"
        if in_use[tier] > peak[tier]:
            peak[tier] = in_use[tier]
            peak_at[tier] = pos
        if group is not None:
            sign = -1 if b < 0 else 1
            for name, part in group(tier, owner, abs(b)):
                group_use[name] += sign * part
                assert group_use[name] >= 0, f"group {name}: more freed than allocated at event {pos}"
                if group_use[name] > group_peak[name]:
                    group_peak[name] = group_use[name]
    peak_owners: dict[str, dict[str, int]] = {}
    for tier, at in peak_at.items():
        owners: dict[str, int] = defaultdict(int)
        for _, _, _, _, t, owner, b in events[: at + 1]:
            if t == tier:
                owners[owner] += b
        peak_owners[tier] = {o: b for o, b in owners.items() if b}
    return GraphResult(
        end_s=max(finish, default=0.0),
        start_s=tuple(start),
        finish_s=tuple(finish),
        peak_bytes=dict(peak),
        peak_owners=peak_owners,
        group_peak_bytes=dict(group_peak),
        memory_events=tuple((e[0], e[2], e[4], e[6]) for e in events) if record else (),
    )
