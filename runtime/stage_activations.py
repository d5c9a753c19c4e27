"""Per-stage activation policies in a pipeline worker: keep, recompute or swap, block by block.

A pipeline stage's plan (``RankPlan.policies``, planner.stage_cost [Note: offload within a
stage]) says per block what happens to its saved activations between the stage's ``F`` and
``B`` of a micro-batch; ``PipelineSpec.activations`` carries it to the workers. Each rank runs
it with the single-process engine's mechanism, ``offload.activations.ActivationManager``: one
manager per stage wraps the stage's blocks (names ``<stage>.<block>``, the block's index within
its stage), all of the rank's managers counting into one device ledger, so the rank's peak of
activation bytes is measured (``StepResult.peak_bytes["activations"]``) by the rules of
docs/memory-accounting.md ("Activations"), the same for every policy, keep included. A stage
whose blocks all keep under a whole backward is only counted, without the manager's hooks on
every forward (runtime.stage_keep).

[Note: shared weight casts] Under bf16 a stage whose blocks all keep shares autocast's bf16 copy
of each weight among its micro-batches (runtime.stage_worker [Note: one weight cast a step]):
each such copy is counted once (owner ``cast:<stage>:<k>``, by its storage) from the forward that
made it, the stage's first of the step, to the step's end. It lives until the later of the
rank's last forward (the cache's reference goes) and the stage's last backward (its graphs'), and
after the rank's last forward only a swap-in or a recompute takes activation bytes; so the
step's peak is the one the exact span gives, but where another stage of the rank does so after
this stage's last backward (the ledger's peak is then higher by at most the casts).
Stages that recompute or swap a block make one per micro-batch, as their own activations.

- ``keep``: autograd's saved tensors stay as they are;
- ``recompute``: the block runs under non-reentrant ``torch.utils.checkpoint`` with its RNG
  state preserved, holding only its input per micro-batch in flight; the stage's ``B`` rebuilds
  its activations (dropout masks replayed), so gradients and losses are bitwise keep's;
- ``swap_host`` / ``swap_nvme``: the program's ``sSWAP_OUT<i>/b<j>`` after ``sF<i>`` copies the
  block's saved tensors to host memory (then to a file in ``nvme_dir/rank<r>/acts<s>``),
  ``sSWAP_IN<i>/b<j>`` before ``sB<i>`` brings them back (planner.pipeline ``add_swap_points``);
  the ``B`` claims each record before the backward runs.

[Note: recompute and swap under a split backward] A schedule that splits ``B`` from ``W``
(zb-h1, v-half, v-min) walks the graph twice (runtime.stage_worker [Note: B and W]), so what
the ``B`` brings back is held until the micro-batch's ``W``: a recomputed block's forward is
replayed at the ``B``'s claim, not inside the walk (offload.recompute [Note: recompute across B
and W]: the managers get ``split_backward``), and a swapped block's record, brought back by the
program's ``SWAP_IN`` before the ``B``, stays on the device until its graph goes at the end of
the ``W``. The planner charges those bytes from ``B`` to ``W`` (planner.stage_cost [Note:
activations between B and W]).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from memtrain.offload.activations import ActivationManager
from memtrain.offload.ledger import Ledger
from memtrain.offload.nvme import NvmeStore
from memtrain.planner.plan import Action, ActPolicy, Op
from memtrain.runtime.stage_keep import KeptStage

__all__ = ["ACT_POLICIES", "RankActivations", "check_activations"]

ACT_POLICIES = tuple(p.value for p in ActPolicy)


def check_activations(acts: Sequence[Sequence[str]], partition: Sequence[int], *, nvme_dir: str | None) -> None:
    """``PipelineSpec.activations`` checked against the partition: empty, or per stage one
    policy per block (ValueError naming the stage otherwise)."""
    if not acts:
        return
    if len(acts) != len(partition):
        raise ValueError(f"activations: one tuple of block policies per stage ({len(partition)}), got {len(acts)}")
    for s, (ps, n) in enumerate(zip(acts, partition)):
        if len(ps) != n or any(p not in ACT_POLICIES for p in ps):
            raise ValueError(f"activations: stage {s} has {n} blocks; give one of {', '.join(ACT_POLICIES)} per block, "
                             f"got {tuple(ps)!r}")
    if not nvme_dir and any(p == ActPolicy.SWAP_NVME for ps in acts for p in ps):
        raise ValueError("activations: swap_nvme blocks need nvme_dir (a directory on each node's local NVMe)")


class RankActivations:
    """One rank's activation managers, one per stage it runs (see the module doc)."""

    def __init__(self, rank: int, blocks: dict[int, list[nn.Module]], acts: Sequence[Sequence[str]], *,
                 nvme_dir: str | None, split_backward: bool = False, count_kept_once: bool = True,
                 share_casts: bool = False) -> None:
        self.device_ledger = Ledger("device")
        """The rank's activation bytes on the device (every stage's managers count here)."""
        self.host_ledger = Ledger("host")
        self.nvme: dict[int, NvmeStore] = {}
        self.managers: dict[int, ActivationManager] = {}
        self.kept: dict[int, KeptStage] = {}
        """Stages of keep blocks under a whole backward: counted, not handled (runtime.stage_keep)."""
        self.shared: frozenset[int] = frozenset(
            s for s in blocks if share_casts and (not acts or all(p == ActPolicy.KEEP for p in acts[s])))
        """[Note: shared weight casts] The stages whose weight casts the step shares (every block keeps)."""
        self._casts: dict[int, str] = {}  # storage address -> owner on the device ledger, this step
        self._dirs: list[Path] = []
        for s, stage_blocks in blocks.items():
            policies = {f"{s}.{j}": ActPolicy(acts[s][j]) if acts else ActPolicy.KEEP for j in range(len(stage_blocks))}
            casts = self._counter(s) if s in self.shared else None
            if count_kept_once and not split_backward and all(p is ActPolicy.KEEP for p in policies.values()):
                self.kept[s] = KeptStage(s, stage_blocks, self.device_ledger, casts)
                continue
            nvme = None
            if ActPolicy.SWAP_NVME in policies.values():
                assert nvme_dir, "checked by PipelineSpec"
                root = Path(nvme_dir) / f"rank{rank}" / f"acts{s}"
                if not Path(nvme_dir).parent.is_dir():  # the configured directory: made by the user on every node
                    raise ValueError(f"nvme_dir: {Path(nvme_dir).parent} is not a directory on this rank's node; "
                                     "create it on a local NVMe disk of every node")
                root.mkdir(parents=True, exist_ok=True)
                self._dirs.append(root)
                nvme = self.nvme[s] = NvmeStore(root, budget_bytes=None).start()
            mgr = ActivationManager(policies=policies, device_ledger=self.device_ledger, host_ledger=self.host_ledger,
                                    nvme=nvme, split_backward=split_backward, shared_casts=casts)
            mgr.wrap_blocks([(f"{s}.{j}", b) for j, b in enumerate(stage_blocks)])
            self.managers[s] = mgr

    def _counter(self, stage: int):
        """[Note: shared weight casts] Count a saved weight cast of ``stage`` once a step (the bytes
        newly counted)."""
        def count(t) -> int:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if not ptr or ptr in self._casts:
                return 0
            owner = self._casts[ptr] = f"cast:{stage}:{len(self._casts)}"
            self.device_ledger.alloc(owner, storage.nbytes())
            return storage.nbytes()
        return count

    def end_casts(self) -> None:
        """[Note: shared weight casts] The step is over (or abandoned): its weight casts are gone."""
        for owner in self._casts.values():
            self.device_ledger.free(owner)
        self._casts = {}

    def policies(self, stage: int) -> list[ActPolicy]:
        if stage in self.kept:
            return [ActPolicy.KEEP] * len(self.kept[stage].names)
        mgr = self.managers[stage]
        return [mgr.policies[f"{stage}.{j}"] for j in range(len(mgr.policies))]

    def set_microbatch(self, stage: int, mb: int) -> None:
        """Before ``stage``'s forward of micro-batch ``mb``: the records it makes are ``mb``'s."""
        self._flush()
        (self.kept.get(stage) or self.managers[stage]).set_microbatch(mb)

    def swap(self, a: Action) -> None:
        """``sSWAP_OUT<i>/b<j>`` or ``sSWAP_IN<i>/b<j>`` of the program (a block not swapped by its
        policy is an error: the program and the policies disagree)."""
        self._flush()
        mgr = self.managers.get(a.stage)
        name = f"{a.stage}.{a.block}"
        if mgr is None or a.block is None or mgr.policies.get(name) not in (ActPolicy.SWAP_HOST, ActPolicy.SWAP_NVME):
            raise RuntimeError(f"{a} in the program, but block {a.block} of stage {a.stage} does not swap its "
                               "activations on this rank")
        (mgr.swap_out if a.op is Op.SWAP_OUT else mgr.swap_in)(a.block, a.microbatch)

    def claim(self, stage: int, mb: int) -> None:
        """``stage``'s backward of ``mb`` starts: its swapped records are made usable (under a
        split backward, its recomputed blocks replayed), top block first."""
        self._flush()
        if stage in self.kept:
            self.kept[stage].claim(mb)
            return
        mgr = self.managers[stage]
        for j in reversed(range(len(mgr.policies))):
            mgr.claim(j, mb)

    def start_window(self) -> None:
        self._flush()
        self.end_casts()
        for k in self.kept.values():
            k.new_step()
        self.device_ledger.start_window()
        self.host_ledger.start_window()

    def abandon(self) -> None:
        """A failed step (runtime.stage_failure), its graphs already dropped: swaps in flight come
        to rest (a record goes with its graph), the kept stages give back what they held."""
        for mgr in self.managers.values():
            mgr.synchronize()
        for k in self.kept.values():
            k.new_step()
        self.end_casts()

    def peak_bytes(self) -> dict[str, int]:
        """The step's peaks: ``activations`` (device) and, with swapped blocks, ``activations_host``."""
        self._flush()
        out = {"activations": self.device_ledger.window_peak_bytes}
        if any(p in (ActPolicy.SWAP_HOST, ActPolicy.SWAP_NVME) for m in self.managers.values()
               for p in m.policies.values()):
            out["activations_host"] = self.host_ledger.window_peak_bytes
        return out

    def close(self) -> None:
        """Wait for swaps in flight, unwrap the blocks, remove the swap files."""
        for mgr in self.managers.values():
            mgr.synchronize()
            mgr.unwrap()
        for k in self.kept.values():
            k.close()
        for store in self.nvme.values():
            store.close()
        for root in self._dirs:
            shutil.rmtree(root, ignore_errors=True)
            if root.parent.is_dir() and not any(root.parent.iterdir()):
                root.parent.rmdir()
        self.managers, self.kept, self.nvme, self._dirs = {}, {}, {}, []

    def _flush(self) -> None:
        """The kept stages' backwards that have run give their bytes back (runtime.stage_keep
        [Note: releases at the next event])."""
        for k in self.kept.values():
            k.flush()

