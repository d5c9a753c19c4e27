"""The dropout walk in the pipeline planner (planner.stage_cost [Note: the dropout walk]): each
rank replays the random draws of the whole global batch (``dp × m`` micro-batches, every block)
at the step's start, on a CPU worker at ``RNG_WALK_S_PER_ELEM`` a random element."""

from __future__ import annotations

import dataclasses

import pytest
from test_hetero import A100, GIB, one_node

from memtrain.cluster.catalog import cpu_device_spec
from memtrain.config import ModelConfig
from memtrain.planner.analyze import analyze
from memtrain.planner.hetero import plan_cluster
from memtrain.planner.measured import MAX_TIMED_LAYERS, BlockCosts, MeasuredPipeline
from memtrain.planner.plan import TrainShape
from memtrain.planner.stage_cost import RNG_WALK_S_PER_ELEM, StageModel

CPU = cpu_device_spec(num_cpus=8, memory_bytes=64 * GIB)


def _stats(dropout: float):
    return analyze(ModelConfig(preset="tiny", overrides={"dropout": dropout}), seq_len=64, micro_batch_size=2,
                   dtype="fp32")


def test_the_analysis_counts_each_blocks_random_elements():
    """The tiny GPT (hidden 64, 4 heads) at 2 × 64 tokens: the embedding's dropout draws b·s·h,
    each layer its attention probabilities' b·heads·s·s and two residual dropouts' b·s·h; the head
    none; without dropout nothing. They scale with the micro-batch."""
    bsh, attn = 2 * 64 * 64, 2 * 4 * 64 * 64
    assert [b.random_elems for b in _stats(0.1).blocks] == [bsh, attn + 2 * bsh, attn + 2 * bsh, 0]
    assert [b.random_elems for b in _stats(0.1).scaled(6).blocks] == [3 * bsh, 3 * (attn + 2 * bsh),
                                                                      3 * (attn + 2 * bsh), 0]
    assert all(b.random_elems == 0 for b in _stats(0.0).blocks)


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_the_walk_is_every_replicas_micro_batches_of_every_block(dp):
    stats = _stats(0.1)
    train = TrainShape(global_batch_size=8 * dp, micro_batch_size=2, num_microbatches=4, seq_len=64, dtype="fp32",
                       optimizer="adamw")
    model = StageModel(stats, train)
    elems = sum(b.random_elems for b in stats.blocks)
    assert model.rng_walk_s(CPU, dp, 4) == dp * 4 * elems * RNG_WALK_S_PER_ELEM
    assert model.rng_walk_s(A100, dp, 4) == 0.0  # CUDA's counter generator: arithmetic
    assert StageModel(_stats(0.0), train).rng_walk_s(CPU, dp, 4) == 0.0


def _plan(dropout: float, dp: int):
    return plan_cluster(_stats(dropout), one_node(*(CPU,) * (2 * dp)), name="w", global_batch_size=8 * dp,
                        micro_batch_size=2, dtype="fp32", optimizer="adamw", schedules=("1f1b",), pipeline_degree=2,
                        data_parallel_degree=dp, stage_blocks=(2, 2))


@pytest.mark.parametrize("dp", [1, 2])
def test_each_rank_walks_before_its_program_and_the_step_grows_by_it(dp):
    """On the plan's timeline each rank starts with its walk; every pass comes that much later
    than without dropout (every rank walks the same), so does the step; twice the replicas,
    twice the walk; with dropout 0 no walk."""
    walked, plain = _plan(0.1, dp), _plan(0.0, dp)
    walk = dp * 4 * sum(b.random_elems for b in _stats(0.1).blocks) * RNG_WALK_S_PER_ELEM
    for r in (0, 1):
        ev = [e for e in walked.prediction.timeline if e.stream == f"compute:{r}"]
        first = min(ev, key=lambda e: (e.start_s, e.end_s))
        assert (first.name, first.start_s, first.end_s) == ("dropout RNG walk", 0.0, walk)
    assert not any(e.name == "dropout RNG walk" for e in plain.prediction.timeline)
    before = {(e.stream, e.name): e.start_s for e in plain.prediction.timeline}
    passes = [e for e in walked.prediction.timeline if e.name[1:2] in ("F", "B")]
    assert len(passes) == 2 * 2 * 4 and passes[0].start_s == pytest.approx(walk, rel=1e-12)
    for e in passes:
        assert e.start_s == pytest.approx(before[(e.stream, e.name)] + walk, rel=1e-9), e
    assert walked.prediction.step_time_s == pytest.approx(plain.prediction.step_time_s + walk, rel=1e-9)


TRAIN = TrainShape(global_batch_size=8, micro_batch_size=2, num_microbatches=4, seq_len=64, dtype="fp32",
                   optimizer="adamw")


def _profile(n: int, micro_batch_size: int, num_microbatches: int) -> MeasuredPipeline:
    """A CPU profile of ``n`` blocks whose rest of a step is 50 ms and Ray's gap 2 ms."""
    blocks = BlockCosts(fwd_s=(1e-3,) * n, bwd_s=(2e-3,) * n, b_s=(1e-3,) * n, w_s=(1e-3,) * n, optim_s=(1e-4,) * n,
                        rest_s=0.05, output_bytes=2 * 64 * 64 * 4)
    return MeasuredPipeline(device_kind="cpu", device="cpu", num_threads=1, model_key="k", model_name="tiny",
                            seq_len=64, dtype="fp32", micro_batch_size=micro_batch_size,
                            num_microbatches=num_microbatches, blocks=blocks, split_timed=False, link_latency_s=1e-4,
                            link_gbps=1.0, link_recv_s=0.0, round_trip_s=0.002)


def test_a_measured_rest_of_the_step_loses_the_probes_own_walk():
    """A profile timed on a one-replica worker with dropout: its rest of a step held that worker's
    walk (its micro-batches of its size); the planner takes it out and charges the run's own."""
    stats = _stats(0.1)
    meas, train = _profile(len(stats.blocks), 1, 8), TRAIN
    model = StageModel(stats, train, measured=meas)
    probe = 8 * sum(b.random_elems for b in stats.blocks) // 2 * RNG_WALK_S_PER_ELEM  # 8 micro-batches of 1
    assert model.step_overhead_s([CPU]) == pytest.approx(0.05 - probe + 0.002, rel=1e-12)
    assert StageModel(_stats(0.0), train, measured=meas).step_overhead_s([CPU]) == pytest.approx(0.052, rel=1e-12)
    assert dataclasses.replace(meas, device_kind="a100-80gb").step_overhead_s == pytest.approx(0.052)


def test_a_deep_models_probe_walked_only_the_layers_it_timed():
    """The probe times the embedding, ``MAX_TIMED_LAYERS`` layers and the head of a deeper model:
    its rest of a step held their walk, not the whole model's (12 layers: about 6x as much)."""
    stats = analyze(ModelConfig(preset="tiny", overrides={"dropout": 0.1, "num_layers": 12}), seq_len=64,
                    micro_batch_size=2, dtype="fp32")
    meas = _profile(len(stats.blocks), 2, 4)
    b = stats.blocks
    timed = b[0].random_elems + MAX_TIMED_LAYERS * b[1].random_elems + b[-1].random_elems
    probe = 4 * timed * RNG_WALK_S_PER_ELEM
    got = StageModel(stats, TRAIN, measured=meas).step_overhead_s([CPU])
    assert got == pytest.approx(0.05 - probe + 0.002, rel=1e-12) and got > 0.002
