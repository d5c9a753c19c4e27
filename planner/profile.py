"""The profiler: measure this machine and the configured model, and keep it as a Parquet file.

``memtrain profile`` measures per-block forward and backward time for a few micro-batch sizes
on the device (a CUDA GPU when present, else the CPU, which is then the device tier), host↔device
copy bandwidth, device memory bandwidth, NVMe read/write bandwidth at the configured path through
the NVMe store as the runtime streams chunks (real files, O_DIRECT or the page cache dropped,
fdatasync; ``planner.disk_probe`` [Note: the store's bandwidth, not one stream's]) and the fixed
cost of one request there, the CPU AdamW throughput, and device facts (nvidia-ml-py, psutil),
and the runtime's own overhead per block call and per parameter tensor
(``measure_runtime_overhead``). The result is a versioned Parquet file keyed by a machine
fingerprint and a model key; ``memtrain plan`` and ``run`` use a matching profile instead of the
catalog figures and say which they used.

The last block is timed together with the loss (``BuiltModel.loss_fn`` on its output): the
runtime runs the loss between the head's forward and backward, and the analysis counts the
loss's FLOPs with the head too.

File format (``PROFILE_VERSION`` 3): one row per (block, micro-batch size) with ``block``,
``micro_batch_size``, ``fwd_s``, ``bwd_s``; the schema metadata key ``memtrain.profile`` holds
JSON with ``version``, ``machine_id``, ``fingerprint``, ``model_key``, ``model_name``,
``seq_len``, ``dtype``, ``created``, ``device``, ``bandwidths`` and ``overheads``. Older files
are refused with a request to re-profile: version 1 has no overheads and times the head without
the loss; version 2 measured NVMe bandwidth on one buffered stream, not through the store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memtrain.errors import UserError
from memtrain.cluster.spec import DeviceSpec, HostSpec, NvmeSpec
from memtrain.planner.disk_probe import measure_disk_gbps, measure_disk_latency_s
from memtrain.planner.serde import from_dict, to_dict
from memtrain.planner.stats import ModelStats

__all__ = [
    "PROFILE_VERSION", "Profile", "ProfileError", "machine_fingerprint", "machine_id", "model_key",
    "measure_blocks", "measure_copy_gbps", "measure_disk_gbps", "measure_disk_latency_s", "measure_cpu_adam_params_per_s",
    "measure_runtime_overhead", "OVERHEAD_KEYS",
    "run_profile", "save_profile", "load_profile", "apply_profile", "find_profile",
]

PROFILE_VERSION = 3
"""3: NVMe bandwidth measured through the store; 2: ``overheads`` added and the last block timed
with the loss. Older versions are refused."""
_META_KEY = b"memtrain.profile"
OVERHEAD_KEYS = ("block_fwd_s", "block_bwd_s", "param_s", "microbatch_s", "chunk_fetch_s")
"""Keys of ``Profile.overheads``, applied to the ``ModelStats.overhead_*`` fields of the same names."""


class ProfileError(UserError):
    """A profile file that cannot be used (missing, wrong version, another machine or model)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class BlockTiming:
    block: str
    micro_batch_size: int
    fwd_s: float
    """Median forward time of the block for one micro-batch."""
    bwd_s: float
    """Median backward time (input and weight gradients)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Profile:
    version: int = PROFILE_VERSION
    machine_id: str
    """Hash of the fingerprint: profiles of another machine are not used."""
    fingerprint: dict[str, str]
    model_key: str
    """Hash of the model config, sequence length and dtype."""
    model_name: str
    seq_len: int
    dtype: str
    created: str
    device: str
    """``cuda:<name>`` or ``cpu``."""
    bandwidths: dict[str, float] = field(default_factory=dict)
    """Measured GB/s: ``h2d``, ``d2h``, ``device_memory``, ``nvme_read``, ``nvme_write``; and
    ``cpu_adam_params_per_s``, ``nvme_read_latency_s`` and ``nvme_write_latency_s`` (seconds)."""
    overheads: dict[str, float] = field(default_factory=dict)
    """Measured runtime overhead, seconds (``measure_runtime_overhead``): ``block_fwd_s`` and
    ``block_bwd_s`` per block call, ``param_s`` per parameter tensor per micro-batch backward,
    ``microbatch_s`` per micro-batch. Absent keys are 0."""
    blocks: tuple[BlockTiming, ...] = ()


# --- identity ------------------------------------------------------------------------------


def machine_fingerprint() -> dict[str, str]:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    fp = {
        "hostname": platform.node(),
        "cpu": cpu,
        "num_cpus": str(psutil.cpu_count(logical=True)),
        "memory_bytes": str(psutil.virtual_memory().total),
        "torch": torch.__version__.split("+")[0],
    }
    if torch.cuda.is_available():
        fp["gpus"] = ",".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return fp


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def machine_id(fingerprint: dict[str, str] | None = None) -> str:
    return _hash(fingerprint or machine_fingerprint())


def model_key(model_cfg: object, seq_len: int, dtype: str) -> str:
    cfg = to_dict(model_cfg) if dataclasses.is_dataclass(model_cfg) else model_cfg
    return _hash({"model": cfg, "seq_len": seq_len, "dtype": dtype})


# --- measurements --------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], object], device: torch.device, reps: int, *, min_total_s: float = 0.0,
                 max_reps: int = 200) -> float:
    """Median seconds of ``fn`` after a warm-up: at least ``reps`` runs, and more (up to
    ``max_reps``) until the runs add up to ``min_total_s``."""
    fn()  # warm-up
    times: list[float] = []
    while len(times) < reps or (sum(times) < min_total_s and len(times) < max_reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
        done: dict[tuple[str, bool], tuple[float, float]] = {}
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
            fwd_s, bwd_s = done[sig]
            timings.append(BlockTiming(block=name, micro_batch_size=mbs, fwd_s=fwd_s, bwd_s=bwd_s))
    return timings


def _time_block(blk, captured, *, device, dtype, vocab, reps, loss=None) -> tuple[float, float]:
    """(forward s, backward s) of one block; with ``loss``, of ``loss(block(...))``."""
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
    fwd_s = _median_time(fwd, device, reps, min_total_s=BLOCK_TIMING_S)

    def fwd_bwd():
        o = fwd()
        o = o[0] if isinstance(o, (tuple, list)) else o
        o.backward(grad)

    total_s = _median_time(fwd_bwd, device, reps, min_total_s=BLOCK_TIMING_S)
    return fwd_s, max(total_s - fwd_s, 1e-9)


def measure_copy_gbps(device: torch.device, num_bytes: int = 256 * 2**20, reps: int = 5) -> dict[str, float]:
    """Host→device, device→host and device-memory copy bandwidth, GB/s.

    On CUDA the host side is pinned memory; on a CPU-only machine the device tier is host
    memory, so "h2d"/"d2h" are memcpy between two host buffers (what the runtime does there).
    """
    n = num_bytes // 4
    pin = device.type == "cuda"
    host = torch.empty(n, dtype=torch.float32, pin_memory=pin).fill_(1.0)
    dev = torch.empty(n, dtype=torch.float32, device=device)
    dev2 = torch.empty(n, dtype=torch.float32, device=device)
    h2d = _median_time(lambda: dev.copy_(host, non_blocking=pin), device, reps)
    d2h = _median_time(lambda: host.copy_(dev, non_blocking=pin), device, reps)
    d2d = _median_time(lambda: dev2.copy_(dev), device, reps)
    # A device-to-device copy reads and writes every byte: 2 × bytes of memory traffic.
    return {"h2d": num_bytes / h2d / 1e9, "d2h": num_bytes / d2h / 1e9, "device_memory": 2 * num_bytes / d2d / 1e9}


def measure_cpu_adam_params_per_s(num_elems: int = 16 * 2**20, reps: int = 3) -> float:
    """Parameters per second of the host AdamW step over one flat fp32 chunk.

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
    return num_elems / _median_time(run, torch.device("cpu"), reps)


def _fwd_bwd_rounds_s(runs: list[tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], None]]],
                      device: torch.device, reps: int) -> list[list[tuple[float, float]]]:
    """(forward s, backward s) of one micro-batch of each (forward, backward) in ``runs``, for
    ``reps`` rounds after two warm-up rounds, each round running every one once in turn: round
    ``i`` of two runs is then timed over the same stretch of time."""
    out: list[list[tuple[float, float]]] = []
    for rep in range(reps + 2):
        row = []
        for forward, backward in runs:
            _sync(device)
            t0 = time.perf_counter()
            loss = forward()
            _sync(device)
            t1 = time.perf_counter()
            backward(loss)
            _sync(device)
            t2 = time.perf_counter()
            row.append((t1 - t0, t2 - t1))
        if rep >= 2:
            out.append(row)
    return out


def _least_diff_s(rounds: list[list[tuple[float, float]]], i: int, j: int, part: slice) -> float:
    """Least time of run ``i`` − least time of run ``j``, each summed over ``part`` of (forward,
    backward): the least, not the median, because the overhead is fixed CPU work and the least
    time is the one other processes disturbed least."""
    return min(sum(r[i][part]) for r in rounds) - min(sum(r[j][part]) for r in rounds)


def _lstsq_nonneg(rows: list[list[float]], ys: list[float]) -> list[float]:
    """Non-negative least squares ``ys ≈ rows @ x`` (an overhead is never negative; a negative
    coefficient is timing noise around 0): fit, set the most negative coefficient to 0 and refit
    the others without it, until none is negative (Lawson & Hanson's active set, 1974, Ch. 23)."""
    a = torch.tensor(rows, dtype=torch.float64)
    b = torch.tensor(ys, dtype=torch.float64).unsqueeze(1)
    free = list(range(a.shape[1]))
    x = torch.zeros(a.shape[1], dtype=torch.float64)
    while free:
        sol = torch.linalg.lstsq(a[:, free], b, driver="gelsd").solution.squeeze(1)
        worst = int(torch.argmin(sol))
        if sol[worst] >= 0:
            x[free] = sol
            break
        free.pop(worst)
    return [float(v) for v in x]


def measure_runtime_overhead(
    device: torch.device, dtype: str = "fp32", *, reps: int = 15, num_layers: Sequence[int] = (1, 3, 6),
) -> dict[str, float]:
    """Seconds the runtime adds around the blocks' own work (``Profile.overheads``).

    [Note: runtime overhead] ``wrap()``'s engine runs every block call under the chunk store's
    hooks (fetch and release bookkeeping, backward-start events on the block's inputs and
    outputs) and the activation manager's saved-tensor hooks (a Python pack per saved tensor in
    forward, an unpack in backward), and the chunk store copies every parameter's gradient into
    its chunk in a post-accumulate-grad hook. None of it is in the per-block timings. It is
    measured here on built-in GPTs so small that their arithmetic is negligible (hidden 32, 16
    tokens, one sequence), all chunks on the device and every activation kept (the plan with no
    copies: offload and swap copies are modelled separately), with 1, 3 and 6 layers, each with
    and without biases (so the number of parameter tensors varies apart from the number of
    blocks). For each model the least forward and backward time of one micro-batch through the
    engine and through the same model in plain PyTorch (gradients set to None each time, as the
    engine's hook does) are taken, the variants of one model timed in alternation (one micro-batch
    of each in turn, so a burst of load from other processes slows all of them, not the one a
    difference is taken against); the least, not the median, because the overhead is fixed CPU
    work and the least time is the one other processes disturbed least. The differences are
    fitted by least squares:
        forward  = m_f + block_fwd_s × blocks
        backward = m_b + block_bwd_s × blocks + param_s × parameter tensors
    and ``microbatch_s = m_f + m_b`` (the engine's own bookkeeping per micro-batch). Then each
    model with biases runs again with host-home chunks, one per block, prefetch depth 2: what that
    adds to a micro-batch, over the chunk fetches it made (``ChunkStore.num_fetches``), fitted
    through the origin, is ``chunk_fetch_s``, the training thread's own work per fetch (buffer,
    copy issue, pointing the parameters in, the release and the gradient flush; measured ~150 µs
    per fetch on 2 CPU cores). The copy itself is negligible at this size and modelled apart.
    """
    from memtrain.models.gpt import GPT, causal_lm_loss, gpt_config
    from memtrain.offload.chunks import make_chunk_plans, named_blocks, param_order
    from memtrain.planner.plan import ActPolicy, MemoryPolicy, Tier
    from memtrain.runtime.engine import wrap

    if len(num_layers) < 2:
        raise ValueError("num_layers: give at least two layer counts to separate per-block from fixed overhead")
    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    seq, vocab = 16, 64
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, seq + 1), generator=gen)
    x, y = ids[:, :-1].to(device), ids[:, 1:].to(device)
    fwd_rows, bwd_rows, fwd_ys, bwd_ys = [], [], [], []
    fetch_rows: list[tuple[float, float]] = []  # (fetches per micro-batch, seconds added)
    for layers in num_layers:
        for bias in (True, False):
            cfg = gpt_config("tiny", num_layers=layers, hidden_size=32, num_heads=2, vocab_size=vocab, max_seq_len=seq,
                             bias=bias, dropout=0.0)
            torch.manual_seed(0)
            plain = GPT(cfg).to(device=device, dtype=tdt)
            num_blocks, num_tensors = len(plain.blocks), len(list(plain.parameters()))

            def plain_fwd():
                return causal_lm_loss(plain(x), y)

            def plain_bwd(loss):
                loss.backward()
                plain.zero_grad(set_to_none=True)

            model = GPT(cfg)
            params = param_order(model, named_blocks(model, None))
            policy = MemoryPolicy(chunk_size_elems=10**9, chunks=make_chunk_plans(params, 10**9, Tier.DEVICE),
                                  prefetch_depth=1, activations=(ActPolicy.KEEP,) * num_blocks)
            engine = wrap(model, optimizer="adamw", memory={"device": 2**40, "host": 2**40}, plan=policy, dtype=dtype,
                          micro_batch_size=1, verbose=False, device=device)
            host = _host_home_engine(cfg, dtype, device) if bias else None
            try:
                runs = [(plain_fwd, plain_bwd), (lambda: engine((x, y)), engine.backward)]
                if host is not None:
                    runs.append((lambda: host((x, y)), host.backward))
                rounds = _fwd_bwd_rounds_s(runs, device, reps)
                if host is not None:
                    fetch_rows.append((host.store.num_fetches / (reps + 2), _least_diff_s(rounds, 2, 1, slice(0, 2))))
            finally:
                engine.close()
                if host is not None:
                    host.close()
            fwd_rows.append([1.0, float(num_blocks)])
            fwd_ys.append(_least_diff_s(rounds, 1, 0, slice(0, 1)))
            bwd_rows.append([1.0, float(num_blocks), float(num_tensors)])
            bwd_ys.append(_least_diff_s(rounds, 1, 0, slice(1, 2)))
    m_f, block_fwd = _lstsq_nonneg(fwd_rows, fwd_ys)
    m_b, block_bwd, per_param = _lstsq_nonneg(bwd_rows, bwd_ys)
    fetch_s = sum(n * t for n, t in fetch_rows) / sum(n * n for n, _ in fetch_rows) if fetch_rows else 0.0
    return {"block_fwd_s": block_fwd, "block_bwd_s": block_bwd, "param_s": per_param, "microbatch_s": m_f + m_b,
            "chunk_fetch_s": max(fetch_s, 0.0)}


def _host_home_engine(cfg, dtype: str, device: torch.device):
    """The engine of ``cfg`` with host-home chunks, one per block, prefetch depth 2: its chunk
    fetches per micro-batch (``store.num_fetches``) and its time over the device-home engine's
    give ``chunk_fetch_s`` ([Note: runtime overhead])."""
    from memtrain.models.gpt import GPT
    from memtrain.offload.chunks import block_param_order, make_chunk_plans, named_blocks
    from memtrain.planner.plan import ActPolicy, MemoryPolicy, Tier
    from memtrain.runtime.engine import wrap

    torch.manual_seed(0)
    model = GPT(cfg)
    blocks = named_blocks(model, None)
    size = max(sum(p.numel() for p in b.parameters()) for _, b in blocks)
    policy = MemoryPolicy(chunk_size_elems=size, chunks=make_chunk_plans(block_param_order(model, blocks), size, Tier.HOST),
                          prefetch_depth=2, activations=(ActPolicy.KEEP,) * len(blocks))
    return wrap(model, optimizer="adamw", memory={"device": 2**40, "host": 2**40}, plan=policy, dtype=dtype,
                micro_batch_size=1, verbose=False, device=device)


# --- the whole profile ----------------------------------------------------------------------


def run_profile(
    cfg, *, progress: Callable[[str], None] = print, copy_bytes: int = 256 * 2**20, disk_bytes: int = 512 * 2**20,
    adam_elems: int = 16 * 2**20,
) -> Profile:
    """Measure everything for ``cfg`` (a ``memtrain.runtime.config.Config``) on this machine.

    ``copy_bytes``, ``disk_bytes`` and ``adam_elems`` size the bandwidth and CPU AdamW probes
    (large enough to reach steady state on real hardware; tests pass small ones)."""
    from memtrain.models import build_model

    dtype_map = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = dtype_map[cfg.train.dtype]
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # CPU fp16 matmuls are not what a CPU run would use
    fp = machine_fingerprint()
    progress(f"profiling on {device.type} ({fp['cpu'] if device.type == 'cpu' else fp.get('gpus')})")
    with torch.device("meta"):
        built = build_model(cfg.model)
    mbs_list = sorted({1, 2, max(1, min(4, cfg.train.global_batch_size))})
    progress(f"per-block forward/backward, micro-batch sizes {mbs_list}, seq_len {cfg.train.seq_len}")
    blocks = measure_blocks(built, seq_len=cfg.train.seq_len, dtype=dtype, device=device,
                            micro_batch_sizes=mbs_list, progress=progress)
    progress("copy bandwidths")
    bw = measure_copy_gbps(device, copy_bytes)
    nvme_cfg = next((n.nvme for n in cfg.cluster.nodes if n.nvme and n.nvme.path), None)
    if nvme_cfg is not None:
        progress(f"NVMe bandwidth at {nvme_cfg.path}")
        bw.update(measure_disk_gbps(nvme_cfg.path, disk_bytes, min(disk_bytes, 32 * 2**20)))
        progress(f"NVMe request latency at {nvme_cfg.path}")
        bw.update(measure_disk_latency_s(nvme_cfg.path, read_gbps=bw["nvme_read"], write_gbps=bw["nvme_write"]))
    progress("CPU AdamW throughput")
    bw["cpu_adam_params_per_s"] = measure_cpu_adam_params_per_s(adam_elems)
    progress("runtime overhead per block call and parameter tensor")
    overheads = measure_runtime_overhead(device, {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype])
    return Profile(
        machine_id=machine_id(fp), fingerprint=fp, model_key=model_key(cfg.model, cfg.train.seq_len, cfg.train.dtype),
        model_name=built.name, seq_len=cfg.train.seq_len, dtype=cfg.train.dtype,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        device=f"cuda:{torch.cuda.get_device_name()}" if device.type == "cuda" else "cpu",
        bandwidths=bw, overheads=overheads, blocks=tuple(blocks),
    )


def save_profile(profile: Profile, path: str | Path) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from memtrain.planner.atomic import atomic_write_bytes

    meta = to_dict(profile)
    rows = meta.pop("blocks")
    table = pa.table(
        {
            "block": pa.array([r["block"] for r in rows], pa.string()),
            "micro_batch_size": pa.array([r["micro_batch_size"] for r in rows], pa.int32()),
            "fwd_s": pa.array([r["fwd_s"] for r in rows], pa.float64()),
            "bwd_s": pa.array([r["bwd_s"] for r in rows], pa.float64()),
        }
    ).replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_profile(path: str | Path) -> Profile:
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"profile {str(path)!r} does not exist; create it with 'memtrain profile CONFIG'")
    try:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[_META_KEY])
    except Exception as e:  # a truncated or foreign file
        raise ProfileError(f"{path}: not a memtrain profile ({e})") from None
    if meta.get("version") != PROFILE_VERSION:
        why = {1: " (it has no runtime overheads and times the head without the loss)",
               2: " (its NVMe bandwidths are of one buffered stream, not of the store)"}.get(meta.get("version"), "")
        raise ProfileError(f"{path}: profile version {meta.get('version')!r}{why}; this memtrain reads "
                           f"{PROFILE_VERSION}; re-run 'memtrain profile'")
    meta["blocks"] = table.to_pylist()
    return from_dict(Profile, meta)


def find_profile(run_dir: str | Path, model_cfg, seq_len: int, dtype: str) -> Path | None:
    """The run directory's profile if it was measured on this machine for this model."""
    path = Path(run_dir) / "profile.parquet"
    if not path.is_file():
        return None
    try:
        prof = load_profile(path)
    except ProfileError:
        return None
    if prof.machine_id != machine_id() or prof.model_key != model_key(model_cfg, seq_len, dtype):
        return None
    return path


def _fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``t = a + b·mbs``; clamps to a non-negative intercept."""
    if len(points) == 1:
        return 0.0, points[0][1] / points[0][0]
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    a = my - b * mx
    if a < 0:  # force through the origin rather than predict negative time at small batches
        return 0.0, sum(x * y for x, y in points) / sum(x * x for x in xs)
    return a, max(b, 0.0)


def apply_profile(
    profile: Profile | str | Path, stats: ModelStats, device: DeviceSpec, host: HostSpec, nvme: NvmeSpec | None
) -> tuple[ModelStats, DeviceSpec, HostSpec, NvmeSpec | None]:
    """Replace catalog figures with measured ones: per-block times, bandwidths, CPU Adam rate,
    runtime overheads (``ModelStats.overhead_*``; 0 without a profile)."""
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    unknown = sorted(set(prof.overheads) - set(OVERHEAD_KEYS))
    if unknown:
        raise ProfileError(f"profile overheads: unknown key {unknown[0]!r} (known: {', '.join(OVERHEAD_KEYS)}); re-run 'memtrain profile'")
    by_block: dict[str, list[BlockTiming]] = {}
    for t in prof.blocks:
        by_block.setdefault(t.block, []).append(t)
    missing = [b.name for b in stats.blocks if b.name not in by_block]
    if missing:
        raise ProfileError(f"profile has no timings for blocks {missing[:3]}; it was measured for another model")
    blocks = []
    for b in stats.blocks:
        ts = by_block[b.name]
        fa, fb = _fit_line([(t.micro_batch_size, t.fwd_s) for t in ts])
        ba, bb = _fit_line([(t.micro_batch_size, t.bwd_s) for t in ts])
        blocks.append(dataclasses.replace(b, fwd_fixed_s=fa, fwd_per_sample_s=fb, bwd_fixed_s=ba, bwd_per_sample_s=bb))
    bw = prof.bandwidths
    device = dataclasses.replace(
        device,
        h2d_gbps=bw.get("h2d", device.h2d_gbps),
        d2h_gbps=bw.get("d2h", device.d2h_gbps),
        memory_bw_gbps=bw.get("device_memory", device.memory_bw_gbps),
    )
    host = dataclasses.replace(host, cpu_adam_params_per_s=bw.get("cpu_adam_params_per_s", host.cpu_adam_params_per_s))
    if nvme is not None and "nvme_read" in bw:
        nvme = dataclasses.replace(nvme, read_gbps=bw["nvme_read"], write_gbps=bw["nvme_write"],
                                   read_latency_s=bw.get("nvme_read_latency_s", nvme.read_latency_s),
                                   write_latency_s=bw.get("nvme_write_latency_s", nvme.write_latency_s))
    over = {f"overhead_{k}": float(prof.overheads.get(k, 0.0)) for k in OVERHEAD_KEYS}
    return dataclasses.replace(stats, blocks=tuple(blocks), **over), device, host, nvme
