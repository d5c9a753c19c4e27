"""A recomputed block's forward replayed at a point of the program, for a backward walked twice.

[Note: recompute across B and W] A pipeline schedule that splits the backward (zb-h1, v-half,
v-min; runtime.stage_worker [Note: B and W]) walks a micro-batch's graph twice: ``B`` from the
stage's output to its input (the graph retained), later ``W`` from each parameter-owning
module's output to its parameters. Non-reentrant ``torch.utils.checkpoint`` rebuilds a block's
saved tensors per walk (its recomputation is keyed by the autograd graph task), so the block
would run its forward three times and hold nothing the plan counts between the walks. Here,
as in the zero-bubble schedules' own runtimes (Qi et al. 2023), the forward runs once with its
saved tensors dropped (each a placeholder holding its position in the block's saves) and its
inputs, RNG states and autocast state kept; the ``B``'s claim of the block
(``ActivationManager.claim``) runs the forward again from them under grad with the RNG states
restored (dropout masks replayed) and fills the placeholders, in the order the forward saved
them; both walks read the same rebuilt tensors, which go when the graph does (after ``W``). So
the device holds the block's inputs ``I`` from the end of its forward and its activations ``A``
from the start of its ``B`` to the end of its ``W`` (docs/memory-accounting.md), and the
recompute's time is the ``B``'s (planner.stage_cost).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import get_device_states, set_device_states

__all__ = ["Replay"]


def _autocast_state(device_type: str) -> dict[str, Any]:
    return {"enabled": torch.is_autocast_enabled(device_type), "dtype": torch.get_autocast_dtype(device_type),
            "cache_enabled": torch.is_autocast_cache_enabled()}


class Replay:
    """What one forward of a block needs to run again bit for bit: its inputs (detached, with
    their ``requires_grad``, so the replay saves what the forward saved), the CPU and device RNG
    states and the autocast state in force when it ran."""

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self.fn = fn
        self.args = tuple(a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                          for a in args)
        self.kwargs = dict(kwargs)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        self.device_type = next((t.device.type for t in tensors if t.device.type not in ("cpu", "meta")), "cpu")
        self.cpu_rng = torch.get_rng_state()
        self.devices, self.device_rng = get_device_states(*tensors) if self.device_type != "cpu" else ([], [])
        self.autocast = {d: _autocast_state(d) for d in {self.device_type, "cpu"}}

    def inputs(self) -> list[torch.Tensor]:
        return [a for a in self.args if isinstance(a, torch.Tensor)]

    def run(self, pack: Callable[[torch.Tensor], None]) -> None:
        """Run the forward again under the saved states, every tensor it saves handed to ``pack``
        in order; the replay's own graph is dropped (only its saved tensors are used)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=self.devices, device_type=self.device_type))
            torch.set_rng_state(self.cpu_rng)
            if self.devices:
                set_device_states(self.devices, self.device_rng, device_type=self.device_type)
            for d, state in self.autocast.items():
                stack.enter_context(torch.autocast(d, **state))
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, _no_unpack))
            stack.enter_context(torch.enable_grad())
            self.fn(*self.args, **self.kwargs)


def _no_unpack(_: object) -> torch.Tensor:
    raise AssertionError("a replayed forward's own graph is never walked")
