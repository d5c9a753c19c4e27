"""Pipeline schedules as programs (planner.pipeline): each generator's order against the
literature, deadlock and memory checks, sends and receives, golden files."""

from __future__ import annotations

from pathlib import Path

import pytest

from memtrain.planner.pipeline import (
    SCHEDULES, activation_limits, add_p2p, bubble_fraction, generate, pass_times, placement, schedule_from_text,
    validate_pipeline,
)
from memtrain.planner.plan import Action, Op
from memtrain.planner.schedule import format_grid

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "pipeline"
SHAPES = [(1, 1), (2, 1), (2, 4), (4, 4), (4, 8), (3, 7), (8, 16)]


def _ops(acts, *ops):
    return [a for a in acts if a.op in ops]


def _held_peak(acts) -> int:
    """The most micro-batch stages whose activations a rank holds at once (F to W, or to B)."""
    split = any(a.op is Op.W for a in acts)
    held = peak = 0
    for a in acts:
        held += 1 if a.op is Op.F else (-1 if a.op is Op.W or (a.op is Op.B and not split) else 0)
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("p,m", SHAPES)
def test_every_schedule_runs_every_pass_once_without_deadlock_within_its_limits(kind, p, m):
    if kind == "interleaved-1f1b" and m % p:
        with pytest.raises(ValueError, match="multiple of"):
            generate(kind, p, m)
        return
    place = placement(kind, p, 2)
    sched = generate(kind, p, m)
    limits = activation_limits(kind, p)
    assert validate_pipeline(sched, place, m, limits=limits) is None
    assert validate_pipeline(add_p2p(sched, place), place, m, limits=limits) is None


@pytest.mark.parametrize("p,m", [(4, 8), (3, 7)])
def test_1f1b_warms_up_p_minus_1_minus_r_forwards_and_holds_p_minus_r(p, m):
    sched = generate("1f1b", p, m)
    for r, acts in sched.items():
        first_b = next(k for k, a in enumerate(acts) if a.op is Op.B)
        assert first_b == min(p - 1 - r, m) + 1  # the warm-up forwards, then one more before the first B
        assert _held_peak(acts) == min(p - r, m)
        # then one forward and one backward in turn
        steady = acts[first_b - 1: first_b - 1 + 2 * (m - (p - 1 - r))]
        assert [a.op for a in steady] == [Op.F, Op.B] * (m - (p - 1 - r))
    # one less than it holds is an overrun, named on its rank and step
    limits = [min(p - r, m) for r in range(p)]
    limits[0] -= 1
    problem = validate_pipeline(sched, placement("1f1b", p), m, limits=limits)
    assert problem is not None and "rank 0" in problem.message and "over its limit" in problem.message
    assert problem.cells == ((0, p - 1),) and ">>0F" in problem.grid


def test_gpipe_holds_every_micro_batch():
    sched = generate("gpipe", 4, 6)
    assert all(_held_peak(acts) == 6 for acts in sched.values())
    assert [str(a) for a in sched[1]][:7] == ["1F0", "1F1", "1F2", "1F3", "1F4", "1F5", "1B0"]


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(4, 8), (2, 4), (8, 8)])
def test_gpipe_and_1f1b_bubble_is_p_minus_1_over_m_plus_p_minus_1(kind, p, m):
    """Equal stage times (F 1, B 2): Narayanan et al. 2021, Sec. 2.2."""
    durations = {Op.F: 1.0, Op.B: 2.0}
    assert bubble_fraction(generate(kind, p, m), placement(kind, p), durations) == pytest.approx((p - 1) / (m + p - 1))


def test_interleaving_shrinks_the_bubble_by_the_stages_per_rank():
    """Narayanan et al. 2021, Sec. 2.2.1: with v stages per rank each 1/v as long, the bubble is
    (p - 1) / (v·m + p - 1)."""
    p, m, v = 4, 8, 2
    sched = generate("interleaved-1f1b", p, m, stages_per_rank=v)
    durations = {Op.F: 1.0 / v, Op.B: 2.0 / v}
    got = bubble_fraction(sched, placement("interleaved-1f1b", p, v), durations)
    assert got == pytest.approx((p - 1) / (v * m + p - 1))
    assert got < bubble_fraction(generate("1f1b", p, m), placement("1f1b", p), {Op.F: 1.0, Op.B: 2.0})
    # Megatron's warm-up: 2(p - r - 1) + (v - 1)p forwards before the first backward
    for r, acts in sched.items():
        assert next(k for k, a in enumerate(acts) if a.op is Op.B) == min(2 * (p - r - 1) + (v - 1) * p + 1, m * v)


@pytest.mark.parametrize("p,m", [(4, 8), (4, 12), (8, 24), (8, 16), (6, 12), (16, 32)])
def test_zb_h1_idles_a_third_of_1f1bs_bubble_within_1f1bs_peak_memory(p, m):
    """Qi et al. 2023: with F = B = W, 1F1B idles (p - 1)(F + B + W) per rank; ZB-H1 splits off
    W, which nothing waits for, so B travels up the pipeline at F's pace and W fills the idle
    time: (p - 1)(F + B - W), a third, with no rank holding more than 1F1B's first rank, p."""
    durations = {Op.F: 1.0, Op.B: 1.0, Op.W: 1.0}
    zb = generate("zb-h1", p, m)
    one = generate("1f1b", p, m)
    step_zb = max(e for _, e in pass_times(zb, placement("zb-h1", p), durations).values())
    step_1f1b = max(e for _, e in pass_times(one, placement("1f1b", p), durations).values())
    work = 3 * m
    assert step_1f1b - work == pytest.approx(3 * (p - 1))
    assert step_zb - work == pytest.approx(p - 1)
    for r in range(p):
        assert _held_peak(zb[r]) <= max(_held_peak(acts) for acts in one.values()) == p
        for a in _ops(zb[r], Op.W):  # a weight gradient after its input gradient, on its rank
            assert zb[r].index(Action(a.stage, Op.B, a.microbatch)) < zb[r].index(a)


def test_zb_h1_stays_within_a_tick_of_the_third_on_every_shape():
    """With m >= p the list scheduler's orders idle (p - 1)(F + B - W) or one tick more, never
    less (no schedule can: the first rank waits p - 1 ticks for its first B) and never later
    (p = 2..16; 44 of these 89 shapes exactly)."""
    durations = {Op.F: 1.0, Op.B: 1.0, Op.W: 1.0}
    for p in range(2, 17):
        for m in sorted({p, p + 1, 2 * p, 2 * p + 3, 3 * p + 1, 4 * p}):
            step = max(e for _, e in pass_times(generate("zb-h1", p, m), placement("zb-h1", p), durations).values())
            assert 0 <= step - 3 * m - (p - 1) <= 1, (p, m)


@pytest.mark.parametrize("kind", ["v-half", "v-min"])
@pytest.mark.parametrize("p", [4, 6, 8])
def test_v_schedules_hold_a_half_or_a_third_of_1f1bs_activations(kind, p):
    """Qi et al. 2024: two stages per rank in a V, each half of a 1F1B stage's layers; 1F1B's
    first rank holds p micro-batches of a whole stage, 2p half-stages. V-Half holds about half of
    that, V-Min about a third (``activation_limits``: one more, to start); V-Half idles less than
    1F1B, V-Min at most half as much again (F = B = W, a half-stage's passes half as long)."""
    m = 2 * p
    sched = generate(kind, p, m)
    place = placement(kind, p)
    assert place.stages_of(0) == (0, 2 * p - 1) and place.stages_of(p - 1) == (p - 1, p)
    limit = activation_limits(kind, p)[0]
    assert limit == (p + 1 if kind == "v-half" else -(-2 * p // 3) + 1)
    assert max(_held_peak(acts) for acts in sched.values()) <= limit
    one = bubble_fraction(generate("1f1b", p, m), placement("1f1b", p), {Op.F: 1.0, Op.B: 1.0, Op.W: 1.0})
    v = bubble_fraction(sched, place, {Op.F: 0.5, Op.B: 0.5, Op.W: 0.5})
    assert v < one if kind == "v-half" else v <= 1.5 * one


def test_p2p_pairs_every_send_with_a_receive_and_a_v_turns_locally():
    p, m = 4, 4
    place = placement("1f1b", p)
    sched = add_p2p(generate("1f1b", p, m), place)
    assert len(_ops(sched[0], Op.SEND_F)) == m and not _ops(sched[0], Op.RECV_F, Op.SEND_B)
    assert len(_ops(sched[3], Op.RECV_F)) == m and not _ops(sched[3], Op.SEND_F, Op.RECV_B)
    assert str(sched[1][0]) == "1RECV_F0" and str(sched[1][2]) == "1SEND_F0"
    v = placement("v-half", p)
    vs = add_p2p(generate("v-half", p, 2 * p), v)
    last = vs[p - 1]
    # stage p-1 hands its output to stage p on the same rank: no send, no receive between them
    assert not [a for a in last if a.op in (Op.SEND_F, Op.RECV_F) and a.stage in (p - 1, p)
                and (a.op is Op.SEND_F) == (a.stage == p - 1)]
    assert _ops(vs[0], Op.RECV_F) and all(a.stage == 2 * p - 1 for a in _ops(vs[0], Op.RECV_F))


def test_a_deadlock_is_reported_with_each_blocked_cell_marked():
    """Rank 0 waits for micro-batch 1's gradient before sending micro-batch 1 forward: each rank
    waits for the other."""
    p, m = 2, 2
    place = placement("1f1b", p)
    bad = generate("1f1b", p, m)
    bad = {0: (Action(0, Op.F, 0), Action(0, Op.B, 0), Action(0, Op.B, 1), Action(0, Op.F, 1)), 1: bad[1]}
    problem = validate_pipeline(add_p2p(bad, place), place, m)
    assert problem is not None and problem.message.startswith("deadlock: rank 0 waits at step")
    assert "0RECV_B1" in problem.message and "1RECV_F1" in problem.message
    assert problem.grid.count(">>") == 2
    with pytest.raises(ValueError, match="deadlocks"):
        pass_times(bad, place, {Op.F: 1.0, Op.B: 1.0})


def test_a_pass_twice_missing_or_on_the_wrong_rank_is_named():
    place = placement("gpipe", 2)
    good = generate("gpipe", 2, 2)
    twice = {0: good[0] + (Action(0, Op.F, 0),), 1: good[1]}
    assert "runs twice" in validate_pipeline(twice, place, 2).message
    missing = {0: good[0][:-1], 1: good[1]}
    assert "0 micro-batch 1: B never runs" in validate_pipeline(missing, place, 2).message.replace("stage ", "")
    wrong = {0: good[0] + (Action(1, Op.F, 0),), 1: good[1]}
    assert "stage 1 is not on rank 0" in validate_pipeline(wrong, place, 2).message


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="schedule: must be one of"):
        generate("pipedream", 2, 2)
    with pytest.raises(ValueError, match="num_microbatches"):
        generate("1f1b", 2, 0)
    with pytest.raises(ValueError, match="num_ranks"):
        generate("gpipe", 0, 2)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_golden_schedules(kind):
    """The schedules for 4 ranks and 8 micro-batches, as their step × rank grids: a change to a
    generator shows here, action by action (regenerate with MEMTRAIN_GOLDEN=1 after checking it)."""
    import os

    sched = generate(kind, 4, 8)
    text = format_grid(sched)
    path = GOLDEN / f"{kind}-p4-m8.txt"
    if os.environ.get("MEMTRAIN_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text()
    assert schedule_from_text(path.read_text()) == sched


@pytest.mark.parametrize("kind", SCHEDULES)
def test_reduce_scatter_points_go_before_each_stages_last_gradient_pass(kind):
    """ZeRO-2's ``sREDUCE_SCATTER<i>`` (add_reduce_scatter_points): one per stage, right before
    the stage's last W (split backward) or B, ``i`` that pass's micro-batch; again, nothing changes."""
    from memtrain.planner.pipeline import add_reduce_scatter_points, add_step_end

    p, m = 2, 4
    place = placement(kind, p, 2)
    program = add_step_end(add_p2p(generate(kind, p, m), place), place)
    got = add_reduce_scatter_points(program, range(place.num_stages))
    assert add_reduce_scatter_points(got, range(place.num_stages)) == got
    for r, acts in got.items():
        assert [a for a in acts if a.op is not Op.REDUCE_SCATTER] == list(program[r])
        for s in place.stages_of(r):
            grad = Op.W if any(a.op is Op.W for a in acts) else Op.B
            last = max(k for k, a in enumerate(acts) if a.stage == s and a.op is grad)
            assert acts[last - 1] == Action(s, Op.REDUCE_SCATTER, acts[last].microbatch)
            assert sum(1 for a in acts if a.op is Op.REDUCE_SCATTER and a.stage == s) == 1
    assert Action.parse("3REDUCE_SCATTER7") == Action(3, Op.REDUCE_SCATTER, 7)
