"""Process groups inside Ray actors: a ``torch.distributed`` world joined through a TCP store.

Rank 0 hosts a ``TCPStore`` on a free port (``host_store``); the driver hands its address to
every rank, and each joins the world with ``join``. The pipeline's world is gloo, also between
GPU workers, whose transfers and sums go through host memory (runtime.stage_worker copies a
tensor to the host to send it and back to its device once received); NCCL is not used yet (no
machine here has the two GPUs its tests need). Every group has an explicit timeout: a
collective or receive that waits longer raises instead of hanging.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

__all__ = ["CommError", "Rendezvous", "host_store", "join", "leave", "subgroups"]


class CommError(RuntimeError):
    """A transfer or collective that timed out or lost its peer; the message names the rank,
    the peer and the action."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Rendezvous:
    """Where and how the ranks of one world meet."""

    host: str
    """Address of rank 0's TCP store."""
    port: int
    """Its port."""
    world_size: int
    """Ranks in the world."""
    backend: str = "gloo"
    """``gloo`` (CPU tensors) or ``nccl`` (CUDA tensors)."""
    timeout_s: float = 60.0
    """The longest any rendezvous, transfer or collective may wait."""

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size: must be >= 1, got {self.world_size}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s: must be > 0, got {self.timeout_s}")
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend: must be 'gloo' or 'nccl', got {self.backend!r}")


def host_store(host: str, world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's store on a free port of ``host`` (``store.port`` says which); keep it alive
    while the world lives."""
    return dist.TCPStore(host, 0, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def join(rank: int, rdv: Rendezvous, store: dist.TCPStore | None = None) -> None:
    """Join the world as ``rank`` (rank 0 passes the store it hosts; the others connect)."""
    timeout = timedelta(seconds=rdv.timeout_s)
    if store is None:
        try:
            store = dist.TCPStore(rdv.host, rdv.port, rdv.world_size, is_master=False, timeout=timeout)
        except RuntimeError as e:
            raise CommError(f"rank {rank}: cannot reach rank 0's store at {rdv.host}:{rdv.port} "
                            f"within {rdv.timeout_s:g} s: {e}") from e
    try:
        dist.init_process_group(rdv.backend, store=store, rank=rank, world_size=rdv.world_size, timeout=timeout)
    except RuntimeError as e:
        raise CommError(f"rank {rank}: joining the {rdv.world_size}-rank world failed "
                        f"(timeout {rdv.timeout_s:g} s): {e}") from e


def subgroups(rank_lists: Sequence[Sequence[int]], timeout_s: float) -> dict[tuple[int, ...], dist.ProcessGroup]:
    """The groups of ``rank_lists`` that this rank belongs to, by their ranks. Every rank must
    call this with the same lists in the same order (creating a group is collective)."""
    mine: dict[tuple[int, ...], dist.ProcessGroup] = {}
    me = dist.get_rank()
    for ranks in rank_lists:
        key = tuple(ranks)
        group = dist.new_group(list(key), timeout=timedelta(seconds=timeout_s))
        if me in key:
            mine[key] = group
    return mine


def leave() -> None:
    """Leave the world (no-op when not in one)."""
    if dist.is_initialized():
        dist.destroy_process_group()
