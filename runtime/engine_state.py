"""An engine's states out and in (``runtime.engine.Engine`` inherits them): the model's and the
optimizer's as plain torch formats, and a checkpoint's by chunk (NVMe chunks as their files)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from memtrain.offload.chunk_state import chunk_state, load_chunk_state

__all__ = ["EngineStates"]


class EngineStates:
    """The state methods of ``Engine``; they use its model, chunk store, optimizer and loss scaler."""

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """``model.state_dict()``'s keys (tied names included) with fp32 CPU values from any tier."""
        self._require_built()
        self.optimizer.flush()  # offload.optim [Note: write-backs across the step end]
        params = self.store.gather_params()
        canon = {id(p): n for n, p in self.model.named_parameters()}
        out = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            out[name] = params[canon[id(p)]]
        persistent = self.model.state_dict(keep_vars=True).keys()  # not a rotary table made at init
        for name, b in self.model.named_buffers():
            if name in persistent:
                out[name] = b.detach().to("cpu", copy=True)
        return out

    def state_dict(self) -> dict[str, Any]:
        """``{"model": {name: tensor}, "optimizer": torch-format state}``: loads into a plain
        model (``model.load_state_dict(sd["model"])``) and ``torch.optim.AdamW``/``SGD``."""
        self._require_built()
        sd = {"model": self.model_state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.scaler is not None:
            sd["loss_scale"] = self.scaler.scale
            sd["loss_scaler"] = {"scale": self.scaler.scale, "good_steps": self.scaler.good_steps}
        return sd

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self._require_built()
        self.optimizer.flush()  # offload.optim [Note: write-backs across the step end]
        if "model" not in sd:
            sd = {"model": sd}
        self.store.load_params(sd["model"])
        if "optimizer" in sd:
            self.optimizer.load_state_dict(sd["optimizer"])
        if self.scaler is not None and "loss_scaler" in sd:
            self.scaler.scale = float(sd["loss_scaler"]["scale"])
            self.scaler.good_steps = int(sd["loss_scaler"]["good_steps"])
        elif self.scaler is not None and "loss_scale" in sd:
            self.scaler.scale = float(sd["loss_scale"])

    def checkpoint_state(self) -> dict[str, Any]:
        """The state a checkpoint keeps, by chunk: NVMe chunks as their store files, not gathered
        into memory (offload.chunk_state [Note: NVMe chunks in a checkpoint]); the model's
        buffers and the loss scaler beside them. Every tensor in it is a copy."""
        self._require_built()
        self.optimizer.flush()  # offload.optim [Note: write-backs across the step end]
        sd = {"chunks": chunk_state(self.store)["chunks"],
              "buffers": {n: b.detach().to("cpu", copy=True) for n, b in self.model.named_buffers()}}
        if self.scaler is not None:
            sd["loss_scaler"] = {"scale": self.scaler.scale, "good_steps": self.scaler.good_steps}
        return sd

    def load_checkpoint_state(self, sd: Mapping[str, Any], nvme_files: Mapping[str, Any] | None = None) -> None:
        """Put back a ``checkpoint_state`` (same chunk layout); ``nvme_files`` maps each NVMe
        file's key to where the checkpoint keeps it."""
        self._require_built()
        self.optimizer.flush()
        load_chunk_state(self.store, sd, nvme_files)
        buffers = dict(self.model.named_buffers())
        for name, value in sd.get("buffers", {}).items():
            buffers[name].copy_(value)
        if self.scaler is not None and "loss_scaler" in sd:
            self.scaler.scale = float(sd["loss_scaler"]["scale"])
            self.scaler.good_steps = int(sd["loss_scaler"]["good_steps"])
