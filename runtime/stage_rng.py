"""Dropout in a pipeline draws what one process draws (docs/DESIGN.md rule 8).

One process with the same seed and global batch draws its dropout masks from one generator, in
one order: global micro-batch 0's blocks ``0..L+1`` forward, then micro-batch 1's, ... (replica
``d``'s micro-batch ``i`` is global micro-batch ``d * m + i``; the backward, the loss, the
optimizer and the data draw nothing). A pipeline rank runs only its stages' blocks, in its
schedule's order, so ``StageRng`` gives each of its forwards the generator state one process
had there:

- ``trace_draws`` records, once, which random ops each block of the whole model calls (aten ops
  tagged ``nondeterministic_seeded``, with their tensors' shapes, strides and dtypes), from a
  forward of the model under ``FakeTensorMode`` (no memory, no draw from the real generators) at
  the run's micro-batch shape, device and autocast;
- at the start of a step (``begin``) the rank walks one process's order from the generator's
  state, replaying each block's draws (the same ops on empty tensors of those shapes, not the
  block's compute: implementation-independent) and saving the state at the start of each of
  its stages' forward per micro-batch; ``enter`` sets that state before the real forward;
  ``finish`` leaves the generator at the walk's end, so every rank starts the next step from
  the same state as one process, and a checkpoint (runtime.stage_state) captures it for an
  exact resume.

An op tagged random that draws nothing at its arguments (``F.scaled_dot_product_attention``
with ``dropout_p`` 0) is dropped; a model without random ops (dropout 0: ``F.dropout`` with
``p=0`` draws nothing) traces none, and the calls do nothing. The generator is the one the
rank's device draws from (the CPU's, or the device's own, ``torch.cuda``'s on a GPU). After each
forward the generator must be where the walk says (``leave``), else a loud error: a trace that
differs from the device's real forward (another attention kernel, say) cannot go unseen. A
recomputed block (runtime.stage_activations) replays its forward's state through
``torch.utils.checkpoint``, which restores the generator after, so the walk's states hold under
every activation policy; ``B`` and ``W`` draw nothing.

Cost: every rank replays the draws of the whole global batch, not only its stages', so the
walk's share grows with pipeline ranks × replicas (docs/cluster.md gives a measure). Where the
generator is a counter (CUDA's Philox, ``offset_steps``, checked at build) the walk adds each
block's offset step instead of replaying: no kernels, a few microseconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

__all__ = ["Draw", "TensorSpec", "trace_draws", "trace_gpt", "drawing", "replay", "offset_steps", "StageRng",
           "get_state", "set_state"]


@dataclass(frozen=True)
class TensorSpec:
    """A tensor argument of a random op: what an empty stand-in needs."""
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class Draw:
    """One random aten op a block's forward calls, its tensors as ``TensorSpec``."""
    op: Any  # torch._ops.OpOverload
    args: tuple
    kwargs: tuple[tuple[str, Any], ...]


class _Recorder(TorchDispatchMode):
    """Records every op tagged ``nondeterministic_seeded`` that reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[Draw] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags:
            def frozen(a):  # hashable: a tensor as its spec, a list as a tuple
                if isinstance(a, torch.Tensor):
                    return TensorSpec(tuple(a.shape), tuple(a.stride()), a.dtype, a.device)
                return tuple(frozen(x) for x in a) if isinstance(a, (list, tuple)) else a
            self.draws.append(Draw(func, frozen(args), tuple((k, frozen(v)) for k, v in kwargs.items())))
        return func(*args, **kwargs)


def trace_draws(blocks: Iterable[nn.Module], example: torch.Tensor, *, bf16: bool = False) -> list[tuple[Draw, ...]]:
    """Per block of ``blocks`` (the whole model's, in forward order, modules made under the same
    ``FakeTensorMode`` as ``example``, the first block's input), the random ops its forward
    calls, run in training mode under the pipeline's autocast."""
    out = []
    x = example
    with torch.autocast(example.device.type, dtype=torch.bfloat16, enabled=bf16):
        for block in blocks:
            with _Recorder() as rec:
                x = block(x)
            out.append(tuple(rec.draws))
    return out


def trace_gpt(cfg, batch: int, seq_len: int, device: torch.device, *, bf16: bool = False) -> list[tuple[Draw, ...]]:
    """``trace_draws`` of the built-in GPT ``cfg`` (``models.gpt``) on ``batch`` sequences of
    ``seq_len`` tokens on ``device`` (made and run under ``FakeTensorMode``, so it neither holds
    memory nor moves the real generators), less the ops that draw nothing at their arguments
    (``drawing``). Its only random ops are its dropouts: with ``dropout`` 0, none (not traced)."""
    if cfg.dropout == 0.0:
        return [() for _ in range(cfg.num_layers + 2)]
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memtrain.models.gpt import GPT

    with FakeTensorMode(), torch.device(device):
        model = GPT(cfg).train()
        ids = torch.zeros(batch, seq_len, dtype=torch.long)
        draws = trace_draws(model.blocks, ids, bf16=bf16)
    moves = drawing({d for ds in draws for d in ds}, device)
    return [tuple(d for d in ds if moves[d]) for ds in draws]


def drawing(draws: Iterable[Draw], device: torch.device) -> dict[Draw, bool]:
    """Per op, whether it moves ``device``'s generator (an op tagged random may draw nothing at
    its arguments: ``F.scaled_dot_product_attention`` with ``dropout_p`` 0), by replaying it once;
    the generator is left where it was."""
    start = get_state(device)
    out = {}
    try:
        for d in draws:
            before = get_state(device)
            replay([d])
            out[d] = not torch.equal(before, get_state(device))
    finally:
        set_state(device, start)
    return out


def replay(draws: Iterable[Draw], scratch: dict | None = None) -> None:
    """Call ``draws``' ops on empty tensors of their shapes (on their devices): the generator
    advances as the real forward advanced it. ``scratch`` keeps the stand-ins between calls."""
    scratch = {} if scratch is None else scratch

    def stand_in(a):
        if not isinstance(a, TensorSpec):
            return a
        t = scratch.get(a)
        if t is None:
            t = scratch[a] = torch.empty_strided(a.shape, a.stride, dtype=a.dtype, device=a.device)
        return t
    with torch.no_grad():
        for d in draws:
            args, kwargs = tree_map(stand_in, (d.args, dict(d.kwargs)))
            d.op(*args, **kwargs)


def offset_steps(draws: list[tuple[Draw, ...]], device: torch.device) -> list[int] | None:
    """Per block, how far its draws move ``device``'s generator's offset, where the generator is
    a counter (CUDA's Philox: its state is a seed and an offset) and setting the offset alone
    gives the state the draws leave, the same step from two starting offsets: the walk is then
    arithmetic, no kernels. None for any other generator (the CPU's Mersenne Twister, whose
    ``get_offset`` fails) or at any doubt: the walk replays."""
    if device.type == "cpu" or not any(draws):
        return None
    start = get_state(device)  # initialises the device's generators
    try:
        gen = _generator(device)
        base = gen.get_offset()
        steps = []
        for ds in draws:
            step = None
            for offset in (base, base + (1 << 24)):
                gen.set_offset(offset)
                before = gen.get_state()
                replay(ds)
                after, moved = gen.get_state(), gen.get_offset() - offset
                gen.set_state(before)
                gen.set_offset(offset + moved)
                if not torch.equal(gen.get_state(), after) or step not in (None, moved):
                    return None
                step = moved
            steps.append(step)
        return steps
    except (RuntimeError, AttributeError, IndexError):
        return None
    finally:
        set_state(device, start)


def _generator(device: torch.device) -> torch.Generator:
    """The default generator of ``device`` (not the CPU)."""
    mod = torch.get_device_module(device)
    return mod.default_generators[device.index if device.index is not None else mod.current_device()]


def get_state(device: torch.device) -> torch.Tensor:
    """The state of the generator ``device``'s random ops draw from."""
    if device.type == "cpu":
        return torch.get_rng_state()
    return torch.get_device_module(device).get_rng_state(device)


def set_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.get_device_module(device).set_rng_state(state, device)


class StageRng:
    """One rank's generator states for its stages' forwards (see the module doc). ``draws``: per
    block of the whole model, ``trace_gpt``'s; ``spans``: per stage the rank runs, its blocks'
    indices; ``replica`` of ``dp``, ``num_microbatches`` each; ``steps``: ``offset_steps``'s, to
    walk a counter generator by arithmetic."""

    def __init__(self, draws: list[tuple[Draw, ...]], spans: Mapping[int, range], *, replica: int, dp: int,
                 num_microbatches: int, device: torch.device, steps: list[int] | None = None) -> None:
        self.draws = draws
        self.steps = steps
        self.on = any(draws)
        """Any random op at all: else nothing is walked or set."""
        self.marks: dict[int, list[tuple[str, int]]] = {}
        """Per block index, the (``start`` or ``stop``, stage) of the rank's stages that start or
        end there (a stage of no blocks starts and ends where its next block would)."""
        for s, span in spans.items():
            self.marks.setdefault(span.start, []).append(("start", s))
            self.marks.setdefault(span.stop, []).append(("stop", s))
        self.spans = dict(spans)
        self.replica, self.dp, self.m = replica, dp, num_microbatches
        self.device = device
        self._at: dict[tuple[str, int, int], torch.Tensor] = {}
        self._end: torch.Tensor | None = None
        self._start: torch.Tensor | None = None  # the generator at the walk's start, until ``finish``

    def begin(self) -> None:
        """Walk one process's step from the generator's state now; the generator is left there."""
        if not self.on:
            return
        start = get_state(self.device)
        self._at = {}  # a step that failed half-way left some
        scratch: dict = {}
        gen = None if self.steps is None else _generator(self.device)
        for d in range(self.dp):
            for i in range(self.m):
                for j in range(len(self.draws) + 1):
                    if d == self.replica:
                        for kind, s in self.marks.get(j, ()):
                            self._at[(kind, s, i)] = get_state(self.device)
                    if j < len(self.draws) and self.draws[j]:
                        if self.steps is not None:  # a counter: its offset moves by the block's step
                            gen.set_offset(gen.get_offset() + self.steps[j])
                        else:
                            replay(self.draws[j], scratch)
        self._end = get_state(self.device)
        self._start = start
        set_state(self.device, start)

    def enter(self, stage: int, microbatch: int) -> None:
        """Before ``stage``'s forward of ``microbatch``: the state one process had there."""
        if self.on:
            set_state(self.device, self._at.pop(("start", stage, microbatch)))

    def leave(self, stage: int, microbatch: int) -> None:
        """After it: the forward drew what the trace says (else the masks would silently differ
        from one process's, e.g. if the device ran another attention kernel than traced)."""
        if self.on and not torch.equal(get_state(self.device), self._at.pop(("stop", stage, microbatch))):
            span = self.spans[stage]
            raise RuntimeError(f"stage {stage}'s forward of micro-batch {microbatch} (blocks {span.start}.."
                               f"{span.stop - 1}) drew other random numbers than its trace replays "
                               f"(runtime.stage_rng): its dropout masks would not be one process's")

    def finish(self) -> None:
        """After the step: the state one process has after its step's forwards."""
        if self.on:
            assert not self._at, f"forwards never run: {sorted(self._at)}"
            set_state(self.device, self._end)
            self._end = self._start = None

    def abandon(self) -> None:
        """A step that failed (runtime.stage_failure): between ``begin`` and ``finish``, the
        generator back to the state it had at the step's start; after ``finish`` it stays at the
        step's end (the worker refuses further steps either way); the walk's states dropped."""
        if self._start is not None:
            set_state(self.device, self._start)
        self._at, self._end, self._start = {}, None, None
