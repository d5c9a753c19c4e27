"""The offloaded optimizer: AdamW and SGD stepping each chunk where its states live.

A chunk's home (``ChunkPlan.home``) decides where its step runs (ZeRO-Offload, Ren et al. 2021,
Sec. 4: the optimizer step follows the optimizer states):

- device: on the device, over the chunk's flat tensors;
- host: a vectorised CPU step over the flat fp32 master, gradient accumulator and states;
- nvme: streamed — master and states of chunk i+1 are read from disk while chunk i is stepped on
  the host, and chunk i is written back asynchronously (the step overlaps disk I/O).

[Note: early optimizer step] As in ZeRO-Offload (Ren et al. 2021), a chunk's CPU update starts as
soon as its gradients are complete, so the update and its NVMe traffic overlap the rest of the
backward. Here: during the last
micro-batch's backward, the chunk store reports each host- or nvme-home chunk whose gradients
were just added into its accumulator (``ChunkStore.on_grads_final``); ``step_early`` queues its
update on one background thread (one thread: chunks update in the order they complete, the
same kernels on the same buffers, so results are bitwise those of ``step()``). An nvme chunk's
states are read into host staging at that point of the training thread, and the training
thread frees each staging when it waits for its write-back, before staging another chunk once
``staged_chunks`` exist (so host windows begin and end at points of the program, as
docs/memory-accounting.md rules). ``step()`` then steps the chunks not stepped early
(device-home ones, and any chunk whose gradients were not reported) and waits for the rest.
fp16 loss scaling needs every gradient before deciding to skip or unscale, so the engine does not
step early under it.

[Note: where early updates run] On a GPU the updates run on a background thread, overlapping the
device's compute. When the device is the CPU itself its compute and the updates share the same
cores, and a second thread running torch kernels costs more than the overlap gains: measured on
2 cores (torch 2.13, OpenMP backend), a live thread that has run torch kernels, even with one
intra-op thread, slows the training thread's own kernels (a 128x256 @ 256x768 matmul from
0.34 ms to 0.55-0.62 ms) for as long as that thread exists, and the tiny GPT with host-home chunks
(``bench/plan_accuracy.py``'s ``tiny/host-d2``) took 29 ms per step with the update thread against
12-16 ms with the updates on the training thread. So on a CPU device (``inline``) a host chunk's
update runs on the training thread where ``step_early`` is called; an nvme chunk's states read
is started there (on the NVMe store's I/O threads, which run no torch kernels) and its update
runs at the next ``step_early`` call, after the next chunk's read is started, or in ``step()``
(one chunk of lag, so the read overlaps a block's backward), with its write-back then
submitted. On a GPU the thread lives from the step's first early update to the end of ``step()``,
so the training thread's kernels outside that window never share the cores with it.

[Note: states read ahead] The early updates' states reads would all fall in the last backward,
which already carries every write-back, while the disk idles in the compute-bound backwards before
it. So at each backward block's start of the step (after the block's own fetches are queued) the
store calls ``read_ahead``, which starts reading one more nvme chunk's states into host staging,
background priority, while fewer than ``planner.cost.optim_read_ahead_slots(staged_chunks)``
(``staged_chunks`` less ``OPTIM_ROLLING_STAGINGS``) are read ahead and fewer than
``staged_chunks`` are staged in all. The chunks go in the order of their first forward use,
the reverse of the order their gradients complete: the last updates, which nothing is left to
overlap, get their states first, and the first ones still stream with the rolling slots.
``step_early`` then adds only the master. The simulator reads ahead at the same points
(planner.simulate ``_read_ahead``). Measured on the 100m all-NVMe step (12 staged, depth 6, a
scratch A/B of consecutive steps): 2.88 s without, 2.59 s with.

[Note: write-backs across the step end] After the last update the step still had to wait for the
write-backs of the last ``staged_chunks`` chunks, a tail of writes with nothing else on the disk.
``step()`` now waits for the updates only; the write-backs run on into the next step, overlapping
its fetches (the store runs a read after a write of the same key, so any read sees the new file;
a fetch of those chunks copies from the staging instead: [Note: fetch from a write-back]), and
are waited for as [Note: carried write-backs released lazily] says. Anything that reads or
replaces states (``Engine.state_dict``, ``load_state_dict``, ``close``) waits for all of them
first (``flush()``). The simulator's step begins with those writes (the same chunks every step;
planner.simulate ``_carry_in``). The 100m step above: 2.59 s, then 2.45 s with both.

[Note: carried write-backs released lazily] A carried write-back holds its staging until the
training thread waits for it, which it does only when a staging slot is needed (``read_ahead``
and ``step_early`` take the oldest carried write-back's before waiting for this step's own) or
when the chunk's next update is queued (``step_early``, first; ``step()`` before it streams the
chunks that had no early update: a staging left behind then would hold the old parameters, and
the next fetch would copy them). Until then its chunk's fetches,
in the first backward too, copy from that staging. These are points of the program, so the
simulator mirrors them (planner.simulate ``_release_carried``); ``planner.bounds.stream_work_s``,
which cannot tell how long a write-back stays, counts no disk read for those chunks' fetches (a
lower bound). First they were all waited for at the next backward's start, which stalled it
behind writes still running. The 100m all-NVMe step (a scratch A/B of consecutive steps, 12
staged, alternating rounds): depth 3, 2.10 s then 1.97 s (faster in all 5 rounds); depth 6,
2.00 s then 1.89 s (4 of 5).

[Note: fetch from a write-back] The carried write-backs are of the last updates, the chunks the
next forward fetches first, and a read of a file waits for its write (per-key order): the forward
stood behind the writes and then read back bytes still in host memory. So while a write-back is
carried, ``fetch_carried`` (the store's ``fetch_carried`` hook, asked at each nvme fetch) fills the param
buffer from the write-back's staging (``compute`` under mixed precision, else ``master``): a memcpy
on a CPU device, an h2d copy on CUDA. The copy takes no staging of its own, and the write-back
waits for it before freeing its staging. The simulator does the same for fetches of the chunks
of ``planner.cost.carried_write_backs`` not yet released (planner.simulate ``_start``). The 100m all-NVMe step
above (a scratch A/B of consecutive steps, 12 staged, depth 6): 2.62 s without, 2.40 s with,
and 0.39 GB less read per step.

[Note: rewrite window] Rewriting a file holds its old and new copy on disk until the rename, a
window that depends on the disk's timing. For an early update the second copy of the chunk's files
is reserved on the NVMe ledger when the update is queued and freed when the training thread waits
for the write-back (the writes take no reservation of their own), so the ledger's peak is a point
of the program, the one the simulator books (planner.simulate ``_rewrite``), and an upper bound of
what the disk holds.

[Note: master from the param buffer] Without mixed precision the param buffer an nvme chunk was
fetched into for the backward holds exactly its fp32 master (read from the ``master`` file, never
written since). When the chunk's gradients are complete the store hands that buffer to
``step_early`` before releasing it, so the update reads only the states from disk: one read of
``4·N`` bytes less per chunk and step (the 100m all-NVMe step: 0.36 GB of 4.1 GB). On a CPU
device the buffer itself becomes the master's staging (zero-copy: the device ledger frees it as the
host ledger takes it, as the simulator books it); on CUDA it is copied into host staging first.

The update rules are torch's own functional kernels (``torch.optim.adam.adam`` with decoupled
weight decay, i.e. AdamW; and the same arithmetic as ``torch.optim.sgd``'s single-tensor path),
applied to flat buffers. Elementwise arithmetic on a flat buffer is the arithmetic on each
parameter, so results equal ``torch.optim.AdamW``/``SGD`` on the model's parameters bitwise with
the ``single``/``foreach`` kernels; the ``fused`` CPU kernel orders the AdamW arithmetic
differently (measured: max |Δparam| ≈ 1.2e-7 after 5 steps, see ``measure_host_adamw``).

[Note: host kernel choice] On a 64M-element flat chunk, 2 shared CPU cores, torch 2.13:
single-tensor 0.213 s, foreach 0.154 s, fused 0.032 s (``measure_host_adamw``). The fused kernel
is ~5x faster and within one ulp per step, so host and NVMe chunks default to it; pass
``host_kernel="foreach"`` for bitwise equality with ``torch.optim.AdamW``. Device chunks use
what torch uses by default on that device (single-tensor on CPU, foreach on CUDA), so the
all-on-device case is bitwise equal to plain PyTorch.

[Note: unscaling in fp32] fp16 loss scaling divides the gradients by the scale before the
update. Unscaled in fp16, any gradient below fp16's smallest subnormal (about 6e-8) times the
scale would become 0 and those below 6e-5 times it would lose precision (torch's GradScaler
refuses to unscale fp16 gradients for that reason). ``step(inv_scale)`` multiplies each chunk's
gradient in ``_update``, in its fp32 accumulator (every tier's, offload.grads [Note: fp32
accumulators]).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.optim.adam import adam as _torch_adam

from memtrain.offload.staging import Deferred, Staged, WriteBack, read_ahead_states, read_states, reserve_rewrite, write_states
from memtrain.planner.cost import optim_read_ahead_slots, read_ahead_order
from memtrain.planner.plan import Tier

if TYPE_CHECKING:
    from memtrain.offload.chunks import Chunk, ChunkStore
    from memtrain.offload.tiers import CopyHandle

__all__ = [
    "OptimizerSpec", "STATE_NAMES", "HOST_KERNELS", "DEFAULT_HOST_KERNEL", "adamw_step", "host_adamw_step",
    "sgd_step", "measure_host_adamw", "OffloadedOptimizer",
]

STATE_NAMES: dict[str, tuple[str, ...]] = {"adamw": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}
"""Per optimizer, its fp32 state tensors per element (torch's state names, so state dicts load
into ``torch.optim.AdamW``/``SGD``)."""
HOST_KERNELS = ("single", "foreach", "fused")
DEFAULT_HOST_KERNEL = "fused"
"""See [Note: host kernel choice]."""


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizerSpec:
    """Hyper-parameters; defaults are torch's, so ``{"name": "adamw", "lr": 3e-4}`` means what
    ``torch.optim.AdamW(params, lr=3e-4)`` means."""

    name: str = "adamw"
    """``adamw`` or ``sgd``."""
    lr: float = 1e-3
    """Learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW coefficients of the running averages of the gradient and its square."""
    eps: float = 1e-8
    """AdamW term added to the denominator."""
    weight_decay: float | None = None
    """AdamW: decoupled decay (Loshchilov & Hutter 2019), default 0.01; SGD: L2 added to the
    gradient, default 0."""
    momentum: float = 0.0
    """SGD momentum (0 = plain SGD, no state)."""
    dampening: float = 0.0
    """SGD dampening of the gradient added to the momentum buffer."""
    nesterov: bool = False
    """SGD Nesterov momentum."""

    def __post_init__(self) -> None:
        if self.name not in STATE_NAMES:
            raise ValueError(f"optimizer.name: must be 'adamw' or 'sgd', got {self.name!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"optimizer.lr: must be a number > 0, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimizer.betas: two numbers in [0, 1), got {self.betas!r}")
        if not self.eps >= 0:
            raise ValueError(f"optimizer.eps: must be >= 0, got {self.eps!r}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay: must be >= 0, got {self.weight_decay!r}")
        if self.momentum < 0:
            raise ValueError(f"optimizer.momentum: must be >= 0, got {self.momentum!r}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("optimizer.nesterov: needs momentum > 0 and dampening 0")

    @property
    def decay(self) -> float:
        if self.weight_decay is not None:
            return float(self.weight_decay)
        return 0.01 if self.name == "adamw" else 0.0

    @property
    def state_names(self) -> tuple[str, ...]:
        if self.name == "sgd" and self.momentum == 0:
            return ()
        return STATE_NAMES[self.name]

    @staticmethod
    def from_value(value: "OptimizerSpec | Mapping[str, Any] | str") -> "OptimizerSpec":
        """From a spec, a dict (``{"name": "adamw", "lr": 3e-4}``) or a name."""
        if isinstance(value, OptimizerSpec):
            return value
        if isinstance(value, str):
            return OptimizerSpec(name=value)
        if not isinstance(value, Mapping):
            raise ValueError(f"optimizer: expected a dict such as {{'name': 'adamw', 'lr': 3e-4}}, got {value!r}")
        known = set(OptimizerSpec.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"optimizer.{unknown[0]}: unknown field; known: {', '.join(sorted(known))}")
        kw = dict(value)
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return OptimizerSpec(**kw)

    def torch_group(self) -> dict[str, Any]:
        """The hyper-parameters as a ``torch.optim`` param group (without ``params``)."""
        if self.name == "adamw":
            return dict(lr=self.lr, betas=tuple(self.betas), eps=self.eps, weight_decay=self.decay, amsgrad=False,
                        foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                        decoupled_weight_decay=True)
        return dict(lr=self.lr, momentum=self.momentum, dampening=self.dampening, weight_decay=self.decay,
                    nesterov=self.nesterov, maximize=False, foreach=None, differentiable=False, fused=None)


# --- kernels over flat tensors -----------------------------------------------------------


def adamw_step(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: torch.Tensor,
    *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, kernel: str = "single",
) -> None:
    """One AdamW update of flat fp32 tensors in place; ``step`` (a 0-d float tensor) is incremented.

    Loshchilov & Hutter 2019, Algorithm 2 (AdamW), computed by torch's own kernels so the
    result is ``torch.optim.AdamW``'s.
    """
    if kernel not in HOST_KERNELS:
        raise ValueError(f"kernel: must be one of {', '.join(HOST_KERNELS)}, got {kernel!r}")
    _torch_adam(
        [param], [grad], [exp_avg], [exp_avg_sq], [], [step], foreach=kernel == "foreach", fused=kernel == "fused",
        capturable=False, differentiable=False, grad_scale=None, found_inf=None, decoupled_weight_decay=True,
        amsgrad=False, beta1=betas[0], beta2=betas[1], lr=lr, weight_decay=weight_decay, eps=eps, maximize=False,
    )


def host_adamw_step(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: torch.Tensor,
    *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, kernel: str = DEFAULT_HOST_KERNEL,
) -> None:
    """The host-chunk AdamW step (the one ``planner.profile`` times for ``cpu_adam_params_per_s``)."""
    adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, kernel=kernel)


def sgd_step(
    param: torch.Tensor, grad: torch.Tensor, momentum_buffer: torch.Tensor | None, *, first: bool, lr: float,
    momentum: float, dampening: float, weight_decay: float, nesterov: bool,
) -> None:
    """One SGD update in place, the arithmetic of ``torch.optim.sgd._single_tensor_sgd``.

    Sutskever et al. 2013 momentum as torch writes it: ``b = μb + (1-τ)g`` (``b = g`` on the
    first step), ``p -= lr·b`` (or ``lr·(g + μb)`` with Nesterov); L2 decay adds ``λp`` to g.
    """
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    if momentum != 0:
        assert momentum_buffer is not None
        if first:
            momentum_buffer.copy_(grad)
        else:
            momentum_buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
        grad = grad.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    param.add_(grad, alpha=-lr)


@dataclass(frozen=True, kw_only=True, slots=True)
class KernelTiming:
    kernel: str
    """``single``, ``foreach`` or ``fused``."""
    step_s: float
    """Best of the timed steps."""
    params_per_s: float
    """Elements updated per second."""
    max_abs_diff: float
    """Largest |Δ| of the updated parameters against the single-tensor kernel (torch's CPU default)."""


def measure_host_adamw(num_elems: int = 64 * 2**20, reps: int = 3) -> list[KernelTiming]:
    """Time the AdamW kernels on one flat fp32 chunk of ``num_elems`` on the CPU.

    The profiler calls this to pick (and report) the host kernel; see [Note: host kernel choice].
    """
    if num_elems < 1 or reps < 1:
        raise ValueError(f"num_elems and reps must be >= 1, got {num_elems}, {reps}")
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(num_elems, generator=gen)
    g = torch.randn(num_elems, generator=gen)
    out: list[KernelTiming] = []
    reference: torch.Tensor | None = None
    for kernel in HOST_KERNELS:
        p, m, v, step = p0.clone(), torch.zeros(num_elems), torch.zeros(num_elems), torch.tensor(0.0)
        hp = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, kernel=kernel)
        adamw_step(p, g, m, v, step, **hp)  # warm-up; also the step compared below
        first = p.clone()
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            adamw_step(p, g, m, v, step, **hp)
            best = min(best, time.perf_counter() - t0)
        if reference is None:
            reference = first
        diff = (first - reference).abs().max().item()
        out.append(KernelTiming(kernel=kernel, step_s=best, params_per_s=num_elems / best, max_abs_diff=diff))
    return out


# --- nvme streaming and per-parameter state (over a ChunkStore's chunks) --------------------


def _gather_states(store: "ChunkStore") -> dict[str, dict[str, torch.Tensor]]:
    """Optimizer state per parameter name, in torch's per-parameter format."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    adam = store.state_names == STATE_NAMES["adamw"]
    for c in store.chunks:
        if c.step.item() == 0 or not store.state_names:
            continue
        flats = {k: store._read(c, k) for k in store.state_names}
        for s in c.slots:
            entry = {k: f[s.offset:s.offset + s.numel].view(s.shape).clone() for k, f in flats.items()}
            if adam:
                entry["step"] = c.step.clone()
            out[s.name] = entry
    return out


def _load_states(store: "ChunkStore", states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    for c in store.chunks:
        present = [s.name for s in c.slots if s.name in states]
        if not present:
            continue
        if len(present) != len(c.slots):
            raise ValueError(f"optimizer state: {c.slots[0].name!r} and the parameters chunked with it must all have state or none")
        steps = {float(states[s.name].get("step", torch.tensor(1.0))) for s in c.slots}
        if len(steps) != 1:
            raise ValueError(f"optimizer state: parameters of chunk {c.index} have different step counts {sorted(steps)}")
        for k in store.state_names:
            flat = torch.empty(c.num_elems, dtype=torch.float32)
            for s in c.slots:
                flat[s.offset:s.offset + s.numel].copy_(states[s.name][k].reshape(-1))
            store._write(c, k, flat)
        c.step.fill_(steps.pop())


# --- the optimizer over a ChunkStore -----------------------------------------------------


class OffloadedOptimizer:
    """Steps every chunk of a ``ChunkStore`` where its states live (see the module doc)."""

    def __init__(self, store: "ChunkStore", spec: OptimizerSpec, *, host_kernel: str = DEFAULT_HOST_KERNEL,
                 staged_chunks: int = 3) -> None:
        if host_kernel not in HOST_KERNELS:
            raise ValueError(f"host_kernel: must be one of {', '.join(HOST_KERNELS)}, got {host_kernel!r}")
        if tuple(store.state_names) != spec.state_names:
            raise ValueError(
                f"optimizer.name: the chunk store holds states {store.state_names} but the optimizer "
                f"{spec.name!r} needs {spec.state_names}; build both with the same optimizer"
            )
        self.store = store
        self.spec = spec
        self.host_kernel = host_kernel
        # torch's default kernel on the device (see [Note: host kernel choice]).
        self.device_kernel = "foreach" if store.device.type == "cuda" else "single"
        self.num_steps = 0
        """Optimizer steps taken (skipped fp16 overflow steps not counted)."""
        if staged_chunks < 1:
            raise ValueError(f"staged_chunks: must be >= 1, got {staged_chunks}")
        self.staged_chunks = staged_chunks
        """Most nvme chunks staged at once by early steps ([Note: early optimizer step])."""
        self.inline = store.device.type == "cpu"
        """Early updates run on the training thread ([Note: where early updates run])."""
        self._worker: ThreadPoolExecutor | None = None
        self._early: dict[int, Future | Deferred] = {}  # chunk index -> its queued update
        self._writing: list[Future | Deferred] = []  # nvme early steps (-> WriteBack) whose staging is held
        self._ahead: dict[int, Staged] = {}  # chunk index -> its states read ahead ([Note: states read ahead])
        self.read_ahead_slots = optim_read_ahead_slots(staged_chunks)
        """[Note: states read ahead]."""
        self._inv_scale = 1.0  # set by step() for its duration ([Note: unscaling in fp32])
        nvme = [c.index for c in store.chunks if c.home is Tier.NVME]
        self._ahead_order = [store.chunks[i] for i in read_ahead_order(store.uses, nvme)] if self.read_ahead_slots else []
        self._behind: list[WriteBack] = []  # write-backs carried over the step end

    @property
    def num_early(self) -> int:
        """Chunks queued by ``step_early`` since the last ``step()``."""
        return len(self._early)

    def step_early(self, chunk: "Chunk", master: torch.Tensor | None = None) -> None:
        """Queue ``chunk``'s update now: its gradients for this step are complete ([Note: early
        optimizer step]). Device-home chunks are left to ``step()``. ``master``: an nvme chunk's
        fp32 parameters still in its param buffer ([Note: master from the param buffer])."""
        if chunk.home is Tier.DEVICE or chunk.index in self._early or not chunk.has_grad:
            return
        if self.inline and chunk.home is Tier.HOST:
            self._early[chunk.index] = update = Deferred(self._step_resident, chunk)
            update.result()
            return
        if self._worker is None and not self.inline:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="memtrain-optim")
        if chunk.home is Tier.HOST:
            self._early[chunk.index] = self._worker.submit(self._step_resident, chunk)
            return
        self._release_carried(chunk.index)  # [Note: carried write-backs released lazily]
        ahead = self._ahead.pop(chunk.index, None)
        if ahead is None:  # bounded staging: the oldest write-backs are waited for (their staging freed) first
            while (self._behind or self._writing) and self._num_staged() >= self.staged_chunks:
                if not self._release_carried():
                    self._writing.pop(0).result().wait()
        staged = read_states(self.store, chunk, master, staged=ahead)
        rewrite = None if self.store.nvme.compress else reserve_rewrite(self.store, chunk, staged.tensors)
        if self.inline:  # the updates queued before this one run now, this chunk's read under way
            for earlier in self._writing:
                if earlier.pending:
                    earlier.result()
            update: Future | Deferred = Deferred(self._step_staged, chunk, staged, rewrite)
        else:
            update = self._worker.submit(self._step_staged, chunk, staged, rewrite)
        self._early[chunk.index] = update
        self._writing.append(update)

    def read_ahead(self) -> None:
        """[Note: states read ahead] Start reading the next chunk's states, if a slot is free
        (carried write-backs give theirs up: [Note: carried write-backs released lazily])."""
        if len(self._ahead) >= self.read_ahead_slots:
            return
        c = next((c for c in self._ahead_order if c.index not in self._ahead and c.index not in self._early), None)
        if c is None:
            return
        while self._num_staged() >= self.staged_chunks and self._release_carried():
            pass
        if self._num_staged() < self.staged_chunks:
            self._ahead[c.index] = read_ahead_states(self.store, c)

    def _num_staged(self) -> int:
        """Nvme chunks holding host staging: read ahead, being updated or written back, carried."""
        return len(self._ahead) + len(self._writing) + len(self._behind)

    def _release_carried(self, index: int | None = None) -> bool:
        """[Note: carried write-backs released lazily] Wait for chunk ``index``'s carried
        write-back (None: the oldest), freeing its staging; False when there is none."""
        for pos, w in enumerate(self._behind):
            if index is None or w.index == index:
                del self._behind[pos]
                w.wait()
                return True
        return False

    def _drop_ahead(self) -> None:
        """Free the staging of states read ahead but not used (chunks that got no gradient)."""
        for i, staged in self._ahead.items():
            staged.wait()
            staged.free(self.store, i)
        self._ahead.clear()

    def _step_resident(self, chunk: "Chunk") -> None:
        self._update(chunk, chunk.master, chunk.grad, chunk.states)
        self.store.refresh_compute(chunk)

    def _step_staged(self, chunk: "Chunk", staged: Staged, rewrite: str | None = None) -> WriteBack:
        tensors = staged.wait()
        self._update(chunk, tensors["master"], chunk.grad, tensors)
        if "compute" in tensors:
            tensors["compute"].copy_(tensors["master"])
        return write_states(self.store, chunk, staged, rewrite)

    def _wait_early(self, *, carry: bool = False) -> None:
        """Wait for every queued update and write-back (errors surface here), in queue order.
        ``carry``: the write-backs are left running ([Note: write-backs across the step end])."""
        try:
            for fut in self._early.values():
                fut.result()
            if carry:
                self._behind.extend(w.result() for w in self._writing)
                self._writing.clear()
            while self._writing:
                self._writing.pop(0).result().wait()
        finally:
            self._early.clear()
            self._writing.clear()
            if self._worker is not None:  # [Note: where early updates run] one thread per step
                self._worker.shutdown(wait=True)
                self._worker = None

    @property
    def carried_chunks(self) -> list[int]:
        """Chunks whose write-backs the last step left running ([Note: write-backs across the
        step end]), in the order they were queued."""
        return [w.index for w in self._behind]

    def fetch_carried(self, chunk: "Chunk", dst: torch.Tensor) -> "CopyHandle | None":
        """[Note: fetch from a write-back] Copy ``chunk``'s params into ``dst`` from the staging of
        its carried write-back; None when it has none."""
        for w in self._behind:
            if w.index == chunk.index:
                handle = self.store._copy(dst, w.staged.tensors["compute" if self.store.mixed else "master"])
                w.readers.append(handle.detached())  # the fetch owns dst; the write-back only waits
                return handle
        return None

    def flush(self) -> None:
        """Wait for the write-backs carried over from the last step ([Note: write-backs across
        the step end]); their host staging goes."""
        while self._behind:
            self._behind.pop(0).wait()

    def close(self) -> None:
        """Wait for queued work and stop the background thread."""
        try:
            self._wait_early()  # shuts the thread down too
        finally:
            try:
                self.flush()
            finally:
                self._drop_ahead()

    def _update(self, chunk: "Chunk", master: torch.Tensor, grad: torch.Tensor, states: dict[str, torch.Tensor]) -> None:
        spec = self.spec
        kernel = self.device_kernel if chunk.home is Tier.DEVICE else self.host_kernel
        self.store.grads.wait(chunk)  # offload.grads [Note: asynchronous gradient flush]
        assert grad.dtype == master.dtype == torch.float32, (grad.dtype, master.dtype)  # offload.grads [Note: fp32 accumulators]
        if self._inv_scale != 1.0:  # [Note: unscaling in fp32]
            grad.mul_(self._inv_scale)
        if spec.name == "adamw":
            adamw_step(master, grad, states["exp_avg"], states["exp_avg_sq"], chunk.step, lr=spec.lr,
                       betas=spec.betas, eps=spec.eps, weight_decay=spec.decay, kernel=kernel)
        else:
            sgd_step(master, grad, states.get("momentum_buffer"), first=int(chunk.step.item()) == 0, lr=spec.lr,
                     momentum=spec.momentum, dampening=spec.dampening, weight_decay=spec.decay, nesterov=spec.nesterov)
            chunk.step += 1

    def step(self, inv_scale: float = 1.0) -> None:
        """Update every chunk that received gradients this step, then clear the gradients.

        ``inv_scale``: fp16 loss scaling's 1 / scale, applied to each gradient in the master
        dtype ([Note: unscaling in fp32]); no update may have run early then."""
        store = self.store
        store.grads.finish()
        if inv_scale != 1.0 and self._early:
            raise RuntimeError("OffloadedOptimizer.step: early updates ran on scaled gradients")
        self._inv_scale = inv_scale
        try:
            self._step_all(store)
        finally:
            self._inv_scale = 1.0

    def _step_all(self, store: "ChunkStore") -> None:
        early = self._early
        rest = [c for c in store.chunks if c.has_grad and c.index not in early]
        try:
            for chunk in rest:  # overlaps the early updates still running on the background thread
                if chunk.home is not Tier.NVME:
                    self._step_resident(chunk)
        finally:
            self._wait_early(carry=True)
        nvme = [c for c in rest if c.home is Tier.NVME]
        for chunk in nvme:  # [Note: carried write-backs released lazily]: a carried staging
            self._release_carried(chunk.index)  # would go stale when this step updates its chunk
        try:
            self._step_nvme(nvme)
        finally:
            self._drop_ahead()
        self.num_steps += 1
        store.grads.zero()

    def _step_nvme(self, chunks: list["Chunk"]) -> None:
        """Stream NVMe chunks: read i+1 while stepping i; write i back while stepping i+1."""
        store = self.store
        writing: list = []  # (chunk, staging, futures) whose write-back is in flight
        def read(c: "Chunk") -> Staged:
            return read_states(store, c, staged=self._ahead.pop(c.index, None))

        pending = read(chunks[0]) if chunks else None
        for pos, chunk in enumerate(chunks):
            staged = pending
            pending = read(chunks[pos + 1]) if pos + 1 < len(chunks) else None
            tensors = staged.wait()
            self._update(chunk, tensors["master"], chunk.grad, tensors)
            if "compute" in tensors:
                tensors["compute"].copy_(tensors["master"])
            writing.append(write_states(store, chunk, staged))
            # Keep at most one write-back in flight besides the one just queued (bounded staging).
            while len(writing) > 1:
                writing.pop(0).wait()
        for w in writing:
            w.wait()

    # --- state dict ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.AdamW``/``SGD``'s format over ``store.param_order()`` (loads into them)."""
        self.flush()
        state: dict[int, dict[str, torch.Tensor]] = {}
        names = self.store.param_order()
        per_param = _gather_states(self.store)
        for idx, name in enumerate(names):
            entry = per_param.get(name)
            if entry is not None:
                state[idx] = entry
        group = dict(self.spec.torch_group(), params=list(range(len(names))))
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.flush()
        names = self.store.param_order()
        groups = sd.get("param_groups") or []
        if len(groups) != 1 or len(groups[0].get("params", ())) != len(names):
            raise ValueError(
                f"optimizer state: expected one param group over {len(names)} parameters "
                "(the format engine.state_dict() writes); got a different layout"
            )
        _load_states(self.store, {names[int(i)]: s for i, s in sd.get("state", {}).items()})
