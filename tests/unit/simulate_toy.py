"""The toy machine and model of the step simulator's tests (test_simulate.py,
test_simulate_timeline.py, test_simulate_nvme_cpu.py): a device, host and NVMe disk with round
figures, blocks of given activation sizes, a training shape and a memory policy."""

from __future__ import annotations

from memtrain.cluster.spec import DeviceSpec, HostSpec, NvmeSpec
from memtrain.planner.plan import ActPolicy, ChunkPlan, MemoryPolicy, Tier, TrainShape
from memtrain.planner.stats import BlockStats, DType, ModelStats, Optimizer

# 50 TFLOP/s achieved: a block of 5e12 forward FLOPs takes 0.1 s forward, 0.2 s backward
DEV = DeviceSpec(kind="toy", name="Toy", memory_bytes=10**11, bf16_flops=100e12, fp16_flops=100e12, fp32_flops=10e12,
                 memory_bw_gbps=1000.0, h2d_gbps=25.0, d2h_gbps=20.0, compute_efficiency=0.5)
HOST = HostSpec(memory_bytes=10**12, num_cpus=8, memory_bw_gbps=100.0, cpu_adam_params_per_s=1e12)
NVME = NvmeSpec(path="/tmp/nvme", capacity_bytes=10**13, read_gbps=5.0, write_gbps=5.0)
FLOPS = int(5e12)
MB = 10**6


def make_stats(acts: list[int], inputs: list[int] | None = None, params: list[int] | None = None) -> ModelStats:
    inputs = inputs or [10 * MB] * len(acts)
    params = params or [1000] * len(acts)
    blocks = tuple(
        BlockStats(name=f"b{j}", num_params=p, param_bytes=2 * p, activation_bytes=a, input_bytes=i, output_bytes=i,
                   fwd_flops=FLOPS, bwd_flops=2 * FLOPS, param_names=(f"b{j}.w",))
        for j, (a, i, p) in enumerate(zip(acts, inputs, params))
    )
    return ModelStats(name="toy", num_params=sum(params), dtype=DType.BF16, micro_batch_size=1, seq_len=8, blocks=blocks)


def train(n: int, mbs: int = 1) -> TrainShape:
    return TrainShape(global_batch_size=n * mbs, micro_batch_size=mbs, num_microbatches=n, seq_len=8,
                      dtype=DType.BF16, optimizer=Optimizer.ADAMW)


def policy(stats: ModelStats, homes: list[Tier], acts: list[ActPolicy], depth: int = 1, one_chunk: bool = False) -> MemoryPolicy:
    if one_chunk:
        chunks = (ChunkPlan(index=0, num_elems=stats.num_params, param_names=tuple(b.param_names[0] for b in stats.blocks),
                            home=homes[0]),)
    else:
        chunks = tuple(ChunkPlan(index=j, num_elems=b.num_params, param_names=b.param_names, home=h)
                       for j, (b, h) in enumerate(zip(stats.blocks, homes)))
    return MemoryPolicy(chunk_size_elems=max(c.num_elems for c in chunks), chunks=chunks, prefetch_depth=depth,
                        activations=tuple(acts))
