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

[Note: ZeRO-1 of an offloaded stage] Under ``PipelineSpec.zero`` 1 each of the ``dp``
replicas keeps the optimizer states (and the gradient accumulators) of a contiguous run of the
stage's chunks only, about ``1 / dp`` of its elements (``split_owners``; no chunk straddles two
replicas), as ZeRO-Offload partitions them (Ren et al. 2021, Sec. 4.1); the others' states are
dropped after the build.
``OFFLOAD`` adds the all-reduced gradients of its own chunks only, ``OPTIM`` updates them, then
the replicas all-gather the updated masters and each writes the others' chunks into its own
home (host tensors or NVMe files): every replica keeps the whole parameters, as ZeRO-1 does.
Each chunk gets the arithmetic of the unsharded run, so losses are bitwise its. Under ZeRO-2
the gradients are sharded too: each chunk's are reduced to its owner under the last backward
(``reducer``, runtime.stage_offload_zero [Note: ZeRO-2 of an offloaded stage]) and ``OFFLOAD``
adds those sums, the replica's own chunks', only.

Host and NVMe chunks step with ``host_kernel="foreach"``, elementwise torch's single-tensor
arithmetic (offload.optim [Note: host kernel choice]), so a stage's losses stay bitwise those of
one process running ``torch.optim``. The chunk store's block and gradient hooks are removed: a
pipeline stage interleaves micro-batches, so its residency is the whole step, not a pass's
program of fetches and releases.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memtrain.comm import all_gather
from memtrain.offload.chunk_layout import block_param_order
from memtrain.offload.chunks import ChunkStore
from memtrain.offload.ledger import Ledger
from memtrain.offload.optim import OffloadedOptimizer
from memtrain.optimizers import OptimizerSpec
from memtrain.planner.plan import Action, ChunkPlan, Tier, pack_params
from memtrain.planner.program import Layout
from memtrain.planner.program_optim import OptimLayout, final_optim_points
from memtrain.runtime.stage_groups import local_spec
from memtrain.runtime.stage_offload_zero import ChunkReducer

__all__ = ["OFFLOAD_HOMES", "OffloadedStage", "ZeroGroup", "split_owners", "build_offloaded", "close_offloaded",
           "state_bytes"]

OFFLOAD_HOMES = ("device", "host", "nvme")
"""Where a stage's model states may live between steps (``PipelineSpec.offload``)."""


@dataclass(frozen=True, slots=True)
class ZeroGroup:
    """The replicas an offloaded stage's optimizer states are sharded over ([Note: ZeRO-1 of an
    offloaded stage])."""

    replica: int
    dp: int
    group: Any
    """The stage's data-parallel process group."""
    rank: int
    """This world rank (for errors)."""
    timeout_s: float
    level: int = 1
    """``PipelineSpec.zero``: 1 the optimizer states, 2 the gradients too ([Note: ZeRO-2 of an
    offloaded stage] in runtime.stage_offload_zero)."""
    deferred: frozenset[int] = frozenset()
    """ZeRO-2: ids of parameters final only at ``ALLREDUCE`` (tied across ranks)."""


def split_owners(sizes: list[int], dp: int) -> list[int]:
    """Per item (its elements ``sizes``, in order), the replica it goes to: the one whose ``1 / dp``
    share of all the elements holds the item's middle, so each replica gets a contiguous run of
    about ``1 / dp`` of the elements."""
    total, acc, out = max(sum(sizes), 1), 0, []
    for n in sizes:
        out.append(min(dp - 1, (2 * acc + n) * dp // (2 * total)))
        acc += n
    return out


def _chunk_plans(groups: list[list[tuple[str, int]]], chunk_elems: int, home: Tier,
                 dp: int) -> tuple[tuple[ChunkPlan, ...], tuple[int, ...]]:
    """The stage's chunks (the planner's packing rule, ``planner.plan.pack_params``, over its
    blocks' parameters) and per chunk the replica keeping its optimizer states: the parameters are
    split in order into ``dp`` runs of about equal elements (``split_owners``) and each run is
    packed on its own, so no chunk straddles two replicas. ``dp`` 1: every chunk is replica 0's."""
    flat = [(b, name, n) for b, group in enumerate(groups) for name, n in group]
    owner = split_owners([n for _, _, n in flat], dp)
    plans: list[ChunkPlan] = []
    owners: list[int] = []
    for d in range(dp):
        run = [[(name, n) for (b2, name, n), o in zip(flat, owner) if b2 == b and o == d] for b in range(len(groups))]
        for names, n in pack_params([g for g in run if g], chunk_elems):
            plans.append(ChunkPlan(index=len(plans), num_elems=n, param_names=tuple(names), home=home))
            owners.append(d)
    return tuple(plans), tuple(owners)


class OffloadedStage:
    """One stage's blocks over a chunk store of one home (see the module doc)."""

    def __init__(self, stage: int, blocks: list[nn.Module], home: str, optimizer: OptimizerSpec, *,
                 chunk_elems: int | None = None, nvme_dir: Path | None = None, staged_chunks: int = 2,
                 zero: ZeroGroup | None = None, device: torch.device | str = "cpu") -> None:
        self.stage = stage
        self.home = Tier(home)
        if self.home is Tier.DEVICE:
            raise ValueError(f"offload: stage {stage} is on the device; nothing to offload")
        self.module = nn.ModuleList(blocks)
        named = [(f"block{i}", b) for i, b in enumerate(blocks)]
        groups = block_param_order(self.module, named)
        elems = chunk_elems or max(sum(n for _, n in g) for g in groups)  # default: about a block a chunk
        plans, owners = _chunk_plans(groups, elems, self.home, zero.dp if zero else 1)
        self.nvme = None
        if self.home is Tier.NVME:
            if nvme_dir is None:
                raise ValueError(f"nvme_dir: stage {stage} is offloaded to nvme; give a directory")
            from memtrain.offload.nvme import NvmeStore

            self.nvme = NvmeStore(nvme_dir, budget_bytes=None).start()
        try:
            self.store = ChunkStore(model=self.module, blocks=named, chunks=plans, dtype="fp32",
                                    state_names=optimizer.state_names, device=torch.device(device),
                                    device_ledger=Ledger("device"), host_ledger=Ledger("host"), nvme=self.nvme,
                                    prefetch_depth=len(plans)).build()
            self.store.hooks.uninstall()  # residency is the step's (module doc)
            self.optimizer = OffloadedOptimizer(self.store, optimizer, host_kernel="foreach",
                                                staged_chunks=staged_chunks)
        except BaseException:
            if self.nvme is not None:
                self.nvme.close()
            raise
        self.spec = optimizer
        """The stage's optimizer and its groups, by the store's names; ``step`` sets each step's rate."""
        self.zero = zero
        self.owners = owners
        """Per chunk, the replica keeping its optimizer states (all 0 without ZeRO-1)."""
        self.owned = frozenset(i for i, d in enumerate(owners) if d == (zero.replica if zero else 0))
        """The chunks whose optimizer states this replica keeps (all without ZeRO-1)."""
        for c in self.store.chunks:
            if c.index not in self.owned:
                self._drop_states(c)
        self.reducer = (ChunkReducer(self.store.chunks, owners, replica=zero.replica, group=zero.group,
                                     rank=zero.rank, timeout_s=zero.timeout_s, deferred=set(zero.deferred))
                        if zero is not None and zero.level == 2 else None)
        """ZeRO-2: the chunks' gradients reduced to their owners under the last backward."""
        points = final_optim_points(Layout.of_store(self.store), OptimLayout(staged_chunks=staged_chunks, early=False))
        self.points: tuple[Action, ...] = tuple(a for a in points if a.chunk is None or a.chunk in self.owned)
        """The optimizer's step end ([Note: a stage's step]) over this replica's chunks; its last
        action is the step's ``0OPTIM``."""

    def _drop_states(self, c) -> None:
        """[Note: ZeRO-1 of an offloaded stage] Give back chunk ``c``'s optimizer states and
        gradient accumulator: another replica keeps them."""
        store = self.store
        if c.home is Tier.HOST:
            for t in (*c.states.values(), c.grad):
                store._free(store.host_ledger, f"chunk:{c.index}", t)
            c.states, c.grad = {}, None
        else:
            for k in store.state_names:
                store.nvme.delete(store.nvme_key(c, k))

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
        accumulator, through a grad buffer as the store's gradient hooks would (ZeRO-2: the
        reduced sums of this replica's chunks are the buffers); the param buffers released."""
        store = self.store
        summed = self.reducer.summed if self.reducer is not None else None
        for c in store.chunks:
            if c.buf is None:  # not fetched this step (the stage ran nothing): no gradient
                continue
            if summed is not None:
                if c.index in self.owned:
                    buf = summed.pop(c.index).to(store.compute_dtype)
                    store.device_ledger.alloc(f"buffer:grad:{c.index}", buf.numel() * buf.element_size())
                    c.grad_buf = buf
                    store.grads.flush(c)
                store._release(c)
                continue
            if c.index not in self.owned:  # another replica updates it
                for s in c.slots:
                    s.param.grad = None
                store._release(c)
                continue
            buf = store._alloc(store.device_ledger, f"buffer:grad:{c.index}", c.num_elems, store.compute_dtype)
            for s in c.slots:
                g = s.param.grad
                part = buf[s.offset:s.offset + s.numel]
                part.copy_(g.reshape(-1)) if g is not None else part.zero_()
                s.param.grad = None
            c.grad_buf = buf
            store.grads.flush(c)
            store._release(c)

    def step(self, lr: float | tuple[float, ...] | None) -> None:
        """``OPTIM``: every chunk with gradients stepped where it lives, at ``lr``: one number for
        every parameter group, one per group, or None: each group's own (runtime.stage_groups)."""
        opt = self.optimizer
        opt.spec = self.spec if lr is None else self.spec.with_lr(lr)
        self.store.executed.clear()
        opt.step(self.points)
        if self.zero is not None:
            self._gather_masters()

    def _gather_masters(self) -> None:
        """[Note: ZeRO-1 of an offloaded stage] Every replica's updated chunks into every home."""
        z, store = self.zero, self.store
        runs = [[c for c in store.chunks if self.owners[c.index] == d] for d in range(z.dp)]
        width = max(sum(c.num_elems for c in run) for run in runs)
        mine = torch.zeros(width)
        offset = 0
        for c in runs[z.replica]:
            mine[offset:offset + c.num_elems] = store._read(c, "master")
            offset += c.num_elems
        whole = all_gather(mine, z.group, rank=z.rank, what=f"{self.stage}OPTIM (gathering the chunks)",
                           timeout_s=z.timeout_s)
        for d, run in enumerate(runs):
            offset = d * width
            for c in run:
                if d != z.replica:
                    store._write(c, "master", whole[offset:offset + c.num_elems].clone())
                offset += c.num_elems

    # ---- checkpoints --------------------------------------------------------------------

    def parameters(self) -> list[torch.Tensor]:
        """The fp32 master parameters (host copies), in ``module.parameters()`` order: the stage's
        ``owns`` (it shares none with another stage of its rank)."""
        self.optimizer.flush()
        got = self.store.gather_params()
        return [got[name] for name, _ in self.module.named_parameters()]

    def load_parameters(self, values: list[torch.Tensor]) -> None:
        """Replace the master parameters (``parameters()``'s order) in the chunks."""
        self.optimizer.flush()
        names = [name for name, _ in self.module.named_parameters()]
        self.store.load_params(dict(zip(names, values, strict=True)))

    # ---- what it holds ------------------------------------------------------------------

    def state_bytes(self) -> dict[str, int]:
        """Bytes held now per tier (the store's ledgers: ``device`` param and grad buffers,
        ``host`` chunks and staging, ``nvme`` files), the optimizer states' wherever they are,
        and the size of the chunk files on disk."""
        store = self.store
        n_states = sum(c.num_elems for c in store.chunks if c.index in self.owned) * 4 * len(store.state_names)
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


# ---- a worker's offloaded stages (runtime.stage_worker) ----------------------------------------


def build_offloaded(worker: Any, stages: list[int]) -> dict[int, OffloadedStage]:
    """The chunk stores of ``worker``'s (a ``StageWorker``'s) offloaded ``stages``. A stage's
    store holds every parameter its blocks use, so it may share none with another stage of the
    rank; an ``nvme`` stage's files go in ``nvme_dir/rank<r>/stage<s>``."""
    spec = worker.spec
    for s in stages:
        mine = {id(q) for q in worker.uses[s]}
        other = next((t for t in worker.stages if t != s and mine & {id(q) for q in worker.uses[t]}), None)
        if other is not None:
            raise ValueError(f"offload: stages {min(s, other)} and {max(s, other)} on rank {worker.rank} share a "
                             "parameter (tied embeddings); keep both on the device, or untie the embeddings")
    out: dict[int, OffloadedStage] = {}
    for s in stages:
        nvme_dir = None
        if spec.home(s) == "nvme":
            if spec.nvme_dir is None:
                raise ValueError(f"nvme_dir: stage {s} is offloaded to nvme; give a directory")
            run_dir = Path(spec.nvme_dir)
            if not run_dir.parent.is_dir():  # the configured directory: made by the user on every node
                raise ValueError(f"nvme_dir: {run_dir.parent} is not a directory on this rank's node; create it on "
                                 "a local NVMe disk of every node")
            run_dir.mkdir(exist_ok=True)
            rank_dir = run_dir / f"rank{worker.rank}"
            rank_dir.mkdir(exist_ok=True)
            nvme_dir = rank_dir / f"stage{s}"
        tied = frozenset(id(q) for q in worker.tied.get(s, []))  # final only at ALLREDUCE, after the tie's sum
        zero = (ZeroGroup(worker.replica, spec.dp, worker.dp_group, worker.rank, spec.timeout_s, level=spec.zero,
                          deferred=tied) if spec.zero else None)
        local = {n: worker.gname[id(q)] for n, q in nn.ModuleList(worker.blocks[s]).named_parameters()}
        optim = local_spec(spec.optimizer, local)  # the groups by the store's names (runtime.stage_groups)
        out[s] = OffloadedStage(s, worker.blocks[s], spec.home(s), optim, chunk_elems=spec.offload_chunk_elems,
                                nvme_dir=nvme_dir, zero=zero, device=worker.device)
    return out


def close_offloaded(offloaded: dict[int, OffloadedStage], nvme_dir: str | None, rank: int) -> None:
    """Close each stage (its chunk files go), then the rank's directory if empty."""
    for st in offloaded.values():
        st.close()
    if offloaded and nvme_dir is not None:
        rank_dir = Path(nvme_dir) / f"rank{rank}"
        if rank_dir.is_dir() and not any(rank_dir.iterdir()):
            rank_dir.rmdir()


def state_bytes(offloaded, on_device: dict[int, tuple[Any, list[nn.Parameter]]]) -> dict[str, int]:
    """A rank's model states now, in bytes (``StageWorker.state_bytes``): its ``offloaded``
    stages' by their ledgers and files, and per device stage (its optimizer, the parameters it
    owns) the parameters, gradients, optimizer states and a ZeRO-1 shard's fp32 copy."""
    out = {"device": 0, "host": 0, "nvme": 0, "optimizer_states": 0, "nvme_files": 0}
    for st in offloaded:
        for k, v in st.state_bytes().items():
            out[k] += v
    for opt, owns in on_device.values():
        held = list(owns) + [q.grad for q in owns if q.grad is not None]
        states = [t for st in opt.state.values() for k, t in st.items() if k != "step"]
        master = getattr(opt, "master", None)  # runtime.stage_zero's shard
        held += states + ([master] if master is not None else [])
        out["device"] += sum(t.numel() * t.element_size() for t in held)
        out["optimizer_states"] += sum(t.numel() * t.element_size() for t in states)
    return out
