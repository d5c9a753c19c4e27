"""runtime/stage_failure.py in this process: a one-rank world (gloo over loopback) whose step fails
half-way gives back what the step held, puts its dropout generator back at the step's start, and
refuses any further step or checkpoint, naming the rank and the failed step. The same across ranks
on Ray (peers' errors, receives posted early, ZeRO-2 buckets under way) is
tests/integration/test_pipeline_failed_step.py."""

from __future__ import annotations

import os
import traceback

import pytest
import torch

from memtrain.config import ModelConfig
from memtrain.planner.pipeline import add_offload_points
from memtrain.planner.plan import Op
from memtrain.runtime.pipeline_driver import stage_programs
from memtrain.runtime.stage_failure import StepFailed
from memtrain.runtime.stage_rng import get_state
from memtrain.runtime.stage_worker import PipelineSpec, StageWorker


def _one_rank(schedule: str, tied: bool = True, **kw) -> StageWorker:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    _, programs = stage_programs(schedule, 1, 2)
    program = add_offload_points(programs, [0])[0] if kw.get("offload") else programs[0]
    spec = PipelineSpec(model=ModelConfig(preset="tiny", overrides={"num_layers": 1, "dropout": 0.1,
                                                                          "tie_embeddings": tied}),
                        partition=(3,), rank_of=(0,), num_ranks=1, dp=1, num_microbatches=2, micro_batch_size=1,
                        seq_len=8, seed=0, timeout_s=10, **kw)
    worker = StageWorker(spec, 0, program)
    worker.build(*worker.open_store("127.0.0.1"))
    return worker


def _fail_after(worker: StageWorker, op: Op | str, microbatch: int) -> None:
    """The handler of ``op`` runs, then raises at ``microbatch`` (a batch found bad after it);
    ``CLAIM``: the activations' claim raises inside ``B``, whose locals hold the graph (a swap-in
    that failed, say)."""
    if op == "CLAIM":
        inner_claim = worker.acts.claim

        def claim(stage, mb):
            if mb == microbatch:
                raise ValueError(f"bad batch at {stage}B{mb}")
            inner_claim(stage, mb)
        worker.acts.claim = claim
        return
    inner = worker.handlers[op]

    def handler(a):
        inner(a)
        if a.microbatch == microbatch:
            raise ValueError(f"bad batch at {a}")
    worker.handlers[op] = handler


@pytest.mark.parametrize(("schedule", "kw", "op"), [
    ("1f1b", {}, Op.F),  # a kept stage's ledger bytes and a saved graph
    # B → W graphs, replayed records held (untied: one stage holding both ends of a tied table
    # cannot split its backward, runtime.stage_worker [Note: B and W])
    ("zb-h1", {"activations": (("recompute",) * 3,), "tied": False}, Op.B),
    ("1f1b", {"offload": ("host",)}, Op.F),  # an offloaded stage's param buffers
    # a recompute's held input goes with its graph, which the failed B's frame held
    ("1f1b", {"activations": (("recompute",) * 3,)}, "CLAIM"),
])
def test_a_failed_step_gives_back_its_state_and_poisons_the_worker(schedule, kw, op) -> None:
    threads = torch.get_num_threads()
    worker = _one_rank(schedule, **kw)
    try:
        worker.run_step(0)
        start = get_state(worker.device)  # the generator at step 1's start
        _fail_after(worker, op, 1)
        name = "B" if op == "CLAIM" else op.value
        # the step's own error, kept by the caller (for a report, say): not the step's tensors
        with pytest.raises(ValueError, match=f"bad batch at 0{name}1") as failed:
            worker.run_step(1)
        assert not (worker.inbox or worker.outbox or worker.saved or worker.for_w) and worker._kept is None
        assert all(q.grad is None for ps in worker.uses.values() for q in ps)
        assert torch.equal(get_state(worker.device), start)  # the dropout walk undone
        assert worker.rng._at == {} and worker.rng._end is None
        assert worker.acts.device_ledger.in_use_bytes == 0  # every activation of the step given back
        for st in worker.offloaded.values():
            assert st.store.device_ledger.in_use_bytes == 0 and all(c.buf is None for c in st.store.chunks)
        refused = r"refused: rank 0: run_step\(1\) failed \(ValueError: bad batch at 0" + name + "1\\)"
        with pytest.raises(StepFailed, match=r"run_step\(2\) " + refused):
            worker.run_step(2)
        with pytest.raises(StepFailed, match=r"run_step\(1\) " + refused):  # a retry of the same step too
            worker.run_step(1)
        with pytest.raises(StepFailed, match=r"state\(\) " + refused):
            worker.state()
        with pytest.raises(StepFailed, match=r"load_state\(\) " + refused):
            worker.load_state({})
        assert torch.equal(get_state(worker.device), start)  # the refusals drew nothing
        assert "in run_step" in "".join(traceback.format_tb(failed.value.__traceback__))  # still says where
    finally:
        worker.close()
        torch.set_num_threads(threads)
