"""Runs an ActivationManager by the program without a chunk store, as the engine runs it with one.

The manager only moves records when told (planner.program_swaps [Note: the swap rules]); the
engine hands it the program's ``SWAP_OUT``/``SWAP_IN`` through the chunk store's block hooks.
Tests of the manager alone use this driver instead: the same lowering (``planner.program``,
no chunks) and the same interpreter (``offload.program_runner``), moved along by hooks of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from memtrain.offload.activations import ActivationManager
from memtrain.offload.program_runner import ProgramRunner
from memtrain.planner.plan import Action, ActPolicy, Op
from memtrain.planner.program import Layout, lower_backward, lower_forward


class SwapDriver:
    def __init__(self, mgr: ActivationManager, blocks: Sequence[tuple[str, nn.Module]], *, ahead: int = 1) -> None:
        self.mgr = mgr
        self.layout = Layout(uses=((),) * len(blocks), off=frozenset(), prefetch_depth=1,
                             acts=tuple(ActPolicy(mgr.policies[n]) for n, _ in blocks), swap_in_ahead=ahead)
        self.runner = ProgramRunner({Op.SWAP_OUT: self._swap, Op.SWAP_IN: self._swap})
        self.executed: list[Action] = []
        """The swaps that moved a record, in order."""
        self.pass_: tuple[Op, int] | None = None
        for pos, (_, block) in enumerate(blocks):
            block.register_forward_pre_hook(lambda m, a, pos=pos: self._pre_forward(pos))
            block.register_forward_hook(lambda m, a, out, pos=pos: self._post_forward(pos, out))

    def _swap(self, a: Action) -> None:
        if (self.mgr.swap_out if a.op is Op.SWAP_OUT else self.mgr.swap_in)(a.block, a.microbatch):
            self.executed.append(a)

    def _load(self, op: Op, mb: int) -> None:
        if self.pass_ != (op, mb):
            self.pass_ = (op, mb)
            low = lower_forward if op is Op.F else lower_backward
            self.runner.load(low(self.layout, mb, ()).actions)

    def _pre_forward(self, pos: int) -> None:
        if torch.is_grad_enabled():
            if pos == 0:
                self.pass_ = None
            self._load(Op.F, self.mgr.microbatch)
            self.runner.run_to(Op.F, pos)

    def _post_forward(self, pos: int, out) -> None:
        if not torch.is_grad_enabled():
            return
        self.runner.run_releases()  # the block's SWAP_OUT
        mb = self.mgr.microbatch
        fired = [False]

        def backward_start(_grad, pos=pos, mb=mb) -> None:
            if fired[0]:
                return
            fired[0] = True
            self._load(Op.B, mb)
            self.runner.run_to(Op.B, pos)
            self.mgr.claim(pos, mb)
            self.runner.run_following(Op.SWAP_IN)

        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(backward_start)
