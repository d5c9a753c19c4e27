"""Per-stage offload in a pipeline worker: one stage's model states in a chunk store.

A stage whose ``PipelineSpec.offload`` is ``host`` or ``nvme`` keeps its fp32 master parameters,
its gradient accumulators and its optimizer states in the chunks of an ``offload.chunks.ChunkStore``
whose every chunk has that home (host-memory tensors, or NVMe files of an ``offload.nvme.NvmeStore``
in the worker's own directory), and steps them with ``offload.optim.OffloadedOptimizer``, the
single-process engine's mechanisms. Between steps the stage's parameters are released (the NaN
placeholder of offload.chunks [Note: released parameters]) and no gradient is held.

[Note: a stage's step] The rank's program moves the states (planner.pipeline ``add_offload_points``):

- ``sPREFETCH`` starts fetching each chunk into a param buffer (a copy from host memory, a file
  read from NVMe); the stage's first ``F`` waits for them and points the parameters into the
  buffers, which stay resident for the step (every micro-batch's ``F``, ``B`` and ``W`` of the
  stage use them);
- the backward accumulates gradients on the parameters as without offload, and ``sALLREDUCE``
  sums them as without offload;
- ``sOFFLOAD`` adds them into the chunks' fp32 accumulators (``offload.grads.Gradients.flush``)
  and releases the buffers;
- ``sOPTIM`` runs the optimizer's step end (planner.program_optim ``final_optim_points``: host
  chunks updated in place; nvme chunks' master and states read into host staging, updated, and
  written back, one read ahead and one write-back in flight), recorded in ``store.executed``.

Host and NVMe chunks step with ``host_kernel="foreach"``, elementwise torch's single-tensor
arithmetic (offload.optim [Note: host kernel choice]), so a stage's losses stay bitwise those of
one process running ``torch.optim``. The chunk store's block and gradient hooks are removed: a
pipeline stage interleaves micro-batches, so its residency is the whole step, not a pass's
program of fetches and releases.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from memtrain.offload.chunk_layout import block_param_order, make_chunk_plans
from memtrain.offload.chunks import ChunkStore
from memtrain.offload.ledger import Ledger
from memtrain.offload.optim import OffloadedOptimizer
from memtrain.optimizers import OptimizerSpec
from memtrain.planner.plan import Action, Tier
from memtrain.planner.program import Layout
from memtrain.planner.program_optim import OptimLayout, final_optim_points

__all__ = ["OFFLOAD_HOMES", "OffloadedStage"]

OFFLOAD_HOMES = ("device", "host", "nvme")
"""Where a stage's model states may live between steps (``PipelineSpec.offload``)."""


class OffloadedStage:
    """One stage's blocks over a chunk store of one home (see the module doc)."""

    def __init__(self, stage: int, blocks: list[nn.Module], home: str, optimizer: OptimizerSpec, *,
                 chunk_elems: int | None = None, nvme_dir: Path | None = None, staged_chunks: int = 2) -> None:
        self.stage = stage
        self.home = Tier(home)
        if self.home is Tier.DEVICE:
            raise ValueError(f"offload: stage {stage} is on the device; nothing to offload")
        self.module = nn.ModuleList(blocks)
        named = [(f"block{i}", b) for i, b in enumerate(blocks)]
        groups = block_param_order(self.module, named)
        elems = chunk_elems or max(sum(n for _, n in g) for g in groups)  # default: about a block a chunk
        plans = make_chunk_plans(groups, elems, self.home)
        self.nvme = None
        if self.home is Tier.NVME:
            if nvme_dir is None:
                raise ValueError(f"nvme_dir: stage {stage} is offloaded to nvme; give a directory")
            from memtrain.offload.nvme import NvmeStore

            self.nvme = NvmeStore(nvme_dir, budget_bytes=None).start()
        try:
            self.store = ChunkStore(model=self.module, blocks=named, chunks=plans, dtype="fp32",
                                    state_names=optimizer.state_names, device=torch.device("cpu"),
                                    device_ledger=Ledger("device"), host_ledger=Ledger("host"), nvme=self.nvme,
                                    prefetch_depth=len(plans)).build()
            self.store.hooks.uninstall()  # residency is the step's (module doc)
            self.optimizer = OffloadedOptimizer(self.store, optimizer, host_kernel="foreach",
                                                staged_chunks=staged_chunks)
        except BaseException:
            if self.nvme is not None:
                self.nvme.close()
            raise
        self.points: tuple[Action, ...] = final_optim_points(
            Layout.of_store(self.store), OptimLayout(staged_chunks=staged_chunks, early=False))
        """The optimizer's step end ([Note: a stage's step]); its last action is the step's ``0OPTIM``."""

    # ---- the program's points ([Note: a stage's step]) ----------------------------------

    def prefetch(self) -> None:
        """``PREFETCH``: start every chunk's fetch into a param buffer."""
        for c in self.store.chunks:
            self.store._start(c)

    def ensure(self) -> None:
        """Before a forward: every chunk resident, the parameters pointing into the buffers (a
        no-op once they are; fetches not begun by a ``PREFETCH`` begin here)."""
        for c in self.store.chunks:
            self.store._ensure(c)

    def offload(self) -> None:
        """``OFFLOAD``: the parameters' gradients (summed by ``ALLREDUCE``) into each chunk's fp32
        accumulator, through a grad buffer as the store's gradient hooks would; the param buffers
        released."""
        store = self.store
        for c in store.chunks:
            if c.buf is None:  # not fetched this step (the stage ran nothing): no gradient
                continue
            buf = store._alloc(store.device_ledger, f"buffer:grad:{c.index}", c.num_elems, torch.float32)
            for s in c.slots:
                g = s.param.grad
                part = buf[s.offset:s.offset + s.numel]
                part.copy_(g.reshape(-1)) if g is not None else part.zero_()
                s.param.grad = None
            c.grad_buf = buf
            store.grads.flush(c)
            store._release(c)

    def step(self, lr: float) -> None:
        """``OPTIM``: every chunk with gradients stepped where it lives, at ``lr``."""
        opt = self.optimizer
        opt.spec = dataclasses.replace(opt.spec, lr=float(lr))
        self.store.executed.clear()
        opt.step(self.points)

    # ---- what it holds ------------------------------------------------------------------

    def state_bytes(self) -> dict[str, int]:
        """Bytes held now per tier (the store's ledgers: ``device`` param and grad buffers,
        ``host`` chunks and staging, ``nvme`` files), the optimizer states' wherever they are,
        and the size of the chunk files on disk."""
        store = self.store
        n_states = sum(c.num_elems for c in store.chunks) * 4 * len(store.state_names)
        files = sum(store.nvme.file_path(k).stat().st_size for k in store.nvme.keys()) if self.nvme else 0
        return {"device": store.device_ledger.in_use_bytes, "host": store.host_ledger.in_use_bytes,
                "nvme": self.nvme.ledger.in_use_bytes if self.nvme else 0, "optimizer_states": n_states,
                "nvme_files": files}

    def start_window(self) -> None:
        """A step starts: its ledgers' peaks (``window_peak_bytes``) count from here."""
        for ledger in (self.store.device_ledger, self.store.host_ledger, *((self.nvme.ledger,) if self.nvme else ())):
            ledger.start_window()

    def close(self) -> None:
        """Wait for the optimizer's work, drop the chunks and delete their files."""
        try:
            self.optimizer.close()
        finally:
            try:
                self.store.close()
            finally:
                if self.nvme is not None:
                    self.nvme.close()
