"""Keep-only stages counted once per step (runtime.stage_keep), in one process without Ray: the
rank's measured activation peak, its ledger between ops and the losses are those of the
per-tensor hooks of offload.activations.ActivationManager, and the hooks run at one forward per
block and step."""

from __future__ import annotations

import functools
import os

import pytest
import torch
from torch import nn

from memtrain.config import ModelConfig
from memtrain.offload.ledger import Ledger
from memtrain.planner.plan import ActPolicy, Op
from memtrain.runtime import stage_keep, stage_worker
from memtrain.runtime.pipeline_driver import stage_programs
from memtrain.runtime.stage_activations import RankActivations
from memtrain.runtime.stage_keep import KeptStage
from memtrain.runtime.stage_worker import PipelineSpec, StageWorker

M = 4


def _run(schedule: str, monkeypatch, *, once: bool, dropout: float = 0.1, steps: int = 2, dtype: str = "fp32"):
    """The tiny GPT (4 blocks) on one rank under ``schedule``: step results, the ledger's bytes
    in use before each action, and the counting hooks made per step."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setattr(stage_worker, "RankActivations", functools.partial(RankActivations, count_kept_once=once))
    counts: list[int] = []
    real = stage_keep._Count

    def counting(block, *rest):
        counts.append(1)
        return real(block, *rest)

    monkeypatch.setattr(stage_keep, "_Count", counting)
    place, programs = stage_programs(schedule, 1, M)
    partition = (4,) if place.num_stages == 1 else (2, 2)
    spec = PipelineSpec(model=ModelConfig(preset="tiny", overrides={"num_layers": 2, "tie_embeddings": False,
                                                                    "dropout": dropout}),
                        partition=partition, rank_of=place.rank_of, num_ranks=1, dp=1, num_microbatches=M,
                        micro_batch_size=2, seq_len=16, seed=0, timeout_s=10, dtype=dtype)
    worker = StageWorker(spec, 0, programs[0])
    worker.build(*worker.open_store("127.0.0.1"))
    in_use: list[int] = []  # the ledger after each forward (an activation event: releases done, bytes taken)

    def after(handler):
        def run(a):
            handler(a)
            in_use.append(worker.acts.device_ledger.in_use_bytes)
        return run

    worker.handlers[Op.F] = after(worker.handlers[Op.F])
    try:
        results, per_step = [], []
        for k in range(steps):
            before = len(counts)
            results.append(worker.run_step(k))
            per_step.append(len(counts) - before)
        assert worker.acts.device_ledger.in_use_bytes == 0
        return results, in_use, per_step, (set(worker.acts.kept), set(worker.blocks))
    finally:
        worker.close()


@pytest.mark.parametrize("schedule,dtype", [("gpipe", "fp32"), ("1f1b", "fp32"), ("interleaved-1f1b", "fp32"),
                                            ("interleaved-1f1b", "bf16")])
def test_kept_stage_measures_what_the_hooks_measure(schedule, dtype, monkeypatch):
    """bf16: both count the step's shared weight casts once (runtime.stage_activations [Note:
    shared weight casts])."""
    ref, ref_in_use, _, (ref_kept, _) = _run(schedule, monkeypatch, once=False, dtype=dtype)
    got, in_use, per_step, (kept, stages) = _run(schedule, monkeypatch, once=True, dtype=dtype)
    assert not ref_kept and kept == stages  # the two paths ran
    assert [r.losses for r in got] == [r.losses for r in ref]  # nothing autograd saves changed
    assert [r.peak_bytes["activations"] for r in got] == [r.peak_bytes["activations"] for r in ref]
    assert got[0].peak_bytes["activations"] > 0
    assert in_use == ref_in_use  # after every forward, the same bytes held
    assert per_step == [4] * len(per_step)  # one counted forward per block and step, not one per micro-batch


def test_split_backward_and_other_policies_keep_the_hooks(monkeypatch):
    """Under a split backward a kept block's saves go in two walks (B, then W): the per-tensor
    hooks see when; a stage that recomputes or swaps is the manager's."""
    _, _, per_step, (kept, _) = _run("zb-h1", monkeypatch, once=True, steps=1)
    assert not kept and per_step == [0]
    ra = RankActivations(0, {0: [nn.Linear(2, 2)], 1: [nn.Linear(2, 2)]}, (("keep",), ("recompute",)), nvme_dir=None)
    try:
        assert set(ra.kept) == {0} and set(ra.managers) == {1}
        assert ra.policies(0) == [ActPolicy.KEEP] and ra.policies(1) == [ActPolicy.RECOMPUTE]
    finally:
        ra.close()


def test_a_new_step_gives_back_what_a_failed_step_left_held():
    ledger = Ledger("device")
    block = nn.Linear(4, 4)
    kept = KeptStage(0, [block], ledger)
    try:
        kept.set_microbatch(0)
        block(torch.ones(2, 4, requires_grad=True))  # a forward whose backward never runs
        assert ledger.in_use_bytes > 0
        kept.new_step()
        assert ledger.in_use_bytes == 0 and kept.saved_bytes == [None]
    finally:
        kept.close()
