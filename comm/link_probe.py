"""A point-to-point probe of the link between two ranks of a gloo world, with memtrain's own
``Channel`` as the pipeline's workers use it (comm [Note: fixed shapes]: the payload alone, once
a tag's header has gone).

Both ranks call ``probe_rank`` at once (two Ray actors: runtime.pipeline_probe; two processes:
bench/link_probe.py); ``link_figures`` turns rank 0's and rank 1's samples into the planner's
figures. Half the mean round trip of a 4-byte tensor is the latency (what a transfer waits for,
the scheduler's delays included); the bandwidth comes from the fastest round trips of a large
tensor and of the small one.

[Note: mean, not median] Where other processes share the cores, round trips are bimodal: about
0.1 ms when both ranks are on a core, a scheduler's time slice (2-4 ms measured) when one has
to be woken. A step pays every transfer's, so what it pays per transfer is their mean, not the
median (which picks one mode, and flips between runs); ``trimmed_mean`` leaves out the extremes
in 10% of the samples at each end. On a quiet machine the two are alike.

[Note: rendezvous] A gloo send completes only once its receiver has posted the receive, and the
data moves after that: a receive posted long after its send still waits for a round of messages
(measured: the sender's flush lasted as long as the receiver kept away). So the probe also
times a *late* receive, one posted well after its send: what every receive costs its rank once
both sides are ready (``planner.simulate_pipeline`` ``Link.recv_s``); and each send's own time,
the call that starts it while the receiver waits (``Link.send_s``).

[Note: the probe's barrier] Each late receive starts from a barrier, so the receiver's delay
counts from when both ranks are there. The two ranks reach it within milliseconds of each other,
so it waits at most ``BARRIER_TIMEOUT_S`` (or the probe's timeout, if shorter), not the world's
timeout: a rank that died or hangs makes the other fail in seconds with a ``CommError`` naming
both ranks, instead of holding the run's start-up for the group's whole timeout.
"""

from __future__ import annotations

import statistics
import time

import torch

import torch.distributed as dist

from memtrain.comm.p2p import Channel, _wait

__all__ = ["probe_rank", "link_figures", "trimmed_mean", "barrier", "LATE_S", "WARMUP_ROUNDS", "BARRIER_TIMEOUT_S"]

LATE_S = 0.01
"""How long the receiver keeps away before posting a late receive."""
WARMUP_ROUNDS = 10
"""Round trips left out at first (a new world's first ones took up to 40x the later ones)."""
BARRIER_TIMEOUT_S = 10.0
"""The longest a rank waits for the other at a barrier ([Note: the probe's barrier])."""


def barrier(rank: int, timeout_s: float, what: str) -> None:
    """Both ranks of the probe's world meet; a ``CommError`` naming this rank, the other and
    ``what`` when the other has not come within ``timeout_s`` ([Note: the probe's barrier])."""
    _wait(dist.barrier(async_op=True), rank, f"{what} (waiting for rank {1 - rank} at a barrier)", timeout_s)


def _round_trips(channel: Channel, rank: int, tensor: torch.Tensor, repeats: int,
                 sends: list[float] | None = None) -> list[float]:
    """Rank 0 sends ``tensor`` to rank 1, which sends it back; this rank's time of each round
    (rank 0: in ``sends``, each send's own time, the call that starts it)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        if rank == 0:
            channel.send(tensor, 1, 0, "probe out")
            if sends is not None:
                sends.append(time.perf_counter() - t0)
            channel.flush()
            channel.recv(1, 1, "probe back")
        else:
            back = channel.recv(0, 0, "probe out")
            channel.send(back, 0, 1, "probe back")
            channel.flush()
        times.append(time.perf_counter() - t0)
    return times


def _late_receives(channel: Channel, rank: int, tensor: torch.Tensor, repeats: int,
                   barrier_timeout_s: float) -> list[float]:
    """Rank 0 sends; rank 1 posts the receive ``LATE_S`` later; rank 1's times of its receives."""
    times = []
    for i in range(repeats):
        barrier(rank, barrier_timeout_s, f"probe late receive {i}")
        if rank == 0:
            t0 = time.perf_counter()
            channel.send(tensor, 1, 2, "probe late")
            times.append(time.perf_counter() - t0)
            channel.flush()
        else:
            time.sleep(LATE_S)
            t0 = time.perf_counter()
            channel.recv(0, 2, "probe late")
            times.append(time.perf_counter() - t0)
    return times


def probe_rank(rank: int, *, num_bytes: int = 4 << 20, repeats: int = 20, timeout_s: float = 60.0) -> dict:
    """This rank's samples (rank 0: ``small`` and ``large`` round trips; rank 1: ``late``
    receives), in a world of two ranks this process has joined; both ranks call it at once."""
    small = torch.zeros(1, dtype=torch.float32)
    large = torch.zeros(max(num_bytes // 4, 1), dtype=torch.float32)
    out: dict[str, list[float]] = {"send": []}
    channel = None
    for name, tensor in (("small", small), ("large", large)):
        # a tag's header goes once: each size its own channel, its first rounds left out
        channel = Channel(rank, timeout_s=timeout_s, fixed_shapes=True)
        _round_trips(channel, rank, tensor, WARMUP_ROUNDS)
        out[name] = _round_trips(channel, rank, tensor, repeats, out["send"] if name == "small" else None)
    assert channel is not None
    late = _late_receives(channel, rank, small, repeats + 1, min(timeout_s, BARRIER_TIMEOUT_S))[1:]  # a new tag: the first has the header
    channel.flush()
    if rank == 0:
        return out | {"late_send": late}
    return {"late": late}


def trimmed_mean(values: list[float], cut: float = 0.1) -> float:
    """The mean of ``values`` without the ``cut`` share at each end ([Note: mean, not median])."""
    ordered = sorted(values)
    k = int(len(ordered) * cut)
    return statistics.fmean(ordered[k:len(ordered) - k] or ordered)


def link_figures(rank0: dict, rank1: dict, num_bytes: int) -> tuple[float, float, float, float]:
    """(latency s, bandwidth GB/s of 1e9 bytes, a late receive's s, a send's own s) from
    ``probe_rank``'s samples."""
    latency_s = trimmed_mean(rank0["small"]) / 2
    # the bandwidth from the fastest rounds, whose difference the scheduler's delays touch least
    # (on a busy machine a median small round can take longer than the fastest large one)
    fastest_small, fastest_large = min(rank0["small"]) / 2, min(rank0["large"]) / 2
    transfer_s = fastest_large - fastest_small if fastest_large > 2 * fastest_small else fastest_large
    send_s = trimmed_mean(rank0["send"]) if rank0.get("send") else 0.0
    return latency_s, num_bytes / transfer_s / 1e9, trimmed_mean(rank1["late"]), send_s
