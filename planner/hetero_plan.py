"""The heterogeneous planner's second half: simulate its best candidates, pick, build the Plan.

A candidate of planner.hetero (a shape and its partition) is refined (an offloaded stage gets
its chunks and their figures, planner.stage_cost ``refine``) and simulated over its
ranks and links (planner.simulate_pipeline). [Note: pipeline step] A rank's step ends with its
last pass, then its gradients' all-reduce over the replicas, then its optimizer step; the step
is the latest rank's; with gradient clipping (``TrainShape.clip_grad_norm``) every rank's
optimizer step waits for the slowest rank's all-reduce and the norm exchange after it
(planner.simulate_pipeline [Note: the clip collective], ``clip_time_s``). A long candidate
(more than ``MAX_EXACT_PASSES`` passes) is simulated over ``p + 4`` micro-batches (``3p``
interleaved: its longer warm-up and a steady stretch) and the rest added at the steady state's
period (Narayanan et al. 2021, Sec. 2.2: in 1F1B's steady state the slowest stage sets
the pace; a schedule that holds back for memory, V-Min, paces slower, as the short run shows).
Its timeline marks the micro-batches it does not draw where they run, in the steady state, and
its memory lines draw them ([Note: repeated micro-batches in the picture]). A rank's device
memory is its stages' states, buffers and workspace, plus the activations the simulation has it
hold at its peak.

[Note: tied weights at the step's end] A parameter the last stage shares with the first (the
built-in GPT's head tied to its embedding) has its gradient summed over the two ranks holding
them (runtime.stage_worker's ``ALLREDUCE``, before the replicas' sum): both end ranks wait for
the later of them, then a two-rank all-reduce of its fp32 gradient over their link, each
message with the link's send and receive times (the V schedules keep both stages on one rank:
no sum).

[Note: ZeRO at the step's end] Under ``parallel.zero`` (``StageModel.zero``, over the shape's
``d`` copies) a rank's gradient sum is a reduce-scatter and an all-gather, an all-reduce's time
in all. ZeRO-1 runs both after the last pass, copying the whole gradient into one flat buffer
next to it first (its device peak is the larger of the activations' and that copy's); ZeRO-2
starts the reduce-scatter under each stage's last gradient pass, in buckets (an offloaded
stage's chunks, reduced to their owners, runtime.stage_offload_zero; counted as buckets)
(planner.simulate_pipeline ``zero2_exposed_s``: only what the pass does not hide is added) and
copies at most ``REDUCE_IN_FLIGHT`` buckets. Both keep ``1 / d`` of the gradients after the sum:
the memory line drops there.

[Note: gradient copies after the passes] Over ``d > 1`` copies without ZeRO the gradient sum is
comm ``all_reduce_``: one flat copy of the rank's gradients (``torch.cat``), so a rank holds its
gradients twice while it runs, a device stage's and an offloaded stage's alike (an offloaded
stage keeps its gradients on the device until its ``OFFLOAD``, planner.stage_offload_cost
[Note: an offloaded stage's residency]); an offloaded stage's ``OFFLOAD`` then holds one
chunk's grad buffer at a time (``StageEstimate.after_bytes``). These come after the passes,
when the activations are gone: a rank's device peak is its static bytes plus the larger of its
activations' peak and its largest copy, and its memory line draws the copy over its all-reduce.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass

from memtrain.cluster.spec import ClusterSpec
from memtrain.errors import UserError
from memtrain.planner import pipeline
from memtrain.planner.partition import MAX_EXACT_PASSES, Candidate, allreduce_time_s, link_between, reduce_time_s
from memtrain.planner.plan import (
    Action, ActPolicy, DevicePrediction, MemoryPoint, MemoryPolicy, Op, PipelineAlternative, PipelinePlan, Plan,
    Prediction, RankPlan, TimelineEvent, TrainShape,
)
from memtrain.planner.simulate_builder import copy_streams
from memtrain.planner.simulate_pipeline import (REDUCE_BUCKET_ELEMS, REDUCE_IN_FLIGHT, Link, PipelineResult, StageCost,
                                                clip_time_s, simulate_pipeline)
from memtrain.planner.stage_cost import StageEstimate
from memtrain.planner.stats import ModelStats
from memtrain.units import format_bytes, format_seconds

__all__ = ["Simulated", "simulate_candidate", "build_plan", "deciding_difference"]

_SPLIT_W = ("zb-h1", "v-half", "v-min")
TIE = 0.01
"""[Note: pipeline ties] Candidates within 1% of the fastest simulated step are a tie (their
stages' figures, offload above all, are not that precise); among them the one with
fewer pipeline stages wins (fewer transfers and programs to run), then the larger micro-batch
(better kernel efficiency in practice), then the faster."""


def _tie_key(sim: "Simulated") -> tuple:
    return (sim.cand.shape.pipeline, -sim.cand.shape.micro_batch_size, sim.step_s)


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


def _stage_costs(cand: Candidate, estimates: list[StageEstimate]) -> list[StageCost]:
    model = cand.model
    assert model is not None
    split = cand.shape.schedule in _SPLIT_W
    out = []
    for s, ((first, end), est) in enumerate(zip(cand.partition, estimates)):
        out_bytes = model.stats.blocks[end - 1].output_bytes
        # a split backward: B and W share the backward (measured, else half each); B replays the
        # recomputed forwards and holds what it brings back until W (planner.stage_cost [Note:
        # activations between B and W])
        grads = est.bwd_s - est.recompute_s
        w = model.w_share(first, end, cand.ranks[cand.stage_ranks[s]][1]) if split else 0.0
        out.append(StageCost(fwd_s=est.fwd_s, bwd_s=grads * (1 - w) + est.recompute_s if split else est.bwd_s,
                             wgrad_s=grads * w, activation_bytes=est.act_bytes,
                             bw_bytes=est.bw_bytes if split else 0, output_bytes=out_bytes,
                             fetch_s=est.fetch_s, fetch_stream=_fetch_stream(cand, s) if est.fetch_s else "h2d"))
    return out


def _fetch_stream(cand: Candidate, s: int) -> str:
    """The stream stage ``s``'s fetch runs on, without its rank: the device's copy stream, the
    compute stream on a CPU device (planner.simulate_builder ``copy_streams``)."""
    return copy_streams(cand.ranks[cand.stage_ranks[s]][1])[0]


def _links(cand: Candidate, cluster: ClusterSpec) -> dict[tuple[int, int], Link]:
    """Both directions between the ranks of every two consecutive stages (an interleaved
    schedule's last rank sends back to the first)."""
    out = {}
    ranks, order = cand.ranks, cand.stage_ranks
    for a, b in zip(order, order[1:]):
        if a != b:
            measured = cand.model.measured if cand.model is not None else None
            out[(a, b)] = link_between(cluster, (ranks[a][0], ranks[a][1]), (ranks[b][0], ranks[b][1]), measured)
            out[(b, a)] = link_between(cluster, (ranks[b][0], ranks[b][1]), (ranks[a][0], ranks[a][1]), measured)
    return out


def _run(cand: Candidate, costs: list[StageCost], links, m: int, walk: list[float]) -> PipelineResult:
    shape = cand.shape
    place = pipeline.Placement(cand.stage_ranks)
    sched = pipeline.add_p2p(pipeline.generate(shape.schedule, shape.pipeline, m), place)
    # an offloaded stage's fetch where its rank's program has it (runtime.stage_offload [Note: a stage's step])
    sched = pipeline.add_offload_points(sched, [s for s, c in enumerate(costs) if c.fetch_s > 0])
    # unused default: every pair of ranks that sends has its link in ``links`` (_links)
    return simulate_pipeline(sched, place, costs, Link(gbps=1.0), links=links, step_start_s=dict(enumerate(walk)))


def _clip_s(cand: Candidate, links: dict[tuple[int, int], Link]) -> float:
    """The norm exchange of a clipped step (planner.simulate_pipeline ``clip_time_s``): an
    all-gather over every rank of every replica (runtime.stage_clip gathers over the world) on the
    slowest of their links, the busiest rank's gradients (under ZeRO its shard's) read at its
    memory bandwidth."""
    model = cand.model
    assert model is not None
    p = cand.shape.pipeline
    slow = min([*links.values(), *cand.ar_links], key=lambda lk: lk.gbps, default=Link(gbps=1.0))
    tensors = sum(len(b.param_names) for b in model.stats.blocks)
    worst = 0.0
    for r in range(p):
        n = sum(model.num_params(f, e) for s, (f, e) in enumerate(cand.partition) if cand.stage_ranks[s] == r)
        grad_bytes = 4 * -(-n // model.shards)
        worst = max(worst, clip_time_s(p * cand.shape.data_parallel, tensors, grad_bytes, slow,
                                       cand.ranks[r][1].memory_bw_gbps))
    return worst


def _rank_ends(result: PipelineResult, stage_ranks: tuple[int, ...], p: int) -> tuple[list[float], list[float]]:
    ends, busy = [0.0] * p, [0.0] * p
    for (_, s, _), (start, end) in result.pass_times.items():
        r = stage_ranks[s]
        ends[r] = max(ends[r], end)
        busy[r] += end - start
    return ends, busy


def simulate_candidate(cand: Candidate, cluster: ClusterSpec) -> Simulated:
    """Refine and simulate ``cand`` ([Note: pipeline step])."""
    model, shape = cand.model, cand.shape
    assert model is not None
    p, m = shape.pipeline, shape.num_microbatches
    estimates = [model.refine(f, e, cand.where[s], cand.in_flight[s], m, cand.in_bw[s])
                 for s, (f, e) in enumerate(cand.partition)]
    costs = _stage_costs(cand, estimates)
    links = _links(cand, cluster)
    # planner.stage_cost [Note: the dropout walk]: each rank's, before its program, once a step
    walk = [model.rng_walk_s(cand.ranks[r][1], shape.data_parallel, m) for r in range(p)]
    passes = len(cand.stage_ranks) * m * (3 if shape.schedule in _SPLIT_W else 2)
    # the warm-up and a few steady micro-batches (interleaved: whole groups of p)
    m1 = 3 * p if shape.schedule == "interleaved-1f1b" else p + 4
    if passes > MAX_EXACT_PASSES and m1 < m:
        # [Note: pipeline step] past the warm-up, each further micro-batch moves every rank's
        # end on by the steady state's period: the busiest rank's compute for one micro-batch,
        # or the busiest link's transfers, whichever is longer
        result = _run(cand, costs, links, m1, walk)
        ends, busy = _rank_ends(result, cand.stage_ranks, p)
        per_rank = [0.0] * p
        for s, c in enumerate(costs):
            per_rank[cand.stage_ranks[s]] += c.fwd_s + c.bwd_s + c.wgrad_s
        per_link: dict[tuple[int, int], float] = defaultdict(float)
        for s, c in enumerate(costs[:-1]):
            a, b = cand.stage_ranks[s], cand.stage_ranks[s + 1]
            if a != b:
                per_link[(a, b)] += links[(a, b)].time_s(c.output_bytes)
                per_link[(b, a)] += links[(b, a)].time_s(c.output_bytes)
        period = max(max(per_rank), max(per_link.values(), default=0.0))
        # a schedule that holds back for memory (V-Min) paces slower than its busiest rank: the
        # first stage's last forwards show the pace the short run settled into
        (a, _), (b, _) = result.pass_times[(Op.F, 0, m1 - 3)], result.pass_times[(Op.F, 0, m1 - 1)]
        period = max(period, (b - a) / 2)
        ends = [e + (m - m1) * period for e in ends]
        busy = [b + (m - m1) * r for b, r in zip(busy, per_rank)]
        simulated = m1
        cut = _steady_cut(result, m1)
    else:
        result = _run(cand, costs, links, m, walk)
        ends, busy = _rank_ends(result, cand.stage_ranks, p)
        simulated, cut, period = m, None, 0.0
    opt = [0.0] * p
    ar = [0.0] * p
    # [Note: tied weights at the step's end] a parameter the last stage shares with the first (a
    # head tied to the embedding) has its gradient summed over the two ranks that hold them first
    # (runtime.stage_worker's ALLREDUCE): both wait for the later of them, then the sum
    first_r, last_r = cand.stage_ranks[0], cand.stage_ranks[-1]
    tied = model.shared_numel(cand.partition[0], cand.partition[-1]) if first_r != last_r else 0
    if tied:
        link = link_between(cluster, cand.ranks[last_r][:2], cand.ranks[first_r][:2], model.measured)
        both = max(ends[first_r], ends[last_r])
        # a measured link (planner.measured pipeline_link) keeps the whole half round trip on the
        # wire and charges no receive: the all-reduce's two messages pay it through the latency
        for r in (first_r, last_r):
            ar[r] += both - ends[r] + allreduce_time_s(4 * tied, 2, link) + 2 * (link.send_s + link.recv_s)
    static, host, nvme = [0] * p, [0] * p, [0] * p
    act_gpipe = [0] * p
    grads, copy = [0] * p, [0] * p
    for s, ((f, e), est) in enumerate(zip(cand.partition, estimates)):
        r, n = cand.stage_ranks[s], model.num_params(f, e)
        opt[r] += est.tail_s
        # [Note: ZeRO at the step's end] ZeRO-2's reduce-scatter mostly under the last gradient pass
        ar[r] += reduce_time_s(model, shape.schedule, est, n, shape.data_parallel, cand.ar_links[r],
                               model.w_share(f, e, cand.ranks[r][1]))
        on_device = model.zero and "params" not in est.offload
        # [Note: gradient copies after the passes] the sum's copy: ZeRO-2's buckets (an offloaded
        # stage's chunks) under way; over copies under ZeRO-0/1 the whole gradient, flat; an
        # offloaded stage's OFFLOAD grad buffer (planner.stage_offload_cost)
        if model.zero == 2:  # an offloaded stage's chunk copy is its after_bytes
            flat = 0 if "params" in est.offload else 4 * min(n, REDUCE_IN_FLIGHT * REDUCE_BUCKET_ELEMS)
        else:
            flat = 4 * n if shape.data_parallel > 1 else 0
        copy[r] = max(copy[r], flat, est.after_bytes)
        grads[r] += 4 * n if on_device else 0
        # the simulated peak replaces the estimate's held micro-batches ([Note: activations between B and W])
        static[r] += est.device_bytes - cand.in_flight[s] * est.act_bytes - cand.in_bw[s] * est.bw_bytes
        host[r] += est.host_bytes
        nvme[r] += est.nvme_bytes
        act_gpipe[r] += m * est.act_bytes
    acts = [result.peak_bytes.get(r, 0) for r in range(p)]  # received buffers included
    act_only = [result.act_peak_bytes.get(r, 0) for r in range(p)] if simulated == m or shape.schedule != "gpipe" \
        else act_gpipe
    if simulated < m and shape.schedule == "gpipe":  # GPipe holds every micro-batch: the short run holds fewer
        # (the received buffers as the short run has them beside its peak of activations)
        acts = [g + result.peak_bytes.get(r, 0) - result.act_peak_bytes.get(r, 0) for r, g in enumerate(act_gpipe)]
    device = [a + max(b, c) for a, b, c in zip(static, acts, copy)]  # ZeRO: the sum's copy comes after the passes
    step = max(end + a + o for end, a, o in zip(ends, ar, opt))
    if model.train.clip_grad_norm:  # [Note: pipeline step] every update after the norm exchange
        step = max(end + a for end, a in zip(ends, ar)) + _clip_s(cand, links) + max(opt)
    # a measured run's own time per step outside its passes (planner.measured [Note: measured pipeline])
    step += model.step_overhead_s([r[1] for r in cand.ranks])
    problem = next((f"stage {s}: {est.offload}" for s, est in enumerate(estimates) if not est.fits), "")
    for r in range(p):
        node_i, dev, _, _, budget = cand.ranks[r]
        unlisted = cand.ranks[r][3] is None and model.home == "nvme"  # parallel.nvme_dir's room: not known here
        for tier, need, have in (("device", device[r], budget.device), ("host", host[r], budget.host),
                                 ("NVMe", nvme[r], budget.nvme)):
            if not problem and need > have and not (tier == "NVMe" and unlisted):
                problem = (f"rank {r} ({dev.kind} on {cluster.nodes[node_i].name}) needs {format_bytes(need)} of "
                           f"{tier} memory, budget {format_bytes(have)}")
    return Simulated(cand=cand, estimates=estimates, result=result, step_s=step, pipeline_end_s=max(ends),
                     busy_s=busy, end_s=ends, allreduce_s=ar, optimizer_s=opt, device_bytes=device,
                     static_bytes=static, host_bytes=host, nvme_bytes=nvme, simulated_microbatches=simulated,
                     problem=problem, cut_s=cut, shift_s=(m - simulated) * period, period_s=period,
                     grad_bytes=grads if model.zero else None, copy_bytes=copy, act_bytes=act_only, walk_s=walk)


def _steady_cut(result: PipelineResult, m1: int) -> float | None:
    """[Note: repeated micro-batches in the picture] A time of the short run where every rank is
    in its steady state: after the first stage's first backward starts (the last rank to leave its
    warm-up) and before its last forward starts (the first to enter its drain); the micro-batches
    not simulated go there, each a period, and what comes after moves on by all of them. None
    when the schedule has no such stretch (GPipe: all forwards, then all backwards)."""
    lo = result.pass_times.get((Op.B, 0, 0), (None,))[0]
    hi = result.pass_times.get((Op.F, 0, m1 - 1), (None,))[0]
    if lo is None or hi is None or hi <= lo:
        return None
    return hi  # the drain's start: every pass that starts from here on is a later micro-batch's


def _parts(sim: Simulated) -> dict[str, float]:
    """A step's parts: the busiest rank's compute, the pipeline's idle on top, what comes after."""
    busiest = max(sim.busy_s)
    return {"the busiest rank's compute": busiest, "pipeline bubble and transfers": sim.pipeline_end_s - busiest,
            "all-reduce and optimizer after the last pass": sim.step_s - sim.pipeline_end_s}


def deciding_difference(chosen: Simulated, other: Simulated) -> str:
    """Why ``other`` lost to ``chosen``: it does not fit, or the part of its step that grew most."""
    if not other.fits:
        return f"does not fit: {other.problem}"
    if other.step_s <= chosen.step_s * (1 + TIE):
        ours, theirs = chosen.cand.shape, other.cand.shape
        rule = ("fewer pipeline stages" if ours.pipeline != theirs.pipeline
                else "larger micro-batches" if ours.micro_batch_size != theirs.micro_batch_size else "the faster")
        return (f"a tie within {TIE:.0%} ({format_seconds(other.step_s)} vs {format_seconds(chosen.step_s)}); "
                f"the chosen plan has {rule}")
    a, b = _parts(chosen), _parts(other)
    part = max(a, key=lambda k: b[k] - a[k])
    pct = 100 * (other.step_s / chosen.step_s - 1) if chosen.step_s else 0.0
    return f"slower by {pct:.1f}%: {part} {format_seconds(b[part])} vs {format_seconds(a[part])}"


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
    buffers, workspace), plus each held micro-batch's activations from the end of its forward to
    the end of its backward (or W), under a split backward what its B brings back from the
    B's start to the W's end (planner.stage_cost [Note: activations between B and W]), and each
    received buffer from its post to the start of the pass that takes it (planner.simulate_pipeline
    [Note: received buffers]). An
    extrapolated run's repeated micro-batches are drawn ([Note: repeated micro-batches in the
    picture]): each (pass, stage) of the rank repeats its last
    ``PATTERN_MICROBATCHES`` before the cut (interleaved: a group of ``p``) as many periods
    apart, before its first after the cut runs, moved on by all of them;
    without a cut they are held level (the timeline marks them "not drawn"). Host and NVMe: what
    its stages offload at their peak, drawn level over the step (a stage's offload figures do
    not say when within it; states homed there are held all step)."""
    if sim.result is None:
        return ()
    split = sim.cand.shape.schedule in _SPLIT_W
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


def build_plan(name: str, base: ModelStats, cluster: ClusterSpec, simulated: list[Simulated],
               ranked: list[Candidate], candidates: list[Candidate], source: str, max_alternatives: int) -> Plan:
    """The Plan of the fastest simulated candidate that fits, with its runners-up."""
    fitting = sorted((s for s in simulated if s.fits), key=lambda s: s.step_s)
    if not fitting:
        worst = simulated[0]
        raise UserError(f"the model does not fit the cluster: the best candidate ({worst.cand.shape.describe()}) "
                        f"{worst.problem}; add devices, host memory or an NVMe path (cluster.nodes[].nvme)")
    best = min((s for s in fitting if s.step_s <= fitting[0].step_s * (1 + TIE)), key=_tie_key)  # [Note: pipeline ties]
    cand, shape = best.cand, best.cand.shape
    p, m, mbs = shape.pipeline, shape.num_microbatches, shape.micro_batch_size
    others = [s for s in sorted(simulated, key=lambda s: (not s.fits, s.step_s)) if s is not best]
    runner = next((o for o in others if o.fits), None)
    alternatives = [PipelineAlternative(description=o.cand.shape.describe(), fits=o.fits, step_time_s=o.step_s,
                                        peak_fraction=o.peak_fraction, bubble_fraction=o.bubble,
                                        reason=deciding_difference(best, o)) for o in others]
    for c in ranked[len(simulated):]:
        if len(alternatives) >= max_alternatives:
            break
        alternatives.append(PipelineAlternative(
            description=c.shape.describe(), fits=True, step_time_s=None, peak_fraction=0.0, bubble_fraction=0.0,
            reason=f"estimated {format_seconds(c.estimate_s)}, against the simulated {format_seconds(best.step_s)}; "
                   "not simulated"))
    why = (f"fastest of {len(simulated)} simulated candidates ({len(candidates)} shapes weighed)"
           + (f": {format_seconds(best.step_s)} against {format_seconds(runner.step_s)} for the runner-up "
              f"({runner.cand.shape.describe()}), {deciding_difference(best, runner)}" if runner else ""))
    model = cand.model
    assert model is not None
    train = TrainShape(global_batch_size=m * mbs * shape.data_parallel, micro_batch_size=mbs, num_microbatches=m,
                       seq_len=base.seq_len, dtype=model.dtype, optimizer=model.optimizer,
                       clip_grad_norm=model.train.clip_grad_norm)
    place = pipeline.Placement(cand.stage_ranks)
    schedule = pipeline.add_step_end(pipeline.add_p2p(pipeline.generate(shape.schedule, p, m), place), place)
    if model.zero == 2:  # the program that runs (runtime.stage_zero [Note: ZeRO-2 in a pipeline]; an
        # offloaded stage's: runtime.stage_offload_zero)
        schedule = pipeline.add_reduce_scatter_points(schedule, range(len(best.estimates)))
    if model.train.clip_grad_norm:  # the norm exchange before the updates (runtime.stage_clip)
        schedule = pipeline.add_clip_points(schedule)
    rank_stages = defaultdict(list)
    for s, r in enumerate(cand.stage_ranks):
        rank_stages[r].append(s)
    devices_pred = []
    for r in range(p):
        _, dev, _, _, budget = cand.ranks[r]
        # above the static bytes: the passes' activations and received buffers, or after them the
        # sum's largest gradient copy, whichever is more ([Note: gradient copies after the passes])
        above = best.device_bytes[r] - best.static_bytes[r]
        copies = above if best.copy_bytes is not None and above <= best.copy_bytes[r] else 0
        acts = min(above - copies, best.act_bytes[r]) if best.act_bytes is not None else above - copies
        devices_pred.append(DevicePrediction(
            rank=r, device=dev.kind,
            peak_bytes={"device": best.device_bytes[r], "host": best.host_bytes[r], "nvme": best.nvme_bytes[r]},
            budget_bytes={"device": budget.device, "host": budget.host, "nvme": budget.nvme},
            breakdown={"device": {"states, buffers, workspace": best.static_bytes[r], "activations": acts,
                                  "received buffers": above - copies - acts, "gradient copies": copies}},
            memory_timeline=_memory_line(best, r)))
    flat = [(i, dev) for i, node in enumerate(cluster.nodes) for dev in node.devices]
    ranks = []
    for j, replica in enumerate(cand.replicas):
        for r, idx in enumerate(replica):
            node_i, dev = flat[idx]
            stages = tuple(rank_stages[r])
            ests = [best.estimates[s] for s in stages]
            ranks.append(RankPlan(
                rank=j * p + r, replica=j, pipeline_rank=r, node=cluster.nodes[node_i].name, device=dev,
                stages=stages, policies=tuple(e.policy for e in ests),
                offload="; ".join(f"stage {s}: {e.offload}" for s, e in zip(stages, ests) if e.offload),
                fwd_s=sum(e.fwd_s for e in ests), bwd_s=sum(e.bwd_s for e in ests), busy_s=best.busy_s[r],
                bubble_fraction=1.0 - best.busy_s[r] / best.pipeline_end_s if best.pipeline_end_s else 0.0,
                allreduce_s=best.allreduce_s[r], optimizer_s=best.optimizer_s[r]))
    flops = (base.fwd_flops + base.bwd_flops) * train.global_batch_size
    peak = sum(dev.peak_flops(str(model.dtype)) for _, dev in flat)
    prediction = Prediction(step_time_s=best.step_s, tokens_per_s=train.tokens_per_step / best.step_s,
                            mfu=flops / (best.step_s * peak) if peak else 0.0, devices=tuple(devices_pred),
                            timeline=_timeline(best))
    node0, dev0, host0, nvme0, _ = cand.ranks[0]
    first, end = cand.partition[0]
    memory = best.estimates[0].policy or MemoryPolicy(chunk_size_elems=max(1, model.num_params(first, end)), chunks=(),
                                                      prefetch_depth=1, activations=(ActPolicy.KEEP,) * (end - first))
    pipe = PipelinePlan(schedule_kind=shape.schedule, pipeline_degree=p, data_parallel_degree=shape.data_parallel,
                        stage_ranks=cand.stage_ranks, partition=cand.partition, ranks=tuple(ranks),
                        bubble_fraction=best.bubble, why=why, alternatives=tuple(alternatives[:max_alternatives]),
                        num_candidates=len(candidates))
    return Plan(name=name, fits=True, model=base, train=train, device=dev0, host=host0, nvme=nvme0, memory=memory,
                schedule=schedule, prediction=prediction, source=source, pipeline=pipe)

