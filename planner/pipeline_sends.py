"""When a pipeline rank may let go of a tensor it sent: read off the programs of both ends.

A send is asynchronous (comm.p2p): the rank keeps the sent tensor until the transfer is known
to be over. Gloo's send ``Work`` says so only once waited for (its ``is_completed`` stays False
until then), and waiting on a send the receiver has not reached yet would stall the sender; so
the worker waits for a send where the programs prove it is over.

[Note: a send known to be over] Rank ``r`` sends a tensor to rank ``q``, which waits for it at
its receive ``j`` (a posted receive too: ``q`` passes ``j`` only once the data is in). Whatever
``q`` sends after ``j`` in its program, ``q`` sends after it had ``r``'s data; so once ``r`` has
received from ``q`` a tensor that ``q`` sends after ``j``, ``r``'s send is over, and waiting for
it returns at once. ``send_releases`` finds, for each send, the first such receive after it in
``r``'s program; a send with none (the last ones of a step) is waited for at the step's end, as
before. Under 1F1B a forward's output sent on is released at the receive of its gradient
(before that, the stage keeps the output for the backward anyway), and a gradient sent back at
the receive of the forward the previous rank runs after the backward that took it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from memtrain.planner.plan import Action, Op

__all__ = ["send_releases", "matching_receive", "held_until", "sent_peak_bytes"]

_SENDS = (Op.SEND_F, Op.SEND_B)
_RECVS = (Op.RECV_F, Op.RECV_B)


def matching_receive(a: Action) -> Action:
    """The receive that takes what the send ``a`` sends (a ``SEND_F`` of stage ``s`` feeds the
    ``RECV_F`` of ``s + 1``; a ``SEND_B`` the ``RECV_B`` of ``s - 1``), and the reverse."""
    s, i = a.stage, a.microbatch
    match a.op:
        case Op.SEND_F:
            return Action(s + 1, Op.RECV_F, i)
        case Op.SEND_B:
            return Action(s - 1, Op.RECV_B, i)
        case Op.RECV_F:
            return Action(s - 1, Op.SEND_F, i)
        case Op.RECV_B:
            return Action(s + 1, Op.SEND_B, i)
    raise ValueError(f"{a}: not a send or a receive")


def send_releases(programs: Mapping[int, Sequence[Action]],
                  rank_of: Sequence[int]) -> dict[int, dict[int, tuple[int, ...]]]:
    """Per rank, per position of a receive in its program, the positions of its sends known to
    be over once that receive is done ([Note: a send known to be over]); ``rank_of[s]`` is the
    rank holding stage ``s``. A send released nowhere is left to the step's end."""
    where = {r: {a: k for k, a in enumerate(acts) if a.op in _SENDS + _RECVS} for r, acts in programs.items()}
    out: dict[int, dict[int, tuple[int, ...]]] = {}
    for r, acts in programs.items():
        found: dict[int, list[int]] = {}
        for k, a in enumerate(acts):
            if a.op not in _SENDS:
                continue
            recv = matching_receive(a)
            q = rank_of[recv.stage]
            j = where[q].get(recv)
            if j is None:
                raise ValueError(f"rank {r}'s {a} has no {recv} on rank {q}: the programs do not match")
            for k2 in range(k + 1, len(acts)):
                b = acts[k2]
                if b.op in _RECVS and rank_of[matching_receive(b).stage] == q \
                        and where[q].get(matching_receive(b), -1) > j:
                    found.setdefault(k2, []).append(k)
                    break
        out[r] = {k2: tuple(ks) for k2, ks in sorted(found.items())}
    return out


def held_until(program: Sequence[Action], releases: Mapping[int, Sequence[int]]) -> dict[int, int]:
    """Per send's position in ``program``, the position of the action after which its tensor is
    let go of (its release's receive), or ``len(program)``: the step's end."""
    out = {k: len(program) for k, a in enumerate(program) if a.op in _SENDS}
    for k2, ks in releases.items():
        for k in ks:
            out[k] = k2
    return out


def sent_peak_bytes(program: Sequence[Action], releases: Mapping[int, Sequence[int]],
                    nbytes: Callable[[Action], int]) -> int:
    """The most bytes of sent tensors a rank running ``program`` holds at once, a send's
    tensor being ``nbytes(send)``: from the send to the end of the action that releases it."""
    until = held_until(program, releases)
    held = peak = 0
    for k, a in enumerate(program):
        if a.op in _SENDS:
            held += nbytes(a)
            peak = max(peak, held)
        held -= sum(nbytes(program[j]) for j in releases.get(k, ()))
    assert held == sum(nbytes(program[j]) for j, end in until.items() if end == len(program))
    return peak
