"""The gloo link between two processes on loopback, for ``bench/pipeline.py``.

    python bench/link_probe.py [--repeats 20]

Two processes (``torch.multiprocessing``, one thread each) join a gloo group over a TCP store on
127.0.0.1 and run ``memtrain.comm.link_probe`` (what ``memtrain run`` runs on two of its workers
before planning, runtime.pipeline_probe): latency, bandwidth and a late receive's time
(comm.link_probe [Note: rendezvous], [Note: mean, not median]).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp

from memtrain.comm.link_probe import link_figures, probe_rank
from memtrain.planner.simulate_pipeline import Link

__all__ = ["probe", "Probe"]


@dataclass(frozen=True, slots=True)
class Probe:
    link: Link
    """Latency (half the mean round trip), bandwidth and a send's own time."""
    recv_s: float
    """The mean time of a receive posted late after its send ([Note: rendezvous])."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, num_bytes: int, repeats: int, timeout_s: float, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timeout)
    try:
        torch.save(probe_rank(rank, num_bytes=num_bytes, repeats=repeats, timeout_s=timeout_s), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def probe(*, num_bytes: int = 4 << 20, repeats: int = 20, timeout_s: float = 60.0) -> Probe:
    """The loopback gloo link: latency (s) and bandwidth (GB/s, 1e9 bytes) of one transfer, and a
    late receive's time ([Note: rendezvous])."""
    with tempfile.TemporaryDirectory(prefix="memtrain-link-probe-") as tmp:
        out = str(Path(tmp) / "probe.pt")
        mp.start_processes(_worker, args=(_free_port(), num_bytes, repeats, timeout_s, out), nprocs=2,
                           start_method="spawn")
        rank0, rank1 = torch.load(out + ".0"), torch.load(out + ".1")
    latency_s, gbps, recv_s, send_s = link_figures(rank0, rank1, num_bytes)
    return Probe(link=Link(gbps=gbps, latency_s=latency_s, send_s=send_s), recv_s=recv_s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--mib", type=int, default=4, help="size of the bandwidth probe's tensor")
    args = ap.parse_args(argv)
    res = probe(num_bytes=args.mib << 20, repeats=args.repeats)
    print(f"gloo on loopback: latency {res.link.latency_s * 1e6:.0f} µs, bandwidth {res.link.gbps:.2f} GB/s, "
          f"a late receive {res.recv_s * 1e6:.0f} µs, a send {res.link.send_s * 1e6:.0f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
