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

from collections import defaultdict

from memtrain.cluster.spec import ClusterSpec
from memtrain.errors import UserError
from memtrain.planner import pipeline
from memtrain.planner.hetero_lines import SPLIT_W, Simulated, _fetch_stream, _memory_line, _timeline
from memtrain.planner.partition import MAX_EXACT_PASSES, Candidate, allreduce_time_s, link_between, reduce_time_s
from memtrain.planner.plan import (
    ActPolicy, DevicePrediction, MemoryPolicy, Op, PipelineAlternative, PipelinePlan, Plan, Prediction, RankPlan,
    TrainShape,
)
from memtrain.planner.simulate_pipeline import (REDUCE_BUCKET_ELEMS, REDUCE_IN_FLIGHT, Link, PipelineResult, StageCost,
                                                clip_time_s, simulate_pipeline)
from memtrain.planner.stage_cost import StageEstimate
from memtrain.planner.stats import ModelStats
from memtrain.units import format_bytes, format_seconds

__all__ = ["Simulated", "simulate_candidate", "build_plan", "deciding_difference"]

TIE = 0.01
"""[Note: pipeline ties] Candidates within 1% of the fastest simulated step are a tie (their
stages' figures, offload above all, are not that precise); among them the one with
fewer pipeline stages wins (fewer transfers and programs to run), then the larger micro-batch
(better kernel efficiency in practice), then the faster."""


def _tie_key(sim: "Simulated") -> tuple:
    return (sim.cand.shape.pipeline, -sim.cand.shape.micro_batch_size, sim.step_s)


def _stage_costs(cand: Candidate, estimates: list[StageEstimate]) -> list[StageCost]:
    model = cand.model
    assert model is not None
    split = cand.shape.schedule in SPLIT_W
    out = []
    for s, ((first, end), est) in enumerate(zip(cand.partition, estimates)):
        out_bytes = model.boundary_bytes(end)  # fp32 under autocast (planner.stage_cost)
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
    # a GPU rank receives into host memory and copies to the device at its RECV ([Note: received buffers])
    host_receives = {r for r, rank in enumerate(cand.ranks) if rank[1].kind != "cpu"}
    return simulate_pipeline(sched, place, costs, Link(gbps=1.0), links=links, step_start_s=dict(enumerate(walk)),
                             host_receives=host_receives)


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
    passes = len(cand.stage_ranks) * m * (3 if shape.schedule in SPLIT_W else 2)
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
    act_gpipe, casts = [0] * p, [0] * p
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
        # and a bf16 keep stage's weight casts, held with the passes only (planner.stage_cost [Note:
        # a bf16 stage's activations])
        static[r] += (est.device_bytes - cand.in_flight[s] * est.act_bytes - cand.in_bw[s] * est.bw_bytes
                      - est.cast_bytes)
        casts[r] += est.cast_bytes
        host[r] += est.host_bytes
        nvme[r] += est.nvme_bytes
        act_gpipe[r] += m * est.act_bytes
    acts = [result.peak_bytes.get(r, 0) + casts[r] for r in range(p)]  # received buffers and sent tensors included
    act_only = [result.act_peak_bytes.get(r, 0) + casts[r] for r in range(p)] \
        if simulated == m or shape.schedule != "gpipe" else [g + c for g, c in zip(act_gpipe, casts)]
    if simulated < m and shape.schedule == "gpipe":  # GPipe holds every micro-batch: the short run holds fewer
        # (the received buffers and sent tensors as the short run has them beside its peak of activations)
        acts = [g + c + result.peak_bytes.get(r, 0) - result.act_peak_bytes.get(r, 0)
                for r, (g, c) in enumerate(zip(act_gpipe, casts))]
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
        # above the static bytes: the passes' activations and the tensors received and sent (planner.
        # simulate_pipeline [Note: received buffers], [Note: sent tensors]), or after them the
        # sum's largest gradient copy, whichever is more ([Note: gradient copies after the passes])
        above = best.device_bytes[r] - best.static_bytes[r]
        copies = above if best.copy_bytes is not None and above <= best.copy_bytes[r] else 0
        acts = min(above - copies, best.act_bytes[r]) if best.act_bytes is not None else above - copies
        devices_pred.append(DevicePrediction(
            rank=r, device=dev.kind,
            peak_bytes={"device": best.device_bytes[r], "host": best.host_bytes[r], "nvme": best.nvme_bytes[r]},
            budget_bytes={"device": budget.device, "host": budget.host, "nvme": budget.nvme},
            breakdown={"device": {"states, buffers, workspace": best.static_bytes[r], "activations": acts,
                                  "sent and received tensors": above - copies - acts, "gradient copies": copies}},
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

