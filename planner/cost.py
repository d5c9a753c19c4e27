"""The cost model: how long each piece of a training step takes, and how many bytes it holds.

Time formulas (compute, PCIe copies, disk, optimizer steps) feed the simulator
(``planner.simulate``); byte formulas follow docs/memory-accounting.md exactly, so the
simulator's predicted peaks and the runtime ledger count the same owners. The chunk packing
rule itself is ``planner.plan.pack_params`` (re-exported here): the planner and the engine must
cut the parameters into exactly the same chunks, so it lives with the Plan's types.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from memtrain.cluster.spec import DeviceSpec, HostSpec, NvmeSpec
from memtrain.optimizers import ADAMW, lookup
from memtrain.planner.plan import ActPolicy, ChunkPlan, Tier, pack_params, pack_units
from memtrain.planner.stats import BlockStats, DType, ModelStats, Optimizer, dtype_bytes

__all__ = [
    "PCIE_LATENCY_S", "NVME_LATENCY_S", "CompressionModel", "zstd_model",
    "compute_time_s", "block_fwd_time_s", "block_bwd_time_s", "recompute_time_s", "block_overhead_s",
    "transfer_time_s", "h2d_time_s", "d2h_time_s", "disk_read_time_s", "disk_write_time_s",
    "optimizer_state_bytes_per_elem", "optimizer_bytes_touched", "device_optimizer_time_s",
    "cpu_optimizer_time_s", "host_grad_accum_time_s", "CLIP_BYTES_PER_ELEM",
    "chunk_bytes", "param_buffer_bytes", "grad_buffer_bytes", "host_grad_accum_bytes", "grad_landing_bytes",
    "nvme_optim_staging_bytes", "chunk_disk_bytes", "activation_bytes",
    "NVME_HEADER_BYTES", "NVME_ALIGN_BYTES", "nvme_file_bytes", "nvme_chunk_file_bytes", "nvme_chunk_file_sizes",
    "within_prefetch_window",
    "pack_params", "pack_chunks", "block_param_list", "block_chunk_ids",
]

PCIE_LATENCY_S = 10e-6
"""Fixed cost of one host<->device copy: launch plus DMA setup, ~10 µs on PCIe 4/5 (measured
``cudaMemcpyAsync`` latencies for pinned memory are 5-15 µs)."""
NVME_HEADER_BYTES = 4096
"""Header of every file the NVMe store writes (``offload.nvme`` file format version 1)."""
NVME_ALIGN_BYTES = 4096
"""The store pads every payload to this multiple (O_DIRECT alignment), and its ledger counts it."""
NVME_LATENCY_S = 100e-6
"""The catalog's fixed cost of one NVMe request (``NvmeSpec.read_latency_s``/``write_latency_s``
default): ~100 µs, the order of a datacenter NVMe's read latency at queue depth 1; large
sequential transfers are bandwidth-bound after it. A profile measures both on the real path."""


# --- compression --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class CompressionModel:
    """zstandard on chunks written to NVMe, modelled as a size ratio and a codec throughput."""

    ratio: float
    """Uncompressed / compressed bytes (> 1 means smaller on disk)."""
    compress_gbps: float
    """Compression throughput of all codec threads together, GB/s of uncompressed input."""
    decompress_gbps: float
    """Decompression throughput of all codec threads together, GB/s of uncompressed output."""


def zstd_model(num_cpus: int, *, ratio: float = 1.1) -> CompressionModel:
    """zstd level 1 on up to 8 threads.

    Per-core speeds are zstd's published Silesia benchmark for level 1 (facebook/zstd README:
    ~510 MB/s compression, ~1550 MB/s decompression). Floating-point weights and optimizer
    states compress far worse than text: only exponent bytes are redundant, so plain zstd gets
    about 1.1x on bf16/fp32 tensors (ZipNN, Hershcovitch et al. 2024, reports ~1.1x before its
    byte grouping), which is the default ratio.
    """
    threads = max(1, min(int(num_cpus), 8))
    return CompressionModel(ratio=ratio, compress_gbps=0.51 * threads, decompress_gbps=1.55 * threads)


# --- time ---------------------------------------------------------------------------------


def compute_time_s(flops: float, device: DeviceSpec, dtype: DType | str) -> float:
    """FLOPs / (peak FLOP/s × efficiency).

    Narayanan et al. 2021 (Megatron-LM at scale), Sec. 5.1: time = FLOPs / achieved FLOP/s,
    with achieved = peak × the fraction of peak a transformer layer reaches
    (``DeviceSpec.compute_efficiency``, measured by the profiler when available).
    """
    peak = device.peak_flops(str(DType(dtype)))
    if peak <= 0:
        raise ValueError(f"device {device.kind!r} has no {DType(dtype)} peak FLOP/s; choose another train.dtype")
    return flops / (peak * device.compute_efficiency)


def block_fwd_time_s(block: BlockStats, device: DeviceSpec, dtype: DType | str, micro_batch_size: int | None = None) -> float:
    """Forward time of one micro-batch through the block.

    A profiled block (``BlockStats.measured``) uses its fitted time, fixed + per-sequence ×
    micro-batch size (so ``micro_batch_size`` is required for it); otherwise FLOPs over the
    achieved FLOP/s (``compute_time_s``).
    """
    if block.fwd_fixed_s > 0 or block.fwd_per_sample_s > 0:
        assert micro_batch_size is not None, "a measured block's time depends on the micro-batch size"
        return block.fwd_fixed_s + block.fwd_per_sample_s * micro_batch_size
    return compute_time_s(block.fwd_flops, device, dtype)


def block_bwd_time_s(block: BlockStats, device: DeviceSpec, dtype: DType | str, micro_batch_size: int | None = None) -> float:
    """Backward time of one micro-batch through the block (measured fit, else FLOPs)."""
    if block.bwd_fixed_s > 0 or block.bwd_per_sample_s > 0:
        assert micro_batch_size is not None, "a measured block's time depends on the micro-batch size"
        return block.bwd_fixed_s + block.bwd_per_sample_s * micro_batch_size
    return compute_time_s(block.bwd_flops, device, dtype)


def recompute_time_s(block: BlockStats, device: DeviceSpec, dtype: DType | str, micro_batch_size: int | None = None) -> float:
    """Recomputation re-runs the block's forward once before its backward.

    Chen et al. 2016 (Training deep nets with sublinear memory cost), Sec. 3: one extra forward
    per checkpointed segment; Korthikanti et al. 2022, Sec. 5: full recompute adds one forward.
    """
    return block_fwd_time_s(block, device, dtype, micro_batch_size)


def block_overhead_s(stats: ModelStats, block: BlockStats, *, backward: bool) -> float:
    """The runtime's own time around one call of the block, on the thread that runs it.

    Measured by the profiler ([Note: runtime overhead] in ``runtime.overhead_probe``): per block call in
    the forward (chunk-store hooks, one saved-tensor pack per saved tensor) and in the backward
    (hooks, unpacks), plus, in the backward, one post-accumulate-grad hook and gradient copy per
    parameter tensor the block owns. 0 without a profile. Added to the block's compute time
    (on a CPU device the hooks run on the cores doing the compute; on a GPU it is an upper
    bound, since host work can overlap kernels already queued).
    """
    if backward:
        return stats.overhead_block_bwd_s + len(block.param_names) * stats.overhead_param_s
    return stats.overhead_block_fwd_s


def transfer_time_s(num_bytes: float, gbps: float, latency_s: float) -> float:
    """Latency + bytes / bandwidth (the alpha-beta model, Hockney 1994)."""
    if num_bytes <= 0:
        return 0.0
    return latency_s + num_bytes / (gbps * 1e9)


def h2d_time_s(num_bytes: float, device: DeviceSpec) -> float:
    return transfer_time_s(num_bytes, device.h2d_gbps, PCIE_LATENCY_S)


def d2h_time_s(num_bytes: float, device: DeviceSpec) -> float:
    return transfer_time_s(num_bytes, device.d2h_gbps, PCIE_LATENCY_S)


def disk_read_time_s(num_bytes: float, nvme: NvmeSpec, compression: CompressionModel | None = None) -> float:
    """Read ``num_bytes`` (uncompressed size) from NVMe, decompressing on the fly if enabled.

    Read and decompression are pipelined over blocks, so the slower stage sets the pace
    (latency + max(compressed bytes / disk bandwidth, bytes / decompression throughput)).
    """
    codec_gbps = compression.decompress_gbps if compression is not None else 0.0
    return _disk_time_s(num_bytes, nvme.read_gbps, nvme.read_latency_s, compression, codec_gbps)


def disk_write_time_s(num_bytes: float, nvme: NvmeSpec, compression: CompressionModel | None = None) -> float:
    """Write ``num_bytes`` to NVMe, compressing on the fly if enabled (pipelined as for reads)."""
    codec_gbps = compression.compress_gbps if compression is not None else 0.0
    return _disk_time_s(num_bytes, nvme.write_gbps, nvme.write_latency_s, compression, codec_gbps)


def _disk_time_s(num_bytes: float, disk_gbps: float, latency_s: float, compression: CompressionModel | None,
                 codec_gbps: float) -> float:
    """latency + max(stored bytes / disk bandwidth, bytes / codec throughput): the codec and the
    disk are pipelined over blocks, so the slower stage sets the pace."""
    if num_bytes <= 0:
        return 0.0
    if compression is None:
        return transfer_time_s(num_bytes, disk_gbps, latency_s)
    disk_s = num_bytes / compression.ratio / (disk_gbps * 1e9)
    codec_s = num_bytes / (codec_gbps * 1e9)
    return latency_s + max(disk_s, codec_s)


def optimizer_state_bytes_per_elem(optimizer: Optimizer | str) -> int:
    """``o`` of docs/memory-accounting.md, the descriptor's (memtrain.optimizers): AdamW 8 (fp32
    m + v), SGD 4 (fp32 momentum)."""
    return lookup(optimizer).state_bytes_per_elem


def _mixed(dtype: DType | str) -> bool:
    return DType(dtype) is not DType.FP32


def optimizer_bytes_touched(num_elems: int, dtype: DType | str, optimizer: Optimizer | str, *, fused: bool = True) -> int:
    """Bytes an optimizer step reads and writes for ``num_elems`` parameters.

    The step is memory-bound (Williams et al. 2009, roofline: a handful of FLOPs per byte),
    so its time is bytes / bandwidth. The optimizer's fp32 figures are its descriptor's
    (memtrain.optimizers): fused, one pass reading grad (fp32 on every tier: offload.grads
    [Note: fp32 accumulators]), master and states and writing master and states (AdamW 28,
    SGD 20); unfused, one pass per op (AdamW 80, SGD 44). Mixed precision adds the compute copy.
    """
    c, kind = dtype_bytes(dtype), lookup(optimizer)
    if not fused:
        # One pass per op (memtrain.optimizers [Note: unfused optimizer]); mixed precision adds
        # the refreshed compute copy (r 4, w c); the gradient is fp32 already (offload.grads
        # [Note: fp32 accumulators]).
        return num_elems * (kind.unfused_bytes_per_elem + (c + 4 if _mixed(dtype) else 0))
    # read grad, master, states; write master, states (OptimizerKind.fused_bytes_per_elem), and the copy
    return num_elems * (kind.fused_bytes_per_elem + (c if _mixed(dtype) else 0))


CLIP_BYTES_PER_ELEM = 12
"""fp32 bytes gradient clipping adds per element (offload.clip): the norm reads the gradient (4),
the coefficient's multiply reads and writes it (8)."""


def device_optimizer_time_s(num_elems: int, dtype: DType | str, optimizer: Optimizer | str, device: DeviceSpec,
                            *, clip: bool = False) -> float:
    """Bytes touched / device memory bandwidth (memory-bound step, see optimizer_bytes_touched),
    for the unfused kernel the runtime steps device chunks with (memtrain.optimizers
    [Note: unfused optimizer]); ``clip`` adds gradient clipping's pass (``CLIP_BYTES_PER_ELEM``)."""
    if num_elems <= 0:
        return 0.0
    nbytes = optimizer_bytes_touched(num_elems, dtype, optimizer, fused=False) + clip * CLIP_BYTES_PER_ELEM * num_elems
    return nbytes / (device.memory_bw_gbps * 1e9)


def cpu_optimizer_time_s(num_elems: int, optimizer: Optimizer | str, host: HostSpec, *, clip: bool = False) -> float:
    """Parameters / CPU-Adam throughput.

    Ren et al. 2021 (ZeRO-Offload), Sec. 5.1: a vectorised CPU Adam updates parameters at a
    measured rate (``HostSpec.cpu_adam_params_per_s``). Another optimizer's step is memory-bound
    too, so the rate is scaled by the fp32 bytes-touched ratio to AdamW's (SGD: 20/28); ``clip``
    adds gradient clipping's bytes (``CLIP_BYTES_PER_ELEM``) the same way.
    """
    if num_elems <= 0:
        return 0.0
    scale = (lookup(optimizer).fused_bytes_per_elem + clip * CLIP_BYTES_PER_ELEM) / ADAMW.fused_bytes_per_elem
    return num_elems / host.cpu_adam_params_per_s * scale


def host_grad_accum_time_s(num_elems: int, dtype: DType | str, host: HostSpec) -> float:
    """Add a copied-out gradient into the host's fp32 accumulator: read c + read 4 + write 4
    bytes per element over host memory bandwidth (memory-bound, roofline)."""
    if num_elems <= 0:
        return 0.0
    return num_elems * (dtype_bytes(dtype) + 8) / (host.memory_bw_gbps * 1e9)


# --- bytes (docs/memory-accounting.md) ----------------------------------------------------


def chunk_bytes(home: Tier | str, num_elems: int, dtype: DType | str, optimizer: Optimizer | str) -> dict[Tier, int]:
    """Resident bytes of a chunk per tier, by its home (table "Chunks" of the accounting doc).

    device: N·(c + 4 + 4·mixed + o) (the gradient accumulator is fp32 on every tier: offload.chunks
    [Note: fp32 accumulators]); host: N·(4 + 4 + o) + N·c·mixed;
    nvme: N·(4 + o) + N·c·mixed on NVMe (its host accumulator is transient, see
    ``host_grad_accum_bytes``).
    """
    n, c, o, mixed = num_elems, dtype_bytes(dtype), optimizer_state_bytes_per_elem(optimizer), _mixed(dtype)
    home = Tier(home)
    out = {Tier.DEVICE: 0, Tier.HOST: 0, Tier.NVME: 0}
    if home is Tier.DEVICE:
        out[Tier.DEVICE] = n * (c + 4 + 4 * mixed + o)
    elif home is Tier.HOST:
        out[Tier.HOST] = n * (4 + 4 + o) + n * c * mixed
    else:
        out[Tier.NVME] = n * (4 + o) + n * c * mixed
    return out


def param_buffer_bytes(num_elems: int, dtype: DType | str) -> int:
    """Device param buffer of a non-resident chunk (owner ``buffer:param:<i>``): N·c."""
    return num_elems * dtype_bytes(dtype)


def grad_buffer_bytes(num_elems: int, dtype: DType | str) -> int:
    """Device grad buffer of a non-resident chunk (owner ``buffer:grad:<i>``): N·c."""
    return num_elems * dtype_bytes(dtype)


def host_grad_accum_bytes(num_elems: int) -> int:
    """fp32 gradient accumulator on the host of an nvme-home chunk: N·4."""
    return num_elems * 4


def grad_landing_bytes(num_elems: int, dtype: DType | str, device: DeviceSpec) -> int:
    """Pinned host buffer a GPU's grad buffer is copied into before its add (owner
    ``staging:grad:<i>``, offload.grads [Note: asynchronous gradient flush]): N·c; none on a
    CPU device, whose accumulator adds the grad buffer in place."""
    return 0 if device.kind == "cpu" else num_elems * dtype_bytes(dtype)


def chunk_disk_bytes(num_elems: int, dtype: DType | str, optimizer: Optimizer | str) -> int:
    """What an nvme-home chunk's optimizer step reads and writes back: master, states and the
    compute copy if mixed, N·(4 + o) + N·c·mixed (= its NVMe-resident bytes)."""
    return chunk_bytes(Tier.NVME, num_elems, dtype, optimizer)[Tier.NVME]


def nvme_optim_read_bytes(num_elems: int, dtype: DType | str, optimizer: Optimizer | str, *, early: bool) -> int:
    """What an nvme-home chunk's optimizer step reads from disk: ``chunk_disk_bytes`` less the
    fp32 master when the update starts early without mixed precision, for then the param buffer
    fetched for the backward is the master (offload.optim [Note: master from the param buffer])."""
    full = chunk_disk_bytes(num_elems, dtype, optimizer)
    return full - 4 * num_elems if early and not _mixed(dtype) else full


OPTIM_ROLLING_STAGINGS = 3
"""Staging slots the early updates keep for the chunks not read ahead (offload.optim [Note:
states read ahead], planner.program_optim): with fewer, the training thread would wait for each
write-back in turn."""


def optim_read_ahead_slots(staged_chunks: int) -> int:
    """NVMe chunks whose optimizer states are read ahead, of ``staged_chunks`` staged at once."""
    return max(0, staged_chunks - OPTIM_ROLLING_STAGINGS)


def read_ahead_order(uses: Sequence[Sequence[int]], chunks: Iterable[int]) -> list[int]:
    """``chunks`` in the order their optimizer states are read ahead (offload.optim [Note: states
    read ahead]; planner.program_optim places the reads): by their first forward use (``uses[q]``: block ``q``'s chunks), then index, the
    reverse of the order their gradients complete."""
    first: dict[int, int] = {}
    for q, cs in enumerate(uses):
        for c in cs:
            first.setdefault(c, q)
    return sorted((c for c in chunks if c in first), key=lambda c: (first[c], c))


def early_update_order(uses: Sequence[Sequence[int]], chunks: Iterable[int]) -> list[int]:
    """``chunks`` in the order their early optimizer updates run (offload.optim [Note: early
    optimizer step]): as their gradients complete, at the first block using each (``uses[q]``:
    block ``q``'s chunks in execution order), last block first and, within a block, its last
    chunk first (the backward meets a block's parameters in reverse). Parameters outside every
    block count with the last block (offload.chunks [Note: loose parameters]): right for a final
    norm or head, but a loose module that runs before the blocks (a position table) completes
    last in the engine, which this order does not model."""
    wanted, first = set(chunks), {}
    for q, cs in enumerate(uses):
        for c in cs:
            first.setdefault(c, q)
    return [c for q in range(len(uses) - 1, -1, -1) for c in reversed(dict.fromkeys(uses[q]))
            if first[c] == q and c in wanted]


def carried_write_backs(uses: Sequence[Sequence[int]], chunks: Iterable[int], staged_chunks: int) -> list[int]:
    """The nvme ``chunks`` whose write-backs a step leaves running into the next (offload.optim
    [Note: write-backs across the step end]): the last ``staged_chunks`` early updates, in the
    order they run. Until each is waited for ([Note: carried write-backs released lazily]), the
    next step's fetches of its chunk copy from the staging it holds ([Note: fetch from a
    write-back]) instead of reading the disk."""
    return early_update_order(uses, chunks)[-staged_chunks:]


def nvme_optim_staging_bytes(num_elems: int, dtype: DType | str, optimizer: Optimizer | str) -> int:
    """Host staging (owner ``staging:<i>``) of an nvme-home chunk's optimizer step: its
    master, states and compute copy are read into host memory, updated by CPU Adam and written
    back, so the chunk's NVMe bytes are held from the read's start to the write's end."""
    return chunk_disk_bytes(num_elems, dtype, optimizer)


def nvme_file_bytes(num_bytes: int) -> int:
    """NVMe ledger bytes of one stored tensor of ``num_bytes``: the 4 KiB header plus the payload
    rounded up to 4 KiB (``offload.nvme``: ``HEADER_BYTES + round_up(stored)``)."""
    return NVME_HEADER_BYTES + -(-num_bytes // NVME_ALIGN_BYTES) * NVME_ALIGN_BYTES


def nvme_chunk_file_sizes(num_elems: int, dtype: DType | str, optimizer: Optimizer | str) -> list[int]:
    """Payload bytes of the files of an nvme-home chunk, one per ledger owner
    ``chunk:<i>:<part>``: the fp32 master, one fp32 file per optimizer state tensor (AdamW: m
    and v; SGD: momentum) and the compute-dtype copy when mixed (docs/memory-accounting.md)."""
    sizes = [4 * num_elems] * (1 + len(lookup(optimizer).state_names))
    if _mixed(dtype):
        sizes.append(dtype_bytes(dtype) * num_elems)
    return sizes


def nvme_chunk_file_bytes(num_elems: int, dtype: DType | str, optimizer: Optimizer | str) -> int:
    """NVMe ledger bytes of an nvme-home chunk: ``chunk_disk_bytes`` plus each file's header and
    alignment (``nvme_file_bytes`` over ``nvme_chunk_file_sizes``)."""
    return sum(nvme_file_bytes(b) for b in nvme_chunk_file_sizes(num_elems, dtype, optimizer))


def within_prefetch_window(c: int, upcoming: Iterable[int], uses: Sequence[Sequence[int]], depth: int) -> bool:
    """Whether chunk ``c`` is among the first ``depth`` distinct chunks used by the blocks
    ``upcoming``, in that order (``uses[q]``: block ``q``'s off-device chunks): the param buffers
    a prefetch of that depth holds next. The step's program keeps such a chunk's buffer where it
    would release it (planner.program [Note: the residency rules]). Once inside, a chunk stays
    inside until its next use: the chunks before it only get fewer as blocks run."""
    seen: set[int] = set()
    for q in upcoming:
        for x in uses[q]:
            if x == c:
                return True
            if x not in seen:
                seen.add(x)
                if len(seen) >= depth:
                    return False
    return False


def activation_bytes(policy: ActPolicy | str, block: BlockStats) -> dict[Tier, int]:
    """Largest bytes one block's activations of one micro-batch hold per tier under a policy
    (table "Activations" of the accounting doc; when each is held is the simulator's job)."""
    a, i = block.activation_bytes, block.input_bytes
    policy = ActPolicy(policy)
    out = {Tier.DEVICE: 0, Tier.HOST: 0, Tier.NVME: 0}
    if policy is ActPolicy.KEEP:
        out[Tier.DEVICE] = a
    elif policy is ActPolicy.RECOMPUTE:
        out[Tier.DEVICE] = i + a  # the input is held while the recompute rebuilds A
    elif policy is ActPolicy.SWAP_HOST:
        out[Tier.DEVICE] = a
        out[Tier.HOST] = a
    else:
        out[Tier.DEVICE] = a
        out[Tier.HOST] = a
        out[Tier.NVME] = a
    return out


# --- chunks of a model (the packing rule itself is planner.plan.pack_params) ------------


def block_param_list(block: BlockStats, param_numels: Mapping[str, int] | None = None) -> list[tuple[str, int]] | None:
    """``[(name, numel), ...]`` of a block, or None when per-parameter sizes are unknown.

    Sizes come from the block's ``param_numels`` (parallel to ``param_names``) or, when the
    analysis left them out, from ``param_numels`` (name -> numel).
    """
    names = block.param_names
    if not names:
        return None
    if block.param_numels and len(block.param_numels) == len(names):
        return list(zip(names, block.param_numels))
    if param_numels is not None and all(n in param_numels for n in names):
        return [(n, int(param_numels[n])) for n in names]
    return None


def pack_chunks(
    stats: ModelStats, chunk_size_elems: int, param_numels: Mapping[str, int] | None = None
) -> list[tuple[tuple[str, ...], int]]:
    """Chunks of a model, in execution order (blocks in order, their ``param_names`` in order).

    [Note: chunking without parameter sizes] When parameter sizes are known
    (``BlockStats.param_numels``, or the ``param_numels`` mapping) parameters are packed one by
    one with ``pack_params``' rule, so the runtime gets the same chunks from ``pack_params``
    over the model's parameters grouped by block (``offload.chunk_layout.block_param_order``). A block whose sizes are unknown is packed as
    one indivisible unit of ``num_params`` elements (never split, a chunk of its own when larger
    than the chunk size); the runtime then uses the plan's ``ChunkPlan.param_names`` as is.
    """
    blocks: list[list[tuple[tuple[str, ...], int]]] = []
    for block in stats.blocks:
        params = block_param_list(block, param_numels)
        if params is None:
            blocks.append([(tuple(block.param_names), block.num_params)])
        else:
            if sum(n for _, n in params) != block.num_params:
                raise ValueError(
                    f"param_numels: sizes of block {block.name!r} sum to {sum(n for _, n in params)}, "
                    f"but the block has {block.num_params} parameters; pass the model's own sizes"
                )
            blocks.append([((name,), numel) for name, numel in params])
    return pack_units(blocks, chunk_size_elems)


def block_chunk_ids(stats: ModelStats, chunks: Sequence[ChunkPlan]) -> tuple[tuple[int, ...], ...]:
    """Per block, the indices of the chunks holding its parameters (ascending), the chunks of
    parameters it shares with an earlier block (``BlockStats.shared_param_names``) included:
    the runtime brings those in for the block too.

    By parameter name when every block with parameters names them; otherwise by element
    ranges (blocks and chunks both cover the parameters in execution order).
    """
    assert all(c.index == pos for pos, c in enumerate(chunks)), "chunk indices must be their positions"
    named = all(b.param_names for b in stats.blocks if b.num_params) and all(c.param_names for c in chunks)
    if named:
        where: dict[str, int] = {}
        for pos, chunk in enumerate(chunks):
            for name in chunk.param_names:
                where[name] = pos
        out = []
        for b in stats.blocks:
            names = b.param_names + b.shared_param_names
            missing = [n for n in names if n not in where]
            if missing:
                raise ValueError(f"memory.chunks: parameter {missing[0]!r} of block {b.name!r} is in no chunk; re-plan")
            out.append(tuple(sorted({where[n] for n in names})))
        return tuple(out)
    bounds, start = [], 0
    for chunk in chunks:
        bounds.append((start, start + chunk.num_elems))
        start += chunk.num_elems
    out, start = [], 0
    for b in stats.blocks:
        lo, hi = start, start + b.num_params
        out.append(tuple(pos for pos, (c_lo, c_hi) in enumerate(bounds) if c_lo < hi and lo < c_hi))
        start = hi
    return tuple(out)
