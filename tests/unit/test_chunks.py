"""ChunkStore: packing, residency windows, prefetch depth, the param resolver, ledger bytes."""

from __future__ import annotations

import pytest
import torch

from memtrain.models.gpt import GPT, causal_lm_loss, gpt_config
from memtrain.offload.chunks import ChunkStore, ParamRef, make_chunk_plans, named_blocks, param_order
from memtrain.offload.ledger import Ledger
from memtrain.offload.nvme import NvmeStore
from memtrain.optimizers import lookup
from memtrain.planner.cost import chunk_bytes
from memtrain.planner.plan import Tier
from memtrain.planner.program import Layout, lower_backward, lower_forward


def _store(home: Tier, *, chunk_elems: int = 20_000, depth: int = 1, dtype: str = "fp32", optimizer: str = "adamw",
           nvme=None, seed: int = 0) -> ChunkStore:
    torch.manual_seed(seed)
    model = GPT(gpt_config("tiny"))
    blocks = named_blocks(model, None)
    plans = make_chunk_plans(param_order(model, blocks), chunk_elems, home)
    return ChunkStore(model=model, blocks=blocks, chunks=plans, dtype=dtype, state_names=lookup(optimizer).state_names,
                      device="cpu", device_ledger=Ledger("device"), host_ledger=Ledger("host"), nvme=nvme,
                      prefetch_depth=depth).build()


def _forward(store: ChunkStore, *, grad: bool = False) -> None:
    """Give the store its forward's program (planner.program), as the engine does."""
    store.begin_forward(lower_forward(Layout.of_store(store), 0, store.resident_chunks, grad=grad).actions)


def _backward(store: ChunkStore) -> None:
    store.begin_backward(lower_backward(Layout.of_store(store), 0, store.resident_chunks).actions)


def test_packing_follows_execution_order_and_never_splits():
    model = GPT(gpt_config("tiny"))
    blocks = named_blocks(model, None)
    order = param_order(model, blocks)
    names = [n for n, _ in order]
    assert names[0] == "blocks.0.wte.weight" and names.count("blocks.0.wte.weight") == 1  # tied: once
    assert "blocks.3.lm_head.weight" not in names  # the head's weight is the embedding's
    plans = make_chunk_plans(order, 20_000, Tier.HOST)
    assert [n for c in plans for n in c.param_names] == names
    sizes = dict(order)
    for c in plans:
        assert c.num_elems == sum(sizes[n] for n in c.param_names)
        assert c.num_elems <= 20_000 or len(c.param_names) == 1


def test_forward_fetches_each_block_and_releases_after():
    store = _store(Tier.HOST)
    seen = []

    def check(pos):
        def hook(module, args, output):
            params = list(module.parameters())
            seen.append(pos)
            assert all(torch.isfinite(p).all() for p in params), f"block {pos} ran on released parameters"
        return hook

    for pos, (_, block) in enumerate(store.blocks):
        block.register_forward_hook(check(pos), prepend=True)  # before the store releases
    with torch.no_grad():
        _forward(store)
        logits = store.model(torch.randint(0, 256, (2, 8)))
    assert seen == [0, 1, 2, 3] and torch.isfinite(logits).all()
    assert store.device_ledger.in_use_bytes == 0  # every param buffer released
    for c in store.chunks:  # [Note: released parameters]: right shape, NaN, no memory
        for s in c.slots:
            assert s.param.shape == s.shape and torch.isnan(s.param).all()
            assert s.param.untyped_storage().nbytes() <= 4


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_prefetch_depth_bounds_buffers(depth):
    store = _store(Tier.HOST, chunk_elems=30_000, depth=depth)
    most, ahead = [0], [0]

    def count(pos):
        def hook(module, args):
            resident = {int(o.split(":")[2]) for o in store.device_ledger.by_owner() if o.startswith("buffer:param:")}
            most[0] = max(most[0], len(resident))
            ahead[0] = max(ahead[0], len(resident - set(store.uses[pos])))
        return hook

    for pos, (_, block) in enumerate(store.blocks):
        block.register_forward_pre_hook(count(pos))
    with torch.no_grad():
        _forward(store)
        store.model(torch.randint(0, 256, (2, 8)))
    needed = max(len(u) for u in store.uses)
    assert most[0] <= max(depth, needed)
    if depth == 1:
        assert ahead[0] == 0  # no prefetch
    else:
        assert ahead[0] >= 1  # a later block's chunk was fetched ahead


def test_resolver_rebuilds_saved_views_after_release():
    store = _store(Tier.HOST)
    c = store.chunks[2]
    store._ensure(c)
    p = c.slots[0].param
    view = p.t()  # a saved-for-backward view, as F.linear keeps
    ref = store.pack(view)
    assert isinstance(ref, ParamRef) and ref.chunk == 2
    expected = view.clone()
    store._release(c)
    assert store.pack(torch.randn(3)) is None  # activations are not claimed
    again = store.unpack(ref)
    assert torch.equal(again, expected) and again.stride() == expected.stride()
    assert store.num_refetches == 1


def test_backward_with_released_chunks_matches_plain_autograd():
    store = _store(Tier.HOST, chunk_elems=9_000, depth=2)
    torch.manual_seed(0)
    plain = GPT(gpt_config("tiny"))
    x = torch.randint(0, 256, (2, 8))
    y = torch.randint(0, 256, (2, 8))
    causal_lm_loss(plain(x), y).backward()
    _forward(store, grad=True)
    with store.saved_tensors_hooks():
        loss = causal_lm_loss(store.model(x), y)
    # Before backward only the last block's chunks are left (its backward starts with them,
    # offload.chunks [Note: across pass ends]); saved views of the others hold tokens, not memory.
    held = {o for o in store.device_ledger.by_owner() if o.startswith("buffer:param")}
    assert held == {f"buffer:param:{ci}" for ci in store.uses[-1]}
    _backward(store)
    loss.backward()
    store.end_backward()
    assert store.device_ledger.in_use_bytes == 0 and store.num_refetches == 0
    grads = {}
    for c in store.chunks:
        for s in c.slots:
            grads[s.name] = c.grad[s.offset:s.offset + s.numel].view(s.shape)
    for name, p in plain.named_parameters():
        assert torch.equal(grads[name], p.grad), name


@pytest.mark.parametrize("home", [Tier.DEVICE, Tier.HOST, Tier.NVME])
@pytest.mark.parametrize("dtype,optimizer", [("fp32", "adamw"), ("bf16", "adamw"), ("fp32", "sgd")])
def test_ledger_bytes_follow_the_accounting_doc(home, dtype, optimizer, tmp_path):
    nvme = NvmeStore(tmp_path / "nvme", budget_bytes=None).start() if home is Tier.NVME else None
    try:
        store = _store(home, dtype=dtype, optimizer=optimizer, nvme=nvme)
        for c in store.chunks:
            want = chunk_bytes(home, c.num_elems, dtype, optimizer)
            owner = f"chunk:{c.index}"
            assert store.device_ledger.holds(owner) == want[Tier.DEVICE]
            assert store.host_ledger.holds(owner) == want[Tier.HOST]
            if nvme is not None:  # one file per part, each with a 4 KiB header, 4 KiB aligned
                on_disk = sum(v for k, v in nvme.ledger.by_owner().items() if k.startswith(owner + ":"))
                assert want[Tier.NVME] <= on_disk <= want[Tier.NVME] + 4 * 8192
        assert not any(o.startswith("staging") for o in store.host_ledger.by_owner())
        store.close()
    finally:
        if nvme is not None:
            nvme.close()


def test_plan_mistakes_are_value_errors():
    model = GPT(gpt_config("tiny"))
    blocks = named_blocks(model, None)
    plans = list(make_chunk_plans(param_order(model, blocks), 20_000, Tier.DEVICE))
    kw = dict(model=model, blocks=blocks, dtype="fp32", state_names=(), device="cpu",
              device_ledger=Ledger("device"), host_ledger=Ledger("host"))
    with pytest.raises(ValueError, match="in no chunk"):
        ChunkStore(chunks=plans[:-1], **kw).build()
    bad = plans[0].__class__(index=0, num_elems=7, param_names=plans[0].param_names, home=Tier.DEVICE)
    with pytest.raises(ValueError, match="num_elems"):
        ChunkStore(chunks=[bad, *plans[1:]], **kw).build()
    nv = plans[0].__class__(index=0, num_elems=plans[0].num_elems, param_names=plans[0].param_names, home=Tier.NVME)
    with pytest.raises(ValueError, match=r"memory\.nvme"):
        ChunkStore(chunks=[nv, *plans[1:]], **kw)
    with pytest.raises(ValueError, match="blocks"):
        named_blocks(torch.nn.Linear(2, 2), None)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # a refused plan moved nothing


def test_cpu_only_nvme_fetch_reads_into_the_buffer_with_the_ruled_staging_window(tmp_path, monkeypatch):
    """[Note: CPU-only fetch]: no staging tensor and no copy, yet the host ledger holds
    ``staging:<i>`` from the fetch's start to the block's use, as docs/memory-accounting.md says."""
    from memtrain.offload.nvme import is_aligned

    nvme = NvmeStore(tmp_path / "nvme", budget_bytes=None).start()
    try:
        store = _store(Tier.NVME, chunk_elems=9_000, depth=3, nvme=nvme)
        torch.manual_seed(0)
        plain = GPT(gpt_config("tiny"))
        copies = []
        monkeypatch.setattr(store, "_copy", lambda dst, src: copies.append(dst))
        staged_at_use = []

        def at_use(pos):
            def hook(module, args, output):
                owners = store.host_ledger.by_owner()
                staged = {int(o.split(":")[1]): b for o, b in owners.items() if o.startswith("staging:")}
                for ci, b in staged.items():  # N·c, the rule's staging bytes
                    assert b == store.chunks[ci].num_elems * 4
                staged_at_use.append(set(staged))
                for ci in store.uses[pos]:
                    assert is_aligned(store.chunks[ci].buf)  # O_DIRECT reads straight into it
            return hook

        for pos, (_, block) in enumerate(store.blocks):
            block.register_forward_hook(at_use(pos), prepend=True)
        x = torch.randint(0, 256, (2, 8))
        with torch.no_grad():
            _forward(store)
            got = store.model(x)
            want = plain(x)
        assert torch.equal(got, want)  # bitwise: the same parameters, read back from disk
        assert copies == []
        # While a block runs, only chunks fetched ahead of it (in flight) hold staging.
        for pos, staged in enumerate(staged_at_use):
            assert not staged & set(store.uses[pos])
        assert any(staged_at_use), "depth 3 prefetches ahead, so some staging is in flight"
        assert not any(o.startswith("staging") for o in store.host_ledger.by_owner())
        store.close()
    finally:
        nvme.close()


def test_another_mechanisms_op_runs_at_its_place_in_the_program():
    # ChunkStore.add_handlers: an op the store does not run itself (here SNAPSHOT) is run by the
    # pass's interpreter where the program puts it, ahead of the marker it precedes; an op keeps one handler.
    from memtrain.planner.plan import Action, Op

    store = _store(Tier.HOST)
    ran: list[list[str]] = []
    store.add_handlers({Op.SNAPSHOT: lambda a: ran.append([str(x) for x in store.executed])})
    program = list(lower_forward(Layout.of_store(store), 0, store.resident_chunks, grad=False).actions)
    marker = program.index(Action(0, Op.F, 0, block=2))
    program.insert(marker, Action(0, Op.SNAPSHOT, 0))
    store.begin_forward(program)
    with torch.no_grad():
        store.model(torch.randint(0, 256, (2, 8)))
    assert len(ran) == 1
    assert "0F0/b1" in ran[0] and "0F0/b2" not in ran[0]  # after block 1 started, before block 2
    with pytest.raises(RuntimeError, match="PREFETCH has a handler already"):
        store.add_handlers({Op.PREFETCH: lambda a: None})
