"""memtrain.offload: memory tiers, chunked model states, the offloaded optimizer, activations.

Public names are loaded on first use, so ``import memtrain.offload`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Ledger": "ledger", "BudgetExceeded": "ledger",
    "DeviceTier": "tiers", "HostTier": "tiers", "NvmeTier": "tiers", "CopyHandle": "tiers", "copy_async": "tiers",
    "NvmeStore": "nvme", "NvmeError": "nvme",
    "ActivationManager": "activations", "ParamResolver": "activations",
    "ChunkStore": "chunks", "ParamRef": "chunks", "make_chunk_plans": "chunks", "named_blocks": "chunks",
    "param_order": "chunks", "block_param_order": "chunks",
    "OffloadedOptimizer": "optim", "OptimizerSpec": "optim", "host_adamw_step": "optim",
    "measure_host_adamw": "optim",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'memtrain.offload' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"memtrain.offload.{module}"), name)
    globals()[name] = value
    return value
