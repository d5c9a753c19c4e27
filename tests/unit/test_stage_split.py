"""runtime.stage_split: the split backward's walks (``B``, ``W``) against plain PyTorch, where one
parameter is used by two modules of a rank: both ends of a GPT with tied embeddings in one stage
(runtime.stage_split [Note: a parameter two modules of one graph use]; bitwise), and in two
stages of one rank (a V's or an interleaved loop's first and last stage; each stage's
contribution goes into ``.grad`` as that stage's backward or ``W`` runs, not summed per
micro-batch first as one process does: within an ulp, stated per test). One-rank worlds run in
this process; the two-rank V runs two spawned processes over gloo on loopback."""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback

import pytest
import torch
from torch import nn

from memtrain.config import DataConfig, ModelConfig
from memtrain.models.source import build_model
from memtrain.optimizers import OptimizerSpec
from memtrain.planner.pipeline import add_offload_points
from memtrain.runtime.data import TokenBatches
from memtrain.runtime.pipeline_driver import stage_programs
from memtrain.runtime.stage_split import input_grads, keep, weight_grads
from memtrain.runtime.stage_worker import PipelineSpec, StageWorker

STEPS, M, B, SEQ = 3, 3, 2, 8


def _model(**overrides) -> dict:
    """The tiny GPT (tied embeddings) with one layer: 3 blocks."""
    return {"preset": "tiny", "overrides": {"num_layers": 1, **overrides}}


def _reference(model: dict, optimizer: dict, *, bf16: bool = False) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Plain PyTorch on one thread: the model built under seed 0, each step's global batch as
    ``M`` micro-batches in order (the loss over ``M`` before its backward), then the optimizer's
    step; every micro-batch's loss and the final weights by name."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        built = build_model(ModelConfig(**model), max_seq_len=SEQ)
        kind = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optimizer["name"]]
        opt = kind(built.module.parameters(), lr=optimizer["lr"])
        data = TokenBatches(DataConfig(), batch_size=M * B, seq_len=SEQ, vocab_size=built.vocab_size)
        losses = []
        for step in range(STEPS):
            ids, labels = data.batch(step)
            for i in range(M):
                rows = slice(i * B, (i + 1) * B)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    logits = built.forward(ids[rows])
                loss = built.loss_fn(logits, labels[rows])
                (loss / M).backward()
                losses.append(loss.item())
            opt.step()
            opt.zero_grad()
        return losses, {n: p.detach().clone() for n, p in built.module.named_parameters()}
    finally:
        torch.set_num_threads(threads)


def _spec(model: dict, optimizer: dict, partition: tuple[int, ...], rank_of: tuple[int, ...], p: int,
          **kw) -> PipelineSpec:
    return PipelineSpec(model=ModelConfig(**model), partition=partition, rank_of=rank_of, num_ranks=p, dp=1,
                        num_microbatches=M, micro_batch_size=B, seq_len=SEQ, seed=0, timeout_s=20,
                        optimizer=OptimizerSpec.from_value(optimizer), **kw)


def _train(worker: StageWorker) -> tuple[list[float], dict[str, torch.Tensor]]:
    """``STEPS`` steps: the losses and the weights by whole-model name (an offloaded stage's
    from its chunks)."""
    losses = [x for k in range(STEPS) for x in worker.run_step(k).losses]
    weights: dict[str, torch.Tensor] = {}
    for s in worker.stages:
        if s in worker.offloaded:
            store = worker.offloaded[s].store
            named = store.gather_params()
            local = {id(q): n for n, q in nn.ModuleList(worker.blocks[s]).named_parameters()}
            weights |= {worker.gname[i]: named[n].clone() for i, n in local.items()}
        else:
            weights |= {worker.gname[id(q)]: q.detach().clone() for blk in worker.blocks[s] for q in blk.parameters()}
    return losses, weights


def _one_rank(schedule: str, spec_kw: dict, *, stages_per_rank: int = 2,
              offload: bool = False) -> tuple[list[float], dict[str, torch.Tensor]]:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    place, programs = stage_programs(schedule, 1, M, stages_per_rank=stages_per_rank)
    program = add_offload_points(programs, [0])[0] if offload else programs[0]
    threads = torch.get_num_threads()
    worker = StageWorker(_spec(rank_of=place.rank_of, p=1, **spec_kw), 0, program)
    worker.build(*worker.open_store("127.0.0.1"))
    try:
        return _train(worker)
    finally:
        worker.close()
        torch.set_num_threads(threads)


# ---- the walks on toy graphs -------------------------------------------------------------------


class _Toy(nn.Module):
    """An embedding and a head sharing one table (as a GPT with tied embeddings), with a linear
    layer between that runs twice: two parameters each used by two modules of one graph."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.wte = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6, bias=bias)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(torch.tanh(self.mid(self.wte(ids))))))


def _split_walks(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One ``B`` and one ``W`` over ``model``'s forward on ``x``: the gradients by name."""
    kept = []
    hooks = [m.register_forward_hook(lambda m, a, kw, o: kept.append(keep(m, a, kw, o)), with_kwargs=True)
             for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    loss = model(x).square().mean()
    for h in hooks:
        h.remove()
    _, grads = input_grads(loss, None, None, kept)
    got = {id(q): g for q, g in weight_grads(kept, grads)}
    return {n: got[id(q)] for n, q in model.named_parameters()}


def test_split_walks_of_a_tied_table_and_a_module_run_twice_are_a_whole_backwards_bitwise() -> None:
    torch.manual_seed(0)
    model = _Toy()
    ids = torch.randint(0, 11, (2, 5))
    model(ids).square().mean().backward()
    want = {n: q.grad.clone() for n, q in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    got = _split_walks(model, ids)
    assert got.keys() == want.keys() == {"wte.weight", "mid.weight"}
    assert all(torch.equal(got[n], want[n]) for n in want), {n: float((got[n] - want[n]).abs().max()) for n in want}
    assert all(q.grad is None for q in model.parameters())  # W yields them; the worker adds them up


def test_a_shared_parameter_taken_with_the_input_in_one_op_is_refused_naming_the_module() -> None:
    """A linear layer with a bias run twice: ``addmm`` takes the bias with the layer's input, so
    no node leads to the bias alone (runtime.stage_split [Note: a parameter two modules of one
    graph use])."""
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match=r"cannot separate Linear's use of a parameter an earlier module of its "
                                           r"stage uses too: AddmmBackward0 takes it with the module's input"):
        _split_walks(_Toy(bias=True), torch.randint(0, 11, (2, 5)))


# ---- both tied ends in one stage: bitwise ------------------------------------------------------

ONE_STAGE = {
    "fp32": ({}, {}),
    "bf16": ({}, {"dtype": "bf16"}),
    "dropout_recompute": ({"dropout": 0.1}, {"activations": (("keep", "recompute", "recompute"),)}),
    "swap_host": ({}, {"activations": (("swap_host", "keep", "swap_host"),)}),
    "zero2": ({}, {"zero": 2}),
    "host_offload": ({}, {"offload": ("host",)}),
}


@pytest.mark.parametrize("case", list(ONE_STAGE))
def test_zb_h1_with_both_tied_ends_in_one_stage_is_torch_bitwise(case: str) -> None:
    """The reported failure: zb-h1 on one rank, one stage holding the embedding and the head
    (one table): its ``W`` walked the graph twice. Now the losses and the updated weights are
    plain PyTorch's bit for bit, with each activation policy, in bf16, under ZeRO-2 and with
    the stage's states in host chunks."""
    overrides, kw = ONE_STAGE[case]
    model, optimizer = _model(**overrides), {"name": "adamw", "lr": 1e-2}
    got_losses, got = _one_rank("zb-h1", dict(model=model, optimizer=optimizer, partition=(3,), **kw),
                                offload="offload" in kw)
    want_losses, want = _reference(model, optimizer, bf16=kw.get("dtype") == "bf16")
    assert got_losses == want_losses
    assert got.keys() == want.keys() and "blocks.2.lm_head.weight" not in got
    assert all(torch.equal(got[n], want[n]) for n in want), {n: float((got[n] - want[n]).abs().max()) for n in want}


# ---- the tied ends in two stages of one rank: within an ulp ------------------------------------

SGD = {"name": "sgd", "lr": 0.1}
"""SGD: a weight's difference is the learning rate times its gradient's (AdamW would scale a
gradient's last-bit difference by 1/sqrt(v), large where the gradient is near 0)."""
LOSS_TOL, WEIGHT_TOL = 1e-6, 1e-7
"""Measured (every case here): 4.8e-7 on a loss (one ulp of a loss near 5.5), 7.5e-9 on a
weight (weights are at most ~1) after 3 steps."""


def _close(got: tuple[list[float], dict], want: tuple[list[float], dict]) -> None:
    loss_diff = max(abs(a - b) for a, b in zip(got[0], want[0], strict=True))
    assert loss_diff <= LOSS_TOL, loss_diff
    assert got[1].keys() == want[1].keys()
    diff = max(float((got[1][n] - want[1][n]).abs().max()) for n in want[1])
    assert diff <= WEIGHT_TOL, diff


@pytest.mark.parametrize(("schedule", "stages_per_rank", "partition"), [
    ("v-half", 2, (2, 2)), ("v-min", 2, (2, 2)),
    ("interleaved-1f1b", 2, (2, 2)), ("interleaved-1f1b", 3, (2, 1, 1))])
def test_tied_ends_in_two_stages_of_one_rank_are_torch_within_an_ulp(schedule: str, stages_per_rank: int,
                                                                     partition: tuple[int, ...]) -> None:
    """A V (split backward) or an interleaved loop (whole backward) folded onto one rank: the
    table is one parameter the first and last stage share, each ``W``'s (or backward's) part
    added as it comes."""
    model = _model(num_layers=2)
    got = _one_rank(schedule, dict(model=model, optimizer=SGD, partition=partition), stages_per_rank=stages_per_rank)
    _close(got, _reference(model, SGD))


def _v_rank(rank: int, schedule: str, port_q, out_q) -> None:
    """One rank of a two-rank V (a spawned process): its losses and weights as numpy arrays."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        torch.set_num_threads(1)
        place, programs = stage_programs(schedule, 2, M)
        worker = StageWorker(_spec(_model(num_layers=2), SGD, (1, 1, 1, 1), place.rank_of, 2), rank, programs[rank])
        if rank == 0:
            host, port = worker.open_store("127.0.0.1")
            port_q.put(port)
        else:
            host, port = "127.0.0.1", port_q.get(timeout=60)
        worker.build(host, port)
        try:
            losses, weights = _train(worker)
        finally:
            worker.close()
        out_q.put((rank, place.rank_of, losses, {n: w.numpy() for n, w in weights.items()}))
    except BaseException:
        out_q.put((rank, None, traceback.format_exc(), None))


@pytest.mark.parametrize("schedule", ["v-half", "v-min"])
def test_a_v_on_two_ranks_with_both_tied_ends_on_rank_0_is_torch_within_an_ulp(schedule: str) -> None:
    ctx = mp.get_context("spawn")
    port_q, out_q = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_v_rank, args=(r, schedule, port_q, out_q)) for r in range(2)]
    for proc in procs:
        proc.start()
    try:
        results = {r: rest for r, *rest in (out_q.get(timeout=120) for _ in procs)}
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    assert all(rank_of is not None for rank_of, *_ in results.values()), results
    assert results[0][0] == (0, 1, 1, 0)  # stages 0 and 3, the table's two ends, on rank 0
    losses = results[0][1]  # the last stage's rank reports the losses
    weights = {n: torch.from_numpy(w) for r in (0, 1) for n, w in results[r][2].items()}
    assert not results[1][1]
    _close((losses, weights), _reference(_model(num_layers=2), SGD))
