"""planner.pipeline_sends: where each send of a pipeline's programs is known to be over."""

from __future__ import annotations

import pytest

from memtrain.planner.pipeline import SCHEDULES
from memtrain.planner.pipeline_sends import held_until, matching_receive, send_releases, sent_peak_bytes
from memtrain.planner.plan import Action, Op
from memtrain.runtime.pipeline_driver import stage_programs


def test_1f1b_releases_a_forwards_output_at_its_gradient_and_a_gradient_at_the_next_forward_in() -> None:
    place, programs = stage_programs("1f1b", 2, 4)
    rel = send_releases(programs, place.rank_of)
    named = {r: {str(programs[r][k]): [str(programs[r][j]) for j in js] for k, js in rel[r].items()} for r in (0, 1)}
    assert named[0] == {f"0RECV_B{i}": [f"0SEND_F{i}"] for i in range(4)}
    # rank 0 runs F2 after it took B0's gradient, so 1RECV_F2 proves 1SEND_B0 over; the last two wait for the end
    assert named[1] == {"1RECV_F2": ["1SEND_B0"], "1RECV_F3": ["1SEND_B1"]}
    until = held_until(programs[1], rel[1])
    assert sorted(str(programs[1][k]) for k, end in until.items() if end == len(programs[1])) == ["1SEND_B2",
                                                                                                   "1SEND_B3"]
    assert sent_peak_bytes(programs[0], rel[0], lambda a: 10) == 20
    assert sent_peak_bytes(programs[0], {}, lambda a: 10) == 40  # without releases: every micro-batch's


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("p", [2, 3, 4])
def test_every_release_follows_the_peers_receive_of_what_it_releases(schedule: str, p: int) -> None:
    """The rule checked from the other side: a send released at receive ``R`` was taken by its
    peer before the peer sent what ``R`` receives; and every schedule but GPipe (whose forwards
    all run before the first gradient comes back) holds fewer sends at once than it makes."""
    place, programs = stage_programs(schedule, p, 2 * p)
    rel = send_releases(programs, place.rank_of)
    pos = {r: {a: k for k, a in enumerate(acts)} for r, acts in programs.items()}
    released = 0
    for r, by_recv in rel.items():
        for k, sends in by_recv.items():
            recv = programs[r][k]
            assert recv.op in (Op.RECV_F, Op.RECV_B)
            q = place.rank_of[matching_receive(recv).stage]
            for j in sends:
                send = programs[r][j]
                assert j < k and place.rank_of[matching_receive(send).stage] == q
                assert pos[q][matching_receive(send)] < pos[q][matching_receive(recv)]
                released += 1
    assert released > 0
    for r, acts in programs.items():
        sends = sum(a.op in (Op.SEND_F, Op.SEND_B) for a in acts)
        if sends and schedule != "gpipe":
            assert sent_peak_bytes(acts, rel[r], lambda a: 1) < sends


def test_programs_that_do_not_match_are_refused() -> None:
    place, programs = stage_programs("1f1b", 2, 2)
    broken = {0: programs[0], 1: tuple(a for a in programs[1] if a != Action(1, Op.RECV_F, 1))}
    with pytest.raises(ValueError, match=r"rank 0's 0SEND_F1 has no 1RECV_F1 on rank 1"):
        send_releases(broken, place.rank_of)


def test_the_simulator_holds_each_output_to_its_backward_and_each_gradient_sent_to_its_release() -> None:
    """planner.simulate_pipeline [Note: sent tensors], 1F1B over 2 ranks: each of rank 0's outputs
    from its forward's end to its backward's end (the sent tensor is that output, let go of
    before); each gradient rank 1 sends back from its send to the end of the receive that
    releases it, its last two to the end of its step (its last pass)."""
    from memtrain.planner.pipeline import add_p2p, generate, placement
    from memtrain.planner.simulate_pipeline import Link, StageCost, simulate_pipeline

    place, m, out = placement("1f1b", 2), 4, 64
    sched = add_p2p(generate("1f1b", 2, m), place)
    r = simulate_pipeline(sched, place, [StageCost(fwd_s=1.0, bwd_s=2.0, activation_bytes=1000, output_bytes=out)] * 2,
                          Link(gbps=1.0, latency_s=0.25))
    assert set(r.sent_times) == {(op, s, i) for op, s in ((Op.F, 0), (Op.SEND_B, 1)) for i in range(m)}
    for i in range(m):
        assert r.sent_times[(Op.F, 0, i)] == (r.pass_times[(Op.F, 0, i)][1], r.pass_times[(Op.B, 0, i)][1], out)
    rel = send_releases(sched, place.rank_of)[1]
    for k, js in rel.items():
        for j in js:
            a = sched[1][j]
            held, let_go, nbytes = r.sent_times[(a.op, a.stage, a.microbatch)]
            assert held == r.pass_times[(Op.B, 1, a.microbatch)][1] and nbytes == out and let_go > held
    ends = sorted(r.sent_times[(Op.SEND_B, 1, i)][1] for i in range(m))
    last = max(end for (op, s, i), (_, end) in r.pass_times.items() if s == 1)
    assert ends[2] == ends[3] == last > ends[1]
