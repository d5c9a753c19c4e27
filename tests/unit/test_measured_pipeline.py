"""Measured pipeline costs (planner.measured) → the heterogeneous planner: the partition, the
predicted step and the links follow the measured figures; the file, the config field and the
driver's choice of whether to measure (runtime.pipeline_probe), without Ray."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from memtrain.cluster.catalog import cpu_device_spec, default_host_spec, device_spec
from memtrain.cluster.spec import ClusterSpec, NodeSpec
from memtrain.comm.link_probe import link_figures, trimmed_mean
from memtrain.config import ConfigError, ModelConfig, ParallelConfig
from memtrain.errors import UserError
from memtrain.planner import pipeline
from memtrain.planner.analyze import analyze
from memtrain.planner.hetero import plan_cluster
from memtrain.planner.measured import BlockCosts, MeasuredPipeline, load_measured, planned_from_measured, save_measured
from memtrain.planner.partition import allreduce_time_s
from memtrain.planner.profile_format import model_key
from memtrain.planner.simulate_pipeline import StageCost, simulate_pipeline

GIB = 2**30
MODEL = ModelConfig(preset="tiny", overrides={"num_layers": 6})  # 8 blocks: embedding, 6 layers, head
M, MBS = 4, 2


@pytest.fixture(scope="module")
def stats():
    return analyze(MODEL, seq_len=16, micro_batch_size=1, dtype="fp32")


def cpus(n: int = 2, *, nodes: int = 1) -> ClusterSpec:
    cpu = cpu_device_spec(num_cpus=1, memory_bytes=4 * GIB)
    per = n // nodes
    return ClusterSpec(nodes=tuple(NodeSpec(name=f"n{k}", host=default_host_spec(per, 8 * GIB), devices=(cpu,) * per)
                                   for k in range(nodes)))


def measured(n: int = 8, *, fwd: list[float] | None = None, rest: float = 0.0, rtt: float = 0.0,
             latency: float = 0.0, recv: float = 0.0, optim: float = 0.0, kind: str = "cpu") -> MeasuredPipeline:
    f = tuple(fwd or [1e-3] * n)
    return MeasuredPipeline(
        device_kind=kind, device="cpu", num_threads=1, model_key="k", model_name="gpt", seq_len=16, dtype="fp32",
        micro_batch_size=MBS, num_microbatches=M,
        blocks=BlockCosts(fwd_s=f, bwd_s=tuple(2 * x for x in f), b_s=f, w_s=f, optim_s=(optim,) * n, rest_s=rest,
                          output_bytes=4096),
        split_timed=True, link_latency_s=latency, link_gbps=10.0, link_recv_s=recv, round_trip_s=rtt)


def plan(stats, cluster, meas=None, **kw):
    return plan_cluster(stats, cluster, name="t", global_batch_size=M * MBS, dtype="fp32", optimizer="adamw",
                        micro_batch_size=MBS, schedules=("1f1b",), pipeline_degree=2, data_parallel_degree=1,
                        measured=meas, **kw)


def counts(p) -> list[int]:
    return [e - b for b, e in p.pipeline.partition]


def test_a_heavy_measured_head_moves_blocks_to_the_first_stage(stats):
    even = plan(stats, cpus(), measured())
    assert counts(even) == [4, 4]  # equal blocks, equal stages
    heavy = plan(stats, cpus(), measured(fwd=[1e-3] * 7 + [6e-3]))  # the head: six layers' worth
    assert counts(heavy)[0] > counts(heavy)[1], heavy.pipeline.partition
    assert heavy.prediction.step_time_s > even.prediction.step_time_s


def test_the_prediction_is_the_simulated_pipeline_of_the_measured_costs_plus_the_steps_own_time(stats):
    """Recomputed here from the measured figures: the 1F1B pipeline over the measured link (the
    wire's latency less the receive's own time, which the receiving rank pays), each rank's
    optimizer step, and the rest of a worker's step with Ray's gap between steps on top."""
    meas = measured(fwd=[0.5e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 3e-3], rest=2e-3, rtt=1e-3, latency=0.8e-3,
                    recv=0.3e-3, optim=0.25e-3)
    got = plan(stats, cpus(), meas)
    bounds = got.pipeline.partition
    costs = [StageCost(fwd_s=sum(meas.blocks.fwd_s[b:e]), bwd_s=sum(meas.blocks.bwd_s[b:e]),
                       output_bytes=stats.blocks[e - 1].output_bytes * MBS) for b, e in bounds]
    place = pipeline.Placement((0, 1))
    res = simulate_pipeline(pipeline.add_p2p(pipeline.generate("1f1b", 2, M), place), place, costs, meas.wire(),
                            links={(0, 1): meas.wire(), (1, 0): meas.wire()})
    ends = [max(end for (_, s, _), (_, end) in res.pass_times.items() if s == r) for r in range(2)]
    tails = [sum(meas.blocks.optim_s[b:e]) for b, e in bounds]
    # the tied embedding's gradient summed over the two ends once both are there ([Note: tied
    # weights at the step's end]): a 2-rank all-reduce of its fp32 gradient, each message's own times
    wire = meas.wire()
    tied_s = allreduce_time_s(4 * 256 * 64, 2, wire) + 2 * (wire.send_s + wire.recv_s)
    expected = max(ends) + tied_s + max(tails) + meas.blocks.rest_s + meas.round_trip_s
    assert got.prediction.step_time_s == pytest.approx(expected, rel=1e-9)
    # receives posted a pass ahead (comm.p2p [Note: receives posted early]): the late receive's
    # round is not the receiver's, and half the round trip is the wire's
    assert meas.wire().latency_s == pytest.approx(0.8e-3) and meas.wire().recv_s == 0.0
    sends = dataclasses.replace(meas, link_send_s=0.2e-3)
    assert sends.wire().latency_s == pytest.approx(0.6e-3) and sends.wire().send_s == pytest.approx(0.2e-3)
    assert "measured" not in got.source  # plan_cluster keeps the caller's source (runtime.distributed names it)


def test_the_steps_own_time_adds_to_the_prediction_once(stats):
    base = plan(stats, cpus(), measured())
    more = plan(stats, cpus(), measured(rest=3e-3, rtt=2e-3))
    assert more.prediction.step_time_s - base.prediction.step_time_s == pytest.approx(5e-3, rel=1e-6)
    assert counts(more) == counts(base)


def test_a_slower_measured_link_slows_the_step(stats):
    fast = plan(stats, cpus(), measured())
    slow = plan(stats, cpus(), measured(latency=2e-3, recv=0.5e-3))
    # 1F1B over 2 ranks and 4 micro-batches: at least one transfer each way per micro-batch is on
    # the critical path
    assert slow.prediction.step_time_s >= fast.prediction.step_time_s + 2 * M * 1.5e-3 * 0.5


def test_measured_costs_of_another_kind_leave_the_catalogs_figures(stats):
    a100 = device_spec("a100-80gb")
    cluster = ClusterSpec(nodes=(NodeSpec(name="n0", host=default_host_spec(32, 512 * GIB), devices=(a100, a100)),))
    catalog = plan(stats, cluster)
    other = plan(stats, cluster, measured(fwd=[1e-3] * 7 + [6e-3], rest=1.0))
    assert other.prediction.step_time_s == pytest.approx(catalog.prediction.step_time_s)
    assert counts(other) == counts(catalog)


def test_the_measured_link_is_a_nodes_or_the_networks(stats):
    """Probed between two workers of one node, it is the link of two on one node; across nodes
    the network's stays (and the other way round)."""
    from memtrain.planner.partition import link_between

    cluster = cpus(2, nodes=2)
    cpu = cluster.nodes[0].devices[0]
    meas = measured(latency=5e-3)
    assert link_between(cluster, (0, cpu), (0, cpu), meas) == meas.wire()
    assert link_between(cluster, (0, cpu), (1, cpu), meas) == link_between(cluster, (0, cpu), (1, cpu))
    across = dataclasses.replace(meas, link_across_nodes=True)
    assert link_between(cluster, (0, cpu), (1, cpu), across) == across.wire()
    assert link_between(cluster, (0, cpu), (0, cpu), across) == link_between(cluster, (0, cpu), (0, cpu))


def test_a_split_backward_takes_the_measured_w_share(stats):
    f = [1e-3] * 8
    meas = dataclasses.replace(measured(fwd=f), blocks=dataclasses.replace(
        measured(fwd=f).blocks, b_s=tuple(0.75 * 2 * x for x in f), w_s=tuple(0.25 * 2 * x for x in f)))
    assert meas.w_share(0, 8) == pytest.approx(0.25)
    assert dataclasses.replace(meas, split_timed=False).w_share(0, 8) == 0.5
    got = plan_cluster(stats, cpus(), name="t", global_batch_size=M * MBS, dtype="fp32", optimizer="adamw",
                       micro_batch_size=MBS, schedules=("zb-h1",), pipeline_degree=2, data_parallel_degree=1,
                       measured=meas)
    rank0 = got.pipeline.ranks[0]
    assert rank0.bwd_s == pytest.approx(2e-3 * counts(got)[0])  # the whole backward, B and W together
    span = {e.name: e.end_s - e.start_s for e in got.prediction.timeline if e.stream == "compute:0"}
    assert span["0W0"] == pytest.approx(0.25 * rank0.bwd_s) and span["0B0"] == pytest.approx(0.75 * rank0.bwd_s)


def test_times_scale_with_the_micro_batch_size():
    meas = measured()
    fwd, bwd = meas.block_times(2 * MBS)
    assert fwd == pytest.approx([2e-3] * 8) and bwd == pytest.approx([4e-3] * 8)


def test_the_file_round_trips_and_a_wrong_one_names_the_field(tmp_path):
    meas = measured(rest=1e-3, latency=1e-4)
    path = tmp_path / "pipeline-profile.json"
    save_measured(meas, path)
    assert load_measured(path) == meas
    data = json.loads(path.read_text())
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"parallel\.profile: .*version 1"):
        load_measured(path)
    with pytest.raises(UserError, match=r"parallel\.profile: cannot read"):
        load_measured(tmp_path / "missing.json")


def test_config_field():
    assert ParallelConfig().profile == "auto" and ParallelConfig().profile_file is None
    assert ParallelConfig(profile="catalog").profile_file is None
    assert ParallelConfig(profile="runs/a/pipeline-profile.json").profile_file == "runs/a/pipeline-profile.json"
    with pytest.raises(ConfigError, match=r"parallel\.profile"):
        ParallelConfig(profile="")


def _cfg(**parallel):
    from memtrain.config import Config, ParallelConfig, TrainConfig

    return Config(model=ModelConfig(), train=TrainConfig(global_batch_size=8, seq_len=16, steps=2),
                  parallel=ParallelConfig(pipeline=2, microbatches=4, **parallel))


def test_the_driver_measures_cpus_only_unless_asked(tmp_path, monkeypatch):
    from memtrain.runtime import pipeline_probe

    calls = []
    monkeypatch.setattr(pipeline_probe, "measure_pipeline", lambda **kw: calls.append(kw) or measured())
    slots = ["a", "b"]
    assert pipeline_probe.measured_for_run(_cfg(profile="catalog"), ["cpu", "cpu"], slots, tmp_path, print) is None
    assert pipeline_probe.measured_for_run(_cfg(), ["a100-80gb", "cpu"], slots, tmp_path, print) is None
    assert not calls
    lines: list[str] = []
    got = pipeline_probe.measured_for_run(_cfg(), ["cpu", "cpu"], slots, tmp_path, lines.append)
    assert got == measured() and len(calls) == 1
    assert calls[0]["micro_batch_size"] == 2 and calls[0]["num_microbatches"] == 4 and not calls[0]["split"]
    assert (tmp_path / "pipeline-profile.json").is_file() and any("measuring" in line for line in lines)
    pipeline_probe.measured_for_run(_cfg(profile="measure", schedule="zb-h1"), ["a100-80gb"] * 2, slots, tmp_path,
                                    print)
    assert len(calls) == 2 and calls[1]["split"]
    assert calls[0]["same_kind"] and calls[1]["same_kind"]
    pipeline_probe.measured_for_run(_cfg(profile="measure"), ["a100-80gb", "cpu"], slots, tmp_path, print)
    assert not calls[2]["same_kind"]  # the first worker's figures only, as the planner applies them to its kind


def test_the_driver_measures_a_config_with_parameter_groups_without_them(tmp_path, monkeypatch):
    """Groups change no timing, and the probes time a shortened model whose names are not the
    run's: they measure with one group (the run's groups are resolved against the whole model)."""
    from memtrain.config import Config, OptimizerConfig, ParallelConfig, TrainConfig
    from memtrain.config_train import ParamGroupConfig
    from memtrain.runtime import pipeline_probe

    calls = []
    monkeypatch.setattr(pipeline_probe, "measure_pipeline", lambda **kw: calls.append(kw) or measured())
    groups = [ParamGroupConfig(params=["*.bias"], weight_decay=0.0), ParamGroupConfig(params=["*"])]
    cfg = Config(model=ModelConfig(), train=TrainConfig(global_batch_size=8, seq_len=16, steps=2,
                                                        optimizer=OptimizerConfig(param_groups=groups)),
                 parallel=ParallelConfig(pipeline=2, microbatches=4))
    assert pipeline_probe.measured_for_run(cfg, ["cpu", "cpu"], ["a", "b"], tmp_path, print) == measured()
    assert not calls[0]["optimizer"].param_groups


def test_a_given_profile_is_used_without_measuring_and_must_be_this_models(tmp_path, monkeypatch):
    from memtrain.runtime import pipeline_probe

    monkeypatch.setattr(pipeline_probe, "measure_pipeline", lambda **kw: pytest.fail("measured"))
    cfg = _cfg()
    mine = dataclasses.replace(measured(), model_key=model_key(cfg.model, cfg.train.seq_len, cfg.train.dtype))
    save_measured(mine, tmp_path / "mine.json")
    got = pipeline_probe.measured_for_run(_cfg(profile=str(tmp_path / "mine.json")), ["cpu"] * 2, ["a", "b"],
                                          tmp_path, print)
    assert got == mine
    save_measured(measured(), tmp_path / "other.json")  # model_key "k": another model
    with pytest.raises(UserError, match=r"parallel\.profile: .*another model"):
        pipeline_probe.measured_for_run(_cfg(profile=str(tmp_path / "other.json")), ["cpu"] * 2, ["a", "b"],
                                        tmp_path, print)


def test_link_figures_take_the_trimmed_mean_of_bimodal_round_trips():
    """[Note: mean, not median] 30% of the rounds a scheduler's slice: the median misses them."""
    rounds = [1e-4] * 14 + [4e-3] * 6
    latency, gbps, recv, send = link_figures({"small": rounds, "large": [2e-3] * 20, "send": [1e-5, 3e-5]},
                                             {"late": [1e-4, 3e-4]}, 4 << 20)
    assert latency == pytest.approx(trimmed_mean(rounds) / 2)
    assert latency > 5 * 1e-4 / 2  # well above the median's half round trip
    assert recv == pytest.approx(2e-4) and send == pytest.approx(2e-5) and gbps > 0
    assert trimmed_mean([1.0] * 8 + [100.0, -100.0]) == pytest.approx(1.0)


def test_measure_blocks_times_every_block_and_repeats_the_timed_layers():
    from memtrain.runtime.pipeline_probe import measure_blocks

    model = ModelConfig(preset="tiny", overrides={"num_layers": 4})
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    costs, device = measure_blocks(model, m=2, b=1, seq=8, steps=1, split=False, max_layers=2, phases=phases)
    took = time.perf_counter() - t0
    # [Note: where the probe's time goes]: the worker's build and its steps, both parts of the call
    assert set(phases) == {"build_s", "steps_s"} and all(v > 0 for v in phases.values()), phases
    assert phases["build_s"] + phases["steps_s"] <= took
    timed = [0, 1, 2, 5]  # the embedding, the two timed layers, the head: the timed step's passes within its steps
    assert phases["steps_s"] > 2 * sum(costs.fwd_s[i] + costs.bwd_s[i] for i in timed)
    assert device == "cpu" and len(costs.fwd_s) == 6  # embedding, 4 layers, head
    assert costs.fwd_s[1] == costs.fwd_s[2] == costs.fwd_s[3] == costs.fwd_s[4] > 0  # the timed layers' mean
    assert all(x > 0 for x in costs.bwd_s + costs.optim_s) and costs.rest_s >= 0
    assert costs.b_s == costs.w_s == tuple(x / 2 for x in costs.bwd_s)  # not timed split: halves
    assert costs.output_bytes == 1 * 8 * 64 * 4


def test_a_bf16_probes_sent_tensors_are_fp32():
    """Autocast leaves the residual stream fp32, so a stage sends 4 bytes an element under bf16
    too (tests/unit/test_stage_states.py checks the blocks' outputs)."""
    from memtrain.runtime.pipeline_probe import measure_blocks

    costs, _ = measure_blocks(ModelConfig(preset="tiny", overrides={"num_layers": 1}), m=1, b=1, seq=8, steps=1,
                              split=False, dtype="bf16")
    assert costs.output_bytes == 1 * 8 * 64 * 4


def test_memtrain_plan_uses_the_kept_figures_a_run_would(tmp_path):
    from memtrain.runtime.planning import plan_cluster_from_config

    cfg = _cfg()
    mine = dataclasses.replace(measured(n=4, rest=7e-3), model_key=model_key(cfg.model, cfg.train.seq_len,
                                                                               cfg.train.dtype))
    save_measured(mine, tmp_path / "mine.json")
    catalog = plan_cluster_from_config(cfg)
    got = plan_cluster_from_config(_cfg(profile=str(tmp_path / "mine.json")))
    assert planned_from_measured(got) and not planned_from_measured(catalog)  # what a resumed run's closing line reads
    assert got.prediction.step_time_s > 7e-3 + M * 2 * 3e-3  # the rest, and a rank's measured passes (2 blocks)
    assert got.prediction.step_time_s != pytest.approx(catalog.prediction.step_time_s, rel=0.01)
    save_measured(measured(n=4), tmp_path / "other.json")
    with pytest.raises(ConfigError, match=r"parallel\.profile: .*another model"):
        plan_cluster_from_config(_cfg(profile=str(tmp_path / "other.json")))


def test_a_sends_own_time_holds_its_rank():
    """GPipe over 2 ranks, 2 micro-batches, F = B = 1: each send holds its rank for ``send_s``
    before its transfer, so rank 0's second forward starts after the first send's part and the
    step grows by the sends on the critical path."""
    from memtrain.planner.plan import Op
    from memtrain.planner.simulate_pipeline import Link

    place = pipeline.Placement((0, 1))
    sched = pipeline.add_p2p(pipeline.generate("gpipe", 2, 2), place)
    costs = [StageCost(fwd_s=1.0, bwd_s=1.0)] * 2
    plain = simulate_pipeline(sched, place, costs, Link(gbps=1.0))
    held = simulate_pipeline(sched, place, costs, Link(gbps=1.0, send_s=0.25))
    assert held.pass_times[(Op.F, 0, 1)][0] == pytest.approx(plain.pass_times[(Op.F, 0, 1)][0] + 0.25)
    # on the critical path: rank 0's two sends (F0's before F1, F1's before rank 1's F1) and rank
    # 1's two (B0's before its B1, B1's before rank 0's last B)
    assert held.step_time_s == pytest.approx(plain.step_time_s + 4 * 0.25)


def test_a_failed_measurement_leaves_the_catalogs_figures_with_a_warning(tmp_path, monkeypatch):
    from ray.exceptions import GetTimeoutError

    from memtrain.runtime import pipeline_probe

    def fail(**kw):
        raise GetTimeoutError("the probe did not answer within 60 s")

    monkeypatch.setattr(pipeline_probe, "measure_pipeline", fail)
    lines: list[str] = []
    assert pipeline_probe.measured_for_run(_cfg(), ["cpu"] * 2, ["a", "b"], tmp_path, lines.append) is None
    assert any(line.startswith("memtrain: warning: measuring failed (GetTimeoutError: the probe did not answer")
               for line in lines)
    assert not (tmp_path / "pipeline-profile.json").exists()


def test_tied_weights_are_summed_over_the_two_ends_after_both_reach_the_step_end():
    """[Note: tied weights at the step's end] The same model untied has no such sum; tied, both
    end ranks wait for the later one and then sum the table's gradient over the measured link."""
    untied_model = ModelConfig(preset="tiny", overrides={"num_layers": 6, "tie_embeddings": False})
    tied_stats = analyze(MODEL, seq_len=16, micro_batch_size=1, dtype="fp32")
    untied_stats = analyze(untied_model, seq_len=16, micro_batch_size=1, dtype="fp32")
    meas = measured(latency=1e-3, recv=0.2e-3)
    tied = plan(tied_stats, cpus(), meas, stage_blocks=(4, 4))
    untied = plan(untied_stats, cpus(), meas, stage_blocks=(4, 4))
    wire = meas.wire()
    tied_s = allreduce_time_s(4 * 256 * 64, 2, wire) + 2 * (wire.send_s + wire.recv_s)
    # (the passes and optimizer steps are the measured ones, the same for both models)
    ranks_t, ranks_u = tied.pipeline.ranks, untied.pipeline.ranks
    assert [r.allreduce_s for r in ranks_u] == [0.0, 0.0]
    assert all(r.allreduce_s >= tied_s - 1e-12 for r in ranks_t)
    assert tied.prediction.step_time_s == pytest.approx(untied.prediction.step_time_s + tied_s, rel=1e-9)
