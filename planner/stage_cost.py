"""What one pipeline stage costs on one device: per-micro-batch time, the step's tail, memory.

The heterogeneous planner (planner.hetero) asks this for every layer range it considers, so the
screening estimate (``StageModel.estimate``) is O(1) per call from prefix sums over the blocks,
memoised per (range, device, in-flight micro-batches). It is the single-device cost model
(planner.cost) applied to a range of blocks:

- everything on the device, activations kept: time is the blocks' compute, the tail the device
  optimizer step; the device holds the range's model states, ``in_flight`` micro-batches'
  activations and the backward's workspace (planner.footprint [Note: workspace estimate]);
- where that does not fit, [Note: offload within a stage]: activations recomputed (each held
  micro-batch keeps only the blocks' inputs) and/or the stage's model states offloaded whole to
  the host, else NVMe, as the pipeline's runtime offloads a stage (runtime.stage_offload): its
  parameters and gradients stay on the device for the whole step, fetched once and sent home
  once (planner.stage_offload_cost [Note: an offloaded stage's residency]), and its update runs
  on the CPU after the last backward. ``memory.offload`` other than ``auto`` fixes every stage's
  home (``StageModel(home=...)``). The cheapest that fits wins. A stage recomputing its
  activations carries that as its policy (``StageEstimate.policy``), which the pipeline's
  workers run; an offloaded one its chunks' home, which they keep its states in;
  ``memory.activations`` fixes the choice ([Note: fixed activations in a stage]).

[Note: activations between B and W] Under a schedule that splits the backward (zb-h1, v-half,
v-min) a micro-batch's ``B`` brings back what its stage's policy let go after the ``F``, and
the ``W`` needs it too (runtime.stage_activations [Note: recompute and swap under a split
backward]): a recomputed block's activations ``A``, rebuilt by replaying its forward at the
start of the ``B`` (that forward's time is the ``B``'s, ``StageEstimate.recompute_s``), and a
swapped block's, copied back before it, stay on the device until the ``W`` ends. So each of the
``in_bw`` micro-batches a stage holds between its ``B`` and its ``W`` at once (planner.partition
``in_backward``, read from the schedule) is charged ``A`` (``StageEstimate.bw_bytes``) on top
of what it holds from its ``F`` (the inputs ``I`` of its recomputed blocks), instead of one
block's ``A`` while it is rebuilt (recompute) or one micro-batch's coming back (swap); the
pipeline simulator takes ``bw_bytes`` at the ``B``'s start and frees it at the ``W``'s end.

[Note: ZeRO in a stage's estimate] With ZeRO (``StageModel(shards=d, zero=z)``, config
``parallel.zero`` over ``d`` data-parallel copies) a stage kept on the device holds its
parameters and its fp32 gradient whole (the gradient accumulates over the micro-batches: ZeRO-2
drops it to its ``1 / d`` share only after the last backward, runtime.stage_zero [Note: ZeRO-2
in a pipeline]) and ``1 / d`` of its optimizer states with their fp32 parameter copy, and its
update steps ``1 / d`` of its parameters; the sum's time and the gradient after the step are
planner.hetero_plan's. A stage that offloads keeps, under ZeRO-1 or -2, the optimizer states
and the fp32 gradient accumulators of ``1 / d`` of its parameters on the host (or NVMe) and its
masters whole (runtime.stage_offload [Note: ZeRO-1 of an offloaded stage]); its CPU optimizer
steps ``1 / d`` of them, and an NVMe stage reads and writes ``1 / d`` of the states and writes
the others' updated masters, gathered, into its files. Under ZeRO-2 its gradients are reduced
to their owners under the last backward, chunk by chunk, as a device stage's buckets
(runtime.stage_offload_zero; the time and the copies under way are planner.hetero_plan's).

[Note: a device stage's states] A pipeline worker keeps a device stage's parameters in fp32 and
computes under ``torch.autocast`` when ``train.dtype`` is bf16 (runtime.stage_worker: its blocks
are built fp32 and never cast; ``torch.optim`` steps them in place), so its gradients and AdamW's
two states are fp32 too and there is no separate master copy: ``2 · 4 + o`` bytes a parameter
(``o`` the optimizer's state bytes), not the single-device bf16 chunk's ``2 + 4 + 4 + o``. The
gradient autograd makes for the largest parameter in the backward's workspace is fp32 as well.
Under ZeRO the shard's fp32 copy (runtime.stage_zero ``ShardedOptimizer.master``) is the ``4``
beside its states. Checked against a worker's own count (``StageWorker.state_bytes``) in
tests/unit/test_stage_states.py. The tensors a stage sends on (``boundary_bytes``) are fp32 too:
the built-in GPT's hidden states stay fp32 under autocast, twice the bf16 analysis's outputs.

[Note: a bf16 stage's activations] For the same reason a bf16 stage's blocks save other tensors
than the bf16 analysis's (``BlockStats.activation_bytes``, which describes the single-device
engine's real bf16 compute): fp32 norm inputs (the residual stream), and autocast's bf16 copy of
every weight a matmul uses (a layer of hidden size ``h`` holds ``12·h²·2`` bytes of them,
whatever the micro-batch's size). So a stage takes each block's ``A``, ``I`` and ``O`` from the
analysis's trace of the blocks as the worker runs them (``BlockStats.autocast_*``,
planner.analyze [Note: a pipeline worker's autocast]): ``A`` is ``autocast_activation_bytes +
autocast_weight_bytes``, ``I`` and ``O`` fp32 hidden states. A stage whose blocks keep their
activations shares one copy of each weight among all its micro-batches (runtime.stage_worker
[Note: one weight cast a step]): it holds ``autocast_activation_bytes`` per micro-batch in flight
and the copies once (``casts``, ``StageEstimate.cast_bytes``): they live from its first forward
to the later of the rank's last forward and its last backward, so the pipeline's planner adds
them to the rank's peak of the passes, not to what it holds after them (the gradients' copies,
the optimizer: planner.hetero_plan). A recomputed stage makes a block's copies anew at its
recompute (within the ``A`` it rebuilds); a swapped one per micro-batch, swapped with the rest.
Equal to what a CPU worker counts (``KeptStage``) but for the kernels' own difference
(tests/unit/test_stage_activation_bytes.py). fp32 stages take the analysis's figures as they are.

[Note: the dropout walk] With dropout, every pipeline rank replays at the start of each step
the random draws of the whole global batch (runtime.stage_rng ``StageRng.begin``: ``dp × m``
micro-batches, every block, in one process's order), whatever its stages. On a CPU worker that
replay draws every element again (the Mersenne Twister), ``RNG_WALK_S_PER_ELEM`` seconds each:
``StageModel.rng_walk_s`` charges ``dp · m · Σ random_elems · RNG_WALK_S_PER_ELEM`` on each rank
before its program (planner.simulate_pipeline ``step_start_s``). On a GPU the generator is a
counter (CUDA's Philox) and the walk arithmetic, microseconds: not charged. Without dropout,
nothing. A measured profile's rest of a step includes its probe's own walk (one replica of its
micro-batches), which ``step_overhead_s`` takes out so it is not charged twice.

``StageModel.refine`` gives the estimate of the candidates the heterogeneous planner keeps (an
offloaded stage's is the runtime's residency, not the single-device planner's streaming).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from itertools import accumulate

from memtrain.cluster.spec import DeviceSpec, HostSpec, NvmeSpec
from memtrain.planner import cost
from memtrain.planner.measured import MAX_TIMED_LAYERS, MeasuredPipeline
from memtrain.planner.plan import ActPolicy, MemoryPolicy, TrainShape
from memtrain.planner.stage_estimate import StageBudget, StageEstimate, stage_stats
from memtrain.planner.stage_offload_cost import PARAM_BYTES, offloaded_estimate, placed
from memtrain.planner.stats import DType, ModelStats, Optimizer, dtype_bytes

__all__ = ["StageBudget", "StageEstimate", "StageModel", "stage_stats", "RNG_WALK_S_PER_ELEM"]

RNG_WALK_S_PER_ELEM = 5.2e-9
"""[Note: the dropout walk] CPU seconds a pipeline worker's walk spends per random element it
replays, on one thread: ``python bench/rng_walk.py`` (the built-in GPT, dropout 0.1, 6 layers,
8 micro-batches of 2 × 64 or 2 × 128, hidden 64 to 512) measured 4.9 to 5.6 ns per element, 5.2
at the sizes of docs/cluster.md's measure (26 ms a step for 5.0 M elements)."""


def _act_policy(num_params: int, num_blocks: int, act: ActPolicy) -> MemoryPolicy:
    """A stage on the device with every block's activations under ``act``."""
    return MemoryPolicy(chunk_size_elems=max(1, num_params), chunks=(), prefetch_depth=1,
                        activations=(act,) * num_blocks)


class _RangeMax:
    """Maximum over a range of a fixed list in O(1) (a sparse table)."""

    def __init__(self, values: list[int]) -> None:
        self.table = [list(values)]
        k = 1
        while 2 * k <= len(values):
            prev = self.table[-1]
            self.table.append([max(prev[i], prev[i + k]) for i in range(len(values) - 2 * k + 1)])
            k *= 2

    def __call__(self, first: int, end: int) -> int:
        level = (end - first).bit_length() - 1
        row = self.table[level]
        return max(row[first], row[end - (1 << level)])


def _prefix(values) -> list:
    return list(accumulate(values, initial=0))


def _as_worker(stats: ModelStats, dtype: DType) -> tuple[list[int], list[int], list[int], list[int]]:
    """Per block, its activations ``A``, input ``I`` and output ``O`` as a pipeline worker holds
    them, and of ``A`` its weight casts ([Note: a bf16 stage's activations])."""
    blocks = stats.blocks
    if dtype is not DType.BF16:
        return ([b.activation_bytes for b in blocks], [b.input_bytes for b in blocks],
                [b.output_bytes for b in blocks], [0] * len(blocks))
    if stats.autocast:
        return ([b.autocast_activation_bytes + b.autocast_weight_bytes for b in blocks],
                [b.autocast_input_bytes for b in blocks], [b.autocast_output_bytes for b in blocks],
                [b.autocast_weight_bytes for b in blocks])
    # figures not traced under autocast (made by hand): the outputs sent on at fp32, the rest as given
    return ([b.activation_bytes for b in blocks], [b.input_bytes for b in blocks],
            [b.output_bytes * PARAM_BYTES // dtype_bytes(dtype) for b in blocks], [0] * len(blocks))


class StageModel:
    """Stage costs of one model at one micro-batch size (see the module doc)."""

    def __init__(self, stats: ModelStats, train: TrainShape, activations: ActPolicy | str = "auto", *,
                 shards: int = 1, zero: int = 0, measured: MeasuredPipeline | None = None,
                 home: str = "auto") -> None:
        self.stats, self.train = stats, train
        self.home = home
        """Where every stage's model states live (``memory.offload``): ``device``, ``host`` or
        ``nvme`` fixes it; ``auto``: the device, else offloaded where the device is short."""
        self.measured = measured
        """Costs measured on the workers (planner.measured [Note: measured pipeline]): a device of
        their kind takes its blocks' passes and optimizer steps from them."""
        self.activations = None if activations == "auto" else ActPolicy(activations)
        """Every block's policy when the config fixes it (``memory.activations``), else None
        ([Note: fixed activations in a stage])."""
        self.shards, self.zero = (shards, zero) if zero and shards > 1 else (1, 0)
        """[Note: ZeRO in a stage's estimate] the data-parallel copies the states are sharded over."""
        self.dtype, self.optimizer = DType(train.dtype), Optimizer(train.optimizer)
        blocks = stats.blocks
        self.num_blocks = len(blocks)
        numel = {n: k for b in blocks for n, k in zip(b.param_names, b.param_numels)}
        owner = {n: q for q, b in enumerate(blocks) for n in b.param_names}
        # a shared parameter counts again in a stage that uses it without holding its owner
        self.shared = [(q, owner[n], numel[n]) for q, b in enumerate(blocks) for n in b.shared_param_names if n in owner]
        self.params = _prefix(b.num_params for b in blocks)
        acts, ins, self.outputs, casts = _as_worker(stats, self.dtype)  # [Note: a bf16 stage's activations]
        self.acts = _prefix(acts)
        self.casts = _prefix(casts)
        """Of ``acts``, autocast's weight casts: a keep stage holds them once, not per micro-batch."""
        self.inputs = _prefix(ins)
        self.max_act = _RangeMax(acts)
        self.max_work = _RangeMax([a + i + o for a, i, o in zip(acts, ins, self.outputs)])
        self.max_param = _RangeMax([max(b.param_numels, default=b.num_params) for b in blocks])
        self.max_block_params = _RangeMax([b.num_params for b in blocks])
        self.random_elems = sum(b.random_elems for b in blocks)
        """Random elements one micro-batch's forward draws, the whole model's ([Note: the dropout walk])."""
        layers = blocks[1:-1]
        timed = min(len(layers), MAX_TIMED_LAYERS)
        self.probe_random_elems = (blocks[0].random_elems + blocks[-1].random_elems
                                   + (timed * sum(b.random_elems for b in layers) // len(layers) if layers else 0))
        """The same for the model the probe times (its first ``MAX_TIMED_LAYERS`` layers, the layers alike)."""
        self.range_ids = self._canonical_ranges()
        """Per [first][end], the id of ranges with the same blocks (``_canonical_ranges``)."""
        # [Note: a device stage's states] fp32 parameters, gradients and optimizer states, whatever train.dtype
        self.state_per_param = 2 * PARAM_BYTES + cost.optimizer_state_bytes_per_elem(self.optimizer)
        self.shared_per_param = 2 * PARAM_BYTES  # ZeRO: the parameter and its gradient, whole
        self._times: dict[DeviceSpec, tuple[list[float], list[float]]] = {}
        self._places: dict[tuple, int] = {}
        self._where: list[tuple[DeviceSpec, HostSpec, NvmeSpec | None, StageBudget]] = []
        self._memo: dict[tuple, StageEstimate] = {}
        self._refined: dict[tuple, StageEstimate] = {}

    def place(self, device: DeviceSpec, host: HostSpec, nvme: NvmeSpec | None, budget: StageBudget) -> int:
        """A handle for a stage's hardware and budget, for ``estimate`` and ``refine`` (hashing
        the specs on every call would cost more than the estimate)."""
        key = (device, host, nvme, budget)
        if key not in self._places:
            self._places[key] = len(self._where)
            self._where.append(key)
        return self._places[key]

    def shared_numel(self, a: tuple[int, int], b: tuple[int, int]) -> int:
        """Parameters the blocks of range ``b`` use that blocks of range ``a`` own (a head tied to
        the embedding): what two stages holding them sum the gradients of."""
        return sum(n for q, o, n in self.shared if b[0] <= q < b[1] and a[0] <= o < a[1])

    def num_params(self, first: int, end: int) -> int:
        extra = sum(n for q, o, n in self.shared if first <= q < end and not first <= o < end)
        return self.params[end] - self.params[first] + extra

    def _canonical_ranges(self) -> list[list[int]]:
        """Per range ``[first, end)``, an id shared by every range with the same blocks' figures
        in the same order and the same parameters (a trie over the blocks' figures): the layers
        of a transformer are alike, so the estimate of 5 layers is made once, not at every
        position."""
        kinds: dict[tuple, int] = {}
        kind = [kinds.setdefault(dataclasses.astuple(dataclasses.replace(b, name="", param_names=())), len(kinds))
                for b in self.stats.blocks]
        trie: dict[tuple[int, int, int], int] = {}
        n = self.num_blocks
        out = [[-1] * (n + 1) for _ in range(n + 1)]
        for first in range(n):
            node = -1
            for end in range(first + 1, n + 1):
                # the last stage also holds the loss's activations: its ranges are its own
                key = (node, kind[end - 1], self.num_params(first, end), end == n)
                node = trie.setdefault(key, len(trie))
                out[first][end] = node
        return out

    def compute_s(self, device: DeviceSpec, first: int, end: int) -> float:
        """Forward and backward compute of one micro-batch through blocks ``[first, end)``."""
        fwd, bwd = self._compute(device)
        return fwd[end] - fwd[first] + bwd[end] - bwd[first]

    def _compute(self, device: DeviceSpec) -> tuple[list[float], list[float]]:
        if device not in self._times:
            s, mbs, dt = self.stats, self.stats.micro_batch_size, self.dtype
            if self._measures(device):
                assert self.measured is not None
                fwd, bwd = self.measured.block_times(mbs)
            else:
                fwd = [cost.block_fwd_time_s(b, device, dt, mbs) + cost.block_overhead_s(s, b, backward=False)
                       for b in s.blocks]
                bwd = [cost.block_bwd_time_s(b, device, dt, mbs) + cost.block_overhead_s(s, b, backward=True)
                       for b in s.blocks]
            self._times[device] = (_prefix(fwd), _prefix(bwd))
        return self._times[device]

    def _measures(self, device: DeviceSpec) -> bool:
        """The measured costs apply to ``device`` (its kind, and one figure per block)."""
        m = self.measured
        return m is not None and device.kind == m.device_kind and len(m.blocks.fwd_s) == self.num_blocks

    def device_optim_s(self, first: int, end: int, n: int, device: DeviceSpec) -> float:
        """The optimizer step of ``n`` of blocks ``[first, end)``'s parameters kept on ``device``
        (ZeRO: the shard's): measured where the costs were, else the device's memory bandwidth."""
        if self._measures(device) and n:
            assert self.measured is not None
            whole = sum(self.measured.blocks.optim_s[first:end])
            return whole * min(1.0, n / max(self.num_params(first, end), 1))
        return cost.device_optimizer_time_s(n, self.dtype, self.optimizer, device)

    def step_overhead_s(self, devices: Sequence[DeviceSpec]) -> float:
        """Per step, outside the pipeline's passes, for ranks on ``devices``: measured (a worker's
        rest of the step and Ray's round trip, planner.measured) where one is of the measured
        kind, less the probe's own dropout walk ([Note: the dropout walk]), else 0."""
        m = self.measured
        if m is None or not any(d.kind == m.device_kind for d in devices):
            return 0.0
        probe = self._walk_s(m.device_kind, 1, m.num_microbatches, self.probe_random_elems)
        return max(0.0, m.blocks.rest_s - probe * m.micro_batch_size / self.stats.micro_batch_size) + m.round_trip_s

    def boundary_bytes(self, end: int) -> int:
        """The tensor a stage ending before block ``end`` sends on, one micro-batch's: the block's
        output as a pipeline worker holds it ([Note: a bf16 stage's activations]: bf16 is
        autocast, and the built-in GPT's embedding output and the residual stream each layer
        adds its bf16 results into stay fp32, twice the bf16 analysis's figure); its gradient,
        coming back, as large."""
        return self.outputs[end - 1]

    def rng_walk_s(self, device: DeviceSpec, dp: int, num_microbatches: int) -> float:
        """[Note: the dropout walk] A rank's replay of the step's random draws on ``device``, over
        ``dp`` replicas of ``num_microbatches`` micro-batches of this model's size."""
        return self._walk_s(device.kind, dp, num_microbatches)

    def _walk_s(self, kind: str, dp: int, num_microbatches: int, elems: int | None = None) -> float:
        elems = self.random_elems if elems is None else elems
        return dp * num_microbatches * elems * RNG_WALK_S_PER_ELEM if kind == "cpu" else 0.0

    def w_share(self, first: int, end: int, device: DeviceSpec) -> float:
        """Of a split backward of blocks ``[first, end)`` on ``device``, the ``W`` part's share:
        measured where the costs were (``device``'s kind), else half."""
        return self.measured.w_share(first, end) if self._measures(device) else 0.5

    def estimate(self, first: int, end: int, where: int, in_flight: int, num_microbatches: int,
                 in_bw: int = 0) -> StageEstimate:
        """The cheapest way found to run blocks ``[first, end)`` on ``where`` (``place``) holding
        ``in_flight`` micro-batches' activations at once, ``in_bw`` of them between a split
        backward's ``B`` and ``W`` (memoised; see the module doc)."""
        key = (self.range_ids[first][end], where, in_flight, num_microbatches, in_bw)
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = self._estimate(first, end, *self._where[where], in_flight, num_microbatches,
                                                   in_bw)
        return hit

    def _estimate(self, first: int, end: int, device: DeviceSpec, host: HostSpec, nvme: NvmeSpec | None,
                  budget: StageBudget, k: int, m: int, kb: int = 0) -> StageEstimate:
        fwd, bwd = self._compute(device)
        f_s, b_s = fwd[end] - fwd[first], bwd[end] - bwd[first]
        n = self.num_params(first, end)
        last = end == self.num_blocks
        work = (self.max_work(first, end) + (self.stats.loss_activation_bytes if last else 0)
                + PARAM_BYTES * self.max_param(first, end))  # [Note: a device stage's states]
        acts, inputs = self.acts[end] - self.acts[first], self.inputs[end] - self.inputs[first]
        best: StageEstimate | None = None
        if self.activations in (ActPolicy.SWAP_HOST, ActPolicy.SWAP_NVME):
            est = self._swapped(first, end, f_s, b_s, n, device, host, nvme, budget, k, work, kb)
            if self.home not in ("host", "nvme"):
                return est
            # memory.offload fixes the states' home too: the swap's bytes beside an offloaded stage's
            off = offloaded_estimate(self, n, f_s, b_s, est.device_bytes - self.device_state_bytes(n), device, host,
                                     nvme, budget, first, end, 0, False)
            host_bytes, nvme_bytes = off.host_bytes + est.host_bytes, off.nvme_bytes + est.nvme_bytes
            return dataclasses.replace(
                off, fwd_s=est.fwd_s, bwd_s=est.bwd_s, host_bytes=host_bytes, nvme_bytes=nvme_bytes,
                bw_bytes=est.bw_bytes, policy=est.policy, offload=f"{est.offload}, {off.offload}",
                fits=off.fits and est.host_bytes + off.host_bytes <= budget.host
                and (nvme is None or nvme_bytes <= budget.nvme))
        # [Note: offload within a stage] each activation policy, then as many parameters on the
        # device as fit, the rest homed on the host, then NVMe
        options = (False, True) if self.activations is None else (self.activations is ActPolicy.RECOMPUTE,)
        for recompute in options:
            # [Note: a bf16 stage's activations] a keep stage's weight casts once, beside its micro-batches'
            casts = 0 if recompute else self.casts[end] - self.casts[first]
            held = inputs if recompute else acts - casts
            # one block's A while it is rebuilt, or under a split backward every held B..W micro-batch's
            # ([Note: activations between B and W])
            extra = (kb * acts if kb else self.max_act(first, end)) if recompute else 0
            bwd_s = b_s + (f_s if recompute else 0.0)
            room = budget.device - k * held - extra - work - casts
            if self.home == "device" or (self.home == "auto" and room >= self.device_state_bytes(n)):
                est = StageEstimate(fwd_s=f_s, bwd_s=bwd_s,
                                    tail_s=self.device_optim_s(first, end, -(-n // self.shards), device),
                                    device_bytes=budget.device - room + self.device_state_bytes(n), host_bytes=0,
                                    nvme_bytes=0, act_bytes=held, offload="activations recomputed" if recompute else "",
                                    fits=room >= self.device_state_bytes(n),
                                    policy=_act_policy(n, end - first, ActPolicy.RECOMPUTE) if recompute else None)
            else:
                est = offloaded_estimate(self, n, f_s, bwd_s, budget.device - room, device, host, nvme, budget, first,
                                         end, held, recompute)
            if recompute:
                est = dataclasses.replace(est, recompute_s=f_s, bw_bytes=acts if kb else 0)
            elif casts:
                est = dataclasses.replace(est, cast_bytes=casts)
            if est.fits and (best is None or est.work_s(m) < best.work_s(m)):
                best = est
            elif best is None and recompute is options[0]:
                fallback = est
        return best if best is not None else fallback

    def _swapped(self, first: int, end: int, f_s: float, b_s: float, n: int, device: DeviceSpec, host: HostSpec,
                 nvme: NvmeSpec | None, budget: StageBudget, k: int, work: int, kb: int = 0) -> StageEstimate:
        """[Note: fixed activations in a stage] ``memory.activations`` other than ``auto`` fixes
        every block's policy: ``keep`` or ``recompute`` is then the only one tried (parameters
        still offloaded where the device is short; the refinement searches with it fixed);
        ``swap_host``/``swap_nvme``, costed here: a worker swaps a stage's activations out after
        its forward and in before its backward (runtime.stage_activations), so the device holds
        one micro-batch's while it runs and the host (or NVMe) the held ones; the copies overlap
        the compute where they can. Parameters stay on the device (a stage short of room for
        them is not planned this way). Under a split backward each of the ``kb`` micro-batches
        between ``B`` and ``W`` holds its activations on the device ([Note: activations between B
        and W]), beside the one whose forward runs."""
        acts = self.acts[end] - self.acts[first]
        swap_nvme = self.activations is ActPolicy.SWAP_NVME
        out_s, in_s = cost.d2h_time_s(acts, device), cost.h2d_time_s(acts, device)
        if swap_nvme and nvme is not None:
            out_s += cost.disk_write_time_s(acts, nvme)
            in_s += cost.disk_read_time_s(acts, nvme)
        states = self.device_state_bytes(n)
        device_bytes = states + (kb + 1 if kb else 2) * acts + work  # one running, one (or kb) back
        host_bytes = acts if swap_nvme else k * acts  # NVMe: one micro-batch's staging at a time
        nvme_bytes = k * acts if swap_nvme else 0
        fits = (device_bytes <= budget.device and host_bytes <= budget.host
                and (not swap_nvme or (nvme is not None and nvme_bytes <= budget.nvme)))
        return StageEstimate(fwd_s=max(f_s, out_s), bwd_s=max(b_s, in_s),
                             tail_s=self.device_optim_s(first, end, -(-n // self.shards), device),
                             device_bytes=device_bytes, host_bytes=host_bytes, nvme_bytes=nvme_bytes, act_bytes=0,
                             bw_bytes=acts if kb else 0,
                             offload=f"activations swapped to {'NVMe' if swap_nvme else 'the host'}", fits=fits,
                             policy=_act_policy(n, end - first, self.activations))

    def device_state_bytes(self, n: int) -> int:
        """A stage of ``n`` parameters kept on the device: its model states' bytes, as its worker
        holds them ([Note: a device stage's states]; [Note: ZeRO in a stage's estimate]: under
        ZeRO, the optimizer states and fp32 copy of a ``1 / shards`` share)."""
        if self.shards == 1:
            return n * self.state_per_param
        return n * self.shared_per_param + -(-n // self.shards) * (self.state_per_param - self.shared_per_param
                                                                   + PARAM_BYTES)

    def refine(self, first: int, end: int, where: int, in_flight: int, num_microbatches: int,
               in_bw: int = 0) -> StageEstimate:
        """The estimate of a candidate the heterogeneous planner keeps. An offloaded stage's is
        already what the runtime does (planner.stage_offload_cost [Note: an offloaded stage's
        residency]): its parameters are resident for the step, not streamed as the
        single-device planner's policies stream them, so that planner's figures do not apply."""
        est = self.estimate(first, end, where, in_flight, num_microbatches, in_bw)
        if "params" not in est.offload:
            return est
        key = (first, end, where, in_flight, num_microbatches, in_bw)  # the chunks name the range's parameters
        if key not in self._refined:
            _, host, nvme, _ = self._where[where]
            self._refined[key] = placed(self, est, first, end, host, nvme)
        return self._refined[key]
