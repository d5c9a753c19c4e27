"""KeyedPool: priority order, per-key order, priority inheritance, errors, shutdown."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest
import torch

from memtrain.offload.io_queue import BACKGROUND, URGENT, KeyedPool


def _gate_worker(pool: KeyedPool) -> threading.Event:
    """Occupy the pool's only worker until the returned event is set."""
    gate, started = threading.Event(), threading.Event()
    pool.submit("gate", URGENT, lambda: (started.set(), gate.wait(5)))
    assert started.wait(5)
    return gate


def test_urgent_work_overtakes_queued_background_work():
    pool = KeyedPool(1)
    order: list[str] = []
    gate = _gate_worker(pool)
    futs = [pool.submit(f"bg{i}", BACKGROUND, order.append, f"bg{i}") for i in range(3)]
    futs += [pool.submit(f"u{i}", URGENT, order.append, f"u{i}") for i in range(2)]
    gate.set()
    for f in futs:
        f.result(5)
    # urgent first, each class in submission order
    assert order == ["u0", "u1", "bg0", "bg1", "bg2"]
    pool.shutdown()


def test_one_key_runs_in_submission_order_whatever_the_priority():
    pool = KeyedPool(4)
    order: list[str] = []
    gate = _gate_worker(pool)
    release = threading.Event()
    # a slow background write of "k", then an urgent read of "k": the read must see the write
    w = pool.submit("k", BACKGROUND, lambda: (release.wait(5), order.append("write")))
    r = pool.submit("k", URGENT, order.append, "read")
    other = pool.submit("other", URGENT, order.append, "other")
    other.result(5)  # free workers take other keys meanwhile; none blocks on "k"
    assert order == ["other"]
    release.set()
    gate.set()
    w.result(5), r.result(5)
    assert order == ["other", "write", "read"]
    pool.shutdown()


def test_an_urgent_op_lends_its_priority_to_the_queued_ops_of_its_key():
    pool = KeyedPool(1)
    order: list[str] = []
    gate = _gate_worker(pool)
    futs = [pool.submit(f"bg{i}", BACKGROUND, order.append, f"bg{i}") for i in range(3)]
    futs.append(pool.submit("k", BACKGROUND, order.append, "k-write"))
    futs.append(pool.submit("k", URGENT, order.append, "k-read"))  # boosts k-write ahead of bg*
    gate.set()
    for f in futs:
        f.result(5)
    assert order == ["k-write", "k-read", "bg0", "bg1", "bg2"]
    pool.shutdown()


def test_errors_reach_the_future_and_the_key_goes_on():
    pool = KeyedPool(2)

    def boom():
        raise OSError("disk on fire")

    bad = pool.submit("k", URGENT, boom)
    good = pool.submit("k", URGENT, lambda: 7)
    with pytest.raises(OSError, match="on fire"):
        bad.result(5)
    assert good.result(5) == 7
    pool.shutdown()


def test_shutdown_runs_what_was_submitted_then_refuses_more():
    pool = KeyedPool(2)
    done: list[int] = []
    futs = [pool.submit(f"k{i % 3}", i % 2, done.append, i) for i in range(50)]
    pool.shutdown()
    assert all(f.done() for f in futs) and sorted(done) == list(range(50))
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.submit("k", URGENT, done.append, 0)
    with pytest.raises(ValueError, match="num_threads"):
        KeyedPool(0)


def test_a_finished_task_keeps_neither_its_arguments_nor_its_result():
    # [Note: a finished task keeps nothing]: an idle worker held its last task, so a read's
    # buffer (its argument and its result) outlived the caller's last reference to it.
    pool = KeyedPool(1)
    buf = torch.empty(16)
    ref = weakref.ref(buf)
    fut = pool.submit("k", URGENT, lambda out: out.fill_(1.0), buf)
    assert fut.result(5) is buf
    del buf, fut
    for _ in range(200):  # the worker drops it just after the future is done
        gc.collect()
        if ref() is None:
            break
        time.sleep(0.01)
    assert ref() is None, "the idle worker still holds its last task's buffer"
    pool.shutdown()
