"""Pipeline schedules as programs: each rank's compute order over the stages it holds.

docs/DESIGN.md rules 1-2. A pipeline schedule is a ``Schedule`` (``{rank: (Action, ...)}``)
whose actions name the model stage they run (``Action.stage``) and the micro-batch: ``2F5`` is
stage 2's forward of micro-batch 5 on whichever rank holds stage 2 (``Placement``). Generators:

- ``gpipe``: every forward, then every backward (Huang et al. 2019);
- ``1f1b``: ``p - 1 - r`` forwards on rank ``r``, then one forward and one backward in turn, then
  the backwards left (Narayanan et al. 2021, PipeDream-Flush);
- ``interleaved-1f1b``: ``v`` stages per rank in a loop (stage ``k·p + r`` on rank ``r``),
  micro-batches in groups of ``p`` (Narayanan et al. 2021, Sec. 2.2);
- ``zb-h1``: the backward split into ``B`` (input gradients, which the previous stage waits
  for) and ``W`` (weight gradients, which nothing waits for), each ``W`` put off to fill the
  rank's idle time, no rank holding more micro-batches than 1F1B's peak (Qi et al. 2023,
  "Zero Bubble Pipeline Parallelism", ZB-H1): with F = B = W the list scheduler below idles
  the paper's (p - 1)(F + B - W), a third of 1F1B's, or one tick more (m >= p: exactly on
  about half the shapes of p = 2..16; the rank orders were chosen by trying every order per
  part of the ranks on those shapes);
- ``v-half``, ``v-min``: two stages per rank in a V (stage ``r`` and ``2p - 1 - r``), ``B`` and
  ``W`` split, each rank holding at most about a half (``v-half``) or a third (``v-min``) of
  1F1B's activations (Qi et al. 2024, "Pipeline Parallelism with Controllable Memory").

The last three come from one list scheduler (``_greedy``) run on unit times (F = B = W): at
each tick a rank runs its ready ``B`` first, else a ready ``F`` (a micro-batch enters a rank only
while its limit has room for all its stages there), else its oldest pending ``W`` (ZB-H1's
first ranks try F, W, B instead); the order it produces is the schedule (timing itself is the
simulator's). ``add_p2p`` adds the sends and receives between ranks;
``validate_pipeline`` runs a schedule by its dependencies alone and reports a deadlock or an
activation overrun on a step × rank grid that marks the failing cell.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from memtrain.planner.plan import Action, ActPolicy, Op
from memtrain.planner.schedule import Schedule, format_grid

__all__ = ["SCHEDULES", "Placement", "placement", "generate", "add_p2p", "receive_posts", "add_step_end",
           "add_offload_points",
           "add_swap_points", "SPLIT_W_SCHEDULES", "add_reduce_scatter_points", "add_clip_points",
           "validate_pipeline", "PipelineProblem",
           "activation_limits", "schedule_from_text", "pass_times", "bubble_fraction", "run_in_order"]

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "v-half", "v-min")
"""The pipeline schedules ``generate`` makes."""

_SPLIT_W = frozenset({"zb-h1", "v-half", "v-min"})
"""Schedules whose backward is split into ``B`` and ``W``."""
SPLIT_W_SCHEDULES = _SPLIT_W


@dataclass(frozen=True, slots=True)
class Placement:
    """Which rank runs each model stage."""

    rank_of: tuple[int, ...]
    """Per stage, its rank."""

    @property
    def num_stages(self) -> int:
        return len(self.rank_of)

    @property
    def num_ranks(self) -> int:
        return max(self.rank_of) + 1

    def stages_of(self, rank: int) -> tuple[int, ...]:
        return tuple(s for s, r in enumerate(self.rank_of) if r == rank)


def placement(kind: str, num_ranks: int, stages_per_rank: int = 1) -> Placement:
    """The stages' ranks for schedule ``kind``: a loop (stage ``s`` on rank ``s mod p``), or a V
    for ``v-half``/``v-min`` (rank ``r`` holds stages ``r`` and ``2p - 1 - r``)."""
    _check_kind(kind)
    if num_ranks < 1:
        raise ValueError(f"num_ranks: must be >= 1, got {num_ranks}")
    if kind in ("v-half", "v-min"):
        return Placement(tuple(range(num_ranks)) + tuple(reversed(range(num_ranks))))
    v = stages_per_rank if kind == "interleaved-1f1b" else 1
    if v < 1:
        raise ValueError(f"stages_per_rank: must be >= 1, got {v}")
    return Placement(tuple(s % num_ranks for s in range(v * num_ranks)))


def activation_limits(kind: str, num_ranks: int) -> tuple[int, ...] | None:
    """Per rank, the most micro-batch stages whose activations the list scheduler lets it hold
    (None: the schedule has no limit of its own). ZB-H1's peak is 1F1B's, ``p`` on every rank
    (1F1B's first rank holds ``p``; the later ranks' put-off ``W``s may use as much). A V's
    stages are half as long (``2p`` stages over the same layers), so 1F1B's first rank, ``p``
    whole stages, is ``2p`` of them: ``v-half`` holds about half of that, ``p + 1``, and
    ``v-min`` about a third, ``ceil(2p / 3) + 1`` (one more than the share, to start)."""
    p = num_ranks
    if kind == "zb-h1":
        return (p,) * p
    if kind == "v-half":
        return (p + 1,) * p
    if kind == "v-min":
        return (math.ceil(2 * p / 3) + 1,) * p
    return None


def generate(kind: str, num_ranks: int, num_microbatches: int, *, stages_per_rank: int = 2) -> Schedule:
    """Schedule ``kind`` (one of ``SCHEDULES``) of ``num_microbatches`` over ``num_ranks`` ranks,
    compute actions only; ``stages_per_rank`` for ``interleaved-1f1b`` (which needs the
    micro-batches to come in whole groups of ``num_ranks``)."""
    _check_kind(kind)
    p, m = num_ranks, num_microbatches
    if p < 1:
        raise ValueError(f"num_ranks: must be >= 1, got {p}")
    if m < 1:
        raise ValueError(f"num_microbatches: must be >= 1, got {m}")
    if kind == "gpipe":
        return {r: tuple([Action(r, Op.F, i) for i in range(m)] + [Action(r, Op.B, i) for i in range(m)])
                for r in range(p)}
    if kind == "1f1b":
        return {r: _one_f_one_b([(r, i) for i in range(m)], [(r, i) for i in range(m)], min(p - 1 - r, m))
                for r in range(p)}
    if kind == "interleaved-1f1b":
        v = stages_per_rank
        if v < 1:
            raise ValueError(f"stages_per_rank: must be >= 1, got {v}")
        if m % p:
            raise ValueError(f"num_microbatches: interleaved-1f1b runs micro-batches in groups of num_ranks; "
                             f"{m} is not a multiple of {p}")
        out: Schedule = {}
        for r in range(p):
            fwd = [((i // p) % v * p + r, i // (p * v) * p + i % p) for i in range(m * v)]
            bwd = [((v - 1 - (i // p) % v) * p + r, i // (p * v) * p + i % p) for i in range(m * v)]
            out[r] = _one_f_one_b(fwd, bwd, min((p - r - 1) * 2 + (v - 1) * p, m * v))
        return out
    place = placement(kind, p)
    # ZB-H1: the first half of the ranks (rounded up) feed the pipeline (an F, else a W to make
    # room, else a B), the second half send gradients back first (a B, else an F, else a W)
    orders = ["FWB" if r < (p + 1) // 2 else "BFW" for r in range(p)] if kind == "zb-h1" else None
    return _greedy(place, m, activation_limits(kind, p), split_w=kind in _SPLIT_W, orders=orders)


def _check_kind(kind: str) -> None:
    if kind not in SCHEDULES:
        raise ValueError(f"schedule: must be one of {', '.join(SCHEDULES)}, got {kind!r}")


def _one_f_one_b(fwd: Sequence[tuple[int, int]], bwd: Sequence[tuple[int, int]], warmup: int) -> tuple[Action, ...]:
    """``warmup`` forwards, then a forward and a backward in turn, then the backwards left;
    ``fwd``/``bwd``: (stage, micro-batch) in the order each pass runs them."""
    out = [Action(s, Op.F, i) for s, i in fwd[:warmup]]
    for (fs, fi), (bs, bi) in zip(fwd[warmup:], bwd):
        out += [Action(fs, Op.F, fi), Action(bs, Op.B, bi)]
    out += [Action(s, Op.B, i) for s, i in bwd[len(fwd) - warmup:]]
    return tuple(out)


def _deps(a: Action, last_stage: int) -> list[tuple[Op, int, int]]:
    """What ``a`` waits for: (op, stage, micro-batch) that must have run."""
    s, i = a.stage, a.microbatch
    if a.op is Op.F:
        return [(Op.F, s - 1, i)] if s > 0 else []
    if a.op is Op.B:
        return [(Op.F, s, i)] + ([(Op.B, s + 1, i)] if s < last_stage else [])
    if a.op is Op.W:
        return [(Op.B, s, i)]
    return []


def _greedy(place: Placement, m: int, limits: Sequence[int] | None, *, split_w: bool,
            orders: Sequence[str] | None = None) -> Schedule:
    """The list scheduler of the module doc, on unit times; ``orders[r]``: the order rank ``r``
    tries its ready passes in (default ``"BFW"``: a B, else an F, else a W)."""
    p, n = place.num_ranks, place.num_stages
    last = n - 1
    done: set[tuple[Op, int, int]] = set()
    out: dict[int, list[Action]] = {r: [] for r in range(p)}
    next_f = {s: 0 for s in range(n)}  # per stage, the next micro-batch to run forward
    next_b = {s: 0 for s in range(n)}
    pending_w: dict[int, list[tuple[int, int]]] = {r: [] for r in range(p)}  # (stage, mb) whose W is due
    held = [0] * p  # micro-batch stages whose activations a rank holds (F run, W or B not yet)
    reserved = [0] * p  # forwards of micro-batches under way on a rank that it still has to run

    def ready_b(r: int, stages: tuple[int, ...]) -> Action | None:
        for s in sorted(stages, reverse=True):  # the later stage first (it frees downstream work)
            i = next_b[s]
            if i < m and all(d in done for d in _deps(Action(s, Op.B, i), last)):
                return Action(s, Op.B, i)
        return None

    def ready_f(r: int, stages: tuple[int, ...]) -> Action | None:
        # the later stage first (a V's way back); a micro-batch enters the rank only if the
        # limit has room for its stages here ahead (reserved), so a V's way back never waits for
        # memory its own way down took
        for s in sorted(stages, key=lambda s: (-s, next_f[s])):
            i = next_f[s]
            later = sum(1 for t in stages if t > s)
            if s == stages[0] and limits is not None and held[r] + reserved[r] + 1 + later > limits[r]:
                continue
            if i < m and all(d in done for d in _deps(Action(s, Op.F, i), last)):
                return Action(s, Op.F, i)
        return None

    def ready_w(r: int, stages: tuple[int, ...]) -> Action | None:
        return Action(pending_w[r][0][0], Op.W, pending_w[r][0][1]) if pending_w[r] else None

    tries = {"B": ready_b, "F": ready_f, "W": ready_w}
    total = n * m * (3 if split_w else 2)
    ran = 0
    stages_by_rank = [place.stages_of(r) for r in range(p)]
    while ran < total:
        this_tick: list[tuple[Op, int, int]] = []
        for r in range(p):
            stages = stages_by_rank[r]
            pick = None
            for kind in orders[r] if orders is not None else "BFW":
                pick = tries[kind](r, stages)
                if pick is not None:
                    break
            if pick is None:
                continue
            out[r].append(pick)
            this_tick.append((pick.op, pick.stage, pick.microbatch))
            if pick.op is Op.F:
                later = sum(1 for t in stages if t > pick.stage)
                reserved[r] += later if pick.stage == stages[0] else -1
                next_f[pick.stage] += 1
                held[r] += 1
            elif pick.op is Op.B:
                next_b[pick.stage] += 1
                if split_w:
                    pending_w[r].append((pick.stage, pick.microbatch))
                else:
                    held[r] -= 1
            else:
                pending_w[r].pop(0)
                held[r] -= 1
        if not this_tick:
            raise RuntimeError(f"pipeline: the list scheduler is stuck with limits {limits} "
                               f"({ran} of {total} passes run); raise the activation limit")
        done.update(this_tick)  # a pass's result is usable from the next tick (unit times)
        ran += len(this_tick)
    return {r: tuple(a) for r, a in out.items()}


def add_p2p(schedule: Schedule, place: Placement) -> Schedule:
    """Each rank's schedule with its sends and receives: ``RECV_F`` before a forward whose input
    comes from another rank and ``SEND_F`` after one whose output goes to another rank; ``RECV_B``
    and ``SEND_B`` likewise for a backward's gradients (``B``, or the whole backward). A stage
    next to one on the same rank (a V's turn) passes its tensors locally."""
    last = place.num_stages - 1
    out: Schedule = {}
    for r, acts in schedule.items():
        new: list[Action] = []
        for a in acts:
            s, i = a.stage, a.microbatch
            if a.op is Op.F and s > 0 and place.rank_of[s - 1] != r:
                new.append(Action(s, Op.RECV_F, i))
            if a.op is Op.B and s < last and place.rank_of[s + 1] != r:
                new.append(Action(s, Op.RECV_B, i))
            new.append(a)
            if a.op is Op.F and s < last and place.rank_of[s + 1] != r:
                new.append(Action(s, Op.SEND_F, i))
            if a.op is Op.B and s > 0 and place.rank_of[s - 1] != r:
                new.append(Action(s, Op.SEND_B, i))
        out[r] = tuple(new)
    return out


def receive_posts(program: Sequence[Action]) -> dict[int, list[Action]]:
    """Where a worker posts each receive of its rank's ``program`` (runtime.stage_worker runs this
    rule; comm.p2p [Note: receives posted early]): by position, the ``RECV_F``/``RECV_B`` posted
    right before the action there, the last pass (``F``, ``B`` or ``W``) ahead of them, so the
    transfer goes on under that pass, or position 0 for those with no pass ahead; the received
    buffer is held from there (planner.simulate_pipeline [Note: received buffers])."""
    out: dict[int, list[Action]] = {}
    last = 0
    for k, a in enumerate(program):
        if a.op in (Op.F, Op.B, Op.W):
            last = k
        elif a.op in (Op.RECV_F, Op.RECV_B):
            out.setdefault(last, []).append(a)
    return out


@dataclass(frozen=True, slots=True)
class PipelineProblem:
    """Why a pipeline schedule cannot run: the message and the cells (rank, step) at fault."""

    message: str
    cells: tuple[tuple[int, int], ...]
    grid: str
    """The schedule as a step × rank grid, the failing cells marked ``>>``."""

    def __str__(self) -> str:
        return f"{self.message}\n{self.grid}"


def add_step_end(schedule: Schedule, place: Placement) -> Schedule:
    """Each rank's program closed by, per stage it holds, ``ALLREDUCE`` (its gradients summed
    across the replicas, and tied weights across the two end ranks) then ``OPTIM`` (its step)."""
    return {r: tuple(acts) + tuple(Action(s, op) for s in place.stages_of(r) for op in (Op.ALLREDUCE, Op.OPTIM))
            for r, acts in schedule.items()}


_STEP_END = (Op.ALLREDUCE, Op.OFFLOAD, Op.OPTIM)


def add_clip_points(schedule: Schedule) -> Schedule:
    """Gradient clipping by the global norm (``Op.CLIP``, runtime.stage_clip): each rank's step
    end (the run of ``ALLREDUCE``/``OFFLOAD``/``OPTIM`` closing its program) reordered so that
    every ``ALLREDUCE`` of its stages comes first, then one ``sCLIP`` (``s``: the rank's first
    stage there), then the ``OFFLOAD``s and ``OPTIM``s in their order: the norm needs every
    stage's summed gradient, on every rank, before any update, and an offloaded stage's whole
    gradients are still on its parameters before its ``OFFLOAD``. The ``ALLREDUCE``s keep their
    order (the tied-weight and replica collectives pair up as before). A program with a ``CLIP``
    already, or without a step end, is left as it is."""
    out: Schedule = {}
    for r, acts in schedule.items():
        acts = tuple(acts)
        k = len(acts)
        while k > 0 and acts[k - 1].op in _STEP_END and acts[k - 1].chunk is None:
            k -= 1
        tail = acts[k:]
        if any(a.op is Op.CLIP for a in acts) or not any(a.op is Op.OPTIM for a in tail):
            out[r] = acts
            continue
        sums = tuple(a for a in tail if a.op is Op.ALLREDUCE)
        rest = tuple(a for a in tail if a.op is not Op.ALLREDUCE)
        first = min(a.stage for a in tail)
        out[r] = acts[:k] + sums + (Action(first, Op.CLIP),) + rest
    return out


def add_reduce_scatter_points(schedule: Schedule, stages: Iterable[int]) -> Schedule:
    """ZeRO-2 (runtime.stage_zero [Note: ZeRO-2 in a pipeline]): per stage of ``stages``,
    ``sREDUCE_SCATTER<i>`` right before the stage's last gradient pass in its rank's program (its
    last ``W`` where the backward is split, else its last ``B``; ``i`` that pass's micro-batch):
    the stage's buckets are reduce-scattered from there on as that pass finishes their gradients,
    and its ``sALLREDUCE`` waits for them. A stage whose program has one already is left as it is."""
    wanted = set(stages)
    out: Schedule = {}
    for r, acts in schedule.items():
        mine = {a.stage for a in acts} & wanted
        done = {a.stage for a in acts if a.op is Op.REDUCE_SCATTER}
        last: dict[int, int] = {}
        split = {a.stage for a in acts if a.op is Op.W}
        for k, a in enumerate(acts):
            if a.stage in mine and a.stage not in done and a.op is (Op.W if a.stage in split else Op.B):
                last[a.stage] = k
        at = {k: s for s, k in last.items()}
        new: list[Action] = []
        for k, a in enumerate(acts):
            if k in at:
                new.append(Action(at[k], Op.REDUCE_SCATTER, a.microbatch))
            new.append(a)
        out[r] = tuple(new)
    return out


def add_offload_points(schedule: Schedule, offloaded: Iterable[int]) -> Schedule:
    """Each offloaded stage's model states brought in and sent home once per step (per-stage
    offload in a pipeline worker, runtime.stage_offload): ``sPREFETCH`` (the fetches of the
    stage's chunks begin) before the first action of stage ``s`` in its rank's program, and
    ``sOFFLOAD`` (the stage's summed gradients added into its chunks' accumulators, its param
    buffers released) right before its ``sOPTIM``, which then steps the chunks where they live.
    A stage whose program has them already is left as it is."""
    stages = set(offloaded)
    out: Schedule = {}
    for r, acts in schedule.items():
        new: list[Action] = []
        mine = {a.stage for a in acts} & stages
        has = {(a.stage, a.op) for a in acts if a.op in (Op.PREFETCH, Op.OFFLOAD)}
        started: set[int] = set()
        for a in acts:
            s = a.stage
            if s in mine and s not in started and (s, Op.PREFETCH) not in has:
                new.append(Action(s, Op.PREFETCH))
            started.add(s)
            if a.op is Op.OPTIM and a.chunk is None and s in mine and (s, Op.OFFLOAD) not in has:
                new.append(Action(s, Op.OFFLOAD))
            new.append(a)
        out[r] = tuple(new)
    return out


def add_swap_points(schedule: Schedule, acts: Mapping[int, Sequence[ActPolicy | str]]) -> Schedule:
    """Each swapped block's activations moved out after its stage's forward and back before its
    backward (per-stage activation policies in a pipeline worker, runtime.stage_activations),
    the stage-level form of planner.program_swaps' rules: ``sSWAP_OUT<i>/b<j>`` right after
    ``sF<i>``, for each block ``j`` (the block's index within stage ``s``) whose policy in
    ``acts[s]`` is ``swap_host`` or ``swap_nvme``, in block order; ``sSWAP_IN<i>/b<j>`` before
    ``sB<i>`` (before the receive of its gradient when that comes right before it, so the copy
    overlaps the wait), top block first. Recomputed and kept blocks need no action: recompute
    happens inside the ``B``. Under a split backward a block brought back stays until the
    micro-batch's ``W`` (its graph's end), and a recomputed one is replayed at the ``B``'s start,
    so ``W`` needs no action either (runtime.stage_activations [Note: recompute and swap under a
    split backward]). A program with swap actions already is left as it is."""
    swapped = {s: [j for j, p in enumerate(ps) if ActPolicy(p) in (ActPolicy.SWAP_HOST, ActPolicy.SWAP_NVME)]
               for s, ps in acts.items()}
    swapped = {s: js for s, js in swapped.items() if js}
    out: Schedule = {}
    for r, program in schedule.items():
        if not swapped or any(a.op in (Op.SWAP_OUT, Op.SWAP_IN) for a in program):
            out[r] = tuple(program)
            continue
        new: list[Action] = []
        for k, a in enumerate(program):
            js = swapped.get(a.stage, [])
            ins = [Action(a.stage, Op.SWAP_IN, a.microbatch, block=j) for j in reversed(js)]
            nxt = program[k + 1] if k + 1 < len(program) else None
            if (a.op is Op.RECV_B and nxt is not None and nxt.op is Op.B and nxt.stage == a.stage
                    and nxt.microbatch == a.microbatch):
                new += ins
            elif a.op is Op.B and not (new and new[-1].op is Op.RECV_B and new[-1].stage == a.stage
                                       and new[-1].microbatch == a.microbatch):
                new += ins
            new.append(a)
            if a.op is Op.F:
                new += [Action(a.stage, Op.SWAP_OUT, a.microbatch, block=j) for j in js]
        out[r] = tuple(new)
    return out


def validate_pipeline(schedule: Schedule, place: Placement, num_microbatches: int, *,
                      limits: Sequence[int] | None = None) -> PipelineProblem | None:
    """Run ``schedule`` by its dependencies alone (a receive waits for its send; sends never
    wait) and return the first problem, or None: an action on a stage its rank does not hold;
    every pass of every (stage, micro-batch) run exactly once (``W`` when the backward is split);
    a deadlock (no rank can go on: each blocked cell is marked); a rank holding more
    micro-batch stages' activations than ``limits[rank]`` (F to W, or to B when not split)."""
    n, m = place.num_stages, num_microbatches
    last = n - 1
    split_w = any(a.op is Op.W for acts in schedule.values() for a in acts)
    for r, acts in schedule.items():
        for k, a in enumerate(acts):
            if a.stage >= n or place.rank_of[a.stage] != r:
                return _problem(schedule, f"rank {r} step {k} ({a}): stage {a.stage} is not on rank {r}", [(r, k)])
    want = {(op, s, i) for s in range(n) for i in range(m) for op in ((Op.F, Op.B, Op.W) if split_w else (Op.F, Op.B))}
    seen: dict[tuple[Op, int, int], tuple[int, int]] = {}
    for r, acts in schedule.items():
        for k, a in enumerate(acts):
            if a.op in (Op.F, Op.B, Op.W):
                key = (a.op, a.stage, a.microbatch)
                if key in seen:
                    return _problem(schedule, f"rank {r} step {k} ({a}): runs twice", [seen[key], (r, k)])
                if key not in want:
                    return _problem(schedule, f"rank {r} step {k} ({a}): micro-batch out of range", [(r, k)])
                seen[key] = (r, k)
    missing = sorted(want - set(seen), key=lambda e: (e[1], e[2], e[0].value))
    if missing:
        op, s, i = missing[0]
        return _problem(schedule, f"stage {s} micro-batch {i}: {op.value} never runs "
                                  f"({len(missing)} passes missing)", [])
    done: set[tuple[Op, int, int]] = set()
    sent: set[tuple[Op, int, int]] = set()
    held = {r: 0 for r in schedule}
    overrun: list[PipelineProblem] = []

    def run(r: int, k: int, a: Action) -> bool:
        if overrun or not _ready(a, done, sent, last):
            return False
        if a.op in (Op.SEND_F, Op.SEND_B):
            sent.add((a.op, a.stage, a.microbatch))
        elif a.op in (Op.F, Op.B, Op.W):
            done.add((a.op, a.stage, a.microbatch))
            held[r] += 1 if a.op is Op.F else (-1 if a.op is Op.W or not split_w else 0)
            if limits is not None and held[r] > limits[r]:
                overrun.append(_problem(schedule, f"rank {r} step {k} ({a}): holds {held[r]} micro-batch stages' "
                                                  f"activations, over its limit of {limits[r]}", [(r, k)]))
        return True

    pos = run_in_order(schedule, run)
    if overrun:
        return overrun[0]
    blocked = [(r, pos[r]) for r, acts in schedule.items() if pos[r] < len(acts)]
    if blocked:
        what = "; ".join(f"rank {r} waits at step {k} ({schedule[r][k]})" for r, k in blocked)
        return _problem(schedule, f"deadlock: {what}", blocked)
    return None


def run_in_order(lists: Mapping[int, Sequence[Action]], run: Callable[[int, int, Action], bool]) -> dict[int, int]:
    """Each rank runs its list in order, the ranks in turn, each action as soon as
    ``run(rank, step, action)`` can run it (True: it ran; False: not yet), until no rank can go
    on. Returns where each rank stopped: its list's length when it ran all of it."""
    pos = {r: 0 for r in lists}
    progressed = True
    while progressed:
        progressed = False
        for r, acts in lists.items():
            while pos[r] < len(acts) and run(r, pos[r], acts[pos[r]]):
                pos[r] += 1
                progressed = True
    return pos


def _ready(a: Action, done: set, sent: set, last: int) -> bool:
    if a.op is Op.RECV_F:
        return (Op.SEND_F, a.stage - 1, a.microbatch) in sent
    if a.op is Op.RECV_B:
        return (Op.SEND_B, a.stage + 1, a.microbatch) in sent
    return all(d in done for d in _deps(a, last))


def pass_times(schedule: Schedule, place: Placement, durations: dict[Op, float]) -> dict[tuple[Op, int, int], tuple[float, float]]:
    """Each pass's (start, end) when every rank runs its list in order, each pass as soon as its
    rank is free and what it waits for has ended, taking ``durations[op]`` (communication free;
    the backward ``B`` of an unsplit schedule takes ``durations[Op.B] + durations[Op.W]`` when
    ``Op.W`` is given). A schedule that deadlocks raises ``ValueError``."""
    last = place.num_stages - 1
    split_w = any(a.op is Op.W for acts in schedule.values() for a in acts)
    compute = {r: [a for a in acts if a.op in (Op.F, Op.B, Op.W)] for r, acts in schedule.items()}
    ends: dict[tuple[Op, int, int], tuple[float, float]] = {}
    free = {r: 0.0 for r in compute}

    def run(r: int, k: int, a: Action) -> bool:
        deps = _deps(a, last)
        if not all(d in ends for d in deps):
            return False
        t = durations[a.op] + (durations.get(Op.W, 0.0) if a.op is Op.B and not split_w else 0.0)
        start = max([free[r]] + [ends[d][1] for d in deps])
        ends[(a.op, a.stage, a.microbatch)] = (start, start + t)
        free[r] = start + t
        return True

    pos = run_in_order(compute, run)
    if any(pos[r] < len(acts) for r, acts in compute.items()):
        raise ValueError("pass_times: the schedule deadlocks (validate_pipeline names where)")
    return ends


def bubble_fraction(schedule: Schedule, place: Placement, durations: dict[Op, float]) -> float:
    """The share of the ranks' time idle over the step (``pass_times``' end on every rank)."""
    times = pass_times(schedule, place, durations)
    step = max(e for _, e in times.values())
    busy = sum(e - s for s, e in times.values())
    return 1.0 - busy / (step * place.num_ranks)


def _problem(schedule: Schedule, message: str, cells: Sequence[tuple[int, int]]) -> PipelineProblem:
    return PipelineProblem(message=message, cells=tuple(cells), grid=format_grid(schedule, marks=set(cells)))


def schedule_from_text(text: str) -> Schedule:
    """A schedule read back from ``planner.schedule.format_grid``'s text (the golden files)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    header = lines[0]
    found = list(re.finditer(r"rank (\d+)", header))
    starts = [f.start() for f in found] + [None]
    out: dict[int, list[Action]] = {int(f.group(1)): [] for f in found}
    for ln in lines[1:]:
        for f, a, b in zip(found, starts, starts[1:]):
            cell = ln[a:b].strip() if a < len(ln) else ""
            if cell:
                out[int(f.group(1))].append(Action.parse(cell))
    return {r: tuple(acts) for r, acts in out.items()}
