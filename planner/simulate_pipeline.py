"""A pipeline schedule simulated over its ranks and the links between them.

The multi-rank half of the simulator: each rank's list (planner.pipeline, with or without its
sends and receives) becomes tasks on that rank's compute stream (``compute:<rank>``) and on a
stream per directed link (``link:<src>>dst``), in the task graph of planner.taskgraph. A pass
takes its stage's time; a send takes the link's latency plus the bytes at its bandwidth, after
the pass that produced them, and its receive, a task on the receiving rank, waits for it and
then takes the link's ``recv_s``: what a receive costs its rank once both sides are ready (under
gloo a rendezvous round, bench/link_probe.py [Note: rendezvous]; 0 where the data lands without
the receiver's help). Without sends and receives in the lists, a pass waits for the pass it needs directly.
A stage's activations are held on its rank (tier ``rank<r>``) from the end of its forward to the
end of its backward, or of its ``W`` when the backward is split. The per-rank memory this gives
is the activation part only; chunks and offload per stage are the single-device simulator's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from memtrain.planner.pipeline import Placement, _deps, run_in_order
from memtrain.planner.plan import Action, Op
from memtrain.planner.schedule import Schedule
from memtrain.planner.taskgraph import TaskGraph, simulate_graph

__all__ = ["StageCost", "Link", "PipelineResult", "simulate_pipeline"]


@dataclass(frozen=True, slots=True)
class StageCost:
    """One stage's passes for one micro-batch."""

    fwd_s: float
    bwd_s: float
    """The backward: its input gradients only (``B``) when the schedule splits off ``W``."""
    wgrad_s: float = 0.0
    """The weight gradients (``W``) of a split backward."""
    activation_bytes: int = 0
    """Held from the end of the forward to the end of the backward (or of ``W``)."""
    output_bytes: int = 0
    """Sent to the next stage after the forward; its gradient, as large, comes back."""


@dataclass(frozen=True, slots=True)
class Link:
    """A point-to-point link between two ranks."""

    gbps: float
    latency_s: float = 0.0
    recv_s: float = 0.0
    """The receiving rank's own time per receive, from when both sides are ready (see the module
    doc); the wire's ``latency_s`` is what is left of a transfer's fixed cost."""

    def time_s(self, num_bytes: int) -> float:
        return self.latency_s + num_bytes / (self.gbps * 1e9)


@dataclass(frozen=True, slots=True)
class PipelineResult:
    step_time_s: float
    bubble_fraction: float
    """The share of the ranks' compute time idle over the step."""
    peak_bytes: dict[int, int]
    """Per rank, the most activation bytes held at once."""
    pass_times: dict[tuple[Op, int, int], tuple[float, float]]
    """Each pass's (start, end)."""
    send_times: dict[tuple[Op, int, int], tuple[float, float]] = field(default_factory=dict)
    """Each send's (start, end) on its link (``SEND_F``/``SEND_B``, stage, micro-batch)."""


def simulate_pipeline(schedule: Schedule, place: Placement, stages: Sequence[StageCost], link: Link,
                      links: Mapping[tuple[int, int], Link] | None = None) -> PipelineResult:
    """Simulate one step of ``schedule`` (see the module doc); raises ``ValueError`` when it
    deadlocks or its stages and costs do not match. ``links[(src, dst)]``, where given, is the
    link between two ranks instead of ``link`` (ranks on one node and across nodes differ)."""
    if len(stages) != place.num_stages:
        raise ValueError(f"stages: {len(stages)} stage costs for {place.num_stages} stages; give one per stage")
    last = place.num_stages - 1
    split_w = any(a.op is Op.W for acts in schedule.values() for a in acts)
    has_p2p = any(a.op in (Op.SEND_F, Op.RECV_F, Op.SEND_B, Op.RECV_B) for acts in schedule.values() for a in acts)
    g = TaskGraph()
    task: dict[tuple[Op, int, int], int] = {}

    def run(r: int, k: int, a: Action) -> bool:
        deps = _task_deps(a, task, place, r, last, has_p2p)
        if deps is None:
            return False
        _add(g, task, a, r, deps, place, stages, link, split_w, links or {})
        return True

    pos = run_in_order(schedule, run)
    stuck = [f"rank {r} at step {k} ({schedule[r][k]})" for r, k in pos.items() if k < len(schedule[r])]
    if stuck:
        raise ValueError(f"simulate_pipeline: the schedule deadlocks: {'; '.join(stuck)} (validate_pipeline shows where)")
    res = simulate_graph(g)
    step = res.end_s
    passes = {k: (res.start_s[t], res.finish_s[t]) for k, t in task.items() if k[0] in (Op.F, Op.B, Op.W)}
    busy = sum(end - start for start, end in passes.values())
    peaks = {r: res.peak_bytes.get(f"rank{r}", 0) for r in schedule}
    sends = {k: (res.start_s[t], res.finish_s[t]) for k, t in task.items() if k[0] in (Op.SEND_F, Op.SEND_B)}
    return PipelineResult(step_time_s=step, bubble_fraction=1.0 - busy / (step * len(schedule)) if step else 0.0,
                          peak_bytes=peaks, pass_times=passes, send_times=sends)


def _task_deps(a: Action, task: dict, place: Placement, r: int, last: int, has_p2p: bool) -> list[int] | None:
    """The tasks ``a`` waits for, or None while one of them is not in the graph yet."""
    s, i = a.stage, a.microbatch
    if a.op is Op.RECV_F:
        need = [(Op.SEND_F, s - 1, i)]
    elif a.op is Op.RECV_B:
        need = [(Op.SEND_B, s + 1, i)]
    elif a.op is Op.SEND_F:
        need = [(Op.F, s, i)]
    elif a.op is Op.SEND_B:
        need = [(Op.B, s, i)]
    else:
        need = []
        for op, t, j in _deps(a, last):
            if has_p2p and place.rank_of[t] != r:  # through its receive on this rank
                need.append((Op.RECV_F if op is Op.F else Op.RECV_B, s, i))
            else:
                need.append((op, t, j))
    if not all(k in task for k in need):
        return None
    return [task[k] for k in need]


def _add(g: TaskGraph, task: dict, a: Action, r: int, deps: list[int], place: Placement,
         stages: Sequence[StageCost], link: Link, split_w: bool, links: Mapping[tuple[int, int], Link]) -> None:
    s, i = a.stage, a.microbatch
    cost = stages[s]
    tier, owner = f"rank{r}", f"act:{s}:{i}"
    compute = f"compute:{r}"
    if a.op is Op.F:
        t = g.add(str(a), compute, cost.fwd_s, deps=deps, alloc_end=[(tier, owner, cost.activation_bytes)])
    elif a.op is Op.B:
        frees = [] if split_w else [(tier, owner, cost.activation_bytes)]
        t = g.add(str(a), compute, cost.bwd_s, deps=deps, free_end=frees)
    elif a.op is Op.W:
        t = g.add(str(a), compute, cost.wgrad_s, deps=deps, free_end=[(tier, owner, cost.activation_bytes)])
    elif a.op in (Op.SEND_F, Op.SEND_B):
        dst = place.rank_of[s + 1] if a.op is Op.SEND_F else place.rank_of[s - 1]
        nbytes = cost.output_bytes if a.op is Op.SEND_F else stages[s - 1].output_bytes
        t = g.add(str(a), f"link:{r}>{dst}", links.get((r, dst), link).time_s(nbytes), deps=deps)
    elif a.op in (Op.RECV_F, Op.RECV_B):
        src = place.rank_of[s - 1] if a.op is Op.RECV_F else place.rank_of[s + 1]
        t = g.add(str(a), compute, links.get((src, r), link).recv_s, deps=deps)
    else:
        raise ValueError(f"simulate_pipeline: no cost for {a} (op {a.op.value})")
    task[(a.op, s, i)] = t
