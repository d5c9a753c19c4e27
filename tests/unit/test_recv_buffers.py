"""Received buffers in the pipeline planner's memory (planner.simulate_pipeline [Note: received
buffers]): each receive is posted one pass ahead (planner.pipeline ``receive_posts``, the rule the
worker runs) and its buffer, the boundary tensor (micro-batch × sequence × hidden × dtype
bytes), is held from the post to the start of the pass that takes it."""

from __future__ import annotations

import pytest

from memtrain.config import ModelConfig
from memtrain.planner.pipeline import SCHEDULES, add_p2p, generate, placement, receive_posts
from memtrain.planner.plan import Op
from memtrain.planner.simulate_pipeline import Link, StageCost, simulate_pipeline
from memtrain.runtime.pipeline_driver import stage_programs
from memtrain.runtime.stage_spec import PipelineSpec
from memtrain.runtime.stage_worker import StageWorker


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_planner_posts_where_the_worker_posts(schedule):
    place, programs = stage_programs(schedule, 2, 4)
    spec = PipelineSpec(model=ModelConfig(preset="tiny", overrides={"num_layers": 6}),
                        partition=(8 // place.num_stages,) * place.num_stages, rank_of=place.rank_of, num_ranks=2,
                        dp=1, num_microbatches=4, micro_batch_size=1, seq_len=8, seed=0)
    for rank, program in programs.items():
        assert StageWorker(spec, rank, program)._posts == receive_posts(program)


def test_each_buffer_is_held_from_its_post_to_the_start_of_its_pass():
    """1F1B over 2 ranks: from the program's post positions, each buffer's post is the start of
    the pass it is posted before (0 with no pass ahead of it), its end the start of the pass that
    takes it, its bytes the sending stage's output; the first rank's gradient buffers are held
    beside its two micro-batches' activations, one at a time, and so are the two outputs it sent
    (held to their backwards' ends: [Note: sent tensors]); the second rank holds a gradient it
    sent beside its received buffer."""
    place, m, act, out = placement("1f1b", 2), 4, 1000, 64
    sched = add_p2p(generate("1f1b", 2, m), place)
    stages = [StageCost(fwd_s=1.0, bwd_s=2.0, activation_bytes=act, output_bytes=out)] * 2
    link = Link(gbps=1.0, latency_s=0.25)
    r = simulate_pipeline(sched, place, stages, link)
    want = {}
    for rank, program in sched.items():
        for k, recvs in receive_posts(program).items():
            a = program[k]
            posted = r.pass_times[(a.op, a.stage, a.microbatch)][0] if a.op in (Op.F, Op.B) else 0.0
            for recv in recvs:
                taker = (Op.F if recv.op is Op.RECV_F else Op.B, recv.stage, recv.microbatch)
                want[(recv.op, recv.stage, recv.microbatch)] = (posted, r.pass_times[taker][0], out)
    assert r.recv_times == want and len(want) == 2 * m
    assert r.recv_times[(Op.RECV_F, 1, 0)] == (0.0, 1.0 + link.time_s(out), out)  # at the step's start
    assert r.act_peak_bytes == {0: 2 * act, 1: act}
    assert r.peak_bytes == {0: 2 * act + out + 2 * out, 1: act + out + out}
    # GPU ranks send from host copies (not counted: rank 1's gradients) but hold their outputs on
    # the device, and hold a received copy from its RECV: rank 1's then meets no activation of its own
    gpu = simulate_pipeline(sched, place, stages, link, host_receives={0, 1})
    assert gpu.peak_bytes == {0: 2 * act + out + 2 * out, 1: act}
    assert {k[0] for k in gpu.sent_times} == {Op.F}


def test_a_gpu_rank_holds_the_device_copy_from_its_recv():
    """A GPU worker's channel receives into host memory and copies to the device at the RECV:
    such a rank (``host_receives``) counts each buffer from the RECV's start, not from the post
    one pass earlier; the other rank is unchanged, and so is the step."""
    place, m = placement("1f1b", 2), 4
    sched = add_p2p(generate("1f1b", 2, m), place)
    stages = [StageCost(fwd_s=1.0, bwd_s=2.0, activation_bytes=1000, output_bytes=64)] * 2
    link = Link(gbps=1.0, latency_s=0.25)
    both = simulate_pipeline(sched, place, stages, link)
    gpu = simulate_pipeline(sched, place, stages, link, host_receives={1})
    assert gpu.step_time_s == both.step_time_s
    recv_starts = {}  # where rank 1 reaches each RECV: the end of its last pass before it (a send costs it 0 here)
    for k, a in enumerate(sched[1]):
        if a.op is Op.RECV_F:
            done = [gpu.pass_times[(b.op, b.stage, b.microbatch)][1] for b in sched[1][:k] if b.op in (Op.F, Op.B)]
            recv_starts[(a.op, a.stage, a.microbatch)] = max(done, default=0.0)
    for key, (posted, taken, nbytes) in gpu.recv_times.items():
        if key[1] == 1:  # rank 1's receives (stage 1's inputs)
            assert posted == recv_starts[key] and taken == both.recv_times[key][1] and nbytes == 64
            assert posted >= both.recv_times[key][0]
        else:
            assert (posted, taken, nbytes) == both.recv_times[key]
    assert any(gpu.recv_times[k][0] > both.recv_times[k][0] for k in gpu.recv_times if k[1] == 1)


def test_the_plan_counts_them_in_each_ranks_peak_and_memory_line():
    """The tiny GPT over 2 CPU ranks (1F1B, 4 micro-batches of 2 × 64 tokens, hidden 64, fp32):
    each boundary tensor is 2 · 64 · 64 · 4 bytes. Rank 0 holds a gradient buffer, posted before
    its next forward, and the outputs it sent of its two micro-batches beside their activations;
    rank 1 posts its first receive at the step's start."""
    from memtrain.runtime.config_file import load_config
    from memtrain.runtime.planning import plan_config

    plan = plan_config(load_config("examples/gpt-tiny-pp2.yaml", ["parallel.profile=catalog"]))
    assert plan.pipeline.partition == ((0, 2), (2, 4)) and plan.pipeline.schedule_kind == "1f1b"
    blocks = plan.model.scaled(plan.train.micro_batch_size).blocks
    boundary = 2 * 64 * 64 * 4
    assert blocks[1].output_bytes == boundary
    a0 = blocks[0].activation_bytes + blocks[1].activation_bytes
    dev0, dev1 = plan.prediction.devices
    static0 = dev0.breakdown["device"]["states, buffers, workspace"]
    assert dev0.peak_bytes["device"] == static0 + 2 * a0 + 3 * boundary
    assert dev0.breakdown["device"]["sent and received tensors"] == 3 * boundary
    for dev in (dev0, dev1):
        line = [p for p in dev.memory_timeline if p.tier == "device"]
        assert max(p.bytes for p in line) == dev.peak_bytes["device"]
    line1 = [p for p in dev1.memory_timeline if p.tier == "device"]
    assert line1[0].t_s == 0.0 and line1[0].bytes == dev1.breakdown["device"]["states, buffers, workspace"] + boundary
