"""A pipeline stage whose blocks all keep their activations: their bytes counted, nothing handled.

Under a whole backward a stage of ``keep`` blocks needs nothing done to what autograd saves; the
rank only measures the bytes (``StepResult.peak_bytes["activations"]``, by the rules of
docs/memory-accounting.md, "Activations": a block's distinct saved storages, views of its own
parameters and buffers left out, from the end of its forward until its backward has run).
``offload.activations.ActivationManager`` measures them with saved-tensor hooks on every forward,
a Python call and a record per saved tensor (about 11 µs each here, a few % of a keep-only
step). ``KeptStage`` counts under hooks only at the stage's first forward of each step and takes
the same bytes for the step's other micro-batches, which have the same shapes, without hooks.
Under a step's shared weight casts (runtime.stage_worker [Note: one weight cast a step]) a saved
cast of a parameter goes to ``casts`` instead, counted once for the step by the rank
(runtime.stage_activations), not per micro-batch: the other micro-batches save the same copy.

[Note: releases at the next event] Autograd frees a kept block's saves while the stage's ``B``
runs, and nothing else takes activation bytes until the rank's next forward, claim or swap
(``RankActivations`` calls ``flush`` first in each of them, and ``peak_bytes`` too). So a
``B``'s bytes are released then: the ledger holds them a little longer than the hooks' (over
the sends and receives between), but at every activation event, and so in the step's peak, it
holds what the per-tensor hooks give.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from memtrain.offload.activations import param_storages
from memtrain.offload.ledger import Ledger
from memtrain.offload.swap import act_owner
from memtrain.planner.stats import cast_of_parameter

__all__ = ["KeptStage"]


class KeptStage:
    """One stage of ``keep`` blocks under a whole backward (see the module doc)."""

    def __init__(self, stage: int, blocks: Sequence[nn.Module], ledger: Ledger,
                 casts: Callable[[torch.Tensor], int] | None = None) -> None:
        self.stage, self.ledger = stage, ledger
        self.casts = casts
        """Where a saved weight cast goes when the step's casts are shared, which gives the bytes
        it newly counts (None: counted as the block's own, per micro-batch)."""
        self.cast_bytes: list[int | None] = [None] * len(blocks)
        """Each block's shared weight casts, counted once for the step (not in ``saved_bytes``)."""
        self.names = [f"{stage}.{j}" for j in range(len(blocks))]
        self.saved_bytes: list[int | None] = [None] * len(blocks)
        """Each block's ``A`` as counted at the stage's first forward of this step (None: not yet)."""
        self.microbatch = 0
        self._held: dict[int, list[str]] = {}  # micro-batch -> owners on the ledger
        self._claimed: list[int] = []  # micro-batches whose backward has started, released at the next event
        self._blocks = list(blocks)
        for j, block in enumerate(blocks):
            if "forward" in block.__dict__:
                raise ValueError(f"block {self.names[j]!r} already has an instance-level forward (wrapped twice?)")
            block.forward = self._make_forward(j, block, block.forward)

    def new_step(self) -> None:
        """The step's first forward of each block counts again; what a failed step left held
        (forwards whose backward never ran) is given back."""
        self.saved_bytes = [None] * len(self._blocks)
        self.cast_bytes = [None] * len(self._blocks)
        self._claimed = list(self._held)
        self.flush()

    def set_microbatch(self, mb: int) -> None:
        self.microbatch = mb

    def claim(self, mb: int) -> None:
        """The stage's backward of ``mb`` starts; its bytes go at the next event ([Note: releases
        at the next event])."""
        self._claimed.append(mb)

    def flush(self) -> None:
        """Release the bytes of the micro-batches whose backward has run."""
        claimed, self._claimed = self._claimed, []
        for mb in claimed:
            for owner in self._held.pop(mb, ()):
                self.ledger.free(owner)

    def close(self) -> None:
        for block in self._blocks:
            block.__dict__.pop("forward", None)
        self._blocks = []

    def _make_forward(self, j: int, block: nn.Module, inner):
        def forward(*args, **kwargs):
            if not torch.is_grad_enabled():
                return inner(*args, **kwargs)
            n = self.saved_bytes[j]
            if n is None:
                with _Count(block, self.casts) as count:
                    out = inner(*args, **kwargs)
                n = self.saved_bytes[j] = count.bytes
                self.cast_bytes[j] = count.cast_bytes
            else:
                out = inner(*args, **kwargs)
            if n:
                owner = act_owner(self.names[j], self.microbatch)
                self.ledger.alloc(owner, n)
                self._held.setdefault(self.microbatch, []).append(owner)
            return out

        forward.__wrapped__ = inner
        return forward


class _Count:
    """Saved-tensor hooks that count a block's distinct saved storages by the rules of
    ``ActivationManager`` for a kept block (offload.activations [Note: what counts as an
    activation]) and hand autograd each tensor back (detached: swap.py [Note: saved outputs are
    detached]); a weight cast goes to ``casts`` where given (the module doc)."""

    def __init__(self, block: nn.Module, casts: Callable[[torch.Tensor], int] | None = None) -> None:
        self.params = param_storages(block)
        self.casts = casts
        self.cast_bytes = 0
        self.seen: set[int] = set()
        self.device: torch.device | None = None
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if type(t) not in (torch.Tensor, nn.Parameter) or t.layout is not torch.strided:
            return t
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.params:
            return t.detach()
        if self.casts is not None and cast_of_parameter(t):
            self.cast_bytes += self.casts(t)
            return t.detach()
        if self.device is None:
            self.device = t.device
        if t.device == self.device and storage.nbytes() and ptr not in self.seen:
            self.seen.add(ptr)
            self.bytes += storage.nbytes()
        return t.detach()

    def __enter__(self) -> _Count:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t
