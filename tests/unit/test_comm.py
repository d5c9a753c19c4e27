"""comm/: p2p with shape and dtype metadata, gradient sums, and timeouts that name the rank and
the action, on a real two-process gloo world over loopback."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback

import torch

from memtrain.comm import (Channel, CommError, Rendezvous, all_gather, all_reduce_, host_store, join, leave,
                           reduce_scatter)


def _scenario(rank: int, port_q, result_q, scenario: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        timeout_s = 30.0 if scenario.startswith("probe") else 1.0  # the probe's barrier: its own, shorter
        store = None
        if rank == 0:
            store = host_store("127.0.0.1", 2, timeout_s=10.0)
            port_q.put(store.port)
            port = store.port
        else:
            port = port_q.get(timeout=30)
        join(rank, Rendezvous(host="127.0.0.1", port=port, world_size=2, timeout_s=timeout_s), store)
        chan = Channel(rank, timeout_s=timeout_s)
        out: object = None
        if scenario == "roundtrip":
            sent = [torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.tensor([1, 2, 3], dtype=torch.int64),
                    torch.ones(2, 1, 4, dtype=torch.bfloat16), torch.tensor(3.5, dtype=torch.float64)]
            if rank == 0:
                for tag, t in enumerate(sent):
                    chan.send(t, 1, tag, f"0SEND_F{tag}")
                chan.flush()
            else:
                # received in the reverse order of the sends: the tags match them up
                got = {tag: chan.recv(0, tag, f"1RECV_F{tag}") for tag in reversed(range(len(sent)))}
                out = all(torch.equal(got[i], t) and got[i].dtype == t.dtype for i, t in enumerate(sent))
            g = torch.full((3,), float(rank + 1))
            all_reduce_([g], torch.distributed.group.WORLD, rank=rank, what="0ALLREDUCE", timeout_s=timeout_s)
            whole = all_gather(torch.full((2,), float(rank)), torch.distributed.group.WORLD, rank=rank,
                               what="0OPTIM (gathering the shards)", timeout_s=timeout_s)
            mine = reduce_scatter(torch.arange(4.0) + 10 * rank, torch.distributed.group.WORLD, rank=rank,
                                  what="0ALLREDUCE", timeout_s=timeout_s)
            out = (out, g.tolist(), whole.tolist(), mine.tolist())
        elif scenario == "fixed":
            # [Note: fixed shapes]: a tag's header goes once; the second and third transfers are
            # payloads only (a header where the receiver waits for a payload would not match it)
            chan = Channel(rank, timeout_s=timeout_s, fixed_shapes=True)
            sent = [torch.full((2, 3), float(k)) for k in range(3)]
            if rank == 0:
                for t in sent:
                    chan.send(t, 1, 5, "0SEND_F5")
                chan.send(torch.ones(4), 1, 6, "0SEND_F6")
                # 4 payloads and one header per tag
                messages = sum(len(works) for sends in chan._pending.values() for works, _ in sends)
                held = chan.held_bytes  # the payloads' bytes, kept until waited for
                chan.release(1, 5)
                left = chan.held_bytes
                chan.flush()
                try:
                    chan.send(torch.ones(5), 1, 6, "0SEND_F6")
                except CommError as e:
                    out = (messages, held, left, chan.held_bytes, chan.held_peak_bytes, str(e))
            else:
                got = [chan.recv(0, 5, "1RECV_F5") for _ in sent]
                one = chan.recv(0, 6, "1RECV_F6")
                out = all(torch.equal(g, t) for g, t in zip(got, sent, strict=True)) and torch.equal(one, torch.ones(4))
        elif scenario == "posted":
            # [Note: receives posted early]: once a tag's shape is known, a receive posted ahead
            # lets the sender's transfer finish before the receiver reaches its recv (under
            # gloo a send waits for the receiver's buffer: without the post, rank 0's flush
            # would time out, rank 1 calling recv only after it)
            chan = Channel(rank, timeout_s=timeout_s, fixed_shapes=True)
            sent = [torch.full((2, 3), float(k)) for k in range(2)]
            if rank == 0:
                chan.send(sent[0], 1, 5, "0SEND_F5")
                chan.flush()
                port_q.get(timeout=30)  # rank 1 has posted
                chan.send(sent[1], 1, 5, "0SEND_F5")
                chan.flush()
                port_q.put("sent")
            else:
                first = chan.recv(0, 5, "1RECV_F5")
                posts = (chan.post(0, 7, "1RECV_F7"), chan.post(0, 5, "1RECV_F5"), chan.post(0, 5, "1RECV_F5"))
                port_q.put("posted")
                port_q.get(timeout=30)  # rank 0's send has completed
                second = chan.recv(0, 5, "1RECV_F5")
                out = (posts, torch.equal(first, sent[0]) and torch.equal(second, sent[1]), not chan._posted)
        elif scenario == "gather_timeout":
            if rank == 1:
                try:
                    all_gather(torch.zeros(2), torch.distributed.group.WORLD, rank=rank,
                               what="1OPTIM (gathering the shards)", timeout_s=timeout_s)
                except CommError as e:
                    out = str(e)
            else:
                port_q.get(timeout=30)  # stay alive until rank 1 has timed out
        elif scenario == "timeout":
            if rank == 1:
                try:
                    chan.recv(0, 3, "0RECV_F3")
                except CommError as e:
                    out = str(e)
            else:
                port_q.get(timeout=30)  # stay alive until rank 1 has timed out
        elif scenario == "probe":  # comm.link_probe on both ranks: each its samples
            from memtrain.comm.link_probe import probe_rank

            got = probe_rank(rank, num_bytes=1 << 12, repeats=3, timeout_s=10.0)
            out = {k: len(v) for k, v in got.items()}
        elif scenario == "probe_barrier":  # [Note: the probe's barrier]: rank 0 never comes
            from memtrain.comm.link_probe import barrier

            if rank == 1:
                t0 = time.perf_counter()
                try:
                    barrier(1, 1.0, "probe late receive 0")
                except CommError as e:
                    out = (str(e), time.perf_counter() - t0)
            else:
                port_q.get(timeout=30)  # stay alive until rank 1 has timed out
        elif scenario == "dead":
            if rank == 0:  # dies once rank 1 has joined (an earlier exit would fail rank 1's join instead)
                port_q.get(timeout=30)
                os._exit(0)
            port_q.put("joined")
            try:
                chan.recv(0, 3, "1RECV_F3")
            except CommError as e:
                out = str(e)
        if scenario in ("timeout", "gather_timeout", "probe_barrier") and rank == 1:
            port_q.put("done")
        result_q.put((rank, out))
        if scenario != "dead":
            leave()
    except BaseException:
        result_q.put((rank, traceback.format_exc()))


def _run(scenario: str) -> dict[int, object]:
    ctx = mp.get_context("spawn")
    port_q, result_q = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_scenario, args=(r, port_q, result_q, scenario)) for r in range(2)]
    for p in procs:
        p.start()
    want = 1 if scenario == "dead" else 2
    results = dict(result_q.get(timeout=60) for _ in range(want))
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    return results


def test_send_recv_carries_shape_and_dtype_and_all_reduce_sums() -> None:
    results = _run("roundtrip")
    assert results[1] == (True, [3.0, 3.0, 3.0], [0.0, 0.0, 1.0, 1.0], [14.0, 16.0]), results
    assert results[0] == (None, [3.0, 3.0, 3.0], [0.0, 0.0, 1.0, 1.0], [10.0, 12.0]), results


def test_a_channel_with_fixed_shapes_sends_a_tags_header_once_and_refuses_a_changed_shape() -> None:
    results = _run("fixed")
    assert results[1] is True, results
    held = 3 * 6 * 4 + 4 * 4  # the payloads' bytes, each held until released or flushed
    assert results[0] == (6, held, 4 * 4, 0, held, "rank 0: 0SEND_F6 to rank 1: a torch.float32 tensor of shape [5] "
                          "where this transfer carried torch.float32 of shape [4] before; a channel with fixed shapes "
                          "sends the same shapes on a tag every step"), results


def test_a_receive_posted_early_lets_the_send_finish_before_the_recv() -> None:
    results = _run("posted")
    # an unknown tag is not posted, a known one once
    assert results[1] == ((False, True, False), True, True), results
    assert results[0] is None, results


def test_receive_that_never_comes_names_rank_action_and_timeout() -> None:
    results = _run("timeout")
    assert results[1] == "rank 1: 0RECV_F3 from rank 0 timed out after 1 s", results


def test_all_gather_that_never_completes_names_rank_action_and_timeout() -> None:
    results = _run("gather_timeout")
    assert results[1] == "rank 1: 1OPTIM (gathering the shards) timed out after 1 s", results


def test_receive_from_dead_peer_is_an_error_not_a_hang() -> None:
    results = _run("dead")
    assert isinstance(results[1], str) and results[1].startswith("rank 1: 1RECV_F3 from rank 0 "), results


def test_link_probe_gives_each_rank_its_samples() -> None:
    results = _run("probe")
    assert results[0] == {"small": 3, "large": 3, "send": 3, "late_send": 3}, results
    assert results[1] == {"late": 3}, results


def test_link_probe_barrier_waits_its_own_short_timeout_and_names_both_ranks() -> None:
    results = _run("probe_barrier")
    text, waited = results[1]
    assert text == "rank 1: probe late receive 0 (waiting for rank 0 at a barrier) timed out after 1 s", results
    assert waited < 10, waited  # its own second, not the world's 30
