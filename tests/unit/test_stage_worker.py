"""runtime/stage_worker.py and the driver's lowering, in this process without Ray: a one-rank
world (gloo over loopback) runs its program through the handler table and records it."""

from __future__ import annotations

import math
import os

import pytest
import torch

from memtrain.config import ConfigError, ModelConfig
from memtrain.planner.pipeline import add_offload_points
from memtrain.planner.plan import Action, Op
from memtrain.runtime.pipeline_driver import even_partition, stage_programs
from memtrain.runtime.stage_worker import PipelineSpec, StageWorker, block_ranges


def test_programs_end_with_each_stages_sum_and_step() -> None:
    place, programs = stage_programs("v-half", 2, 4)
    assert place.rank_of == (0, 1, 1, 0)
    for r, acts in programs.items():
        stages = place.stages_of(r)
        assert [str(a) for a in acts[-2 * len(stages):]] == [f"{s}{op}" for s in stages for op in ("ALLREDUCE", "OPTIM")]
    # the V's turn (stages 1 and 2, both on rank 1) passes its tensors locally; the other links send
    assert Action(1, Op.SEND_F, 0) not in programs[1] and Action(2, Op.RECV_F, 0) not in programs[1]
    assert Action(0, Op.SEND_F, 0) in programs[0] and Action(1, Op.RECV_F, 0) in programs[1]


def test_even_partition() -> None:
    assert even_partition(8, 3) == (3, 3, 2)
    assert [list(r) for r in block_ranges((3, 3, 2))] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    with pytest.raises(ConfigError, match="partition: 9 stages"):
        even_partition(8, 9)


def _one_rank(program: tuple[Action, ...], **kw) -> StageWorker:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    spec = PipelineSpec(model=ModelConfig(preset="tiny", overrides={"num_layers": 1}), partition=(3,), rank_of=(0,),
                        num_ranks=1, dp=1, num_microbatches=2, micro_batch_size=1, seq_len=8, seed=0, timeout_s=10,
                        **kw)
    worker = StageWorker(spec, 0, program)
    worker.build(*worker.open_store("127.0.0.1"))
    return worker


def test_the_data_source_is_opened_once_not_every_step(tmp_path, monkeypatch) -> None:
    """A token file is opened and checked (a scan of every id) when the worker first reads a
    batch; each later step only reads its rows."""
    import numpy as np

    from memtrain.config import DataConfig
    from memtrain.runtime import data as data_mod

    path = tmp_path / "tokens.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint16))
    opened = []
    real_open = data_mod.TokenBatches._open
    monkeypatch.setattr(data_mod.TokenBatches, "_open", lambda self, p: opened.append(p) or real_open(self, p))
    _, programs = stage_programs("1f1b", 1, 2)
    worker = _one_rank(programs[0], data=DataConfig(source="tokens", path=str(path)))
    try:
        got = [worker.run_step(k).losses for k in range(3)]
    finally:
        worker.close()
    assert opened == [path] and all(len(g) == 2 for g in got)


def test_one_rank_records_its_program_and_fails_loudly_on_an_unknown_op() -> None:
    threads = torch.get_num_threads()
    _, programs = stage_programs("1f1b", 1, 2)
    worker = _one_rank(programs[0])
    try:
        first = worker.run_step(0)
        assert first.record == tuple(str(a) for a in programs[0])
        assert len(first.losses) == 2 and all(torch.isfinite(torch.tensor(first.losses)))
        assert worker.run_step(0).losses != first.losses  # the step updated the weights
        worker.program = programs[0] + (Action(0, Op.SNAPSHOT),)
        with pytest.raises(RuntimeError, match=r"rank 0: no handler for op SNAPSHOT \(0SNAPSHOT\)"):
            worker.run_step(1)
    finally:
        worker.close()
        torch.set_num_threads(threads)


def test_offload_points_bracket_each_offloaded_stage() -> None:
    place, programs = stage_programs("v-half", 2, 2)
    with_points = add_offload_points(programs, [1, 3])
    assert add_offload_points(with_points, [1, 3]) == with_points  # a program that has them stays
    r0, r1 = ([str(a) for a in with_points[r]] for r in (0, 1))
    assert [a for a in r0 if "PREFETCH" in a or "OFFLOAD" in a] == ["3PREFETCH", "3OFFLOAD"]
    assert r0[r0.index("3PREFETCH") + 1] == next(str(a) for a in programs[0] if a.stage == 3)
    assert r0[r0.index("3OFFLOAD") - 1] == "3ALLREDUCE" and r0[r0.index("3OFFLOAD") + 1] == "3OPTIM"
    assert r1[0] == "1PREFETCH" and r1[r1.index("1OFFLOAD") + 1] == "1OPTIM"
    assert with_points[0][:len(programs[0])] != programs[0] and len(r0) == len(programs[0]) + 2


@pytest.mark.parametrize("home", ["host", "nvme"])
def test_one_rank_offloaded_is_bitwise_the_device_run(tmp_path, home: str) -> None:
    """One rank's stage in host chunks or NVMe files: the device run's losses bit for bit, its
    states between steps in the store's ledger (none on the device), the optimizer's points run,
    the parameters released between steps, the updated ones in the chunks (the files), and the
    next step computing from there: chunks overwritten with NaN make its losses NaN."""
    threads = torch.get_num_threads()
    _, programs = stage_programs("1f1b", 1, 2)
    device = _one_rank(programs[0])
    try:
        want = [device.run_step(k).losses for k in range(3)]
        n = sum(q.numel() for q in device.owns[0])
        trained = {name: q.detach().clone() for name, q in torch.nn.ModuleList(device.blocks[0]).named_parameters()}
    finally:
        device.close()
    program = add_offload_points(programs, [0])[0]
    worker = _one_rank(program, offload=(home,), nvme_dir=str(tmp_path))
    try:
        got = []
        for k in range(3):
            res = worker.run_step(k)
            assert res.record == tuple(str(a) for a in program)
            got.append(res.losses)
            held = worker.state_bytes()
            assert held["device"] == 0 and held["optimizer_states"] == 8 * n
            if home == "host":
                assert held["host"] == 16 * n and held["nvme"] == 0  # master, grads, 2 states
                assert [a.op for a in worker.offloaded[0].store.executed] == [Op.OPTIM] * 3
            else:
                assert held["host"] == 0 and 12 * n <= held["nvme"] == held["nvme_files"] <= res.peak_bytes["nvme"]
                assert len(list((tmp_path / "rank0" / "stage0").glob("*.mt"))) == 3 * 3  # 3 chunks' files
                ops = [a.op for a in worker.offloaded[0].store.executed]
                assert ops.count(Op.OPTIM_READ) == ops.count(Op.OPTIM) == ops.count(Op.OPTIM_WAIT) == 3
        assert got == want
        store = worker.offloaded[0].store
        assert all(q.stride() == (0,) * q.dim() and q.isnan().all() for q in worker.owns[0])  # released
        assert all(q.grad is None for q in worker.owns[0])
        on_home = store.gather_params()  # the chunks' masters: host tensors, or read from the files
        assert on_home.keys() == trained.keys() and all(torch.equal(on_home[k], trained[k]) for k in trained)
        for c in store.chunks:
            store._write(c, "master", torch.full((c.num_elems,), float("nan")))
        assert all(math.isnan(x) for x in worker.run_step(3).losses)
    finally:
        worker.close()
        torch.set_num_threads(threads)
    assert not list(tmp_path.iterdir())


def test_zero_splits_an_offloaded_stage_into_whole_chunks_of_about_equal_elements() -> None:
    from memtrain.planner.plan import Tier
    from memtrain.runtime.stage_offload import _chunk_plans, split_owners

    assert split_owners([1] * 10, 2) == [0] * 5 + [1] * 5
    assert split_owners([6, 1, 1, 1, 1], 2) == [0, 1, 1, 1, 1]  # a parameter is never split
    assert split_owners([3, 3, 3], 4) == [0, 2, 3]  # a replica may get nothing (its share holds no middle)
    groups = [[("a", 4), ("b", 4)], [("c", 4), ("d", 4)], [("e", 8)]]
    plans, owners = _chunk_plans(groups, 8, Tier.HOST, 2)  # 12 elements each: a, b, c and d, e
    assert [p.param_names for p in plans] == [("a", "b"), ("c",), ("d",), ("e",)] and owners == (0, 0, 1, 1)
    plans, owners = _chunk_plans(groups, 16, Tier.HOST, 2)  # no chunk straddles the two replicas
    assert [p.param_names for p in plans] == [("a", "b", "c"), ("d", "e")] and owners == (0, 1)
    plans, owners = _chunk_plans(groups, 16, Tier.HOST, 1)
    assert [p.param_names for p in plans] == [("a", "b", "c", "d"), ("e",)] and owners == (0, 0)
    assert [p.index for p in plans] == [0, 1] and {p.home for p in plans} == {Tier.HOST}


def test_busy_time_counts_compute_actions_only():
    from memtrain.runtime.stage_worker import StepResult

    r = StepResult(record=("0F0", "0SEND_F0", "1RECV_B0", "0B0", "0W0", "0ALLREDUCE", "0OPTIM"), losses=(), time_s=30.0,
                   action_s=(1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0))
    assert r.busy_s == 1.0 + 8.0 + 16.0 + 64.0


def test_cores_are_bound_only_where_single_threaded_workers_take_them_all() -> None:
    """runtime.stage_device [Note: a worker per core]."""
    from memtrain.runtime.stage_device import pins_cores

    n = len(os.sched_getaffinity(0))
    assert pins_cores(n, 1) and pins_cores(n + 1, 1)
    assert not pins_cores(n, 2)
    assert not pins_cores(n - 1, 1)  # a core to spare: none bound
