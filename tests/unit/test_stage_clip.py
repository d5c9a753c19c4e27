"""Gradient clipping by the global norm and parameter groups in the pipeline runtime, without
Ray: the ``CLIP`` lowering pass, its cost in the pipeline simulator, the norm exchange's
arithmetic (runtime.stage_clip) against ``torch.nn.utils.clip_grad_norm_``, a one-rank worker
against plain PyTorch, and the driver's refusals. The multi-rank runs are
tests/integration/test_pipeline_clip.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from memtrain.config import DataConfig, ModelConfig
from memtrain.errors import UserError
from memtrain.models.gpt import gpt_config
from memtrain.models.gpt_blocks import build_blocks, global_names, param_names
from memtrain.models.source import build_model
from memtrain.optimizers import OptimizerSpec
from memtrain.planner.pipeline import add_clip_points, add_offload_points, placement
from memtrain.planner.plan import Action, Op, Plan
from memtrain.planner.simulate_pipeline import Link, StageCost, clip_time_s, simulate_pipeline
from memtrain.runtime.data import TokenBatches
from memtrain.runtime.pipeline_driver import run_pipeline, stage_programs
from memtrain.runtime.stage_clip import PIECE, WHOLE, combine, global_norm, local_norms
from memtrain.runtime.stage_groups import group_lr, step_lr
from memtrain.runtime.stage_worker import PipelineSpec, StageWorker
from memtrain.runtime.stage_zero import ShardedOptimizer, zero2_buckets

TINY = {"preset": "tiny", "overrides": {"num_layers": 2, "tie_embeddings": False}}


# ---- the lowering pass and the simulator ---------------------------------------------------------


def test_clip_points_put_every_sum_before_one_clip_before_any_update() -> None:
    place, programs = stage_programs("v-half", 2, 4)  # rank 0 holds stages 0 and 3
    clipped = add_clip_points(add_offload_points(programs, [3]))
    assert [str(a) for a in clipped[0][-6:]] == ["0ALLREDUCE", "3ALLREDUCE", "0CLIP", "0OPTIM", "3OFFLOAD", "3OPTIM"]
    assert [str(a) for a in clipped[1][-5:]] == ["1ALLREDUCE", "2ALLREDUCE", "1CLIP", "1OPTIM", "2OPTIM"]
    for r in programs:  # the compute and transfers untouched, the pass idempotent
        body = [a for a in programs[r] if a.op not in (Op.ALLREDUCE, Op.OPTIM)]
        assert [a for a in clipped[r] if a.op not in (Op.ALLREDUCE, Op.OPTIM, Op.CLIP, Op.OFFLOAD, Op.PREFETCH)] == body
        assert add_clip_points(clipped)[r] == clipped[r]
    # offload points added after the pass land after the CLIP too
    assert [str(a) for a in add_offload_points(add_clip_points(programs), [3])[0][-5:]] == \
        ["3ALLREDUCE", "0CLIP", "0OPTIM", "3OFFLOAD", "3OPTIM"]


def test_the_simulator_holds_every_update_until_the_slowest_rank_reaches_its_clip() -> None:
    _, programs = stage_programs("1f1b", 2, 4, stages_per_rank=1)
    place = placement("1f1b", 2, 1)
    costs = [StageCost(fwd_s=1.0, bwd_s=2.0, reduce_s=5.0, optim_s=1.0), StageCost(fwd_s=1.0, bwd_s=2.0, optim_s=1.0)]
    link = Link(gbps=100.0)
    plain = simulate_pipeline(programs, place, costs, link)
    clipped = simulate_pipeline(add_clip_points(programs), place, costs, link, clip_s=0.5)
    # rank 1 finishes its passes first; clipped, its update waits for rank 0's all-reduce and the exchange
    assert clipped.step_time_s == pytest.approx(plain.step_time_s + 0.5)
    end0 = clipped.reduce_times[0][1]
    assert clipped.step_time_s == pytest.approx(end0 + 0.5 + 1.0)
    assert clip_time_s(2, 100, 4000, Link(gbps=1.0, latency_s=1e-5), mem_gbps=1.0) == pytest.approx(
        1e-5 + 1600 / 1e9 + 12000 / 1e9)
    assert clip_time_s(1, 100, 0, link, mem_gbps=1.0) == 0.0


def test_a_clipped_plan_carries_clip_in_its_programs_and_costs_it() -> None:
    from test_hetero import A100, one_node, uniform_stats

    from memtrain.planner.hetero import plan_cluster
    from memtrain.planner.plan import Plan

    kw = dict(name="clip", global_batch_size=4, dtype="bf16", optimizer="adamw", micro_batch_size=1,
              schedules=("1f1b",), pipeline_degree=2)
    plain = plan_cluster(uniform_stats(8), one_node(A100, A100), **kw)
    clipped = plan_cluster(uniform_stats(8), one_node(A100, A100), clip_grad_norm=True, **kw)
    assert clipped.train.clip_grad_norm and not plain.train.clip_grad_norm
    assert clipped.schedule == add_clip_points(plain.schedule)
    assert clipped.prediction.step_time_s > plain.prediction.step_time_s
    assert Plan.from_json(clipped.to_json()) == clipped


def test_memtrain_plan_shows_the_clip_a_clipped_pipeline_runs(capsys, tmp_path) -> None:
    from memtrain.runtime.cli import main

    example = Path(__file__).resolve().parents[2] / "examples" / "gpt-tiny-pp2.yaml"
    code = main(["plan", str(example), "--set", "train.max_grad_norm=1.0", "--json",
                 str(tmp_path / "p.json"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["train"]["clip_grad_norm"] is True
    plan = Plan.from_json((tmp_path / "p.json").read_text())
    assert [str(a) for a in plan.schedule[0][-3:]] == ["0ALLREDUCE", "0CLIP", "0OPTIM"]


# ---- the exchange's arithmetic -------------------------------------------------------------------


def _grads(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * scale for shape, scale in
            (((64, 32), 1e-2), ((32,), 3.0), ((7, 5, 3), 0.1), ((1000,), 1e-3), ((3,), 10.0))]


def test_norms_gathered_from_ranks_in_any_split_are_torchs_total_bitwise() -> None:
    grads = _grads()
    want = torch.nn.utils.get_total_norm(grads)
    ranks = [[0, 3], [1], [2, 4], []]  # which rank holds which parameter
    gathered = torch.stack([local_norms([(j, grads[j], True) for j in js], len(grads)) for js in ranks])
    got = global_norm(combine(gathered))
    assert got.dtype == torch.float32 and torch.equal(got, want)
    # data-parallel replicas send the same whole norms: the first is taken, the total unchanged
    twice = torch.cat([gathered, gathered])
    assert torch.equal(global_norm(combine(twice)), want)


def test_a_parameter_cut_between_shards_is_within_an_ulp_or_two() -> None:
    grads = _grads(1)
    want = torch.nn.utils.get_total_norm(grads)
    flat = grads[3].reshape(-1)  # parameter 3 cut in two pieces, on two replicas
    r0 = local_norms([(0, grads[0], True), (1, grads[1], True), (3, flat[:300], False)], 5)
    r1 = local_norms([(2, grads[2], True), (3, flat[300:], False), (4, grads[4], True)], 5)
    assert r0[1, 3] == PIECE and r1[1, 0] == 0 and r1[1, 2] == WHOLE
    got = global_norm(combine(torch.stack([r0, r1])))
    assert abs(float(got) - float(want)) <= 2 * torch.finfo(torch.float32).eps * float(want)


def test_global_names_are_the_whole_models_and_a_tied_copy_is_the_tables() -> None:
    cfg = gpt_config("tiny", num_layers=2)  # tied embeddings
    whole = build_model(ModelConfig(preset="tiny", overrides={"num_layers": 2}), max_seq_len=16).module
    assert param_names(cfg) == tuple(n for n, _ in whole.named_parameters())
    head = build_blocks(cfg, {3}, seed=0)  # the head alone: its own copy of the table
    names = global_names(head, cfg)
    assert names[id(head[3].lm_head.weight)] == "blocks.0.wte.weight"
    assert set(names.values()) - {"blocks.0.wte.weight"} <= set(param_names(cfg))


# ---- one rank against plain PyTorch --------------------------------------------------------------


def _reference(groups: list[dict], max_norm: float, steps: int, m: int, b: int, seq: int,
               lrs: dict[int, list[float]]) -> tuple[list, list, dict]:
    torch.manual_seed(0)
    built = build_model(ModelConfig(**TINY), max_seq_len=seq)
    named = dict(built.module.named_parameters())
    opt = torch.optim.AdamW([{"params": [named[n] for n in g["params"]],
                              **{k: v for k, v in g.items() if k != "params"}} for g in groups], lr=1e-2)
    data = TokenBatches(DataConfig(), batch_size=m * b, seq_len=seq, vocab_size=built.vocab_size)
    losses, norms = [], []
    own = [g["lr"] for g in opt.param_groups]
    for step in range(steps):
        for g, lr in zip(opt.param_groups, lrs.get(step, own)):
            g["lr"] = lr
        ids, labels = data.batch(step)
        for i in range(m):
            rows = slice(i * b, (i + 1) * b)
            loss = built.loss_fn(built.forward(ids[rows]), labels[rows])
            (loss / m).backward()
            losses.append(loss.item())
        norms.append(float(torch.nn.utils.clip_grad_norm_(built.module.parameters(), max_norm)))
        opt.step()
        opt.zero_grad()
    return losses, norms, {n: p.detach().clone() for n, p in built.module.named_parameters()}


def test_one_rank_clips_and_steps_its_groups_as_torch_bitwise() -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    names = param_names(gpt_config("tiny", num_layers=2, tie_embeddings=False))
    decay = [n for n in names if n.endswith("weight") and "norm" not in n]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": [n for n in names if n not in decay],
                                                        "weight_decay": 0.0, "lr": 3e-3}]
    steps, m, b, seq, max_norm = 3, 2, 2, 8, 0.5
    lrs = {1: [5e-3, 2e-2]}  # step 1 at one rate per group (the driver's lr_at may give them); the others each its own
    _, programs = stage_programs("1f1b", 1, m)
    threads = torch.get_num_threads()
    spec = PipelineSpec(model=ModelConfig(**TINY), partition=(4,), rank_of=(0,), num_ranks=1, dp=1, num_microbatches=m,
                        micro_batch_size=b, seq_len=seq, seed=0, timeout_s=10, max_grad_norm=max_norm,
                        optimizer=OptimizerSpec.from_value({"name": "adamw", "lr": 1e-2, "param_groups": groups}))
    worker = StageWorker(spec, 0, add_clip_points(programs)[0])
    worker.build(*worker.open_store("127.0.0.1"))
    try:
        results = [worker.run_step(k, lrs.get(k)) for k in range(steps)]
        got = {worker.gname[id(q)]: q.detach().clone() for blk in worker.blocks[0] for q in blk.parameters()}
    finally:
        worker.close()
        torch.set_num_threads(threads)
    torch.set_num_threads(1)
    try:
        losses, norms, weights = _reference(groups, max_norm, steps, m, b, seq, lrs)
    finally:
        torch.set_num_threads(threads)
    assert results[0].record[-3:] == ("0ALLREDUCE", "0CLIP", "0OPTIM") and Action.parse("0CLIP") == Action(0, Op.CLIP)
    assert [x for r in results for x in r.losses] == losses
    assert [r.grad_norm for r in results] == norms and max(norms) > max_norm  # it did clip
    assert all(torch.equal(got[n], weights[n]) for n in weights)


def test_a_shard_steps_each_groups_stretch_as_torchs_groups_bitwise() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (5,), (4, 3), (7,)]
    params = [torch.nn.Parameter(torch.randn(*sh, generator=g)) for sh in shapes]
    ref = [torch.nn.Parameter(q.detach().clone()) for q in params]
    group_of = [0, 1, 0, 1]
    hyper = [{"lr": 1e-2, "weight_decay": 0.1}, {"lr": 3e-3, "weight_decay": 0.0}]

    def make(ps: list) -> torch.optim.Optimizer:
        return torch.optim.AdamW([{**p, **hyper[p["group"]]} for p in ps])

    opt = ShardedOptimizer(params, make, replica=0, dp=1, group=None, rank=0, timeout_s=5.0,
                           buckets=zero2_buckets(params, set(), 40), group_of=group_of)
    want = torch.optim.AdamW([{"params": [q for q, gi in zip(ref, group_of) if gi == k], **hyper[k]} for k in (0, 1)])
    assert [g["group"] for g in opt.param_groups] == [p[2] for p in opt.parts] and len(opt.parts) > 2
    for _ in range(3):
        grads = [torch.randn(q.shape, generator=g) for q in params]
        for q, r, gr in zip(params, ref, grads):
            q.grad, r.grad = gr.clone(), gr.clone()
        opt.reduce_grads("0ALLREDUCE")
        opt.step("0OPTIM")
        want.step()
    assert all(torch.equal(q, r) for q, r in zip(params, ref))


# ---- refusals ------------------------------------------------------------------------------------


def test_a_step_rate_is_one_number_or_one_per_group() -> None:
    spec = OptimizerSpec.from_value({"name": "adamw", "lr": 1e-3, "param_groups": [
        {"params": ["a"], "lr": 2e-3}, {"params": ["b"]}]})
    assert step_lr(spec, None) is None and step_lr(spec, 1) == 1.0 and step_lr(spec, [1e-4, 2e-4]) == (1e-4, 2e-4)
    assert [group_lr(spec, g, None) for g in (0, 1)] == [2e-3, 1e-3]
    assert [group_lr(spec, g, (1e-4, 2e-4)) for g in (0, 1)] == [1e-4, 2e-4]
    with pytest.raises(UserError, match=r"lr_at: 3 learning rates for 2 parameter group\(s\)"):
        step_lr(spec, [1e-4, 2e-4, 3e-4])


@pytest.mark.parametrize(("kw", "match"), [
    ({"optimizer": {"name": "adamw", "param_groups": [{"params": ["nope"]}]}},
     r"optimizer.param_groups: 'nope' is not a trainable parameter"),
    ({"optimizer": {"name": "adamw", "param_groups": [{"params": ["blocks.0.wte.weight"]}]}},
     r"optimizer.param_groups: parameter 'blocks.0.wpe.weight' is in no group"),
    ({"max_grad_norm": -1.0}, r"max_grad_norm: the largest global gradient norm"),
])
def test_the_driver_refuses_before_starting_workers(kw: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        run_pipeline(model={"preset": "tiny", "overrides": {"num_layers": 2}}, **kw)
