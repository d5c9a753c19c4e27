"""An offloaded pipeline stage's estimate is what the runtime holds (planner.stage_offload_cost
[Note: an offloaded stage's residency]): its parameters and gradients on the device for the whole
step, its states whole on the host or NVMe, one fetch and one copy home a step; and the gradient
sum's flat copy over replicas (planner.hetero_plan [Note: gradient copies after the passes])."""

from __future__ import annotations

import dataclasses

import pytest
from test_hetero import A100, GIB, one_node, uniform_stats

from memtrain.cluster.catalog import cpu_device_spec, default_host_spec, default_nvme_spec
from memtrain.errors import UserError
from memtrain.planner import cost
from memtrain.planner.hetero import plan_cluster
from memtrain.planner.plan import Tier, TrainShape
from memtrain.planner.stage_cost import StageBudget, StageModel
from memtrain.planner.stage_offload_cost import split_owners

PARAMS = 10_000_000
"""Parameters per block (4 blocks, 2 a stage)."""
ACT = 8 * 2**20
IN = 2**20
"""uniform_stats' input bytes per block."""
TRAIN = TrainShape(global_batch_size=4, micro_batch_size=1, num_microbatches=4, seq_len=1024, dtype="bf16",
                   optimizer="adamw")
HOST = default_host_spec(32, 512 * GIB)
ROOMY = StageBudget(device=80 * GIB, host=400 * GIB, nvme=400 * GIB)
O = cost.optimizer_state_bytes_per_elem("adamw")


def _model(home: str = "host", shards: int = 1, zero: int = 0) -> StageModel:
    return StageModel(uniform_stats(4, params=PARAMS, act=ACT), TRAIN, shards=shards, zero=zero, home=home)


def _stage(model: StageModel, budget: StageBudget = ROOMY, nvme=None):
    where = model.place(A100, HOST, nvme, budget)
    return model.refine(0, 2, where, in_flight=2, num_microbatches=4)


def test_a_host_stage_holds_its_parameters_and_gradients_on_the_device_for_the_step():
    n = 2 * PARAMS
    est = _stage(_model("host"))
    on_device = _stage(_model("device"))
    # activations of the 2 held micro-batches, the backward's workspace (a block's A, I and O, and
    # its largest parameter's fp32 gradient), then the param buffers and the gradients, fp32; on
    # the device, AdamW's states beside them (planner.stage_cost [Note: a device stage's states])
    base = 2 * 2 * ACT + (ACT + IN + 0) + 4 * PARAMS
    assert on_device.device_bytes == base + n * (4 + 4 + O)
    assert est.device_bytes == base + 2 * 4 * n
    assert est.host_bytes == n * (4 + 4 + O) and est.nvme_bytes == 0  # masters, accumulators, states
    assert est.fits and est.offload == f"{n:,} params off the device, on the host"
    # its chunks: one a block, both at home on the host; OFFLOAD's first grad buffer is the most
    assert [(c.num_elems, c.home) for c in est.policy.chunks] == [(PARAMS, Tier.HOST)] * 2
    assert est.after_bytes == 4 * PARAMS
    # the passes are the compute alone; the fetch once a step before the first forward; the copy
    # home once a step, with the CPU update of its 2 blocks' parameters, the tail
    assert (est.fwd_s, est.bwd_s) == (on_device.fwd_s, on_device.bwd_s)
    assert est.fetch_s == cost.h2d_time_s(4 * n, A100)
    tail = cost.d2h_time_s(4 * n, A100) + cost.cpu_optimizer_time_s(n, "adamw", HOST)
    assert est.tail_s == pytest.approx(tail, rel=1e-12)
    assert est.work_s(4) == pytest.approx(4 * (est.fwd_s + est.bwd_s) + est.fetch_s + tail, rel=1e-12)


def test_zero1_keeps_the_first_replicas_share_of_whole_parameters():
    n = 2 * PARAMS
    est = _stage(_model("host", shards=2, zero=1))
    own = max(sum(k for k, o in zip([PARAMS, PARAMS], split_owners([PARAMS, PARAMS], 2)) if o == d) for d in (0, 1))
    assert own == PARAMS
    assert est.host_bytes == 4 * n + own * (4 + O)
    assert est.device_bytes == _stage(_model("host")).device_bytes  # the gradients stay whole until summed


def test_an_nvme_stage_keeps_masters_and_states_in_files_and_stages_them_on_the_host():
    n = 2 * PARAMS
    est = _stage(_model("nvme"), nvme=default_nvme_spec("/tmp/x", 10**12))
    # per chunk (a block) a master and 2 state files (4 KiB header, whole pages), and both chunks
    # rewritten at once by the optimizer, old and new copies side by side
    assert est.nvme_bytes == (2 * 3 + 2 * 3) * cost.nvme_file_bytes(4 * PARAMS) > 2 * n * (4 + O)
    assert est.host_bytes == 4 * n + min(3 * PARAMS, n) * (4 + O)  # accumulators and the staged chunks (both)
    assert all(c.home is Tier.NVME for c in est.policy.chunks) and "on NVMe" in est.offload
    # memory.offload: nvme where the cluster lists no NVMe: parallel.nvme_dir holds the files,
    # their room unknown; an NVMe the planner chose for want of host memory needs a listed one
    assert _stage(_model("nvme")).fits
    unlisted = _stage(_model("nvme"), dataclasses.replace(ROOMY, nvme=0))  # partition's budget without a listed NVMe
    assert unlisted.fits and "NVMe, over" not in unlisted.offload, unlisted.offload
    short = dataclasses.replace(ROOMY, device=300_000_000, host=2 * n)  # neither the states nor the host's
    assert "on NVMe" in _stage(_model("auto"), short, nvme=default_nvme_spec("/tmp/x", 10**12)).offload
    assert not _stage(_model("auto"), short).fits


def test_an_nvme_stage_under_zero_charges_its_busiest_copys_state_files():
    """Over 4 copies the two blocks' parameters go to copies 1 and 3 (split_owners): copy 0 keeps
    no states, and the files are charged at a copy that keeps a chunk's, not at the first's."""
    est = _stage(_model("nvme", shards=4, zero=1), nvme=default_nvme_spec("/tmp/x", 10**12))
    assert "on NVMe" in est.offload
    file = cost.nvme_file_bytes(4 * PARAMS)
    states = O // 4
    assert est.nvme_bytes == 2 * file + states * file + (1 + states) * file


def test_a_device_the_streaming_charge_fitted_but_the_residency_does_not():
    """The old estimate charged two blocks' param and grad buffers (``4 · c · block``); the runtime
    keeps the stage's parameters and gradients for the step (``8 · n``). A budget between the two:
    the stage does not fit, and the planner gives it fewer blocks, or refuses a fixed partition."""
    n = 2 * PARAMS
    base = 2 * 2 * ACT + (ACT + IN) + 4 * PARAMS
    streaming = base + 4 * 2 * PARAMS
    budget = dataclasses.replace(ROOMY, device=base + 6 * n)
    assert streaming < budget.device < base + 8 * n
    est = _stage(_model("host"), budget)
    assert not est.fits and "resident for the step" in est.offload
    small = dataclasses.replace(A100, kind="small", memory_bytes=budget.device)
    kw = dict(name="x", global_batch_size=4, micro_batch_size=1, dtype="bf16", optimizer="adamw",
              schedules=("1f1b",), pipeline_degree=2, safety_margin=0.0, offload="host")
    stats = uniform_stats(4, params=PARAMS, act=ACT)
    with pytest.raises(UserError, match="device memory"):
        plan_cluster(stats, one_node(small, A100), stage_blocks=(2, 2), **kw)
    plan = plan_cluster(stats, one_node(small, A100), **kw)
    held = {r.device.kind: sum(e - f for f, e in (plan.pipeline.partition[s] for s in r.stages))
            for r in plan.pipeline.ranks}
    assert held == {"small": 1, "a100-80gb": 3}
    for pred in plan.prediction.devices:
        assert pred.peak_bytes["device"] <= pred.budget_bytes["device"]


@pytest.mark.parametrize(("offload", "zero", "copy"), [("device", 0, 2 * PARAMS), ("host", 0, 2 * PARAMS),
                                                     ("host", 1, 2 * PARAMS), ("host", 2, PARAMS)])
def test_the_sum_over_replicas_holds_a_copy_of_the_gradients(offload, zero, copy):
    """Over 2 copies under ZeRO-0/1 comm ``all_reduce_`` sums one flat copy of the rank's
    gradients (2 blocks' here), after the passes: the device peak is the static bytes plus the
    larger of the activations' and the copy; under ZeRO-2 an offloaded stage copies one chunk (a
    block) at a time for its reduce; one copy needs none."""
    stats = uniform_stats(4, params=PARAMS, act=2**20)

    def peaks(dp: int):
        plan = plan_cluster(stats, one_node(*(A100,) * (2 * dp)), name="x", global_batch_size=4 * dp,
                            micro_batch_size=1, dtype="bf16", optimizer="adamw", schedules=("1f1b",),
                            pipeline_degree=2, data_parallel_degree=dp, stage_blocks=(2, 2), safety_margin=0.0,
                            offload=offload, zero=zero)
        return [(p.peak_bytes["device"], p.breakdown["device"]["states, buffers, workspace"])
                for p in plan.prediction.devices]

    for (one, static1), (two, static2) in zip(peaks(1), peaks(2)):
        assert static1 == static2
        assert two - static2 == 4 * copy and (one - static1 < 4 * copy or zero == 2)  # ZeRO-2: OFFLOAD's buffer alike


def test_memory_offload_host_in_a_config_plans_host_homes_and_charges_the_host():
    from memtrain.runtime.config_file import load_config
    from memtrain.runtime.distributed import stage_homes
    from memtrain.runtime.planning import plan_config

    sets = ["parallel.profile=catalog"]
    cfg = load_config("examples/gpt-tiny-pp2.yaml", sets + ["memory.offload=host"])
    plan = plan_config(cfg)
    auto = load_config("examples/gpt-tiny-pp2.yaml", sets)
    assert stage_homes(auto, plan) == ("host", "host")  # the plan's chunks say so too
    for rp, pred in zip(plan.pipeline.ranks, plan.prediction.devices):
        n = sum(c.num_elems for p in rp.policies for c in p.chunks)
        assert "on the host" in rp.offload
        assert pred.peak_bytes["host"] == n * (4 + 4 + O)
        assert pred.breakdown["device"]["states, buffers, workspace"] >= 2 * 4 * n
    plain = plan_config(auto)
    assert all(p.peak_bytes["host"] == 0 for p in plain.prediction.devices)


def test_swapped_activations_beside_offloaded_states():
    """``memory.activations: swap_host`` with ``memory.offload: host``: the device holds a running
    and a returning micro-batch's activations beside the resident parameters and gradients; the
    host the held micro-batches' activations beside the states; the policy swaps every block and
    homes every chunk on the host."""
    n = 2 * PARAMS
    model = StageModel(uniform_stats(4, params=PARAMS, act=ACT), TRAIN, activations="swap_host", home="host")
    est = _stage(model)
    acts = 2 * ACT
    assert est.device_bytes == 2 * acts + (ACT + IN) + 4 * PARAMS + 2 * 4 * n
    assert est.host_bytes == n * (4 + 4 + O) + 2 * acts  # 2 micro-batches in flight
    assert {str(p) for p in est.policy.activations} == {"swap_host"}
    assert [c.home for c in est.policy.chunks] == [Tier.HOST] * 2 and est.fits


@pytest.mark.parametrize("kind", ["a100", "cpu"])
def test_an_offloaded_stages_fetch_runs_before_its_first_forward(kind):
    """The runtime's ``PREFETCH`` comes before the stage's first action and its first forward
    waits for it: on the timeline each rank's fetch starts the step (on the GPU's copy stream,
    on a CPU device its compute stream), stage 0's first forward starts when it ends, stage 1's
    when both its fetch and its first activation are in; the optimizer step after the passes no
    longer holds it."""
    dev = A100 if kind == "a100" else cpu_device_spec(num_cpus=8, memory_bytes=64 * GIB)
    stats = uniform_stats(4, params=PARAMS, act=2**20)
    plan = plan_cluster(stats, one_node(dev, dev), name="x", global_batch_size=4, micro_batch_size=1,
                        dtype="bf16", optimizer="adamw", schedules=("1f1b",), pipeline_degree=2,
                        stage_blocks=(2, 2), safety_margin=0.0, offload="host")
    n = 2 * PARAMS
    fetch_s = cost.h2d_time_s(4 * n, dev)
    lane = "h2d" if kind == "a100" else "compute"
    ev = {(e.stream, e.name): e for e in plan.prediction.timeline}
    for r in (0, 1):
        fetch = ev[(f"{lane}:{r}", f"{r}PREFETCH")]
        assert fetch.start_s == 0.0 and fetch.end_s == pytest.approx(fetch_s, rel=1e-12)
    assert ev[("compute:0", "0F0")].start_s == pytest.approx(fetch_s, rel=1e-12)
    recv = ev[("link:0>1", "0SEND_F0")].end_s
    assert ev[("compute:1", "1F0")].start_s == pytest.approx(max(fetch_s, recv), rel=1e-12)
    for rp in plan.pipeline.ranks:
        optim = next(e for e in plan.prediction.timeline if e.stream == f"compute:{rp.rank}" and e.name == "optimizer step")
        tail = cost.d2h_time_s(4 * n, dev) + cost.cpu_optimizer_time_s(n, "adamw", plan.host)
        assert optim.end_s - optim.start_s == pytest.approx(tail, rel=1e-9) == rp.optimizer_s
