"""A pipeline schedule simulated over its ranks and the links between them.

The multi-rank half of the simulator: each rank's list (planner.pipeline, with or without its
sends and receives) becomes tasks on that rank's compute stream (``compute:<rank>``) and on a
stream per directed link (``link:<src>>dst``), in the task graph of planner.taskgraph. A pass
takes its stage's time; a send takes the link's latency plus the bytes at its bandwidth, after
the pass that produced them, and its receive, a task on the receiving rank, waits for it and
then takes the link's ``recv_s``: what a receive costs its rank once both sides are ready (under
gloo a rendezvous round, bench/link_probe.py [Note: rendezvous]; 0 where the data lands without
the receiver's help); a send may hold its own rank for the link's ``send_s`` before it starts.
Without sends and receives in the lists, a pass waits for the pass it needs directly.
A stage's activations are held on its rank (tier ``rank<r>``) from the end of its forward to the
end of its backward, or of its ``W`` when the backward is split; under a split backward, what a
recompute rebuilds or a swap brings back (``bw_bytes``) is taken when the ``B`` starts and held
to the end of the ``W`` too (planner.stage_cost [Note: activations between B and W]). The
per-rank memory this gives is the activations', the received buffers' ([Note: received
buffers]) and the sent tensors' ([Note: sent tensors]); the model states, workspace and offload
per stage are planner.hetero_plan's.

An offloaded stage's ``PREFETCH`` (planner.pipeline ``add_offload_points``: before the stage's
first action on its rank) is a task of its ``fetch_s`` on the rank's ``fetch_stream`` (its copy
stream, ``h2d:<rank>``; ``compute:<rank>`` on a CPU device, where the copy is the training
thread's), issued after the rank's action before it, and the stage's first forward waits for it
(runtime.stage_offload [Note: a stage's step]).

[Note: received buffers] A worker posts each receive one pass ahead of its ``RECV``
(planner.pipeline ``receive_posts``, which the worker runs: right before the last
pass ahead of it, or at the step's start), and the posted buffer (the sending stage's output,
or its gradient, as large) is held from there until the pass that takes it starts (the ``F`` it
feeds or the ``B`` whose output gradient it is); inside that pass it is the pass's own (the
stage's input among its saved activations, the arriving gradient in its workspace). So each is
counted on its rank's tier (owner ``recv:<action>``) from a zero-length mark where it is posted to
one right before the pass that takes it (``PipelineResult.recv_times``). On a GPU the posted
buffer is host memory (the channel receives there, runtime.stage_worker) and the device holds
the copy made at the ``RECV`` until that pass: such a rank (``host_receives``) counts it from
its ``RECV``.

[Note: sent tensors] A stage whose next stage is on another rank keeps its output (the tensor
its ``SEND_F`` sends) from the end of its forward to the end of its backward: the worker holds it
to run the backward through (runtime.stage_worker), and autograd saves no copy of it (the next
stage's first norm saves it, on the other rank), so it counts on the rank's tier (owner
``out:<stage>:<mb>``) over that span. A worker keeps each tensor it sends until the receive that
proves the transfer over (planner.pipeline_sends [Note: a send known to be over]), or the step's
end where none does: a ``SEND_F``'s is that same output, let go of before its backward; a
``SEND_B``'s, the gradient of the stage's input, counts (owner ``sent:<action>``) from a mark at
the send to one after that receive, on a CPU rank. On a GPU rank the sent copies are host
memory (runtime.stage_worker sends from the host): not counted on the device.

A program's step end, where it has one (planner.pipeline ``add_step_end``): ``ALLREDUCE`` holds
the rank for the stage's ``reduce_s`` (its gradients summed over the replicas) and ``OPTIM`` for
its ``optim_s``. [Note: ZeRO-2 overlap] After ``sREDUCE_SCATTER`` (planner.pipeline
``add_reduce_scatter_points``) the stage's next gradient pass runs as ``reduce_buckets`` equal
parts, each bucket's reduce-scatter (``reduce_s / reduce_buckets``) starting on the rank's
data-parallel link (``link:dp<r>``) once its part has ended and the bucket before it is done
(the runtime starts up to ``REDUCE_IN_FLIGHT`` and keeps the rest for later; the link sums one
at a time either way), the backward never waiting for them; the ``ALLREDUCE`` waits for the last
bucket. The reduce runs under the backward instead of after it: with a backward long enough the
step loses all but the last bucket's time, and it is never later than ZeRO-1's.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from memtrain.planner.pipeline import Placement, _deps, receive_posts, run_in_order
from memtrain.planner.pipeline_sends import send_releases
from memtrain.planner.plan import Action, Op
from memtrain.planner.schedule import Schedule
from memtrain.planner.taskgraph import TaskGraph, simulate_graph

__all__ = ["StageCost", "Link", "PipelineResult", "simulate_pipeline", "REDUCE_IN_FLIGHT", "REDUCE_BUCKET_ELEMS",
           "zero2_exposed_s", "clip_time_s"]

REDUCE_IN_FLIGHT = 2
"""ZeRO-2: a stage's bucket reduce-scatters under way at once (runtime.stage_zero's limit; the
runtime keeps a bucket's gradients until a slot frees, so the backward never waits for it)."""
REDUCE_BUCKET_ELEMS = 1 << 22
"""ZeRO-2: elements per gradient bucket (runtime.stage_zero's default; 16 MiB of fp32)."""


def zero2_exposed_s(reduce_s: float, grad_pass_s: float, buckets: int) -> float:
    """[Note: ZeRO-2 overlap] for one stage, in closed form: of a reduce-scatter of ``reduce_s``
    in ``buckets`` parts, each started as its part of a ``grad_pass_s`` pass ends, the time left
    after the pass: bucket ``j`` is ready at ``(j + 1) / k`` of the pass, the link sums them one
    at a time, so the last ends ``max(r / k, r - b (k - 1) / k)`` after the pass (what
    ``simulate_pipeline`` gives when nothing else holds the link)."""
    k = max(1, buckets)
    return max(reduce_s / k, reduce_s - grad_pass_s * (k - 1) / k)


def clip_time_s(num_ranks: int, num_params: int, grad_bytes: int, link: "Link", mem_gbps: float) -> float:
    """[Note: the clip collective] One rank's ``CLIP``: a ring all-gather of 16 bytes per
    parameter (its norm and whether it is whole or a shard's piece, fp64) over ``num_ranks`` ranks,
    ``num_ranks - 1`` messages on ``link``, plus the rank's ``grad_bytes`` of gradients read for
    their norms and read and written to scale them at ``mem_gbps``."""
    gather = (num_ranks - 1) * link.time_s(16 * num_params) if num_ranks > 1 else 0.0
    return gather + 3 * grad_bytes / (mem_gbps * 1e9)


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
    bw_bytes: int = 0
    """Under a split backward: taken at the start of ``B`` and held to the end of ``W`` (the
    activations of recomputed blocks, rebuilt by the ``B``, and of swapped ones, brought back
    before it); without a split, 0 (the backward's own, the stage's workspace)."""
    output_bytes: int = 0
    """Sent to the next stage after the forward; its gradient, as large, comes back."""
    reduce_s: float = 0.0
    """``ALLREDUCE``: the stage's gradients summed over the replicas (ZeRO: a reduce-scatter)."""
    optim_s: float = 0.0
    """``OPTIM``: its optimizer step (ZeRO: the shard's, and the all-gather of the shards)."""
    reduce_buckets: int = 1
    """ZeRO-2: the buckets its reduce-scatter comes in ([Note: ZeRO-2 overlap])."""
    fetch_s: float = 0.0
    """``PREFETCH``: an offloaded stage's fetch before its first forward (0: none)."""
    fetch_stream: str = "h2d"
    """The rank's stream the fetch runs on (``h2d``, or ``compute`` on a CPU device)."""


@dataclass(frozen=True, slots=True)
class Link:
    """A point-to-point link between two ranks."""

    gbps: float
    latency_s: float = 0.0
    recv_s: float = 0.0
    """The receiving rank's own time per receive, from when both sides are ready (see the module
    doc); the wire's ``latency_s`` is what is left of a transfer's fixed cost."""
    send_s: float = 0.0
    """The sending rank's own time per send, before the transfer starts (the call that starts it:
    where other processes share the cores, waking a waiting receiver costs the sender a slice,
    comm.link_probe [Note: mean, not median]); 0 where a send costs nothing measurable."""

    def time_s(self, num_bytes: int) -> float:
        return self.latency_s + num_bytes / (self.gbps * 1e9)


@dataclass(frozen=True, slots=True)
class PipelineResult:
    step_time_s: float
    bubble_fraction: float
    """The share of the ranks' compute time idle over the step."""
    peak_bytes: dict[int, int]
    """Per rank, the most activation, received-buffer and sent-tensor bytes held at once ([Note:
    received buffers], [Note: sent tensors])."""
    pass_times: dict[tuple[Op, int, int], tuple[float, float]]
    """Each pass's (start, end)."""
    send_times: dict[tuple[Op, int, int], tuple[float, float]] = field(default_factory=dict)
    """Each send's (start, end) on its link (``SEND_F``/``SEND_B``, stage, micro-batch)."""
    reduce_times: dict[int, tuple[float, float]] = field(default_factory=dict)
    """Per stage with an ``ALLREDUCE``, its gradients' sum: (start, end) (ZeRO-2: from its first
    bucket's reduce-scatter to its last's)."""
    fetch_times: dict[int, tuple[float, float]] = field(default_factory=dict)
    """Per stage with a ``PREFETCH``, its fetch: (start, end)."""
    act_peak_bytes: dict[int, int] = field(default_factory=dict)
    """Per rank, the most activation bytes held at once (received buffers and sent tensors apart)."""
    recv_times: dict[tuple[Op, int, int], tuple[float, float, int]] = field(default_factory=dict)
    """Per receive (``RECV_F``/``RECV_B``, stage, micro-batch), its buffer: when it is posted,
    when the pass that takes it starts, and its bytes ([Note: received buffers])."""
    sent_times: dict[tuple[Op, int, int], tuple[float, float, int]] = field(default_factory=dict)
    """Per stage output held for a remote next stage (``F``, stage, micro-batch) and per gradient
    sent back (``SEND_B``, stage, micro-batch) counted in its rank's memory: from when, to when,
    and its bytes ([Note: sent tensors])."""


def simulate_pipeline(schedule: Schedule, place: Placement, stages: Sequence[StageCost], link: Link,
                      links: Mapping[tuple[int, int], Link] | None = None, clip_s: float = 0.0,
                      step_start_s: Mapping[int, float] | None = None,
                      host_receives: Collection[int] = ()) -> PipelineResult:
    """Simulate one step of ``schedule`` (see the module doc); raises ``ValueError`` when it
    deadlocks or its stages and costs do not match. ``links[(src, dst)]``, where given, is the
    link between two ranks instead of ``link`` (ranks on one node and across nodes differ);
    ``clip_s``: each rank's ``CLIP`` once every rank has reached its own ([Note: the clip
    collective]); ``step_start_s[r]``: rank ``r``'s work before its program (planner.stage_cost
    [Note: the dropout walk]), a task that starts its compute stream; ``host_receives``: ranks
    (on a GPU) whose posted buffers are host memory, their device copies made at the ``RECV``
    ([Note: received buffers])."""
    if len(stages) != place.num_stages:
        raise ValueError(f"stages: {len(stages)} stage costs for {place.num_stages} stages; give one per stage")
    last = place.num_stages - 1
    split_w = any(a.op is Op.W for acts in schedule.values() for a in acts)
    has_p2p = any(a.op in (Op.SEND_F, Op.RECV_F, Op.SEND_B, Op.RECV_B) for acts in schedule.values() for a in acts)
    g = TaskGraph()
    task: dict[tuple[Op, int, int], int] = {}
    first: dict[tuple, int] = {}  # a pass run in parts, or a stage's reduce: its first task
    clipping = {r for r, acts in schedule.items() if any(a.op is Op.CLIP for a in acts)}
    arrived: dict[int, int] = {}  # [Note: the clip collective] per rank at its CLIP, its arrival
    # [Note: received buffers] a rank of host_receives takes its device copy at the RECV itself
    posts = {r: receive_posts(acts) if r not in host_receives else
             {k: (a,) for k, a in enumerate(acts) if a.op in (Op.RECV_F, Op.RECV_B)} for r, acts in schedule.items()}
    for r, t in sorted((step_start_s or {}).items()):
        if t > 0 and r in schedule:
            g.add("rng walk", f"compute:{r}", t)
    held: dict[tuple[Op, int, int], tuple[int, tuple[str, str, int]]] = {}  # per pass, its buffer: post mark, item
    releases = send_releases(schedule, place.rank_of) if has_p2p else {}  # [Note: sent tensors]
    sent: dict[int, dict[int, tuple[int, tuple]]] = {r: {} for r in schedule}  # per rank, per SEND_B held: mark, item
    outputs: dict[tuple[int, int], tuple[int, tuple]] = {}  # per (stage, mb) output held: mark, item
    held_s: dict[tuple[Op, int, int], tuple[int, int, int]] = {}  # per output or SEND_B: hold mark, let-go mark, bytes
    marks: dict[tuple[Op, int, int], tuple[int, int, int]] = {}  # per receive: post mark, take mark, bytes

    def run(r: int, k: int, a: Action) -> bool:
        if a.op is Op.CLIP:
            if r not in arrived:
                arrived[r] = g.add(f"{a}:arrive", f"compute:{r}", 0.0)
            if len(arrived) < len(clipping):
                return False
            task[(a.op, a.stage, r)] = g.add(str(a), f"compute:{r}", clip_s, deps=sorted(arrived.values()))
            return True
        deps = _task_deps(a, task, place, r, last, has_p2p)
        if deps is None:
            return False
        # [Note: received buffers] the pass at k takes its buffer (its receive ran before it, so
        # this is where the worker's posts at k happen too; taken first, its bytes not counted
        # twice), then the receives posted at k take theirs
        if (a.op, a.stage, a.microbatch) in held:
            mark, item = held.pop((a.op, a.stage, a.microbatch))
            take = g.add(f"take:{a}", f"compute:{r}", 0.0, deps=deps, free_end=[item])
            marks[(Op.RECV_F if a.op is Op.F else Op.RECV_B, a.stage, a.microbatch)] = (mark, take, item[2])
        for recv in posts[r].get(k, ()):
            nbytes = stages[recv.stage - 1 if recv.op is Op.RECV_F else recv.stage].output_bytes
            item = (f"rank{r}", f"recv:{recv}", nbytes)
            mark = g.add(f"post:{recv}", f"compute:{r}", 0.0, alloc_start=[item])
            held[(Op.F if recv.op is Op.RECV_F else Op.B, recv.stage, recv.microbatch)] = (mark, item)
        _add(g, task, a, r, deps, place, stages, link, split_w, links or {}, first)
        key = (a.op, a.stage, a.microbatch)
        if a.op is Op.F and a.stage < last and place.rank_of[a.stage + 1] != r and has_p2p:  # [Note: sent tensors]
            item = (f"rank{r}", f"out:{a.stage}:{a.microbatch}", stages[a.stage].output_bytes)
            outputs[(a.stage, a.microbatch)] = (g.add(f"out:{a}", f"compute:{r}", 0.0, deps=[task[key]],
                                                      alloc_start=[item]), item)
        elif a.op is Op.B and (a.stage, a.microbatch) in outputs:
            mark, item = outputs.pop((a.stage, a.microbatch))
            held_s[(Op.F, a.stage, a.microbatch)] = (mark, g.add(f"done:{a}", f"compute:{r}", 0.0, deps=[task[key]],
                                                                 free_end=[item]), item[2])
        elif a.op is Op.SEND_B and r not in host_receives:
            item = (f"rank{r}", f"sent:{a}", stages[a.stage - 1].output_bytes)
            sent[r][k] = (g.add(f"hold:{a}", f"compute:{r}", 0.0, deps=deps, alloc_start=[item]), item)
        for j in releases.get(r, {}).get(k, ()):
            if j in sent[r]:
                mark, item = sent[r].pop(j)
                b = schedule[r][j]
                held_s[(b.op, b.stage, b.microbatch)] = (mark, g.add(f"release:{b}", f"compute:{r}", 0.0,
                                                                     deps=[task[key]], free_end=[item]), item[2])
        return True

    pos = run_in_order(schedule, run)
    stuck = [f"rank {r} at step {k} ({schedule[r][k]})" for r, k in pos.items() if k < len(schedule[r])]
    if stuck:
        raise ValueError(f"simulate_pipeline: the schedule deadlocks: {'; '.join(stuck)} (validate_pipeline shows where)")
    for r, items in sent.items():  # [Note: sent tensors] the rest, at the step's end
        if items:
            end = g.add("flush", f"compute:{r}", 0.0, deps=[g.last_on[f"compute:{r}"]],
                        free_end=[item for _, item in items.values()])
            for j, (mark, item) in items.items():
                b = schedule[r][j]
                held_s[(b.op, b.stage, b.microbatch)] = (mark, end, item[2])
    res = simulate_graph(g, group=lambda tier, owner, nbytes: ((tier, nbytes),) if owner.startswith("act") else ())
    step = res.end_s
    passes = {k: (res.start_s[first.get(k, t)], res.finish_s[t]) for k, t in task.items()
              if k[0] in (Op.F, Op.B, Op.W)}
    reduces = {k[1]: (res.start_s[first.get(("reduce", k[1]), t)], res.finish_s[t]) for k, t in task.items()
               if k[0] is Op.ALLREDUCE}
    busy = sum(end - start for start, end in passes.values())
    peaks = {r: res.peak_bytes.get(f"rank{r}", 0) for r in schedule}
    act_peaks = {r: res.group_peak_bytes.get(f"rank{r}", 0) for r in schedule}
    sends = {k: (res.start_s[t], res.finish_s[t]) for k, t in task.items() if k[0] in (Op.SEND_F, Op.SEND_B)}
    fetches = {k[1]: (res.start_s[t], res.finish_s[t]) for k, t in task.items() if k[0] is Op.PREFETCH}
    recvs = {k: (res.start_s[a], res.start_s[b], nbytes) for k, (a, b, nbytes) in marks.items()}
    sends_held = {k: (res.start_s[a], res.finish_s[b], nbytes) for k, (a, b, nbytes) in held_s.items()}
    return PipelineResult(step_time_s=step, bubble_fraction=1.0 - busy / (step * len(schedule)) if step else 0.0,
                          peak_bytes=peaks, pass_times=passes, send_times=sends, reduce_times=reduces,
                          fetch_times=fetches, act_peak_bytes=act_peaks, recv_times=recvs,
                          sent_times=sends_held)


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
         stages: Sequence[StageCost], link: Link, split_w: bool, links: Mapping[tuple[int, int], Link],
         first: dict) -> None:
    s, i = a.stage, a.microbatch
    cost = stages[s]
    tier, owner = f"rank{r}", f"act:{s}:{i}"
    compute = f"compute:{r}"
    armed = ("armed", s) in first and a.op in (Op.B, Op.W) and a.op is (Op.W if split_w else Op.B)
    if armed:  # [Note: ZeRO-2 overlap] the gradient pass in parts, each part's bucket reduce-scattered after it
        del first[("armed", s)]
        k = max(1, cost.reduce_buckets)
        dur = cost.wgrad_s if a.op is Op.W else cost.bwd_s
        frees = [(tier, owner, cost.activation_bytes + (cost.bw_bytes if split_w else 0))] \
            if a.op is Op.W or not split_w else []
        buckets: list[int] = []
        t = -1
        for j in range(k):
            t = g.add(f"{a}#{j}", compute, dur / k, deps=deps if j == 0 else [], free_end=frees if j == k - 1 else [],
                      alloc_start=[(tier, owner, cost.bw_bytes)] if j == 0 and a.op is Op.B and split_w else [])
            first.setdefault((a.op, s, i), t)
            buckets.append(g.add(f"{s}REDUCE_SCATTER#{j}", f"link:dp{r}", cost.reduce_s / k, deps=[t]))
        first[("reduce", s)] = buckets[0]
        first[("buckets", s)] = buckets[-1]
    elif a.op is Op.REDUCE_SCATTER:
        first[("armed", s)] = 0
        t = g.add(str(a), compute, 0.0, deps=deps)
    elif a.op is Op.ALLREDUCE:
        if ("buckets", s) in first:  # ZeRO-2: the buckets' reduce-scatters waited for
            t = g.add(str(a), compute, 0.0, deps=deps + [first.pop(("buckets", s))])
        else:
            t = g.add(str(a), compute, cost.reduce_s, deps=deps)
    elif a.op is Op.OPTIM:
        t = g.add(str(a), compute, cost.optim_s, deps=deps)
    elif a.op is Op.PREFETCH:  # after the rank's action before it; the stage's first F waits for it
        before = [g.last_on[compute]] if compute in g.last_on else []
        t = first[("fetch", s)] = g.add(str(a), f"{cost.fetch_stream}:{r}", cost.fetch_s, deps=before)
    elif a.op is Op.F:
        fetched = [first.pop(("fetch", s))] if ("fetch", s) in first else []
        t = g.add(str(a), compute, cost.fwd_s, deps=deps + fetched, alloc_end=[(tier, owner, cost.activation_bytes)])
    elif a.op is Op.B:
        frees = [] if split_w else [(tier, owner, cost.activation_bytes)]
        t = g.add(str(a), compute, cost.bwd_s, deps=deps, free_end=frees,
                  alloc_start=[(tier, owner, cost.bw_bytes)] if split_w else [])
    elif a.op is Op.W:
        t = g.add(str(a), compute, cost.wgrad_s, deps=deps,
                  free_end=[(tier, owner, cost.activation_bytes + cost.bw_bytes)])
    elif a.op in (Op.SEND_F, Op.SEND_B):
        dst = place.rank_of[s + 1] if a.op is Op.SEND_F else place.rank_of[s - 1]
        nbytes = cost.output_bytes if a.op is Op.SEND_F else stages[s - 1].output_bytes
        wire = links.get((r, dst), link)
        if wire.send_s > 0:  # the sender's own part, on its compute stream, then the transfer
            deps = [g.add(f"{a}:post", compute, wire.send_s, deps=deps)]
        t = g.add(str(a), f"link:{r}>{dst}", wire.time_s(nbytes), deps=deps)
    elif a.op in (Op.RECV_F, Op.RECV_B):
        src = place.rank_of[s - 1] if a.op is Op.RECV_F else place.rank_of[s + 1]
        t = g.add(str(a), compute, links.get((src, r), link).recv_s, deps=deps)
    else:
        raise ValueError(f"simulate_pipeline: no cost for {a} (op {a.op.value})")
    task[(a.op, s, i)] = t
