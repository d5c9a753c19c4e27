"""The planner's memory between a split backward's B and W (planner.stage_cost [Note: activations
between B and W]): how many micro-batches a stage holds there (planner.partition
``in_backward``), what the stage model charges for them, the pipeline simulator's per-rank
timeline, and the B that replays the recomputed forwards (planner.hetero_plan)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from memtrain.cluster.catalog import default_host_spec, device_spec
from memtrain.config import ModelConfig
from memtrain.planner import pipeline
from memtrain.planner.analyze import analyze
from memtrain.planner.hetero_plan import _stage_costs
from memtrain.planner.partition import in_backward, in_flight
from memtrain.planner.plan import Op, TrainShape
from memtrain.planner.simulate_pipeline import Link, StageCost, simulate_pipeline
from memtrain.planner.stage_cost import StageBudget, StageEstimate, StageModel


def _between(kind: str, p: int, m: int, rank: int) -> int:
    """The most (stage, micro-batch) pairs rank ``rank`` holds between B and W, counted here."""
    held: set[tuple[int, int]] = set()
    most = 0
    for a in pipeline.generate(kind, p, m)[rank]:
        if a.op is Op.B:
            held.add((a.stage, a.microbatch))
        elif a.op is Op.W:
            held.discard((a.stage, a.microbatch))
        most = max(most, len(held))
    return most


@pytest.mark.parametrize("kind,p,m", [("zb-h1", 2, 4), ("zb-h1", 4, 8), ("v-half", 2, 4), ("v-half", 4, 8),
                                      ("v-min", 4, 8)])
def test_in_backward_reads_the_schedule(kind, p, m):
    per_stage = 2 if kind != "zb-h1" else 1
    for r in range(p):
        got = in_backward(kind, p, m, r)
        assert got == -(-_between(kind, p, m, r) // per_stage)
        assert 1 <= got <= in_flight(kind, p, m, r)  # B..W lies within F..W
    assert [in_backward("zb-h1", 2, 4, r) for r in range(2)] == [1, 2]  # rank 1 puts its W off
    assert in_backward("1f1b", 4, 8, 0) == in_backward("interleaved-1f1b", 4, 8, 0) == 0


def test_in_backward_of_a_long_zb_h1_is_read_from_its_repeating_start():
    assert [in_backward("zb-h1", 16, 80, r) for r in range(16)] == [_between("zb-h1", 16, 80, r) for r in range(16)]
    assert [in_backward("zb-h1", 8, 40, r) for r in range(8)] == [1, 1, 1, 1, 4, 5, 6, 8]  # the later ranks put W off


def test_simulator_holds_what_b_brings_back_until_w():
    """zb-h1 over 2 ranks, 4 micro-batches: rank 0 runs ``F0 F1 B0 W0 F2 B1 W1 ..`` (two held,
    one between B and W), rank 1 ``F0 B0 F1 B1 W0 ..`` (two between B and W); each held
    micro-batch keeps ``I``, each between B and W ``A`` more. 1F1B (no split) charges no ``A``."""
    i_, a_ = 10, 100
    costs = [StageCost(fwd_s=1.0, bwd_s=1.0, wgrad_s=1.0, activation_bytes=i_, bw_bytes=a_)] * 2
    place = pipeline.placement("zb-h1", 2)
    zb = simulate_pipeline(pipeline.generate("zb-h1", 2, 4), place, costs, Link(gbps=1.0))
    assert zb.peak_bytes == {0: 2 * i_ + a_, 1: 2 * i_ + 2 * a_}
    plain = [StageCost(fwd_s=1.0, bwd_s=2.0, activation_bytes=i_, bw_bytes=0)] * 2
    ofob = simulate_pipeline(pipeline.generate("1f1b", 2, 4), place, plain, Link(gbps=1.0))
    assert ofob.peak_bytes == {0: 2 * i_, 1: i_}


def _model(activations: str) -> tuple[StageModel, int]:
    stats = analyze(ModelConfig(preset="tiny"), seq_len=16, micro_batch_size=2, dtype="fp32")
    train = TrainShape(global_batch_size=8, micro_batch_size=2, num_microbatches=4, seq_len=16, dtype="fp32",
                       optimizer="adamw")
    model = StageModel(stats, train, activations)
    where = model.place(device_spec("cpu"), default_host_spec(4, 64 * 2**30), None,
                        StageBudget(device=2**30, host=2**30, nvme=0))
    return model, where


def test_stage_model_charges_the_held_b_to_w_micro_batches():
    model, where = _model("recompute")
    acts = model.acts[3] - model.acts[1]
    plain, split = model.estimate(1, 3, where, 2, 4), model.estimate(1, 3, where, 2, 4, in_bw=2)
    # recompute: one block's A while it is rebuilt, or every B..W micro-batch's A under a split
    assert split.device_bytes - plain.device_bytes == 2 * acts - model.max_act(1, 3)
    assert (plain.bw_bytes, split.bw_bytes) == (0, acts) and split.act_bytes == plain.act_bytes
    assert split.recompute_s == plain.recompute_s == split.fwd_s > 0
    model, where = _model("swap_host")
    plain, split = model.estimate(1, 3, where, 2, 4), model.estimate(1, 3, where, 2, 4, in_bw=2)
    # swap: one micro-batch running and one coming back, or the running one and two B..W ones
    assert split.device_bytes - plain.device_bytes == acts and split.bw_bytes == acts and split.act_bytes == 0


def test_a_split_backwards_b_replays_the_recomputed_forward():
    est = StageEstimate(fwd_s=1.0, bwd_s=3.0, tail_s=0.0, device_bytes=0, host_bytes=0, nvme_bytes=0, act_bytes=10,
                        offload="activations recomputed", fits=True, bw_bytes=100, recompute_s=1.0)
    stats = analyze(ModelConfig(preset="tiny"), seq_len=16, micro_batch_size=2, dtype="fp32")

    def cand(kind: str):
        model = SimpleNamespace(stats=stats, w_share=lambda first, end, device: 0.5,  # nothing measured: half each
                                boundary_bytes=lambda end: stats.blocks[end - 1].output_bytes)
        return SimpleNamespace(model=model, shape=SimpleNamespace(schedule=kind), partition=((0, 2), (2, 4)),
                               stage_ranks=(0, 1), ranks=[(0, None, None, None, None)] * 2)

    zb, = _stage_costs(cand("zb-h1"), [est, est])[:1]
    assert (zb.bwd_s, zb.wgrad_s, zb.activation_bytes, zb.bw_bytes) == (2.0, 1.0, 10, 100)
    ofob, = _stage_costs(cand("1f1b"), [est, est])[:1]
    assert (ofob.bwd_s, ofob.wgrad_s, ofob.bw_bytes) == (3.0, 0.0, 0)
