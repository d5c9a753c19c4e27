"""A bf16 pipeline stage's activation bytes as its worker holds them (planner.stage_cost [Note: a
bf16 stage's activations], planner.analyze [Note: a pipeline worker's autocast]): the planner's
per-block figures against what a one-rank ``StageWorker`` counts (runtime.stage_keep), in one
process without Ray, for the built-in GPT at two shapes."""

from __future__ import annotations

import os

import pytest
import torch

from memtrain.config import ModelConfig
from memtrain.planner.analyze import analyze, autocast_figures
from memtrain.planner.plan import TrainShape
from memtrain.runtime.pipeline_driver import stage_programs
from memtrain.runtime.stage_worker import PipelineSpec, StageWorker
from memtrain.planner.stage_cost import StageModel

SHAPES = {
    # GPT-2 style, its own head, 2 micro-batch sequences of 16 tokens
    "gpt2": (dict(num_layers=2, hidden_size=64, num_heads=4, tie_embeddings=False), 2, 16),
    # Llama style (rotary, RMSNorm, SwiGLU, grouped-query attention, no biases), tied head, 2 × 32
    "llama": (dict(num_layers=1, hidden_size=128, num_heads=4, num_kv_heads=2, position="rotary", norm="rmsnorm",
                   activation="swiglu", bias=False), 2, 32),
}
FLASH_RNG_STATE = 24
"""Bytes a layer's attention saves on a GPU and not on a CPU: CUDA flash attention's RNG state
(a uint64 seed and offset pair, 16 B, and an 8 B offset), saved whatever the dropout. The CPU's
flash kernel saves the same q, k, v, output and log-sum-exp without it."""


def _one_rank(overrides: dict, mbs: int, seq: int, schedule: str, m: int):
    """A bf16 one-rank worker holding the whole model as one stage, built: (placement, programs, worker)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    place, programs = stage_programs(schedule, 1, m)
    spec = PipelineSpec(model=ModelConfig(preset="tiny", overrides=overrides), partition=(overrides["num_layers"] + 2,),
                        rank_of=(0,), num_ranks=1, dp=1, num_microbatches=m, micro_batch_size=mbs, seq_len=seq,
                        seed=0, timeout_s=10, dtype="bf16")
    worker = StageWorker(spec, 0, programs[0])
    worker.build(*worker.open_store("127.0.0.1"))
    return place, programs, worker


def _on_cpu(model: StageModel):
    """Where ``model``'s stages go on a CPU of 1 GiB device and host budgets."""
    from memtrain.cluster.catalog import default_host_spec, device_spec
    from memtrain.planner.stage_cost import StageBudget

    return model.place(device_spec("cpu"), default_host_spec(4, 64 * 2**30), None,
                       StageBudget(device=2**30, host=2**30, nvme=0))


def _measured(overrides: dict, mbs: int, seq: int) -> list[int]:
    """Per block, the bytes a bf16 one-rank worker running the whole model as one stage counts
    at its step's first forward (``KeptStage.saved_bytes``, and its weight casts, counted apart
    as the step's: ``cast_bytes``). A CPU worker's token ids are views
    of the step's batch (``.to('cpu')`` copies nothing), so its embedding counts that batch's
    storage: one micro-batch a step, of two sequences (one sequence's ids would be a view of its
    ``seq + 1`` tokens, runtime.data), and it is the micro-batch's own, as on a GPU."""
    threads = torch.get_num_threads()
    _, _, worker = _one_rank(overrides, mbs, seq, "1f1b", 1)
    try:
        res = worker.run_step(0)
        kept = worker.acts.kept[0]
        got = [a + w for a, w in zip(kept.saved_bytes, kept.cast_bytes, strict=True)]
        assert res.peak_bytes["activations"] == sum(got)  # one micro-batch held at a time
        assert worker.acts.device_ledger.in_use_bytes == 0  # the casts given back at the step's end
        return got
    finally:
        worker.close()
        torch.set_num_threads(threads)


def _stage_model(overrides: dict, mbs: int, seq: int, dtype: str) -> StageModel:
    stats = analyze(ModelConfig(preset="tiny", overrides=overrides), seq_len=seq, micro_batch_size=mbs, dtype=dtype)
    train = TrainShape(global_batch_size=mbs, micro_batch_size=mbs, num_microbatches=1, seq_len=seq, dtype=dtype,
                       optimizer="adamw")
    return StageModel(stats, train)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_trace_as_the_worker_runs_it_is_what_a_cpu_worker_saves(shape):
    """Like with like: the trace with the CPU's own dropout and attention kernels (what this
    worker runs) equals the worker's count block by block, dropout masks included."""
    overrides, mbs, seq = SHAPES[shape]
    overrides = {**overrides, "dropout": 0.1}
    got = _measured(overrides, mbs, seq)
    figures = autocast_figures(ModelConfig(preset="tiny", overrides=overrides), seq_len=seq, micro_batch_size=mbs,
                               accelerator=False)
    assert [f["autocast_activation_bytes"] + f["autocast_weight_bytes"] for f in figures] == got


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_bf16_stage_is_charged_what_its_worker_saves(shape):
    """The planner's figures (GPU kernels) against the CPU worker without dropout, where the two
    kernels save the same but for flash attention's RNG state (``FLASH_RNG_STATE`` a layer).
    Before, the stage took the bf16 analysis's bytes, under 60% of them here: autocast's weight
    copies and the norms' fp32 inputs were missing."""
    overrides, mbs, seq = SHAPES[shape]
    layers = overrides["num_layers"]
    got = _measured(overrides, mbs, seq)
    model = _stage_model(overrides, mbs, seq, "bf16")
    n = layers + 2
    per_block = [model.acts[j + 1] - model.acts[j] for j in range(n)]
    assert per_block == [g + (FLASH_RNG_STATE if 0 < j <= layers else 0) for j, g in enumerate(got)]
    assert sum(b.activation_bytes for b in model.stats.blocks) < 0.6 * sum(got)  # the figures the stage took before
    # autocast's copies: every matmul's weight once, bf16, per micro-batch; the head's the (tied) table
    h, blocks = overrides["hidden_size"], model.stats.blocks
    assert [b.autocast_weight_bytes for b in blocks] == [0] + [2 * _matmul_weights(model, j) for j in range(1, n)]
    # what a recomputed block keeps, and what a stage sends on: fp32 hidden states
    assert all(model.inputs[j + 1] - model.inputs[j] == mbs * seq * h * 4 for j in range(1, n))
    assert all(model.boundary_bytes(j) == mbs * seq * h * 4 for j in range(1, n))


def _matmul_weights(model: StageModel, j: int) -> int:
    """Elements of block ``j``'s matrices (its norms' vectors excluded), the head's shared table too."""
    b = model.stats.blocks[j]
    numel = {name: k for blk in model.stats.blocks for name, k in zip(blk.param_names, blk.param_numels)}
    names = [name for name in b.param_names + b.shared_param_names if name.endswith("weight") and "norm" not in name]
    return sum(numel[name] for name in names)


def test_weight_copies_do_not_scale_with_the_micro_batch():
    """An analysis at one sequence scaled to four (as planner.hetero scales it) against one at
    four: the weight copies are each micro-batch's, whatever its size, and the hidden states
    linear in it. The rest is linear but for two small tensors of a fixed size that ``scaled``
    takes as linear too, as before: each layer's flash RNG state and the embedding's positions
    (``seq`` int64), over-counted three times."""
    overrides, _, seq = SHAPES["gpt2"]
    cfg = ModelConfig(preset="tiny", overrides=overrides)
    one, four = (analyze(cfg, seq_len=seq, micro_batch_size=b, dtype="bf16") for b in (1, 4))
    assert one.autocast and four.autocast
    got, want = one.scaled(4).blocks, four.blocks
    assert [b.autocast_weight_bytes for b in got] == [b.autocast_weight_bytes for b in want]
    assert got[1].autocast_weight_bytes == one.blocks[1].autocast_weight_bytes > 0
    assert [(b.autocast_input_bytes, b.autocast_output_bytes) for b in got] == \
        [(b.autocast_input_bytes, b.autocast_output_bytes) for b in want]
    fixed = [3 * seq * 8] + [3 * FLASH_RNG_STATE] * overrides["num_layers"] + [0]
    assert [g.autocast_activation_bytes - w.autocast_activation_bytes for g, w in zip(got, want)] == fixed


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_an_fp32_stage_takes_the_analysis_as_it_is(shape):
    """No autocast at fp32: nothing traced twice, the stage's figures are the analysis's."""
    overrides, mbs, seq = SHAPES[shape]
    model = _stage_model(overrides, mbs, seq, "fp32")
    blocks = model.stats.blocks
    assert not model.stats.autocast and all(b.autocast_weight_bytes == 0 for b in blocks)
    n = len(blocks)
    assert [model.acts[j + 1] - model.acts[j] for j in range(n)] == [b.activation_bytes for b in blocks]
    assert [model.inputs[j + 1] - model.inputs[j] for j in range(n)] == [b.input_bytes for b in blocks]
    assert [model.boundary_bytes(j + 1) for j in range(n)] == [b.output_bytes for b in blocks]


def test_an_explicit_softmax_is_traced_in_fp32_as_on_a_gpu():
    """CUDA's autocast runs softmax in fp32, the CPU's in bf16 (planner.analyze ``_CUDA_FP32``):
    without fused attention a layer's trace saves fp32 probabilities (4 B each) and the matmul
    their bf16 copy (2 B), where the CPU's saves the bf16 probabilities once (2 B), so 4 B more
    per probability, b·heads·s² of them a layer."""
    b, s, heads = 2, 16, 4
    cfg = ModelConfig(preset="tiny", overrides=dict(num_layers=2, hidden_size=64, num_heads=heads,
                                                    fused_attention=False))
    gpu, cpu = (autocast_figures(cfg, seq_len=s, micro_batch_size=b, accelerator=acc) for acc in (True, False))
    diff = [g["autocast_activation_bytes"] - c["autocast_activation_bytes"] for g, c in zip(gpu, cpu)]
    assert diff == [0, 4 * b * heads * s * s, 4 * b * heads * s * s, 0]
    assert [g["autocast_weight_bytes"] for g in gpu] == [c["autocast_weight_bytes"] for c in cpu]


def test_the_simulated_peak_of_a_bf16_rank_is_what_it_measures():
    """One rank, GPipe over 3 micro-batches (all held at the peak): the pipeline simulator's
    activation peak from the stage's estimate against the rank's measured peak (its ledger). They
    differ by the flash RNG state (GPU kernels planned, CPU ones run: 24 B a layer and
    micro-batch) and by the CPU worker's token ids, views of the step's batch, so each
    micro-batch's embedding counts the other two's ids too (``_measured``): 0.12% here.
    The bf16 analysis's figures the stage took before fall short by more than a third. The
    weight casts are the step's, once (runtime.stage_worker [Note: one weight cast a step])."""
    from memtrain.planner.simulate_pipeline import Link, StageCost, simulate_pipeline

    overrides, mbs, seq = SHAPES["gpt2"]
    m, n = 3, overrides["num_layers"] + 2
    threads = torch.get_num_threads()
    place, programs, worker = _one_rank(overrides, mbs, seq, "gpipe", m)
    try:
        got = [worker.run_step(k).peak_bytes["activations"] for k in range(2)]
    finally:
        worker.close()
        torch.set_num_threads(threads)
    model = _stage_model(overrides, mbs, seq, "bf16")
    est = model.estimate(0, n, _on_cpu(model), m, m)
    casts = model.casts[n] - model.casts[0]  # charged once, beside the states (the static part)
    want = simulate_pipeline(programs, place, [StageCost(fwd_s=1.0, bwd_s=1.0, activation_bytes=est.act_bytes)],
                             Link(gbps=1.0)).peak_bytes[0] + casts
    ids = mbs * seq * 8
    assert want - got[-1] == m * FLASH_RNG_STATE * overrides["num_layers"] - m * (m - 1) * ids
    assert got[0] == got[1] and want == pytest.approx(got[-1], rel=2e-3)
    assert m * sum(b.activation_bytes for b in model.stats.blocks) < 0.65 * got[-1]


def test_a_bf16_stage_holds_one_weight_cast_for_its_micro_batches_in_flight():
    """runtime.stage_worker [Note: one weight cast a step]: one rank, GPipe over 3 micro-batches,
    all in flight at the peak. Every micro-batch's graph saves the same bf16 copy of each weight
    (the later forwards' saved casts are the first's storages), the rank's ledger counts them once
    (its peak is 3 micro-batches' activations plus one set of casts, not 3), and the planner
    charges the same: per micro-batch ``autocast_activation_bytes`` (``act_bytes``), the casts
    once in the stage's device bytes. Before, each micro-batch held and was charged its own."""
    from memtrain.planner.stats import cast_of_parameter

    overrides, mbs, seq = SHAPES["llama"]
    m, n = 3, overrides["num_layers"] + 2
    threads = torch.get_num_threads()
    _, _, worker = _one_rank(overrides, mbs, seq, "gpipe", m)
    # per micro-batch, the weight casts its graph saves (storage address, bytes); the first
    # forward's saves meet the worker's own counting hooks, innermost, and not these
    seen: dict[int, set[tuple[int, int]]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if cast_of_parameter(t):
            storage = t.untyped_storage()
            seen.setdefault(worker.acts.kept[0].microbatch, set()).add((storage.data_ptr(), storage.nbytes()))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            res = worker.run_step(0)
        kept = worker.acts.kept[0]
        per_mb, casts = sum(kept.saved_bytes), sum(kept.cast_bytes)
        assert not torch.is_autocast_enabled("cpu") and worker.acts.device_ledger.in_use_bytes == 0
    finally:
        worker.close()
        torch.set_num_threads(threads)
    assert sorted(seen) == [1, 2] and seen[1] == seen[2] and sum(nbytes for _, nbytes in seen[1]) == casts
    assert casts > 0 and res.peak_bytes["activations"] == m * per_mb + casts
    # the planner: the casts once, beside m micro-batches of the rest
    model = _stage_model(overrides, mbs, seq, "bf16")
    assert model.casts[n] - model.casts[0] == sum(b.autocast_weight_bytes for b in model.stats.blocks) == casts
    where = _on_cpu(model)
    one, three = (model.estimate(0, n, where, k, m) for k in (1, m))
    assert one.act_bytes == sum(b.autocast_activation_bytes for b in model.stats.blocks)
    assert three.device_bytes - one.device_bytes == (m - 1) * one.act_bytes  # no cast charged per micro-batch
    assert one.cast_bytes == three.cast_bytes == casts  # held with the passes (planner.hetero_plan)


def test_a_pipeline_plan_charges_a_rank_its_weight_casts_once_with_the_passes():
    """planner.hetero_plan: two ranks of 4 bf16 blocks under 1F1B, 2 replicas (so each rank's
    whole fp32 gradient, 1.6 GB, is copied after the passes to be summed). Blocks with autocast
    weight copies ``W`` against the same blocks without: rank 0 holds 2 micro-batches at its
    peak and its activations are higher by its 4 blocks' ``W`` once, not twice; rank 1's peak is
    the gradient's copy after the passes, where no cast is held, and its memory line ends where
    it started. The static bytes differ by one block's ``W`` only: the workspace of one block's
    pass (its ``A + I + O``, ``A`` with its casts, as before)."""
    from memtrain.cluster.catalog import default_host_spec, device_spec
    from memtrain.cluster.spec import ClusterSpec, NodeSpec
    from memtrain.planner.hetero import plan_cluster
    from memtrain.planner.stats import BlockStats, ModelStats

    params, act, w = 100_000_000, 200 * 2**20, 150 * 2**20

    def stats(cast: int):
        blocks = tuple(BlockStats(name=f"blocks.{i}", num_params=params, param_bytes=2 * params, activation_bytes=act,
                                  input_bytes=2**20, output_bytes=2**20, fwd_flops=10**14, bwd_flops=2 * 10**14,
                                  param_names=(f"blocks.{i}.w",), param_numels=(params,),
                                  autocast_activation_bytes=act, autocast_weight_bytes=cast,
                                  autocast_input_bytes=2**20, autocast_output_bytes=2**20) for i in range(8))
        return ModelStats(name="uniform", num_params=8 * params, dtype="bf16", micro_batch_size=1, seq_len=1024,
                          blocks=blocks, autocast=True)

    a100 = device_spec("a100-80gb")
    cluster = ClusterSpec(nodes=(NodeSpec(name="n0", host=default_host_spec(32, 512 * 2**30), devices=(a100,) * 4),))
    plain, casts = (plan_cluster(stats(c), cluster, name="casts", global_batch_size=16, micro_batch_size=1,
                                 dtype="bf16", optimizer="adamw", pipeline_degree=2, data_parallel_degree=2,
                                 schedules=("1f1b",), stage_blocks=(4, 4)) for c in (0, w))
    static = {r: [p.prediction.devices[r].breakdown["device"]["states, buffers, workspace"] for p in (plain, casts)]
              for r in range(2)}
    assert all(b - a == w for a, b in static.values())
    a0, b0 = (p.prediction.devices[0].breakdown["device"] for p in (plain, casts))
    assert a0["activations"] == 2 * 4 * act and b0["activations"] - a0["activations"] == 4 * w
    a1, b1 = (p.prediction.devices[1] for p in (plain, casts))
    assert b1.breakdown["device"]["gradient copies"] == a1.breakdown["device"]["gradient copies"] > 4 * (act + w)
    assert b1.peak_bytes["device"] - a1.peak_bytes["device"] == w
    for r in range(2):
        line = [m for m in casts.prediction.devices[r].memory_timeline if m.tier == "device"]
        assert line[-1].bytes == static[r][1] and max(m.bytes for m in line) == casts.prediction.devices[r].peak_bytes["device"]


@pytest.mark.parametrize("overrides", [{"num_layers": 5},
                                       {"num_layers": 4, "position": "rotary", "norm": "rmsnorm",
                                        "activation": "swiglu", "num_kv_heads": 2, "dropout": 0.1}])
def test_the_trace_on_two_layers_gives_every_layer_what_the_whole_trace_does(overrides) -> None:
    """[Note: a pipeline worker's autocast] the layers are alike: two traced stand for them all."""
    from memtrain.planner.analyze import autocast_figures, trace_autocast

    cfg = ModelConfig(preset="tiny", overrides=overrides)
    figures = autocast_figures(cfg, seq_len=32, micro_batch_size=2)
    assert figures == trace_autocast(cfg, seq_len=32, micro_batch_size=2)
    assert len(figures) == overrides["num_layers"] + 2
