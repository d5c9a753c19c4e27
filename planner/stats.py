"""What analysis measures about a model: per-block parameters, saved activations and FLOPs.

These are the planner's inputs about the model (docs/DESIGN.md, data flow). Produced by
``planner.analyze``; consumed by the cost model, the search and the reports.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum

from memtrain.optimizers import Optimizer, lookup

__all__ = ["DType", "Optimizer", "BlockStats", "ModelStats", "cast_of_parameter", "dtype_bytes",
           "model_state_bytes_per_param"]


class DType(StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


def dtype_bytes(dtype: DType | str) -> int:
    return 4 if DType(dtype) is DType.FP32 else 2


def model_state_bytes_per_param(dtype: DType | str, optimizer: Optimizer | str = Optimizer.ADAMW) -> int:
    """Bytes of model states per parameter, as memtrain keeps them on the device.

    Rajbhandari et al. 2020 (ZeRO), Sec. 3.1: mixed-precision Adam keeps fp16 params (2) and
    grads (2) plus fp32 master params, momentum and variance (4+4+4 = 12): (2+2+12)Ψ = 16Ψ.
    memtrain accumulates gradients in fp32 on every tier (offload.grads [Note: fp32
    accumulators]), so mixed precision costs (2+4+12)Ψ = 18Ψ, as in Megatron-LM's default for bf16.
    fp32 Adam: params 4 + grads 4 + momentum 4 + variance 4 = 16Ψ.
    SGD (momentum buffer kept): fp32 4+4+4 = 12Ψ; mixed 2+4+4+4 = 14Ψ. The optimizer's states
    are its descriptor's (memtrain.optimizers).
    """
    optim_state = lookup(optimizer).state_bytes_per_elem  # AdamW m, v | SGD momentum, fp32 each
    if DType(dtype) is DType.FP32:
        return 4 + 4 + optim_state
    return dtype_bytes(dtype) + 4 + 4 + optim_state


@dataclass(frozen=True, kw_only=True, slots=True)
class BlockStats:
    """One block (embedding, a layer, the head): the unit of partitioning and activation policy."""

    name: str
    """Module path of the block inside the model, e.g. ``blocks.3``."""
    num_params: int
    """Parameters owned by this block (a tied parameter belongs to the first block using it)."""
    param_bytes: int
    """Bytes of those parameters in the compute dtype."""
    activation_bytes: int
    """Bytes saved for backward by one micro-batch of ``ModelStats.micro_batch_size`` sequences,
    each storage counted once, parameters and buffers excluded."""
    input_bytes: int
    """Bytes of the block's input tensor (what recompute keeps instead of the activations)."""
    output_bytes: int
    """Bytes of the block's output tensor (what crosses a pipeline stage boundary)."""
    fwd_flops: int
    """Forward FLOPs for one micro-batch (``torch.utils.flop_counter`` convention: 2 per MAC)."""
    bwd_flops: int
    """Backward FLOPs for one micro-batch (gradients for inputs and weights)."""
    param_names: tuple[str, ...] = ()
    """Fully qualified parameter names in execution order (the chunking order)."""
    param_numels: tuple[int, ...] = ()
    """Elements of each parameter in ``param_names`` (same order)."""
    saved_storage_bytes: tuple[int, ...] = ()
    """Bytes of each storage that ``activation_bytes`` sums, in the order autograd saved them
    (empty: not recorded). Their sizes tell which of them a CPU process's C heap keeps when freed
    and which it returns (planner.footprint [Note: process memory])."""
    shared_param_names: tuple[str, ...] = ()
    """Parameters an earlier block owns that this block's modules also hold (tied weights, e.g.
    a head sharing the embedding matrix): their chunks are brought in for this block too."""
    fwd_fixed_s: float = 0.0
    """Measured forward time, fixed part: ``fwd_s = fwd_fixed_s + fwd_per_sample_s × micro_batch_size``
    (a least-squares fit over the profiled micro-batch sizes). Both 0 = not measured: the cost
    model uses FLOPs and the device's peak instead."""
    fwd_per_sample_s: float = 0.0
    """Measured forward time per sequence of the micro-batch (see ``fwd_fixed_s``)."""
    bwd_fixed_s: float = 0.0
    """Measured backward time, fixed part (as ``fwd_fixed_s``)."""
    bwd_per_sample_s: float = 0.0
    """Measured backward time per sequence of the micro-batch."""
    random_elems: int = 0
    """Elements the forward's random ops draw for one micro-batch (its dropout masks: each
    dropout's input, attention dropout's b·heads·s·s); 0 without dropout. A pipeline rank
    replays them for the whole global batch each step (planner.stage_cost [Note: the dropout walk])."""
    autocast_activation_bytes: int = 0
    """``activation_bytes`` of the block run as a bf16 pipeline worker runs it, fp32 parameters
    under ``torch.autocast`` (planner.analyze [Note: a pipeline worker's autocast]), less
    ``autocast_weight_bytes``. This and the next three: 0 unless ``ModelStats.autocast``."""
    autocast_weight_bytes: int = 0
    """Of what that run saves, autocast's bf16 copies of the block's parameters, whatever the
    micro-batch's size (not scaled with it): a stage whose blocks keep their activations holds
    them once for all its micro-batches in flight (the worker's casts are shared across the step,
    runtime.stage_worker [Note: one weight cast a step]), a recomputed or swapped one per
    micro-batch (planner.stage_cost [Note: a bf16 stage's activations])."""
    autocast_input_bytes: int = 0
    """``input_bytes`` in that run (the built-in GPT's hidden states stay fp32)."""
    autocast_output_bytes: int = 0
    """``output_bytes`` in that run: what the stage ending at this block sends on."""

    @property
    def measured(self) -> bool:
        return self.fwd_per_sample_s > 0 or self.fwd_fixed_s > 0


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelStats:
    name: str
    """Model name (preset or source) for reports."""
    num_params: int
    dtype: DType
    """Compute dtype the activations and FLOPs were measured in."""
    micro_batch_size: int
    """Sequences per micro-batch the per-block figures were measured with."""
    seq_len: int
    blocks: tuple[BlockStats, ...]
    loss_activation_bytes: int = 0
    """Bytes the loss saves for backward for one micro-batch (work after the last block's
    forward: cross entropy keeps fp32 log-probabilities, b·s·V·4). Outside every block, so the
    runtime's ledger does not track it; the planner counts it in the workspace estimate."""
    autocast: bool = False
    """The blocks' ``autocast_*`` figures were traced (a bf16 analysis of the built-in GPT, the
    model a pipeline runs); the pipeline's planner takes them (planner.stage_cost)."""
    overhead_block_fwd_s: float = 0.0
    """Measured runtime overhead of one block's forward call (chunk-store and activation-manager
    hooks, saved-tensor packing), on top of the block's own time. 0 = not measured."""
    overhead_block_bwd_s: float = 0.0
    """Measured runtime overhead of one block's backward (hooks, saved-tensor unpacking)."""
    overhead_param_s: float = 0.0
    """Measured runtime overhead per parameter tensor per micro-batch backward (the chunk
    store's post-accumulate-grad hook and its copy into the chunk's gradient)."""
    overhead_microbatch_s: float = 0.0
    """Measured runtime overhead per micro-batch outside every block (the engine's bookkeeping
    around the forward and backward)."""
    overhead_chunk_fetch_s: float = 0.0
    """Measured work of the training thread per off-device chunk fetch (buffer, copy issue,
    parameter pointers, release, gradient flush), on top of the copy itself."""

    @property
    def fwd_flops(self) -> int:
        return sum(b.fwd_flops for b in self.blocks)

    @property
    def bwd_flops(self) -> int:
        return sum(b.bwd_flops for b in self.blocks)

    @property
    def activation_bytes(self) -> int:
        return sum(b.activation_bytes for b in self.blocks)

    def scaled(self, micro_batch_size: int) -> "ModelStats":
        """Per-micro-batch figures for another micro-batch size.

        Activation bytes, input/output bytes and FLOPs of a decoder are linear in the batch
        dimension (Korthikanti et al. 2022, Eq. 1 is linear in b), so scaling is exact; autocast's
        weight copies (``autocast_weight_bytes``) do not depend on it.
        """
        if micro_batch_size == self.micro_batch_size:
            return self
        num, den = micro_batch_size, self.micro_batch_size

        def s(v: int) -> int:
            return v * num // den

        blocks = tuple(
            dataclasses.replace(
                b,
                activation_bytes=s(b.activation_bytes),
                saved_storage_bytes=tuple(s(v) for v in b.saved_storage_bytes),
                input_bytes=s(b.input_bytes),
                output_bytes=s(b.output_bytes),
                fwd_flops=s(b.fwd_flops),
                bwd_flops=s(b.bwd_flops),
                random_elems=s(b.random_elems),
                autocast_activation_bytes=s(b.autocast_activation_bytes),
                autocast_input_bytes=s(b.autocast_input_bytes),
                autocast_output_bytes=s(b.autocast_output_bytes),
            )
            for b in self.blocks
        )
        return dataclasses.replace(self, micro_batch_size=micro_batch_size, blocks=blocks,
                                   loss_activation_bytes=s(self.loss_activation_bytes))


_VIEW_NODES = frozenset({"TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0",
                         "UnsafeViewBackward0", "ExpandBackward0", "AliasBackward0", "UnsqueezeBackward0"})


def cast_of_parameter(t) -> bool:
    """``t`` (a tensor autograd saves) is (a view of) a dtype cast of a parameter: autocast's
    weight copy (planner.analyze [Note: a pipeline worker's autocast]). Here, where both the
    analysis and the worker's activation counts (offload.activations, runtime.stage_keep) can
    import it."""
    from torch import nn

    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in _VIEW_NODES:
        fn = fn.next_functions[0][0] if fn.next_functions else None
    if fn is None or type(fn).__name__ != "ToCopyBackward0" or not fn.next_functions:
        return False
    src = fn.next_functions[0][0]
    return src is not None and isinstance(getattr(src, "variable", None), nn.Parameter)
