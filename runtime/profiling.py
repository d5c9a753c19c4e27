"""The profiler: measure this machine and the configured model, and keep it as a Parquet file.

``memtrain profile`` measures per-block forward and backward time for a few micro-batch sizes
on the device (a CUDA GPU when present, else the CPU, which is then the device tier), host↔device
copy bandwidth, device memory bandwidth, NVMe read/write bandwidth at the configured path through
the NVMe store as the runtime streams chunks (real files, O_DIRECT or the page cache dropped,
fdatasync; ``runtime.disk_probe`` [Note: the store's bandwidth, not one stream's]) and the fixed
cost of one request there, the CPU AdamW throughput, and device facts (nvidia-ml-py, psutil),
and the runtime's own overhead per block call and per parameter tensor
(``measure_runtime_overhead``). The result is a versioned Parquet file keyed by a machine
fingerprint and a model key; ``memtrain plan`` and ``run`` use a matching profile instead of the
catalog figures and say which they used.

The last block is timed together with the loss (``BuiltModel.loss_fn`` on its output): the
runtime runs the loss between the head's forward and backward, and the analysis counts the
loss's FLOPs with the head too.

Every probe repeats its measurement; one whose repeats spread too far, or that ran while other
processes loaded the machine, is measured again, and if it stays unreliable the profile keeps it
with a warning that ``memtrain plan`` and ``run`` show (``planner.measure``).

The file and its identity (``Profile``, ``save_profile``/``load_profile``, ``find_profile``,
``machine_id``, ``model_key``) are ``planner.profile_format``; the runtime-overhead probe is
``runtime.overhead_probe``, the NVMe probes ``runtime.disk_probe``; all are re-exported here.
How the planner uses a profile is ``planner.profile_inputs.apply_profile``. The profiler lives in
``runtime/`` because it runs the runtime's own machinery (the engine through ``wrap()``, the NVMe
store, the host AdamW kernel), which the planner's layers may not import (docs/DESIGN.md, Layers).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from memtrain.offload.bufpool import keep_heap_top
from memtrain.planner.measure import (
    MAX_DISK_SPREAD, MAX_ROUNDS, RETRY_WAIT_S, LoadMeter, ProbeQuality, measure_reliably, spread, timed_runs,
)
from memtrain.planner.profile_format import (
    OVERHEAD_KEYS, PROBES, PROFILE_VERSION, BlockTiming, FoundProfile, Profile, ProfileError, _hash, find_profile,
    load_profile, machine_fingerprint, machine_id, model_key, model_mismatch, other_machine, profile_flag, save_profile,
)
from memtrain.runtime.disk_probe import disk_latency_probe, disk_probe, measure_disk_gbps, measure_disk_latency_s
from memtrain.runtime.overhead_probe import measure_runtime_overhead

__all__ = [
    "PROFILE_VERSION", "Profile", "ProfileError", "machine_fingerprint", "machine_id", "model_key",
    "measure_blocks", "measure_copy_gbps", "measure_disk_gbps", "measure_disk_latency_s", "measure_cpu_adam_params_per_s",
    "measure_runtime_overhead", "OVERHEAD_KEYS",
    "run_profile", "save_profile", "load_profile", "find_profile", "FoundProfile", "PROBES",
    "copy_probe", "cpu_adam_probe", "blocks_spread", "model_mismatch", "other_machine", "profile_flag",
]


# --- measurements --------------------------------------------------------------------------


def _materialize(obj, device: torch.device, vocab_size: int):
    """Random tensors shaped like the meta ``obj`` (ints become token ids)."""
    if isinstance(obj, torch.Tensor):
        if obj.dtype in (torch.int64, torch.int32):
            return torch.randint(0, vocab_size, obj.shape, device=device, dtype=obj.dtype)
        if obj.dtype == torch.bool:
            return torch.ones(obj.shape, device=device, dtype=torch.bool)
        return torch.randn(obj.shape, device=device, dtype=obj.dtype)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_materialize(o, device, vocab_size) for o in obj)
    if isinstance(obj, dict):
        return {k: _materialize(v, device, vocab_size) for k, v in obj.items()}
    return obj


def _block_signature(module: torch.nn.Module) -> str:
    shapes = [(n, tuple(p.shape), str(p.dtype)) for n, p in module.named_parameters()]
    return _hash([type(module).__name__, repr(module), shapes])


BLOCK_TIMING_S = 0.3
"""Seconds each block's forward (and forward + backward) is timed for at least. One timing stands
for every block of the same structure, so its noise is the prediction's: with a fixed 3 runs the
predicted step of ``bench/plan_accuracy.py``'s ``small/device-keep`` ranged 126-164 ms over three
runs of the bench while the measured step stayed at 151-159 ms."""


def measure_blocks(
    built,
    *,
    seq_len: int,
    dtype: torch.dtype,
    device: torch.device,
    micro_batch_sizes: Sequence[int] = (1, 2, 4),
    reps: int = 3,
    progress: Callable[[str], None] = lambda msg: None,
) -> list[BlockTiming]:
    """Time each block's forward and backward on ``device`` with real tensors.

    ``built`` is a ``memtrain.models.BuiltModel`` constructed on the meta device. Only one block
    of each distinct structure is materialised (a 70B model's 80 identical layers are timed
    once); the same figures are reported for its twins. Block inputs are captured as shapes by
    a meta forward and filled with random values of the same dtype. The last block is timed
    with ``built.loss_fn`` on its output against random labels (see the module docstring).
    """
    timings: list[BlockTiming] = []
    for mbs in micro_batch_sizes:
        captured: dict[str, tuple[tuple, dict]] = {}
        hooks = [
            blk.register_forward_pre_hook(
                lambda m, args, kwargs, _n=name: captured.setdefault(_n, (args, kwargs)), with_kwargs=True
            )
            for name, blk in built.blocks
        ]
        try:
            with torch.no_grad():
                ids = torch.zeros(mbs, seq_len, dtype=torch.long, device="meta")
                built.forward(ids)
        finally:
            for h in hooks:
                h.remove()
        done: dict[tuple[str, bool], tuple[float, float, float, float]] = {}
        last = len(built.blocks) - 1
        for pos, (name, blk) in enumerate(built.blocks):
            sig = (_block_signature(blk), pos == last)
            if sig not in done:
                progress(f"  block {name} (micro-batch {mbs}{', with the loss' if pos == last else ''})")
                loss = None
                if pos == last:
                    labels = torch.randint(0, built.vocab_size, (mbs, seq_len), device=device)
                    loss = lambda out, _labels=labels: built.loss_fn(out, _labels)  # noqa: E731
                done[sig] = _time_block(blk, captured[name], device=device, dtype=dtype, vocab=built.vocab_size, reps=reps,
                                        loss=loss)
            fwd_s, bwd_s, fwd_spread, bwd_spread = done[sig]
            timings.append(BlockTiming(block=name, micro_batch_size=mbs, fwd_s=fwd_s, bwd_s=bwd_s, fwd_spread=fwd_spread,
                                       bwd_spread=bwd_spread))
    return timings


def blocks_spread(timings: Sequence[BlockTiming]) -> float:
    """The spread of the block timings as one figure: each timing's spread weighted by its time
    (forward runs by the forward time, forward + backward runs by theirs), so a noisy block that
    is a small part of the step counts little."""
    weights = [(t.fwd_spread, t.fwd_s) for t in timings] + [(t.bwd_spread, t.fwd_s + t.bwd_s) for t in timings]
    total = sum(w for _, w in weights)
    return sum(sp * w for sp, w in weights) / total if total > 0 else 0.0


def _time_block(blk, captured, *, device, dtype, vocab, reps, loss=None) -> tuple[float, float, float, float]:
    """(forward s, backward s, forward spread, forward + backward spread) of one block; with
    ``loss``, of ``loss(block(...))``."""
    import copy

    real = copy.deepcopy(blk).to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in real.parameters():
            p.normal_(0.0, 0.02)
    real.train()
    args, kwargs = captured
    args = _materialize(args, device, vocab)
    kwargs = _materialize(kwargs, device, vocab)
    if isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
        args = (args[0].to(dtype).requires_grad_(True), *args[1:])

    def fwd():
        out = real(*args, **kwargs)
        return out if loss is None else loss(out)

    out = fwd()
    out = out[0] if isinstance(out, (tuple, list)) else out
    grad = torch.randn_like(out) if loss is None else None  # a scalar loss backpropagates 1
    fwd_runs = timed_runs(fwd, device, reps, min_total_s=BLOCK_TIMING_S)

    def fwd_bwd():
        o = fwd()
        o = o[0] if isinstance(o, (tuple, list)) else o
        o.backward(grad)

    total_runs = timed_runs(fwd_bwd, device, reps, min_total_s=BLOCK_TIMING_S)
    fwd_s, total_s = statistics.median(fwd_runs), statistics.median(total_runs)
    return fwd_s, max(total_s - fwd_s, 1e-9), spread(fwd_runs), spread(total_runs)


def measure_copy_gbps(device: torch.device, num_bytes: int = 256 * 2**20, reps: int = 5) -> dict[str, float]:
    """Host→device, device→host and device-memory copy bandwidth, GB/s (``copy_probe``'s figures)."""
    return copy_probe(device, num_bytes, reps)[0]


def copy_probe(device: torch.device, num_bytes: int = 256 * 2**20, reps: int = 5) -> tuple[dict[str, float], float]:
    """Host→device, device→host and device-memory copy bandwidth, GB/s, and the widest spread
    of the three's repeats.

    On CUDA the host side is pinned memory; on a CPU-only machine the device tier is host
    memory, so "h2d"/"d2h" are memcpy between two host buffers (what the runtime does there).
    """
    n = num_bytes // 4
    pin = device.type == "cuda"
    host = torch.empty(n, dtype=torch.float32, pin_memory=pin).fill_(1.0)
    dev = torch.empty(n, dtype=torch.float32, device=device)
    dev2 = torch.empty(n, dtype=torch.float32, device=device)
    runs = [timed_runs(lambda: dev.copy_(host, non_blocking=pin), device, reps),
            timed_runs(lambda: host.copy_(dev, non_blocking=pin), device, reps),
            timed_runs(lambda: dev2.copy_(dev), device, reps)]
    h2d, d2h, d2d = (statistics.median(r) for r in runs)
    # A device-to-device copy reads and writes every byte: 2 × bytes of memory traffic.
    return ({"h2d": num_bytes / h2d / 1e9, "d2h": num_bytes / d2h / 1e9, "device_memory": 2 * num_bytes / d2d / 1e9},
            max(spread(r) for r in runs))


def measure_cpu_adam_params_per_s(num_elems: int = 16 * 2**20, reps: int = 3) -> float:
    """Parameters per second of the host AdamW step over one flat fp32 chunk (``cpu_adam_probe``)."""
    return cpu_adam_probe(num_elems, reps)[0]


def cpu_adam_probe(num_elems: int = 16 * 2**20, reps: int = 3) -> tuple[float, float]:
    """Parameters per second of the host AdamW step over one flat fp32 chunk, and its repeats' spread.

    Uses the same step the offloaded optimizer runs on host chunks (``memtrain.offload.optim``
    when present, else torch's fused CPU AdamW over one flat tensor).
    """
    p = torch.randn(num_elems)
    g = torch.randn(num_elems)
    m = torch.zeros(num_elems)
    v = torch.zeros(num_elems)
    step = torch.tensor(0.0)
    try:
        from memtrain.offload.optim import host_adamw_step  # the runtime's own kernel

        def run():
            host_adamw_step(p, g, m, v, step, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    except ImportError:
        from torch.optim.adamw import adamw

        def run():
            adamw([p], [g], [m], [v], [], [step], foreach=False, fused=True, capturable=False,
                  differentiable=False, grad_scale=None, found_inf=None, amsgrad=False,
                  beta1=0.9, beta2=0.95, lr=1e-4, weight_decay=0.1, eps=1e-8, maximize=False)
    runs = timed_runs(run, torch.device("cpu"), reps)
    return num_elems / statistics.median(runs), spread(runs)


# --- the whole profile ----------------------------------------------------------------------


def run_profile(
    cfg, *, progress: Callable[[str], None] = print, copy_bytes: int = 256 * 2**20, disk_bytes: int = 512 * 2**20,
    adam_elems: int = 16 * 2**20, rounds: int = MAX_ROUNDS, wait_s: float = RETRY_WAIT_S,
    meter: Callable[[], object] = LoadMeter,
) -> Profile:
    """Measure everything for ``cfg`` (a ``memtrain.config.Config``) on this machine.

    ``copy_bytes``, ``disk_bytes`` and ``adam_elems`` size the bandwidth and CPU AdamW probes
    (large enough to reach steady state on real hardware; tests pass small ones). Each probe runs
    under ``planner.measure.measure_reliably``: re-measured up to ``rounds`` times, ``wait_s``
    apart, while its repeats spread too far or other processes load the machine (read by
    ``meter``); what is still unreliable is kept in ``Profile.warnings``. The runtime-overhead
    probe keeps least times, not medians, so only its load is checked; the NVMe probes are
    checked for spread only (the disk's own work shows as other processes' CPU time)."""
    from memtrain.models import build_model

    dtype_map = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = dtype_map[cfg.train.dtype]
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # CPU fp16 matmuls are not what a CPU run would use
    if device.type == "cpu":  # time blocks as the engine runs them: offload.bufpool [Note: the C heap's top]
        keep_heap_top()
    fp = machine_fingerprint()
    progress(f"profiling on {device.type} ({fp['cpu'] if device.type == 'cpu' else fp.get('gpus')})")
    quality: dict[str, ProbeQuality] = {}

    def reliably(name: str, probe, **kw):
        figures, quality[name] = measure_reliably(PROBES[name], probe, rounds=rounds, wait_s=wait_s, meter=meter,
                                                  progress=progress, **kw)
        return figures

    with torch.device("meta"):
        built = build_model(cfg.model)
    mbs_list = sorted({1, 2, max(1, min(4, cfg.train.global_batch_size))})
    progress(f"per-block forward/backward, micro-batch sizes {mbs_list}, seq_len {cfg.train.seq_len}")

    def blocks_probe():
        timings = measure_blocks(built, seq_len=cfg.train.seq_len, dtype=dtype, device=device,
                                 micro_batch_sizes=mbs_list, progress=progress)
        return timings, blocks_spread(timings)

    blocks = reliably("blocks", blocks_probe)
    progress("copy bandwidths")
    bw = dict(reliably("copy", lambda: copy_probe(device, copy_bytes)))
    nvme_cfg = next((n.nvme for n in cfg.cluster.nodes if n.nvme and n.nvme.path), None)
    if nvme_cfg is not None:
        progress(f"NVMe bandwidth at {nvme_cfg.path}")
        bw.update(reliably("nvme", lambda: disk_probe(nvme_cfg.path, disk_bytes, min(disk_bytes, 32 * 2**20)),
                           max_spread=MAX_DISK_SPREAD, check_load=False))
        progress(f"NVMe request latency at {nvme_cfg.path}")
        bw.update(reliably("nvme_latency", lambda: disk_latency_probe(nvme_cfg.path, read_gbps=bw["nvme_read"],
                                                                      write_gbps=bw["nvme_write"]),
                           max_spread=MAX_DISK_SPREAD, check_load=False))
    progress("CPU AdamW throughput")
    bw["cpu_adam_params_per_s"] = reliably("cpu_adam", lambda: cpu_adam_probe(adam_elems))
    progress("runtime overhead per block call and parameter tensor")
    tdt = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    overheads = reliably("overheads", lambda: (measure_runtime_overhead(device, tdt), 0.0))
    warnings = tuple(f"{PROBES[name]}: {q.problem}" for name, q in quality.items() if q.problem)
    if warnings:
        progress(f"warning: unreliable figures kept: {'; '.join(warnings)}; 'memtrain plan' and 'run' will say so; "
                 "re-run 'memtrain profile CONFIG' on a quiet machine")
    return Profile(
        machine_id=machine_id(fp), fingerprint=fp, model_key=model_key(cfg.model, cfg.train.seq_len, cfg.train.dtype),
        model_name=built.name, seq_len=cfg.train.seq_len, dtype=cfg.train.dtype,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        device=f"cuda:{torch.cuda.get_device_name()}" if device.type == "cuda" else "cpu",
        bandwidths=bw, overheads=overheads, blocks=tuple(blocks), quality=quality, warnings=warnings,
    )
