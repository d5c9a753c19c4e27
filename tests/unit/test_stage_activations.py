"""Per-stage activation policies (runtime.stage_activations) without Ray: a one-rank world runs
its stage with blocks kept, recomputed or swapped; the program's swap points
(planner.pipeline.add_swap_points); the plan's per-stage policies reaching the workers
(runtime.distributed.stage_activations); the heterogeneous planner's recompute-only stages."""

from __future__ import annotations

import os

import pytest

from memtrain.cluster.catalog import default_host_spec, device_spec
from memtrain.cluster.spec import ClusterSpec, NodeSpec
from memtrain.config import ConfigError, ModelConfig
from memtrain.planner.analyze import analyze
from memtrain.planner.hetero import plan_cluster
from memtrain.planner.pipeline import add_swap_points
from memtrain.planner.plan import Action, ActPolicy, Op
from memtrain.runtime.config_file import load_config
from memtrain.runtime.distributed import stage_activations
from memtrain.runtime.pipeline_driver import stage_programs
from memtrain.runtime.stage_worker import PipelineSpec, StageWorker

TINY_2 = {"num_layers": 2, "tie_embeddings": False}


def _run(acts: tuple[str, ...], *, dropout: float = 0.0, nvme_dir: str | None = None, steps: int = 2,
         schedule: str = "1f1b", dtype: str = "fp32"):
    """One rank running the whole tiny GPT (4 blocks) as one stage with ``acts``: its program,
    its step results."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    _, programs = stage_programs(schedule, 1, 2)
    program = add_swap_points(programs, {0: acts})[0]
    spec = PipelineSpec(model=ModelConfig(preset="tiny", overrides={**TINY_2, "dropout": dropout}), partition=(4,),
                        rank_of=(0,), num_ranks=1, dp=1, num_microbatches=2, micro_batch_size=2, seq_len=16, seed=0,
                        timeout_s=10, activations=(acts,), nvme_dir=nvme_dir, dtype=dtype)
    worker = StageWorker(spec, 0, program)
    worker.build(*worker.open_store("127.0.0.1"))
    try:
        return program, [worker.run_step(k) for k in range(steps)]
    finally:
        worker.close()


@pytest.mark.parametrize("dropout,dtype", [(0.0, "fp32"), (0.1, "fp32"), (0.1, "bf16")])
def test_recompute_and_swaps_give_keeps_losses_bitwise(dropout, dtype, tmp_path):
    keep_prog, keep = _run(("keep",) * 4, dropout=dropout, dtype=dtype)
    (tmp_path / "nvme").mkdir()
    for acts in [("recompute",) * 4, ("keep", "swap_host", "recompute", "swap_nvme")]:
        program, got = _run(acts, dropout=dropout, nvme_dir=str(tmp_path / "nvme" / "run"), dtype=dtype)
        # the dropout masks are replayed by the recompute (under the same autocast), the swapped
        # tensors copied byte for byte
        assert [r.losses for r in got] == [r.losses for r in keep], acts
        assert all(r.record == tuple(str(a) for a in program) for r in got)
        assert ("activations_host" in got[-1].peak_bytes) == ("swap_host" in acts)
        assert got[-1].peak_bytes.get("activations_host", 1) > 0  # the swapped blocks' bytes went through the host
    left = sorted(str(f.relative_to(tmp_path)) for f in (tmp_path / "nvme").rglob("*"))
    assert left == ["nvme/run"], left  # the swap files and the rank's directory went with the worker
    assert keep[0].record == tuple(str(a) for a in keep_prog)


def test_recompute_holds_only_the_blocks_inputs():
    stats = analyze(ModelConfig(preset="tiny", overrides=TINY_2), seq_len=16, micro_batch_size=2, dtype="fp32")
    keep_pred = sum(b.activation_bytes for b in stats.blocks)
    rec_pred = sum(b.input_bytes for b in stats.blocks) + max(b.activation_bytes for b in stats.blocks)
    _, keep = _run(("keep",) * 4)
    _, rec = _run(("recompute",) * 4)
    k, r = keep[-1].peak_bytes["activations"], rec[-1].peak_bytes["activations"]
    # one micro-batch in flight (1F1B on one rank): keep holds every block's A, recompute the
    # inputs I plus the largest A while it is rebuilt (planner.stage_cost), as analyze predicts
    assert k == pytest.approx(keep_pred, rel=0.02) and r == pytest.approx(rec_pred, rel=0.1)
    assert r < 0.6 * k


def test_swap_points_follow_the_forward_and_precede_the_backward():
    _, programs = stage_programs("1f1b", 2, 2)
    out = add_swap_points(programs, {0: ("swap_host", "keep", "swap_nvme"), 1: ("keep", "recompute")})
    assert out[1] == programs[1]  # no swapped block there
    got = [str(a) for a in out[0]]
    f0 = got.index("0F0")
    assert got[f0 + 1:f0 + 3] == ["0SWAP_OUT0/b0", "0SWAP_OUT0/b2"]
    rb = got.index("0RECV_B0")  # the swap-ins overlap the wait for the gradient
    assert got[rb - 2:rb + 2] == ["0SWAP_IN0/b2", "0SWAP_IN0/b0", "0RECV_B0", "0B0"]
    assert add_swap_points(out, {0: ("swap_host",) * 3}) == out  # already lowered: left as it is
    assert Action.parse("0SWAP_IN0/b2") == Action(0, Op.SWAP_IN, 0, block=2)


def test_wrong_policies_are_refused():
    with pytest.raises(ValueError, match=r"activations: stage 0 has 4 blocks"):
        _run(("recompute",) * 3)
    with pytest.raises(ValueError, match="swap_nvme blocks need nvme_dir"):
        _run(("swap_nvme",) * 4)


def _cpu_cluster() -> ClusterSpec:
    cpu = device_spec("cpu")
    return ClusterSpec(nodes=(NodeSpec(name="n0", host=default_host_spec(4, 64 * 2**30), devices=(cpu, cpu)),))


def _plan(device_budget: int, schedules=("1f1b",)):
    stats = analyze(ModelConfig(preset="tiny"), seq_len=16, micro_batch_size=1, dtype="fp32")
    return plan_cluster(stats, _cpu_cluster(), name="t", global_batch_size=8, micro_batch_size=2, dtype="fp32",
                        optimizer="adamw", safety_margin=0.1, device_budget=device_budget, schedules=schedules,
                        pipeline_degree=2, data_parallel_degree=1, num_microbatches=4, source="t")


def test_the_plans_recomputed_stage_reaches_the_workers(tmp_path):
    """A device budget that the stage holding two micro-batches of the embedding and a layer
    cannot meet with its activations kept, but can recomputing them (found by planning it)."""
    plan = _plan(1_700_000)
    ranks = plan.pipeline.ranks
    assert ranks[0].offload == "stage 0: activations recomputed", ranks[0].offload
    assert ranks[0].policies[0].activations == (ActPolicy.RECOMPUTE,) * 2 and ranks[0].policies[0].chunks == ()
    cfg = load_config("examples/gpt-tiny-pp2.yaml", [f"run_dir={tmp_path}/run"])
    assert stage_activations(cfg, plan) == (("recompute", "recompute"), ("keep", "keep"))
    assert stage_activations(cfg, _plan(10**8)) == ()  # all kept: nothing to say
    forced = load_config("examples/gpt-tiny-pp2.yaml", [f"run_dir={tmp_path}/run", "memory.activations=swap_host"])
    assert stage_activations(forced, plan) == (("swap_host",) * 2,) * 2
    nvme = load_config("examples/gpt-tiny-pp2.yaml", [f"run_dir={tmp_path}/run", "memory.activations=swap_nvme"])
    with pytest.raises(ConfigError, match="parallel.nvme_dir: stages swap activations to NVMe"):
        stage_activations(nvme, plan)


def test_a_split_backward_schedule_is_planned_with_recomputed_stages(tmp_path):
    """zb-h1 under the budget that makes 1F1B recompute stage 0: it recomputes there too, its
    rebuilt activations charged from B to W (planner.stage_cost [Note: activations between B
    and W]), and the workers get the policy."""
    plan = _plan(1_700_000, schedules=("zb-h1",))
    assert plan.pipeline.schedule_kind == "zb-h1"
    assert plan.pipeline.ranks[0].offload == "stage 0: activations recomputed"
    cfg = load_config("examples/gpt-tiny-pp2.yaml", [f"run_dir={tmp_path}/run"])
    assert stage_activations(cfg, plan)[0] == ("recompute", "recompute")


@pytest.mark.parametrize("fixed", ["keep", "recompute", "swap_host"])
def test_memory_activations_fixes_every_stages_policy_in_the_plan(fixed, tmp_path):
    stats = analyze(ModelConfig(preset="tiny"), seq_len=16, micro_batch_size=1, dtype="fp32")
    plan = plan_cluster(stats, _cpu_cluster(), name="t", global_batch_size=8, micro_batch_size=2, dtype="fp32",
                        optimizer="adamw", schedules=("1f1b",), pipeline_degree=2, data_parallel_degree=1,
                        num_microbatches=4, source="t", activations=fixed)
    got = [p.activations if p is not None else None for rp in plan.pipeline.ranks for p in rp.policies]
    want = None if fixed == "keep" else (ActPolicy(fixed),) * 2
    assert got == [want, want]
    words = {"keep": "", "recompute": "activations recomputed", "swap_host": "activations swapped to the host"}[fixed]
    assert [rp.offload for rp in plan.pipeline.ranks] == [f"stage {s}: {words}" if words else "" for s in (0, 1)]
    cfg = load_config("examples/gpt-tiny-pp2.yaml", [f"run_dir={tmp_path}/run", f"memory.activations={fixed}"])
    assert stage_activations(cfg, plan) == (() if fixed == "keep" else ((fixed,) * 2,) * 2)


@pytest.mark.parametrize("fixed", ["recompute", "swap_host"])
def test_memory_activations_is_planned_with_split_backward_schedules(fixed):
    stats = analyze(ModelConfig(preset="tiny"), seq_len=16, micro_batch_size=1, dtype="fp32")
    plan = plan_cluster(stats, _cpu_cluster(), name="t", global_batch_size=8, micro_batch_size=2, dtype="fp32",
                        optimizer="adamw", schedules=("zb-h1", "v-half"), pipeline_degree=2, data_parallel_degree=1,
                        num_microbatches=4, activations=fixed)
    assert plan.pipeline.schedule_kind in ("zb-h1", "v-half")
    assert {p.activations for rp in plan.pipeline.ranks for p in rp.policies} == {(ActPolicy(fixed),) * 2}
    for dev in plan.prediction.devices:
        # the memory line draws what each B brings back until its W: its top is the rank's peak
        line = [q.bytes for q in dev.memory_timeline if q.tier == "device"]
        assert max(line) == dev.peak_bytes["device"], (line, dev.peak_bytes)
        assert dev.breakdown["device"]["activations"] > 0  # B..W is charged, whatever the F keeps
