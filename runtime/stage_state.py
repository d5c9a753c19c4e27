"""A pipeline rank's part of a checkpoint: its stages' parameters and optimizer states, its
random generators (``StageWorker.state`` / ``load_state``; the format is runtime.checkpoint's).
An offloaded stage's come from and go into its chunks (runtime.stage_offload); a ZeRO shard's
optimizer state is the rank's own (runtime.stage_zero)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["rank_state", "load_rank_state"]


def rank_state(worker: Any) -> dict:
    """Per stage ``worker`` holds, the parameters it owns and its optimizer's state, and the
    random generators' states."""
    from memtrain.runtime.checkpoint import capture_rng

    def host(value):  # the driver may have no GPU: tensors travel in host memory
        if isinstance(value, torch.Tensor):
            return value.detach().to("cpu", copy=True)
        if isinstance(value, dict):
            return {k: host(v) for k, v in value.items()}
        if isinstance(value, list):
            return [host(v) for v in value]
        return value

    def stage_state(s: int) -> dict:
        if s in worker.offloaded:  # from its chunks (runtime.stage_offload)
            return {"params": worker.offloaded[s].parameters(), "optim": worker.offloaded[s].optimizer.state_dict()}
        return {"params": [host(q) for q in worker.owns[s]],
                "optim": host(worker.optims[s].state_dict()) if s in worker.optims else None}

    return {"stages": {s: stage_state(s) for s in worker.stages}, "rng": capture_rng()}


def load_rank_state(worker: Any, state: dict) -> None:
    """``worker`` continues from ``state`` (``rank_state`` of the same rank of a run with the same plan)."""
    from memtrain.runtime.checkpoint import restore_rng

    if sorted(state["stages"]) != sorted(worker.stages):
        raise ValueError(f"rank {worker.rank}: the checkpoint holds stages {sorted(state['stages'])}, "
                         f"this rank runs {list(worker.stages)}")
    with torch.no_grad():
        for s, saved in state["stages"].items():
            if len(saved["params"]) != len(worker.owns[s]):
                raise ValueError(f"rank {worker.rank}: stage {s} holds {len(worker.owns[s])} parameters, the "
                                 f"checkpoint {len(saved['params'])}")
            if s in worker.offloaded:  # into its chunks (runtime.stage_offload)
                worker.offloaded[s].load_parameters(saved["params"])
                if saved["optim"] is not None:
                    worker.offloaded[s].optimizer.load_state_dict(saved["optim"])
                continue
            for q, value in zip(worker.owns[s], saved["params"], strict=True):
                q.copy_(value)
            if saved["optim"] is not None:
                worker.optims[s].load_state_dict(saved["optim"])
    restore_rng(state["rng"])
