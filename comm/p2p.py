"""Pipeline point-to-point transfers and gradient sums, each wait bounded by a timeout.

A tensor travels as two messages on its tag: a fixed-size header (dtype, number of dims, shape)
and the payload, so the receiver needs no prior knowledge of what comes. Sends are asynchronous
(a pipeline schedule assumes a send never waits for its receiver); ``Channel.release`` waits
for one where its transfer is known to be over (planner.pipeline_sends) and lets go of its
tensor, ``Channel.flush`` for the rest at the step's end. A transfer or collective that fails
or outlasts the timeout raises ``CommError`` naming this rank, the peer and the action.

[Note: fixed shapes] Under gloo a receive is a rendezvous: each message waits a round of
messages for its receiver, so a transfer's header and payload, received one after the other,
cost two of them (bench/link_probe.py: about 150 us each on loopback here). A pipeline sends the
same shapes on the same tags every step, so a channel made with ``fixed_shapes`` sends the
header only the first time a tag is used between two ranks: both sides keep what it said, and
later transfers on that tag are the payload alone, received straight into a tensor of that shape
(as torch.distributed.pipelining infers shapes once). A send whose tensor differs from what its
tag carried before is refused (``CommError``), never sent in a form the receiver would misread.

[Note: receives posted early] Under gloo a receive is a rendezvous: the sender's data moves
only once the receiver has posted its buffer, and a receive posted when it is needed waits a
round trip with the peer's transport thread (which, on a core the peer's compute keeps busy,
waits its turn). ``post`` starts a receive ahead of its action, where the tag's shape is known
(a fixed-shape channel after its first step), so the transfer runs under the compute before
it, and ``recv`` only waits for it (torch.distributed.pipelining posts its receives a time step
ahead likewise). A posted receive holds its buffer from ``post`` on.

[Note: tags] Gloo matches a receive to a send by (peer, tag), so the two sides may reach their
transfers in different orders. NCCL ignores tags and matches the transfers between two ranks in
the order they are posted; on NCCL the schedule must send and receive in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from memtrain.comm.group import CommError

__all__ = ["Channel", "all_reduce_", "all_gather", "reduce_scatter", "start_reduce_scatter", "PendingReduce", "DTYPES",
           "MAX_DIMS"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8,
          torch.bool)
"""The dtypes a header can name (by index)."""
MAX_DIMS = 8
"""The most dimensions a sent tensor may have."""
_HEADER = 2 + MAX_DIMS


def _wait(work: dist.Work, rank: int, what: str, timeout_s: float) -> None:
    """Wait for ``work``; a timeout or a lost peer becomes a ``CommError`` naming ``what``."""
    try:
        done = work.wait(timedelta(seconds=timeout_s))
    except RuntimeError as e:
        text = str(e)
        if "timeout" in text.lower() or "timed out" in text.lower():
            raise CommError(f"rank {rank}: {what} timed out after {timeout_s:g} s") from e
        raise CommError(f"rank {rank}: {what} failed: {text.splitlines()[0] if text else type(e).__name__}") from e
    if done is False:
        raise CommError(f"rank {rank}: {what} timed out after {timeout_s:g} s")


class Channel:
    """This rank's pipeline transfers: ``send`` and ``recv`` of tensors of any shape and dtype."""

    def __init__(self, rank: int, *, timeout_s: float, device: torch.device | str = "cpu",
                 fixed_shapes: bool = False) -> None:
        self.rank = rank
        self.timeout_s = timeout_s
        self.device = torch.device(device)
        self.fixed_shapes = fixed_shapes
        """[Note: fixed shapes] a tag's header goes once; later transfers on it are payloads only."""
        # (peer, tag) -> its sends under way: each one's messages (header, payload), kept alive
        # until waited for, and its payload's bytes
        self._pending: dict[tuple[int, int], list[tuple[list[tuple[dist.Work, str, torch.Tensor]], int]]] = {}
        self.held_bytes = 0
        """Bytes of the tensors (payloads) of the sends not yet waited for."""
        self.held_peak_bytes = 0
        """The most of them held at once (its reader sets it back to 0 to start a new window)."""
        self._sent: dict[tuple[int, int], tuple[torch.dtype, tuple[int, ...]]] = {}  # (peer, tag) -> what it carries
        self._got: dict[tuple[int, int], tuple[torch.dtype, tuple[int, ...]]] = {}
        self._posted: dict[tuple[int, int], tuple[dist.Work, torch.Tensor]] = {}  # [Note: receives posted early]

    def send(self, tensor: torch.Tensor, peer: int, tag: int, what: str) -> None:
        """Start sending ``tensor`` to rank ``peer`` on ``tag`` (``what`` names the action in errors)."""
        if tensor.dim() > MAX_DIMS:
            raise ValueError(f"{what}: tensors of at most {MAX_DIMS} dims can be sent, got {tensor.dim()}")
        payload = tensor.detach().contiguous()
        kind = (tensor.dtype, tuple(tensor.shape))
        known = self._sent.get((peer, tag)) if self.fixed_shapes else None
        if known is not None and known != kind:
            raise CommError(f"rank {self.rank}: {what} to rank {peer}: a {kind[0]} tensor of shape {list(kind[1])} "
                            f"where this transfer carried {known[0]} of shape {list(known[1])} before; a channel "
                            f"with fixed shapes sends the same shapes on a tag every step")
        messages = [(payload, 2 * tag + 1)]
        if known is None:
            header = torch.zeros(_HEADER, dtype=torch.int64)
            header[0] = DTYPES.index(tensor.dtype)
            header[1] = tensor.dim()
            header[2:2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
            messages.insert(0, (header.to(self.device), 2 * tag))
            if self.fixed_shapes:
                self._sent[(peer, tag)] = kind
        works = []
        for t, t_tag in messages:
            try:
                works.append((dist.isend(t, peer, tag=t_tag), f"{what} to rank {peer}", t))
            except RuntimeError as e:
                raise CommError(f"rank {self.rank}: {what} to rank {peer} failed: {e}") from e
        nbytes = payload.numel() * payload.element_size()
        self._pending.setdefault((peer, tag), []).append((works, nbytes))
        self.held_bytes += nbytes
        self.held_peak_bytes = max(self.held_peak_bytes, self.held_bytes)

    def post(self, peer: int, tag: int, what: str) -> bool:
        """Start the receive from ``peer`` on ``tag`` now, when its shape is known ([Note:
        receives posted early]); its ``recv`` then waits for it. False: not posted."""
        known = self._got.get((peer, tag))
        if known is None or (peer, tag) in self._posted:
            return False
        out = torch.empty(known[1], dtype=known[0], device=self.device)
        try:
            work = dist.irecv(out, peer, tag=2 * tag + 1)
        except RuntimeError as e:
            raise CommError(f"rank {self.rank}: {what} from rank {peer} failed: {e}") from e
        self._posted[(peer, tag)] = (work, out)
        return True

    def recv(self, peer: int, tag: int, what: str) -> torch.Tensor:
        """The tensor rank ``peer`` sends on ``tag``; waits at most the timeout."""
        where = f"{what} from rank {peer}"
        posted = self._posted.pop((peer, tag), None)
        if posted is not None:
            _wait(posted[0], self.rank, where, self.timeout_s)
            return posted[1]
        known = self._got.get((peer, tag))
        if known is None:
            header = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
            _wait(dist.irecv(header, peer, tag=2 * tag), self.rank, where, self.timeout_s)
            head = header.tolist()
            known = (DTYPES[head[0]], tuple(head[2:2 + head[1]]))
            if self.fixed_shapes:
                self._got[(peer, tag)] = known
        out = torch.empty(known[1], dtype=known[0], device=self.device)
        _wait(dist.irecv(out, peer, tag=2 * tag + 1), self.rank, where, self.timeout_s)
        return out

    def release(self, peer: int, tag: int) -> None:
        """Wait for the sends to ``peer`` on ``tag`` and let go of their tensors: called where
        the program proves them over (planner.pipeline_sends [Note: a send known to be over]), so
        the wait returns at once; none under way is a no-op."""
        for works, nbytes in self._pending.pop((peer, tag), ()):
            for work, what, _ in works:
                _wait(work, self.rank, what, self.timeout_s)
            self.held_bytes -= nbytes

    def flush(self) -> None:
        """Wait for every send started so far (their tensors are kept alive until then); a
        receive posted and never taken is an error (the program and the posts disagree)."""
        assert not self._posted, f"rank {self.rank}: receives posted and not taken: {sorted(self._posted)}"
        for peer, tag in list(self._pending):
            self.release(peer, tag)


def all_reduce_(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup, *, rank: int, what: str,
                timeout_s: float) -> None:
    """Sum ``tensors`` in place across ``group``, as one flat buffer (one collective)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if flat.is_cuda and dist.get_backend(group) == "gloo":
        flat = flat.cpu()  # gloo sums host memory; the result is copied back below
    _wait(dist.all_reduce(flat, group=group, async_op=True), rank, what, timeout_s)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_gather(shard: torch.Tensor, group: dist.ProcessGroup, *, rank: int, what: str,
               timeout_s: float) -> torch.Tensor:
    """Every rank's ``shard`` (all the same size), concatenated in group-rank order (one
    collective): a sharded optimizer's updated parameters put back together on each replica."""
    home = shard.device
    if shard.is_cuda and dist.get_backend(group) == "gloo":
        shard = shard.cpu()  # gloo gathers host memory; the result goes back below
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    _wait(dist.all_gather(parts, shard.contiguous(), group=group, async_op=True), rank, what, timeout_s)
    return torch.cat(parts).to(home)


def reduce_scatter(flat: torch.Tensor, group: dist.ProcessGroup, *, rank: int, what: str,
                   timeout_s: float) -> torch.Tensor:
    """This rank's shard of the sum of ``flat`` across ``group`` (one collective): ``flat`` is
    cut into as many equal shards as the group has ranks (its size must divide), and group rank
    ``d`` gets the sum of every rank's shard ``d``."""
    return start_reduce_scatter(flat, group, rank=rank, what=what, timeout_s=timeout_s).wait()


class PendingReduce:
    """A reduce-scatter under way (``start_reduce_scatter``); ``wait`` gives this rank's shard.
    Its input is kept alive until then (the collective reads it in the background)."""

    def __init__(self, work: dist.Work, flat: torch.Tensor, out: torch.Tensor, home: torch.device, *, rank: int,
                 what: str, timeout_s: float) -> None:
        self.work, self.flat, self.out, self.home = work, flat, out, home
        self.rank, self.what, self.timeout_s = rank, what, timeout_s

    @property
    def input_bytes(self) -> int:
        """Bytes of the input still held (0 once waited for)."""
        return 0 if self.flat is None else self.flat.numel() * self.flat.element_size()

    def done(self) -> bool:
        """Whether the collective has finished (no wait)."""
        return self.work.is_completed()

    def wait(self) -> torch.Tensor:
        """This rank's shard of the sum, on the input's device; the input is released."""
        _wait(self.work, self.rank, self.what, self.timeout_s)
        self.flat = None
        return self.out.to(self.home)


def start_reduce_scatter(flat: torch.Tensor, group: dist.ProcessGroup, *, rank: int, what: str,
                         timeout_s: float) -> PendingReduce:
    """``reduce_scatter`` started, not waited for: every rank of ``group`` must start its
    reduce-scatters in the same order; ``PendingReduce.wait`` (with ``timeout_s``) ends one."""
    n = dist.get_world_size(group)
    if flat.numel() % n:
        raise ValueError(f"{what}: {flat.numel()} elements do not cut into {n} equal shards")
    home = flat.device
    if flat.is_cuda and dist.get_backend(group) == "gloo":
        flat = flat.cpu()  # gloo sums host memory; the result goes back in wait
    flat = flat.contiguous()
    out = torch.empty(flat.numel() // n, dtype=flat.dtype, device=flat.device)
    collective = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # the new name, torch 2.13
    work = collective(out, flat, group=group, async_op=True)
    return PendingReduce(work, flat, out, home, rank=rank, what=what, timeout_s=timeout_s)


def start_reduce(flat: torch.Tensor, dst: int, group: dist.ProcessGroup, *, rank: int, what: str,
                 timeout_s: float) -> PendingReduce:
    """The sum of ``flat`` across ``group`` into group rank ``dst``'s copy, started, not waited
    for (every rank of ``group`` starts its reduces in the same order); ``PendingReduce.wait``
    gives the sum on ``dst`` (another rank's result is not meaningful): a ZeRO-2 offloaded
    stage's chunk summed on the replica that updates it (runtime.stage_offload_zero)."""
    home = flat.device
    if flat.is_cuda and dist.get_backend(group) == "gloo":
        flat = flat.cpu()  # gloo sums host memory; the result goes back in wait
    flat = flat.contiguous()
    work = dist.reduce(flat, dist.get_global_rank(group, dst), group=group, async_op=True)
    return PendingReduce(work, flat, flat, home, rank=rank, what=what, timeout_s=timeout_s)
