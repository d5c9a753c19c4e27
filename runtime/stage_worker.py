"""One pipeline rank: its stages of the model, run by interpreting its action list.

A ``StageWorker`` (made a Ray actor by ``runtime.pipeline_driver``; plain Python here so it can
be tested and read without Ray) holds the stages its rank runs, contiguous ranges of the model's
blocks (the first stage owns the embedding, the last the head and the loss), and runs each step
by walking its rank's program through one op → handler table; an op without a handler fails
loudly, and the actions run are recorded (``StepResult.record``), which must equal the program.

Numerics follow one process with the same global batch (docs/DESIGN.md rule 8): the loss of each
micro-batch is divided by the number of micro-batches in the global batch before its backward,
gradients accumulate over the micro-batches in their order, data-parallel replicas sum theirs,
and each stage steps its own ``torch.optim`` optimizer of the run's kind and hyper-parameters
(``PipelineSpec.optimizer``), at the step's learning rate the driver passes. Dropout draws what
one process draws: each forward starts from the generator state one process had at that block
of that micro-batch, found by replaying the step's draws in one process's order
(runtime.stage_rng), so the parity holds with dropout too. A stage may instead keep its
model states in host-memory chunks or NVMe files between steps and step them with memtrain's
offloaded optimizer (``PipelineSpec.offload``, runtime.stage_offload [Note: a stage's step]: the
program's ``PREFETCH`` and ``OFFLOAD`` move them), and with ``PipelineSpec.zero`` 1 each replica
keeps the optimizer states of a shard of each stage only (runtime.stage_zero, ZeRO-1); with 2 the
gradients too, reduce-scattered under the last micro-batch's backward from the program's
``REDUCE_SCATTER`` on (runtime.stage_zero [Note: ZeRO-2 in a pipeline]). Each block keeps,
recomputes or swaps its saved activations as ``PipelineSpec.activations`` says
(runtime.stage_activations; a recompute replays its forward's random draws, so bitwise keep's).
With ``PipelineSpec.max_grad_norm`` the program's ``CLIP`` clips every gradient by the global
norm all ranks agree on (runtime.stage_clip); ``optimizer.param_groups`` name the whole model's
parameters, and each stage's optimizer steps the groups it holds (runtime.stage_groups). A
step that fails half-way gives back what it held and leaves the worker refusing further steps
(runtime.stage_failure [Note: a failed step poisons the worker]).

[Note: same initial weights] Every worker builds only its stages' blocks, on the meta device and
then materialised by replaying the run's seeded random stream (``models.gpt_blocks``), so each
parameter has the single-process value bit for bit while a worker holds its blocks plus, at
start-up, the largest single module of the others.

[Note: devices of a worker] A worker computes on the GPU Ray gave its actor (the bundle's ``GPU``
resource: Ray sets ``CUDA_VISIBLE_DEVICES``), else on the CPU, even where torch sees the node's
GPUs (runtime.stage_device); ``StepResult.device`` says which,
so a run whose plan assumed GPUs that torch cannot see says so. Transfers and collectives go
through gloo in host memory (a tensor on the GPU is copied out before a send and in after a
receive); NCCL between GPUs is not used yet.

[Note: one weight cast a step] Under bf16 a stage's forward of a micro-batch runs in its own
``torch.autocast`` region, which casts each matmul's fp32 weight to bf16 and caches the cast,
per parameter, until the outermost region ends; the graph saves the cast for the backward. So
that a stage's micro-batches in flight share one copy of each weight rather than each holding
its own, ``run_step`` holds autocast's nesting count (``torch.autocast_increment_nesting``, not
an enabled region: the backward and the rest of the program still run outside autocast) from
before the program to just after the rank's last ``F``, then lets it go, which clears the cache
(``_release_casts``; a failed step's ``abandon_step`` too): the casts are made at each stage's
first forward of the step and live until the later of that point and the stage's last backward.
The cache is keyed by the parameter tensor and never re-checks its values or storage, so a
weight must not change between its first forward and the release: nothing in a step changes one
before its ``OPTIM`` (ZeRO's shard copy-back, an offloaded stage's updated chunk, a checkpoint
load all come after the rank's last ``F`` or between steps), and an offloaded stage points its
parameters into their buffers (runtime.stage_offload ``ensure``) before its first forward and
keeps them there until its ``OFFLOAD``; a program with an ``OPTIM`` or ``OFFLOAD`` before its last
``F`` shares no cast. The cast of an unchanged weight is the same bits, so losses and gradients
are bitwise those of a cast per micro-batch; the cast's backward node (``ToCopyBackward0``, which
saves nothing) is then common to the micro-batches' graphs, whole or split
(runtime.stage_split). Only stages whose blocks all keep their activations share: a recomputed
block's forward would hold the casts it no longer saves, and a swapped block's would stay on the
device however swapped, so theirs run with ``cache_enabled=False`` (a cast per use, the built-in
GPT using each weight once a forward), as before; a CUDA recompute runs in autograd's device
thread, whose cache is its own, anyway. The rank counts each shared cast once
(runtime.stage_activations [Note: shared weight casts]); the planner charges it once a stage
(planner.stage_cost [Note: a bf16 stage's activations]).

[Note: B and W] Where the schedule splits the backward, ``F`` keeps the gradient edge of every
module that owns parameters (a forward hook; ``get_gradient_edge``: the graph node of its
output, not the tensor, whose memory would otherwise stay from ``F`` to ``W`` beside what the
activation policy holds); ``B`` walks the graph from the stage's output to its input and to
those edges (``torch.autograd.grad``, the graph retained), so it computes the input's gradient
and the gradient reaching each such module, but no weight gradient; ``W`` walks from each
module's edge to that module's own parameters only (so no gradient is counted twice
where one kept output feeds another), accumulating them in micro-batch order. Each node computes
the same values as in a whole backward, from the same incoming gradient. It assumes a parameter
is used by the modules that own it (true of the built-in GPT's blocks); where two modules of one
stage own it (the tied table of a stage holding the embedding and the head), the later one's
walk is cut at its own use and the two uses' gradients are summed before they reach ``.grad``
(runtime.stage_split, which does both walks: [Note: a parameter two modules of one graph use]).
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from memtrain.comm import Channel, Rendezvous, host_store, join, leave, subgroups
from memtrain.optimizers import Optimizer
from memtrain.models.gpt import causal_lm_loss, gpt_config
from memtrain.models.gpt_blocks import TIED_NAMES, build_blocks, global_names, param_names
from memtrain.planner.pipeline import receive_posts
from memtrain.planner.plan import Action, Op
from memtrain.runtime.data import TokenBatches
from memtrain.runtime.stage_activations import RankActivations
from memtrain.runtime.stage_device import pin_to_core, worker_device
from memtrain.runtime.stage_failure import abandon_step, check_usable
from memtrain.runtime.stage_groups import group_lr, stage_groups, step_lr
from memtrain.runtime.stage_offload import OffloadedStage, build_offloaded, close_offloaded, state_bytes
from memtrain.runtime.stage_rng import StageRng, get_state, offset_steps, set_state, trace_gpt
from memtrain.runtime.stage_state import load_rank_state, rank_state
from memtrain.runtime.stage_spec import PIPELINE_DTYPES, PipelineSpec, StepResult, block_ranges
from memtrain.runtime.stage_split import Kept, input_grads, keep, weight_grads
from memtrain.runtime.stage_step_end import StageStepEnd, grad_report
from memtrain.runtime.stage_zero import ShardedOptimizer, zero2_buckets

__all__ = ["PipelineSpec", "StageWorker", "StepResult", "block_ranges", "PIPELINE_DTYPES"]


class StageWorker(StageStepEnd):
    """One world rank: its pipeline rank's stages of one data-parallel replica (the step end's
    handlers, ``ALLREDUCE`` to ``OPTIM``, in runtime.stage_step_end)."""

    def __init__(self, spec: PipelineSpec, rank: int, program: tuple[Action, ...],
                 releases: Mapping[int, Sequence[int]] | None = None) -> None:
        self.spec = spec
        self.rank = rank
        self.pipe_rank = rank % spec.num_ranks
        self.replica = rank // spec.num_ranks
        self.program = program
        self.stages = tuple(s for s, r in enumerate(spec.rank_of) if r == self.pipe_rank)
        self.split_w = any(a.op is Op.W for a in program)
        self._store = None
        self.handlers: dict[Op, Callable[[Action], None]] = {
            Op.F: self._forward, Op.B: self._backward, Op.W: self._weights,
            Op.SEND_F: self._send_f, Op.RECV_F: self._recv_f, Op.SEND_B: self._send_b, Op.RECV_B: self._recv_b,
            Op.ALLREDUCE: self._all_reduce, Op.OPTIM: self._optim, Op.REDUCE_SCATTER: self._reduce_scatter,
            Op.CLIP: self._clip,  # runtime.stage_clip [Note: the global norm of a pipeline]
            Op.PREFETCH: lambda a: self._offloaded(a).prefetch(),  # runtime.stage_offload [Note: a stage's step]
            Op.OFFLOAD: lambda a: self._offloaded(a).offload(),
            Op.SWAP_OUT: lambda a: self.acts.swap(a), Op.SWAP_IN: lambda a: self.acts.swap(a),  # stage_activations
        }
        self.offloaded: dict[int, OffloadedStage] = {}
        """The stages whose states live in a chunk store (runtime.stage_offload)."""
        self._lr: float | tuple[float, ...] | None = None
        """The step's learning rate for every group; None: each group's own (runtime.stage_groups)."""
        self._grad_norm: float | None = None
        self._source: TokenBatches | None = None
        """The step's global batches (``_load_batch``), made at the first step; a Parquet or Arrow
        source holds its column in memory from then on (the first and last stages' ranks)."""
        self._step_end: float | None = None
        """When the previous step ended (``StepResult.between_s``)."""
        self.core: int | None = None
        """The core this worker is bound to (``PipelineSpec.pin_cores``)."""
        self._posts = receive_posts(program)
        """comm.p2p [Note: receives posted early]: before action ``k``, the receives to post."""
        self._releases = dict(releases or {})
        """After the receive at ``k``, the positions of the sends it proves over
        (planner.pipeline_sends [Note: a send known to be over]); none given: every send is
        waited for at the step's end."""
        self.failed_step: str | None = None
        """Why this worker is poisoned (runtime.stage_failure [Note: a failed step poisons the worker])."""
        self._casts_until = _casts_until(program) if spec.dtype == "bf16" else None
        """[Note: one weight cast a step] The program's position after which the step's weight
        casts go (its last ``F``); None: none are shared."""
        self._casts_held = False

    # ---- start-up --------------------------------------------------------------------------

    def open_store(self, host: str | None = None) -> tuple[str, int]:
        """Rank 0: host the world's TCP store on ``host`` (default: this node's address as Ray
        knows it); returns its (host, port) for the others."""
        assert self.rank == 0, "rank 0 hosts the store"
        host = host or _node_ip()
        self._store = host_store(host, self.spec.world_size, self.spec.timeout_s)
        return host, self._store.port

    def build(self, host: str, port: int) -> None:
        """Join the world, make the groups, build this rank's stages and their optimizers."""
        spec = self.spec
        torch.set_num_threads(spec.num_threads)
        # [Note: devices of a worker] the GPU Ray gave the actor (CUDA_VISIBLE_DEVICES), else the CPU
        self.device = worker_device()
        if spec.pin_cores and self.device.type == "cpu" and spec.num_threads == 1:  # stage_device [Note: a worker per core]
            self.core = pin_to_core(self.rank)
        join(self.rank, Rendezvous(host=host, port=port, world_size=spec.world_size, timeout_s=spec.timeout_s),
             self._store)
        try:
            self._build_after_join()
        except BaseException:
            self.close()  # a stage that cannot be built leaves the world it joined
            raise

    def _build_after_join(self) -> None:
        spec = self.spec
        self.channel = Channel(self.rank, timeout_s=spec.timeout_s, fixed_shapes=True)  # comm [Note: fixed shapes]
        p, last = spec.num_ranks, spec.num_stages - 1
        # every rank makes every group in the same order (creating a group is collective)
        dp_lists = [[d * p + r for d in range(spec.dp)] for r in range(p)]
        ends = (spec.rank_of[0], spec.rank_of[last])
        tie_lists = [[d * p + ends[0], d * p + ends[1]] for d in range(spec.dp)] if ends[0] != ends[1] else []
        groups = subgroups(dp_lists + tie_lists, spec.timeout_s)
        self.dp_group = groups.get(tuple(dp_lists[self.pipe_rank]))
        self.tie_group = next((g for k, g in groups.items() if k in map(tuple, tie_lists)), None)
        self._build_stages()
        self._new_step_state()
        # torch's first backward imports this (0.5 s measured), as a torch.optim optimizer's
        # construction does: at build, so a rank with only offloaded stages times its first step
        # like the others
        try:
            importlib.import_module("torch.fx.experimental.symbolic_shapes")
        except ImportError:  # pragma: no cover (a torch without it)
            pass

    def _build_stages(self) -> None:
        """[Note: same initial weights]"""
        spec = self.spec
        gcfg = gpt_config(spec.model.preset, **spec.model.overrides)
        num_blocks = gcfg.num_layers + 2
        if sum(spec.partition) != num_blocks:
            raise ValueError(f"partition: {sum(spec.partition)} blocks in all, the model has {num_blocks}")
        ranges = block_ranges(spec.partition)
        last = spec.num_stages - 1
        blocks = build_blocks(gcfg, {i for s in self.stages for i in ranges[s]}, spec.seed)
        rng_start = get_state(self.device)  # one process's, after its model's initialisation
        # runtime.stage_rng: each forward's generator state is one process's there
        draws = trace_gpt(gcfg, spec.micro_batch_size, spec.seq_len, self.device, bf16=spec.dtype == "bf16")
        self.rng = StageRng(draws, {s: ranges[s] for s in self.stages}, replica=self.replica, dp=spec.dp,
                            num_microbatches=spec.num_microbatches, device=self.device,
                            steps=offset_steps(draws, self.device))
        for block in blocks.values():
            block.to(self.device)  # in place: a table tied across two kept blocks stays one
        self.loss_fn = causal_lm_loss
        self.vocab_size = gcfg.vocab_size
        self.blocks: dict[int, list[nn.Module]] = {s: [blocks[i] for i in ranges[s]] for s in self.stages}
        # every parameter a stage's blocks use (its W's targets), and those it owns (its
        # optimizer's and all-reduce's): a parameter two stages of this rank share is the first's
        self.uses: dict[int, list[nn.Parameter]] = {}
        self.owns: dict[int, list[nn.Parameter]] = {}
        seen: set[int] = set()
        for s in self.stages:
            params = list(dict.fromkeys(q for m in self.blocks[s] for q in m.parameters()))
            self.uses[s] = params
            self.owns[s] = [q for q in params if id(q) not in seen]
            seen.update(id(q) for q in params)
        self.owner = {id(q): s for s in self.stages for q in self.owns[s]}
        """Per parameter id, the stage of this rank that owns it (its optimizer's, its gradient count's)."""
        # the built-in GPT shares one table between its first and last blocks (tied embeddings);
        # where the two ends sit on different ranks, each holds a copy and their gradients are summed
        self.tied: dict[int, list[nn.Parameter]] = {}
        if gcfg.tie_embeddings and self.tie_group is not None:
            if 0 in self.stages:
                self.tied[0] = [blocks[0].get_parameter(TIED_NAMES[0])]
            if last in self.stages:
                self.tied[last] = [blocks[num_blocks - 1].get_parameter(TIED_NAMES[1])]
        # each parameter's name and index in the whole model (runtime.stage_groups, stage_clip)
        self.names = param_names(gcfg)
        self.gname = global_names(blocks, gcfg)
        index = {n: j for j, n in enumerate(self.names)}
        copy = {id(q) for q in self.tied.get(last, [])} if 0 not in self.stages else set()  # counted on rank 0
        self.gindex = {q: index[n] for q, n in self.gname.items() if q not in copy}
        del blocks
        for s in self.stages:
            for m in self.blocks[s]:
                m.train()
        # runtime.stage_activations [Note: recompute and swap under a split backward]
        self.acts = RankActivations(self.rank, self.blocks, spec.activations, nvme_dir=spec.nvme_dir,
                                    split_backward=self.split_w, share_casts=self._casts_until is not None)
        optim_cls = {Optimizer.ADAMW: torch.optim.AdamW, Optimizer.SGD: torch.optim.SGD}[Optimizer(spec.optimizer.name)]
        kind = spec.optimizer.kind
        hyper = [{k: v for k, v in g.torch_group().items() if k in kind.defaults} for g in spec.optimizer.group_specs()]
        group = hyper[0]  # hyper-parameters (per parameter group: runtime.stage_groups)
        on_device = [s for s in self.stages if spec.home(s) == "device" and self.owns[s]]
        by_group = {s: stage_groups(spec.optimizer, self.owns[s], self.gname) for s in on_device}
        self.group_ids = {s: [gi for gi, _ in by_group[s]] for s in on_device}
        self.offloaded = build_offloaded(self, [s for s in self.stages if spec.home(s) != "device"])
        if spec.zero:
            group_of = {id(q): gi for s in on_device for gi, ps in by_group[s] for q in ps}

            def make(ps: list) -> torch.optim.Optimizer:  # stage_zero [Note: groups of a shard]
                return optim_cls([{**p, **hyper[p["group"]]} if isinstance(p, dict) else p for p in ps], **group)
            # ZeRO-2: a parameter another stage of this rank uses, or tied across ranks, is final only at ALLREDUCE
            late = {id(q) for s in self.stages for q in self.uses[s] if all(q is not o for o in self.owns[s])}
            late |= {id(q) for qs in self.tied.values() for q in qs}
            self.optims = {s: ShardedOptimizer(
                self.owns[s], make, replica=self.replica, dp=spec.dp, group=self.dp_group,
                rank=self.rank, timeout_s=spec.timeout_s, deferred=late,
                buckets=zero2_buckets(self.owns[s], late, spec.zero_bucket_elems) if spec.zero == 2 else None,
                group_of=[group_of[id(q)] for q in self.owns[s]] if spec.optimizer.param_groups else None)
                for s in on_device}
            self.group_ids = {s: [g.get("group", 0) for g in opt.param_groups] for s, opt in self.optims.items()}
        else:
            self.optims = {s: optim_cls([{"params": ps, **hyper[gi]} for gi, ps in by_group[s]]) for s in on_device}
        self._kept: list[Kept] | None = None
        if self.split_w:
            for s in self.stages:
                for block in self.blocks[s]:
                    for mod in block.modules():
                        if any(True for _ in mod.parameters(recurse=False)):
                            mod.register_forward_hook(self._keep_output, with_kwargs=True)
        set_state(self.device, rng_start)  # whatever building drew, the first step starts there

    def _keep_output(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        """[Note: B and W] a parameter-owning module's gradient edge, for the split backward."""
        if self._kept is not None:
            self._kept.append(keep(module, args, kwargs, output))

    def _new_step_state(self) -> None:
        self.inbox: dict[tuple[str, int, int], torch.Tensor] = {}  # received or handed over locally
        self.outbox: dict[tuple[str, int, int], torch.Tensor] = {}  # waiting for their SEND
        # F → B: (input leaf, output, kept (module params, module output)); B → W: (kept, output grads)
        self.saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor, list]] = {}
        self.for_w: dict[tuple[int, int], tuple[list, list[torch.Tensor]]] = {}
        self.losses: dict[int, float] = {}
        self.grad_bytes: dict[str, int] = {}

    # ---- one step ------------------------------------------------------------------------

    def run_step(self, step: int, lr: float | Sequence[float] | None = None) -> StepResult:
        """Run the program once on step ``step``'s batch, its optimizer steps at ``lr``: one
        number, one per parameter group, or None: each group's own (runtime.stage_groups)."""
        check_usable(self, f"run_step({step})")
        t0 = time.perf_counter()
        between = t0 - self._step_end if self._step_end is not None else 0.0
        try:
            self._lr, self._grad_norm = step_lr(self.spec.optimizer, lr), None
            for s, opt in self.optims.items():
                for g, gi in zip(opt.param_groups, self.group_ids[s], strict=True):
                    g["lr"] = group_lr(self.spec.optimizer, gi, self._lr)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            self._load_batch(step)
            for st in self.offloaded.values():
                st.start_window()
            self.acts.start_window()
            self.rng.begin()
            self._hold_casts()
            record: list[str] = []
            times: list[float] = []
            for k, a in enumerate(self.program):
                for r in self._posts.get(k, ()):  # comm.p2p [Note: receives posted early]
                    self.channel.post(*self._recv_from(r), str(r))
                handler = self.handlers.get(a.op)
                if handler is None:
                    raise RuntimeError(f"rank {self.rank}: no handler for op {a.op.value} ({a}) in its program")
                t = time.perf_counter()
                handler(a)
                for j in self._releases.get(k, ()):  # planner.pipeline_sends [Note: a send known to be over]
                    self.channel.release(*self._send_to(self.program[j]))
                if k == self._casts_until:  # [Note: one weight cast a step]
                    self._release_casts()
                times.append(time.perf_counter() - t)
                record.append(str(a))
            self.rng.finish()
            self.channel.flush()
            left = [k for k, v in (("inbox", self.inbox), ("outbox", self.outbox), ("saved", self.saved),
                                   ("for_w", self.for_w)) if v]
            assert not left, f"rank {self.rank}: step {step} ended with tensors left in {left}"
        except BaseException as e:  # runtime.stage_failure [Note: a failed step poisons the worker]
            abandon_step(self, step, e)
            raise
        finally:
            self._release_casts()
        losses = tuple(self.losses[i] for i in sorted(self.losses))
        grads = self.grad_bytes
        self._new_step_state()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._step_end = time.perf_counter()
        elapsed = self._step_end - t0
        peaks = _peak_bytes(self.device) | self.acts.peak_bytes()
        self.acts.end_casts()
        # the sent tensors held at once (planner.pipeline_sends [Note: a send known to be over])
        peaks["sent"], self.channel.held_peak_bytes = self.channel.held_peak_bytes, 0
        if any(st.nvme is not None for st in self.offloaded.values()):
            peaks["nvme"] = sum(st.nvme.ledger.window_peak_bytes for st in self.offloaded.values() if st.nvme)
        if self.offloaded:  # the chunk stores' own ledgers (the device tier of a CPU worker is its RAM)
            peaks["offload_device"] = sum(st.store.device_ledger.window_peak_bytes for st in self.offloaded.values())
            peaks["offload_host"] = sum(st.store.host_ledger.window_peak_bytes for st in self.offloaded.values())
        return StepResult(record=tuple(record), losses=losses, time_s=elapsed, peak_bytes=peaks,
                          device=_device_name(self.device), action_s=tuple(times), grad_bytes=grads,
                          grad_norm=self._grad_norm, between_s=between, core=self.core)

    def _hold_casts(self) -> None:
        """[Note: one weight cast a step] From here autocast's cache outlives each forward's region."""
        if self._casts_until is not None and not self._casts_held:
            torch.autocast_increment_nesting()
            self._casts_held = True

    def _release_casts(self) -> None:
        """[Note: one weight cast a step] The cache's casts go (graphs still saving one keep it)."""
        if self._casts_held:
            self._casts_held = False
            if torch.autocast_decrement_nesting() == 0:
                torch.clear_autocast_cache()

    def _load_batch(self, step: int) -> None:
        """This replica's micro-batches of step ``step``'s global batch (rows in order: replica
        ``d``'s micro-batch ``i`` is global micro-batch ``d * m + i``)."""
        spec = self.spec
        m, b = spec.num_microbatches, spec.micro_batch_size
        last = spec.num_stages - 1
        self.ids: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        if 0 not in self.stages and last not in self.stages:
            return
        if self._source is None:  # opened (and a token file checked) once, not every step
            self._source = TokenBatches(spec.data, batch_size=spec.dp * m * b, seq_len=spec.seq_len,
                                        vocab_size=self.vocab_size)
        ids, labels = self._source.batch(step)
        rows = [slice((self.replica * m + i) * b, (self.replica * m + i + 1) * b) for i in range(m)]
        if 0 in self.stages:
            self.ids = [ids[r].to(self.device) for r in rows]
        if last in self.stages:
            self.labels = [labels[r].to(self.device) for r in rows]

    def _peer(self, stage: int) -> int:
        """The world rank of this replica that runs ``stage``."""
        return self.replica * self.spec.num_ranks + self.spec.rank_of[stage]

    def _tag(self, kind: str, stage: int, mb: int) -> int:
        """The tag of the activation (``F``) or gradient (``B``) that ``stage`` receives for ``mb``."""
        return (mb * self.spec.num_stages + stage) * 2 + (kind == "B")

    # ---- handlers --------------------------------------------------------------------------

    def _forward(self, a: Action) -> None:
        s, i = a.stage, a.microbatch
        last = self.spec.num_stages - 1
        if s == 0:
            x, leaf = self.ids[i], None
        else:
            leaf = self.inbox.pop(("F", s, i)).requires_grad_()
            x = leaf
        if s in self.offloaded:  # runtime.stage_offload [Note: a stage's step]
            self.offloaded[s].ensure()
        kept: list[Kept] = []
        self._kept = kept if self.split_w else None
        self.acts.set_microbatch(s, i)
        self.rng.enter(s, i)
        # [Note: one weight cast a step] a stage that does not share its casts caches none while they are held
        shared = s in self.acts.shared or not self._casts_held
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.spec.dtype == "bf16",
                            cache_enabled=shared):
            for block in self.blocks[s]:
                x = block(x)
        self.rng.leave(s, i)
        self._kept = None
        if s == last:
            loss = self.loss_fn(x, self.labels[i])  # in fp32 (the loss upcasts the logits)
            self.losses[i] = loss.item()
            x = loss / (self.spec.num_microbatches * self.spec.dp)
        else:
            out = x.detach()
            if self.spec.rank_of[s + 1] == self.pipe_rank:
                self.inbox[("F", s + 1, i)] = out
            else:
                self.outbox[("F", s, i)] = out
        self.saved[(s, i)] = (leaf, x, kept)

    def _backward(self, a: Action) -> None:
        s, i = a.stage, a.microbatch
        last = self.spec.num_stages - 1
        leaf, out, kept = self.saved.pop((s, i))
        grad = None if s == last else self.inbox.pop(("B", s, i))
        self.acts.claim(s, i)
        if self.split_w:  # [Note: B and W]
            grad_in, kept_grads = input_grads(out, grad, leaf, kept)
            self.for_w[(s, i)] = (kept, kept_grads)
            if grad_in is None:
                return
        else:
            torch.autograd.backward(out, grad)
            if leaf is None:
                return
            grad_in = leaf.grad
        if self.spec.rank_of[s - 1] == self.pipe_rank:
            self.inbox[("B", s - 1, i)] = grad_in
        else:
            self.outbox[("B", s, i)] = grad_in

    def _weights(self, a: Action) -> None:
        """[Note: B and W] Each parameter's gradient of the micro-batch added to its ``.grad``
        (runtime.stage_split ``weight_grads``) and reported to its owning stage's ZeRO-2 buckets
        or chunks as it is final (runtime.stage_zero, runtime.stage_offload_zero): a table
        another stage of this rank owns (the tied embedding of a V's two ends) is counted there,
        as its gradient hook counts it under a whole backward."""
        kept, kept_grads = self.for_w.pop((a.stage, a.microbatch))
        ready = {s: grad_report(self, s) for s in self.stages}
        for q, g in weight_grads(kept, kept_grads):
            if q.grad is None:
                q.grad = g
            else:
                q.grad.add_(g)
            report = ready[self.owner[id(q)]]
            if report is not None:
                report(q)

    def _send_f(self, a: Action) -> None:
        self.channel.send(self.outbox.pop(("F", a.stage, a.microbatch)).cpu(), *self._send_to(a), str(a))

    def _send_b(self, a: Action) -> None:
        self.channel.send(self.outbox.pop(("B", a.stage, a.microbatch)).cpu(), *self._send_to(a), str(a))

    def _send_to(self, a: Action) -> tuple[int, int]:
        """The peer and tag of a ``SEND_F`` or ``SEND_B``."""
        s, i = a.stage, a.microbatch
        if a.op is Op.SEND_F:
            return self._peer(s + 1), self._tag("F", s + 1, i)
        return self._peer(s - 1), self._tag("B", s - 1, i)

    def _recv_f(self, a: Action) -> None:
        self.inbox[("F", a.stage, a.microbatch)] = self.channel.recv(*self._recv_from(a), str(a)).to(self.device)

    def _recv_b(self, a: Action) -> None:
        self.inbox[("B", a.stage, a.microbatch)] = self.channel.recv(*self._recv_from(a), str(a)).to(self.device)

    def _recv_from(self, a: Action) -> tuple[int, int]:
        """The peer and tag of a ``RECV_F`` or ``RECV_B``."""
        s, i = a.stage, a.microbatch
        if a.op is Op.RECV_F:
            return self._peer(s - 1), self._tag("F", s, i)
        return self._peer(s + 1), self._tag("B", s, i)

    def _offloaded(self, a: Action) -> OffloadedStage:
        stage = self.offloaded.get(a.stage)
        if stage is None:
            raise RuntimeError(f"rank {self.rank}: {a} in its program, but stage {a.stage} is on the device")
        return stage

    # ---- checkpoints -----------------------------------------------------------------------

    def state(self) -> dict:
        """This rank's part of a checkpoint (runtime.stage_state ``rank_state``)."""
        check_usable(self, "state()")
        return rank_state(self)

    def load_state(self, state: dict) -> None:
        """Continue from ``state`` (``state()`` of the same rank of a run with the same plan)."""
        check_usable(self, "load_state()")
        load_rank_state(self, state)

    # ---- end ------------------------------------------------------------------------------

    def ping(self) -> int:
        """This worker's process id (the driver checks it is alive)."""
        return os.getpid()

    def state_bytes(self) -> dict[str, int]:
        """This rank's model states now, in bytes: per tier (``device``: the stages' own
        parameters, gradients and optimizer states, and the offloaded stages' param and grad
        buffers; ``host`` and ``nvme``: the offloaded stages' chunks, by their ledgers), the
        optimizer states wherever they are (``optimizer_states``) and the size of the chunk files
        on disk (``nvme_files``)."""
        return state_bytes(self.offloaded.values(), {s: (opt, self.owns[s]) for s, opt in self.optims.items()})

    def close(self) -> None:
        """Drop the offloaded stages' chunks (their files too), leave the world."""
        try:
            if getattr(self, "acts", None) is not None:
                self.acts.close()
            close_offloaded(self.offloaded, self.spec.nvme_dir, self.rank)
        finally:
            self.offloaded = {}
            leave()
            self._store = None


def _casts_until(program: Sequence[Action]) -> int | None:
    """[Note: one weight cast a step] The position of the program's last ``F``, where no ``OPTIM``
    or ``OFFLOAD`` (which change or move parameters) comes before it; None otherwise."""
    last = max((k for k, a in enumerate(program) if a.op is Op.F), default=None)
    if last is None or any(a.op in (Op.OPTIM, Op.OFFLOAD) for a in program[:last]):
        return None
    return last


def _peak_bytes(device: torch.device) -> dict[str, int]:
    import resource

    out = {"host": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB
    if device.type == "cuda":
        out["device"] = int(torch.cuda.max_memory_allocated(device))
    return out


def _device_name(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"


def _node_ip() -> str:
    """This node's address as Ray knows it (127.0.0.1 on a loopback cluster)."""
    import ray

    return ray.util.get_node_ip_address()
