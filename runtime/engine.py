"""The single-process engine: ``Engine`` runs forward, backward and step of a wrapped model.

    engine = wrap(model, optimizer=dict(name="adamw", lr=3e-4),            # runtime.wrapping
                  memory={"device": "2GiB", "host": "8GiB", "nvme_path": "/scratch/memtrain"})
    for batch in loader:
        loss = engine.train_step(batch)   # or: loss = engine(batch); engine.backward(loss); engine.step()

The engine interprets a memory policy (docs/DESIGN.md rule 3): chunk homes, prefetch depth and
activation policies come from the plan; the engine only wires the chunk store
(``offload.chunks``), the activation manager (``offload.activations``, when present) and the
offloaded optimizer (``offload.optim``) around the model's forward and backward. It lowers each
pass's program (planner.program) and the chunk store's block hooks run it; the program's
``SWAP_OUT``/``SWAP_IN`` actions go to the activation manager.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from memtrain.errors import UserError
from memtrain.offload.chunks import ChunkStore
from memtrain.offload.ledger import Ledger
from memtrain.offload.optim import OffloadedOptimizer
from memtrain.planner.plan import DEFAULT_SWAP_IN_AHEAD, Action, Op, Plan
from memtrain.planner.program import Layout, lower_backward, lower_forward
from memtrain.planner.program_optim import OptimLayout, Staging, add_optim_points, early_updates, final_optim_points
from memtrain.runtime.engine_state import EngineStates

__all__ = ["LossScaler", "TierMemory", "Engine"]

@dataclass(kw_only=True, slots=True)
class LossScaler:
    """Dynamic loss scaling for fp16 (Micikevicius et al. 2018, Sec. 3.2; torch GradScaler's rule)."""

    scale: float = 2.0**16
    """Current scale the loss is multiplied by before backward."""
    growth_factor: float = 2.0
    """Scale multiplier after ``growth_interval`` steps without overflow."""
    backoff_factor: float = 0.5
    """Scale multiplier when a step's gradients hold inf/nan (the step is skipped)."""
    growth_interval: int = 2000
    """Good steps before the scale grows."""
    good_steps: int = 0
    """Steps without overflow since the last change."""

    def __post_init__(self) -> None:
        if not self.scale > 0 or self.growth_factor <= 1 or not 0 < self.backoff_factor < 1 or self.growth_interval < 1:
            raise UserError("loss_scale: needs scale > 0, growth_factor > 1, 0 < backoff_factor < 1, growth_interval >= 1")

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class TierMemory:
    budget_bytes: int | None
    """The tier's budget (None = unlimited)."""
    peak_bytes: int
    """Most bytes the ledger recorded at once."""
    in_use_bytes: int
    """Bytes recorded now."""
    peak_breakdown: dict[str, int]
    """Bytes by owner kind (``chunk``, ``buffer``, ``staging``, ``act``) at the peak."""


def _split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise UserError("batch: a dict batch needs 'input_ids' (and 'labels' to compute a loss)")
        return batch["input_ids"], batch.get("labels")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, torch.Tensor):
        return batch, None
    raise UserError("batch: pass (input_ids, labels), {'input_ids': ..., 'labels': ...} or an input tensor")


class Engine(EngineStates):
    """Runs forward/backward/step of a wrapped model; build it with ``wrap()``."""

    def __init__(
        self, *, model: nn.Module, blocks: list[tuple[str, nn.Module]], store: ChunkStore, optimizer: OffloadedOptimizer,
        activations, loss_fn: Callable, micro_batch_size: int | None, device: torch.device, nvme, scaler: LossScaler | None,
        call: Callable | None = None, plan: Plan | None = None, swap_in_ahead: int = DEFAULT_SWAP_IN_AHEAD,
    ) -> None:
        self.model, self.blocks, self.store, self.optimizer = model, blocks, store, optimizer
        self.plan = plan
        """The planner's ``Plan`` this engine runs; None when it was given only a ``MemoryPolicy``."""
        self.activations, self.loss_fn, self.micro_batch_size, self.device = activations, loss_fn, micro_batch_size, device
        self.nvme, self.scaler = nvme, scaler
        self.call = call
        """How to run the model on input ids (``call(model, ids)``); None = ``model(ids)``."""
        self._microbatch = 0
        self._program_layout: Layout | None = None
        self._swap_in_ahead = swap_in_ahead
        """``MemoryPolicy.swap_in_ahead``: where the program's swap-ins go (planner.program_swaps)."""
        self._early_pending = False
        """A backward with ``last_microbatch=True`` ran and ``step()`` has not yet."""
        # No early updates under fp16 or clipping: both need every gradient first (offload.clip).
        self._optim_layout = OptimLayout(staged_chunks=optimizer.staged_chunks,
                                         early=early_updates(store.dtype, optimizer.max_grad_norm is not None))
        store.add_handlers(optimizer.handlers())  # the program's optimizer points (planner.program_optim)
        if activations is not None:  # the program's swaps (the chunk store's runner: offload.program_runner)
            store.on_backward_block = self._backward_block
            store.add_handlers({Op.SWAP_OUT: self._swap, Op.SWAP_IN: self._swap})
        store.fetch_carried = optimizer.fetch_carried  # offload.optim [Note: fetch from a write-back]
        self._closed = False

    @classmethod
    def deferred(cls, build: Callable[..., "Engine"]) -> "Engine":
        """An engine that plans and builds itself from the shape of the first batch it sees."""
        engine = cls.__new__(cls)
        engine._build, engine.store, engine._closed, engine.plan = build, None, False, None
        return engine

    def _ensure_built(self, inputs: torch.Tensor) -> None:
        if self.store is None:
            real = self._build(seq_len=inputs.shape[-1], global_batch_size=inputs.shape[0])
            pending_lr = getattr(self, "_pending_lr", None)
            vars(self).update(vars(real))
            if pending_lr is not None:
                self.set_lr(pending_lr)

    def prepare(self, batch) -> None:
        """Plan and build now from this batch's shape, without running it (a no-op once built):
        an integration restoring a checkpoint loads it between this and the first forward."""
        self._ensure_built(_split_batch(batch)[0])

    def _require_built(self) -> None:
        if self.store is None:
            raise UserError("engine: nothing to do yet: the plan is made from the first batch's shape; "
                             "run a batch first, or pass seq_len= and global_batch_size= to wrap()")

    # --- custom loops -------------------------------------------------------------------

    def __call__(self, batch) -> torch.Tensor:
        """Forward one micro-batch: the loss for ``(input_ids, labels)``, else the model output."""
        inputs, labels = _split_batch(batch)
        self._ensure_built(inputs)
        return self._forward(inputs, labels)

    def _forward(self, inputs: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self._closed:
            raise UserError("engine: closed; wrap the model again")
        if self._early_pending:  # on a GPU those updates run on a thread, rewriting the weights now
            raise UserError("engine: the last backward had last_microbatch=True, so its optimizer updates are "
                             "under way; call engine.step() before the next forward")
        self.store.microbatch = self._microbatch
        self.store.begin_forward(lower_forward(self._layout(), self._microbatch, self.store.resident_chunks,
                                               grad=torch.is_grad_enabled(), held=self.store.held_for_backward).actions)
        if self.activations is not None:
            self.activations.set_microbatch(self._microbatch)
        self._microbatch += 1
        # The store's hooks turn saved parameters into ParamRefs; inside a block the activation
        # manager's hooks (innermost wins) do that and more; outside every block (a loose final
        # norm, the loss) the store's apply, so a released chunk is fetched again, never read as NaN.
        with self.store.saved_tensors_hooks():
            inputs = inputs.to(self.device)
            out = self.model(inputs) if self.call is None else self.call(self.model, inputs)
            if labels is None:
                return out
            return self.loss_fn(out, labels.to(self.device))

    def backward(self, loss: torch.Tensor, *, last_microbatch: bool = False, _next_forward: bool = False) -> None:
        """Backward through the chunk store; gradients add up until ``step()``.

        ``last_microbatch=True`` says no other backward comes before ``step()``: host- and
        NVMe-home chunks then start their optimizer update as soon as their gradients are complete,
        overlapping the rest of this backward (offload.optim [Note: early optimizer step]); the
        results are the same. Ignored with fp16 loss scaling or gradient clipping (``wrap(...,
        max_grad_norm=)``), which need every gradient first.
        """
        self._require_built()
        if self._early_pending:
            raise UserError("engine.backward: the previous backward had last_microbatch=True, so its "
                             "optimizer updates are under way; call engine.step() before the next backward")
        if self.scaler is not None:
            loss = loss * self.scaler.scale
        early = last_microbatch and self._optim_layout.early
        mb = self.store.microbatch = max(self._microbatch - 1, 0)
        program = lower_backward(self._layout(), mb, self.store.resident_chunks,
                                 next_forward=_next_forward and not early, hand_off=early and not self.store.mixed)
        ahead, writing, carried, updated = self.optimizer.staging
        actions, _ = add_optim_points(self._layout(), self._optim_layout, program.actions, mb,
                                      Staging(ahead, writing, carried, frozenset(updated)), final=early)
        self.store.begin_backward(actions)
        self._early_pending = early
        try:
            loss.backward()
        finally:
            self.store.end_backward()

    def _layout(self) -> Layout:
        """What the program's lowering needs of the chunk store and the blocks' activation
        policies (planner.program)."""
        if self._program_layout is None:
            acts = () if self.activations is None else [self.activations.policies[n] for n, _ in self.blocks]
            self._program_layout = Layout.of_store(self.store, acts, self._swap_in_ahead)
        return self._program_layout

    def _swap(self, a: Action) -> None:
        """``SWAP_OUT``/``SWAP_IN`` of the program: the activation manager moves the block's
        record; recorded in ``store.executed`` when there was one to move."""
        move = self.activations.swap_out if a.op is Op.SWAP_OUT else self.activations.swap_in
        if move(a.block, a.microbatch):
            self.store.executed.append(a)

    def _backward_block(self) -> None:
        """A block's backward starts, its fetches begun: the ``B`` marker claims the block's
        activations, then the swap-ins the program has right after it run (planner.program_swaps
        [Note: the swap rules], rule 3); the store then runs the optimizer's points after them."""
        runner = self.store.runner
        if runner.marker is not None and runner.marker.op is Op.B:
            self.activations.claim(runner.marker.block, runner.marker.microbatch)
            runner.run_following(Op.SWAP_IN)

    def grad_norm(self) -> float:
        """The global 2-norm of this step's gradients (``torch.nn.utils.clip_grad_norm_``'s return
        value, before clipping), once every backward of the step has run; the step clips with
        this value (offload.clip [Note: the norm of the chunks]). Under fp16 the gradients are
        unscaled first."""
        self._require_built()
        return float(self.optimizer.grad_norm(1.0 / self.scaler.scale if self.scaler is not None else 1.0))

    @property
    def last_grad_norm(self) -> float | None:
        """The global gradient norm of the last step, before clipping: computed by every clipped
        step and by ``grad_norm()``; None otherwise."""
        return None if self.store is None else self.optimizer.clip.last_norm

    def step(self) -> bool:
        """Optimizer step over all chunks; False when fp16 overflow skipped it. With
        ``max_grad_norm`` the gradients are first clipped to that global norm, as
        ``torch.nn.utils.clip_grad_norm_`` does (``last_grad_norm`` is the norm before clipping).
        The last NVMe write-backs may still be running when it returns; the next step waits for
        each when it needs its staging, and ``state_dict()`` and ``close()`` for all
        (offload.optim [Note: write-backs across the step end])."""
        self._require_built()
        self._microbatch = 0
        self._early_pending = False
        self.store.release_all()  # nothing stays resident over the optimizer step
        # The program's step end (planner.program_optim [Note: the step's end]), then 0OPTIM.
        points = final_optim_points(self._layout(), self._optim_layout)
        try:
            if self.scaler is not None:
                used = self.scaler.scale  # the scale this step's backward ran with
                found_inf = not self.store.grads.finite()
                self.scaler.update(found_inf)
                if found_inf:
                    self.store.grads.zero()
                    self.optimizer.clip.reset()
                    return False
                self.optimizer.step(points, inv_scale=1.0 / used)  # offload.optim [Note: unscaling in fp32]
                return True
            self.optimizer.step(points)
            return True
        finally:
            self.store.executed.append(Action(0, Op.OPTIM))

    def set_lr(self, lr: float | Sequence[float]) -> None:
        """Learning rate for the following steps (a schedule calls this before each step): one
        number for every parameter group, or one per group (``optimizer.param_groups``, as a
        scheduler sets each of torch's). 0 is allowed: a warmup's first step still advances the
        optimizer states, as torch's does."""
        if isinstance(lr, bool) or not isinstance(lr, (int, float, Sequence)) or isinstance(lr, str):
            raise UserError(f"lr: must be a finite number >= 0 or one per parameter group, got {lr!r}")
        if isinstance(lr, (int, float)) and not 0 <= lr < math.inf:
            raise UserError(f"lr: must be a finite number >= 0, got {lr!r}")
        if self.store is None:  # not built yet: applied when the first batch builds it
            self._pending_lr = lr if isinstance(lr, (int, float)) else tuple(lr)
            return
        self.optimizer.spec = self.optimizer.spec.with_lr(lr)

    # --- the whole step -----------------------------------------------------------------

    def train_step(self, batch) -> float:
        """Forward/backward every micro-batch, then step; returns the mean micro-batch loss.

        Gradients are those of the sum of per-micro-batch mean losses divided by the number of
        micro-batches, exactly plain gradient accumulation.
        """
        inputs, labels = _split_batch(batch)
        if labels is None:
            raise UserError("batch: train_step needs labels: pass (input_ids, labels)")
        self._ensure_built(inputs)
        for ledger in self._ledgers().values():
            ledger.start_window()
        self.store.executed.clear()  # this step's program, as executed (planner.program)
        size = inputs.shape[0]
        mbs = self.micro_batch_size or size
        if size % mbs:
            raise UserError(f"batch: {size} sequences do not split into micro-batches of {mbs}; pass a multiple of {mbs}")
        num = size // mbs
        total = 0.0
        for i, (x, y) in enumerate(zip(inputs.split(mbs), labels.split(mbs))):
            loss = self._forward(x, y)
            total += loss.item()
            self.backward(loss / num if num > 1 else loss, last_microbatch=i == num - 1, _next_forward=i < num - 1)
        self.step()
        return total / num

    def _ledgers(self) -> dict[str, Ledger]:
        ledgers = {"device": self.store.device_ledger, "host": self.store.host_ledger}
        if self.nvme is not None:
            ledgers["nvme"] = self.nvme.ledger
        return ledgers

    def step_peak_bytes(self) -> dict[str, int]:
        """Per tier, the ledger's peak during the last ``train_step`` (the ledger's per-step peak)."""
        self._require_built()
        return {tier: led.window_peak_bytes for tier, led in self._ledgers().items()}

    def memory_report(self) -> dict[str, TierMemory]:
        """Per tier: budget, peak, bytes in use and the owners at the peak (from the ledgers)."""
        self._require_built()
        ledgers = self._ledgers()
        return {
            tier: TierMemory(budget_bytes=led.budget_bytes, peak_bytes=led.peak_bytes, in_use_bytes=led.in_use_bytes,
                             peak_breakdown=led.peak_breakdown())
            for tier, led in ledgers.items()
        }

    def close(self) -> None:
        """Give the parameters back to the model (fp32, CPU), remove hooks and chunk files. An
        error of work still queued (an early update, a gradient add) is raised after all that."""
        if self.store is None or self._closed:
            return
        try:
            self.optimizer.close()  # queued early updates finish before the parameters are read
        finally:
            self._closed = True
            try:
                params = self.store.gather_params()
                if self.activations is not None:
                    self.activations.unwrap()
                self.store.close()
                for name, p in self.model.named_parameters():
                    p.data = params[name]
            finally:
                if self.nvme is not None:
                    self.nvme.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
