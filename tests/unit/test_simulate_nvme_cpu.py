"""simulate_builder [Note: the store's CPU on a CPU device]: the NVMe store's CPU time in a simulated step."""

from __future__ import annotations

import dataclasses

import pytest
from simulate_toy import DEV, HOST, MB, NVME, make_stats, policy, train  # the toy machine and model

from memtrain.planner.bounds import stream_work_s
from memtrain.planner.plan import ActPolicy, Tier
from memtrain.planner.simulate import simulate_step


@pytest.mark.parametrize("acts", ["swap_nvme", "nvme_chunks"])
def test_on_a_cpu_device_the_nvme_stores_cpu_time_is_taken_from_the_compute(acts):
    """simulate_builder [Note: the store's CPU on a CPU device]: each NVMe transfer puts its CPU share of
    its disk time on a CPU device's compute stream, where the transfer is issued; a GPU's compute
    is not charged, and the lower bound counts the same seconds."""
    stats = make_stats([40 * MB] * 3, params=[10**7] * 3)
    if acts == "swap_nvme":
        pol = policy(stats, [Tier.DEVICE] * 3, [ActPolicy.SWAP_NVME] * 3)
    else:
        pol = policy(stats, [Tier.NVME] * 3, [ActPolicy.KEEP] * 3, depth=2)
    cpu_dev = dataclasses.replace(DEV, kind="cpu")
    busy = dataclasses.replace(NVME, read_cpu_share=0.25, write_cpu_share=0.5)
    free = simulate_step(stats, train(3), cpu_dev, HOST, NVME, pol, max_simulated_microbatches=None)
    charged = simulate_step(stats, train(3), cpu_dev, HOST, busy, pol, max_simulated_microbatches=None)
    on_gpu = simulate_step(stats, train(3), DEV, HOST, busy, pol, max_simulated_microbatches=None)
    assert not [e for e in free.timeline if e.name.startswith("io-cpu:")]
    assert not [e for e in on_gpu.timeline if e.name.startswith("io-cpu:")]
    ev = {e.name: e for e in charged.timeline}
    disk = [e for e in charged.timeline if e.stream == "disk"]
    assert disk and len([e for e in charged.timeline if e.name.startswith("io-cpu:")]) == len(disk)
    for d in disk:
        io = ev[f"io-cpu:{d.name}"]
        share = 0.5 if d.name.startswith("write") else 0.25
        assert io.stream == "compute"
        assert io.end_s - io.start_s == pytest.approx(share * (d.end_s - d.start_s))
    assert charged.step_time_s > free.step_time_s
    assert charged.peak_bytes == free.peak_bytes
    work = stream_work_s(stats, train(3), cpu_dev, HOST, busy, pol)
    assert sum(e.end_s - e.start_s for e in charged.timeline if e.stream == "compute") == pytest.approx(work["compute"])
