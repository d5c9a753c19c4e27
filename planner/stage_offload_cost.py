"""What a pipeline stage whose model states are offloaded costs: the runtime's residency, not streaming.

[Note: an offloaded stage's residency] A stage offloaded to the host or NVMe
(``PipelineSpec.offload``, runtime.stage_offload [Note: a stage's step]) does not stream its
blocks through the device as the single-device engine does: its ``PREFETCH`` fetches every chunk
into a param buffer that stays on the device for the whole step (a pipeline stage interleaves
micro-batches), the backward accumulates the gradients on the parameters, and only its
``OFFLOAD`` moves them home and releases the buffers. So, for ``n`` parameters (``d`` the ZeRO
copies its states are sharded over, ``o`` optimizer-state bytes per element):

- device, for the whole step: the param buffers and the gradients, ``2 · 4 · n`` (a pipeline's
  parameters and gradients are fp32 whatever ``train.dtype``, bf16 being autocast, and its chunk
  store is fp32), beside the held micro-batches' activations and the backward's workspace;
  after the passes, one chunk's grad buffer at a time while the later chunks' param buffers are
  held (``OFFLOAD``: ``home_policy``; chunks of about a block, the runtime's default) and, over data-parallel copies
  under ZeRO-0/1, the all-reduce's flat copy of the gradients (``4 · n``, comm ``all_reduce_``;
  planner.hetero_plan charges it, knowing the copies), under ZeRO-2 one chunk's copy for its
  reduce (``placed``);
- host home: the fp32 masters of every parameter and the gradient accumulators and optimizer
  states of the ``⌈n / d⌉`` it updates, ``4 · n + ⌈n / d⌉ · (4 + o)``;
- NVMe home: on disk the masters and its share's states, ``4 · n + ⌈n / d⌉ · o`` (once its chunks
  are known, ``placed``: as files, 4 KiB header and pages, and the optimizer's ``WRITE_BACKS``
  largest chunks' files twice, old and new); on the host the
  larger of ``PREFETCH``'s staging of every chunk (``4 · n``) and, at the step's end, its share's
  accumulators with the optimizer's staged chunks (one read ahead, one stepping, one written
  back, ``3 · chunk · (4 + o)``, at most its share's);
- time: the fetch (host to device, NVMe read first) once per step, where the runtime runs it:
  ``PREFETCH``, before the stage's first action in its rank's program, the stage's first
  forward waiting for it (``StageEstimate.fetch_s``; the pipeline simulator puts it on the rank's
  copy stream, the compute stream on a CPU device: planner.simulate_pipeline); the gradients'
  copy home once per step, not per micro-batch, in the step's tail with the CPU update of its
  share (and, on NVMe, the share's states read and written and the others' masters written);
  the passes the blocks' compute alone.

The home is ``memory.offload``'s when it names one (``StageModel(home=...)``), else the host
when the host budget holds the stage, else NVMe. ``memory.offload: nvme`` on a cluster that
lists no NVMe (a Ray cluster's inventory) is planned with the files' room and disk time unknown:
``parallel.nvme_dir`` holds them. A stage whose resident parameters and
gradients do not fit its device is not planned as fitting (planner.hetero then tries another
partition, or refuses naming the rank and tier).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from memtrain.cluster.spec import DeviceSpec, HostSpec, NvmeSpec
from memtrain.planner import cost
from memtrain.planner.plan import ActPolicy, ChunkPlan, MemoryPolicy, Tier, pack_params
from memtrain.planner.stage_estimate import StageBudget, StageEstimate, stage_stats

StageModel = Any
"""planner.stage_cost's ``StageModel``, which imports this module (so not imported here)."""

__all__ = ["PARAM_BYTES", "OPTIM_STAGED_CHUNKS", "WRITE_BACKS", "offloaded_estimate", "home_policy", "placed",
           "split_owners", "Chunked"]

PARAM_BYTES = 4
"""Bytes of one parameter (and of its gradient) of a pipeline stage on the device: fp32."""
WRITE_BACKS = 2
"""An NVMe stage's chunks whose files are rewritten at once while its optimizer steps, each
file's new copy beside the old until renamed (measured on the tiny GPT: both chunks of a stage)."""
OPTIM_STAGED_CHUNKS = 3
"""An NVMe stage's chunks in host staging while its optimizer steps (runtime.stage_offload:
``staged_chunks=2``, one read ahead and one write-back in flight, and the one stepping)."""


def split_owners(sizes: list[int], dp: int) -> list[int]:
    """Per item (its elements ``sizes``, in order), the replica keeping its optimizer states: the
    one whose ``1 / dp`` share of all the elements holds the item's middle (runtime.stage_offload
    ``split_owners``, the same rule: each replica a contiguous run of about ``1 / dp``)."""
    total, acc, out = max(sum(sizes), 1), 0, []
    for n in sizes:
        out.append(min(dp - 1, (2 * acc + n) * dp // (2 * total)))
        acc += n
    return out


@dataclass(frozen=True, slots=True)
class Chunked:
    """An offloaded stage's chunks as the runtime lays them out (``home_policy``)."""

    policy: MemoryPolicy
    after_bytes: int
    """``OFFLOAD``'s grad buffer at its most above the param buffers still held."""
    own: int
    """Elements whose accumulators and optimizer states the busiest replica keeps (all without ZeRO)."""
    largest: int
    """Elements of the largest chunk."""
    runs: tuple[tuple[int, ...], ...] = ()
    """Per ZeRO copy, the elements of each chunk of its run (one run of every chunk without ZeRO)."""


def home_policy(model: StageModel, first: int, end: int, home: Tier, recompute: bool) -> Chunked:
    """The stage's chunks as the runtime lays them out (runtime.stage_offload ``_chunk_plans``):
    its blocks' parameters split in order into one run per ZeRO copy (``split_owners``), each run
    packed in chunks of about a block (the runtime's default), every chunk homed at ``home``
    (runtime.distributed ``stage_homes`` reads the home from the policy), every block's
    activations kept or recomputed. ``OFFLOAD`` takes the chunks in order, a chunk of the
    replica's own getting a grad buffer while the param buffers of those after it are still held:
    ``4 · max (chunk - chunks before it)`` above the param buffers, at its most on the first
    replica (its chunks come first)."""
    sub = stage_stats(model.stats, first, end)
    size = max((b.num_params for b in sub.blocks), default=1) or 1
    flat = [(j, name, k) for j, b in enumerate(sub.blocks) for name, k in zip(b.param_names, b.param_numels)]
    owner = split_owners([k for _, _, k in flat], model.shards)
    chunks: list[ChunkPlan] = []
    over, before, own = 0, 0, 0
    runs: list[int] = []  # chunks per replica's run
    for d in range(model.shards):
        runs.append(0)
        run = [[(name, k) for (j2, name, k), o in zip(flat, owner) if j2 == j and o == d] for j in range(len(sub.blocks))]
        own = max(own, sum(k for (_, _, k), o in zip(flat, owner) if o == d))
        for names, k in pack_params([g for g in run if g], size):
            chunks.append(ChunkPlan(index=len(chunks), num_elems=k, param_names=tuple(names), home=home))
            runs[-1] += 1
            if d == 0:
                over = max(over, k - before)
            before += k
    act = ActPolicy.RECOMPUTE if recompute else ActPolicy.KEEP
    policy = MemoryPolicy(chunk_size_elems=size, chunks=tuple(chunks), prefetch_depth=max(1, len(chunks)),
                          activations=(act,) * (end - first))
    starts = [sum(runs[:d]) for d in range(len(runs))]
    by_run = tuple(tuple(c.num_elems for c in chunks[a:a + k]) for a, k in zip(starts, runs))
    return Chunked(policy=policy, after_bytes=PARAM_BYTES * over, own=own,
                   largest=max((c.num_elems for c in chunks), default=0), runs=by_run)


def placed(model: StageModel, est: StageEstimate, first: int, end: int, host: HostSpec,
           nvme: NvmeSpec | None) -> StageEstimate:
    """An offloaded stage's estimate with its chunks (``home_policy``): the plan's policy, the
    exact grad-buffer bytes of its ``OFFLOAD`` and, under ZeRO, the busiest replica's share of
    whole parameters instead of ``⌈n / d⌉`` (the screening estimate's). Under ZeRO-2 the copy
    after the passes is the larger of that and one chunk's flat copy taken for its reduce while
    the gradients are still whole (runtime.stage_offload_zero: each chunk's ``.grad`` is dropped
    as its copy is taken, so one copy at a time is more than the gradients)."""
    on_nvme = "params off the device, on NVMe" in est.offload
    laid = home_policy(model, first, end, Tier.NVME if on_nvme else Tier.HOST,
                       est.offload.startswith("activations recomputed"))
    if est.policy is not None:  # activations swapped (memory.activations): their policy stays
        laid = dataclasses.replace(laid, policy=dataclasses.replace(laid.policy, activations=est.policy.activations))
    n = model.num_params(first, end)
    more = laid.own - -(-n // model.shards)
    o = cost.optimizer_state_bytes_per_elem(model.optimizer)
    host_bytes, nvme_bytes = est.host_bytes, est.nvme_bytes
    if on_nvme:  # in files (header, 4 KiB pages): every chunk's master, its run's states, and the
        # optimizer's write-backs in flight, each file's new copy beside the old until renamed; the
        # busiest copy's run (split_owners may give one copy more than another)
        states = o // 4
        files = [cost.nvme_file_bytes(PARAM_BYTES * c.num_elems) for c in laid.policy.chunks]

        def run_bytes(run: tuple[int, ...]) -> int:
            mine = sorted((cost.nvme_file_bytes(PARAM_BYTES * k) for k in run), reverse=True)
            return states * sum(mine) + (1 + states) * sum(mine[:WRITE_BACKS])

        nvme_bytes = sum(files) + max((run_bytes(r) for r in laid.runs), default=0)
    else:
        host_bytes += more * (4 + o)
    tail = est.tail_s + (cost.cpu_optimizer_time_s(laid.own, model.optimizer, host)
                         - cost.cpu_optimizer_time_s(-(-n // model.shards), model.optimizer, host))
    if on_nvme and nvme is not None and more:
        tail += cost.disk_read_time_s(more * (4 + o), nvme) + cost.disk_write_time_s(more * (4 + o), nvme)
    after = max(laid.after_bytes, PARAM_BYTES * laid.largest if model.zero == 2 else 0)
    return dataclasses.replace(est, policy=laid.policy, after_bytes=after, host_bytes=host_bytes,
                               nvme_bytes=nvme_bytes, tail_s=tail)


def offloaded_estimate(model: StageModel, n: int, f_s: float, b_s: float, base: int, device: DeviceSpec,
                       host: HostSpec, nvme: NvmeSpec | None, budget: StageBudget, first: int, end: int,
                       held: int, recompute: bool) -> StageEstimate:
    """Blocks ``[first, end)`` (``n`` parameters, ``f_s``/``b_s`` a micro-batch's forward and
    backward, ``base`` the device bytes of its held activations and workspace) with their states
    offloaded whole ([Note: an offloaded stage's residency])."""
    d = model.shards
    o = cost.optimizer_state_bytes_per_elem(model.optimizer)
    own = -(-n // d)
    chunk = model.max_block_params(first, end)
    host_home_bytes = PARAM_BYTES * n + own * (4 + o)
    on_host = model.home == "host" or (model.home != "nvme" and host_home_bytes <= budget.host)
    if on_host:
        host_bytes, nvme_bytes = host_home_bytes, 0
    else:
        nvme_bytes = PARAM_BYTES * n + own * o
        host_bytes = max(PARAM_BYTES * n, 4 * own + min(OPTIM_STAGED_CHUNKS * chunk, own) * (4 + o))
    resident = 2 * PARAM_BYTES * n
    after = PARAM_BYTES * chunk
    device_bytes = base + resident
    # memory.offload: nvme on a cluster that lists no NVMe: the run's parallel.nvme_dir holds the
    # files (runtime.distributed stage_homes requires it); their room and speed are not known here
    nvme_ok = nvme_bytes <= budget.nvme if nvme is not None else model.home == "nvme"
    fits = max(base, after) + resident <= budget.device and host_bytes <= budget.host and (on_host or nvme_ok)
    fetch = cost.h2d_time_s(PARAM_BYTES * n, device)
    tail = cost.d2h_time_s(PARAM_BYTES * n, device) + cost.cpu_optimizer_time_s(own, model.optimizer, host)
    if not on_host and nvme is not None:
        fetch += cost.disk_read_time_s(PARAM_BYTES * n, nvme)  # the fetch reads the masters first
        tail += cost.disk_read_time_s(own * (4 + o), nvme) + cost.disk_write_time_s(own * (4 + o), nvme)
        tail += cost.disk_write_time_s(PARAM_BYTES * (n - own), nvme)  # the others' masters, gathered
    what = [f"{n:,} params off the device, on {'the host' if on_host else 'NVMe'}"]
    if recompute:
        what.insert(0, "activations recomputed")
    if not max(base, after) + resident <= budget.device:
        what.append(f"its parameters and gradients, resident for the step, need {resident:,} B of device memory "
                    f"beside {max(base, after):,} B of activations and workspace, over its budget of "
                    f"{budget.device:,} B")
    if host_bytes > budget.host:
        what.append(f"its states need {host_bytes:,} B of host memory, over its share of {budget.host:,} B")
    if not on_host and nvme is None and model.home != "nvme":
        what.append("no NVMe path on its node (cluster.nodes[].nvme)")
    elif not on_host and nvme is not None and nvme_bytes > budget.nvme:
        what.append(f"its states need {nvme_bytes:,} B of NVMe, over its share of {budget.nvme:,} B")
    return StageEstimate(fwd_s=f_s, bwd_s=b_s, tail_s=tail, device_bytes=device_bytes, host_bytes=host_bytes,
                         nvme_bytes=nvme_bytes, act_bytes=held, offload=", ".join(what), fits=fits, after_bytes=after,
                         fetch_s=fetch)
