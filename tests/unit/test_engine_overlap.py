"""wrap()/Engine: the optimizer's work overlapped with the backward and across steps: updates
queued early in the last backward, the master taken from the param buffer, fetches kept across
pass ends, the NVMe states read ahead and their write-backs carried into the next step (parity,
budgets, state dicts and fp16 scaling: test_engine.py)."""

from __future__ import annotations

import collections
import dataclasses
import threading

import pytest
import torch
from engine_case import MICRO, _batch, _engine, _policy  # the tiny GPT wrapped

from memtrain.models.gpt import GPT, gpt_config
from memtrain.offload.nvme import BACKGROUND, URGENT
from memtrain.planner import cost
from memtrain.planner.plan import Action, Op, Tier
from memtrain.planner.program import Layout, lower_forward
from memtrain.runtime import wrap


def _update_threads() -> int:
    return sum(t.name.startswith("memtrain-optim") for t in threading.enumerate())


def _count_early(engine, threads: list | None = None, pending: list | None = None) -> list[int]:
    """Chunks queued early, recorded as each ``step()`` starts (with, when given, the optimizer's
    live update threads and its queued updates not yet run)."""
    seen: list[int] = []
    step = engine.optimizer.step

    def counting_step(*args, **kw):
        seen.append(engine.optimizer.num_early)
        if threads is not None:
            threads.append(_update_threads())
        if pending is not None:
            pending.append(sum(getattr(u, "pending", False) for u in engine.optimizer._early.values()))
        step(*args, **kw)

    engine.optimizer.step = counting_step
    return seen


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "thread"])
@pytest.mark.parametrize("home,dtype", [(Tier.HOST, "fp32"), (Tier.NVME, "fp32"), (Tier.NVME, "bf16"), (Tier.HOST, "bf16")])
def test_early_updates_in_the_last_backward_change_nothing(home, dtype, inline, tmp_path):
    # train_step queues each off-device chunk's update as its gradients complete in the last
    # micro-batch (offload.optim [Note: early optimizer step]); a custom loop without
    # last_microbatch steps after the backward. Same kernels on the same values: bitwise equal.
    # On a CPU device the updates run on the training thread (an nvme chunk's one chunk late);
    # a GPU's background thread is forced here with inline=False ([Note: where early updates run]).
    cfg = gpt_config("tiny")
    early, _ = _engine(cfg, home, tmp_path / "a", dtype=dtype)
    late, _ = _engine(cfg, home, tmp_path / "b", dtype=dtype)
    assert early.optimizer.inline
    early.optimizer.inline = inline
    threads, pending = [], []
    counts, late_counts = _count_early(early, threads, pending), _count_early(late)
    for step in range(3):
        x, y = _batch(cfg, step)
        got = early.train_step((x, y))
        total = 0.0
        for xm, ym in zip(x.split(MICRO), y.split(MICRO)):
            loss = late((xm, ym))
            total += loss.item()
            late.backward(loss / 2)
        late.step()
        assert got == total / 2
    num_chunks = len(early.store.chunks)
    assert counts == [num_chunks] * 3 and late_counts == [0] * 3
    # The thread exists only while a step's updates are under way; inline, none ever does, and
    # only the last nvme chunk's update is left for step() to run.
    assert threads == ([0] * 3 if inline else [1] * 3) and _update_threads() == 0
    assert pending == ([int(home is Tier.NVME)] * 3 if inline else [0] * 3)
    _assert_same_states(early, late)
    early.close(), late.close()


def _assert_same_states(engine, ref) -> None:
    """Bitwise equal model and optimizer states; the host staging of the optimizer's NVMe reads
    all given back when the step ended."""
    a, b = engine.state_dict(), ref.state_dict()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for i, st in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in st.items())
    assert all(engine.store.host_ledger.holds(f"staging:{c.index}") == 0 for c in engine.store.chunks)


def _logged_reads(engine, want) -> list[str]:
    """Keys of the NVMe reads from now on for which ``want(key, priority)`` holds."""
    keys: list[str] = []
    read = engine.nvme.read

    def logging_read(key, out, *, priority=URGENT):
        if want(key, priority):
            keys.append(key)
        return read(key, out, priority=priority)

    engine.nvme.read = logging_read
    return keys


def _optimizer_master_reads(engine) -> list[str]:
    """Keys of ``master`` files the optimizer reads (it reads at BACKGROUND priority)."""
    return _logged_reads(engine, lambda key, priority: priority == BACKGROUND and key.endswith(":master"))


@pytest.mark.parametrize("dtype,early,reads_master", [("fp32", True, False), ("fp32", False, True), ("bf16", True, True)])
def test_early_fp32_update_takes_the_master_from_the_param_buffer(dtype, early, reads_master, tmp_path):
    # offload.optim [Note: master from the param buffer]: without mixed precision the buffer the
    # backward fetched is the master, so the early update reads only m and v from disk.
    cfg = gpt_config("tiny")
    engine, _ = _engine(cfg, Tier.NVME, tmp_path / "a", dtype=dtype)
    ref, _ = _engine(cfg, Tier.NVME, tmp_path / "b", dtype=dtype)
    keys = _optimizer_master_reads(engine)
    for step in range(2):
        batch = _batch(cfg, step)
        if early:
            engine.train_step(batch)
        else:
            x, y = batch
            for xm, ym in zip(x.split(MICRO), y.split(MICRO)):
                engine.backward(engine((xm, ym)) / 2)
            engine.step()
        ref.train_step(batch)
    num_chunks = len(engine.store.chunks)
    assert len(keys) == (2 * num_chunks if reads_master else 0)
    _assert_same_states(engine, ref)
    engine.close(), ref.close()


@pytest.mark.parametrize("depth", [2, 3])
def test_fetches_are_not_repeated_at_pass_ends(depth, tmp_path):
    # offload.chunks [Note: across pass ends] and [Note: kept within the prefetch window]: a chunk
    # the next pass starts with keeps its buffer, so fewer fetches than one per run of blocks per
    # pass; the engine fetches exactly what the simulator's walk counts (planner.bounds.fetch_counts,
    # which stream_work_s uses and test_simulate checks against the simulated graph), and the
    # param buffers never exceed what the simulator predicts.
    from memtrain.planner.bounds import fetch_counts

    cfg = gpt_config("tiny", num_layers=4)
    torch.manual_seed(0)
    model = GPT(cfg)
    memory = {"device": "64MiB", "host": "256MiB", "nvme_path": str(tmp_path / "nvme")}
    engine = wrap(model, optimizer=dict(name="adamw", lr=1e-3), memory=memory, micro_batch_size=MICRO, verbose=False,
                  plan=_policy(model, Tier.NVME, chunk_elems=40_000, depth=depth))
    n = 3
    engine.train_step(_batch(cfg, 0, batch=n * MICRO))  # builds the store
    fetched = _logged_reads(engine, lambda key, priority: priority == URGENT)
    store, most = engine.store, [0]
    start = store._start

    def counting_start(c):
        start(c)
        most[0] = max(most[0], sum(o.startswith("buffer:param") for o in store.device_ledger.by_owner()))

    store._start = counting_start
    carried, copied = engine.optimizer.carried_chunks, collections.Counter()
    fetch_carried = store.fetch_carried

    def counting_fetch_carried(c, dst):
        handle = fetch_carried(c, dst)
        copied[c.index] += handle is not None
        return handle

    store.fetch_carried = counting_fetch_carried
    engine.train_step(_batch(cfg, 1, batch=n * MICRO))
    uses = engine.store.uses
    runs: dict[int, int] = {}  # per chunk, the runs of consecutive blocks using it
    for j, cs in enumerate(uses):
        for c in cs:
            runs[c] = runs.get(c, 0) + (j == 0 or c not in uses[j - 1])
    expected = fetch_counts(uses, depth, n)
    # offload.optim [Note: fetch from a write-back]: fetches of the chunks whose write-backs the
    # last step left running copy from their staging (the first forward's at least, and any until
    # the write-back is waited for); the rest read the disk
    assert carried == cost.carried_write_backs(uses, range(len(store.chunks)), engine.optimizer.staged_chunks)
    assert carried and set(+copied) == set(carried)
    assert collections.Counter(int(k.split(":")[1]) for k in fetched) + copied == expected
    # fewer than before the window rule (one fetch per run and pass, less the pass-end chunks)
    before = sum(2 * n * r - n * (c in uses[-1]) - (n - 1) * (c in uses[0]) for c, r in runs.items())
    assert sum(expected.values()) < before
    # no more param buffers at once than prefetch_depth, or than the chunks one block uses
    assert 0 < most[0] <= max(depth, *map(len, uses))
    del store._start
    # a forward that no backward follows gives its kept chunks back at the next forward
    with torch.no_grad():
        engine(_batch(cfg, 2))
    engine((_batch(cfg, 2)))
    held = engine.store.resident_chunks
    assert held and engine.store.held_for_backward
    program = lower_forward(Layout.of_store(engine.store), 0, held, held=True).actions
    assert program[:len(held)] == tuple(Action(0, Op.OFFLOAD, 0, c) for c in held)  # released first
    with torch.no_grad():
        engine(_batch(cfg, 2))
    assert not any(o.startswith("buffer:param") for o in engine.store.device_ledger.by_owner())
    engine.close()


def test_custom_loop_marks_the_last_backward_and_must_step_before_the_next(tmp_path):
    cfg = gpt_config("tiny")
    engine, _ = _engine(cfg, Tier.NVME, tmp_path)
    counts = _count_early(engine)
    x, y = _batch(cfg, 0)
    engine.backward(engine((x, y)), last_microbatch=True)
    # the early updates are under way (on a GPU on a thread, rewriting the weights): no forward
    with pytest.raises(ValueError, match=r"call engine.step\(\) before the next forward"):
        engine((x, y))
    assert engine.step() is True
    assert counts == [len(engine.store.chunks)]
    engine.backward(engine((x, y)))  # allowed again after the step
    engine.step()
    engine.close()


def test_fp16_keeps_the_optimizer_after_the_backward(tmp_path):
    # loss scaling needs every gradient before it skips or unscales: nothing is stepped early
    cfg = gpt_config("tiny")
    engine, _ = _engine(cfg, Tier.HOST, tmp_path, dtype="fp16", loss_scale={"scale": 1024.0})
    counts = _count_early(engine)
    engine.train_step(_batch(cfg, 0))
    x, y = _batch(cfg, 1)
    engine.backward(engine((x, y)), last_microbatch=True)
    engine.step()
    assert counts == [0, 0]
    engine.close()


def _nvme_engine(cfg, tmp_path, staged: int, dtype: str = "fp32"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = GPT(cfg)
    plan = dataclasses.replace(_policy(model, Tier.NVME, chunk_elems=40_000), optim_staged_chunks=staged)
    return wrap(model, optimizer=dict(name="adamw", lr=1e-3), plan=plan, micro_batch_size=MICRO, verbose=False,
                dtype=dtype, memory={"device": "64MiB", "host": "256MiB", "nvme_path": str(tmp_path / "nvme")})


@pytest.mark.parametrize("staged", [3, 5, 40])
def test_states_are_read_ahead_in_the_first_backward(staged, tmp_path):
    # offload.optim [Note: states read ahead]: staged - 3 chunks' states are read while the first
    # micro-batch's backward runs (first forward use first), the rest as their gradients complete
    # in the last; the states are the same and each is read once per step.
    cfg = gpt_config("tiny")
    engine, ref = _nvme_engine(cfg, tmp_path / "a", staged), _nvme_engine(cfg, tmp_path / "b", 1)
    num_chunks = len(engine.store.chunks)
    keys = _logged_reads(engine, lambda key, priority: key.endswith(":exp_avg"))
    in_first: list[list[str]] = []
    backward = engine.backward

    def logging_backward(loss, *, last_microbatch=False, **kw):
        start = len(keys)
        backward(loss, last_microbatch=last_microbatch, **kw)
        if not last_microbatch:
            in_first.append(keys[start:])

    engine.backward = logging_backward
    for step in range(2):
        engine.train_step(_batch(cfg, step))
        ref.train_step(_batch(cfg, step))
    want = min(cost.optim_read_ahead_slots(staged), num_chunks)
    assert [len(k) for k in in_first] == [want, want]
    assert in_first[0] == [f"chunk:{i}:exp_avg" for i in range(want)]  # chunks are in execution order
    assert len(keys) == 2 * num_chunks
    _assert_same_states(engine, ref)
    engine.close(), ref.close()


def _carrying_pair(cfg, tmp_path, dtype: str):
    """Two NVMe engines (3 staged): the second's fetches all read the disk ([Note: fetch from a
    write-back] off), the reference for the first's."""
    engine, ref = _nvme_engine(cfg, tmp_path / "a", 3, dtype), _nvme_engine(cfg, tmp_path / "b", 3, dtype)
    ref.store.fetch_carried = None
    return engine, ref


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_write_backs_run_on_until_the_next_backward(dtype, tmp_path):
    # offload.optim [Note: write-backs across the step end]: the step returns with the last
    # updates' write-backs running, their staging held; the next forward leaves them, and the
    # training thread waits for each only when its staging slot is needed or its chunk's next
    # update starts ([Note: carried write-backs released lazily]). A state dict taken in between
    # sees the new states, the same as those of a run whose forwards read every chunk from disk.
    cfg = gpt_config("tiny")
    engine, ref = _carrying_pair(cfg, tmp_path, dtype)
    engine.train_step(_batch(cfg, 0))
    carried = engine.optimizer.carried_chunks
    assert len(carried) == 3 and carried == sorted(carried, reverse=True)  # the last to complete: chunk 0 last
    assert all(engine.store.host_ledger.holds(f"staging:{i}") > 0 for i in carried)
    x, y = _batch(cfg, 1)
    # [Note: fetch from a write-back]: the forward copies the carried chunks' params from the
    # staging their write-backs hold, taking no staging of its own; the other chunks read the disk
    reads = _logged_reads(engine, lambda key, priority: True)
    staging_allocs, alloc = [], engine.store.host_ledger.alloc
    engine.store.host_ledger.alloc = lambda owner, n: (staging_allocs.append(owner), alloc(owner, n))[1]
    loss = engine((x[:MICRO], y[:MICRO]))
    del engine.store.host_ledger.alloc
    assert engine.optimizer.carried_chunks == carried
    fetched = {int(k.split(":")[1]) for k in reads}
    assert fetched == set(range(len(engine.store.chunks))) - set(carried)
    assert {int(o.split(":")[1]) for o in staging_allocs} == fetched
    held_when_waited = []  # a write-back frees its staging only after the copies out of it

    class Reader:
        def __init__(self, index):
            self.index = index

        def wait(self):
            held_when_waited.append(engine.store.host_ledger.holds(f"staging:{self.index}") > 0)

    for w in engine.optimizer._behind:
        w.readers.append(Reader(w.index))
    engine.backward(loss / 2)
    assert engine.optimizer.carried_chunks == carried and not held_when_waited  # 3 staged: no slot was needed
    loss = engine((x[MICRO:], y[MICRO:]))
    engine.backward(loss / 2, last_microbatch=True)
    assert held_when_waited == [True] * len(carried)  # each waited for by the time its chunk updated
    engine.step()
    ref.train_step(_batch(cfg, 0)), ref.train_step(_batch(cfg, 1))
    assert engine.optimizer.carried_chunks == ref.optimizer.carried_chunks != []
    _assert_same_states(engine, ref)  # state_dict() waits for them (and frees their staging)
    assert engine.optimizer.carried_chunks == []
    engine.close(), ref.close()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_step_without_early_updates_releases_the_carried_write_backs(dtype, tmp_path):
    # offload.optim [Note: carried write-backs released lazily]: a step whose chunks had no early
    # update (a loop that never says last_microbatch=True) streams them in step(); a write-back
    # carried from the step before would otherwise stay, holding the old parameters, and the next
    # forward would copy those. Losses and states stay those of a run whose fetches read the disk.
    cfg = gpt_config("tiny")
    engine, ref = _carrying_pair(cfg, tmp_path, dtype)
    losses = {id(engine): [], id(ref): []}
    for e in (engine, ref):
        losses[id(e)].append(e.train_step(_batch(cfg, 0)))  # early updates: write-backs carried
    assert engine.optimizer.carried_chunks != []
    for e in (engine, ref):
        x, y = _batch(cfg, 1)
        loss = e((x, y))
        e.backward(loss)  # no last_microbatch: every chunk updates in step()
        losses[id(e)].append(loss.item())
        e.step()
    assert engine.optimizer.carried_chunks == []
    for e in (engine, ref):
        losses[id(e)].append(e.train_step(_batch(cfg, 2)))
        with torch.no_grad():
            x, y = _batch(cfg, 3)
            losses[id(e)].append(e((x, y)).item())
    assert losses[id(engine)] == losses[id(ref)]
    _assert_same_states(engine, ref)
    engine.close(), ref.close()
