"""Cost formulas checked against numbers worked out by hand."""

from __future__ import annotations

import dataclasses

import pytest

from memtrain.cluster.spec import DeviceSpec, HostSpec, NvmeSpec
from memtrain.planner import cost
from memtrain.planner.plan import ActPolicy, ChunkPlan, Tier
from memtrain.planner.stats import BlockStats, DType, ModelStats, model_state_bytes_per_param

DEV = DeviceSpec(kind="toy", name="Toy", memory_bytes=10**10, bf16_flops=100e12, fp16_flops=100e12, fp32_flops=0.0,
                 memory_bw_gbps=1000.0, h2d_gbps=25.0, d2h_gbps=20.0, compute_efficiency=0.5)
HOST = HostSpec(memory_bytes=10**11, num_cpus=16, memory_bw_gbps=100.0, cpu_adam_params_per_s=1e9)
NVME = NvmeSpec(path="/tmp/x", capacity_bytes=10**12, read_gbps=4.0, write_gbps=2.0)


def block(name: str, params: dict[str, int], act: int = 100, inp: int = 10, out: int = 10, flops: int = 0) -> BlockStats:
    return BlockStats(name=name, num_params=sum(params.values()), param_bytes=2 * sum(params.values()), activation_bytes=act,
                      input_bytes=inp, output_bytes=out, fwd_flops=flops, bwd_flops=2 * flops, param_names=tuple(params))


def test_compute_time_is_flops_over_peak_times_efficiency():
    assert cost.compute_time_s(1e12, DEV, "bf16") == pytest.approx(1e12 / (100e12 * 0.5))
    b = block("b", {"w": 1}, flops=int(5e12))
    assert cost.block_fwd_time_s(b, DEV, DType.BF16) == pytest.approx(0.1)
    assert cost.block_bwd_time_s(b, DEV, DType.BF16) == pytest.approx(0.2)
    assert cost.recompute_time_s(b, DEV, DType.BF16) == cost.block_fwd_time_s(b, DEV, DType.BF16)


def test_measured_block_times_replace_the_flop_estimate():
    b = BlockStats(name="b", num_params=1, param_bytes=2, activation_bytes=1, input_bytes=1, output_bytes=1,
                   fwd_flops=int(5e12), bwd_flops=int(1e13), fwd_fixed_s=0.01, fwd_per_sample_s=0.02,
                   bwd_fixed_s=0.03, bwd_per_sample_s=0.04)
    assert cost.block_fwd_time_s(b, DEV, "bf16", 4) == pytest.approx(0.01 + 4 * 0.02)
    assert cost.block_bwd_time_s(b, DEV, "bf16", 4) == pytest.approx(0.03 + 4 * 0.04)
    assert cost.recompute_time_s(b, DEV, "bf16", 2) == pytest.approx(0.05)


def test_dtype_without_flops_is_a_clear_error():
    with pytest.raises(ValueError, match="fp32"):
        cost.compute_time_s(1.0, DEV, "fp32")


def test_transfers_are_latency_plus_bytes_over_bandwidth():
    assert cost.h2d_time_s(25e9, DEV) == pytest.approx(1.0 + cost.PCIE_LATENCY_S)
    assert cost.d2h_time_s(20e9, DEV) == pytest.approx(1.0 + cost.PCIE_LATENCY_S)
    assert cost.h2d_time_s(0, DEV) == 0.0
    assert cost.disk_read_time_s(8e9, NVME) == pytest.approx(2.0 + cost.NVME_LATENCY_S)
    assert cost.disk_write_time_s(8e9, NVME) == pytest.approx(4.0 + cost.NVME_LATENCY_S)
    # a measured per-request cost (runtime.disk_probe.measure_disk_latency_s) replaces the catalog's
    slow = dataclasses.replace(NVME, read_latency_s=0.5e-3, write_latency_s=0.9e-3)
    assert NVME.read_latency_s == NVME.write_latency_s == cost.NVME_LATENCY_S
    assert cost.disk_read_time_s(4e6, slow) == pytest.approx(1e-3 + 0.5e-3)
    assert cost.disk_write_time_s(4e6, slow) == pytest.approx(2e-3 + 0.9e-3)


def test_compression_pace_is_the_slower_of_disk_and_codec():
    zstd = cost.CompressionModel(ratio=2.0, compress_gbps=1.0, decompress_gbps=8.0)
    # read 8 GB: disk moves 4 GB at 4 GB/s = 1 s; decompression 8 GB at 8 GB/s = 1 s
    assert cost.disk_read_time_s(8e9, NVME, zstd) == pytest.approx(1.0 + cost.NVME_LATENCY_S)
    # write 8 GB: disk 4 GB at 2 GB/s = 2 s; compression 8 GB at 1 GB/s = 8 s (codec-bound)
    assert cost.disk_write_time_s(8e9, NVME, zstd) == pytest.approx(8.0 + cost.NVME_LATENCY_S)
    z = cost.zstd_model(64)
    assert z.compress_gbps == pytest.approx(8 * 0.51) and z.decompress_gbps == pytest.approx(8 * 1.55) and z.ratio > 1


def test_optimizer_bytes_touched_and_times():
    # mixed AdamW: read fp32 grad 4 + master 4 + m,v 8; write master 4 + m,v 8 + bf16 copy 2 = 30
    assert cost.optimizer_bytes_touched(1, "bf16", "adamw") == 30
    assert cost.optimizer_bytes_touched(1, "fp32", "adamw") == 28  # read p,g,m,v 16 + write p,m,v 12
    assert cost.optimizer_bytes_touched(1, "fp32", "sgd") == 20  # read p,g,buf 12 + write p,buf 8
    assert cost.optimizer_bytes_touched(10, "bf16", "sgd") == 10 * (4 + 4 + 4 + 4 + 4 + 2)
    # the device steps with torch's unfused AdamW: one pass per op, 80 B/elem fp32 (+ the compute copy when mixed)
    assert cost.optimizer_bytes_touched(1, "fp32", "adamw", fused=False) == 80
    assert cost.optimizer_bytes_touched(1, "fp32", "sgd", fused=False) == 44
    assert cost.optimizer_bytes_touched(1, "bf16", "adamw", fused=False) == 80 + 4 + 2  # + the bf16 copy
    assert cost.device_optimizer_time_s(10**9, "bf16", "adamw", DEV) == pytest.approx(86e9 / 1000e9)
    assert cost.cpu_optimizer_time_s(2 * 10**9, "adamw", HOST) == pytest.approx(2.0)
    assert cost.cpu_optimizer_time_s(2 * 10**9, "sgd", HOST) == pytest.approx(2.0 * 20 / 28)
    # gradient clipping reads each gradient for the norm and rewrites it once: 12 B/elem more
    assert cost.cpu_optimizer_time_s(2 * 10**9, "adamw", HOST, clip=True) == pytest.approx(2.0 * 40 / 28)
    assert cost.device_optimizer_time_s(10**9, "bf16", "adamw", DEV, clip=True) == pytest.approx(98e9 / 1000e9)
    # host accumulation: read bf16 grad 2 + read/write fp32 8 = 10 bytes per element at 100 GB/s
    assert cost.host_grad_accum_time_s(10**9, "bf16", HOST) == pytest.approx(0.1)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_device_chunk_bytes_equal_model_state_bytes(dtype, opt):
    assert cost.chunk_bytes(Tier.DEVICE, 1000, dtype, opt) == {
        Tier.DEVICE: 1000 * model_state_bytes_per_param(dtype, opt), Tier.HOST: 0, Tier.NVME: 0}


def test_chunk_bytes_follow_the_accounting_table():
    n = 1000
    assert cost.chunk_bytes("host", n, "bf16", "adamw")[Tier.HOST] == n * (4 + 4 + 8) + n * 2
    assert cost.chunk_bytes("host", n, "fp32", "adamw")[Tier.HOST] == n * (4 + 4 + 8)
    assert cost.chunk_bytes("nvme", n, "bf16", "adamw") == {Tier.DEVICE: 0, Tier.HOST: 0, Tier.NVME: n * (4 + 8) + n * 2}
    assert cost.chunk_bytes("nvme", n, "fp32", "sgd")[Tier.NVME] == n * (4 + 4)
    assert cost.param_buffer_bytes(n, "bf16") == cost.grad_buffer_bytes(n, "bf16") == 2 * n
    assert cost.host_grad_accum_bytes(n) == 4 * n
    assert cost.nvme_optim_staging_bytes(n, "bf16", "adamw") == cost.chunk_disk_bytes(n, "bf16", "adamw") == 14 * n


def test_activation_bytes_per_policy():
    b = block("b", {"w": 1}, act=100, inp=10)
    assert cost.activation_bytes(ActPolicy.KEEP, b) == {Tier.DEVICE: 100, Tier.HOST: 0, Tier.NVME: 0}
    assert cost.activation_bytes(ActPolicy.RECOMPUTE, b)[Tier.DEVICE] == 110
    assert cost.activation_bytes(ActPolicy.SWAP_HOST, b) == {Tier.DEVICE: 100, Tier.HOST: 100, Tier.NVME: 0}
    assert cost.activation_bytes(ActPolicy.SWAP_NVME, b)[Tier.NVME] == 100


def test_pack_params_never_splits_and_gives_big_params_their_own_chunk():
    params = [("a", 3), ("b", 4), ("c", 2), ("big", 25), ("d", 5), ("e", 6)]
    chunks = cost.pack_params(params, 10)
    # d (5) then e (6) would exceed 10, so e starts a new chunk
    assert chunks == [(("a", "b", "c"), 9), (("big",), 25), (("d",), 5), (("e",), 6)]
    assert [n for c in chunks for n in c[0]] == [n for n, _ in params]  # execution order kept
    assert cost.pack_params([("a", 5), ("b", 5), ("c", 1)], 10) == [(("a", "b"), 10), (("c",), 1)]
    with pytest.raises(ValueError, match="chunk_size_elems"):
        cost.pack_params(params, 0)


def _two_block_stats() -> tuple[ModelStats, dict[str, int]]:
    sizes = {"e.w": 6, "l.w1": 3, "l.w2": 3}
    stats = ModelStats(name="m", num_params=12, dtype=DType.BF16, micro_batch_size=1, seq_len=4, blocks=(
        block("emb", {"e.w": 6}), block("layer", {"l.w1": 3, "l.w2": 3})))
    return stats, sizes


def test_pack_chunks_by_parameter_or_by_block():
    stats, sizes = _two_block_stats()
    assert cost.pack_chunks(stats, 8, sizes) == [(("e.w",), 6), (("l.w1", "l.w2"), 6)]
    assert cost.pack_chunks(stats, 4, sizes) == [(("e.w",), 6), (("l.w1",), 3), (("l.w2",), 3)]
    # without sizes each block is one indivisible unit
    assert cost.pack_chunks(stats, 4) == [(("e.w",), 6), (("l.w1", "l.w2"), 6)]
    assert cost.pack_chunks(stats, 100) == [(("e.w", "l.w1", "l.w2"), 12)]
    with pytest.raises(ValueError, match="param_numels"):
        cost.pack_chunks(stats, 4, {"e.w": 6, "l.w1": 3, "l.w2": 4})


def test_pack_chunks_uses_sizes_carried_by_the_blocks():
    stats, sizes = _two_block_stats()
    sized = ModelStats(name="m", num_params=12, dtype=DType.BF16, micro_batch_size=1, seq_len=4, blocks=tuple(
        BlockStats(name=b.name, num_params=b.num_params, param_bytes=b.param_bytes, activation_bytes=1, input_bytes=1,
                   output_bytes=1, fwd_flops=0, bwd_flops=0, param_names=b.param_names,
                   param_numels=tuple(sizes[n] for n in b.param_names)) for b in stats.blocks))
    assert cost.pack_chunks(sized, 4) == cost.pack_chunks(stats, 4, sizes)
    grouped = [[(n, sizes[n]) for n in b.param_names] for b in stats.blocks]
    for size in (4, 8, 9, 100):  # what the runtime calls (offload.chunk_layout.block_param_order)
        assert cost.pack_chunks(sized, size) == cost.pack_params(grouped, size)


def test_a_block_that_fits_in_a_chunk_never_straddles_two():
    # [Note: block-aligned chunks]: blocks of 6, 7 and 12 elements in chunks of 10
    blocks = [[("a", 6)], [("b1", 3), ("b2", 4)], [("c1", 5), ("c2", 7)]]
    # b (7) fits in a chunk but not beside a (6): a's chunk closes; c (12) is larger than a chunk
    # and is cut between its parameters as before
    assert cost.pack_params(blocks, 10) == [(("a",), 6), (("b1", "b2"), 7), (("c1",), 5), (("c2",), 7)]
    # flat, each parameter is its own block: b1 joins a, b2 does not fit
    flat = [p for b in blocks for p in b]
    assert cost.pack_params(flat, 10) == [(("a", "b1"), 9), (("b2", "c1"), 9), (("c2",), 7)]
    # blocks that fit together still share a chunk
    assert cost.pack_params([[("x", 3)], [("y", 3)], [("z", 3)]], 10) == [(("x", "y", "z"), 9)]


def test_block_chunk_ids_by_name_and_by_range_agree():
    stats, sizes = _two_block_stats()
    packed = cost.pack_chunks(stats, 4, sizes)
    chunks = [ChunkPlan(index=i, num_elems=n, param_names=names, home=Tier.HOST) for i, (names, n) in enumerate(packed)]
    assert cost.block_chunk_ids(stats, chunks) == ((0,), (1, 2))
    unnamed = [ChunkPlan(index=c.index, num_elems=c.num_elems, param_names=(), home=c.home) for c in chunks]
    assert cost.block_chunk_ids(stats, unnamed) == ((0,), (1, 2))
    one = [ChunkPlan(index=0, num_elems=12, param_names=("e.w", "l.w1", "l.w2"), home=Tier.HOST)]
    assert cost.block_chunk_ids(stats, one) == ((0,), (0,))


def test_early_updates_run_as_gradients_complete_and_the_last_ones_are_carried():
    # offload.optim [Note: early optimizer step]: a chunk's gradients complete at the first block
    # using it, in backward order, a block's last chunk first; [Note: write-backs across the step
    # end]: the last staged_chunks updates' write-backs run on into the next step
    uses = [(0,), (0, 1), (1, 2, 3), (3, 4)]
    assert cost.early_update_order(uses, range(5)) == [4, 3, 2, 1, 0]
    assert cost.early_update_order(uses, [0, 2, 4]) == [4, 2, 0]
    assert cost.carried_write_backs(uses, range(5), 2) == [1, 0]
    assert cost.carried_write_backs(uses, range(5), 9) == [4, 3, 2, 1, 0]
    # the states are read ahead in the reverse order
    assert cost.read_ahead_order(uses, range(5)) == cost.early_update_order(uses, range(5))[::-1]
