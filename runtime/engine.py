"""The single-process engine: ``wrap(model, ...)`` trains a model whose states exceed the device.

    engine = wrap(model, optimizer=dict(name="adamw", lr=3e-4),
                  memory={"device": "2GiB", "host": "8GiB", "nvme": "/scratch/memtrain"})
    for batch in loader:
        loss = engine.train_step(batch)   # or: loss = engine(batch); engine.backward(loss); engine.step()

The engine interprets a memory policy (docs/DESIGN.md rule 3): chunk homes, prefetch depth and
activation policies come from the plan; the engine only wires the chunk store
(``offload.chunks``), the activation manager (``offload.activations``, when present) and the
offloaded optimizer (``offload.optim``) around the model's forward and backward.
"""

from __future__ import annotations

import dataclasses

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memtrain.offload.chunks import ChunkStore, block_param_order, make_chunk_plans, named_blocks
from memtrain.offload.ledger import Ledger
from memtrain.offload.optim import OffloadedOptimizer, OptimizerSpec
from memtrain.planner.plan import ActPolicy, MemoryPolicy, Plan, Tier
from memtrain.planner.simulate import SWAP_IN_BLOCKS_AHEAD
from memtrain.planner.stats import DType, dtype_bytes
from memtrain.planner.units import format_bytes, parse_bytes

__all__ = ["MemoryBudgets", "LossScaler", "TierMemory", "Engine", "wrap", "fallback_memory_policy", "planner_plan"]

_MEMORY_KEYS = ("device", "host", "nvme", "nvme_budget", "safety_margin", "prefetch_depth", "chunk_elems")


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryBudgets:
    """``wrap(memory=...)`` read and checked."""

    device_bytes: int
    """Device-tier budget (the ledger refuses to go past it)."""
    host_bytes: int
    """Host-tier budget."""
    nvme_path: str | None
    """Directory for NVMe-home chunks; None = no NVMe tier."""
    nvme_bytes: int | None
    """NVMe budget; None = unlimited."""
    safety_margin: float
    """Fraction of each budget the planner leaves free for untracked workspace."""
    prefetch_depth: int | None
    """Override of the plan's prefetch depth."""
    chunk_elems: int | None
    """Chunk size for the built-in planner; None = about one block's parameters."""

    @staticmethod
    def parse(memory: Mapping[str, Any] | None, device: torch.device) -> "MemoryBudgets":
        memory = dict(memory or {})
        unknown = sorted(set(memory) - set(_MEMORY_KEYS))
        if unknown:
            raise ValueError(f"memory[{unknown[0]!r}]: unknown key; known keys: {', '.join(_MEMORY_KEYS)}")
        import psutil

        if "device" in memory:
            device_bytes = parse_bytes(memory["device"], field="memory['device']")
        elif device.type == "cuda":
            device_bytes = torch.cuda.get_device_properties(device).total_memory
        else:
            device_bytes = psutil.virtual_memory().available
        host_bytes = parse_bytes(memory.get("host", psutil.virtual_memory().total), field="memory['host']")
        nvme = memory.get("nvme")
        if nvme is not None and not isinstance(nvme, (str, os.PathLike)):
            raise ValueError(f"memory['nvme']: a directory path, got {nvme!r}")
        if nvme is not None and not Path(nvme).parent.is_dir():
            raise ValueError(f"memory['nvme']: the parent of {str(nvme)!r} does not exist; point it at a directory on a local disk")
        nvme_bytes = memory.get("nvme_budget")
        if nvme_bytes is not None:
            if nvme is None:
                raise ValueError("memory['nvme_budget']: set memory['nvme'] (a directory) too, or remove the budget")
            nvme_bytes = parse_bytes(nvme_bytes, field="memory['nvme_budget']")
        margin = memory.get("safety_margin", 0.1)
        if not isinstance(margin, (int, float)) or not 0 <= margin < 1:
            raise ValueError(f"memory['safety_margin']: a fraction in [0, 1), got {margin!r}")
        depth = memory.get("prefetch_depth")
        if depth is not None and (not isinstance(depth, int) or depth < 1):
            raise ValueError(f"memory['prefetch_depth']: a whole number >= 1, got {depth!r}")
        chunk = memory.get("chunk_elems")
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"memory['chunk_elems']: a whole number of elements >= 1, got {chunk!r}")
        if device_bytes <= 0:
            raise ValueError("memory['device']: the device budget must be > 0")
        return MemoryBudgets(device_bytes=device_bytes, host_bytes=host_bytes, nvme_path=None if nvme is None else str(nvme),
                             nvme_bytes=nvme_bytes, safety_margin=float(margin), prefetch_depth=depth, chunk_elems=chunk)


def fallback_memory_policy(
    model: nn.Module, blocks: Sequence[tuple[str, nn.Module]], *, dtype: DType | str, num_state_tensors: int,
    budgets: MemoryBudgets,
) -> MemoryPolicy:
    """A simple memory policy when no planner search is available.

    Chunks of about one block's parameters (or ``chunk_elems``); the device first reserves the
    param and grad buffers of the block needing most (plus one more chunk for prefetch if it
    fits), then takes chunks in execution order while they fit; the rest go to the host, then to
    NVMe. Bytes per docs/memory-accounting.md. Activations are kept (they are not in the ledger
    without the activation manager, and the safety margin is left for them and the workspace).
    """
    grouped = block_param_order(model, blocks)
    params = [p for g in grouped for p in g]
    total = sum(n for _, n in params)
    size = budgets.chunk_elems or max(max(n for _, n in params), -(-total // len(blocks)))
    params = grouped  # packed block-aligned, as the planner packs (planner.cost.pack_params)
    plans = make_chunk_plans(params, size, Tier.HOST)
    where = {name: c.index for c in plans for name in c.param_names}
    names = {id(p): n for n, p in model.named_parameters()}
    uses = [sorted({where[names[id(p)]] for p in b.parameters()}) for _, b in blocks]
    c, o, mixed = dtype_bytes(dtype), 4 * num_state_tensors, DType(dtype) is not DType.FP32
    dev_budget = int(budgets.device_bytes * (1 - budgets.safety_margin))
    host_budget = int(budgets.host_bytes * (1 - budgets.safety_margin))
    on_device = {Tier.DEVICE: lambda n: n * (c + 4 + 4 * mixed + o), Tier.HOST: lambda n: n * (4 + 4 + o) + n * c * mixed}
    if sum(on_device[Tier.DEVICE](p.num_elems) for p in plans) <= dev_budget:
        homes = [Tier.DEVICE] * len(plans)
        return MemoryPolicy(chunk_size_elems=size, chunks=make_chunk_plans(params, size, homes), prefetch_depth=1,
                            activations=(ActPolicy.KEEP,) * len(blocks))
    # Param buffer + grad buffer (N·c each) of every chunk the busiest block uses.
    need = [sum(2 * plans[i].num_elems * c for i in u) for u in uses]
    worst = max(range(len(blocks)), key=lambda b: need[b])
    if need[worst] > dev_budget:
        raise ValueError(
            f"memory['device']: block {blocks[worst][0]!r} needs {format_bytes(need[worst])} of device buffers "
            f"for its chunks, more than the {format_bytes(dev_budget)} the budget leaves after the safety margin; "
            "raise memory['device'] or lower memory['chunk_elems']"
        )
    largest = max(p.num_elems for p in plans) * c
    depth = budgets.prefetch_depth or (2 if need[worst] + largest <= dev_budget else 1)
    reserve = need[worst] + (largest if depth > 1 else 0)
    homes, dev_used, host_used = [], reserve, 0
    for p in plans:
        if dev_used + on_device[Tier.DEVICE](p.num_elems) <= dev_budget:
            homes.append(Tier.DEVICE)
            dev_used += on_device[Tier.DEVICE](p.num_elems)
        elif host_used + on_device[Tier.HOST](p.num_elems) + p.num_elems * 4 <= host_budget:
            homes.append(Tier.HOST)  # keep N·4 free for the largest staging the NVMe chunks need
            host_used += on_device[Tier.HOST](p.num_elems)
        elif budgets.nvme_path is not None:
            homes.append(Tier.NVME)
        else:
            raise ValueError(
                f"memory['host']: the model states do not fit in {format_bytes(host_budget)} of host memory "
                f"(after the safety margin); raise memory['host'] or set memory['nvme'] to a directory"
            )
    return MemoryPolicy(chunk_size_elems=size, chunks=make_chunk_plans(params, size, homes), prefetch_depth=depth,
                        activations=(ActPolicy.KEEP,) * len(blocks))


def planner_plan(
    model: nn.Module, blocks: Sequence[tuple[str, nn.Module]], *, loss_fn: Callable, dtype: DType | str, optimizer: str,
    budgets: MemoryBudgets, device: torch.device, seq_len: int, global_batch_size: int, micro_batch_size: int | None,
    call: Callable | None = None,
) -> Plan:
    """Plan with the planner (``planner.analyze.analyze_built`` + ``planner.search.plan``) on a
    meta-device twin of ``model`` (no weight is copied) and this machine's hardware figures."""
    import copy

    from memtrain.cluster.inventory import local_node_spec
    from memtrain.models.source import BuiltModel
    from memtrain.planner import catalog
    from memtrain.planner.analyze import analyze_built
    from memtrain.planner.search import plan as search_plan

    # deepcopy with every tensor pre-mapped to a meta twin: ties and module structure kept. The
    # memo then maps each module to its twin, so blocks are found by identity whatever their labels.
    memo: dict[int, Any] = {}
    for t in (*model.parameters(), *model.buffers()):
        twin = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(twin, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else twin
    twin_model = copy.deepcopy(model, memo)
    built = BuiltModel(name=type(model).__name__, module=twin_model, blocks=tuple((n, memo[id(b)]) for n, b in blocks),
                       vocab_size=1, loss_fn=loss_fn, call=call, output=lambda out: out)
    stats = analyze_built(built, seq_len=seq_len, micro_batch_size=1, dtype=dtype)
    node = local_node_spec()
    dev_spec = node.devices[0] if device.type == "cuda" else catalog.cpu_device_spec(
        num_cpus=node.host.num_cpus, memory_bytes=budgets.device_bytes)
    nvme = None
    if budgets.nvme_path is not None:
        import shutil

        parent = Path(budgets.nvme_path).parent
        cap = budgets.nvme_bytes if budgets.nvme_bytes is not None else shutil.disk_usage(parent).free
        nvme = catalog.default_nvme_spec(budgets.nvme_path, cap)
    plan = search_plan(
        stats, name=built.name, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size or 0,
        dtype=dtype, optimizer=optimizer, device=dev_spec, host=node.host, nvme=nvme,
        budgets={"device": budgets.device_bytes, "host": budgets.host_bytes, "nvme": 0 if nvme is None else nvme.capacity_bytes},
        safety_margin=budgets.safety_margin, source="auto", param_numels={n: p.numel() for n, p in model.named_parameters()},
    )
    if not plan.fits:
        raise ValueError(f"memory: nothing fits these budgets: {plan.shortfall}")
    return plan


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
            raise ValueError("loss_scale: needs scale > 0, growth_factor > 1, 0 < backoff_factor < 1, growth_interval >= 1")

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
            raise ValueError("batch: a dict batch needs 'input_ids' (and 'labels' to compute a loss)")
        return batch["input_ids"], batch.get("labels")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, torch.Tensor):
        return batch, None
    raise ValueError("batch: pass (input_ids, labels), {'input_ids': ..., 'labels': ...} or an input tensor")


class Engine:
    """Runs forward/backward/step of a wrapped model; build it with ``wrap()``."""

    def __init__(
        self, *, model: nn.Module, blocks: list[tuple[str, nn.Module]], store: ChunkStore, optimizer: OffloadedOptimizer,
        activations, loss_fn: Callable, micro_batch_size: int | None, device: torch.device, nvme, scaler: LossScaler | None,
        call: Callable | None = None, plan: Plan | None = None,
    ) -> None:
        self.model, self.blocks, self.store, self.optimizer = model, blocks, store, optimizer
        self.plan = plan
        """The planner's ``Plan`` this engine runs; None when it was given only a ``MemoryPolicy``."""
        self.activations, self.loss_fn, self.micro_batch_size, self.device = activations, loss_fn, micro_batch_size, device
        self.nvme, self.scaler = nvme, scaler
        self.call = call
        """How to run the model on input ids (``call(model, ids)``); None = ``model(ids)``."""
        self._microbatch = 0
        self._early_pending = False
        """A backward with ``last_microbatch=True`` ran and ``step()`` has not yet."""
        # offload.optim [Note: states read ahead]; not under fp16, whose optimizer runs after the backward
        store.on_backward_block = optimizer.read_ahead if scaler is None else None
        store.fetch_carried = optimizer.fetch_carried  # offload.optim [Note: fetch from a write-back]
        self._closed = False

    @classmethod
    def deferred(cls, build: Callable[..., "Engine"]) -> "Engine":
        """An engine that plans and builds itself from the shape of the first batch it sees."""
        engine = cls.__new__(cls)
        engine._build, engine.store, engine._closed = build, None, False
        return engine

    def _ensure_built(self, inputs: torch.Tensor) -> None:
        if self.store is None:
            real = self._build(seq_len=inputs.shape[-1], global_batch_size=inputs.shape[0])
            pending_lr = getattr(self, "_pending_lr", None)
            vars(self).update(vars(real))
            if pending_lr is not None:
                self.set_lr(pending_lr)

    def _require_built(self) -> None:
        if self.store is None:
            raise ValueError("engine: nothing to do yet: the plan is made from the first batch's shape; "
                             "run a batch first, or pass seq_len= and global_batch_size= to wrap()")

    # --- custom loops -------------------------------------------------------------------

    def __call__(self, batch) -> torch.Tensor:
        """Forward one micro-batch: the loss for ``(input_ids, labels)``, else the model output."""
        inputs, labels = _split_batch(batch)
        self._ensure_built(inputs)
        return self._forward(inputs, labels)

    def _forward(self, inputs: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self._closed:
            raise ValueError("engine: closed; wrap the model again")
        if self._early_pending:  # on a GPU those updates run on a thread, rewriting the weights now
            raise ValueError("engine: the last backward had last_microbatch=True, so its optimizer updates are "
                             "under way; call engine.step() before the next forward")
        self.store.begin_forward()
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
        results are the same. Ignored with fp16 loss scaling, which needs every gradient first.
        """
        self._require_built()
        if self._early_pending:
            raise ValueError("engine.backward: the previous backward had last_microbatch=True, so its "
                             "optimizer updates are under way; call engine.step() before the next backward")
        if self.scaler is not None:
            loss = loss * self.scaler.scale
        early = last_microbatch and self.scaler is None
        self.store.on_grads_final = self.optimizer.step_early if early else None
        self.store.begin_backward(final=early, next_forward=_next_forward)
        self._early_pending = early
        try:
            loss.backward()
        finally:
            self.store.end_backward()

    def step(self) -> bool:
        """Optimizer step over all chunks; False when fp16 overflow skipped it. The last NVMe
        write-backs may still be running when it returns; the next step waits for each when it
        needs its staging, and ``state_dict()`` and ``close()`` for all (offload.optim [Note:
        write-backs across the step end])."""
        self._require_built()
        self._microbatch = 0
        self._early_pending = False
        self.store.release_all()  # nothing stays resident over the optimizer step
        if self.scaler is not None:
            used = self.scaler.scale  # the scale this step's backward ran with
            found_inf = not self.store.grads.finite()
            self.scaler.update(found_inf)
            if found_inf:
                self.store.grads.zero()
                return False
            self.optimizer.step(inv_scale=1.0 / used)  # offload.optim [Note: unscaling in fp32]
            return True
        self.optimizer.step()
        return True

    def set_lr(self, lr: float) -> None:
        """Learning rate for the following steps (a schedule calls this before each step)."""
        if not lr > 0:
            raise ValueError(f"lr: must be > 0, got {lr}")
        if self.store is None:  # not built yet: applied when the first batch builds it
            self._pending_lr = float(lr)
            return
        self.optimizer.spec = dataclasses.replace(self.optimizer.spec, lr=float(lr))

    # --- the whole step -----------------------------------------------------------------

    def train_step(self, batch) -> float:
        """Forward/backward every micro-batch, then step; returns the mean micro-batch loss.

        Gradients are those of the sum of per-micro-batch mean losses divided by the number of
        micro-batches, exactly plain gradient accumulation.
        """
        inputs, labels = _split_batch(batch)
        if labels is None:
            raise ValueError("batch: train_step needs labels: pass (input_ids, labels)")
        self._ensure_built(inputs)
        for ledger in self._ledgers().values():
            ledger.start_window()
        size = inputs.shape[0]
        mbs = self.micro_batch_size or size
        if size % mbs:
            raise ValueError(f"batch: {size} sequences do not split into micro-batches of {mbs}; pass a multiple of {mbs}")
        num = size // mbs
        total = 0.0
        for i, (x, y) in enumerate(zip(inputs.split(mbs), labels.split(mbs))):
            loss = self._forward(x, y)
            total += loss.item()
            self.backward(loss / num if num > 1 else loss, last_microbatch=i == num - 1, _next_forward=i < num - 1)
        self.step()
        return total / num

    # --- state ----------------------------------------------------------------------------

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """``model.state_dict()``'s keys (tied names included) with fp32 CPU values from any tier."""
        self._require_built()
        self.optimizer.flush()  # offload.optim [Note: write-backs across the step end]
        params = self.store.gather_params()
        canon = {id(p): n for n, p in self.model.named_parameters()}
        out = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            out[name] = params[canon[id(p)]]
        for name, b in self.model.named_buffers():
            out[name] = b.detach().to("cpu", copy=True)
        return out

    def state_dict(self) -> dict[str, Any]:
        """``{"model": {name: tensor}, "optimizer": torch-format state}``: loads into a plain
        model (``model.load_state_dict(sd["model"])``) and ``torch.optim.AdamW``/``SGD``."""
        self._require_built()
        sd = {"model": self.model_state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.scaler is not None:
            sd["loss_scale"] = self.scaler.scale
        return sd

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self._require_built()
        self.optimizer.flush()  # offload.optim [Note: write-backs across the step end]
        if "model" not in sd:
            sd = {"model": sd}
        self.store.load_params(sd["model"])
        if "optimizer" in sd:
            self.optimizer.load_state_dict(sd["optimizer"])
        if self.scaler is not None and "loss_scale" in sd:
            self.scaler.scale = float(sd["loss_scale"])

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


def _activation_manager(policies, blocks, store, device_ledger, host_ledger, nvme, depth, use):
    """The activation manager (offload.activations) when present; required for non-keep policies."""
    try:
        from memtrain.offload.activations import ActivationManager
    except ImportError:
        ActivationManager = None
    if use is False or (use is None and ActivationManager is None):
        if any(p is not ActPolicy.KEEP for p in policies.values()):
            raise ValueError("plan.memory.activations: swap/recompute policies need memtrain.offload.activations")
        return None
    if ActivationManager is None:
        raise ValueError("activation manager requested but memtrain.offload.activations is not available")
    manager = ActivationManager(policies=policies, device_ledger=device_ledger, host_ledger=host_ledger, nvme=nvme,
                                param_resolver=store, prefetch_depth=depth)
    manager.wrap_blocks(blocks)
    return manager


def wrap(
    model: nn.Module, *, optimizer: OptimizerSpec | Mapping[str, Any] | str, memory: Mapping[str, Any] | None = None,
    plan: Plan | MemoryPolicy | None = None, blocks=None, loss_fn: Callable | None = None, dtype: str = "fp32",
    micro_batch_size: int | None = None, seed: int | None = None, verbose: bool = True,
    device: str | torch.device | None = None, host_kernel: str | None = None, loss_scale: Mapping[str, Any] | None = None,
    activation_manager: bool | None = None, seq_len: int | None = None, global_batch_size: int | None = None,
    call: Callable | None = None,
) -> Engine:
    """Wrap ``model`` for memory-aware training; see the module doc.

    ``plan`` is a planner ``Plan`` or just its ``MemoryPolicy``; None plans here. ``loss_fn``
    (default: next-token cross entropy) maps ``(output, labels)`` to a scalar. ``loss_scale``
    configures fp16 loss scaling (``LossScaler`` fields). ``activation_manager`` None = use
    ``offload.activations`` when installed. With ``seq_len`` and ``global_batch_size`` (the
    shape of ``train_step``'s batches) and no ``plan``, the planner's search plans the run
    (activation policies and micro-batch size included); without them a simple built-in policy
    (``fallback_memory_policy``) keeps activations and chooses chunk homes only.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = OptimizerSpec.from_value(optimizer)
    budgets = MemoryBudgets.parse(memory, dev)
    if plan is None and seq_len is None and global_batch_size is None:
        # [Note: plan on the first batch] The planner needs the batch shape; without a plan or
        # the shape, plan when the first batch arrives (its sequence length and size).
        kwargs = dict(optimizer=spec, memory=memory, blocks=blocks, loss_fn=loss_fn, dtype=dtype,
                      micro_batch_size=micro_batch_size, seed=seed, verbose=verbose, device=device,
                      host_kernel=host_kernel, loss_scale=loss_scale, activation_manager=activation_manager, call=call)
        return Engine.deferred(lambda seq_len, global_batch_size: wrap(
            model, seq_len=seq_len, global_batch_size=global_batch_size, **kwargs))
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size: must be >= 1, got {micro_batch_size}")
    if isinstance(plan, Plan):
        if plan.train.optimizer != spec.name or str(plan.train.dtype) != str(DType(dtype)):
            raise ValueError(f"plan: made for {plan.train.optimizer}/{plan.train.dtype}, wrap asked for {spec.name}/{dtype}; re-plan")
        micro_batch_size = micro_batch_size or plan.train.micro_batch_size
    if seed is not None:
        torch.manual_seed(seed)
    named = named_blocks(model, blocks)
    if loss_fn is None:
        from memtrain.models.gpt import causal_lm_loss as loss_fn
    if plan is None and seq_len is not None and global_batch_size is not None:
        plan = planner_plan(model, named, loss_fn=loss_fn, dtype=dtype, optimizer=spec.name, budgets=budgets, device=dev,
                            seq_len=seq_len, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                            call=call)
        micro_batch_size = plan.train.micro_batch_size
    if plan is None:
        policy = fallback_memory_policy(model, named, dtype=dtype, num_state_tensors=len(spec.state_names), budgets=budgets)
    else:
        policy = plan.memory if isinstance(plan, Plan) else plan
    if len(policy.activations) not in (0, len(named)):
        raise ValueError(f"plan.memory.activations: {len(policy.activations)} policies for {len(named)} blocks; re-plan for this model")
    nvme = None
    if any(c.home is Tier.NVME for c in policy.chunks) or budgets.nvme_path is not None:
        if budgets.nvme_path is None:
            raise ValueError("memory['nvme']: the plan puts chunks on NVMe; set memory['nvme'] to a directory")
        from memtrain.offload.nvme import NvmeStore

        nvme = NvmeStore(budgets.nvme_path, budget_bytes=budgets.nvme_bytes, compress=policy.compress_nvme).start()
    device_ledger, host_ledger = Ledger("device", budgets.device_bytes), Ledger("host", budgets.host_bytes)
    depth = budgets.prefetch_depth or policy.prefetch_depth
    try:
        store = ChunkStore(model=model, blocks=named, chunks=policy.chunks, dtype=dtype, state_names=spec.state_names,
                           device=dev, device_ledger=device_ledger, host_ledger=host_ledger, nvme=nvme,
                           prefetch_depth=depth).build()
        opt = OffloadedOptimizer(store, spec, staged_chunks=policy.optim_staged_chunks,
                                 **({} if host_kernel is None else {"host_kernel": host_kernel}))
        policies = {name: ActPolicy(p) for (name, _), p in zip(named, policy.activations)}
        # Activation swap-ins run SWAP_IN_BLOCKS_AHEAD blocks ahead, as the simulator models them.
        acts = _activation_manager(policies, named, store, device_ledger, host_ledger, nvme, SWAP_IN_BLOCKS_AHEAD,
                                   activation_manager)
    except BaseException:
        if nvme is not None:
            nvme.close()
        raise
    scaler = LossScaler(**(loss_scale or {})) if DType(dtype) is DType.FP16 else None
    if verbose:
        _print_summary(plan, policy, depth, dtype, spec.state_names)
    return Engine(model=model, blocks=named, store=store, optimizer=opt, activations=acts, loss_fn=loss_fn,
                  micro_batch_size=micro_batch_size, device=dev, nvme=nvme, scaler=scaler, call=call,
                  plan=plan if isinstance(plan, Plan) else None)


def _print_summary(plan, policy: MemoryPolicy, depth: int, dtype: str, state_names) -> None:
    if isinstance(plan, Plan):
        try:
            from memtrain.planner.report import print_summary
        except ImportError:
            pass
        else:
            print_summary(plan)
            return
    counts: dict[str, list[int]] = {}
    for c in policy.chunks:
        counts.setdefault(str(c.home), []).append(c.num_elems)
    parts = [f"{home}: {len(ns)} chunks, {sum(ns):,} params" for home, ns in counts.items()]
    print(f"memtrain: {len(policy.chunks)} chunks ({'; '.join(parts)}), prefetch depth {depth}, {dtype}")
