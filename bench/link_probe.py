"""A gloo point-to-point probe between two processes on loopback, for ``bench/pipeline.py``.

    python bench/link_probe.py [--repeats 20]

Two processes (``torch.multiprocessing``, one thread each) join a gloo group over a TCP store on
127.0.0.1 and pass tensors back and forth with memtrain's own ``comm.Channel`` with fixed shapes, as the
pipeline's workers use it (comm [Note: fixed shapes]: the payload alone, once a tag's header has
gone). Half the median round trip of a 4-byte
tensor is the latency (what a transfer waits for, the scheduler's delays included); the
bandwidth comes from the fastest round trips of a large tensor and of the small one.

[Note: rendezvous] A gloo send completes only once its receiver has posted the receive, and the
data moves after that: a receive posted long after its send still waits for a round of messages
(measured here: the sender's flush lasted as long as the receiver kept away). So the probe also
times a *late* receive, one posted well after its send (``Probe.recv_s``): what every receive
costs its rank once both sides are ready.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp

from memtrain.planner.simulate_pipeline import Link

__all__ = ["probe", "Probe"]

LATE_S = 0.01
"""How long the receiver keeps away before posting a late receive."""


@dataclass(frozen=True, slots=True)
class Probe:
    link: Link
    """Latency (half the median round trip) and bandwidth."""
    recv_s: float
    """The median time of a receive posted ``LATE_S`` after its send ([Note: rendezvous])."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _round_trips(channel, rank: int, tensor: torch.Tensor, repeats: int) -> list[float]:
    """Rank 0 sends ``tensor`` to rank 1, which sends it back; rank 0's times of each round."""
    times = []
    for k in range(repeats):
        t0 = time.perf_counter()
        if rank == 0:
            channel.send(tensor, 1, 0, "probe out")
            channel.flush()
            channel.recv(1, 1, "probe back")
        else:
            back = channel.recv(0, 0, "probe out")
            channel.send(back, 0, 1, "probe back")
            channel.flush()
        times.append(time.perf_counter() - t0)
    return times


def _late_receives(channel, rank: int, tensor: torch.Tensor, repeats: int) -> list[float]:
    """Rank 0 sends; rank 1 posts the receive ``LATE_S`` later; rank 1's times of its receives."""
    import torch.distributed as dist

    times = []
    for k in range(repeats):
        dist.barrier()
        if rank == 0:
            channel.send(tensor, 1, 2, "probe late")
            channel.flush()
        else:
            time.sleep(LATE_S)
            t0 = time.perf_counter()
            channel.recv(0, 2, "probe late")
            times.append(time.perf_counter() - t0)
    return times


def _worker(rank: int, port: int, num_bytes: int, repeats: int, timeout_s: float, out: str) -> None:
    import torch.distributed as dist

    from memtrain.comm import Channel

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timeout)
    try:
        small = torch.zeros(1, dtype=torch.float32)
        large = torch.zeros(num_bytes // 4, dtype=torch.float32)
        # as the pipeline's workers send (comm [Note: fixed shapes]): a tag's header goes once,
        # so each size has its own channel, its first round (the headers) left out of the figures
        tiny, big, late = [], [], []
        for tensor, rounds in ((small, tiny), (large, big)):
            channel = Channel(rank, timeout_s=timeout_s, fixed_shapes=True)
            _round_trips(channel, rank, tensor, 3)
            rounds += _round_trips(channel, rank, tensor, repeats)
        late += _late_receives(channel, rank, small, repeats + 1)[1:]  # a new tag: its first receive has the header
        del channel
        if rank == 0:
            torch.save({"small": tiny, "large": big}, out + ".0")
        else:
            torch.save({"late": late}, out + ".1")
    finally:
        dist.destroy_process_group()


def probe(*, num_bytes: int = 4 << 20, repeats: int = 20, timeout_s: float = 60.0) -> Probe:
    """The loopback gloo link: latency (s) and bandwidth (GB/s, 1e9 bytes) of one transfer, and a
    late receive's time ([Note: rendezvous])."""
    with tempfile.TemporaryDirectory(prefix="memtrain-link-probe-") as tmp:
        out = str(Path(tmp) / "probe.pt")
        mp.start_processes(_worker, args=(_free_port(), num_bytes, repeats, timeout_s, out), nprocs=2,
                           start_method="spawn")
        res = torch.load(out + ".0") | torch.load(out + ".1")
    latency_s = statistics.median(res["small"]) / 2
    # the bandwidth from the fastest rounds, whose difference the scheduler's delays touch least
    # (on a busy machine a median small round can take longer than the fastest large one)
    fastest_small, fastest_large = min(res["small"]) / 2, min(res["large"]) / 2
    transfer_s = fastest_large - fastest_small if fastest_large > 2 * fastest_small else fastest_large
    return Probe(link=Link(gbps=num_bytes / transfer_s / 1e9, latency_s=latency_s),
                 recv_s=statistics.median(res["late"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--mib", type=int, default=4, help="size of the bandwidth probe's tensor")
    args = ap.parse_args(argv)
    res = probe(num_bytes=args.mib << 20, repeats=args.repeats)
    print(f"gloo on loopback: latency {res.link.latency_s * 1e6:.0f} µs, bandwidth {res.link.gbps:.2f} GB/s, "
          f"a late receive {res.recv_s * 1e6:.0f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
