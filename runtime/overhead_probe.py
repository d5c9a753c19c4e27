"""The profiler's probe of memtrain's own runtime overhead (``measure_runtime_overhead``): what
``wrap()``'s engine adds per block call, parameter tensor, micro-batch and chunk fetch, measured
against plain PyTorch on built-in GPTs too small for their arithmetic to count."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from memtrain.planner.measure import sync

__all__ = ["measure_runtime_overhead"]


def _fwd_bwd_rounds_s(runs: list[tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], None]]],
                      device: torch.device, reps: int) -> list[list[tuple[float, float]]]:
    """(forward s, backward s) of one micro-batch of each (forward, backward) in ``runs``, for
    ``reps`` rounds after two warm-up rounds, each round running every one once in turn: round
    ``i`` of two runs is then timed over the same stretch of time."""
    out: list[list[tuple[float, float]]] = []
    for rep in range(reps + 2):
        row = []
        for forward, backward in runs:
            sync(device)
            t0 = time.perf_counter()
            loss = forward()
            sync(device)
            t1 = time.perf_counter()
            backward(loss)
            sync(device)
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
    from memtrain.runtime.wrapping import wrap

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
    from memtrain.runtime.wrapping import wrap

    torch.manual_seed(0)
    model = GPT(cfg)
    blocks = named_blocks(model, None)
    size = max(sum(p.numel() for p in b.parameters()) for _, b in blocks)
    policy = MemoryPolicy(chunk_size_elems=size, chunks=make_chunk_plans(block_param_order(model, blocks), size, Tier.HOST),
                          prefetch_depth=2, activations=(ActPolicy.KEEP,) * len(blocks))
    return wrap(model, optimizer="adamw", memory={"device": 2**40, "host": 2**40}, plan=policy, dtype=dtype,
                micro_batch_size=1, verbose=False, device=device)

