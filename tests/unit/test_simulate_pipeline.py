"""planner.simulate_pipeline: pipeline schedules timed over ranks and links."""

from __future__ import annotations

import pytest

from memtrain.planner.pipeline import SCHEDULES, add_p2p, bubble_fraction, generate, placement, pass_times
from memtrain.planner.plan import Action, Op
from memtrain.planner.simulate_pipeline import Link, StageCost, simulate_pipeline

FREE = Link(gbps=1e9)
A = 1000  # activation bytes per stage and micro-batch


def _stages(kind: str, n: int) -> list[StageCost]:
    """Equal stages: F 1, B 2 (or B 1 and W 1 when split)."""
    if kind in ("zb-h1", "v-half", "v-min"):
        return [StageCost(fwd_s=1.0, bwd_s=1.0, wgrad_s=1.0, activation_bytes=A, output_bytes=10)] * n
    return [StageCost(fwd_s=1.0, bwd_s=2.0, activation_bytes=A, output_bytes=10)] * n


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("p2p", [False, True])
def test_with_free_links_the_step_is_the_schedules_own_timing(kind, p2p):
    """The task graph over ranks agrees with planner.pipeline's pass timing when links cost
    nothing, sends and receives in the lists or not; 1F1B/GPipe give (p - 1)/(m + p - 1)."""
    p, m = 4, 8
    place = placement(kind, p, 2)
    sched = generate(kind, p, m)
    stages = _stages(kind, place.num_stages)
    durations = {Op.F: 1.0, Op.B: stages[0].bwd_s} | ({Op.W: 1.0} if stages[0].wgrad_s else {})
    r = simulate_pipeline(add_p2p(sched, place) if p2p else sched, place, stages, FREE)
    ends = pass_times(sched, place, durations)
    assert r.step_time_s == pytest.approx(max(e for _, e in ends.values()), abs=1e-6)
    assert r.bubble_fraction == pytest.approx(bubble_fraction(sched, place, durations), abs=1e-6)
    if kind in ("gpipe", "1f1b"):
        assert r.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-6)


def test_each_hop_adds_the_links_time_on_the_critical_path():
    """One micro-batch over two ranks: F, a send, F and B on rank 1, a send back, B on rank 0."""
    place = placement("1f1b", 2)
    sched = add_p2p(generate("1f1b", 2, 1), place)
    link = Link(gbps=1.0, latency_s=0.5)
    stages = [StageCost(fwd_s=1.0, bwd_s=2.0, output_bytes=10**9)] * 2
    r = simulate_pipeline(sched, place, stages, link)
    assert r.step_time_s == pytest.approx(1 + (0.5 + 1.0) + 1 + 2 + (0.5 + 1.0) + 2)
    assert r.pass_times[(Op.B, 0, 0)][0] == pytest.approx(1 + 1.5 + 1 + 2 + 1.5)


def test_a_receive_takes_its_ranks_time_once_its_send_is_done():
    """Link.recv_s: each of the two receives (rank 1's F input, rank 0's gradient) holds its
    rank's compute stream after the send, before the pass that needs it; busy time is the passes'."""
    place = placement("1f1b", 2)
    sched = add_p2p(generate("1f1b", 2, 1), place)
    stages = [StageCost(fwd_s=1.0, bwd_s=2.0, output_bytes=10**9)] * 2
    r = simulate_pipeline(sched, place, stages, Link(gbps=1.0, latency_s=0.5, recv_s=0.25))
    assert r.step_time_s == pytest.approx(1 + 1.5 + 0.25 + 1 + 2 + 1.5 + 0.25 + 2)
    assert r.pass_times[(Op.F, 1, 0)][0] == pytest.approx(1 + 1.5 + 0.25)
    assert r.bubble_fraction == pytest.approx(1 - 6 / (2 * r.step_time_s))
    # a link given per pair is the one the receive takes its cost from
    slow = Link(gbps=1.0, latency_s=0.5, recv_s=1.0)
    r2 = simulate_pipeline(sched, place, stages, Link(gbps=1.0, latency_s=0.5, recv_s=0.25), links={(1, 0): slow})
    assert r2.step_time_s == pytest.approx(r.step_time_s + 0.75)


@pytest.mark.parametrize("p", [2, 4, 8])
def test_1f1b_holds_p_minus_r_micro_batches_and_gpipe_all(p):
    m = 2 * p
    one = simulate_pipeline(generate("1f1b", p, m), placement("1f1b", p), _stages("1f1b", p), FREE)
    assert one.peak_bytes == {r: (p - r) * A for r in range(p)}
    gp = simulate_pipeline(generate("gpipe", p, m), placement("gpipe", p), _stages("gpipe", p), FREE)
    assert gp.peak_bytes == {r: m * A for r in range(p)}


@pytest.mark.parametrize("p", [4, 8])
def test_v_half_holds_about_half_of_1f1bs_first_rank(p):
    """Qi et al. 2024: a V's stages are half a 1F1B stage (A/2 each); V-Half's ranks hold about
    half of 1F1B's first rank (p·A), V-Min about a third."""
    m = 2 * p
    one = simulate_pipeline(generate("1f1b", p, m), placement("1f1b", p), _stages("1f1b", p), FREE)
    for kind, share in (("v-half", 1 / 2), ("v-min", 1 / 3)):
        half = [StageCost(fwd_s=0.5, bwd_s=0.5, wgrad_s=0.5, activation_bytes=A // 2, output_bytes=10)] * (2 * p)
        v = simulate_pipeline(generate(kind, p, m), placement(kind, p), half, FREE)
        assert max(v.peak_bytes.values()) <= share * one.peak_bytes[0] + A


def test_a_deadlock_or_a_wrong_stage_count_is_refused():
    place = placement("1f1b", 2)
    bad = {0: (Action(0, Op.F, 0), Action(0, Op.B, 0), Action(0, Op.B, 1), Action(0, Op.F, 1)),
           1: generate("1f1b", 2, 2)[1]}
    with pytest.raises(ValueError, match=r"deadlocks: rank 0 at step 4 \(0RECV_B1\); rank 1 at step 4 \(1RECV_F1\)"):
        simulate_pipeline(add_p2p(bad, place), place, _stages("1f1b", 2), FREE)
    with pytest.raises(ValueError, match="stages: 3 stage costs for 2 stages"):
        simulate_pipeline(generate("1f1b", 2, 2), place, _stages("1f1b", 3), FREE)


@pytest.mark.parametrize("kind", ["1f1b", "zb-h1", "interleaved-1f1b", "v-half"])
def test_zero2_reduce_scatter_overlaps_the_last_backward(kind):
    """[Note: ZeRO-2 overlap] The same stages with ZeRO-1's program (the reduce-scatter at
    ALLREDUCE, after the last pass) and ZeRO-2's (sREDUCE_SCATTER before the last gradient pass):
    ZeRO-2's reduce starts under the stage's last gradient pass when it comes in more than one
    bucket, and its step is never longer; with a backward long enough to hide all but the last
    bucket it is shorter by the rest of the reduce (1f1b: exactly that)."""
    from memtrain.planner.pipeline import add_reduce_scatter_points, add_step_end

    p, m = 2, 4
    place = placement(kind, p, 2)
    program = add_step_end(add_p2p(generate(kind, p, m), place), place)
    zero2 = add_reduce_scatter_points(program, range(place.num_stages))
    split = kind in ("zb-h1", "v-half")
    for reduce_s, buckets in ((1.0, 4), (1.0, 1), (2.0, 8), (20.0, 4)):
        stages = [StageCost(fwd_s=1.0, bwd_s=1.0 if split else 2.0, wgrad_s=1.0 if split else 0.0,
                            activation_bytes=A, output_bytes=10, reduce_s=reduce_s, optim_s=0.5,
                            reduce_buckets=buckets)] * place.num_stages
        one = simulate_pipeline(program, place, stages, FREE)
        two = simulate_pipeline(zero2, place, stages, FREE)
        assert two.step_time_s <= one.step_time_s + 1e-9, (reduce_s, buckets)
        for s in range(place.num_stages):  # ZeRO-1 reduces after its stage's last pass; ZeRO-2 under it
            last = max(end for (_, t, _), (_, end) in one.pass_times.items() if t == s)
            assert one.reduce_times[s][0] >= last - 1e-9
            last2 = max(end for (_, t, _), (_, end) in two.pass_times.items() if t == s)
            if reduce_s == 1.0:  # (a longer one may find the rank's link busy with its other stage's buckets)
                assert (two.reduce_times[s][0] < last2) == (buckets > 1)
        if kind == "1f1b" and buckets == 4 and reduce_s == 1.0:
            # rank 0 ends the step; its last B (2 s) hides 3 of its 4 buckets (0.25 s each)
            assert two.step_time_s == pytest.approx(one.step_time_s - 0.75)
        if kind == "1f1b" and buckets == 1:
            assert two.step_time_s == pytest.approx(one.step_time_s)


@pytest.mark.parametrize(("reduce_s", "bwd_s", "buckets"), [(1.0, 2.0, 4), (3.0, 1.0, 4), (1.0, 1.0, 1), (0.5, 4.0, 8)])
def test_zero2_exposed_s_is_the_simulators_time_after_the_pass(reduce_s, bwd_s, buckets):
    """The planner's closed form (hetero_plan) against the task graph: one rank, one stage."""
    from memtrain.planner.pipeline import add_reduce_scatter_points, add_step_end
    from memtrain.planner.simulate_pipeline import zero2_exposed_s

    place = placement("1f1b", 1)
    program = add_reduce_scatter_points(add_step_end(generate("1f1b", 1, 2), place), [0])
    stage = StageCost(fwd_s=1.0, bwd_s=bwd_s, reduce_s=reduce_s, reduce_buckets=buckets)
    r = simulate_pipeline(program, place, [stage], FREE)
    last_b = r.pass_times[(Op.B, 0, 1)][1]
    assert r.reduce_times[0][1] - last_b == pytest.approx(zero2_exposed_s(reduce_s, bwd_s, buckets))


@pytest.mark.parametrize("stream", ["h2d", "compute"])
def test_a_prefetch_is_issued_after_the_action_before_it_and_the_first_forward_waits(stream):
    """V-Half puts stages 0 and 3 on rank 0: stage 3's ``PREFETCH`` comes after rank 0's ``0F0``
    (and its send), so its fetch starts when that pass ends, not at 0, on the rank's copy stream
    or, on a CPU device, its compute stream; ``3F0`` waits for it (its input came earlier)."""
    from memtrain.planner.pipeline import add_offload_points

    place, m = placement("v-half", 2, 2), 4
    sched = add_offload_points(add_p2p(generate("v-half", 2, m), place), [3])
    assert [str(a) for a in sched[0][:5]] == ["0F0", "0SEND_F0", "3PREFETCH", "3RECV_F0", "3F0"]
    stages = _stages("v-half", 4)
    stages[3] = StageCost(fwd_s=1.0, bwd_s=1.0, wgrad_s=1.0, activation_bytes=A, output_bytes=10, fetch_s=5.0,
                          fetch_stream=stream)
    r = simulate_pipeline(sched, place, stages, FREE)
    assert r.fetch_times == {3: pytest.approx((1.0, 6.0), abs=1e-9)}  # after 0F0 (0 to 1)
    assert r.pass_times[(Op.F, 2, 0)][1] < 6.0  # stage 3's input was in before its fetch ended
    assert r.pass_times[(Op.F, 3, 0)][0] == pytest.approx(6.0, abs=1e-9)
    without = simulate_pipeline(add_p2p(generate("v-half", 2, m), place), place, _stages("v-half", 4), FREE)
    assert without.pass_times[(Op.F, 3, 0)][0] < 6.0 - 1e-9 and not without.fetch_times
