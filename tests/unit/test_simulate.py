"""The event simulator on tiny graphs, and simulate_step against docs/memory-accounting.md
(the whole step's extrapolation, timeline, bound and program order: test_simulate_timeline.py)."""

from __future__ import annotations

import pytest
from simulate_toy import DEV, FLOPS, HOST, MB, NVME, make_stats, policy, train  # the toy machine and model

from memtrain.cluster.spec import NvmeSpec
from memtrain.planner import cost
from memtrain.planner.bounds import stream_work_s
from memtrain.planner.plan import ActPolicy, ChunkPlan, MemoryPolicy, Tier
from memtrain.planner.simulate import (
    MAX_NVME_SWAP_WRITES_IN_FLIGHT, NVME_OPTIM_STAGED_CHUNKS, TaskGraph, simulate_graph, simulate_step,
)
from memtrain.planner.stats import BlockStats, DType, ModelStats


# --- the engine ---------------------------------------------------------------------------


def test_streams_overlap_and_run_in_order():
    g = TaskGraph()
    a = g.add("a", "compute", 1.0)
    b = g.add("b", "h2d", 1.0)
    c = g.add("c", "compute", 0.5)
    d = g.add("d", "d2h", 1.0, deps=(a,))
    e = g.add("e", "h2d", 1.0, deps=(d,))
    f = g.add("f", "h2d", 0.25)  # could run at 1.0, but h2d is in order behind e (CUDA stream rule)
    r = simulate_graph(g)
    assert (r.start_s[a], r.finish_s[a]) == (0.0, 1.0)
    assert (r.start_s[b], r.finish_s[b]) == (0.0, 1.0)  # other stream: overlaps a
    assert (r.start_s[c], r.finish_s[c]) == (1.0, 1.5)  # same stream: after a
    assert (r.start_s[d], r.finish_s[d]) == (1.0, 2.0)  # after its dependency
    assert (r.start_s[e], r.finish_s[e]) == (2.0, 3.0)
    assert (r.start_s[f], r.finish_s[f]) == (3.0, 3.25)
    assert r.end_s == 3.25


def test_memory_peak_and_breakdown_by_owner():
    g = TaskGraph()
    a = g.add("a", "compute", 1.0, alloc_start=[("device", "act:0:0", 100)])
    b = g.add("b", "h2d", 1.0, alloc_end=[("device", "buffer:param:1", 50)], alloc_start=[("host", "staging:1", 7)])
    g.add("c", "compute", 0.5, free_end=[("device", "act:0:0", 100)])
    g.add("d", "d2h", 1.0, deps=(b,), free_end=[("device", "buffer:param:1", 50), ("host", "staging:1", 7)])
    # starts exactly when c frees act:0:0: frees at an instant come before allocations
    g.add("e", "compute", 1.0, deps=(a,), alloc_start=[("device", "act:1:0", 120)], free_end=[("device", "act:1:0", 120)])
    r = simulate_graph(g)
    assert r.peak_bytes == {"device": 170, "host": 7}
    assert r.peak_owners["device"] == {"buffer:param:1": 50, "act:1:0": 120}
    assert r.breakdown()["device"] == {"buffer": 50, "act": 120}


def test_zero_length_tasks_hold_their_bytes_at_their_instant():
    g = TaskGraph()
    g.add("a", "compute", 0.0, alloc_start=[("device", "x", 10)], free_end=[("device", "x", 10)])
    g.add("b", "compute", 1.0, alloc_start=[("device", "y", 5)], free_end=[("device", "y", 5)])
    r = simulate_graph(g)
    assert r.peak_bytes["device"] == 10  # a ended at 0 before b started


def test_dependencies_must_point_backwards():
    g = TaskGraph()
    with pytest.raises(AssertionError):
        g.add("a", "compute", 1.0, deps=(0,))


# --- one training step --------------------------------------------------------------------


def test_all_on_device_keep_peak_is_chunks_plus_one_microbatch_of_activations():
    acts = [100 * MB, 200 * MB, 300 * MB]
    stats = make_stats(acts)
    pol = policy(stats, [Tier.DEVICE] * 3, [ActPolicy.KEEP] * 3)
    r = simulate_step(stats, train(3), DEV, HOST, None, pol)
    chunks = sum(cost.chunk_bytes(Tier.DEVICE, b.num_params, "bf16", "adamw")[Tier.DEVICE] for b in stats.blocks)
    assert r.peak_bytes == {"device": chunks + sum(acts), "host": 0, "nvme": 0}
    assert r.breakdown["device"] == {"chunk": chunks, "act": sum(acts)}
    optim = cost.device_optimizer_time_s(stats.num_params, "bf16", "adamw", DEV)
    assert r.step_time_s == pytest.approx(3 * 3 * (0.1 + 0.2) + optim)
    assert r.tokens_per_s == pytest.approx(3 * 8 / r.step_time_s)
    assert r.mfu == pytest.approx(3 * 3 * 3 * FLOPS / (r.step_time_s * 100e12))


def test_runtime_overhead_adds_to_every_block_call_and_micro_batch():
    import dataclasses

    acts = [100 * MB, 200 * MB, 300 * MB]
    plain = make_stats(acts)
    pol = policy(plain, [Tier.DEVICE] * 3, [ActPolicy.KEEP] * 3)
    over = dataclasses.replace(plain, overhead_block_fwd_s=0.01, overhead_block_bwd_s=0.02, overhead_param_s=0.003,
                               overhead_microbatch_s=0.05)
    base = simulate_step(plain, train(3), DEV, HOST, None, pol)
    r = simulate_step(over, train(3), DEV, HOST, None, pol)
    # Per micro-batch: 3 forward calls, 3 backward calls, one parameter tensor per block, and
    # the engine's own bookkeeping; all on the compute stream, so the step grows by exactly that.
    per_mb = 3 * 0.01 + 3 * (0.02 + 1 * 0.003) + 0.05
    assert r.step_time_s == pytest.approx(base.step_time_s + 3 * per_mb)
    assert r.peak_bytes == base.peak_bytes  # time only
    f = next(e for e in r.timeline if e.name == "F0:1")
    b = next(e for e in r.timeline if e.name == "B0:1")
    assert f.end_s - f.start_s == pytest.approx(0.1 + 0.01)
    assert b.end_s - b.start_s == pytest.approx(0.2 + 0.02 + 0.003)
    # The search's lower bound counts the same work.
    assert stream_work_s(over, train(3), DEV, HOST, None, pol)["compute"] == pytest.approx(
        stream_work_s(plain, train(3), DEV, HOST, None, pol)["compute"] + 3 * per_mb)
    # The recompute's forward runs the hooks again.
    rc = policy(plain, [Tier.DEVICE] * 3, [ActPolicy.RECOMPUTE] * 3)
    rebuilt = next(e for e in simulate_step(over, train(2), DEV, HOST, None, rc).timeline if e.name == "R0:2")
    assert rebuilt.end_s - rebuilt.start_s == pytest.approx(0.1 + 0.01)


def test_chunk_fetch_overhead_runs_on_the_training_thread_per_fetch():
    import dataclasses

    plain = make_stats([100 * MB, 200 * MB, 300 * MB])
    pol = policy(plain, [Tier.HOST] * 3, [ActPolicy.KEEP] * 3, depth=2)
    over = dataclasses.replace(plain, overhead_chunk_fetch_s=0.004)
    r = simulate_step(over, train(3), DEV, HOST, None, pol)
    fetches = sum(e.name.startswith("PREFETCH") for e in r.timeline)
    # chunks kept across pass ends are not fetched again ([Note: across pass ends]): fewer than 2 per block and pass
    assert 0 < fetches < 2 * 3 * 3
    marks = [e for e in r.timeline if e.name.startswith("alloc") and e.stream == "compute"]
    assert sum(e.end_s - e.start_s for e in marks) == pytest.approx(fetches * 0.004)
    assert r.step_time_s > simulate_step(plain, train(3), DEV, HOST, None, pol).step_time_s
    assert stream_work_s(over, train(3), DEV, HOST, None, pol)["compute"] == pytest.approx(
        stream_work_s(plain, train(3), DEV, HOST, None, pol)["compute"] + fetches * 0.004)


def test_recompute_holds_inputs_and_one_rebuilt_block():
    acts, inputs = [100 * MB, 200 * MB, 300 * MB], [10 * MB, 20 * MB, 30 * MB]
    stats = make_stats(acts, inputs)
    pol = policy(stats, [Tier.DEVICE] * 3, [ActPolicy.RECOMPUTE] * 3)
    r = simulate_step(stats, train(2), DEV, HOST, None, pol)
    chunks = sum(cost.chunk_bytes(Tier.DEVICE, b.num_params, "bf16", "adamw")[Tier.DEVICE] for b in stats.blocks)
    # during block j's recompute+backward: inputs of blocks <= j, plus A_j
    expect = max(sum(inputs[: j + 1]) + acts[j] for j in range(3))
    assert r.peak_bytes["device"] == chunks + expect
    optim = cost.device_optimizer_time_s(stats.num_params, "bf16", "adamw", DEV)
    assert r.step_time_s == pytest.approx(2 * 3 * (0.1 + 0.1 + 0.2) + optim)


def test_swap_host_moves_activations_to_the_host_and_back():
    acts = [300 * MB, 100 * MB, 200 * MB]
    stats = make_stats(acts)
    pol = policy(stats, [Tier.DEVICE] * 3, [ActPolicy.SWAP_HOST, ActPolicy.KEEP, ActPolicy.KEEP])
    r = simulate_step(stats, train(2), DEV, HOST, None, pol)
    chunks = sum(cost.chunk_bytes(Tier.DEVICE, b.num_params, "bf16", "adamw")[Tier.DEVICE] for b in stats.blocks)
    # block 0 is copied out during F1 (15 ms < 0.1 s) and copied back in once B2 has ended
    assert r.peak_bytes["device"] == chunks + max(acts[1] + acts[2], acts[0] + acts[1])
    assert r.peak_bytes["host"] == acts[0]
    keep = simulate_step(stats, train(2), DEV, HOST, None, policy(stats, [Tier.DEVICE] * 3, [ActPolicy.KEEP] * 3))
    assert r.step_time_s == pytest.approx(keep.step_time_s)  # the copies hide under compute
    names = [e.name for e in r.timeline]
    assert names.index("SWAP_IN0:0") > names.index("B0:2")


def test_swap_nvme_goes_through_host_staging_to_disk():
    acts = [300 * MB, 100 * MB, 200 * MB]
    stats = make_stats(acts)
    pol = policy(stats, [Tier.DEVICE] * 3, [ActPolicy.SWAP_NVME, ActPolicy.KEEP, ActPolicy.KEEP])
    r = simulate_step(stats, train(2), DEV, HOST, NVME, pol)
    assert r.peak_bytes["nvme"] == cost.nvme_file_bytes(acts[0])  # header + padding, as the store counts it
    assert r.peak_bytes["host"] == acts[0]  # staging while writing, and again while reading
    streams = {e.name: e.stream for e in r.timeline}
    assert streams["write0:0"] == "disk" and streams["read0:0"] == "disk"
    with pytest.raises(ValueError, match="NVMe"):
        simulate_step(stats, train(2), DEV, HOST, None, pol)


def test_swap_nvme_staging_is_bounded_by_the_writes_in_flight_whatever_the_disk():
    # [Note: bounded NVMe writes] four swap_nvme blocks: on a disk far slower than the forward the
    # copy-out of block i waits for the write of block i - 1, so one block's staging exists at a
    # time and the forward stalls; a fast disk gives the same peaks in less time.
    assert MAX_NVME_SWAP_WRITES_IN_FLIGHT == 1
    acts = [300 * MB, 100 * MB, 200 * MB, 250 * MB]
    stats = make_stats(acts)
    pol = policy(stats, [Tier.DEVICE] * 4, [ActPolicy.SWAP_NVME] * 4)
    slow_disk = NvmeSpec(path="/tmp/nvme", capacity_bytes=10**13, read_gbps=0.5, write_gbps=0.5)
    fast, slow = (simulate_step(stats, train(2), DEV, HOST, d, pol, max_simulated_microbatches=None) for d in (NVME, slow_disk))
    assert fast.peak_bytes == slow.peak_bytes
    chunks = sum(cost.chunk_bytes(Tier.DEVICE, b.num_params, "bf16", "adamw")[Tier.DEVICE] for b in stats.blocks)
    assert slow.peak_bytes["device"] == chunks + max(acts)  # a block's A comes back when its backward claims it
    # one staging while writing; while reading, block j's staging lives until its copy-in (from
    # its claim) ends, and block j-1's read starts right after the claim
    assert slow.peak_bytes["host"] == max(acts[j] + acts[j - 1] for j in range(1, 4))
    assert slow.step_time_s > fast.step_time_s
    ev = {e.name: e for e in slow.timeline}
    for i in range(1, 4):
        assert ev[f"SWAP_OUT0:{i}"].start_s >= ev[f"write0:{i - 1}"].end_s
        if i < 3:  # the training thread waits, so the next forward stalls too
            assert ev[f"F0:{i + 1}"].start_s >= ev[f"write0:{i - 1}"].end_s > ev[f"F0:{i}"].end_s
        assert ev[f"wait0:{i - 1}"].end_s == pytest.approx(ev[f"write0:{i - 1}"].end_s)
    # the last write is waited for when the backward starts, each read's staging goes when its
    # block's backward claims it, before the next read takes its own
    assert ev["alloc0:3:act"].start_s >= ev["wait0:3"].end_s
    for j in range(3, 0, -1):
        assert ev[f"claim0:{j}"].end_s <= ev[f"alloc0:{j - 1}:act"].start_s <= ev[f"B0:{j}"].start_s


@pytest.mark.parametrize("ahead", [0, 1, 2])
def test_swap_ins_start_where_the_program_puts_them(ahead):
    """planner.program_swaps [Note: the swap rules]: block k's SWAP_IN follows the backward marker
    of block k + swap_in_ahead (the top blocks' at the backward's start), and the simulator
    starts its copy there: when that block's backward starts, so the copy overlaps it."""
    import dataclasses

    acts = [300 * MB, 100 * MB, 200 * MB, 250 * MB, 50 * MB]
    stats = make_stats(acts)
    pol = dataclasses.replace(policy(stats, [Tier.DEVICE] * 5, [ActPolicy.SWAP_HOST] * 5), swap_in_ahead=ahead)
    r = simulate_step(stats, train(1), DEV, HOST, None, pol)
    ev = {e.name: e for e in r.timeline}
    for k in range(5):
        if k + ahead + 1 < 5:  # when block k + ahead's backward starts (the one above has ended)
            assert ev[f"SWAP_IN0:{k}"].start_s == pytest.approx(ev[f"B0:{k + ahead + 1}"].end_s)
        else:  # issued at the backward's start, queued behind the copies issued before it
            assert ev[f"SWAP_IN0:{k}"].start_s < ev["B0:4"].end_s
        assert ev[f"SWAP_IN0:{k}"].end_s <= ev[f"B0:{k}"].start_s
    # the blocks brought back ahead are on the device together with the one in backward
    chunks = sum(cost.chunk_bytes(Tier.DEVICE, b.num_params, "bf16", "adamw")[Tier.DEVICE] for b in stats.blocks)
    assert r.peak_bytes["device"] == chunks + max(sum(acts[max(0, j - ahead): j + 1]) for j in range(5))


def test_prefetch_depth_bounds_param_buffers_and_overlap():
    n_elems = 10**9  # 2 GB bf16 buffers: 0.08 s to copy in, 0.1 s out
    stats = make_stats([1 * MB, 1 * MB], params=[n_elems, n_elems])
    one = simulate_step(stats, train(1), DEV, HOST, None, policy(stats, [Tier.HOST] * 2, [ActPolicy.KEEP] * 2, depth=1))
    ev = {e.name: e for e in one.timeline}
    assert ev["PREFETCH0@c1:F"].start_s >= ev["F0:0"].end_s  # one buffer: no prefetch under F0
    assert ev["PREFETCH0@c0:B"].start_s >= ev["B0:1"].end_s
    # peak at B0's start: param buffer c0, grad buffer c0, and c1's grad still being copied out
    assert one.peak_bytes["device"] == 3 * 2 * n_elems + 1 * MB
    assert one.breakdown["device"] == {"buffer": 3 * 2 * n_elems, "act": 1 * MB}
    # host: both chunks, and the pinned landing buffer of the flush in flight (offload.grads)
    landing = cost.grad_landing_bytes(n_elems, "bf16", DEV)
    assert landing == 2 * n_elems
    assert one.peak_bytes["host"] == 2 * cost.chunk_bytes(Tier.HOST, n_elems, "bf16", "adamw")[Tier.HOST] + landing
    two = simulate_step(stats, train(1), DEV, HOST, None, policy(stats, [Tier.HOST] * 2, [ActPolicy.KEEP] * 2, depth=2))
    ev2 = {e.name: e for e in two.timeline}
    assert ev2["PREFETCH0@c1:F"].start_s == pytest.approx(ev2["PREFETCH0@c0:F"].end_s)  # prefetched under F0
    assert two.step_time_s < one.step_time_s


def test_nvme_chunk_holds_host_accumulator_until_its_optimizer_step_ends():
    n_elems = 10**8
    stats = make_stats([1 * MB], params=[n_elems])
    r = simulate_step(stats, train(2), DEV, HOST, NVME, policy(stats, [Tier.NVME], [ActPolicy.KEEP]))
    files = cost.nvme_chunk_file_bytes(n_elems, "bf16", "adamw")
    assert files == sum(4096 + -(-b // 4096) * 4096 for b in (4 * n_elems, 4 * n_elems, 4 * n_elems, 2 * n_elems))
    # the write-back holds every file's old and new copy until its rename
    assert r.peak_bytes["nvme"] == 2 * files
    # accumulator (4N) + optimizer staging (master, m, v, bf16 copy: 14N), taken when the update is
    # queued, while the last flush's landing buffer (2N) waits for its add
    assert r.peak_bytes["host"] == 4 * n_elems + 14 * n_elems + 2 * n_elems
    assert r.breakdown["host"] == {"chunk": 4 * n_elems, "staging": (14 + 2) * n_elems}
    ev = {e.name: e for e in r.timeline}
    # the states are read once the last micro-batch's backward of the chunk ends; the update
    # waits for them and for the gradient's accumulation. Its write-back runs on into the next
    # step (offload.optim [Note: write-backs across the step end]): the step begins with the last
    # step's, whose staging goes when the training thread waits for it: here at the chunk's own
    # next update ([Note: carried write-backs released lazily]), before its new staging is taken.
    assert ev["read-states@c0"].start_s == pytest.approx(ev["B1:0"].end_s)
    assert ev["OPTIM@c0"].start_s == pytest.approx(max(ev["read-states@c0"].end_s, ev["accum1@c0"].end_s))
    assert ev["write-states@c0:carried"].start_s == 0.0
    assert ev["release@c0:carried"].start_s == pytest.approx(max(ev["write-states@c0:carried"].end_s, ev["B1:0"].end_s))
    assert ev["release@c0:carried"].end_s <= ev["alloc@c0:states"].start_s
    assert ev["zero_grad"].start_s >= ev["wait-updates"].end_s
    assert "write-states@c0" not in ev and "wait@c0" not in ev


@pytest.mark.parametrize("staged", [1, NVME_OPTIM_STAGED_CHUNKS, 6])
def test_nvme_chunks_stream_through_three_stagings(staged):
    import dataclasses

    n_elems = 10**8
    stats = make_stats([1 * MB] * 4, params=[n_elems] * 4)
    pol = dataclasses.replace(policy(stats, [Tier.NVME] * 4, [ActPolicy.KEEP] * 4, depth=2), optim_staged_chunks=staged)
    files = cost.nvme_chunk_file_bytes(n_elems, "bf16", "adamw")
    # Early updates ([Note: early optimizer step]): at most optim_staged_chunks staged (of the 4), each
    # rewrite's second copy held from queueing to its wait (an upper bound of the runtime's).
    r = simulate_step(stats, train(1), DEV, HOST, NVME, pol)
    # (with more slots than chunks, carried write-backs and states read ahead share them:
    # offload.optim [Note: carried write-backs released lazily])
    # (+ 2N: the landing buffer of the gradient flush in flight)
    assert 4 * 4 * n_elems + min(staged, 4) * 14 * n_elems <= r.peak_bytes["host"] <= (4 * 4 + 2) * n_elems + staged * 14 * n_elems
    assert r.peak_bytes["nvme"] == (4 + min(staged, 4)) * files
    # fp16 steps after the backward: read one ahead while stepping one, the previous write-back in flight
    fp16 = dataclasses.replace(train(1), dtype=DType.FP16)
    r = simulate_step(stats, fp16, DEV, HOST, NVME, pol)
    assert r.peak_bytes["host"] == 4 * 4 * n_elems + 3 * 14 * n_elems
    assert r.peak_bytes["nvme"] in (5 * files, 6 * files)  # one or two rewrites in flight


@pytest.mark.parametrize("home", [Tier.HOST, Tier.NVME])
def test_offloaded_updates_start_in_the_last_backward_except_under_fp16_or_clipping(home):
    import dataclasses

    n_elems = 10**9  # CPU Adam at 1e9/s: 1 s per chunk, against 0.2 s per block's backward
    stats = make_stats([1 * MB] * 4, params=[n_elems] * 4)
    pol = policy(stats, [home] * 4, [ActPolicy.KEEP] * 4, depth=2)
    host = dataclasses.replace(HOST, cpu_adam_params_per_s=1e9)
    # A disk with time to spare in the backward (a disk-bound step gains nothing from the overlap).
    nvme = dataclasses.replace(NVME, read_gbps=100.0, write_gbps=100.0)
    early = simulate_step(stats, train(2), DEV, host, nvme, pol)
    ev = {e.name: e for e in early.timeline}
    # chunk 3's gradients are complete after block 3's backward of the last micro-batch (plus its flush)
    assert ev["OPTIM@c3"].start_s >= ev["accum1@c3"].end_s
    assert ev["OPTIM@c3"].start_s < ev["B1:0"].end_s  # overlaps the rest of the backward
    assert ev["OPTIM@c3"].stream == "cpu"
    assert not any(e.name.startswith("OPTIM") and e.start_s < ev["B1:3"].end_s for e in early.timeline)
    fp16 = simulate_step(stats, dataclasses.replace(train(2), dtype=DType.FP16), DEV, host, nvme, pol)
    ev16 = {e.name: e for e in fp16.timeline}
    assert min(e.start_s for e in fp16.timeline if e.name.startswith("OPTIM")) >= ev16["B1:0"].end_s
    assert early.step_time_s < fp16.step_time_s
    # gradient clipping needs every gradient first too (offload.clip): the updates wait for the backward
    clipped = simulate_step(stats, dataclasses.replace(train(2), clip_grad_norm=True), DEV, host, nvme, pol)
    evc = {e.name: e for e in clipped.timeline}
    assert min(e.start_s for e in clipped.timeline if e.name.startswith("OPTIM")) >= evc["B1:0"].end_s
    assert early.step_time_s < clipped.step_time_s


def test_on_a_cpu_device_host_cpu_work_shares_the_compute_stream():
    import dataclasses

    stats = make_stats([1 * MB, 1 * MB], params=[10**8, 10**8])
    pol = policy(stats, [Tier.HOST] * 2, [ActPolicy.KEEP] * 2, depth=2)
    gpu = simulate_step(stats, train(2), DEV, HOST, None, pol)
    cpu_dev = dataclasses.replace(DEV, kind="cpu")
    cpu = simulate_step(stats, train(2), cpu_dev, HOST, None, pol)
    assert {e.stream for e in gpu.timeline if e.name.startswith("OPTIM")} == {"cpu"}
    assert {e.stream for e in gpu.timeline if e.name.startswith("accum")} == {"grads"}  # offload.grads
    assert {e.stream for e in cpu.timeline if e.name.startswith(("accum", "OPTIM"))} == {"compute"}
    work = stream_work_s(stats, train(2), cpu_dev, HOST, None, pol)
    assert work["cpu"] == 0.0
    assert sum(e.end_s - e.start_s for e in cpu.timeline if e.stream == "compute") == pytest.approx(work["compute"])
    assert cpu.step_time_s >= gpu.step_time_s


def test_compressed_nvme_reads_use_the_zstd_model():
    import dataclasses

    n_elems = 10**8
    stats = make_stats([1 * MB] * 2, params=[n_elems] * 2)
    # one staged chunk: chunk 0's write-back is carried (its first fetch copies from host), chunk 1's is not
    pol = dataclasses.replace(policy(stats, [Tier.NVME] * 2, [ActPolicy.KEEP] * 2), compress_nvme=True,
                              optim_staged_chunks=1)
    r = simulate_step(stats, train(1), DEV, HOST, NVME, pol)
    read = next(e for e in r.timeline if e.name == "read0@c1:F")
    zstd = cost.zstd_model(HOST.num_cpus)
    assert read.end_s - read.start_s == pytest.approx(cost.disk_read_time_s(2 * n_elems, NVME, zstd))
    assert read.end_s - read.start_s < cost.disk_read_time_s(2 * n_elems, NVME)  # disk-bound: fewer bytes read


def test_validation_errors_name_the_field():
    stats = make_stats([MB, MB], params=[100, 100])
    with pytest.raises(ValueError, match="memory.activations"):
        simulate_step(stats, train(1), DEV, HOST, None, policy(stats, [Tier.DEVICE] * 2, [ActPolicy.KEEP]))
    one_chunk_two_blocks = policy(stats, [Tier.HOST], [ActPolicy.KEEP] * 2, depth=1, one_chunk=True)
    simulate_step(stats, train(1), DEV, HOST, None, one_chunk_two_blocks)  # one chunk per block: depth 1 is enough
    shared = MemoryPolicy(chunk_size_elems=100, chunks=(
        ChunkPlan(index=0, num_elems=100, param_names=("b0.w",), home=Tier.HOST),
        ChunkPlan(index=1, num_elems=100, param_names=("b1.w",), home=Tier.HOST)), prefetch_depth=1,
        activations=(ActPolicy.KEEP,) * 2)
    two_in_one = ModelStats(name="t", num_params=200, dtype=DType.BF16, micro_batch_size=1, seq_len=8, blocks=(
        BlockStats(name="b", num_params=200, param_bytes=400, activation_bytes=MB, input_bytes=MB, output_bytes=MB,
                   fwd_flops=FLOPS, bwd_flops=FLOPS, param_names=("b0.w", "b1.w")),))
    with pytest.raises(ValueError, match="prefetch_depth"):
        simulate_step(two_in_one, train(1), DEV, HOST, None,
                      MemoryPolicy(chunk_size_elems=100, chunks=shared.chunks, prefetch_depth=1, activations=(ActPolicy.KEEP,)))
