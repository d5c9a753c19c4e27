"""simulate_step's whole step: a long step extrapolated from its first micro-batches, the
timeline and memory lines it draws, the lower bound on its streams, the optimizer states read
ahead and written back across the step's end, and the program it is built from (the event
engine and the per-policy accounting: test_simulate.py)."""

from __future__ import annotations

import time

import pytest
from simulate_toy import DEV, HOST, MB, NVME, make_stats, policy, train  # the toy machine and model

from memtrain.planner import cost
from memtrain.planner.bounds import stream_work_s
from memtrain.planner.plan import ActPolicy, MemoryPolicy, Tier
from memtrain.planner.simulate import NVME_OPTIM_STAGED_CHUNKS, simulate_step
from memtrain.planner.stats import ModelStats


def _mixed_case(num_layers: int = 24) -> tuple[ModelStats, MemoryPolicy]:
    acts = [(50 + 10 * (j % 5)) * MB for j in range(num_layers)]
    stats = make_stats(acts, params=[2 * 10**8] * num_layers)
    homes = [Tier.DEVICE] * 4 + [Tier.HOST] * (num_layers - 12) + [Tier.NVME] * 8
    cycle = [ActPolicy.SWAP_HOST, ActPolicy.RECOMPUTE, ActPolicy.KEEP, ActPolicy.SWAP_NVME]
    return stats, policy(stats, homes, [cycle[j % 4] for j in range(num_layers)], depth=2)


@pytest.mark.parametrize("n", [5, 9])
def test_steady_state_extrapolation_matches_full_simulation(n):
    stats, pol = _mixed_case()
    fast = simulate_step(stats, train(n), DEV, HOST, NVME, pol, max_simulated_microbatches=4)
    full = simulate_step(stats, train(n), DEV, HOST, NVME, pol, max_simulated_microbatches=None)
    assert fast.num_simulated_microbatches == 4 and full.num_simulated_microbatches == n
    assert fast.step_time_s == pytest.approx(full.step_time_s, rel=1e-9)
    assert fast.peak_bytes == full.peak_bytes
    assert fast.timeline[-1].end_s <= fast.step_time_s + 1e-9


def test_the_timeline_marks_the_micro_batches_it_does_not_simulate_where_they_run():
    """Micro-batches 3-7 of 9 are extrapolated, not simulated: one event, kind "elided", stands for
    them on the compute lane, over exactly the time the full simulation runs their blocks in."""
    from memtrain.planner.report import event_kind

    stats, pol = _mixed_case()
    fast = simulate_step(stats, train(9), DEV, HOST, NVME, pol, max_simulated_microbatches=4)
    full = simulate_step(stats, train(9), DEV, HOST, NVME, pol, max_simulated_microbatches=None)
    marks = [e for e in fast.timeline if event_kind(e) == "elided"]
    assert len(marks) == 1 and marks[0].stream == "compute"
    mark = marks[0]
    assert mark.name.startswith("repeated: micro-batches 3-7, each as micro-batch 2")
    blocks = [e for e in full.timeline if e.stream == "compute" and e.name[:1] in "FB" and ":" in e.name
              and 3 <= int(e.name[1:].split(":")[0]) <= 7]
    assert blocks and all(mark.start_s - 1e-9 <= e.start_s and e.end_s <= mark.end_s + 1e-9 for e in blocks)
    assert not [e for e in full.timeline if event_kind(e) == "elided"]


@pytest.mark.parametrize("n", [5, 9])
def test_the_memory_line_draws_the_micro_batches_it_does_not_simulate(n):
    """The extrapolated step's memory line is the full simulation's, point for point: each
    micro-batch not simulated repeats the one before them a period later, so the line moves
    over the whole step instead of standing still where the timeline marks them."""
    stats, pol = _mixed_case()
    fast = simulate_step(stats, train(n), DEV, HOST, NVME, pol, max_simulated_microbatches=4)
    full = simulate_step(stats, train(n), DEV, HOST, NVME, pol, max_simulated_microbatches=None)
    assert fast.num_simulated_microbatches == 4 < n
    mark = next(e for e in fast.timeline if e.name.startswith("repeated:"))
    for tier in ("device", "host", "nvme"):
        ours = [(p.t_s, p.bytes) for p in fast.memory_timeline if p.tier == tier]
        theirs = [(p.t_s, p.bytes) for p in full.memory_timeline if p.tier == tier]
        assert [b for _, b in ours] == [b for _, b in theirs], tier
        assert [t for t, _ in ours] == pytest.approx([t for t, _ in theirs], rel=1e-9, abs=1e-9), tier
    inside = {p.bytes for p in fast.memory_timeline if p.tier == "device" and mark.start_s < p.t_s < mark.end_s}
    assert len(inside) > 2


def test_a_plan_that_keeps_part_of_the_timeline_marks_what_it_left_out():
    from memtrain.planner.plan import TimelineEvent
    from memtrain.planner.report import event_kind
    from memtrain.planner.search import MAX_TIMELINE_EVENTS, _truncate

    n = MAX_TIMELINE_EVENTS + 500
    events = tuple(TimelineEvent(stream="compute", name=f"F{i}:0", start_s=float(i), end_s=i + 1.0) for i in range(n))
    kept = _truncate(events)
    assert len(kept) == MAX_TIMELINE_EVENTS
    gap = [e for e in kept if event_kind(e) == "elided"]
    head = (MAX_TIMELINE_EVENTS - 1) * 3 // 4
    assert len(gap) == 1 and gap[0].name.startswith("omitted: 501 events")
    assert (gap[0].start_s, gap[0].end_s) == (float(head), float(head + 501))  # exactly where they ran
    assert _truncate(events[:100]) == events[:100]
    # a mark of micro-batches not simulated is kept wherever it falls
    mark = TimelineEvent(stream="compute", name="repeated: micro-batches 3-7", start_s=1500.5, end_s=1600.5)
    kept = _truncate(events + (mark,))
    assert mark in kept and len(kept) <= MAX_TIMELINE_EVENTS
    # the stretch left out is marked on both sides of it, never under it: each stretch says one thing
    gaps = sorted((e for e in kept if e.name.startswith("omitted")), key=lambda e: e.start_s)
    assert len(gaps) == 2 and gaps[0].end_s == mark.start_s and gaps[1].start_s == mark.end_s
    drawn = {e.name for e in kept if e.name.startswith("F")}
    counts = [int(g.name.split()[1].replace(",", "")) for g in gaps]
    assert sum(counts) == n - len(drawn)
    assert counts[0] == sum(1 for i in range(n) if f"F{i}:0" not in drawn and i < mark.end_s)


@pytest.mark.parametrize("n", [3, 9])
def test_each_tiers_memory_line_reaches_its_peak_and_never_goes_below_zero(n):
    """SimResult.memory_timeline: per tier, the bytes in use at each change, in time order, with
    the resident chunks; its highest point is the tier's peak (with or without extrapolation)."""
    stats, pol = _mixed_case()
    r = simulate_step(stats, train(n), DEV, HOST, NVME, pol)
    for tier in ("device", "host", "nvme"):
        line = [p for p in r.memory_timeline if p.tier == tier]
        assert len(line) > 10 and line[0].t_s == 0.0
        assert [p.t_s for p in line] == sorted(p.t_s for p in line)
        assert max(p.bytes for p in line) == r.peak_bytes[tier] and min(p.bytes for p in line) >= 0
        assert line[-1].t_s <= r.step_time_s + 1e-9
    assert simulate_step(stats, train(n), DEV, HOST, NVME, pol, timeline=False).memory_timeline == ()


def test_stream_work_is_a_lower_bound_and_tight_for_compute_bound_steps():
    stats, pol = _mixed_case()
    t = train(6)
    work = stream_work_s(stats, t, DEV, HOST, NVME, pol)
    r = simulate_step(stats, t, DEV, HOST, NVME, pol, max_simulated_microbatches=None)
    busy = {s: sum(e.end_s - e.start_s for e in r.timeline if e.stream == s) for s in work}
    busy["disk"] -= _carried_fetch_reads_s(r)  # the bound counts none of them
    assert busy == pytest.approx(work, rel=1e-9)
    assert r.step_time_s >= max(work.values())


def test_a_96_layer_step_simulates_in_tens_of_milliseconds():
    stats, pol = _mixed_case(96)
    simulate_step(stats, train(8), DEV, HOST, NVME, pol)  # warm-up
    start = time.perf_counter()
    simulate_step(stats, train(8), DEV, HOST, NVME, pol)
    assert time.perf_counter() - start < 0.5


def _carried_fetch_reads_s(r) -> float:
    """Disk seconds of the param fetches of chunks whose write-backs the step began with."""
    import re

    carried = {n.split("@c")[1].split(":")[0] for n in (e.name for e in r.timeline)
               if n.startswith("write-states@c") and n.endswith(":carried")}
    return sum(e.end_s - e.start_s for e in r.timeline
               if (f := re.fullmatch(r"read\d+@c(\d+):[FB]", e.name)) and f.group(1) in carried)


@pytest.mark.parametrize("staged", [NVME_OPTIM_STAGED_CHUNKS, 5, 6])
def test_states_read_ahead_in_the_first_backward_and_writes_carried_into_the_next_step(staged):
    # offload.optim [Note: states read ahead]: staged - OPTIM_ROLLING_STAGINGS chunks' states are
    # read during the first micro-batch's backward, those whose gradients complete last first
    # (chunk 0, then 1, ...). [Note: write-backs across the step end]: the step starts with the
    # write-backs of the last min(staged, 4) updates (chunks 0.. in reverse completion order) and
    # ends without waiting for its own.
    import dataclasses

    n_elems = 10**8
    stats = make_stats([1 * MB] * 4, params=[n_elems] * 4)
    pol = dataclasses.replace(policy(stats, [Tier.NVME] * 4, [ActPolicy.KEEP] * 4, depth=2), optim_staged_chunks=staged)
    r = simulate_step(stats, train(2), DEV, HOST, NVME, pol)
    ev = {e.name: e for e in r.timeline}
    ahead = sorted(int(n.split("@c")[1].split(":")[0]) for n in ev if n.endswith(":ahead") and n.startswith("read-states"))
    assert ahead == list(range(cost.optim_read_ahead_slots(staged)))
    for c in ahead:
        assert ev[f"read-states@c{c}:ahead"].start_s < ev["B1:3"].start_s  # before the last backward
        assert f"read-states@c{c}" not in ev  # read once
    carried = sorted(int(n.split("@c")[1].split(":")[0]) for n in ev if n.startswith("write-states") and n.endswith(":carried"))
    assert carried == list(range(min(staged, 4)))
    in_step = sorted(int(n.split("@c")[1]) for n in ev if n.startswith("write-states@c") and not n.endswith(":carried"))
    assert in_step == list(range(min(staged, 4), 4))  # the first updates' write-backs, waited for in the step
    # [Note: fetch from a write-back]: the first forward copies the carried chunks from host; the
    # other chunks are read from disk. [Note: carried write-backs released lazily]: each carried
    # staging goes after its write and the copies out of it, at the latest at the chunk's update.
    for c in range(4):
        assert (f"read0@c{c}:F" in ev) == (c not in carried)
    for c in carried:
        release = ev[f"release@c{c}:carried"]
        assert release.start_s >= max(ev[f"write-states@c{c}:carried"].end_s, ev[f"PREFETCH0@c{c}:F"].end_s)
        assert release.end_s <= ev[f"alloc@c{c}:states"].start_s
    # every state byte still moves once per step: the disk's work is the serial bound's plus the
    # fetch reads of carried chunks made after their release (the bound counts none of them)
    disk = sum(e.end_s - e.start_s for e in r.timeline if e.stream == "disk")
    assert disk == pytest.approx(stream_work_s(stats, train(2), DEV, HOST, NVME, pol)["disk"] + _carried_fetch_reads_s(r))


def test_the_simulator_reads_the_program_by_op_and_refuses_an_op_it_cannot_time():
    from memtrain.planner.plan import Action, Op
    from memtrain.planner.simulate_program import index_program

    prog = [Action.parse(t) for t in (
        "0PREFETCH0@c1 0F0/b0 0SWAP_OUT0/b0 0OFFLOAD0@c1 0SWAP_IN0/b0 0PREFETCH0@c1 0B0/b0 0OPTIM_READ0@c2 "
        "0OPTIM0@c1 0OFFLOAD0@c1 0OPTIM").split()]
    at = index_program(prog)
    assert at.fetch_at[(0, "F", 0)] == [1] and at.release_at[(0, "F", 0)] == [1] and at.swap_out_at == {(0, 0)}
    assert at.swap_in_before[(0, 0)] == [0] and at.fetch_at[(0, "B", 0)] == [1]
    assert [str(a) for a in at.optim_at[(0, 0)]] == ["0OPTIM_READ0@c2", "0OPTIM0@c1"] and at.final_optim == 1
    with pytest.raises(ValueError, match="no cost for 0SNAPSHOT0"):
        index_program(prog[:2] + [Action(0, Op.SNAPSHOT, 0)])


def test_the_step_is_built_in_the_programs_order_not_an_assumed_one(monkeypatch):
    """The same device-resident step, its program reordered as a GPipe stage runs it (both
    micro-batches' forwards, then both backwards): the simulator follows the program, so both
    micro-batches' activations are held at once, where alternating passes hold one."""
    from memtrain.planner import simulate_builder
    from memtrain.planner.plan import Op

    acts = [100 * MB, 200 * MB, 300 * MB]
    stats = make_stats(acts)
    pol = policy(stats, [Tier.DEVICE] * 3, [ActPolicy.KEEP] * 3)
    alternating = simulate_step(stats, train(2), DEV, HOST, None, pol)
    lower = simulate_builder.lower_steady_step

    def gpipe(*args, **kwargs):
        program, carried = lower(*args, **kwargs)
        marks = [a for a in program if a.op in (Op.F, Op.B)]
        assert [(a.op, a.microbatch) for a in marks[::3]] == [(Op.F, 0), (Op.B, 0), (Op.F, 1), (Op.B, 1)]
        rest = [a for a in program if a.op not in (Op.F, Op.B)]
        order = [a for a in marks if a.op is Op.F] + [a for a in marks if a.op is Op.B and a.microbatch == 1] + \
            [a for a in marks if a.op is Op.B and a.microbatch == 0]
        return tuple(order + rest), carried

    monkeypatch.setattr(simulate_builder, "lower_steady_step", gpipe)
    r = simulate_step(stats, train(2), DEV, HOST, None, pol)
    assert alternating.act_peak_bytes == sum(acts)
    assert r.act_peak_bytes == 2 * sum(acts)
    assert r.peak_bytes["device"] == alternating.peak_bytes["device"] + sum(acts)
    assert r.step_time_s == pytest.approx(alternating.step_time_s)  # the same work, one stream
