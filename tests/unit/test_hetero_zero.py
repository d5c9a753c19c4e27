"""ZeRO in the heterogeneous planner: a stage's sharded states (planner.stage_cost [Note: ZeRO in a
stage's estimate]) and the step's end (planner.hetero_plan [Note: ZeRO at the step's end])."""

from __future__ import annotations

import pytest
from test_hetero import A100, one_node, uniform_stats

from memtrain.planner import cost
from memtrain.planner.hetero import plan_cluster
from memtrain.planner.plan import Op, Plan

N = 4 * 50_000_000
"""Parameters per stage: 8 blocks of 50M over 2 stages (8 MiB of activations a block: the sum's copy
of the gradient, not the activations, makes the peak)."""


def _plan(zero: int) -> Plan:
    return plan_cluster(uniform_stats(8, params=50_000_000, act=8 * 2**20), one_node(A100, A100, A100, A100), name="z",
                        global_batch_size=16, micro_batch_size=1, dtype="bf16", optimizer="adamw", pipeline_degree=2,
                        data_parallel_degree=2, schedules=("1f1b",), stage_blocks=(4, 4), zero=zero)


def test_zero_shards_the_states_and_zero2_hides_its_reduce_under_the_last_backward():
    plain, zero1, zero2 = _plan(0), _plan(1), _plan(2)
    # fp32 parameters, gradients and AdamW's two states (planner.stage_cost [Note: a device stage's
    # states]); ZeRO keeps the states of half of them per copy with that half's fp32 copy
    o = cost.optimizer_state_bytes_per_elem("adamw")
    for r in range(2):
        static = {name: p.prediction.devices[r].breakdown["device"]["states, buffers, workspace"]
                  for name, p in (("0", plain), ("1", zero1), ("2", zero2))}
        assert static["0"] - static["1"] == N * (4 + 4 + o) - (N * (4 + 4) + N // 2 * (4 + o))
        assert static["1"] == static["2"]
        # after the sum each copy keeps half the fp32 gradient: the memory line ends that much lower
        for p in (zero1, zero2):
            line = [m for m in p.prediction.devices[r].memory_timeline if m.tier == "device"]
            assert line[0].bytes - line[-1].bytes == 4 * N // 2
        # ZeRO-1 copies the whole gradient into one flat buffer to reduce-scatter it; ZeRO-2 two buckets
        peak1, peak2 = (p.prediction.devices[r].peak_bytes["device"] for p in (zero1, zero2))
        assert peak1 >= static["1"] + 4 * N and peak2 < peak1
    # the shard's update is half the work; ZeRO-2's reduce-scatter mostly runs under the last backward
    assert zero2.prediction.step_time_s < zero1.prediction.step_time_s < plain.prediction.step_time_s
    ar1 = [r.allreduce_s for r in zero1.pipeline.ranks]
    ar2 = [r.allreduce_s for r in zero2.pipeline.ranks]
    assert all(b < a for a, b in zip(ar1, ar2)) and ar1 == [r.allreduce_s for r in plain.pipeline.ranks]
    # the program says where: each stage's REDUCE_SCATTER before its last B (ZeRO-2 only)
    for p, want in ((zero1, 0), (zero2, 1)):
        for r, acts in p.schedule.items():
            assert sum(1 for a in acts if a.op is Op.REDUCE_SCATTER) == want
    assert Plan.from_json(zero2.to_json()).schedule == zero2.schedule


def test_zero_with_one_copy_is_no_sharding():
    one = plan_cluster(uniform_stats(8, params=50_000_000), one_node(A100, A100), name="z", global_batch_size=16,
                       micro_batch_size=1, dtype="bf16", optimizer="adamw", pipeline_degree=2, data_parallel_degree=1,
                       schedules=("1f1b",), stage_blocks=(4, 4), zero=2)
    assert not any(a.op is Op.REDUCE_SCATTER for acts in one.schedule.values() for a in acts)
    assert one.prediction.step_time_s == pytest.approx(plan_cluster(
        uniform_stats(8, params=50_000_000), one_node(A100, A100), name="z", global_batch_size=16, micro_batch_size=1,
        dtype="bf16", optimizer="adamw", pipeline_degree=2, data_parallel_degree=1, schedules=("1f1b",),
        stage_blocks=(4, 4)).prediction.step_time_s)


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_a_ranks_memory_line_reaches_its_peak_with_a_device_and_an_offloaded_stage(zero):
    """V-Half over 2 ranks × 2 copies, stages of 1, 1, 1 and 5 blocks: rank 0 keeps stage 0 on the
    device and offloads stage 3 (too large for its half of the budget), rank 1 keeps stages 1 and
    2. After the passes a rank holds the largest of its stages' gradient copies for the sum
    (stage 3's flat copy under ZeRO-0 and -1, the whole gradient of its 5 blocks; under ZeRO-2
    its copy of one chunk for its reduce), which is in its peak; its memory line draws it there, so the line's
    highest point is the peak, and the breakdown names it."""
    p = 10_000_000
    plan = plan_cluster(uniform_stats(8, params=p, act=2**20), one_node(A100, A100, A100, A100), name="z",
                        global_batch_size=16, micro_batch_size=1, dtype="bf16", optimizer="adamw", pipeline_degree=2,
                        data_parallel_degree=2, schedules=("v-half",), stage_blocks=(1, 1, 1, 5), zero=zero,
                        device_budget=120 * p, safety_margin=0.0)
    assert plan.pipeline.stage_ranks == (0, 1, 1, 0)
    assert [r.offload for r in plan.pipeline.ranks[:2]] == [f"stage 3: {5 * p:,} params off the device, on the host", ""]
    for dev in plan.prediction.devices:
        line = [m for m in dev.memory_timeline if m.tier == "device"]
        assert max(m.bytes for m in line) == dev.peak_bytes["device"], (dev.rank, zero)
    rank0 = plan.prediction.devices[0].breakdown["device"]
    copy = 4 * 5 * p if zero < 2 else 4 * p  # ZeRO-2: stage 3's copy of one chunk (a block) for its reduce
    assert rank0["gradient copies"] == copy
    assert plan.prediction.devices[0].peak_bytes["device"] == rank0["states, buffers, workspace"] + copy
