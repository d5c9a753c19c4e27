"""ZeRO-2's running count of gradient bytes is exact at every reading, on a local Ray.

runtime.stage_zero [Note: gradient bytes counted as they change]: ``ShardedOptimizer`` keeps a
running count of the gradient bytes its stage holds (``held_bytes``, and ``_held``, which each
reading of the peak takes). Here every worker checks it against a full recount of every gradient
tensor it holds, by storage bytes (each parameter's ``.grad``, the buckets' copies under way, the
shard pieces and the summed shard, each storage once): after every action of its program from
the stage's ``REDUCE_SCATTER`` (where the count starts) until its ``OPTIM`` and at
every reading (``_note``; the bucket's copy being made then, not yet reachable, is the reading's
own ``delta``). pp 2 × dp 2, ZeRO-2 in buckets of 4096 elements, the tiny GPT with tied
embeddings (2 layers), 2 steps of ``m`` micro-batches of 2 sequences of 16 tokens: zb-h1 (the
two ends' tables on two ranks, summed at ``ALLREDUCE``; also at an odd width, whose buckets pad
the last replica's slice) and v-half (both ends on rank 0, one table the head's stage grows in
its ``W``; also with that ``W`` after the table's owner armed).
"""

from __future__ import annotations

import sys

import pytest
import ray

from memtrain.config import ModelConfig
from memtrain.runtime.pipeline_driver import PipelineRun, stage_programs
from memtrain.runtime.stage_worker import PipelineSpec

B, SEQ, STEPS = 2, 16, 2
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # its functions run in the workers (__ray_call__)


def _recount(opt) -> int:
    """Every gradient tensor ``opt`` (a ``ShardedOptimizer``) holds, by storage bytes, each storage once."""
    storages = [q.grad.untyped_storage() for q in opt.params if q.grad is not None]
    storages += [p.flat.untyped_storage() for _, p in opt._pending if p.flat is not None]
    storages += [t.untyped_storage() for t in opt._pieces.values()]
    storages += [opt._grad.untyped_storage()] if opt._grad is not None else []
    return sum({s.data_ptr(): s.nbytes() for s in storages}.values())


def _install(worker) -> None:
    """Check the running count after each action and at each reading; mismatches in ``count_errors``."""
    from memtrain.runtime.stage_zero import ShardedOptimizer

    errors = worker.count_errors = []
    worker.count_checks = 0
    opts = {s: o for s, o in worker.optims.items() if isinstance(o, ShardedOptimizer) and o.zero2}

    def check(where: str, s: int, running: int, want: int) -> None:
        worker.count_checks += 1
        if running != want:
            errors.append((where, s, running, want))

    for op, inner in list(worker.handlers.items()):
        def handler(a, inner=inner):
            inner(a)
            for s, o in opts.items():
                if o._armed is not None or o._grad is not None:  # from its REDUCE_SCATTER to its OPTIM
                    check(f"after {a}", s, o.held_bytes, _recount(o))
        worker.handlers[op] = handler
    for s, o in opts.items():
        def note(delta, o=o, s=s, inner=o._note):
            inner(delta)
            check(f"reading ({delta} B being copied)", s, o._held, _recount(o) + delta)
        o._note = note


def _result(worker) -> tuple[list, int]:
    return worker.count_errors, worker.count_checks


ODD = {"hidden_size": 63, "num_heads": 3}
"""A width of odd parameters: buckets of an odd number of elements, whose second replica's slice
is one element shorter than the reduce-scatter's padded output it is a view of."""


def _head_w_late(programs: dict) -> dict:
    """v-half over 2 ranks, one micro-batch: rank 0's ``3W0`` (the head's, whose table stage 0
    owns) deferred past stage 0's ``REDUCE_SCATTER`` to just before ``0W0``, as a zero-bubble plan
    may place a ``W``: the table's gradient then first appears after its owner started counting."""
    acts = list(programs[0])
    w = next(a for a in acts if str(a) == "3W0")
    acts.remove(w)
    acts.insert(next(k for k, a in enumerate(acts) if str(a) == "0W0"), w)
    return {**programs, 0: tuple(acts)}


@pytest.mark.parametrize(("schedule", "m", "width"), [("zb-h1", 4, {}), ("zb-h1", 4, ODD), ("v-half", 4, {}),
                                                      ("v-half", 1, {}), ("v-half-late-w", 1, {})])
def test_running_gradient_count_is_a_recount_after_every_action(local_ray, schedule: str, m: int, width) -> None:
    place, programs = stage_programs(schedule.removesuffix("-late-w"), 2, m, zero=2)
    if schedule.endswith("-late-w"):
        programs = _head_w_late(programs)
        assert [str(a) for a in programs[0]].index("0REDUCE_SCATTER0") < [str(a) for a in programs[0]].index("3W0")
    parts = (2, 2) if place.num_stages == 2 else (1, 1, 1, 1)
    spec = PipelineSpec(model=ModelConfig(preset="tiny", overrides={"num_layers": 2, **width}), partition=parts,
                        rank_of=place.rank_of, num_ranks=2, dp=2, num_microbatches=m, micro_batch_size=B,
                        seq_len=SEQ, seed=0, timeout_s=30, zero=2, zero_bucket_elems=4096)
    with PipelineRun(spec, programs, step_timeout_s=120) as run:
        ray.get([w.__ray_call__.remote(_install) for w in run.workers])
        for step in range(STEPS):
            run.step(step)
        got = ray.get([w.__ray_call__.remote(_result) for w in run.workers])
    for rank, (errors, checks) in enumerate(got):
        assert checks > 0 and errors == [], (rank, errors[:5], len(errors))
