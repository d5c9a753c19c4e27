"""The heterogeneous planner's search space and its partition of the blocks into stages.

planner.hetero drives it. A ``Shape`` is a pipeline candidate without its partition: the
data-parallel degree ``d`` (identical replicas: ``d`` divides every device group's count) and
so the pipeline degree ``p``, the order of the device groups along the pipeline (each replica
takes a node-contiguous slice of every group, so neighbours share a node where they can), the
micro-batch size and count, and the schedule (planner.pipeline.SCHEDULES). ``layout`` gives a
shape its ranks, stages, budgets and held micro-batches and a lower bound on its step (every
rank's share of the model's compute in proportion to its speed, plus the schedule's bubble);
``partition`` balances its stages ([Note: partition by dynamic programming]) and estimates
its step: the busiest rank's compute plus the schedule's bubble at equal stages
(``bubble_ratio``), plus the longest tail (all-reduce and optimizer step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import permutations

from memtrain.cluster.spec import ClusterSpec, DeviceSpec, HostSpec, NvmeSpec
from memtrain.planner import pipeline
from memtrain.planner.measured import MeasuredPipeline
from memtrain.planner.plan import Op
from memtrain.planner.simulate_pipeline import REDUCE_BUCKET_ELEMS, Link, zero2_exposed_s
from memtrain.planner.stage_cost import StageBudget, StageEstimate, StageModel
from memtrain.planner.stats import ModelStats
from memtrain.units import format_bytes

__all__ = ["Shape", "Candidate", "bubble_ratio", "in_flight", "in_backward", "partition_min_max", "allreduce_time_s", "link_between",
           "flat_devices", "device_groups", "stage_budgets", "shapes", "layout", "partition", "why_not",
           "INTRA_NODE_LATENCY_S", "INTER_NODE_LATENCY_S", "MAX_MICROBATCH_SIZES", "MAX_EXACT_PASSES"]

INTRA_NODE_LATENCY_S = 10e-6
"""Fixed cost of one p2p transfer between GPUs of one node (a PCIe DMA, as planner.cost's
``PCIE_LATENCY_S``)."""
INTER_NODE_LATENCY_S = 30e-6
"""Fixed cost of one transfer between nodes: a few µs of wire and switch plus the NCCL proxy's
send/receive handshake, ~20-50 µs for small messages over 100 Gb/s Ethernet or InfiniBand."""
MAX_MICROBATCH_SIZES = 4
"""Micro-batch sizes tried per data-parallel degree (the smallest divisors of the replica's batch)."""
_MAX_V_TASKS = 256
"""V schedules' bubble comes from their list scheduler on unit times, for p × m up to this."""
MAX_GREEDY_TASKS = 4096
"""ZB-H1 and the V schedules come from a list scheduler whose time grows with p × m (about a
second at 64 × 64): past this they are not tried."""
MAX_EXACT_PASSES = 6000
"""A candidate with more passes than this is simulated over fewer micro-batches and extrapolated
(planner.hetero_plan [Note: pipeline step])."""


@dataclass(frozen=True, slots=True)
class Shape:
    """Everything about a pipeline candidate but its partition."""

    data_parallel: int
    pipeline: int
    order: tuple[str, ...]
    """Device kinds along the pipeline."""
    micro_batch_size: int
    num_microbatches: int
    schedule: str

    @property
    def stages_per_rank(self) -> int:
        return 2 if self.schedule in ("interleaved-1f1b", "v-half", "v-min") and self.pipeline > 1 else 1

    def describe(self) -> str:
        kinds = "→".join(self.order)
        return (f"pp {self.pipeline} × dp {self.data_parallel}, {self.schedule}, micro-batch {self.micro_batch_size} "
                f"× {self.num_microbatches}, {kinds}")


@dataclass(slots=True)
class Candidate:
    """A shape with its partition and its figures (estimated, then simulated)."""

    shape: Shape
    ranks: list[tuple[int, DeviceSpec, HostSpec, NvmeSpec | None, StageBudget]]
    """Replica 0's ranks in pipeline order: (node index, device, host, nvme, budget)."""
    replicas: list[list[int]]
    """Per replica, the indices of its devices in the cluster's flat device list, pipeline order."""
    stage_ranks: tuple[int, ...]
    partition: tuple[tuple[int, int], ...] = ()
    estimates: list[StageEstimate] = field(default_factory=list)
    in_flight: list[int] = field(default_factory=list)
    in_bw: list[int] = field(default_factory=list)
    """Per stage, the micro-batches it holds between ``B`` and ``W`` at its peak (``in_backward``)."""
    where: list[int] = field(default_factory=list)
    ar_links: list[Link] = field(default_factory=list)
    """Per pipeline rank, the slowest link of the ring its replicas all-reduce over."""
    estimate_s: float = math.inf
    bound_s: float = 0.0
    model: StageModel | None = None
    problem: str = ""
    """Why it cannot run ('' when it can)."""
    fixed: tuple[tuple[int, int], ...] = ()
    """A partition given by the user (config ``parallel.partition``): used as is, not searched."""


def bubble_ratio(kind: str, p: int, m: int, *, bound: bool = False) -> float | None:
    """Idle over busy time of the busiest rank at equal stages: (p-1)/m for GPipe and 1F1B
    (Narayanan et al. 2021, Sec. 2.2: bubble (p-1)/(m+p-1) of the step), halved by two
    interleaved stages per rank (ibid.), (p-1)/(3m) for ZB-H1 with F = B = W (Qi et al. 2023,
    Sec. 3: (p-1)(F+B-W)); the V schedules' from their list scheduler run on unit times, or
    with ``bound`` ZB-H1's, the least of any. None for a list-scheduled one too long to make here."""
    if p == 1:
        return 0.0
    if kind in ("gpipe", "1f1b"):
        return (p - 1) / m
    if kind == "interleaved-1f1b":
        return (p - 1) / (2 * m)
    if kind == "zb-h1" or bound:
        return (p - 1) / (3 * m) if p * m <= MAX_GREEDY_TASKS else None
    if p * m > _MAX_V_TASKS:
        return None
    return _v_ratio(kind, p, m)


_V_RATIOS: dict[tuple[str, int, int], float] = {}


def _v_ratio(kind: str, p: int, m: int) -> float:
    if (kind, p, m) not in _V_RATIOS:
        place = pipeline.placement(kind, p)
        times = pipeline.pass_times(pipeline.generate(kind, p, m), place, {Op.F: 1.0, Op.B: 1.0, Op.W: 1.0})
        step = max(e for _, e in times.values())
        busy = 3.0 * m * 2
        _V_RATIOS[(kind, p, m)] = step / busy - 1.0
    return _V_RATIOS[(kind, p, m)]


def in_flight(kind: str, p: int, m: int, rank: int) -> int:
    """Micro-batches whose activations one of ``rank``'s stages holds at its peak: all for
    GPipe, ``p - rank`` for 1F1B (its warm-up plus one), 1F1B's peak for ZB-H1, and for the
    two-stage schedules the rank's limit (planner.pipeline) shared by its two stages."""
    if kind == "gpipe":
        return m
    if kind == "1f1b" or p == 1:
        return min(p - rank, m)
    if kind == "interleaved-1f1b":
        held = min((p - rank - 1) * 2 + p, 2 * m) + 1
        return min(-(-held // 2), m)
    limit = pipeline.activation_limits(kind, p)[rank]
    return min(limit if kind == "zb-h1" else -(-limit // 2), m)


_IN_BACKWARD: dict[tuple[str, int, int], tuple[int, ...]] = {}


def in_backward(kind: str, p: int, m: int, rank: int) -> int:
    """Under a split backward, the micro-batches one of ``rank``'s stages holds between its ``B``
    and its ``W`` at most (planner.stage_cost [Note: activations between B and W]), read from the
    schedule's list (a V's two stages share the rank's count, as ``in_flight``); 0 without a
    split. ZB-H1's list repeats itself after ``2p + 2`` micro-batches, so a longer one is read
    from that many; a V too long to make here (not planned, ``layout``) gets ``in_flight``'s
    count (``B`` to ``W`` lies within ``F`` to ``W``)."""
    if kind not in pipeline.SPLIT_W_SCHEDULES:
        return 0
    if kind == "zb-h1":
        m = min(m, 2 * p + 2)
    elif p * m > _MAX_V_TASKS:
        return in_flight(kind, p, m, rank)
    key = (kind, p, m)
    if key not in _IN_BACKWARD:
        per_stage = 2 if kind in ("v-half", "v-min") else 1
        counts = []
        for r, program in sorted(pipeline.generate(kind, p, m).items()):
            between = most = 0
            for a in program:
                between += (a.op is Op.B) - (a.op is Op.W)
                most = max(most, between)
            counts.append(min(-(-most // per_stage), m))
        _IN_BACKWARD[key] = tuple(counts)
    return _IN_BACKWARD[key][rank]


def partition_min_max(num_blocks: int, num_stages: int,
                      stage_cost: Callable[[int, int, int], float]) -> tuple[float, tuple[tuple[int, int], ...]]:
    """[Note: partition by dynamic programming] The contiguous partition of ``num_blocks`` blocks
    into ``num_stages`` non-empty stages whose costliest stage (``stage_cost(stage, first,
    end)``) is cheapest, and that cost (inf when none fits). ``best[s][j]``: the cheapest
    costliest stage of stages ``0..s`` over blocks ``[0, j)`` = min over ``i`` of
    max(best[s-1][i], cost(s, i, j)). The first term grows with ``i`` and the second shrinks
    (fewer blocks cost no more), so the best ``i`` is where they cross and moves right as ``j``
    grows: one pointer per stage walks it, O(stages × blocks) costs in all."""
    n, k = num_blocks, num_stages
    if k > n:
        return math.inf, ()
    best = [stage_cost(0, 0, j) if 1 <= j <= n - k + 1 else math.inf for j in range(n + 1)]
    split: list[list[int]] = [[0] * (n + 1)]
    for s in range(1, k):
        cur = [math.inf] * (n + 1)
        cuts = [0] * (n + 1)
        i = s
        for j in range(s + 1, n - k + s + 2):
            i = max(i, s)
            here = max(best[i], stage_cost(s, i, j))
            while i + 1 < j:
                nxt = max(best[i + 1], stage_cost(s, i + 1, j))
                if nxt > here:
                    break
                i, here = i + 1, nxt
            cur[j], cuts[j] = here, i
        best = cur
        split.append(cuts)
    if math.isinf(best[n]):
        return math.inf, ()
    bounds, end = [], n
    for s in range(k - 1, -1, -1):
        first = split[s][end] if s else 0
        bounds.append((first, end))
        end = first
    return best[n], tuple(reversed(bounds))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def flat_devices(cluster: ClusterSpec) -> list[tuple[int, DeviceSpec]]:
    return [(i, dev) for i, node in enumerate(cluster.nodes) for dev in node.devices]


def device_groups(devices: Sequence[tuple[int, DeviceSpec]]) -> dict[DeviceSpec, str]:
    """Devices with the same figures form a group, named by kind (``rtx4090#2`` for a second
    group of one kind with other figures)."""
    out: dict[DeviceSpec, str] = {}
    for _, dev in devices:
        if dev not in out:
            same = sum(1 for d in out if d.kind == dev.kind)
            out[dev] = dev.kind if not same else f"{dev.kind}#{same + 1}"
    return out


def link_between(cluster: ClusterSpec, a: tuple[int, DeviceSpec], b: tuple[int, DeviceSpec],
                 measured: MeasuredPipeline | None = None) -> Link:
    """Between two devices (node index, spec): the link ``measured`` on the workers where it
    has one for two devices of their kind (planner.measured [Note: measured pipeline]); else over
    PCIe on one node (the slower end's copy bandwidth), else the network."""
    if measured is not None and a[1].kind == b[1].kind == measured.device_kind:
        link = measured.link_for(a[0] == b[0])
        if link is not None:
            return link
    if a[0] == b[0]:
        return Link(gbps=min(a[1].d2h_gbps, b[1].h2d_gbps), latency_s=INTRA_NODE_LATENCY_S)
    return Link(gbps=cluster.network_gbps, latency_s=INTER_NODE_LATENCY_S)


def allreduce_time_s(num_bytes: int, num_replicas: int, link: Link) -> float:
    """Ring all-reduce: 2(d-1)/d of the bytes over the slowest link, 2(d-1) messages (Patarasuk
    and Yuan 2009, bandwidth-optimal all-reduce)."""
    d = num_replicas
    if d <= 1 or num_bytes <= 0:
        return 0.0
    return 2 * (d - 1) * link.latency_s + 2 * (d - 1) / d * num_bytes / (link.gbps * 1e9)


def reduce_time_s(model: StageModel, schedule: str, est: StageEstimate, num_params: int, num_replicas: int,
                  link: Link, w_share: float = 0.5) -> float:
    """A stage's gradient sum over the replicas after its last pass: a ring all-reduce (ZeRO-1: a
    reduce-scatter and an all-gather, the same time); under ZeRO-2 the all-gather and what the
    stage's last gradient pass does not hide of the reduce-scatter (planner.hetero_plan [Note:
    ZeRO at the step's end]; its buckets: planner.simulate_pipeline ``REDUCE_BUCKET_ELEMS``)."""
    full = allreduce_time_s(4 * num_params, num_replicas, link)
    if model.zero != 2:  # an offloaded stage's chunks too (runtime.stage_offload_zero), counted as buckets
        return full
    # the last gradient pass: W (``w_share`` of the split backward, StageModel.w_share, as
    # planner.hetero_plan's _stage_costs takes it), or the whole B
    split = schedule in ("zb-h1", "v-half", "v-min")
    pass_s = (est.bwd_s - est.recompute_s) * w_share if split else est.bwd_s
    return full / 2 + zero2_exposed_s(full / 2, pass_s, -(-num_params // REDUCE_BUCKET_ELEMS))


def stage_budgets(cluster: ClusterSpec, devices, margin: float, device_budget: int | None, host_budget: int | None,
             nvme_budget: int | None) -> list[StageBudget]:
    """Per device, its usable memory and its share of its node's host memory and NVMe."""
    per_node = [len(node.devices) for node in cluster.nodes]
    out = []
    for node_i, dev in devices:
        node = cluster.nodes[node_i]
        dev_b = min(dev.memory_bytes, device_budget) if device_budget is not None else dev.memory_bytes
        host_b = host_budget if host_budget is not None else node.host.memory_bytes
        nvme_b = 0 if node.nvme is None else (nvme_budget if nvme_budget is not None else node.nvme.capacity_bytes)
        share = per_node[node_i]
        out.append(StageBudget(device=int(dev_b * (1 - margin)), host=int(host_b * (1 - margin)) // share,
                               nvme=int(nvme_b * (1 - margin)) // share))
    return out


def shapes(stats: ModelStats, counts: Mapping[str, list[int]], global_batch_size: int, micro_batch_size: int,
            schedules: Sequence[str], pipeline_degree: int | None, data_parallel_degree: int | None,
            num_microbatches: int = 0):
    """Every shape over the device groups ``counts``; a given micro-batch size or count (else
    the ``MAX_MICROBATCH_SIZES`` smallest sizes) and degrees are kept to."""
    n = sum(len(v) for v in counts.values())
    blocks = len(stats.blocks)
    common = math.gcd(*(len(v) for v in counts.values()))
    kinds = list(counts)
    orders = list(permutations(kinds)) if len(kinds) <= 3 else [tuple(kinds), tuple(reversed(kinds))]
    for d in _divisors(common):
        p = n // d
        if (data_parallel_degree is not None and d != data_parallel_degree) or \
                (pipeline_degree is not None and p != pipeline_degree) or p > blocks or global_batch_size % d:
            continue
        per_replica = global_batch_size // d
        sizes = [micro_batch_size] if micro_batch_size else _divisors(per_replica)[:MAX_MICROBATCH_SIZES]
        if num_microbatches:
            sizes = [per_replica // num_microbatches] if per_replica % num_microbatches == 0 else []
            sizes = [b for b in sizes if not micro_batch_size or b == micro_batch_size]
        if micro_batch_size and per_replica % micro_batch_size:
            continue
        for order in orders if p > 1 else orders[:1]:
            for mbs in sizes:
                m = per_replica // mbs
                for kind in schedules if p > 1 else ("1f1b",):
                    if kind == "interleaved-1f1b" and (m % p or 2 * p > blocks):
                        continue
                    if kind in ("v-half", "v-min") and 2 * p > blocks:
                        continue
                    yield Shape(data_parallel=d, pipeline=p, order=order, micro_batch_size=mbs,
                                num_microbatches=m, schedule=kind)


def layout(shape: Shape, counts: Mapping[str, list[int]], devices, cluster: ClusterSpec,
            budgets: Sequence[StageBudget], model: StageModel) -> Candidate | None:
    """The shape's ranks (replica j takes the j-th node-contiguous slice of every kind, kinds in
    the shape's order), its stages, their budgets and held micro-batches, all-reduce times, and
    the lower bound of its step."""
    d, p, m = shape.data_parallel, shape.pipeline, shape.num_microbatches
    ratio = bubble_ratio(shape.schedule, p, m, bound=True)
    if ratio is None or (shape.schedule in ("v-half", "v-min") and p * m > _MAX_V_TASKS):
        return None
    replicas: list[list[int]] = []
    for j in range(d):
        ids: list[int] = []
        for kind in shape.order:
            members = counts[kind]
            size = len(members) // d
            ids += members[j * size:(j + 1) * size]
        replicas.append(ids)
    ranks = []
    for idx in replicas[0]:
        node_i, dev = devices[idx]
        node = cluster.nodes[node_i]
        ranks.append((node_i, dev, node.host, node.nvme, budgets[idx]))
    place = pipeline.placement(shape.schedule, p, 2) if p > 1 else pipeline.Placement((0,))
    v = shape.stages_per_rank
    cand = Candidate(shape=shape, ranks=ranks, replicas=replicas, stage_ranks=place.rank_of, model=model)
    for s, r in enumerate(place.rank_of):
        node_i, dev, host, nvme, budget = ranks[r]
        share = StageBudget(device=budget.device // v, host=budget.host // v, nvme=budget.nvme // v)
        cand.where.append(model.place(dev, host, nvme, share))
        cand.in_flight.append(in_flight(shape.schedule, p, m, r))
    # all-reduce of each pipeline rank's gradients (fp32 accumulators) over its replicas' devices
    per_node: dict[int, int] = {}
    for idx in replicas[0]:
        per_node[devices[idx][0]] = per_node.get(devices[idx][0], 0) + 1
    for r in range(p):
        ring = [devices[rep[r]] for rep in replicas]
        crosses = len({a[0] for a in ring}) > 1
        # across nodes, the node's devices all-reduce at once and share its network
        sharing = len(cluster.nodes[ring[0][0]].devices)
        measured = model.measured.link_for(not crosses) if model.measured is not None else None
        if measured is not None and all(dev.kind == model.measured.device_kind for _, dev in ring):
            cand.ar_links.append(measured)
        else:
            cand.ar_links.append(Link(gbps=cluster.network_gbps / sharing, latency_s=INTER_NODE_LATENCY_S)
                                 if crosses else link_between(cluster, ring[0], ring[0]))
    # bound: the model's compute spread over the ranks by speed, the schedule's bubble on top
    full = [model.compute_s(dev, 0, model.num_blocks) for _, dev, _, _, _ in ranks]
    share = model.num_params(0, model.num_blocks) // p  # the average rank's parameters: its all-reduce
    tail = min(allreduce_time_s(4 * share, d, link) for link in cand.ar_links)
    walk = min(model.rng_walk_s(r[1], d, m) for r in ranks)  # planner.stage_cost [Note: the dropout walk]
    cand.bound_s = (m / sum(1.0 / t for t in full) * (1 + ratio) + tail + model.step_overhead_s([r[1] for r in ranks])
                    + walk)
    return cand


def partition(cand: Candidate) -> None:
    shape, model = cand.shape, cand.model
    assert model is not None
    m = shape.num_microbatches
    p = shape.pipeline

    canon, estimate = model.range_ids, model.estimate
    # made here, for the candidates not pruned: a long zb-h1 list is made to read it
    cand.in_bw = [in_backward(shape.schedule, p, m, r) for r in cand.stage_ranks]
    keys = [(cand.where[s], cand.in_flight[s], cand.in_bw[s], cand.stage_ranks[s])
            for s in range(len(cand.stage_ranks))]
    seen: dict[tuple, float] = {}

    def stage_cost(s: int, first: int, end: int) -> float:
        key = (canon[first][end],) + keys[s]
        got = seen.get(key)
        if got is None:
            est = estimate(first, end, cand.where[s], cand.in_flight[s], m, cand.in_bw[s])
            got = math.inf if not est.fits else est.work_s(m) + reduce_time_s(
                model, shape.schedule, est, model.num_params(first, end), shape.data_parallel,
                cand.ar_links[cand.stage_ranks[s]], model.w_share(first, end, cand.ranks[cand.stage_ranks[s]][1]))
            seen[key] = got
        return got

    if cand.fixed:
        bounds = cand.fixed
        for s, (first, end) in enumerate(bounds):
            if math.isinf(stage_cost(s, first, end)):
                cand.problem = why_not(cand, s, first, end)
                return
    else:
        _, bounds = partition_min_max(model.num_blocks, len(cand.stage_ranks), stage_cost)
    if not bounds:
        cand.problem = why_not(cand)
        return
    cand.partition = bounds
    cand.estimates = [model.estimate(f, e, cand.where[s], cand.in_flight[s], m, cand.in_bw[s])
                      for s, (f, e) in enumerate(bounds)]
    busy = [0.0] * p
    tail = [0.0] * p
    for s, est in enumerate(cand.estimates):
        r = cand.stage_ranks[s]
        busy[r] += m * (est.fwd_s + est.bwd_s)
        # an offloaded stage's fetch counted whole here; the simulation puts it before the first forward
        tail[r] += est.fetch_s + est.tail_s + reduce_time_s(
            model, shape.schedule, est, model.num_params(*bounds[s]), shape.data_parallel, cand.ar_links[r],
            model.w_share(*bounds[s], cand.ranks[r][1]))
    ratio = bubble_ratio(shape.schedule, p, m) or 0.0
    walk = max(model.rng_walk_s(r[1], shape.data_parallel, m) for r in cand.ranks)  # [Note: the dropout walk]
    cand.estimate_s = max(busy) * (1 + ratio) + max(tail) + model.step_overhead_s([r[1] for r in cand.ranks]) + walk


def why_not(cand: Candidate, *stage: int) -> str:
    """What does not fit, for a shape without a partition: the first stage that cannot hold even
    an equal share of the blocks; or for ``stage`` (its index, first and end block) that one."""
    model = cand.model
    assert model is not None
    k = len(cand.stage_ranks)
    size = max(1, model.num_blocks // k)
    for s in range(k):
        first = min(s * size, model.num_blocks - 1)
        end = model.num_blocks if s == k - 1 else min(first + size, model.num_blocks)
        if stage:
            s, first, end = stage
        est = model.estimate(first, end, cand.where[s], cand.in_flight[s], cand.shape.num_microbatches,
                             cand.in_bw[s])
        if not est.fits:
            _, dev, _, _, budget = cand.ranks[cand.stage_ranks[s]]
            return (f"stage {s} (blocks {first}-{end - 1}) on {dev.kind}: needs {format_bytes(est.device_bytes)} of "
                    f"device memory with {format_bytes(est.host_bytes)} host and {format_bytes(est.nvme_bytes)} NVMe "
                    f"offload; has {format_bytes(budget.device)} device, {format_bytes(budget.host)} host, "
                    f"{format_bytes(budget.nvme)} NVMe")
    return "no partition fits every stage's memory"
