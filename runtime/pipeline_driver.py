"""Run a pipeline-parallel (and data-parallel) training job on the current Ray cluster.

``run_pipeline`` takes plain values (model, partition, schedule, degrees, micro-batches, steps,
seed, learning rate), lowers the schedule to one program per rank (``stage_programs``: the
generator's compute order, its sends and receives, then each stage's gradient sum and optimizer
step), starts one ``StageWorker`` actor per rank on the Ray the caller connected to, wires their
process groups through rank 0's store, runs the steps and returns the per-step losses, each
rank's executed record and step times.

A worker that dies, fails or outlasts ``step_timeout_s`` stops the run with a ``PipelineError``
naming it (the actor's death first: a dead rank's peers then fail on their transfers); the
actors are killed on the way out, so nothing is left waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from memtrain.config import ConfigError, DataConfig, ModelConfig
from memtrain.models.gpt import gpt_config
from memtrain.optimizers import OptimizerSpec
from memtrain.models.gpt_blocks import param_names
from memtrain.offload.clip import check_max_norm
from memtrain.planner.pipeline import (SCHEDULES, Placement, add_clip_points, add_offload_points,
                                       add_p2p, add_reduce_scatter_points, add_step_end, add_swap_points, generate,
                                       placement, validate_pipeline)
from memtrain.planner.pipeline_sends import send_releases
from memtrain.planner.plan import Op
from memtrain.planner.schedule import Schedule
from memtrain.runtime.stage_activations import ACT_POLICIES
from memtrain.runtime.stage_groups import check_groups, step_lr
from memtrain.runtime.stage_offload import OFFLOAD_HOMES
from memtrain.runtime.stage_worker import PIPELINE_DTYPES, PipelineSpec, StageWorker, StepResult

__all__ = ["run_pipeline", "PipelineRun", "PipelineResult", "PipelineError", "stage_programs", "even_partition"]


class PipelineError(RuntimeError):
    """A worker of a pipeline run died, failed or hung; the message names it."""


@dataclass(frozen=True, slots=True)
class PipelineResult:
    """What a pipeline run measured."""

    losses: tuple[float, ...]
    """Per step, the mean loss over the global batch's micro-batches."""
    microbatch_losses: tuple[tuple[float, ...], ...]
    """Per step, each global micro-batch's loss (replica ``d``'s micro-batch ``i`` at ``d * m + i``)."""
    records: tuple[tuple[tuple[str, ...], ...], ...]
    """Per step, per world rank, the actions it ran."""
    step_times_s: tuple[tuple[float, ...], ...]
    """Per step, per world rank, its wall time."""
    programs: tuple[tuple[str, ...], ...]
    """Per pipeline rank, its program (short forms)."""
    peak_bytes: tuple[tuple[dict[str, int], ...], ...] = ()
    """Per step, per world rank, its peak bytes per tier (``StepResult.peak_bytes``)."""
    nodes: tuple[str, ...] = ()
    """Per world rank, the node it ran on (when placed on given nodes)."""
    devices: tuple[str, ...] = ()
    """Per world rank, where it computed (``StepResult.device``)."""
    step_wall_s: tuple[float, ...] = ()
    """Per step, the driver's time from the previous step's results to this one's (from its call
    for a step not queued ahead: [Note: a step queued ahead])."""
    busy_s: tuple[tuple[float, ...], ...] = ()
    """Per step, per world rank, its time in compute actions (``StepResult.busy_s``)."""
    state_bytes: tuple[dict[str, int], ...] = ()
    """Per world rank, its model states after the last step (``StageWorker.state_bytes``)."""
    grad_bytes: tuple[tuple[dict[str, int], ...], ...] = ()
    """Per step, per world rank, its gradient bytes while summing and after (``StepResult.grad_bytes``)."""
    action_s: tuple[tuple[tuple[float, ...], ...], ...] = ()
    """Per step, per world rank, each action's wall time (``StepResult.action_s``, as ``records``)."""
    grad_norms: tuple[float, ...] = ()
    """Per step, the global gradient norm before clipping (``max_grad_norm`` runs; every rank's is
    the same number, checked)."""
    between_s: tuple[tuple[float, ...], ...] = ()
    """Per step, per world rank, its wait since its previous step ended (``StepResult.between_s``)."""


def stage_programs(kind: str, num_ranks: int, num_microbatches: int, *,
                   stages_per_rank: int = 2, zero: int = 0) -> tuple[Placement, Schedule]:
    """Schedule ``kind``'s placement and per-rank programs: its compute order with sends and
    receives (``planner.pipeline.add_p2p``), then, per stage the rank holds, ``ALLREDUCE`` (the
    gradient sums) and ``OPTIM`` (the optimizer step); ``zero`` 2: each stage's
    ``REDUCE_SCATTER`` before its last gradient pass (``add_reduce_scatter_points``). A schedule
    that cannot run raises."""
    place = placement(kind, num_ranks, stages_per_rank)
    compute = generate(kind, num_ranks, num_microbatches, stages_per_rank=stages_per_rank)
    with_p2p = add_p2p(compute, place)
    problem = validate_pipeline(with_p2p, place, num_microbatches)
    if problem is not None:
        raise ValueError(f"schedule {kind}: {problem}")
    programs = add_step_end(with_p2p, place)
    return place, add_reduce_scatter_points(programs, range(place.num_stages)) if zero == 2 else programs


def even_partition(num_blocks: int, num_stages: int) -> tuple[int, ...]:
    """Blocks per stage as even as they go, the extra ones on the first stages."""
    if not 1 <= num_stages <= num_blocks:
        raise ConfigError(f"partition: {num_stages} stages need between 1 and {num_blocks} (the model's blocks)")
    q, r = divmod(num_blocks, num_stages)
    return tuple(q + (s < r) for s in range(num_stages))


QUEUE_AHEAD_MAX_S = 1.0
"""Steps shorter than this (the last one's driver time) are queued ahead ([Note: a step queued ahead])."""


class PipelineRun:
    """The actors of one pipeline run: ``start()``, ``step(k)`` per step, ``close()``.

    [Note: a step queued ahead] Ray runs an actor's calls from one caller in the order they were
    made, so ``run_pipeline`` queues step k + 1 before it waits for step k: a worker goes from one
    step into the next without waiting for the driver to take the results, write the metrics and
    call again (3.7 ms a step of the tiny example's 20 ms, measured). Only while steps take under
    ``QUEUE_AHEAD_MAX_S``: the driver's part is milliseconds, and a signal that arrives during a
    step is answered after the step queued behind it. A checkpoint's states are queued right after
    their step and the next step only once they are taken."""

    def __init__(self, spec: PipelineSpec, programs: Schedule, *, step_timeout_s: float = 300.0,
                 start_timeout_s: float = 300.0, num_cpus_per_worker: float = 1.0,
                 assignments: Sequence[Any] | None = None) -> None:
        self.spec = spec
        self.programs = programs
        self.step_timeout_s = step_timeout_s
        self.start_timeout_s = start_timeout_s
        self.num_cpus_per_worker = num_cpus_per_worker
        self.assignments = assignments
        """``ray_cluster.Assignment`` per world rank (its node and resources), or None: anywhere."""
        self.placed: Any = None
        self.nodes: tuple[str, ...] = ()
        self.workers: list[Any] = []
        self.failed = False
        """A step or the start-up failed: ``close`` ends the actors without asking them."""
        self._queued: list[dict[int, Any]] = []
        """Calls queued and not collected (a step queued ahead of one that failed)."""

    def name(self, rank: int) -> str:
        """How errors name world rank ``rank``."""
        p = self.spec.num_ranks
        stages = ",".join(str(s) for s, r in enumerate(self.spec.rank_of) if r == rank % p)
        extra = f", replica {rank // p}" if self.spec.dp > 1 else ""
        node = f" on {self.nodes[rank]}" if rank < len(self.nodes) else ""
        return f"rank {rank} (stages {stages}{extra}){node}"

    def start(self) -> None:
        p = self.spec.num_ranks
        releases = send_releases(self.programs, self.spec.rank_of)  # planner.pipeline_sends
        if self.assignments is not None:  # one bundle per rank, pinned to its node
            from memtrain.runtime.ray_cluster import place_workers

            self.placed = place_workers(StageWorker, self.assignments, timeout_s=self.start_timeout_s,
                                        kwargs_of=lambda r: {"spec": self.spec, "rank": r,
                                                             "program": self.programs[r % p],
                                                             "releases": releases[r % p]})
            self.workers = list(self.placed.actors)
            self.nodes = tuple(self.placed.node_label(r) for r in range(len(self.workers)))
        else:
            actor = ray.remote(StageWorker).options(num_cpus=self.num_cpus_per_worker, max_restarts=0)
            self.workers = [actor.remote(self.spec, rank, self.programs[rank % p], releases[rank % p])
                            for rank in range(self.spec.world_size)]
        (host, port), = self._gather({0: self.workers[0].open_store.remote()}, "start-up (hosting the store)",
                                     self.start_timeout_s)
        self._gather({r: w.build.remote(host, port) for r, w in enumerate(self.workers)}, "start-up (build)",
                     self.start_timeout_s)

    def step(self, step: int, lr: float | Sequence[float] | None = None) -> list[StepResult]:
        """Run step ``step`` (0-based) on every rank at learning rate ``lr`` (one number, one per
        parameter group, or None: each group's own); their results by world rank."""
        return self.collect(self.submit(step, lr), step)

    def submit(self, step: int, lr: float | Sequence[float] | None = None) -> dict[int, Any]:
        """Queue step ``step`` on every rank without waiting ([Note: a step queued ahead]); its
        results come from ``collect``."""
        return self._queue({r: w.run_step.remote(step, lr) for r, w in enumerate(self.workers)})

    def collect(self, refs: dict[int, Any], step: int) -> list[StepResult]:
        """The results of step ``step`` queued by ``submit``, by world rank."""
        return self._gather(self._taken(refs), f"step {step + 1}", self.step_timeout_s)

    def states(self) -> dict[int, dict]:
        """Every rank's checkpoint state (``StageWorker.state``), by world rank."""
        return self.collect_states(self.submit_states())

    def submit_states(self) -> dict[int, Any]:
        """Queue the ranks' checkpoint states: taken after every step queued before."""
        return self._queue({r: w.state.remote() for r, w in enumerate(self.workers)})

    def collect_states(self, refs: dict[int, Any]) -> dict[int, dict]:
        """The states queued by ``submit_states``, by world rank."""
        return dict(enumerate(self._gather(self._taken(refs), "a checkpoint", self.step_timeout_s)))

    def _queue(self, refs: dict[int, Any]) -> dict[int, Any]:
        self._queued.append(refs)
        return refs

    def _taken(self, refs: dict[int, Any]) -> dict[int, Any]:
        self._queued = [q for q in self._queued if q is not refs]
        return refs

    def load_states(self, states: dict[int, dict]) -> None:
        """Give each rank its state of a checkpoint (``StageWorker.load_state``)."""
        if sorted(states) != list(range(len(self.workers))):
            raise ConfigError(f"the checkpoint holds ranks {sorted(states)}, the run has {len(self.workers)}")
        self._gather({r: w.load_state.remote(states[r]) for r, w in enumerate(self.workers)},
                     "loading the checkpoint", self.start_timeout_s)

    def state_bytes(self) -> list[dict[str, int]]:
        """Per world rank, its model states' bytes per tier now (``StageWorker.state_bytes``)."""
        return self._gather({r: w.state_bytes.remote() for r, w in enumerate(self.workers)}, "state_bytes",
                            self.step_timeout_s)

    def close(self) -> None:
        """Let the workers leave their world, then end the actors (also after a failure)."""
        if not self.workers:
            return
        try:
            if not self.failed:
                ray.wait([w.close.remote() for w in self.workers], num_returns=len(self.workers), timeout=5.0)
        finally:
            for w in self.workers:
                ray.kill(w, no_restart=True)
            # the calls queued behind a failure end with it (RayActorError, StepFailed): taken here,
            # so that Ray does not report them unhandled after the error that ended the run
            left = [ref for refs in self._queued for ref in refs.values()]
            self._queued = []
            for ref in ray.wait(left, num_returns=len(left), timeout=5.0)[0] if left else ():
                try:
                    ray.get(ref)
                except Exception:  # noqa: BLE001 - what ended the run was raised already
                    pass
            self.workers = []
            if self.placed is not None:
                ray.util.remove_placement_group(self.placed.placement_group)
                self.placed = None

    def __enter__(self) -> "PipelineRun":
        self.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.failed = self.failed or exc_type is not None
        self.close()

    def _gather(self, refs: dict[int, Any], what: str, timeout_s: float, grace_s: float = 3.0) -> list[Any]:
        """Every rank's result of ``refs`` in rank order, waiting at most ``timeout_s``. The first
        failure gives the others ``grace_s`` to report theirs; then a ``PipelineError`` names each
        failed rank (deaths first) and each still running."""
        by_ref = {ref: r for r, ref in refs.items()}
        pending = list(refs.values())
        results: dict[int, Any] = {}
        failures: list[tuple[int, int, str]] = []  # (order: death first, rank, message)
        deadline = time.monotonic() + timeout_s
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            for ref in ready:
                r = by_ref[ref]
                try:
                    results[r] = ray.get(ref)
                except RayActorError as e:
                    failures.append((0, r, f"{self.name(r)} died during {what}: {_first_line(e)}"))
                except RayTaskError as e:
                    failures.append((1, r, f"{self.name(r)} failed during {what}: {_cause(e)}"))
                except GetTimeoutError:  # pragma: no cover (ray.wait said it was ready)
                    pending.append(ref)
            if failures and deadline > time.monotonic() + grace_s:
                deadline = time.monotonic() + grace_s
        if failures or pending:
            hung = sorted(by_ref[ref] for ref in pending)
            lines = [msg for _, _, msg in sorted(failures)]
            if hung:
                limit = "" if failures else f" within {timeout_s:g} s"
                lines.append(f"{', '.join(self.name(r) for r in hung)} did not finish {what}{limit}")
            self.failed = True
            raise PipelineError("pipeline: " + "; ".join(lines))
        return [results[r] for r in sorted(results)]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _cause(e: RayTaskError) -> str:
    """The worker's own exception, not Ray's wrapping of it."""
    cause = e.as_instanceof_cause() if hasattr(e, "as_instanceof_cause") else e
    inner = getattr(cause, "cause", None)
    if isinstance(inner, BaseException):
        return f"{type(inner).__name__}: {_first_line(inner)}"
    return _first_line(e)


def run_pipeline(*, model: ModelConfig | dict | None = None, schedule: str = "1f1b", num_ranks: int = 2,
                 dp: int = 1, num_microbatches: int = 4, micro_batch_size: int = 2, seq_len: int = 16,
                 num_steps: int = 3, seed: int = 0, lr: float = 1e-3, partition: Sequence[int] | None = None,
                 stages_per_rank: int = 2, data: DataConfig | None = None, timeout_s: float = 60.0,
                 step_timeout_s: float = 300.0, num_threads: int = 1, pin_cores: bool = False,
                 num_cpus_per_worker: float = 1.0, optimizer: OptimizerSpec | Mapping[str, Any] | None = None,
                 lr_at: Callable[[int], float | Sequence[float]] | None = None, programs: Schedule | None = None,
                 assignments: Sequence[Any] | None = None,
                 on_step: Callable[[int, float, list[StepResult], float], None] | None = None,
                 start_step: int = 0, states: Mapping[int, dict] | None = None,
                 save_after: Callable[[int], bool] | None = None,
                 on_states: Callable[[int, dict[int, dict]], None] | None = None,
                 dtype: str = "fp32", offload: str | Sequence[str] | None = None, nvme_dir: str | None = None,
                 offload_chunk_elems: int | None = None, zero: int = 0,
                 activations: str | Sequence[Sequence[str]] | None = None,
                 zero_bucket_elems: int | None = None, max_grad_norm: float | None = None) -> PipelineResult:
    """Train ``num_steps`` steps of ``model`` over ``num_ranks`` pipeline ranks × ``dp``
    replicas on the current Ray (the caller ran ``ray.init``). ``model``: a ``ModelConfig`` or its
    fields as a dict (default: the tiny GPT); ``partition``: blocks per stage (default: even);
    ``optimizer``: each stage's optimizer (default: AdamW at ``lr``, torch's defaults);
    ``lr_at(step)``: the learning rate of each 0-based step, one number or one per parameter
    group (default: each group's own);
    ``programs``: each pipeline rank's program (a plan's ``schedule``; default: the schedule's
    lowering, ``stage_programs``); ``assignments``: per world rank, a ``ray_cluster.Assignment``
    (its node and resources; default: anywhere with ``num_cpus_per_worker`` CPUs);
    ``on_step(step, loss, results, wall_s)`` after each step (``wall_s``: the driver's time from the
    previous step's results to these); ``timeout_s``: the longest a transfer or collective waits; ``step_timeout_s``: the
    longest the driver waits for a step.
    ``start_step`` and ``states`` (per world rank, ``StageWorker.state``) continue a run from a
    checkpoint; after each step ``k`` (1-based count of steps done) for which ``save_after(k)``,
    the ranks' states go to ``on_states(k, states)``. ``dtype``: ``fp32`` or ``bf16`` (autocast).
    Each worker computes on the GPU its placement gave it, else on the CPU. ``offload``: where
    each stage's model states live between steps (one of ``device``, ``host``, ``nvme`` for all,
    or one per stage; ``PipelineSpec.offload``), ``nvme_dir`` the directory of the ``nvme`` ones
    on every node; ``zero``: 1 shards the optimizer states across the replicas (ZeRO-1,
    ``PipelineSpec.zero``), 2 the gradients too (ZeRO-2: a device stage's in buckets of
    ``zero_bucket_elems`` elements, default ``stage_zero.BUCKET_ELEMS``, an offloaded stage's
    chunk by chunk, runtime.stage_offload_zero); ``activations``: what
    each block does with its saved activations (``keep``, ``recompute``, ``swap_host``,
    ``swap_nvme``: one for every block, or per stage a policy per block;
    ``PipelineSpec.activations``, runtime.stage_activations); swapped blocks add their
    ``SWAP_OUT``/``SWAP_IN`` to the programs (planner.pipeline ``add_swap_points``).
    ``pin_cores``: each CPU worker binds itself to a core of its own (the embedded Ray's runs;
    runtime.stage_device [Note: a worker per core]).
    ``max_grad_norm``: clip each step's gradients to that global 2-norm, as one process's
    ``torch.nn.utils.clip_grad_norm_`` (the programs get their ``CLIP``, planner.pipeline
    ``add_clip_points``; runtime.stage_clip); ``optimizer.param_groups`` name the whole model's
    parameters (runtime.stage_groups)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule: must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if dtype not in PIPELINE_DTYPES:
        raise ConfigError(f"train.dtype: the pipeline workers train in {' or '.join(PIPELINE_DTYPES)}, got {dtype!r}; "
                          "fp16 needs a loss scale the ranks agree on (not yet): use bf16")
    for name, value in (("num_ranks", num_ranks), ("dp", dp), ("num_microbatches", num_microbatches),
                        ("micro_batch_size", micro_batch_size), ("seq_len", seq_len), ("num_steps", num_steps)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}: must be a whole number >= 1, got {value!r}")
    model_cfg = model if isinstance(model, ModelConfig) else ModelConfig(**(model or {}))
    if model_cfg.source != "gpt":
        raise ConfigError(f"model.source: the pipeline runs the built-in gpt family, got {model_cfg.source!r}")
    optim = OptimizerSpec.from_value(optimizer) if optimizer is not None else OptimizerSpec(lr=lr)
    clip = check_max_norm(max_grad_norm)
    try:
        place, lowered = stage_programs(schedule, num_ranks, num_microbatches, stages_per_rank=stages_per_rank,
                                        zero=zero if zero in (0, 1, 2) else 0)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if programs is None:
        programs = add_clip_points(lowered) if clip is not None else lowered
    else:
        programs = {r: tuple(programs[r]) for r in range(num_ranks)}
        problem = validate_pipeline({r: tuple(a for a in acts if a.op not in _STEP_POINTS)
                                     for r, acts in programs.items()}, place, num_microbatches)
        if problem is not None:
            raise ConfigError(f"programs: {schedule} over {num_ranks} ranks cannot run them: {problem}")
        if zero == 2:  # a plan's programs: each stage's REDUCE_SCATTER, where the plan has none
            programs = add_reduce_scatter_points(programs, range(place.num_stages))
        if clip is not None:  # and its CLIP (a plan made with clipping has one already)
            programs = add_clip_points(programs)
    gcfg = gpt_config(model_cfg.preset, **model_cfg.overrides)
    check_groups(optim, param_names(gcfg))
    if gcfg.position == "learned" and seq_len > gcfg.max_seq_len:
        raise ConfigError(f"train.seq_len ({seq_len}) exceeds the model's learned position table ({gcfg.max_seq_len}); "
                          f"lower train.seq_len or set model.overrides.max_seq_len: {seq_len}")
    num_blocks = _num_blocks(model_cfg)
    parts = tuple(partition) if partition is not None else even_partition(num_blocks, place.num_stages)
    if len(parts) != place.num_stages or any(n < 1 for n in parts) or sum(parts) != num_blocks:
        raise ConfigError(f"partition: {schedule} over {num_ranks} ranks has {place.num_stages} stages; give "
                          f"{place.num_stages} block counts >= 1 summing to the model's {num_blocks} blocks, got {parts}")
    homes = _offload_homes(offload, place, model_cfg, nvme_dir, zero, offload_chunk_elems)
    _check_zero(zero, dp, homes, zero_bucket_elems)
    if assignments is None:
        need = num_ranks * dp * num_cpus_per_worker
        have = ray.cluster_resources().get("CPU", 0.0)
        if need > have:
            raise ConfigError(f"num_ranks × dp: {num_ranks * dp} workers of {num_cpus_per_worker:g} CPU need {need:g} "
                              f"CPUs, the Ray cluster has {have:g}; lower num_ranks or dp, or num_cpus_per_worker")
    elif len(assignments) != num_ranks * dp:
        raise ConfigError(f"assignments: one per worker ({num_ranks} × {dp}), got {len(assignments)}")
    if any(h != "device" for h in homes):
        programs = add_offload_points(programs, [s for s, h in enumerate(homes) if h != "device"])
    acts = _activation_policies(activations, parts, nvme_dir)
    programs = add_swap_points(programs, dict(enumerate(acts)))
    spec = PipelineSpec(model=model_cfg, partition=parts, rank_of=place.rank_of, num_ranks=num_ranks, dp=dp,
                        num_microbatches=num_microbatches, micro_batch_size=micro_batch_size, seq_len=seq_len,
                        seed=seed, data=data or DataConfig(), optimizer=optim, timeout_s=timeout_s,
                        num_threads=num_threads, pin_cores=pin_cores, dtype=dtype, offload=homes, nvme_dir=nvme_dir,
                        offload_chunk_elems=offload_chunk_elems, zero=zero, activations=acts, max_grad_norm=clip,
                        **({"zero_bucket_elems": zero_bucket_elems} if zero_bucket_elems is not None else {}))
    losses, mb_losses, records, times, peaks, walls, busy, grads, action_s, between = [], [], [], [], [], [], [], [], [], []
    norms: list[float] = []
    with PipelineRun(spec, programs, step_timeout_s=step_timeout_s, num_cpus_per_worker=num_cpus_per_worker,
                     assignments=assignments) as run:
        if states is not None:
            run.load_states(dict(states))

        def lr_of(k: int) -> float | Sequence[float] | None:
            return step_lr(optim, lr_at(k)) if lr_at is not None else None

        queued: dict[int, Any] | None = None
        mark = 0.0
        for k in range(start_step, num_steps):
            # [Note: a step queued ahead] step k + 1 waits in the workers' queues while the
            # driver takes step k's results; a checkpoint's states are queued right after step k
            if queued is None:
                queued, mark = run.submit(k, lr_of(k)), time.perf_counter()
            save = save_after is not None and on_states is not None and save_after(k + 1)
            states_refs = run.submit_states() if save else None
            short = bool(walls) and walls[-1] < QUEUE_AHEAD_MAX_S
            ahead = run.submit(k + 1, lr_of(k + 1)) if k + 1 < num_steps and short and not save else None
            results = run.collect(queued, k)
            now = time.perf_counter()
            wall, mark, queued = now - mark, now, ahead
            last = [results[d * num_ranks + place.rank_of[-1]] for d in range(dp)]
            mbs = tuple(x for res in last for x in res.losses)
            mb_losses.append(mbs)
            losses.append(sum(mbs) / len(mbs))
            records.append(tuple(res.record for res in results))
            times.append(tuple(res.time_s for res in results))
            peaks.append(tuple(res.peak_bytes for res in results))
            walls.append(wall)
            busy.append(tuple(res.busy_s for res in results))
            grads.append(tuple(res.grad_bytes for res in results))
            action_s.append(tuple(res.action_s for res in results))
            between.append(tuple(res.between_s for res in results))
            if results[0].grad_norm is not None:
                got = {res.grad_norm for res in results}
                if len(got) != 1:  # runtime.stage_clip: every rank takes the same norm
                    raise PipelineError(f"pipeline: step {k + 1}: the ranks' global gradient norms differ: "
                                        f"{sorted(got)}")
                norms.append(results[0].grad_norm)
            if on_step is not None:
                on_step(k, losses[-1], results, wall)
            if states_refs is not None:
                on_states(k + 1, run.collect_states(states_refs))
        nodes = run.nodes
        held = tuple(run.state_bytes())
    devices = tuple(r.device for r in results) if num_steps > start_step else ()
    return PipelineResult(losses=tuple(losses), microbatch_losses=tuple(mb_losses), records=tuple(records),
                          step_times_s=tuple(times),
                          programs=tuple(tuple(str(a) for a in programs[r]) for r in range(num_ranks)),
                          peak_bytes=tuple(peaks), nodes=nodes, devices=devices, step_wall_s=tuple(walls),
                          busy_s=tuple(busy), state_bytes=held, grad_bytes=tuple(grads),
                          action_s=tuple(action_s), grad_norms=tuple(norms), between_s=tuple(between))


_STEP_POINTS = (Op.ALLREDUCE, Op.OPTIM, Op.PREFETCH, Op.OFFLOAD, Op.SWAP_OUT, Op.SWAP_IN, Op.REDUCE_SCATTER, Op.CLIP)
"""A program's actions outside the schedule's compute and transfers (what ``validate_pipeline`` skips)."""


def _offload_homes(offload: str | Sequence[str] | None, place: Placement, model: ModelConfig, nvme_dir: str | None,
                   zero: int, chunk_elems: int | None) -> tuple[str, ...]:
    """``offload`` checked, one home per stage."""
    n = place.num_stages
    homes = (offload or "device",) * n if offload is None or isinstance(offload, str) else tuple(offload)
    if len(homes) != n or any(h not in OFFLOAD_HOMES for h in homes):
        raise ConfigError(f"offload: one of {', '.join(OFFLOAD_HOMES)} for all stages, or one per stage ({n}), "
                          f"got {offload!r}")
    if zero not in (0, 1, 2) or isinstance(zero, bool):
        raise ConfigError(f"zero: 0 (every replica keeps all optimizer states), 1 (ZeRO-1) or 2 (ZeRO-2), got {zero!r}")
    if chunk_elems is not None and (not isinstance(chunk_elems, int) or chunk_elems < 1):
        raise ConfigError(f"offload_chunk_elems: a whole number >= 1 or None, got {chunk_elems!r}")
    if "nvme" in homes and not nvme_dir:  # each worker checks its node has the directory's parent
        raise ConfigError("nvme_dir: nvme stages keep their files there; give a directory on each node's local disk")
    last = n - 1
    tied = gpt_config(model.preset, **model.overrides).tie_embeddings
    if tied and place.rank_of[0] == place.rank_of[last] and {homes[0], homes[last]} != {"device"}:
        raise ConfigError(f"offload: stages 0 and {last} share the tied embeddings on rank {place.rank_of[0]}; keep "
                          "both on the device, or set model.overrides.tie_embeddings: false")
    return homes


def _activation_policies(activations: str | Sequence[Sequence[str]] | None, parts: tuple[int, ...],
                         nvme_dir: str | None) -> tuple[tuple[str, ...], ...]:
    """``activations`` checked, per stage a policy per block (empty: every block keeps them)."""
    if not activations or activations == "keep":
        return ()
    acts = (tuple((activations,) * n for n in parts) if isinstance(activations, str)
            else tuple(tuple(str(p) for p in ps) for ps in activations))
    if len(acts) != len(parts) or any(len(ps) != n or not set(ps) <= set(ACT_POLICIES) for ps, n in zip(acts, parts)):
        raise ConfigError(f"activations: one of {', '.join(ACT_POLICIES)} for every block, or per stage one per block "
                          f"(blocks per stage {list(parts)}), got {activations!r}")
    if "swap_nvme" in {p for ps in acts for p in ps} and not nvme_dir:
        raise ConfigError("nvme_dir: swap_nvme blocks write their activations there; give a directory on each "
                          "node's local disk (parallel.nvme_dir)")
    return acts


def _check_zero(zero: int, dp: int, homes: tuple[str, ...], bucket_elems: int | None) -> None:
    """ZeRO shards across replicas (dp >= 2); ZeRO-2's buckets have a size >= 1."""
    if zero and dp == 1:
        raise ConfigError(f"zero: {zero} shards across the data-parallel replicas and dp is 1; use dp >= 2 or zero 0")
    if bucket_elems is not None and (isinstance(bucket_elems, bool) or not isinstance(bucket_elems, int)
                                     or bucket_elems < 1):
        raise ConfigError(f"zero_bucket_elems: a whole number >= 1 or None, got {bucket_elems!r}")


def _num_blocks(cfg: ModelConfig) -> int:
    """The model's blocks: embedding, each layer, head."""
    return gpt_config(cfg.preset, **cfg.overrides).num_layers + 2
