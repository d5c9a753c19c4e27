"""Receives posted one pass ahead (planner.pipeline ``receive_posts``, the rule the worker runs; comm.p2p [Note: receives
posted early]): every receive of every schedule's program is posted once, before the last pass
ahead of it, so its transfer runs under that pass."""

from __future__ import annotations

import pytest

from memtrain.planner.plan import Op
from memtrain.runtime.pipeline_driver import stage_programs
from memtrain.planner.pipeline import receive_posts

PASSES = (Op.F, Op.B, Op.W)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "v-half", "v-min"])
def test_each_receive_is_posted_once_before_the_pass_ahead_of_it(schedule):
    _, programs = stage_programs(schedule, 2, 4)
    for program in programs.values():
        posts = receive_posts(program)
        posted = [(k, a) for k, acts in posts.items() for a in acts]
        recvs = [a for a in program if a.op in (Op.RECV_F, Op.RECV_B)]
        assert sorted(map(str, (a for _, a in posted))) == sorted(map(str, recvs))
        for k, a in posted:
            j = program.index(a)
            assert k <= j
            passes = [i for i in range(j) if program[i].op in PASSES]
            assert k == (passes[-1] if passes else 0), (schedule, str(a), k)
            assert all(program[i].op not in PASSES for i in range(k + 1, j))


def test_the_first_receive_of_a_rank_without_a_pass_ahead_is_posted_at_the_start():
    _, programs = stage_programs("1f1b", 2, 4)
    posts = receive_posts(programs[1])
    assert [str(a) for a in posts[0]] == ["1RECV_F0"]
    assert [str(a) for a in posts[programs[1].index(next(a for a in programs[1] if str(a) == "1B0"))]] == ["1RECV_F1"]
