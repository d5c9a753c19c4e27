"""The process's footprint beyond the ledgers (planner.footprint), checked against hand-worked figures."""

from __future__ import annotations

import dataclasses

from memtrain.cluster.spec import DeviceSpec
from memtrain.offload import bufpool
from memtrain.planner import footprint
from memtrain.planner.plan import ActPolicy, ChunkPlan, MemoryPolicy, Tier
from memtrain.planner.stats import BlockStats, DType, ModelStats

GPU = DeviceSpec(kind="toy", name="Toy", memory_bytes=10**10, bf16_flops=100e12, fp16_flops=100e12, fp32_flops=0.0,
                 memory_bw_gbps=1000.0, h2d_gbps=25.0, d2h_gbps=20.0, compute_efficiency=0.5)
CPU = dataclasses.replace(GPU, kind="cpu", name="CPU")


def block(name: str, params: dict[str, int], act: int = 100, inp: int = 10, out: int = 10,
          shared: tuple[str, ...] = ()) -> BlockStats:
    return BlockStats(name=name, num_params=sum(params.values()), param_bytes=2 * sum(params.values()),
                      activation_bytes=act, input_bytes=inp, output_bytes=out, fwd_flops=0, bwd_flops=0,
                      param_names=tuple(params), param_numels=tuple(params.values()), shared_param_names=shared)


def stats_of(*blocks: BlockStats, loss: int = 0, dtype: DType = DType.BF16) -> ModelStats:
    return ModelStats(name="m", num_params=sum(b.num_params for b in blocks), dtype=dtype, micro_batch_size=1,
                      seq_len=4, blocks=blocks, loss_activation_bytes=loss)


def test_workspace_is_the_largest_block_backward_transient_plus_the_largest_gradient():
    stats = stats_of(block("a", {"x": 1}, act=100, inp=10, out=20), block("b", {"y": 3}, act=50, inp=90, out=5))
    # max(A + I + O) over blocks, plus the largest parameter's gradient (3 elements of bf16)
    assert footprint.workspace_bytes(stats) == max(100 + 10 + 20, 50 + 90 + 5) + 3 * 2


def test_workspace_adds_the_loss_saved_bytes_the_ledger_never_sees():
    stats = dataclasses.replace(stats_of(block("a", {"x": 1}, act=100, inp=10, out=20),
                                         block("b", {"y": 1}, act=50, inp=90, out=5), loss=1000), micro_batch_size=2)
    assert footprint.workspace_bytes(stats) == 145 + 1000 + 2
    # Per micro-batch: scaling the micro-batch scales the loss's bytes with the blocks'.
    assert stats.scaled(4).loss_activation_bytes == 2000
    assert footprint.workspace_bytes(stats.scaled(4)) == 290 + 2000 + 2


def test_a_tied_parameter_holds_two_gradients_until_they_are_summed():
    # the embedding (wte, 100) is used again by the head: its first gradient waits for the second
    emb = block("emb", {"wte": 100, "wpe": 10})
    head = block("head", {"wte": 100, "ln": 4}, shared=("wte",))
    assert footprint.param_grad_bytes(stats_of(emb, head, dtype=DType.FP32)) == 4 * 2 * 100
    # untied, only the largest single gradient is in flight at a time
    assert footprint.param_grad_bytes(stats_of(emb, block("head", {"w2": 100, "ln": 4}), dtype=DType.FP32)) == 4 * 100


def test_optimizer_workspace_is_the_largest_device_chunk_kernels_temporaries():
    chunks = (ChunkPlan(index=0, num_elems=1000, param_names=("a",), home=Tier.DEVICE),
              ChunkPlan(index=1, num_elems=5000, param_names=("b",), home=Tier.HOST),
              ChunkPlan(index=2, num_elems=300, param_names=("c",), home=Tier.DEVICE))
    policy = MemoryPolicy(chunk_size_elems=5000, chunks=chunks, prefetch_depth=1, activations=(ActPolicy.KEEP,))
    assert footprint.optimizer_workspace_bytes(policy, CPU) == 1000 * 4 * 2
    assert footprint.optimizer_workspace_bytes(policy, GPU) == 1000 * 4
    host_only = dataclasses.replace(policy, chunks=tuple(dataclasses.replace(c, home=Tier.HOST) for c in chunks))
    assert footprint.optimizer_workspace_bytes(host_only, CPU) == 0


def test_process_bytes_on_a_gpu_is_the_device_peak():
    assert footprint.process_bytes(device_peak_bytes=7000, pooled_peak_bytes=10**9, act_peak_bytes=10**9,
                                   workspace_bytes=500, device=GPU, uses_nvme=True) == 7000


def test_process_bytes_on_a_cpu_adds_the_pool_with_its_slack_the_heap_and_the_nvme_threads():
    kw = dict(device_peak_bytes=1, pooled_peak_bytes=8000, act_peak_bytes=3000, workspace_bytes=500, device=CPU)
    assert footprint.process_bytes(**kw, uses_nvme=False) == 10000 + 3000 + 500
    assert footprint.process_bytes(**kw, uses_nvme=True) == 10000 + 3000 + 500 + footprint.NVME_IO_BYTES
    # chunks that live all step are never freed: the pool keeps at most what was freed, the rest
    assert footprint.process_bytes(**kw, uses_nvme=False, pooled_resident_bytes=7000) == 8000 + 1000 + 3000 + 500
    assert footprint.process_bytes(**kw, uses_nvme=False, pooled_resident_bytes=8000) == 8000 + 3000 + 500


def test_mappings_count_at_their_joint_peak_and_the_heaps_activations_at_their_own():
    """The pool (8000 at its peak) and large activations, each a mapping of its own, peak apart:
    they count as the most they held together (9000), not 8000 + 3000; the activations the heap
    keeps (1000 of the 3000) and the backward's temporaries add whenever they peaked."""
    kw = dict(device_peak_bytes=1, pooled_peak_bytes=8000, act_peak_bytes=3000, workspace_bytes=500, device=CPU,
              uses_nvme=False)
    assert footprint.process_bytes(**kw, mapped_peak_bytes=9000, heap_act_peak_bytes=1000) == 9000 + 2000 + 1000 + 500
    # without the split every activation is the heap's, as before
    assert footprint.process_bytes(**kw) == footprint.process_bytes(**kw, mapped_peak_bytes=8000,
                                                                     heap_act_peak_bytes=3000)


def test_storages_from_the_heaps_threshold_up_are_returned_when_freed():
    t = footprint.HEAP_MMAP_THRESHOLD_BYTES
    assert footprint.returned_bytes((t - 1, t, 3 * t, 10)) == 4 * t
    assert footprint.returned_bytes(()) == 0


def test_the_simulator_splits_activations_by_their_storages_and_a_copy_is_one_storage():
    """A block saved one storage past the heap's threshold and one below: as its forward saved
    them they split; a swap's flat copy on the host and a recompute block's input are each one
    storage; chunks are pooled mappings; files on the NVMe tier are no memory at all."""
    from memtrain.planner.simulate import _memory_groups

    t = footprint.HEAP_MMAP_THRESHOLD_BYTES
    blk = dataclasses.replace(block("blocks.1", {"w": 4}, act=t + 100), saved_storage_bytes=(t, 100))
    groups = _memory_groups([blk, block("blocks.2", {"v": 4}, act=50)])
    assert dict(groups("device", "act:blocks.1:0", t + 100)) == {"act": t + 100, "mapped": t, "heap_act": 100}
    assert dict(groups("host", "act:blocks.1:0", t + 100)) == {"act": t + 100, "mapped": t + 100, "heap_act": 0}
    assert dict(groups("device", "act:blocks.1:3", 100)) == {"act": 100, "mapped": 0, "heap_act": 100}
    assert dict(groups("device", "act:blocks.2:0", 50)) == {"act": 50, "mapped": 0, "heap_act": 50}  # not recorded
    assert dict(groups("host", "buffer:c3", 7)) == {"pooled": 7, "mapped": 7}
    assert groups("nvme", "act:blocks.1:0", t + 100) == ()


def test_optimizer_temporaries_past_the_heaps_threshold_come_on_top_of_what_the_heap_kept():
    kw = dict(device_peak_bytes=1, pooled_peak_bytes=8000, pooled_resident_bytes=8000, act_peak_bytes=3000,
              workspace_bytes=500, device=CPU, uses_nvme=False)
    big = footprint.HEAP_MMAP_THRESHOLD_BYTES
    # mappings of their own: the heap still holds the activations' and the backward's high-water
    assert footprint.process_bytes(**kw, optimizer_workspace_bytes=2 * big, optimizer_temporary_bytes=big) == \
        8000 + 3000 + 500 + 2 * big
    # below the threshold they reuse what the heap kept
    assert footprint.process_bytes(**kw, optimizer_workspace_bytes=2000, optimizer_temporary_bytes=1000) == \
        8000 + 3000 + 500
    assert footprint.process_bytes(**kw, optimizer_workspace_bytes=6000, optimizer_temporary_bytes=3000) == 8000 + 6000


def test_the_heaps_threshold_is_the_one_the_runtime_sets():
    from memtrain.runtime import process_memory

    assert process_memory.MMAP_THRESHOLD_BYTES == footprint.HEAP_MMAP_THRESHOLD_BYTES


def test_a_swap_nvme_plans_process_bytes_count_its_memory_not_its_files():
    """Every block on swap_nvme, every chunk on the device: the activations in memory at once are
    one block's device copy and its host staging, or a block being read back beside the one in
    backward, never the files; the heap keeps the device copies' high-water; the device chunk's optimizer temporaries (two N·4, each past the
    heap's threshold) come on top of the heap's high-water."""
    from memtrain.cluster import catalog
    from memtrain.cluster.spec import HostSpec
    from memtrain.planner.analyze import analyze
    from memtrain.planner.plan import TrainShape
    from memtrain.planner.search import predicted_process_bytes
    from memtrain.planner.simulate import simulate_step
    from memtrain.config import ModelConfig

    over = {"num_layers": 4, "hidden_size": 256, "num_heads": 4, "vocab_size": 2048, "max_seq_len": 128}
    stats = analyze(ModelConfig(preset="tiny", overrides=over), seq_len=128, micro_batch_size=1, dtype="fp32")
    cpu = catalog.cpu_device_spec(num_cpus=2, memory_bytes=8 << 30)
    host = HostSpec(memory_bytes=8 << 30, num_cpus=2, memory_bw_gbps=10.0, cpu_adam_params_per_s=1e8)
    nvme = catalog.default_nvme_spec("/tmp", 1 << 40)
    n = stats.num_params
    chunk = ChunkPlan(index=0, num_elems=n, param_names=tuple(p for b in stats.blocks for p in b.param_names
                                                              if p not in b.shared_param_names), home=Tier.DEVICE)
    policy = MemoryPolicy(chunk_size_elems=n, chunks=(chunk,), prefetch_depth=1,
                          activations=(ActPolicy.SWAP_NVME,) * len(stats.blocks))
    train = TrainShape(global_batch_size=4, micro_batch_size=2, num_microbatches=2, seq_len=128, dtype="fp32",
                       optimizer="adamw")
    sim = simulate_step(stats, train, cpu, host, nvme, policy, timeline=False)
    a = [b.activation_bytes for b in stats.scaled(2).blocks]
    assert sim.act_peak_bytes == max(a[i] + a[i + 1] for i in range(len(a) - 1)) < sum(a)
    assert sim.peak_bytes["nvme"] > 0  # the files, which the process does not hold
    temporary = n * 4
    assert temporary >= footprint.HEAP_MMAP_THRESHOLD_BYTES
    chunk_bytes = n * (4 + 4 + 8)  # fp32 params, gradient accumulator, AdamW's m and v
    # A layer's host staging (one flat storage past the heap's threshold) is a mapping of its own,
    # counted with the chunk; its device copy (storages under it) and the embedding's small
    # activations are the heap's, which keeps their high-water.
    embed, layer = a[0], a[1]
    assert max(stats.scaled(2).blocks[1].saved_storage_bytes) < footprint.HEAP_MMAP_THRESHOLD_BYTES <= layer
    assert sim.mapped_peak_bytes == chunk_bytes + layer
    assert sim.heap_act_peak_bytes == layer + embed
    assert predicted_process_bytes(stats, train, cpu, policy, sim) == (
        chunk_bytes + layer + layer + embed + footprint.workspace_bytes(stats.scaled(2)) + 2 * temporary
        + footprint.NVME_IO_BYTES)


def test_the_planner_slack_is_the_pools():
    assert footprint.POOL_SLACK == bufpool.SLACK


def test_on_a_cpu_device_the_whole_process_must_fit_both_budgets_together():
    """Each tier can fit its own budget while the process (the buffer pool's slack included) does
    not: on a CPU device, where both tiers are one RAM, such a plan is refused."""
    from memtrain.cluster.spec import HostSpec
    from memtrain.cluster import catalog
    from memtrain.planner.analyze import analyze
    from memtrain.planner.search import plan
    from memtrain.config import ModelConfig

    cpu = catalog.cpu_device_spec(num_cpus=2, memory_bytes=8 << 30)
    host = HostSpec(memory_bytes=8 << 30, num_cpus=2, memory_bw_gbps=10.0, cpu_adam_params_per_s=1e8)
    stats = analyze(ModelConfig(preset="tiny"), seq_len=64)

    def plan_with(device_bytes, host_bytes):
        return plan(stats, name="t", global_batch_size=4, micro_batch_size=2, dtype="fp32", optimizer="adamw",
                    device=cpu, host=host, nvme=None, budgets={"device": device_bytes, "host": host_bytes, "nvme": 0},
                    safety_margin=0.1)

    # Host-home chunks: their device buffers come and go, and the pool keeps some of what they
    # free. Here a placement fits each tier's budget, but not the process in both together.
    chosen = plan_with(2700 << 10, 2100 << 10)
    refused = [a.reason for a in chosen.alternatives if a.reason.startswith("does not fit: the process needs")]
    assert chosen.fits and refused and "budgets together" in refused[0]
    # whatever fits leaves the process within the two budgets
    for device_kib in (2300, 2700, 3100):
        for host_kib in (1500, 1900, 2300):
            p = plan_with(device_kib << 10, host_kib << 10)
            if p.fits:
                assert p.prediction.devices[0].process_bytes <= (device_kib + host_kib) << 10
