"""A pipeline rank's failed step: what it gives back, and why it runs no further step.

[Note: a failed step poisons the worker] ``StageWorker.run_step`` can raise half-way through its
program: a ``CommError`` from a peer that died or hung, a bad batch, a handler's own error. The
half-run step leaves state behind on this rank (the dropout walk's states, the per-step inbox,
outbox and saved graphs, gradients partly accumulated, ZeRO-2 buckets and chunks under way, kept
activation bytes on the ledger, an offloaded stage's param buffers) and, worse, with its peers:
receives posted early (comm.p2p [Note: receives posted early]) stay posted, sends already started
may still be delivered, and a collective this rank started may wait for replicas that never come.
Gloo cannot take back a posted ``irecv`` (aborting its wait leaves the buffer registered with the
pair), so a retry of the same step would let a stale message of the failed step match a receive
of the retry, silently, on the same tag. A reset for a retry cannot be made honest from one rank.

So the failed step is abandoned and the worker poisoned (``abandon_step``): every tensor of the
step it holds is dropped (autocast's weight casts, runtime.stage_worker [Note: one weight cast a
step], the per-step dicts, gradients, the reducers' buffers and sums, the
traceback frames' locals, the param buffers of offloaded stages, the kept stages' ledger bytes),
the dropout generator goes back to the state it had at the step's start, and from then on
``run_step``, ``state`` and ``load_state`` raise ``StepFailed`` naming the rank and the failed
step (a checkpoint taken now could mix updated and stale stages; one loaded could not mend the
transfers). What is left is ``close`` (and ``ping``, ``state_bytes``): a run continues by
restarting its workers from its last checkpoint, as ``runtime.pipeline_driver`` does on any failure.
"""

from __future__ import annotations

import traceback
from typing import Any

from memtrain.runtime.stage_zero import ShardedOptimizer

__all__ = ["StepFailed", "abandon_step", "check_usable"]


class StepFailed(RuntimeError):
    """A call on a worker poisoned by a failed step ([Note: a failed step poisons the worker])."""


def abandon_step(worker: Any, step: int, error: BaseException) -> None:
    """``worker`` (a ``StageWorker``) failed in ``run_step(step)`` with ``error``: drop what the
    step holds and poison the worker (the module's Note). Never raises over ``error``."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    worker.failed_step = (f"rank {worker.rank}: run_step({step}) failed ({type(error).__name__}: {first}); a rank "
                          "whose step failed may still have that step's receives posted and its sends and "
                          "collectives under way with its peers, which cannot be taken back, so it runs no "
                          "further step and takes or loads no checkpoint: restart the workers (from the last "
                          "checkpoint)")
    traceback.clear_frames(error.__traceback__)  # the handlers' locals: the step's graphs and tensors
    for what, release in (("the weight casts", lambda: worker._release_casts() if hasattr(worker, "_release_casts")
                           else None),  # runtime.stage_worker [Note: one weight cast a step]
                          ("the step's tensors", lambda: _drop_tensors(worker)),
                          ("the dropout generator", lambda: worker.rng.abandon() if hasattr(worker, "rng") else None),
                          ("the gradients", lambda: _drop_grads(worker)),
                          ("the activations", lambda: worker.acts.abandon() if hasattr(worker, "acts") else None)):
        try:
            release()
        except Exception as e:  # the step's own error is the one raised; this one is noted on it
            error.add_note(f"rank {worker.rank}: releasing {what} of the failed step failed too: {e!r}")


def _drop_tensors(worker: Any) -> None:
    worker._kept = None
    worker._new_step_state()  # inbox, outbox, saved graphs, for_w


def _drop_grads(worker: Any) -> None:
    """Every gradient of the step, the reducers' buffers and sums, the offloaded stages' param buffers."""
    for opt in getattr(worker, "optims", {}).values():
        if isinstance(opt, ShardedOptimizer):
            opt.abandon()
        else:
            opt.zero_grad(set_to_none=True)
    for params in getattr(worker, "uses", {}).values():
        for q in params:
            q.grad = None
    for st in worker.offloaded.values():
        if st.reducer is not None:
            st.reducer.abandon()
        st.store.release_all()


def check_usable(worker: Any, what: str) -> None:
    """Raise ``StepFailed`` when ``worker`` is poisoned by a failed step, ``what`` being refused."""
    failed = getattr(worker, "failed_step", None)
    if failed is not None:
        raise StepFailed(f"{what} refused: {failed}")
