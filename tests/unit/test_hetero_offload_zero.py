"""ZeRO of offloaded stages in the heterogeneous planner: the states and gradient accumulators of
``1 / d`` of an offloaded stage's parameters, its CPU update of ``1 / d`` (planner.stage_cost
[Note: ZeRO in a stage's estimate]), ZeRO-2's reduce under the last backward and the program's
REDUCE_SCATTER for offloaded stages too (planner.hetero_plan [Note: ZeRO at the step's end];
runtime.stage_offload_zero)."""

from __future__ import annotations

from test_hetero import A100, GIB, one_node, uniform_stats

from memtrain.cluster.catalog import default_host_spec
from memtrain.planner import cost
from memtrain.planner.hetero import plan_cluster
from memtrain.planner.partition import Link, reduce_time_s
from memtrain.planner.plan import Op, TrainShape
from memtrain.planner.stage_cost import StageBudget, StageModel

PARAMS = 50_000_000
"""Parameters per block: 8 blocks, 4 a stage."""
TRAIN = TrainShape(global_batch_size=16, micro_batch_size=1, num_microbatches=8, seq_len=1024, dtype="bf16",
                   optimizer="adamw")
SHORT = StageBudget(device=2 * GIB, host=400 * GIB, nvme=0)
"""A device too small for a stage's states (4 × 50M parameters × 18 bytes): they go to the host."""


def _estimate(shards: int, zero: int):
    model = StageModel(uniform_stats(8, params=PARAMS, act=8 * 2**20), TRAIN, shards=shards, zero=zero)
    where = model.place(A100, default_host_spec(32, 512 * GIB), None, SHORT)
    return model, model.estimate(0, 4, where, in_flight=2, num_microbatches=8)


def test_an_offloaded_stage_keeps_a_shard_of_its_states_and_accumulators_on_the_host():
    _, plain = _estimate(1, 0)
    for zero in (1, 2):
        _, sharded = _estimate(2, zero)
        assert "params" in plain.offload and "params" in sharded.offload and plain.fits and sharded.fits
        # the same parameters left the device in both: all of them (the runtime offloads a stage whole)
        assert plain.offload == sharded.offload and plain.offload.endswith(" params off the device, on the host")
        off = int(plain.offload.split()[0].replace(",", ""))
        assert off == 4 * PARAMS
        per = cost.chunk_bytes("host", 1, "bf16", "adamw")["host"]  # 4 + 4 + 8 + 2: master, accumulator, states, bf16
        sharded_per = 4 + cost.optimizer_state_bytes_per_elem("adamw")  # the accumulator and the states
        assert plain.host_bytes - sharded.host_bytes == off * (sharded_per // 2), (plain.host_bytes, sharded.host_bytes)
        assert (per - sharded_per // 2) * 3 == per * 2  # a third of each offloaded parameter's host bytes saved
        # the CPU update of half the parameters
        host = default_host_spec(32, 512 * GIB)
        saved = cost.cpu_optimizer_time_s(off, "adamw", host) - cost.cpu_optimizer_time_s(off // 2, "adamw", host)
        assert abs((plain.tail_s - sharded.tail_s) - saved) < 1e-9 and saved > 0


def test_zero2_hides_an_offloaded_stages_reduce_under_its_last_backward():
    link = Link(gbps=10.0, latency_s=1e-5)
    m1, e1 = _estimate(2, 1)
    m2, e2 = _estimate(2, 2)
    full = reduce_time_s(m1, "1f1b", e1, 4 * PARAMS, 2, link)
    assert full == reduce_time_s(_estimate(1, 0)[0], "1f1b", _estimate(1, 0)[1], 4 * PARAMS, 2, link)
    assert reduce_time_s(m2, "1f1b", e2, 4 * PARAMS, 2, link) < full


def test_zero2_plans_reduce_scatter_for_offloaded_stages():
    """Device budgets too small for the states (ZeRO-2's shards too), holding a stage's parameters
    and gradients, resident for the step (planner.stage_offload_cost), and under ZeRO-0 their flat
    copy while summed (3 GiB; ZeRO-2 copies a few buckets: 2.2 GiB): every stage offloads, and
    under ZeRO-2 each still has its REDUCE_SCATTER before its last B (what
    runtime.stage_offload_zero runs); its host memory is less than ZeRO-0's, its step faster."""
    def plan(zero: int):
        return plan_cluster(uniform_stats(8, params=PARAMS, act=8 * 2**20), one_node(A100, A100, A100, A100),
                            name="z", global_batch_size=16, micro_batch_size=1, dtype="bf16", optimizer="adamw",
                            pipeline_degree=2, data_parallel_degree=2, schedules=("1f1b",), stage_blocks=(4, 4),
                            zero=zero, device_budget=int((2.2 if zero == 2 else 3) * GIB), safety_margin=0.0)
    plain, zero2 = plan(0), plan(2)
    for p in (plain, zero2):
        assert all("params" in r.offload for r in p.pipeline.ranks), [r.offload for r in p.pipeline.ranks]
    for acts in zero2.schedule.values():
        stage = {a.stage for a in acts}
        assert [a.stage for a in acts if a.op is Op.REDUCE_SCATTER] == sorted(stage)
    assert not any(a.op is Op.REDUCE_SCATTER for acts in plain.schedule.values() for a in acts)
    for r in range(2):
        assert zero2.prediction.devices[r].peak_bytes["host"] < plain.prediction.devices[r].peak_bytes["host"]
    assert zero2.prediction.step_time_s < plain.prediction.step_time_s
