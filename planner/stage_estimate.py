"""What the pipeline planner says of one stage on one device (``StageEstimate``), the budget it
has (``StageBudget``) and a range of blocks as a model of its own (``stage_stats``): the types
planner.stage_cost and planner.stage_offload_cost share, apart so neither imports the other."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from memtrain.planner.plan import MemoryPolicy
from memtrain.planner.stats import BlockStats, ModelStats, dtype_bytes

__all__ = ["StageBudget", "StageEstimate", "stage_stats"]


@dataclass(frozen=True, slots=True)
class StageBudget:
    """Usable bytes of one stage's device, its share of the node's host memory and NVMe."""

    device: int
    host: int
    nvme: int


@dataclass(frozen=True, slots=True)
class StageEstimate:
    """One stage on one device, per micro-batch of the plan's size."""

    fwd_s: float
    bwd_s: float
    """The whole backward (input and weight gradients), recompute included."""
    tail_s: float
    """The optimizer step after the stage's last backward (an offloaded stage's: with the copy
    home and, on NVMe, the states' reads and writes; not its fetch, ``fetch_s``)."""
    device_bytes: int
    """Peak device bytes: states, buffers, the held micro-batches' activations, workspace."""
    host_bytes: int
    nvme_bytes: int
    act_bytes: int
    """Device bytes one held micro-batch's activations take under the stage's policy."""
    offload: str
    """'' when everything stays on the device, else what moves (for reports)."""
    fits: bool
    policy: MemoryPolicy | None = None
    """For an offloaded stage, once refined, its chunks at their home and every block's
    activation policy (planner.stage_offload_cost ``home_policy``); for an estimate whose
    activations are recomputed or swapped, every block's policy and no chunks; else None
    (activations kept). The pipeline's workers run its activation policies
    (runtime.stage_activations) and keep an offloaded stage's states at its chunks' home
    (runtime.distributed ``stage_homes``)."""
    bw_bytes: int = 0
    """Under a split backward, device bytes one micro-batch holds from its ``B`` to its ``W`` on
    top of ``act_bytes`` ([Note: activations between B and W]); 0 otherwise."""
    recompute_s: float = 0.0
    """Of ``bwd_s``, the recomputed blocks' forward run again (a split backward's ``B`` runs it)."""
    cast_bytes: int = 0
    """Of ``device_bytes``, a bf16 keep stage's autocast weight casts: held once from its first
    forward to its last backward, with the passes, not per micro-batch and not after them
    (planner.stage_cost [Note: a bf16 stage's activations]); 0 otherwise."""
    after_bytes: int = 0
    """Device bytes held briefly after the passes, once the activations are gone, on top of
    ``device_bytes`` less them: an offloaded stage's ``OFFLOAD`` grad buffer of one chunk
    (planner.stage_offload_cost [Note: an offloaded stage's residency]); 0 otherwise."""

    fetch_s: float = 0.0
    """An offloaded stage's fetch (``PREFETCH``: its masters read from NVMe, then copied to the
    device), once a step before its first forward (planner.stage_offload_cost [Note: an
    offloaded stage's residency]); 0 for a stage on the device."""

    def work_s(self, num_microbatches: int) -> float:
        return num_microbatches * (self.fwd_s + self.bwd_s) + self.fetch_s + self.tail_s



def stage_stats(stats: ModelStats, first: int, end: int) -> ModelStats:
    """The blocks ``[first, end)`` as a model of their own. A parameter shared with a block
    outside the range (a head tied to the embedding) becomes the stage's own copy, as a
    pipeline keeps one per stage; the loss's activations belong to the last stage only."""
    owned = {n for b in stats.blocks[first:end] for n in b.param_names}
    numel = {n: k for b in stats.blocks for n, k in zip(b.param_names, b.param_numels)}
    blocks: list[BlockStats] = []
    for b in stats.blocks[first:end]:
        copies = tuple(n for n in b.shared_param_names if n not in owned and n in numel)
        if copies:
            extra = sum(numel[n] for n in copies)
            b = dataclasses.replace(
                b, param_names=b.param_names + copies, param_numels=b.param_numels + tuple(numel[n] for n in copies),
                num_params=b.num_params + extra, param_bytes=b.param_bytes + extra * dtype_bytes(stats.dtype),
                shared_param_names=tuple(n for n in b.shared_param_names if n not in copies))
            owned.update(copies)
        blocks.append(b)
    return dataclasses.replace(stats, name=f"{stats.name}[{first}:{end}]", blocks=tuple(blocks),
                               num_params=sum(b.num_params for b in blocks),
                               loss_activation_bytes=stats.loss_activation_bytes if end == len(stats.blocks) else 0)
