"""``memtrain run`` of a CPU pipeline measures its costs on the workers before planning
(runtime.pipeline_probe, planner.measured [Note: measured pipeline]): the plan's predicted step
comes from those figures, the closing line and metrics.jsonl carry it beside the measured step,
and a run given the kept figures (``parallel.profile: PATH``) plans the same without measuring.
Timings on a shared machine are noisy: the measured step is checked against a plausible range
only, but the prediction exactly, as a function of the measured figures: planned again from
them it is the same number, and from them all twice as slow, twice it (a part of the step costed
from anything else, the catalog, would not scale)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from memtrain.planner.measured import MEASURED_FILE, MeasuredPipeline, load_measured
from memtrain.planner.plan import Plan
from memtrain.runtime import ray_cluster
from memtrain.runtime.config_file import load_config
from memtrain.runtime.distributed import check_devices, plan_run, run_distributed
from memtrain.runtime.pipeline_probe import QUEUE_FILL_S


def _config(run, *sets):
    return load_config("examples/gpt-tiny-pp2.yaml", ["train.steps=3", f"run_dir={run}", *sets])


def _slower(meas: MeasuredPipeline, k: float) -> MeasuredPipeline:
    """``meas`` with every time ``k`` times longer and the link's bandwidth ``k`` times lower."""
    c = meas.blocks
    blocks = dataclasses.replace(c, **{f: tuple(k * t for t in getattr(c, f)) for f in ("fwd_s", "bwd_s", "b_s", "w_s",
                                                                                      "optim_s")}, rest_s=k * c.rest_s)
    return dataclasses.replace(meas, blocks=blocks, link_latency_s=k * meas.link_latency_s, link_gbps=meas.link_gbps / k,
                               link_recv_s=k * meas.link_recv_s, link_send_s=k * meas.link_send_s,
                               round_trip_s=k * meas.round_trip_s)


def test_a_cpu_pipeline_is_planned_from_costs_measured_on_its_workers(local_ray, tmp_path):
    lines: list[str] = []
    cfg = _config(tmp_path / "a")
    out = run_distributed(cfg, print_fn=lines.append)
    assert any(line.startswith("memtrain: measuring the pipeline's costs on the workers") for line in lines)
    meas = load_measured(tmp_path / "a" / MEASURED_FILE)
    assert out["measured_costs"] == meas and out["predicted_from"] == "measured"
    assert meas.device_kind == "cpu" and len(meas.blocks.fwd_s) == 4  # embedding, 2 layers, head
    assert all(t > 0 for t in meas.blocks.fwd_s + meas.blocks.bwd_s + meas.blocks.optim_s)
    assert meas.link_latency_s > 0 and meas.link_gbps > 0
    assert 0 < meas.round_trip_s < QUEUE_FILL_S  # Ray's gap between queued calls, not the call holding the queue
    assert meas.model_name == "gpt-tiny"  # analysed while the probes started
    assert 0 < meas.elapsed_s < 60  # 2.5-12 s measured at load averages 2-10; the probes' start dominates
    plan = Plan.load(tmp_path / "a" / "plan.json")
    predicted = plan.prediction.step_time_s
    assert "measured on the workers" in plan.source
    assert out["predicted_step_time_s"] == predicted
    # the prediction is the measured figures' alone: the same from them again, twice from them twice as slow
    inventory = ray_cluster.cluster_inventory(cfg.cluster.network_gbps)
    chosen = check_devices(cfg, inventory)
    assert plan_run(cfg, inventory, chosen, meas).prediction.step_time_s == predicted
    slower = plan_run(cfg, inventory, chosen, _slower(meas, 2.0))
    assert slower.pipeline.partition == plan.pipeline.partition
    assert slower.prediction.step_time_s == pytest.approx(2 * predicted, rel=1e-9)
    # the prediction holds the measured passes of the busiest rank, its optimizer step and the
    # step's own time, and, as a simulated pipeline, the bubble on top
    m = plan.train.num_microbatches
    per_rank = [sum(m * (meas.blocks.fwd_s[i] + meas.blocks.bwd_s[i]) + meas.blocks.optim_s[i]
                    for s in rp.stages for i in range(*plan.pipeline.partition[s])) for rp in plan.pipeline.ranks]
    assert predicted > max(per_rank) + meas.step_overhead_s
    transfer = meas.link_latency_s + meas.link_send_s + meas.link_recv_s
    assert predicted < 10 * (sum(per_rank) + meas.step_overhead_s + 4 * m * transfer)
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["predicted_step_time_s"] for r in metrics] == [predicted] * 3
    assert all(r["step_time_s"] > 0 for r in metrics)
    assert [len(r["rank_between_s"]) for r in metrics] == [2] * 3 and metrics[0]["rank_between_s"] == [0.0, 0.0]
    closing = next(line for line in lines if line.startswith("step time: measured"))
    assert "from costs measured on the workers" in closing
    ranks = [line for line in lines if line.startswith("rank ")]
    assert len(ranks) == 2 and all(re.search(r"idle \d+% measured, [\d.]+ [mµ]?s between steps; predicted", r) for r in ranks), ranks
    # 0.94x to 2.59x over 12 runs at load averages 2 to 10 (docs/cluster.md): a few times that either way
    assert 0.25 < out["measured_step_time_s"] / predicted < 8, (out["measured_step_time_s"], predicted)

    # the kept figures, given back: nothing measured, the same plan and prediction
    again: list[str] = []
    reused = run_distributed(_config(tmp_path / "b", f"parallel.profile={tmp_path / 'a' / MEASURED_FILE}"),
                             print_fn=again.append)
    assert not any("measuring" in line for line in again)
    assert any("figures measured on the workers from" in line for line in again)
    assert reused["predicted_step_time_s"] == pytest.approx(predicted, rel=1e-12)
    assert reused["plan"].pipeline.partition == plan.pipeline.partition


def test_profile_catalog_plans_with_the_catalogs_figures(local_ray, tmp_path):
    lines: list[str] = []
    out = run_distributed(_config(tmp_path, "parallel.profile=catalog", "train.steps=2"), print_fn=lines.append)
    assert out["predicted_from"] == "catalog" and out["measured_costs"] is None
    assert not (tmp_path / MEASURED_FILE).exists() and not any("measuring" in line for line in lines)
    assert any("from the catalog's figures" in line for line in lines)
