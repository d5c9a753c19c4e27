"""Recompute and swap under the schedules that split the backward (zb-h1, v-half, v-min), in one
process without Ray: a one-rank world runs the tiny GPT's four blocks as one stage (zb-h1) or
as a V's two stages (v-half, v-min); runtime.stage_activations [Note: recompute and swap under a
split backward], offload.recompute [Note: recompute across B and W]."""

from __future__ import annotations

import os

import pytest
from torch import nn

from memtrain.config import ModelConfig
from memtrain.planner.analyze import analyze
from memtrain.planner.pipeline import add_swap_points
from memtrain.planner.plan import Action, Op
from memtrain.planner.simulate_pipeline import Link, StageCost, simulate_pipeline
from memtrain.runtime.pipeline_driver import stage_programs
from memtrain.runtime.stage_worker import PipelineSpec, StageWorker

TINY_2 = {"num_layers": 2, "tie_embeddings": False}
M = 3


def _run(acts: tuple[str, ...], schedule: str, *, dropout: float = 0.1, dtype: str = "fp32",
         nvme_dir: str | None = None, steps: int = 2, probe=None):
    """The tiny GPT (4 blocks) on one rank under ``schedule`` with ``acts`` per block (split
    over the stages as the partition says): its program and step results. ``probe(worker)``
    runs after the build."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    place, programs = stage_programs(schedule, 1, M)
    partition = (4,) if place.num_stages == 1 else (2, 2)
    per_stage = (acts,) if place.num_stages == 1 else (acts[:2], acts[2:])
    program = add_swap_points(programs, dict(enumerate(per_stage)))[0]
    spec = PipelineSpec(model=ModelConfig(preset="tiny", overrides={**TINY_2, "dropout": dropout}),
                        partition=partition, rank_of=place.rank_of, num_ranks=1, dp=1, num_microbatches=M,
                        micro_batch_size=2, seq_len=16, seed=0, timeout_s=10, activations=per_stage,
                        nvme_dir=nvme_dir, dtype=dtype)
    worker = StageWorker(spec, 0, program)
    worker.build(*worker.open_store("127.0.0.1"))
    try:
        if probe is not None:
            probe(worker)
        results = [worker.run_step(k) for k in range(steps)]
        assert worker.acts.device_ledger.in_use_bytes == 0  # every record went with its W
        return program, results
    finally:
        worker.close()


MIXES = [("recompute",) * 4, ("swap_host",) * 4, ("keep", "swap_nvme", "recompute", "swap_host"),
         ("recompute", "swap_nvme", "swap_nvme", "recompute")]


@pytest.mark.parametrize("schedule,dtype", [("zb-h1", "fp32"), ("v-half", "fp32"), ("v-min", "fp32"),
                                            ("zb-h1", "bf16")])
def test_split_backward_with_recompute_and_swaps_is_bitwise_keep(schedule, dtype, tmp_path):
    _, keep = _run(("keep",) * 4, schedule, dtype=dtype)
    (tmp_path / "nvme").mkdir()
    for acts in MIXES:
        program, got = _run(acts, schedule, dtype=dtype, nvme_dir=str(tmp_path / "nvme" / "run"))
        # dropout masks replayed (same RNG and autocast state), swapped bytes copied back as they were
        assert [r.losses for r in got] == [r.losses for r in keep], (schedule, acts)
        assert all(r.record == tuple(str(a) for a in program) for r in got)
        assert any(a.endswith("W0") for a in got[0].record)  # the split backward ran
        swaps = [a for a in got[0].record if "SWAP" in a]
        assert bool(swaps) == any(p.startswith("swap") for p in acts)
    left = sorted(str(f.relative_to(tmp_path)) for f in (tmp_path / "nvme").rglob("*"))
    assert left == ["nvme/run"], left  # the swap files went with their records


def test_recompute_replays_each_forward_once_at_the_b():
    """A recomputed block's forward runs twice per micro-batch (its F, and the replay at its B's
    claim), not once per walk of the graph (torch.utils.checkpoint would run it at B and at W)."""
    calls: list[int] = []

    def probe(worker: StageWorker) -> None:
        layer = worker.blocks[0][1]
        assert isinstance(layer, nn.Module)
        layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1))

    _run(("keep", "recompute", "keep", "keep"), "zb-h1", steps=1, probe=probe)
    assert len(calls) == 2 * M
    calls.clear()
    _run(("keep",) * 4, "zb-h1", steps=1, probe=probe)
    assert len(calls) == M


@pytest.mark.parametrize("schedule", ["zb-h1", "v-half", "v-min"])
@pytest.mark.parametrize("acts", [("keep",) * 4, ("recompute",) * 4, ("swap_host",) * 4,
                                  ("keep", "recompute", "swap_host", "recompute")])
def test_measured_activation_peak_is_the_simulated_one(schedule, acts):
    """The rank's measured peak of activation bytes (the ledger) against the pipeline
    simulator's on the same program with analyze's per-block bytes: a stage holds its kept
    blocks' ``A`` and its recomputed blocks' ``I`` from F to W, and from B to W its recomputed
    and swapped blocks' ``A`` (planner.stage_cost [Note: activations between B and W])."""
    stats = analyze(ModelConfig(preset="tiny", overrides=TINY_2), seq_len=16, micro_batch_size=2, dtype="fp32")
    place, programs = stage_programs(schedule, 1, M)
    parts = [range(4)] if place.num_stages == 1 else [range(2), range(2, 4)]
    costs = []
    for blocks in parts:
        b = [stats.blocks[j] for j in blocks]
        held = sum(x.activation_bytes if acts[j] == "keep" else x.input_bytes if acts[j] == "recompute" else 0
                   for j, x in zip(blocks, b))
        back = sum(x.activation_bytes for j, x in zip(blocks, b) if acts[j] != "keep")
        costs.append(StageCost(fwd_s=1.0, bwd_s=1.0, wgrad_s=1.0, activation_bytes=held, bw_bytes=back))
    want = simulate_pipeline(programs, place, costs, Link(gbps=1.0)).peak_bytes[0]
    _, got = _run(acts, schedule, dropout=0.0)
    assert got[-1].peak_bytes["activations"] == pytest.approx(want, rel=0.1), (got[-1].peak_bytes, want)


@pytest.mark.parametrize("schedule", ["zb-h1", "v-half"])
def test_swap_points_of_a_split_schedule(schedule):
    """Over 2 ranks: one ``SWAP_OUT`` per swapped block right after each ``F``, one ``SWAP_IN``
    before each ``B`` (before its gradient's receive where that comes first), none about ``W``."""
    place, programs = stage_programs(schedule, 2, 4)
    acts = {s: ("swap_host", "keep") if s % 2 == 0 else ("keep", "swap_nvme") for s in range(place.num_stages)}
    out = add_swap_points(programs, acts)
    for r, prog in out.items():
        assert [a for a in prog if a.op not in (Op.SWAP_OUT, Op.SWAP_IN)] == list(programs[r])
        for k, a in enumerate(prog):
            j = 0 if a.stage % 2 == 0 else 1
            if a.op is Op.F:
                assert prog[k + 1] == Action(a.stage, Op.SWAP_OUT, a.microbatch, block=j)
            if a.op is Op.B:
                before = prog[k - 2:k] if prog[k - 1].op is Op.RECV_B else prog[k - 1:k]
                assert before[0] == Action(a.stage, Op.SWAP_IN, a.microbatch, block=j), (r, k, prog[k - 2:k + 1])
            if a.op is Op.W:
                assert prog[k - 1].op not in (Op.SWAP_IN, Op.SWAP_OUT) or prog[k - 1].stage != a.stage


def test_manager_windows_of_a_replayed_recompute():
    """The mechanism alone (offload.recompute [Note: recompute across B and W]): after the F the
    ledger holds the block's input ``I``; the claim replays the forward and adds ``A``; both walks
    read the rebuilt tensors (gradients bitwise keep's, dropout included); the W's end frees all."""
    import torch

    from memtrain.offload.activations import ActivationManager
    from memtrain.offload.ledger import Ledger

    def grads(policy: str, split: bool):
        torch.manual_seed(0)
        block = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.5), nn.Linear(32, 8))
        ledger = Ledger("device")
        mgr = ActivationManager(policies={"b": policy}, device_ledger=ledger, host_ledger=Ledger("host"),
                                split_backward=split)
        mgr.wrap_blocks([("b", block)])
        x = torch.randn(4, 8, requires_grad=True)
        edges = []  # the first Linear's output edge: W walks from it to that Linear's parameters
        block[0].register_forward_hook(lambda m, a, o: edges.append(torch.autograd.graph.get_gradient_edge(o)))
        y = block(x)
        after_f = ledger.in_use_bytes
        mgr.claim(0, 0)
        after_claim = ledger.in_use_bytes
        gx, ge = torch.autograd.grad(y.sum(), [x, edges[0]], retain_graph=True)  # B
        gw = torch.autograd.grad(edges[0], list(block[0].parameters()), ge)  # W
        del y, edges
        return (gx, *gw), after_f, after_claim, ledger.in_use_bytes, mgr.block_activations("b")

    keep, *_ = grads("keep", True)
    got, after_f, after_claim, after_w, stats = grads("recompute", True)
    assert all(torch.equal(a, b) for a, b in zip(got, keep))
    assert after_f == stats.input_bytes == 4 * 8 * 4  # I: the input only
    assert after_claim == after_f + stats.saved_bytes and stats.saved_bytes > 4 * 32 * 4  # A: rebuilt at the claim
    assert after_w == 0
