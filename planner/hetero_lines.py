"""A simulated pipeline candidate (``Simulated``, planner.hetero_plan ``simulate_candidate``'s) and
its pictures in the plan: each rank's memory line over the step (``_memory_line``) and the
per-rank timeline (``_timeline``), the micro-batches a long candidate does not simulate drawn
where they run ([Note: repeated micro-batches in the picture], planner.hetero_plan ``_steady_cut``).
Reads what the simulation gave; computes no cost.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass

from memtrain.planner.partition import Candidate
from memtrain.planner.plan import Action, MemoryPoint, Op, TimelineEvent
from memtrain.planner.simulate_builder import copy_streams
from memtrain.planner.simulate_pipeline import PipelineResult
from memtrain.planner.stage_cost import StageEstimate
from memtrain.units import format_seconds

__all__ = ["Simulated", "SPLIT_W", "PATTERN_MICROBATCHES", "_fetch_stream", "_placed", "_memory_line", "_timeline"]

SPLIT_W = ("zb-h1", "v-half", "v-min")
"""The schedules whose backward is split into ``B`` and ``W``."""


@dataclass(slots=True)
class Simulated:
    cand: Candidate
    estimates: list[StageEstimate]
    result: PipelineResult | None
    step_s: float
    pipeline_end_s: float
    """When the last pass of any rank ends."""
    busy_s: list[float]
    """Per pipeline rank, its passes' time over the whole step."""
    end_s: list[float]
    allreduce_s: list[float]
    optimizer_s: list[float]
    device_bytes: list[int]
    static_bytes: list[int]
    host_bytes: list[int]
    nvme_bytes: list[int]
    simulated_microbatches: int
    problem: str = ""
    cut_s: float | None = None
    """An extrapolated run's time where the micro-batches not simulated go ([Note: repeated
    micro-batches in the picture]); None: after its last pass."""
    shift_s: float = 0.0
    """How long they take: (micro-batches - simulated) × the steady state's period."""
    period_s: float = 0.0
    grad_bytes: list[int] | None = None
    """Per rank under ZeRO, its device stages' whole gradient bytes (what the sum leaves ``1 / d`` of)."""
    copy_bytes: list[int] | None = None
    """Per rank, the most device bytes its gradients' copies take after the passes ([Note:
    gradient copies after the passes])."""
    act_bytes: list[int] | None = None
    """Per rank, its activations' peak alone (its received buffers and gradient copies apart)."""
    walk_s: list[float] = dataclasses.field(default_factory=list)
    """Per rank, its dropout walk at the step's start (planner.stage_cost [Note: the dropout walk])."""

    @property
    def fits(self) -> bool:
        return not self.problem

    @property
    def peak_fraction(self) -> float:
        return max(b / max(self.cand.ranks[r][4].device, 1) for r, b in enumerate(self.device_bytes))

    @property
    def bubble(self) -> float:
        p = len(self.busy_s)
        return 1.0 - sum(self.busy_s) / (self.pipeline_end_s * p) if self.pipeline_end_s else 0.0


def _fetch_stream(cand: Candidate, s: int) -> str:
    """The stream stage ``s``'s fetch runs on, without its rank: the device's copy stream, the
    compute stream on a CPU device (planner.simulate_builder ``copy_streams``)."""
    return copy_streams(cand.ranks[cand.stage_ranks[s]][1])[0]


def _placed(sim: Simulated, start: float, item: tuple[Op, int, int]) -> tuple[float, tuple[Op, int, int]]:
    """Where a pass or send of the short run goes in the whole step: one that starts at or after
    the cut moves on by the repeated micro-batches and becomes theirs that many later ([Note:
    repeated micro-batches in the picture])."""
    if sim.cut_s is None or start < sim.cut_s:
        return 0.0, item
    op, s, i = item
    return sim.shift_s, (op, s, i + sim.cand.shape.num_microbatches - sim.simulated_microbatches)


PATTERN_MICROBATCHES = 2
"""Micro-batches after which a steady state repeats itself: two (ZB-H1's deferred W and V-Min's
held-back forwards alternate from one micro-batch to the next; the others repeat every one);
interleaved 1F1B a group of ``p``. The memory lines repeat that many before the cut."""


def _memory_line(sim: Simulated, r: int) -> tuple[MemoryPoint, ...]:
    """Rank ``r``'s bytes in use per tier over the whole step. Device: its static bytes (states,
    buffers, workspace), a bf16 keep stage's weight casts from its first forward to the rank's last
    pass, plus each held micro-batch's activations from the end of its forward to
    the end of its backward (or W), under a split backward what its B brings back from the
    B's start to the W's end (planner.stage_cost [Note: activations between B and W]), and each
    received buffer from its post to the start of the pass that takes it (planner.simulate_pipeline
    [Note: received buffers]) and each sent tensor from its send to its release ([Note: sent
    tensors]). An
    extrapolated run's repeated micro-batches are drawn ([Note: repeated micro-batches in the
    picture]): each (pass, stage) of the rank repeats its last
    ``PATTERN_MICROBATCHES`` before the cut (interleaved: a group of ``p``) as many periods
    apart, before its first after the cut runs, moved on by all of them;
    without a cut they are held level (the timeline marks them "not drawn"). Host and NVMe: what
    its stages offload at their peak, drawn level over the step (a stage's offload figures do
    not say when within it; states homed there are held all step)."""
    if sim.result is None:
        return ()
    split = sim.cand.shape.schedule in SPLIT_W
    frees = Op.W if split else Op.B

    def delta(op: Op, s: int) -> int:
        est = sim.estimates[s]
        if op is Op.F:
            return est.act_bytes
        if op is frees:
            return -est.act_bytes - (est.bw_bytes if split else 0)
        return est.bw_bytes  # a split backward's B, from its start

    # what moves the line: (kind, stage) -> per micro-batch (when, where it is placed by, bytes)
    items: dict[tuple[object, int], dict[int, tuple[float, float, int]]] = defaultdict(dict)
    for (op, s, i), (start, end) in sim.result.pass_times.items():
        brings = split and op is Op.B and sim.estimates[s].bw_bytes > 0
        if sim.cand.stage_ranks[s] != r or (op not in (Op.F, frees) and not brings):
            continue
        items[(op, s)][i] = (start if brings else end, start, delta(op, s))
    for (op, s, i), (posted, taken, nbytes) in sim.result.recv_times.items():  # planner.simulate_pipeline
        if sim.cand.stage_ranks[s] == r:  # [Note: received buffers]: held from the post to its pass
            items[(("post", op), s)][i] = (posted, posted, nbytes)
            items[(("take", op), s)][i] = (taken, taken, -nbytes)
    for (op, s, i), (held, let_go, nbytes) in sim.result.sent_times.items():  # planner.simulate_pipeline
        if sim.cand.stage_ranks[s] == r:  # [Note: sent tensors]: held from the send to its release
            items[(("hold", op), s)][i] = (held, held, nbytes)
            items[(("release", op), s)][i] = (let_go, let_go, -nbytes)
    moves: list[tuple[float, int]] = []
    ends: dict[tuple[object, int], dict[int, float]] = defaultdict(dict)  # when each item moves the line
    first: dict[tuple[object, int], int] = {}
    for key, per_mb in items.items():
        for i, (at, start, b) in per_mb.items():
            shift, _ = _placed(sim, start, (Op.F, key[1], i))
            moves.append((at + shift, b))
            ends[key][i] = at
            if shift:
                first[key] = min(first.get(key, i), i)
    # the missing passes i0 .. i0+k-1 of each (pass, stage) repeat its last g before the cut,
    # g periods apart (the first after the cut, a period apart, where fewer came before)
    g = sim.cand.shape.pipeline if sim.cand.shape.schedule == "interleaved-1f1b" else PATTERN_MICROBATCHES
    k = sim.cand.shape.num_microbatches - sim.simulated_microbatches
    if sim.cut_s is not None:  # a buffer posted before the cut for a pass after it: the posts after it repeat
        for key, per_mb in items.items():
            i0 = max(per_mb) + 1
            if key not in first and all(i in per_mb for i in range(i0 - g, i0)):
                first[key] = i0
    for key, i0 in first.items():
        act = next(iter(items[key].values()))[2]
        if all(i in ends[key] for i in range(i0 - g, i0)):
            moves += [(ends[key][i0 - g + j % g] + (j // g + 1) * g * sim.period_s, act) for j in range(k)]
        else:
            moves += [(ends[key][i0] + j * sim.period_s, act) for j in range(k)]
    # a bf16 keep stage's weight casts (planner.stage_cost [Note: a bf16 stage's activations]): from
    # its first forward to the rank's last pass
    for s in (s for s, rs in enumerate(sim.cand.stage_ranks) if rs == r and sim.estimates[s].cast_bytes):
        starts = [t for (op, q, _), (t, _) in sim.result.pass_times.items() if op is Op.F and q == s]
        if starts:
            moves += [(min(starts), sim.estimates[s].cast_bytes), (sim.end_s[r], -sim.estimates[s].cast_bytes)]
    # [Note: gradient copies after the passes] the sum's largest copy (the rank's stages', device
    # and offloaded alike: the figure its peak adds) beside the whole gradients, over its sum;
    # [Note: ZeRO at the step's end] then only the shard of a device stage's is left: ZeRO-1's
    # once its reduce-scatter is done, ZeRO-2's (reduced under the last backward) once the sum ends
    copies = sim.copy_bytes[r] if sim.copy_bytes is not None else 0
    end, ar = sim.end_s[r], sim.allreduce_s[r]
    if copies:
        moves.append((end, copies))
    if sim.grad_bytes is not None and sim.grad_bytes[r]:
        d, whole = sim.cand.shape.data_parallel, sim.grad_bytes[r]
        zero1 = sim.cand.model is not None and sim.cand.model.zero == 1
        moves.append((end + (ar / 2 if zero1 else ar), -copies - (whole - whole // d)))
    elif copies:
        moves.append((end + ar, -copies))
    level = sim.static_bytes[r]
    out = [MemoryPoint(tier="device", t_s=0.0, bytes=level)]
    for t, b in sorted(moves, key=lambda x: (x[0], x[1] > 0)):
        level += b
        if out[-1].t_s == t:
            out[-1] = MemoryPoint(tier="device", t_s=t, bytes=max(level, out[-1].bytes) if b > 0 else level)
        else:
            out.append(MemoryPoint(tier="device", t_s=t, bytes=level))
    if out[-1].t_s < sim.step_s:
        out.append(MemoryPoint(tier="device", t_s=sim.step_s, bytes=level))
    for tier, held in (("host", sim.host_bytes[r]), ("nvme", sim.nvme_bytes[r])):
        if held:
            out += [MemoryPoint(tier=tier, t_s=0.0, bytes=held), MemoryPoint(tier=tier, t_s=sim.step_s, bytes=held)]
    return tuple(out)


def _timeline(sim: Simulated) -> tuple[TimelineEvent, ...]:
    """Per rank its passes, sends, offloaded stages' fetches, all-reduce and optimizer step; an extrapolated run's repeated
    micro-batches as one ``repeated:`` event per rank where they run ([Note: repeated
    micro-batches in the picture]), or after its last pass when the schedule has no steady stretch."""
    res, cand = sim.result, sim.cand
    if res is None:
        return ()
    events = []
    first_after: dict[int, int] = {}
    before_cut: dict[int, float] = {}
    for (op, s, i), (a, b) in res.pass_times.items():
        r = cand.stage_ranks[s]
        shift, (op2, s2, i2) = _placed(sim, a, (op, s, i))
        events.append(TimelineEvent(stream=f"compute:{r}", name=str(Action(s2, op2, i2)), start_s=a + shift,
                                    end_s=b + shift))
        if sim.cut_s is not None and a >= sim.cut_s and op is Op.F:
            first_after[r] = min(first_after.get(r, i), i)
        elif sim.cut_s is not None and a < sim.cut_s:
            before_cut[r] = max(before_cut.get(r, 0.0), b)
    for r, walk in enumerate(sim.walk_s):  # planner.stage_cost [Note: the dropout walk]
        if walk > 0:
            events.append(TimelineEvent(stream=f"compute:{r}", name="dropout RNG walk", start_s=0.0, end_s=walk))
    for s, (a, b) in res.fetch_times.items():  # an offloaded stage's PREFETCH, before the short run's cut
        r = cand.stage_ranks[s]
        events.append(TimelineEvent(stream=f"{_fetch_stream(cand, s)}:{r}", name=str(Action(s, Op.PREFETCH)),
                                    start_s=a, end_s=b))
    for (op, s, i), (a, b) in res.send_times.items():
        src = cand.stage_ranks[s]
        dst = cand.stage_ranks[s + 1] if op is Op.SEND_F else cand.stage_ranks[s - 1]
        shift, (op2, s2, i2) = _placed(sim, a, (op, s, i))
        events.append(TimelineEvent(stream=f"link:{src}>{dst}", name=str(Action(s2, op2, i2)), start_s=a + shift,
                                    end_s=b + shift))
    m, shown = cand.shape.num_microbatches, sim.simulated_microbatches
    for r, end in enumerate(sim.end_s):
        if shown < m and sim.cut_s is not None:
            a = first_after.get(r, shown)
            start = max(sim.cut_s, before_cut.get(r, 0.0))
            events.append(TimelineEvent(
                stream=f"compute:{r}", start_s=start, end_s=sim.cut_s + sim.shift_s,
                name=f"repeated: micro-batches {a}-{a + m - shown - 1}, each as the one before "
                     f"({format_seconds(sim.period_s)} each; not drawn)"))
        elif shown < m:
            last = max(b for (_, s, _), (_, b) in res.pass_times.items() if cand.stage_ranks[s] == r)
            events.append(TimelineEvent(stream=f"compute:{r}", start_s=last, end_s=end,
                                        name=f"repeated: micro-batches {shown}-{m - 1}, the steady state of those "
                                             "before (not drawn)"))
        t = end
        for what, dur in (("allreduce", sim.allreduce_s[r]), ("optimizer step", sim.optimizer_s[r])):
            if dur > 0:
                events.append(TimelineEvent(stream=f"compute:{r}", name=what, start_s=t, end_s=t + dur))
                t += dur
    return tuple(sorted(events, key=lambda e: (e.start_s, e.end_s, e.stream)))
