"""The planner's inputs from a profile: ``apply_profile`` puts what ``memtrain profile`` measured
(``planner.profile_format.Profile``) in place of the catalog's figures, per-block times fitted as
a fixed part plus a part per sample."""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from memtrain.cluster.spec import DeviceSpec, HostSpec, NvmeSpec
from memtrain.planner.profile_format import OVERHEAD_KEYS, BlockTiming, Profile, ProfileError, load_profile
from memtrain.planner.stats import ModelStats

__all__ = ["apply_profile"]


def _fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``t = a + b·mbs``; clamps to a non-negative intercept."""
    if len(points) == 1:
        return 0.0, points[0][1] / points[0][0]
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    a = my - b * mx
    if a < 0:  # force through the origin rather than predict negative time at small batches
        return 0.0, sum(x * y for x, y in points) / sum(x * x for x in xs)
    return a, max(b, 0.0)


def apply_profile(
    profile: Profile | str | Path, stats: ModelStats, device: DeviceSpec, host: HostSpec, nvme: NvmeSpec | None
) -> tuple[ModelStats, DeviceSpec, HostSpec, NvmeSpec | None]:
    """Replace catalog figures with measured ones: per-block times, bandwidths, CPU Adam rate,
    runtime overheads (``ModelStats.overhead_*``; 0 without a profile)."""
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    unknown = sorted(set(prof.overheads) - set(OVERHEAD_KEYS))
    if unknown:
        raise ProfileError(f"profile overheads: unknown key {unknown[0]!r} (known: {', '.join(OVERHEAD_KEYS)}); re-run 'memtrain profile'")
    by_block: dict[str, list[BlockTiming]] = {}
    for t in prof.blocks:
        by_block.setdefault(t.block, []).append(t)
    missing = [b.name for b in stats.blocks if b.name not in by_block]
    if missing:
        raise ProfileError(f"profile has no timings for blocks {missing[:3]}; it was measured for another model")
    blocks = []
    for b in stats.blocks:
        ts = by_block[b.name]
        fa, fb = _fit_line([(t.micro_batch_size, t.fwd_s) for t in ts])
        ba, bb = _fit_line([(t.micro_batch_size, t.bwd_s) for t in ts])
        blocks.append(dataclasses.replace(b, fwd_fixed_s=fa, fwd_per_sample_s=fb, bwd_fixed_s=ba, bwd_per_sample_s=bb))
    bw = prof.bandwidths
    device = dataclasses.replace(
        device,
        h2d_gbps=bw.get("h2d", device.h2d_gbps),
        d2h_gbps=bw.get("d2h", device.d2h_gbps),
        memory_bw_gbps=bw.get("device_memory", device.memory_bw_gbps),
    )
    host = dataclasses.replace(host, cpu_adam_params_per_s=bw.get("cpu_adam_params_per_s", host.cpu_adam_params_per_s))
    if nvme is not None and "nvme_read" in bw:
        nvme = dataclasses.replace(nvme, read_gbps=bw["nvme_read"], write_gbps=bw["nvme_write"],
                                   read_latency_s=bw.get("nvme_read_latency_s", nvme.read_latency_s),
                                   write_latency_s=bw.get("nvme_write_latency_s", nvme.write_latency_s),
                                   read_cpu_share=bw.get("nvme_read_cpu_share", nvme.read_cpu_share),
                                   write_cpu_share=bw.get("nvme_write_cpu_share", nvme.write_cpu_share))
    over = {f"overhead_{k}": float(prof.overheads.get(k, 0.0)) for k in OVERHEAD_KEYS}
    return dataclasses.replace(stats, blocks=tuple(blocks), **over), device, host, nvme
