"""Measure a pipeline's costs on the workers before planning it: the blocks' passes and optimizer
steps, the link between two workers and Ray's round trip (planner.measured [Note: measured
pipeline]); ``memtrain run`` plans with them (runtime.distributed), and bench/pipeline.py times
with the same functions.

- **Blocks** (``measure_blocks``): a ``StageWorker`` of one rank holding every block as a stage of
  its own runs the step's program (per micro-batch the forwards through every block, then the
  backwards, then each block's gradient sum and optimizer step) for a warm-up and a few steps, on
  the workers' threads; each action's time is the worker's own (``StepResult.action_s``), the
  step's rest (the batch, the bookkeeping) what is left of its wall time. A model of more than
  ``MAX_TIMED_LAYERS`` layers is timed with that many (a GPT's layers are alike), the figures of
  its layers repeated, so the timing is short and fits one worker.
- **Link** (comm.link_probe): two actors on the first two devices of the run join a gloo world and
  pass tensors as the workers do.
- **Round trip**: a no-op call of an actor, the driver's part of every step.

``measure_pipeline`` does all three on two ``ProbeActor`` actors placed as the run's first two
workers will be (both time the blocks at once and their mean is kept; only the first's when the two
are of different kinds), in a few seconds for a small model.

[Note: where the probe's time goes] Measured (bench/probe_startup.py, the tiny example, 2 cores
at load averages 4-13, 6-19 s in all): the probes' start, a Ray worker process each importing
torch, 3.4-10.5 s; the blocks' build (torch's first optimizer and meta-device calls import
``torch._dynamo``; the model; stage_worker's import) 1.5-3.2 s; the measuring itself 0.5-1.1 s
(the link and round trip 0.4-0.7 s, the steps with their warm-up 0.1-0.4 s). The imports are each
process's once, the two probes paying them at once, and the measuring is a tenth of the time,
its rounds kept (fewer samples would widen the figures' spread). What else was overhead is cut:
the driver's own model analysis (0.15-2 s) runs while the probes start (``model_name`` as a
callable), and the store is opened in the same wait as the probes' start. The run's workers are
new processes and pay the imports again: a probe is not reused as a worker (its placement group
holds two bundles of the run's, and a worker's spec and program come from the plan these figures
make).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from memtrain.comm.link_probe import trimmed_mean
from memtrain.config import DataConfig, ModelConfig
from memtrain.models.gpt import gpt_config
from memtrain.optimizers import OptimizerSpec
from memtrain.planner.measured import MAX_TIMED_LAYERS, BlockCosts, MeasuredPipeline
from memtrain.planner.plan import Action, Op

__all__ = ["measure_blocks", "ray_step_gap_s", "ProbeActor", "measure_pipeline", "MAX_TIMED_LAYERS"]

LINK_BYTES = 4 << 20
"""The bandwidth probe's tensor."""
TRIM = 0.25
"""The share of an action's timings left out at each end (the interquartile mean)."""


def _one_rank_program(num_blocks: int, m: int, split: bool) -> tuple[Action, ...]:
    """One rank holding every block as a stage of its own: per micro-batch, the forwards through
    every block, then the backwards (and ``W``s) back; then each block's gradient sum and step."""
    acts: list[Action] = []
    for i in range(m):
        acts += [Action(s, Op.F, i) for s in range(num_blocks)]
        acts += [Action(s, Op.B, i) for s in reversed(range(num_blocks))]
        if split:
            acts += [Action(s, Op.W, i) for s in reversed(range(num_blocks))]
    return tuple(acts) + tuple(Action(s, op) for s in range(num_blocks) for op in (Op.ALLREDUCE, Op.OPTIM))


def _time_actions(model: ModelConfig, num_blocks: int, *, m: int, b: int, seq: int, seed: int,
                  optimizer: OptimizerSpec, split: bool, steps: int, dtype: str, num_threads: int,
                  data: DataConfig | None, phases: dict[str, float] | None = None
                  ) -> tuple[dict[tuple[Op, int], float], float, str]:
    """Mean time per (op, block) over ``steps`` steps after one warm-up (the interquartile mean),
    the rest's likewise, and where the worker computed; ``phases`` gets the seconds of the
    worker's build, its import included (``build_s``), and of its steps, the warm-up's included
    (``steps_s``), added."""
    t0 = time.perf_counter()
    from memtrain.runtime.stage_worker import PipelineSpec, StageWorker

    spec = PipelineSpec(model=model, partition=(1,) * num_blocks, rank_of=(0,) * num_blocks, num_ranks=1, dp=1,
                        num_microbatches=m, micro_batch_size=b, seq_len=seq, seed=seed, optimizer=optimizer,
                        timeout_s=60.0, num_threads=num_threads, dtype=dtype, data=data or DataConfig())
    program = _one_rank_program(num_blocks, m, split)
    worker = StageWorker(spec, 0, program)
    threads = torch.get_num_threads()
    by_action: dict[tuple[Op, int], list[float]] = defaultdict(list)
    rests: list[float] = []
    device = "cpu"
    try:
        worker.build(*worker.open_store("127.0.0.1"))
        t1 = time.perf_counter()
        if worker.device.type == "cuda":  # each action's time is its kernels' too: wait for them in it
            worker.handlers = {op: _synced(h, worker.device) for op, h in worker.handlers.items()}
        for k in range(steps + 1):
            res = worker.run_step(k)
            device = res.device
            if k == 0:
                continue  # warm-up: allocator, first-call paths
            rests.append(res.time_s - sum(res.action_s))
            this_step: dict[tuple[Op, int], list[float]] = defaultdict(list)
            for a, dt in zip(program, res.action_s):
                this_step[(a.op, a.stage)].append(dt)
            for key, times in this_step.items():  # [Note: a step's mean]
                by_action[key].append(statistics.fmean(times))
        if phases is not None:
            phases["build_s"] = phases.get("build_s", 0.0) + t1 - t0
            phases["steps_s"] = phases.get("steps_s", 0.0) + time.perf_counter() - t1
    finally:
        worker.close()
        torch.set_num_threads(threads)
    # [Note: mean, not median] (comm.link_probe): a step pays every action's time, preempted or not;
    # but an action once per step (an optimizer step, the rest) has a few samples, one of which a
    # preemption can take to 5x the others (measured): the interquartile mean.
    # [Note: a step's mean] over the steps of each step's mean over its micro-batches: a block's
    # first forward and backward of a step cost more (a kept stage counts its saved bytes under
    # hooks then, runtime.stage_keep: +0.5 ms of the tiny example's 0.6 ms forward), every step
    # pays them, and a trim over the micro-batches' samples would drop them as outliers
    return {k: trimmed_mean(v, TRIM) for k, v in by_action.items()}, trimmed_mean(rests, TRIM), device


def _synced(handler: Callable[[Action], None], device: torch.device) -> Callable[[Action], None]:
    def run(a: Action) -> None:
        handler(a)
        torch.cuda.synchronize(device)
    return run


def measure_blocks(model: ModelConfig, *, m: int, b: int, seq: int, seed: int = 0,
                   optimizer: OptimizerSpec | None = None, steps: int = 2, split: bool | None = None,
                   base: BlockCosts | None = None, dtype: str = "fp32", num_threads: int = 1,
                   data: DataConfig | None = None, max_layers: int | None = None,
                   phases: dict[str, float] | None = None) -> tuple[BlockCosts, str]:
    """Each block's costs (``BlockCosts``) and where they were timed: one run with the backward
    whole, one split; or, with ``split``, only that form's run, the other form's figures kept
    from ``base`` (without it, a split backward's parts are half the whole one). ``max_layers``:
    time at most that many layers and repeat their mean for the others (module doc); ``phases``
    gets the seconds of the workers' builds and steps ([Note: where the probe's time goes])."""
    cfg = gpt_config(model.preset, **model.overrides)
    layers = cfg.num_layers if max_layers is None else max(1, min(cfg.num_layers, max_layers))
    timed = model if layers == cfg.num_layers else ModelConfig(
        source=model.source, preset=model.preset, overrides={**model.overrides, "num_layers": layers})
    n = layers + 2
    optimizer = optimizer or OptimizerSpec()
    runs, device = {}, "cpu"
    for mode in ((False, True) if split is None else (split,)):
        times, rest, device = _time_actions(timed, n, m=m, b=b, seq=seq, seed=seed, optimizer=optimizer, split=mode,
                                            steps=steps, dtype=dtype, num_threads=num_threads, data=data,
                                            phases=phases)
        runs[mode] = (times, rest)

    def per_block(mode: bool, *ops: Op) -> tuple[float, ...]:
        times = [sum(runs[mode][0][(op, s)] for op in ops) for s in range(n)]
        if layers == cfg.num_layers:
            return tuple(times)
        mean = statistics.fmean(times[1:-1])  # the layers are alike: the timed ones' mean for each
        return (times[0], *([mean] * cfg.num_layers), times[-1])

    main = False if False in runs else True
    whole = per_block(False, Op.B) if False in runs else base.bwd_s if base is not None else None
    b_s = per_block(True, Op.B) if True in runs else base.b_s if base is not None else None
    w_s = per_block(True, Op.W) if True in runs else base.w_s if base is not None else None
    if whole is None:  # only the split form timed, no base
        whole = tuple(x + y for x, y in zip(b_s, w_s))
    if b_s is None or w_s is None:
        b_s = w_s = tuple(x / 2 for x in whole)
    costs = BlockCosts(fwd_s=per_block(main, Op.F), bwd_s=whole, b_s=b_s, w_s=w_s,
                       optim_s=per_block(main, Op.ALLREDUCE, Op.OPTIM), rest_s=runs[main][1],
                       # fp32 under bf16 too: autocast leaves the residual stream fp32 (planner.stage_cost
                       # ``StageModel.boundary_bytes``)
                       output_bytes=b * seq * cfg.hidden_size * 4)
    return costs, device


def mean_costs(runs: Sequence[BlockCosts]) -> BlockCosts:
    """The figures of several workers' timings, each the mean of theirs."""
    def mean(name: str) -> tuple[float, ...]:
        return tuple(statistics.fmean(vals) for vals in zip(*(getattr(c, name) for c in runs)))

    return BlockCosts(fwd_s=mean("fwd_s"), bwd_s=mean("bwd_s"), b_s=mean("b_s"), w_s=mean("w_s"),
                      optim_s=mean("optim_s"), rest_s=statistics.fmean(c.rest_s for c in runs),
                      output_bytes=runs[0].output_bytes)


QUEUE_FILL_S = 0.05
"""How long the first of ``ray_step_gap_s``'s calls holds each actor while the rest queue behind it."""


def ray_step_gap_s(actors: Sequence[Any] = (), repeats: int = 20) -> float:
    """Ray's part of each step on a worker: the time from the end of one call to the start of
    the next waiting in its queue, as each step waits behind the one before (runtime.pipeline_driver
    [Note: a step queued ahead]), which the workers' own step times leave out. ``repeats`` no-op
    calls are queued on every one of ``actors`` (actors with ``stamp``; default: one new one)
    behind a call that holds it ``QUEUE_FILL_S``; the median gap between consecutive calls, the
    slowest actor's."""
    import ray

    own = not actors
    if own:
        actors = [ray.remote(num_cpus=0)(ProbeActor).remote()]
    try:
        ray.get([a.stamp.remote() for a in actors], timeout=120)  # the actors' start
        queued = [[a.stamp.remote(QUEUE_FILL_S)] + [a.stamp.remote() for _ in range(repeats)] for a in actors]
        gaps = []
        for refs in queued:
            stamps = ray.get(refs, timeout=30)
            gaps.append(statistics.median(nxt[0] - prev[1] for prev, nxt in zip(stamps, stamps[1:])))
        return max(gaps)
    finally:
        if own:
            ray.kill(actors[0])


class ProbeActor:
    """A Ray actor that measures where a worker of the run will be: the link (as one of two
    ranks of a gloo world), the blocks (``measure_blocks``), its node's load."""

    def __init__(self) -> None:
        self._store = None

    def ping(self) -> int:
        return os.getpid()

    def stamp(self, hold_s: float = 0.0) -> tuple[float, float]:
        """When this call started and ended on the actor's clock, held ``hold_s`` (``ray_step_gap_s``)."""
        t0 = time.perf_counter()
        if hold_s:
            time.sleep(hold_s)
        return t0, time.perf_counter()

    def pin(self, index: int) -> int | None:
        """Bind this actor to a core as the run's worker ``index`` will be, where it computes on
        the CPU (``stage_device.pin_to_core``); None: on a GPU, not bound."""
        from memtrain.runtime.stage_device import pin_to_core, worker_device

        return pin_to_core(index) if worker_device().type == "cpu" else None

    def node(self) -> dict:
        """This node's address, cores and 1-minute load average."""
        from memtrain.runtime.stage_worker import _node_ip

        return {"address": _node_ip(), "num_cpus": os.cpu_count() or 1, "load_avg": os.getloadavg()[0]}

    def open_store(self, timeout_s: float) -> tuple[str, int]:
        from memtrain.comm import host_store
        from memtrain.runtime.stage_worker import _node_ip

        host = _node_ip()
        self._store = host_store(host, 2, timeout_s)
        return host, self._store.port

    def link(self, rank: int, host: str, port: int, timeout_s: float, num_bytes: int, repeats: int) -> dict:
        """Join the two-rank world, probe the link (comm.link_probe), leave."""
        from memtrain.comm import Rendezvous, join, leave
        from memtrain.comm.link_probe import probe_rank

        torch.set_num_threads(1)
        join(rank, Rendezvous(host=host, port=port, world_size=2, timeout_s=timeout_s), self._store)
        try:
            return probe_rank(rank, num_bytes=num_bytes, repeats=repeats, timeout_s=timeout_s)
        finally:
            leave()
            self._store = None

    def blocks(self, **kwargs: Any) -> tuple[BlockCosts, str, dict[str, float]]:
        """``measure_blocks`` here, with the seconds of its build and of its steps."""
        phases: dict[str, float] = {}
        costs, device = measure_blocks(**kwargs, phases=phases)
        return costs, device, phases


def measure_pipeline(*, model: ModelConfig, device_kind: str, micro_batch_size: int, num_microbatches: int,
                     seq_len: int, dtype: str, model_key: str, model_name: str | Callable[[], str],
                     optimizer: OptimizerSpec,
                     split: bool, assignments: Sequence[Any], seed: int = 0, num_threads: int = 1,
                     data: DataConfig | None = None, timeout_s: float = 60.0, steps: int = 8, repeats: int = 20,
                     same_kind: bool = True, pin_cores: bool = False,
                     progress: Callable[[str], None] = print) -> MeasuredPipeline:
    """Measure the blocks, the link and the round trip on two ``ProbeActor``s placed as
    ``assignments`` (``ray_cluster.Assignment``s of the run's first two workers), both timing
    the blocks (``split``: the split backward too; ``same_kind``: the two workers' devices are of
    one kind, so their figures are averaged, else the first's are kept); Ray must be connected.
    A callable ``model_name`` is called while the probes start ([Note: where the probe's time goes]);
    ``pin_cores``: bind the two to cores as the run's first two workers will be."""
    import ray

    from memtrain.runtime.ray_cluster import place_workers

    assert len(assignments) >= 2, "the link is probed between two workers"
    t0 = time.perf_counter()

    def at() -> str:
        return f"{time.perf_counter() - t0:.1f} s"

    progress("  starting two probes where the first two workers will run")
    placed = place_workers(ProbeActor, list(assignments)[:2], timeout_s=timeout_s)
    try:
        a, b = placed.actors
        if callable(model_name):  # the driver's own work while the probes start
            model_name = model_name()
        (host, port), _ = ray.get([a.open_store.remote(timeout_s), b.ping.remote()], timeout=timeout_s)
        if pin_cores:  # as the run's ranks 0 and 1 will be (runtime.stage_device [Note: a worker per core])
            ray.get([a.pin.remote(0), b.pin.remote(1)], timeout=timeout_s)
        started = time.perf_counter() - t0
        progress(f"  [{at()}] the probes started; the link between them ({repeats} round trips of 4 bytes and of "
                 f"{LINK_BYTES >> 20} MiB, {repeats} late receives)")
        got = ray.get([w.link.remote(r, host, port, timeout_s, LINK_BYTES, repeats) for r, w in enumerate((a, b))],
                      timeout=timeout_s * 4)
        from memtrain.comm.link_probe import link_figures

        latency, gbps, recv, send = link_figures(got[0], got[1], LINK_BYTES)
        rtt = ray_step_gap_s((a, b), repeats)
        linked = time.perf_counter() - t0
        forms = "both forms of the backward, " if split else ""
        progress(f"  [{at()}] the blocks on both at once ({forms}{steps} steps of "
                 f"{num_microbatches} micro-batches after a warm-up)")
        # both at once, as the run's workers compute: on a machine whose cores others use too, they
        # slow each other as they will in the run
        both = ray.get([w.blocks.remote(
            model=model, m=num_microbatches, b=micro_batch_size, seq=seq_len, seed=seed, optimizer=optimizer,
            steps=steps, split=None if split else False, dtype=dtype, num_threads=num_threads, data=data,
            max_layers=MAX_TIMED_LAYERS) for w in (a, b)], timeout=max(timeout_s, 300.0))
        # the planner applies the figures to devices of the first worker's kind
        costs, device = (mean_costs([c for c, _, _ in both]) if same_kind else both[0][0]), both[0][1]
        phases = both[0][2]
        progress(f"  [{at()}] the probes' start {started:.1f} s, the link and round trip {linked - started:.1f} s, "
                 f"the blocks {time.perf_counter() - t0 - linked:.1f} s (their build, torch's first calls, "
                 f"{phases.get('build_s', 0.0):.1f} s; the steps {phases.get('steps_s', 0.0):.1f} s)")
        nodes = ray.get([a.node.remote(), b.node.remote()], timeout=timeout_s)
    finally:
        for actor in placed.actors:
            ray.kill(actor, no_restart=True)
        ray.util.remove_placement_group(placed.placement_group)
    return MeasuredPipeline(
        device_kind=device_kind, device=device, num_threads=num_threads, model_key=model_key, model_name=model_name,
        seq_len=seq_len, dtype=dtype, micro_batch_size=micro_batch_size, num_microbatches=num_microbatches,
        blocks=costs, split_timed=split, link_latency_s=latency, link_gbps=gbps, link_recv_s=recv, link_send_s=send,
        round_trip_s=rtt,
        link_across_nodes=placed.node_ids[0] != placed.node_ids[1], machine=nodes[0]["address"],
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), load_avg=nodes[0]["load_avg"],
        num_cpus=nodes[0]["num_cpus"], elapsed_s=time.perf_counter() - t0)


def measured_for_run(cfg: Any, kinds: Sequence[str], assignments: Sequence[Any], out_dir: Any,
                     print_fn: Callable[[str], None] = print, pin_cores: bool = False) -> MeasuredPipeline | None:
    """The measured figures ``cfg``'s pipeline run plans with (config ``parallel.profile``): the
    file it names; or, under ``auto`` when the run's devices (``kinds``, one per worker placed as
    ``assignments``) are all CPUs, or under ``measure``, measured now on the first two workers'
    places and kept in ``out_dir/pipeline-profile.json``; None under ``catalog`` or when ``auto``
    finds a device that is not a CPU. Progress goes to ``print_fn``."""
    from pathlib import Path

    from memtrain.errors import UserError
    from memtrain.planner.analyze import analyze
    from memtrain.planner.measured import MEASURED_FILE, load_measured, save_measured
    from memtrain.planner.pipeline import SPLIT_W_SCHEDULES
    from memtrain.planner.profile_format import model_key

    par, train = cfg.parallel, cfg.train
    key = model_key(cfg.model, train.seq_len, train.dtype)
    if par.profile_file is not None:
        measured = load_measured(par.profile_file)
        why = measured.mismatch(key)
        if why:
            raise UserError(f"parallel.profile: {par.profile_file} was {why}, not this config's; set parallel.profile: "
                            "auto to measure this model")
        print_fn(f"memtrain: figures measured on the workers from {par.profile_file} ({measured.created}): "
                 f"{measured.summary()}")
        return measured
    if par.profile == "catalog" or (par.profile == "auto" and any(k != "cpu" for k in kinds)) or len(assignments) < 2:
        return None
    d = max(par.data, 1)
    mbs = (train.global_batch_size // (d * par.microbatches) if par.microbatches else train.micro_batch_size) or 1
    m = par.microbatches or max(train.global_batch_size // (d * mbs), 1)
    split = par.schedule in SPLIT_W_SCHEDULES or par.schedule == "auto"
    why = "the workers compute on CPUs" if par.profile == "auto" else "parallel.profile: measure"
    print_fn(f"memtrain: measuring the pipeline's costs on the workers before planning ({why}; "
             "parallel.profile: catalog uses the catalog's figures)")
    import ray

    from memtrain.comm import CommError

    try:
        measured = measure_pipeline(
            model=cfg.model, device_kind=kinds[0], micro_batch_size=mbs, num_microbatches=m, seq_len=train.seq_len,
            dtype=train.dtype, model_key=key, split=split, same_kind=len(set(kinds[:2])) == 1,
            model_name=lambda: analyze(cfg.model, seq_len=train.seq_len, micro_batch_size=1, dtype=train.dtype).name,
            # groups change no timing, and the timed model (MAX_TIMED_LAYERS) has other names than the run's
            optimizer=dataclasses.replace(train.optimizer, param_groups=[]).spec(),
            assignments=assignments, seed=train.seed, data=cfg.data, timeout_s=min(par.comm_timeout_s, 120.0),
            pin_cores=pin_cores, progress=lambda line: print_fn(f"memtrain: {line.strip()}"))
    except (ray.exceptions.RayError, CommError) as e:  # a probe that failed: the run can still train
        text = str(e).strip().splitlines()
        print_fn(f"memtrain: warning: measuring failed ({type(e).__name__}: {text[0] if text else ''}); planning with "
                 "the catalog's figures (parallel.profile: catalog skips measuring)")
        return None
    out = Path(out_dir) / MEASURED_FILE
    save_measured(measured, out)
    print_fn(f"memtrain: measured in {measured.elapsed_s:.1f} s (load average {measured.load_avg:.1f} on "
             f"{measured.num_cpus} cores): {measured.summary()}; kept in {out} (parallel.profile: {out} reuses it)")
    return measured
