"""wrap()/Engine on CUDA: parity with plain PyTorch, pinned host chunks, side-stream prefetch."""

from __future__ import annotations

import pytest
import torch

from memtrain.models.gpt import GPT, causal_lm_loss, gpt_config
from memtrain.offload.chunks import make_chunk_plans, named_blocks, param_order
from memtrain.planner.plan import ActPolicy, MemoryPolicy, Tier
from memtrain.runtime import wrap

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SEQ_LEN, BATCH, MICRO, STEPS = 32, 4, 2, 20


def _batch(cfg, step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ_LEN + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def _reference(cfg) -> list[float]:
    torch.manual_seed(0)
    model = GPT(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # torch's CUDA default: foreach
    losses = []
    for step in range(STEPS):
        x, y = (t.cuda() for t in _batch(cfg, step))
        total = 0.0
        for xm, ym in zip(x.split(MICRO), y.split(MICRO)):
            loss = causal_lm_loss(model(xm), ym)
            total += loss.item()
            (loss / 2).backward()
        opt.step()
        opt.zero_grad()
        losses.append(total / 2)
    return losses


# device: same CUDA kernels -> bitwise. host/nvme: the AdamW update runs on the CPU, whose
# elementwise arithmetic may round differently from the GPU's (fused multiply-add), so the
# stated tolerance is 1e-5 on losses of ~5.5 after 20 steps.
@pytest.mark.parametrize("home,tol", [(Tier.DEVICE, 0.0), (Tier.HOST, 1e-5), (Tier.NVME, 1e-5)])
def test_parity_on_cuda(home, tol, tmp_path):
    cfg = gpt_config("tiny")
    want = _reference(cfg)
    torch.manual_seed(0)
    model = GPT(cfg)
    blocks = named_blocks(model, None)
    chunks = make_chunk_plans(param_order(model, blocks), 20_000, home)
    policy = MemoryPolicy(chunk_size_elems=20_000, chunks=chunks, prefetch_depth=2,
                          activations=(ActPolicy.KEEP,) * len(blocks))
    engine = wrap(model, optimizer=dict(name="adamw", lr=1e-3), plan=policy, micro_batch_size=MICRO, verbose=False,
                  host_kernel="single", memory={"device": "1GiB", "host": "1GiB", "nvme_path": str(tmp_path / "nvme")})
    torch.cuda.reset_peak_memory_stats()
    got = [engine.train_step(_batch(cfg, step)) for step in range(STEPS)]
    assert max(abs(a - b) for a, b in zip(got, want)) <= tol
    store = engine.store
    for c in store.chunks:
        if c.home is Tier.HOST:
            assert c.master.is_pinned() and c.grad.is_pinned()
        if c.home is Tier.DEVICE:
            assert c.compute.is_cuda
    report = engine.memory_report()["device"]
    assert report.peak_bytes <= report.budget_bytes
    # The ledger accounts what memtrain allocates; CUDA's peak adds autograd workspace on top.
    assert torch.cuda.max_memory_allocated() >= report.peak_breakdown.get("buffer", 0)
    engine.close()


def test_prefetches_are_outstanding_while_blocks_compute(tmp_path):
    cfg = gpt_config("tiny")
    torch.manual_seed(0)
    model = GPT(cfg)
    blocks = named_blocks(model, None)
    chunks = make_chunk_plans(param_order(model, blocks), 60_000, Tier.HOST)
    policy = MemoryPolicy(chunk_size_elems=60_000, chunks=chunks, prefetch_depth=3,
                          activations=(ActPolicy.KEEP,) * len(blocks))
    engine = wrap(model, optimizer="adamw", plan=policy, verbose=False, memory={"device": "1GiB", "host": "1GiB"})
    store = engine.store
    in_flight = []
    for pos, (_, block) in enumerate(store.blocks):
        block.register_forward_hook(lambda m, a, o: in_flight.append(sum(c.fetch is not None for c in store.chunks)),
                                    prepend=True)
    engine.train_step(_batch(cfg, 0))
    assert max(in_flight) >= 1  # some fetch was still in flight while a block computed
    engine.close()



@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fetches_from_carried_write_backs_copy_from_pinned_staging(dtype, tmp_path):
    # offload.optim [Note: fetch from a write-back] on CUDA: the first forward's fetches of the
    # chunks whose write-backs run on copy the pinned staging on the h2d side stream. Losses are
    # bitwise those of a run whose fetches all read the disk, and only those chunks read less.
    from collections import Counter

    cfg = gpt_config("tiny")

    def build(sub):
        torch.manual_seed(0)
        model = GPT(cfg)
        blocks = named_blocks(model, None)
        policy = MemoryPolicy(chunk_size_elems=20_000, chunks=make_chunk_plans(param_order(model, blocks), 20_000, Tier.NVME),
                              prefetch_depth=2, activations=(ActPolicy.KEEP,) * len(blocks))
        engine = wrap(model, optimizer=dict(name="adamw", lr=1e-3), plan=policy, micro_batch_size=MICRO, verbose=False,
                      dtype=dtype, memory={"device": "1GiB", "host": "1GiB", "nvme_path": str(tmp_path / sub)})
        reads, read = Counter(), engine.nvme.read

        def logging_read(key, out, **kw):
            reads[key] += 1
            return read(key, out, **kw)

        engine.nvme.read = logging_read
        return engine, reads

    (engine, reads), (ref, ref_reads) = build("a"), build("b")
    ref.store.fetch_carried = None
    part = "compute" if dtype == "bf16" else "master"
    for step in range(4):
        carried = engine.optimizer.carried_chunks
        reads.clear(), ref_reads.clear()
        assert engine.train_step(_batch(cfg, step)) == ref.train_step(_batch(cfg, step))
        assert bool(carried) == (step > 0)
        assert not reads - ref_reads and set(ref_reads - reads) == {f"chunk:{i}:{part}" for i in carried}
        assert all(w.staged.tensors[part].is_pinned() for w in engine.optimizer._behind)
    # The handles the write-backs keep, to wait for the copies, hold no device buffer: a forward
    # grows device memory exactly as much as the reference's, whose fetches all read the disk.
    x, y = _batch(cfg, 4)
    grown = []
    for e in (engine, ref):
        assert e.optimizer.carried_chunks
        before = torch.cuda.memory_allocated()
        loss = e((x[:MICRO], y[:MICRO]))
        grown.append(torch.cuda.memory_allocated() - before)
        e.backward(loss / 2)
        e.backward(e((x[MICRO:], y[MICRO:])) / 2, last_microbatch=True)
        e.step()
    assert grown[0] == grown[1] > 0
    engine.close(), ref.close()


@pytest.mark.parametrize("home,dtype", [(Tier.HOST, "fp32"), (Tier.HOST, "bf16"), (Tier.NVME, "bf16")])
def test_gradient_flush_lands_in_pinned_memory_off_the_training_thread(home, dtype, tmp_path, monkeypatch):
    # offload.grads [Note: asynchronous gradient flush]: on CUDA each grad buffer is copied on the
    # d2h side stream into a pinned landing buffer and added on the grads thread. Same adds in
    # the same order as the synchronous flush: losses and states bitwise equal.
    import threading

    from memtrain.offload.grads import Gradients

    cfg = gpt_config("tiny")

    def build(sub):
        torch.manual_seed(0)
        model = GPT(cfg)
        blocks = named_blocks(model, None)
        policy = MemoryPolicy(chunk_size_elems=20_000, chunks=make_chunk_plans(param_order(model, blocks), 20_000, home),
                              prefetch_depth=2, activations=(ActPolicy.KEEP,) * len(blocks))
        return wrap(model, optimizer=dict(name="adamw", lr=1e-3), plan=policy, micro_batch_size=MICRO, verbose=False,
                    dtype=dtype, memory={"device": "1GiB", "host": "1GiB", "nvme_path": str(tmp_path / sub)})

    drained, sync = build("a"), build("b")
    assert drained.store.grads.asynchronous
    sync.store.grads.asynchronous = False
    seen = []
    accumulate = Gradients._accumulate

    def spying(self, c, owner, landing, handle, add):
        seen.append((landing.is_pinned(), threading.current_thread().name))
        return accumulate(self, c, owner, landing, handle, add)

    monkeypatch.setattr(Gradients, "_accumulate", spying)
    for step in range(4):
        assert drained.train_step(_batch(cfg, step)) == sync.train_step(_batch(cfg, step))
    assert len(seen) == 4 * (BATCH // MICRO) * len(drained.store.chunks)
    assert all(pinned for pinned, _ in seen) and {name for _, name in seen} == {"memtrain-grads_0"}
    a, b = drained.state_dict(), sync.state_dict()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for i, st in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in st.items())
    assert not any(o.startswith("staging:grad") for o in drained.store.host_ledger.by_owner())
    drained.close(), sync.close()
