"""A pipeline device stage's model states as its worker holds them (planner.stage_cost [Note: a
device stage's states]): fp32 parameters, gradients and optimizer states whatever ``train.dtype``
(bf16 is autocast), checked against the bytes a one-rank ``StageWorker`` counts."""

from __future__ import annotations

import os

import pytest
import torch
from test_hetero import A100, uniform_stats
from test_stage_offload_cost import HOST

from memtrain.config import ModelConfig
from memtrain.planner.plan import TrainShape
from memtrain.planner.stage_cost import StageBudget, StageModel
from memtrain.runtime.pipeline_driver import stage_programs
from memtrain.runtime.stage_worker import PipelineSpec, StageWorker

GIB = 2**30


def _model(dtype: str, optimizer: str = "adamw", *, shards: int = 1, zero: int = 0) -> StageModel:
    train = TrainShape(global_batch_size=4, micro_batch_size=1, num_microbatches=4, seq_len=1024, dtype=dtype,
                       optimizer=optimizer)
    return StageModel(uniform_stats(4, params=1000, act=2**20), train, shards=shards, zero=zero, home="device")


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_a_device_stage_holds_fp32_parameters_gradients_and_states(dtype):
    n = 1_000_003
    # 4 (parameter) + 4 (gradient) + 8 (AdamW's m and v), no master copy, at either dtype
    assert _model(dtype).device_state_bytes(n) == 16 * n
    assert _model(dtype, "sgd").device_state_bytes(n) == 12 * n  # one fp32 momentum
    # ZeRO over 2 copies: parameter and gradient whole, the shard's fp32 copy and states
    assert _model(dtype, shards=2, zero=1).device_state_bytes(n) == 8 * n + (n + 1) // 2 * (4 + 8)
    # the estimate of a stage kept on the device charges them, beside activations and workspace:
    # the largest parameter's gradient in flight is fp32 too
    m = _model(dtype)
    est = m.estimate(0, 2, m.place(A100, HOST, None, StageBudget(device=80 * GIB, host=400 * GIB, nvme=0)),
                     in_flight=2, num_microbatches=4)
    work = 2**20 + 2**20 + 0 + 4 * 1000  # a block's A, I and O, and its parameter's fp32 gradient
    assert est.device_bytes == 2 * 2 * 2**20 + work + 16 * 2000


def test_the_planner_charges_what_a_bf16_worker_holds():
    """A one-rank worker at bf16 (tiny GPT, one layer) after a step: its parameters and AdamW's
    states on the device (``state_bytes``), and its gradients as they were at ``OPTIM``
    (``grad_bytes``; dropped after the update) sum to the planner's figure for its parameters."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    threads = torch.get_num_threads()
    _, programs = stage_programs("1f1b", 1, 2)
    spec = PipelineSpec(model=ModelConfig(preset="tiny", overrides={"num_layers": 1}), partition=(3,), rank_of=(0,),
                        num_ranks=1, dp=1, num_microbatches=2, micro_batch_size=1, seq_len=8, seed=0, timeout_s=10,
                        dtype="bf16")
    worker = StageWorker(spec, 0, programs[0])
    worker.build(*worker.open_store("127.0.0.1"))
    try:
        res = worker.run_step(0)
        n = sum(q.numel() for q in worker.owns[0])
        held = worker.state_bytes()
        assert {q.dtype for q in worker.owns[0]} == {torch.float32}
        assert held["optimizer_states"] == 8 * n and res.grad_bytes["at_optim"] == 4 * n
        assert held["device"] + res.grad_bytes["at_optim"] == _model("bf16").device_state_bytes(n)
    finally:
        worker.close()
        torch.set_num_threads(threads)


def test_the_tensors_a_bf16_pipeline_sends_are_fp32():
    """Under the workers' bf16 autocast each block but the head hands on an fp32 tensor (the
    embedding's output and the residual stream stay fp32): the planner's boundary bytes are those
    the blocks make, twice the bf16 analysis's outputs, and a bf16 plan's received buffers too."""
    from memtrain.models.gpt import gpt_config
    from memtrain.models.gpt_blocks import build_blocks
    from memtrain.planner.analyze import analyze
    from memtrain.runtime.config_file import load_config
    from memtrain.runtime.planning import plan_config

    cfg = gpt_config("tiny")
    n = cfg.num_layers + 2
    stats = analyze(ModelConfig(preset="tiny"), seq_len=64, micro_batch_size=2, dtype="bf16")
    train = TrainShape(global_batch_size=8, micro_batch_size=2, num_microbatches=4, seq_len=64, dtype="bf16",
                       optimizer="adamw")
    model = StageModel(stats, train)
    blocks = build_blocks(cfg, set(range(n)), 0)
    x = torch.zeros(2, 64, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for j in range(n - 1):  # the head's output (the logits) is not sent
            x = blocks[j](x)
            assert x.dtype == torch.float32
            assert model.boundary_bytes(j + 1) == x.numel() * x.element_size() == 2 * stats.blocks[j].output_bytes
    plan = plan_config(load_config("examples/gpt-tiny-pp2.yaml", ["parallel.profile=catalog", "train.dtype=bf16"]))
    # rank 0 at its peak: a gradient received and its two micro-batches' outputs sent, fp32 (test_recv_buffers.py)
    assert plan.prediction.devices[0].breakdown["device"]["sent and received tensors"] == 3 * 2 * 64 * 64 * 4
