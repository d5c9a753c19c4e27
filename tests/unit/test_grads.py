"""offload.grads [Note: asynchronous gradient flush], run on a CPU by turning it on: the adds go
to a host thread, results stay bitwise those of the synchronous flush, errors surface, and a
tight host budget waits for landing buffers instead of overrunning."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from memtrain.models.gpt import GPT, gpt_config
from memtrain.offload.chunks import make_chunk_plans, named_blocks, param_order
from memtrain.offload.grads import Gradients
from memtrain.offload.ledger import BudgetExceeded, Ledger
from memtrain.planner.plan import ActPolicy, MemoryPolicy, Tier
from memtrain.runtime import wrap

MICRO = 2


def _batch(cfg, step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, cfg.vocab_size, (3 * MICRO, 17), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def _engine(cfg, home: Tier, tmp_path, dtype: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = GPT(cfg)
    blocks = named_blocks(model, None)
    policy = MemoryPolicy(chunk_size_elems=20_000, chunks=make_chunk_plans(param_order(model, blocks), 20_000, home),
                          prefetch_depth=2, activations=(ActPolicy.KEEP,) * len(blocks))
    return wrap(model, optimizer=dict(name="adamw", lr=1e-3), plan=policy, micro_batch_size=MICRO, verbose=False,
                dtype=dtype, memory={"device": "64MiB", "host": "256MiB", "nvme_path": str(tmp_path / "nvme")})


@pytest.mark.parametrize("home,dtype", [(Tier.HOST, "fp32"), (Tier.HOST, "bf16"), (Tier.NVME, "bf16")])
def test_the_asynchronous_flush_changes_nothing(home, dtype, tmp_path, monkeypatch):
    cfg = gpt_config("tiny")
    sync, drained = _engine(cfg, home, tmp_path / "a", dtype), _engine(cfg, home, tmp_path / "b", dtype)
    assert not drained.store.grads.asynchronous  # a CPU device flushes on the training thread
    drained.store.grads.asynchronous = True
    threads, landed = [], []
    accumulate = Gradients._accumulate

    def spying(self, c, owner, landing, handle, add):
        time.sleep(0.005)  # a slow add: an update that did not wait for it would read a stale accumulator
        threads.append(threading.current_thread().name)
        size = landing.numel() * landing.element_size()
        assert self.store.host_ledger.holds(owner) >= size  # (two micro-batches' flushes may both be queued)
        landed.append(size)
        return accumulate(self, c, owner, landing, handle, add)

    monkeypatch.setattr(Gradients, "_accumulate", spying)
    for step in range(3):
        assert drained.train_step(_batch(cfg, step)) == sync.train_step(_batch(cfg, step))
        assert drained.store.grads.pending == 0 and drained.store.grads._worker is None  # drained by the step
    # Every off-device chunk's gradients went through the thread, once per micro-batch, each
    # held in a landing buffer of N·c host bytes until added; none is left.
    chunks = drained.store.chunks
    assert len(threads) == 3 * 3 * len(chunks) and set(threads) == {"memtrain-grads_0"}
    assert sorted(set(landed)) == sorted({c.num_elems * drained.store.compute_dtype.itemsize for c in chunks})
    assert not any(o.startswith("staging:grad") for o in drained.store.host_ledger.by_owner())
    a, b = drained.state_dict(), sync.state_dict()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for i, st in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in st.items())
    sync.close(), drained.close()


def test_an_error_on_the_thread_surfaces_in_the_step(tmp_path, monkeypatch):
    cfg = gpt_config("tiny")
    engine = _engine(cfg, Tier.NVME, tmp_path, "fp32")
    engine.store.grads.asynchronous = True

    def failing(self, c, owner, landing, handle, add):
        self.store._free(self.store.host_ledger, owner, landing)
        raise OSError("the add failed")

    monkeypatch.setattr(Gradients, "_accumulate", failing)
    with pytest.raises(OSError, match="the add failed"):
        engine.train_step(_batch(cfg, 0))
    with pytest.raises(OSError, match="the add failed"):  # no update reads an accumulator an add missed
        engine.store.grads.wait(engine.store.chunks[0])
    with pytest.raises(OSError, match="the add failed"):  # the early update that met it fails again
        engine.close()
    # ... after everything was given back: parameters to the model, no thread, no chunk files left.
    assert engine.store.grads._worker is None and engine.optimizer._worker is None
    assert all(torch.isfinite(p).all() for p in engine.model.parameters())
    assert not [f for f in (tmp_path / "nvme").rglob("*") if f.is_file()]


class _SlowGrad:
    """A chunk accumulator whose first add waits for ``gate``."""

    def __init__(self, gate: threading.Event) -> None:
        self.gate, self.adds = gate, []

    def copy_(self, src):
        self.gate.wait(10)
        self.adds.append(src.clone())


def test_a_full_host_budget_waits_for_the_oldest_landing_buffer():
    ledger = Ledger("host", budget_bytes=3 * 4096)  # room for one 4 KiB landing buffer beside 2 in use
    ledger.alloc("chunk:0", 2 * 4096)

    def alloc(led, owner, numel, dtype):
        led.alloc(owner, numel * dtype.itemsize)
        return torch.empty(numel, dtype=dtype)

    store = SimpleNamespace(host_ledger=ledger, _alloc=alloc, _free=lambda led, owner, t: led.free(owner, t.numel() * t.element_size()))
    drain = Gradients(store, asynchronous=True)
    gate = threading.Event()
    chunks = [SimpleNamespace(index=i, num_elems=1024, grad=_SlowGrad(gate), grad_buf=torch.full((1024,), float(i)))
              for i in range(2)]
    drain._flush_async(chunks[0], add=False)  # its add waits for the gate, holding the landing buffer
    assert drain.pending == 1 and ledger.holds("staging:grad:0") == 4096
    with pytest.raises(BudgetExceeded):  # nothing queued would free a byte: the budget error stands
        Gradients(store, asynchronous=True)._flush_async(chunks[1], add=False)
    threading.Timer(0.2, gate.set).start()
    drain._flush_async(chunks[1], add=False)  # waits for chunk 0's add, then takes the freed bytes
    assert chunks[0].grad.adds and ledger.peak_bytes <= 3 * 4096
    drain.wait(chunks[1])
    assert torch.equal(chunks[1].grad.adds[0], torch.full((1024,), 1.0))
    drain.drain()
    assert ledger.in_use_bytes == 2 * 4096 and drain._worker is None
