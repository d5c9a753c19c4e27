"""``wrap(model, ...)``: read the memory contract, plan if asked, build the engine's parts.

    engine = wrap(model, optimizer=dict(name="adamw", lr=3e-4),
                  memory={"device": "2GiB", "host": "8GiB", "nvme_path": "/scratch/memtrain"})

``memory`` takes the keys of a config file's ``memory`` section plus ``nvme_path``
(``MemoryBudgets``, docs/wrap.md). Without a plan, the planner plans on a meta-device twin of
the model (``planner_plan``), now or from the first batch's shape. Then the chunk store,
offloaded optimizer and activation manager are built and handed to ``runtime.engine.Engine``.
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

from memtrain.errors import UserError
from memtrain.offload.chunks import ChunkStore, named_blocks
from memtrain.offload.clip import check_max_norm
from memtrain.offload.ledger import Ledger
from memtrain.offload.optim import OffloadedOptimizer, OptimizerSpec
from memtrain.planner.plan import ActPolicy, MemoryPolicy, Plan, Tier
from memtrain.planner.stats import DType
from memtrain.units import show
from memtrain.config import MemoryConfig, section_from_dict
from memtrain.runtime.engine import Engine, LossScaler
from memtrain.runtime.process_memory import return_large_frees

__all__ = ["WRAP_MEMORY_KEYS", "MemoryBudgets", "check_nvme_dir", "planner_plan", "wrap"]


WRAP_MEMORY_KEYS = (*(f.name for f in dataclasses.fields(MemoryConfig)), "nvme_path")
"""The keys of ``wrap(memory=...)``: a config file's ``memory`` section, plus ``nvme_path``."""


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryBudgets:
    """``wrap(memory=...)`` read and checked: a config file's ``memory`` section (``MemoryConfig``,
    the same fields, types and messages) plus the NVMe directory, with this machine's defaults."""

    device_bytes: int
    """Device-tier budget (the ledger refuses to go past it); default: the device's memory (on a
    CPU, the memory available now)."""
    host_bytes: int
    """Host-tier budget; default: this machine's memory."""
    nvme_path: str | None
    """``memory['nvme_path']``: directory for NVMe-home chunks and swapped activations; None = no
    NVMe tier. (A config file names it per node: ``cluster.nodes[].nvme.path``.)"""
    nvme_bytes: int | None
    """``memory['nvme']``: NVMe budget; None = the free space there."""
    safety_margin: float
    """Fraction of each budget the planner leaves free for untracked workspace."""
    prefetch_depth: int | None
    """Fixed prefetch depth; overrides a given plan's."""
    chunk_elems: int | None
    """Fixed chunk size for the planner."""
    offload: str = "auto"
    """``memory['offload']``: every chunk's home (``device``, ``host``, ``nvme``) or ``auto``."""
    activations: str = "auto"
    """``memory['activations']``: every block's activation policy or ``auto``."""

    @staticmethod
    def parse(memory: Mapping[str, Any] | None, device: torch.device) -> "MemoryBudgets":
        if memory is not None and not isinstance(memory, Mapping):
            raise UserError(f"memory: a mapping of {', '.join(WRAP_MEMORY_KEYS)}, got {show(memory)}")
        data = dict(memory or {})
        if "nvme_budget" in data:
            raise UserError("memory['nvme_budget']: the NVMe budget is memory['nvme'] (a size, as memory.nvme in a "
                            "config file); the directory is memory['nvme_path']")
        unknown = sorted(str(k) for k in set(data) - set(WRAP_MEMORY_KEYS))
        if unknown:
            raise UserError(f"memory[{unknown[0]!r}]: unknown key; known keys: {', '.join(WRAP_MEMORY_KEYS)}")
        nvme_path = data.pop("nvme_path", None)
        nvme = data.get("nvme")
        if isinstance(nvme, os.PathLike) or (isinstance(nvme, str) and ("/" in nvme or os.sep in nvme)):
            raise UserError(f"memory['nvme']: {show(nvme)} is a path, but memory['nvme'] is the NVMe budget (a size "
                            "such as '200GiB', as memory.nvme in a config file); put the directory in "
                            "memory['nvme_path']")
        cfg = section_from_dict(MemoryConfig, data, "memory")
        if nvme_path is not None:
            if not isinstance(nvme_path, (str, os.PathLike)) or not str(nvme_path):
                raise UserError(f"memory['nvme_path']: a directory path, got {show(nvme_path)}")
            check_nvme_dir(nvme_path, "memory['nvme_path']")
        elif cfg.nvme is not None:
            raise UserError("memory['nvme']: an NVMe budget without a directory; set memory['nvme_path'] too, "
                            "or remove the budget")
        import psutil

        if cfg.device is not None:
            device_bytes = cfg.device
        elif device.type == "cuda":
            device_bytes = torch.cuda.get_device_properties(device).total_memory
        else:
            device_bytes = psutil.virtual_memory().available
        if device_bytes <= 0:
            raise UserError("memory.device: the device budget must be > 0")
        return MemoryBudgets(
            device_bytes=device_bytes, host_bytes=cfg.host if cfg.host is not None else psutil.virtual_memory().total,
            nvme_path=None if nvme_path is None else str(nvme_path), nvme_bytes=cfg.nvme,
            safety_margin=cfg.safety_margin, prefetch_depth=cfg.prefetch_depth, chunk_elems=cfg.chunk_elems,
            offload=cfg.offload, activations=cfg.activations)


def check_nvme_dir(path: str | os.PathLike, field: str) -> None:
    """The NVMe directory is made when the store starts; its parent must exist already."""
    parent = Path(path).absolute().parent
    if not parent.is_dir():
        raise UserError(f"{field}: the parent of {show(str(path))} does not exist; point it at a directory on a "
                        "local disk")


def planner_plan(
    model: nn.Module, blocks: Sequence[tuple[str, nn.Module]], *, loss_fn: Callable, dtype: DType | str, optimizer: str,
    budgets: MemoryBudgets, device: torch.device, seq_len: int, global_batch_size: int, micro_batch_size: int | None,
    call: Callable | None = None, clip_grad_norm: bool = False,
) -> Plan:
    """Plan with the planner (``planner.analyze.analyze_built`` + ``planner.search.plan``) on a
    meta-device twin of ``model`` (no weight is copied) and this machine's hardware figures."""
    import copy

    from memtrain.cluster.inventory import local_node_spec
    from memtrain.models.built import BuiltModel
    from memtrain.cluster import catalog
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
        chunk_size_elems=budgets.chunk_elems, prefetch_depth=budgets.prefetch_depth,
        offload=budgets.offload, activations=budgets.activations, clip_grad_norm=clip_grad_norm,
    )
    if not plan.fits:
        raise UserError(f"memory: nothing fits these budgets: {plan.shortfall}")
    return plan


def _named_groups(optimizer: Any, model: nn.Module) -> Any:
    """``optimizer`` with the parameters of its ``param_groups`` given by name (a group may list
    the model's parameters themselves, as torch's do)."""
    if not isinstance(optimizer, Mapping) or not isinstance(optimizer.get("param_groups"), (list, tuple)):
        return optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for i, g in enumerate(optimizer["param_groups"]):
        if isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple)):
            params = []
            for p in g["params"]:
                if isinstance(p, torch.Tensor):
                    if id(p) not in names:
                        raise UserError(f"optimizer.param_groups[{i}].params: a tensor that is not a parameter of "
                                        "the model; list the model's parameters or their names")
                    p = names[id(p)]
                params.append(p)
            g = {**g, "params": params}
        groups.append(g)
    return {**optimizer, "param_groups": groups}


def _activation_manager(policies, blocks, store, device_ledger, host_ledger, nvme, policy: MemoryPolicy, use):
    """The activation manager (offload.activations) when present; required for non-keep policies."""
    try:
        from memtrain.offload.activations import ActivationManager
    except ImportError:
        ActivationManager = None
    if use is False or (use is None and ActivationManager is None):
        if any(p is not ActPolicy.KEEP for p in policies.values()):
            raise UserError("plan.memory.activations: swap/recompute policies need memtrain.offload.activations")
        return None
    if ActivationManager is None:
        raise UserError("activation manager requested but memtrain.offload.activations is not available")
    manager = ActivationManager(policies=policies, device_ledger=device_ledger, host_ledger=host_ledger, nvme=nvme,
                                param_resolver=store, writes_in_flight=policy.swap_writes_in_flight)
    manager.wrap_blocks(blocks)
    return manager


def wrap(
    model: nn.Module, *, optimizer: OptimizerSpec | Mapping[str, Any] | str, memory: Mapping[str, Any] | None = None,
    plan: Plan | MemoryPolicy | None = None, blocks=None, loss_fn: Callable | None = None, dtype: str = "fp32",
    micro_batch_size: int | None = None, seed: int | None = None, verbose: bool = True,
    device: str | torch.device | None = None, host_kernel: str | None = None, loss_scale: Mapping[str, Any] | None = None,
    activation_manager: bool | None = None, seq_len: int | None = None, global_batch_size: int | None = None,
    call: Callable | None = None, max_grad_norm: float | None = None, clip_order: str = "model",
) -> Engine:
    """Wrap ``model`` for memory-aware training (docs/wrap.md is the reference).

    - ``memory``: budgets and limits, the keys of a config file's ``memory`` section (``device``,
      ``host``, ``nvme`` sizes such as ``"8GiB"``, ``safety_margin``, ``chunk_elems``,
      ``prefetch_depth``) plus ``nvme_path``, the directory for NVMe-home chunks.
    - ``plan``: a planner ``Plan`` or its ``MemoryPolicy``. Without one, the planner's search plans
      here when ``seq_len`` and ``global_batch_size`` (the shape of ``train_step``'s batches) are
      given, else from the first batch's shape ([Note: plan on the first batch]).
    - ``blocks``: the model's blocks in execution order, modules or ``(label, module)`` pairs with
      any unique labels; default ``model.blocks``.
    - ``call(model, input_ids)``: how to run the model (default ``model(input_ids)``); every run,
      the planner's weightless trace included, goes through it. ``loss_fn(output, labels)`` turns
      its output into the loss (default: next-token cross entropy of the logits).
    - ``loss_scale``: fp16 loss scaling (``LossScaler`` fields); ``activation_manager`` False keeps
      every activation.
    - ``max_grad_norm``: clip each step's gradients to this global 2-norm, as
      ``torch.nn.utils.clip_grad_norm_`` (offload.clip); None or 0: no clipping. ``clip_order``
      ``"groups"`` takes the per-parameter norms in the param groups' order instead of the model's.
    - ``optimizer``: a name, an ``OptimizerSpec`` or a dict of its fields; ``param_groups`` lists
      torch-style groups (``{"params": [names or parameters], "weight_decay": 0.0, "lr": ...}``).
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu":
        return_large_frees()  # runtime.process_memory [Note: the C heap's threshold]
    spec = OptimizerSpec.from_value(_named_groups(optimizer, model))
    clip = check_max_norm(max_grad_norm)
    budgets = MemoryBudgets.parse(memory, dev)
    if plan is None and seq_len is None and global_batch_size is None:
        # [Note: plan on the first batch] The planner needs the batch shape; without a plan or
        # the shape, plan when the first batch arrives (its sequence length and size).
        kwargs = dict(optimizer=spec, memory=memory, blocks=blocks, loss_fn=loss_fn, dtype=dtype,
                      micro_batch_size=micro_batch_size, seed=seed, verbose=verbose, device=device,
                      host_kernel=host_kernel, loss_scale=loss_scale, activation_manager=activation_manager, call=call,
                      max_grad_norm=clip, clip_order=clip_order)
        return Engine.deferred(lambda seq_len, global_batch_size: wrap(
            model, seq_len=seq_len, global_batch_size=global_batch_size, **kwargs))
    if plan is None and (seq_len is None) != (global_batch_size is None):
        raise UserError("wrap: pass both seq_len= and global_batch_size= (the planner plans now) or neither "
                        "(it plans from the first batch's shape)")
    if micro_batch_size is not None and (isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int)
                                         or micro_batch_size < 1):
        raise UserError(f"micro_batch_size: must be a whole number >= 1, got {micro_batch_size!r}")
    if isinstance(plan, Plan):
        if plan.train.optimizer != spec.name or str(plan.train.dtype) != str(DType(dtype)):
            raise UserError(f"plan: made for {plan.train.optimizer}/{plan.train.dtype}, wrap asked for {spec.name}/{dtype}; re-plan")
        if plan.train.clip_grad_norm != (clip is not None):
            raise UserError(f"max_grad_norm: the plan was made {'with' if plan.train.clip_grad_norm else 'without'} "
                            "gradient clipping (its program updates early only without it); re-plan with "
                            "train.max_grad_norm set as here, or pass a MemoryPolicy")
        micro_batch_size = micro_batch_size or plan.train.micro_batch_size
    if seed is not None:
        torch.manual_seed(seed)
    named = named_blocks(model, blocks)
    if loss_fn is None:
        from memtrain.models.gpt import causal_lm_loss as loss_fn
    if plan is None and seq_len is not None and global_batch_size is not None:
        plan = planner_plan(model, named, loss_fn=loss_fn, dtype=dtype, optimizer=spec.name, budgets=budgets, device=dev,
                            seq_len=seq_len, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                            call=call, clip_grad_norm=clip is not None)
        micro_batch_size = plan.train.micro_batch_size
    policy = plan.memory if isinstance(plan, Plan) else plan
    if budgets.chunk_elems is not None and budgets.chunk_elems != policy.chunk_size_elems:
        raise UserError(f"memory.chunk_elems: {budgets.chunk_elems} but the plan given packs chunks of "
                        f"{policy.chunk_size_elems} elements; re-plan with this chunk size, or leave it out")
    if len(policy.activations) not in (0, len(named)):
        raise UserError(f"plan.memory.activations: {len(policy.activations)} policies for {len(named)} blocks; re-plan for this model")
    nvme = None
    if any(c.home is Tier.NVME for c in policy.chunks) or budgets.nvme_path is not None:
        if budgets.nvme_path is None:
            raise UserError("memory.nvme_path: the plan puts chunks on NVMe; set memory['nvme_path'] to a directory")
        from memtrain.offload.nvme import NvmeStore

        nvme = NvmeStore(budgets.nvme_path, budget_bytes=budgets.nvme_bytes, compress=policy.compress_nvme).start()
    device_ledger, host_ledger = Ledger("device", budgets.device_bytes), Ledger("host", budgets.host_bytes)
    depth = budgets.prefetch_depth or policy.prefetch_depth
    try:
        store = ChunkStore(model=model, blocks=named, chunks=policy.chunks, dtype=dtype, state_names=spec.state_names,
                           device=dev, device_ledger=device_ledger, host_ledger=host_ledger, nvme=nvme,
                           prefetch_depth=depth).build()
        opt = OffloadedOptimizer(store, spec, staged_chunks=policy.optim_staged_chunks, max_grad_norm=clip,
                                 clip_order=clip_order,
                                 **({} if host_kernel is None else {"host_kernel": host_kernel}))
        policies = {name: ActPolicy(p) for (name, _), p in zip(named, policy.activations)}
        # The program places swap-ins policy.swap_in_ahead blocks ahead; NVMe swap writes wait as the plan says.
        acts = _activation_manager(policies, named, store, device_ledger, host_ledger, nvme, policy, activation_manager)
    except BaseException:
        if nvme is not None:
            nvme.close()
        raise
    scaler = LossScaler(**(loss_scale or {})) if DType(dtype) is DType.FP16 else None
    if verbose:
        _print_summary(plan, policy, depth, dtype, spec.state_names)
    return Engine(model=model, blocks=named, store=store, optimizer=opt, activations=acts, loss_fn=loss_fn,
                  micro_batch_size=micro_batch_size, device=dev, nvme=nvme, scaler=scaler, call=call,
                  plan=plan if isinstance(plan, Plan) else None, swap_in_ahead=policy.swap_in_ahead)


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
