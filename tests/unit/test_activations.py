"""ActivationManager on CPU: parity with plain PyTorch, ledger windows, dedupe, parameters.

The manager moves records when the program says (planner.program_swaps); ``swap_driver`` runs
the program's swaps for it here, as the engine's chunk store does in ``wrap()``."""

from __future__ import annotations

import concurrent.futures as cf
import errno
import gc
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from memtrain.models.gpt import GPT, causal_lm_loss, gpt_config
from memtrain.offload.activations import ActivationManager, act_owner
from memtrain.offload.ledger import Ledger
from memtrain.offload.nvme import HEADER_BYTES, NvmeError, NvmeStore, is_aligned
from memtrain.planner.plan import ActPolicy
from swap_driver import SwapDriver

NUM_STEPS = 20
BATCH, SEQ = 2, 16


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(gpt_config("tiny", dropout=0.1))


def _batches(num: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (BATCH, SEQ + 1), generator=g) for _ in range(num)]


def _blocks(model: GPT) -> list[tuple[str, nn.Module]]:
    return [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]


def _wrap(mgr: ActivationManager, blocks, ahead: int = 1) -> SwapDriver:
    """Wrap ``blocks`` and run the program's swaps for them (``ahead``: ``swap_in_ahead``)."""
    mgr.wrap_blocks(blocks)
    return SwapDriver(mgr, blocks, ahead=ahead)


def _train(policies: list[str] | None, *, nvme: NvmeStore | None = None, ahead: int = 1,
           num_steps: int = NUM_STEPS, check=None):
    """Train the tiny GPT with AdamW; returns (losses, final params, manager, device, host ledgers)."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    device, host = Ledger("device"), Ledger("host")
    mgr = None
    if policies is not None:
        blocks = _blocks(model)
        mgr = ActivationManager(
            policies={name: p for (name, _), p in zip(blocks, policies)},
            device_ledger=device, host_ledger=host, nvme=nvme,
        )
        _wrap(mgr, blocks, ahead)
    losses = []
    for ids in _batches(num_steps):
        loss = causal_lm_loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        if check is not None:
            check(mgr, device, host)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()], mgr, device, host


@pytest.fixture(scope="module")
def baseline():
    losses, params, *_ = _train(None)
    return losses, params


@pytest.fixture
def store(tmp_path):
    s = NvmeStore(tmp_path / "nvme", budget_bytes=None, num_threads=2).start()
    yield s
    s.close()


def _ledgers_empty(mgr, device, host):
    assert device.in_use_bytes == 0, device.by_owner()
    assert host.in_use_bytes == 0, host.by_owner()
    if mgr.nvme is not None:
        assert mgr.nvme.ledger.in_use_bytes == 0, mgr.nvme.ledger.by_owner()
        assert mgr.nvme.keys() == []


MIXED = ["swap_nvme", "recompute", "swap_host", "keep"]


@pytest.mark.parametrize(
    "policies",
    [["keep"] * 4, ["swap_host"] * 4, ["swap_nvme"] * 4, ["recompute"] * 4, MIXED],
    ids=["keep", "swap_host", "swap_nvme", "recompute", "mixed"],
)
def test_losses_and_weights_match_plain_pytorch_bitwise(policies, baseline, store):
    """20 AdamW steps with dropout: every loss and the final weights are bitwise those of plain
    PyTorch (swap copies bytes; recompute replays the forward with the same RNG state). After
    every backward the activation bytes are back to zero on every tier."""
    base_losses, base_params = baseline
    nvme = store if "swap_nvme" in policies else None
    losses, params, mgr, device, host = _train(policies, nvme=nvme, check=_ledgers_empty)
    assert losses == base_losses
    assert all(torch.equal(a, b) for a, b in zip(params, base_params))
    assert device.peak_bytes > 0
    assert all(owner.startswith("act:blocks.") and owner.endswith(":0") for owner in device.peak_breakdown(group=False))


def _keep_bytes() -> list[int]:
    *_, mgr, _, _ = _train(["keep"] * 4, num_steps=1)
    return [mgr.block_activations(f"blocks.{i}").saved_bytes for i in range(4)]


def test_keep_peak_is_the_sum_of_the_blocks_saved_bytes():
    *_, mgr, device, host = _train(["keep"] * 4, num_steps=1)
    a = [mgr.block_activations(f"blocks.{i}").saved_bytes for i in range(4)]
    # A layer saves at least its input, q/k/v, attention output, MLP input/hidden, dropout masks.
    assert a[1] == a[2] > 10 * BATCH * SEQ * 64 * 4
    assert device.peak_bytes == sum(a)
    assert device.peak_breakdown(group=False) == {act_owner(f"blocks.{i}", 0): a[i] for i in range(4)}
    assert host.peak_bytes == 0


@pytest.mark.parametrize("ahead", [0, 1, 2])
def test_swap_host_device_peak_is_only_the_blocks_being_brought_back(ahead):
    """On CPU copies are synchronous, so the windows are exact: a record is on the device from
    the start of its copy-in (its SWAP_IN, when the backward of the block ``ahead`` after it
    starts) to the end of its own backward; all of A is on the host after the forward."""
    a = _keep_bytes()
    *_, mgr, device, host = _train(["swap_host"] * 4, ahead=ahead, num_steps=1)
    assert [mgr.block_activations(f"blocks.{i}").saved_bytes for i in range(4)] == a
    windows = [sum(a[max(0, i - ahead): i + 1]) for i in range(4)]
    assert device.peak_bytes == max(windows)
    assert sum(a) - device.peak_bytes == sum(a) - max(windows) > 0
    if ahead == 0:
        assert device.peak_bytes == max(a)  # 4 blocks' A kept -> the largest one at a time
    assert host.peak_bytes == sum(a)


def test_swap_nvme_moves_activations_to_real_files_and_back(store):
    a = _keep_bytes()
    model = _model()
    device, host = Ledger("device"), Ledger("host")
    mgr = ActivationManager(policies={f"blocks.{i}": "swap_nvme" for i in range(4)},
                            device_ledger=device, host_ledger=host, nvme=store)
    _wrap(mgr, _blocks(model))
    ids = _batches(1)[0]
    loss = causal_lm_loss(model(ids[:, :-1]), ids[:, 1:])
    mgr.synchronize()
    # After the forward and the writes: nothing on the device or host, one file per block.
    assert device.in_use_bytes == 0 and host.in_use_bytes == 0
    assert sorted(store.keys()) == sorted(act_owner(f"blocks.{i}", 0) for i in range(4))
    for i in range(4):
        entry = store.entry(act_owner(f"blocks.{i}", 0))
        assert entry.nbytes >= a[i]  # storages at 16-byte offsets in one buffer
        assert store.file_path(entry.key).stat().st_size >= entry.nbytes
    # [Note: bounded NVMe writes] one block's staging at a time: block i's write is waited for
    # (and its staging released) at block i+1's SWAP_OUT, before i+1 stages its own.
    assert host.peak_bytes == max(a)
    loss.backward()
    assert store.keys() == [] and store.ledger.in_use_bytes == 0
    assert not any(store.path.glob("*.mt"))
    assert device.in_use_bytes == 0 and host.in_use_bytes == 0
    # A record comes to the device when its backward starts and claims it ([Note: NVMe swap-in
    # claims]); the one below is read meanwhile into host staging: one block at a time on each.
    assert device.peak_bytes == max(a) < sum(a)


def test_swap_nvme_staging_is_aligned_so_the_store_bounces_nothing(store):
    # [Note: swap staging is aligned] (offload.swap): an unaligned buffer goes through a store
    # thread's bounce buffer, whose pages then stay resident in every thread that moved one.
    moved = []
    for op in ("write", "read"):
        inner = getattr(store, op)
        setattr(store, op, lambda key, t, *a, _inner=inner, **k: (moved.append(is_aligned(t)), _inner(key, t, *a, **k))[1])
    model, mgr, device, host = _swap_nvme_model(store)
    ids = _batches(1)[0]
    causal_lm_loss(model(ids[:, :-1]), ids[:, 1:]).backward()
    assert len(moved) == 8 and all(moved)


class _SlowDisk:
    """Wraps an ``NvmeStore``'s write and read: each completes ``delay_s`` after the real one (a
    disk much slower than the forward of a block), or fails with ``fail`` when given."""

    def __init__(self, store: NvmeStore, delay_s: float, fail: BaseException | None = None) -> None:
        self.store, self.delay_s, self.fail = store, delay_s, fail
        self.num_ops = 0
        store.write = self._late(store.write)
        store.read = self._late(store.read)

    def _late(self, op):
        def run(*args):
            inner, outer = op(*args), cf.Future()
            self.num_ops += 1

            def finish():
                if self.fail is not None:
                    outer.set_exception(self.fail)
                elif inner.exception() is not None:
                    outer.set_exception(inner.exception())
                else:
                    outer.set_result(inner.result())

            inner.add_done_callback(lambda _f: threading.Timer(self.delay_s, finish).start())
            return outer

        return run


def _swap_nvme_peaks(store: NvmeStore, writes_in_flight: int) -> tuple[list[float], int, int, int]:
    """Two AdamW steps with every block on swap_nvme: (losses, device peak, host peak, nvme peak)."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    device, host = Ledger("device"), Ledger("host")
    mgr = ActivationManager(policies={f"blocks.{i}": "swap_nvme" for i in range(4)}, device_ledger=device,
                            host_ledger=host, nvme=store, writes_in_flight=writes_in_flight)
    _wrap(mgr, _blocks(model))
    losses = []
    for ids in _batches(2):
        loss = causal_lm_loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        _ledgers_empty(mgr, device, host)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, device.peak_bytes, host.peak_bytes, store.ledger.peak_bytes


@pytest.mark.parametrize("writes_in_flight", [1, 2])
def test_swap_nvme_peaks_do_not_depend_on_the_disks_speed(writes_in_flight, baseline, tmp_path):
    """With a disk 40 ms late per operation (a block's forward takes about a millisecond here) the
    writes would all be in flight at once if nothing bounded them; bounded, every ledger peak is
    the one of a fast disk, and the losses are still bitwise those of plain PyTorch."""
    a = _keep_bytes()
    peaks = []
    for delay_s in (0.0, 0.04):
        with NvmeStore(tmp_path / f"nvme-{delay_s}", budget_bytes=None, num_threads=2) as s:
            slow = _SlowDisk(s, delay_s) if delay_s else None
            losses, *p = _swap_nvme_peaks(s, writes_in_flight)
        assert losses == baseline[0][:2]
        peaks.append(p)
    assert slow.num_ops == 2 * 2 * 4  # a write and a read per block and step
    assert peaks[0] == peaks[1]
    device_peak, host_peak, _ = peaks[1]
    staged = max(sum(a[i - writes_in_flight + 1 : i + 1]) for i in range(writes_in_flight - 1, 4))
    assert host_peak == staged < sum(a)  # the staging of writes_in_flight adjacent blocks
    assert device_peak == max(a)


def _swap_nvme_model(store: NvmeStore):
    model = _model()
    device, host = Ledger("device"), Ledger("host")
    mgr = ActivationManager(policies={f"blocks.{i}": "swap_nvme" for i in range(4)}, device_ledger=device,
                            host_ledger=host, nvme=store)
    _wrap(mgr, _blocks(model))
    return model, mgr, device, host


def test_a_failed_swap_write_surfaces_in_the_forward_that_waits_for_it(tmp_path):
    """[Note: swap I/O failures] The failure names the block; nothing is left behind it."""
    with NvmeStore(tmp_path / "nvme", budget_bytes=None, num_threads=2) as s:
        _SlowDisk(s, 0.0, fail=NvmeError("disk full"))
        model, mgr, device, host = _swap_nvme_model(s)
        ids = _batches(1)[0]
        with pytest.raises(NvmeError, match=r"'blocks\.0', micro-batch 0: writing them to NVMe failed.*disk full"):
            model(ids[:, :-1])  # block 0's write is waited for at block 1's SWAP_OUT
        gc.collect()  # the forward's graph is gone: its records are freed
        _ledgers_empty(mgr, device, host)
        assert not list(s.path.glob("*.mt"))


def test_a_failed_swap_read_surfaces_in_the_backward_that_claims_it(store):
    model, mgr, device, host = _swap_nvme_model(store)
    ids = _batches(1)[0]
    loss = causal_lm_loss(model(ids[:, :-1]), ids[:, 1:])
    mgr.synchronize()
    path = store.file_path(act_owner("blocks.3", 0))
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + 10] ^= 0xFF  # a payload byte goes bad on the disk
    path.write_bytes(bytes(data))
    with pytest.raises(NvmeError, match=r"'blocks\.3', micro-batch 0: reading them back from NVMe failed.*checksum"):
        loss.backward()  # block 3 is claimed first
    del loss
    gc.collect()
    _ledgers_empty(mgr, device, host)  # every file deleted, the corrupt one included
    assert not list(store.path.glob("*.mt"))


def test_a_failed_write_of_activations_no_longer_needed_is_a_warning(store):
    """A forward whose graph is dropped before its backward: its last block's write fails while
    in flight; nothing needed the data, so it is a warning, not silence and not an error."""
    write = store.write

    def failing_write(key, tensor, **kw):
        if key != act_owner("blocks.3", 0):
            return write(key, tensor, **kw)
        fut = cf.Future()
        fut.set_exception(NvmeError("disk full"))
        return fut

    store.write = failing_write
    model, mgr, device, host = _swap_nvme_model(store)
    ids = _batches(1)[0]
    loss = causal_lm_loss(model(ids[:, :-1]), ids[:, 1:])
    with pytest.warns(UserWarning, match=r"'blocks\.3', micro-batch 0: an NVMe write failed .*disk full"):
        del loss
        gc.collect()
    _ledgers_empty(mgr, device, host)


def test_a_file_that_cannot_be_deleted_is_a_warning_and_close_removes_it(tmp_path, monkeypatch):
    unlink = Path.unlink
    refuse = [True]

    def flaky_unlink(self, missing_ok=False):
        if refuse[0] and self.name.startswith("act%3Ablocks.3"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", flaky_unlink)
    store = NvmeStore(tmp_path / "nvme", budget_bytes=None, num_threads=2).start()
    model, mgr, device, host = _swap_nvme_model(store)
    ids = _batches(1)[0]
    loss = causal_lm_loss(model(ids[:, :-1]), ids[:, 1:])
    with pytest.warns(UserWarning, match=r"'blocks\.3', micro-batch 0: removing .* failed: Permission denied"):
        loss.backward()  # the training goes on: the data was read back
    assert [p.name for p in store.path.glob("*.mt")] == ["act%3Ablocks.3%3A0.mt"]
    assert store.keys() == [act_owner("blocks.3", 0)] and store.ledger.in_use_bytes > 0  # still accounted
    refuse[0] = False
    store.close()
    assert not (tmp_path / "nvme").exists()


def test_recompute_holds_inputs_then_one_block_at_a_time():
    a = _keep_bytes()
    *_, mgr, device, host = _train(["recompute"] * 4, num_steps=1)
    stats = [mgr.block_activations(f"blocks.{i}") for i in range(4)]
    # The recompute saves exactly what the plain forward saved.
    assert [s.saved_bytes for s in stats] == a
    ids_bytes = BATCH * (SEQ + 1) * 8  # the embedding's input is a view of the int64 batch
    hidden_bytes = BATCH * SEQ * 64 * 4
    assert [s.input_bytes for s in stats] == [ids_bytes, hidden_bytes, hidden_bytes, hidden_bytes]
    inputs = [s.input_bytes for s in stats]
    # I of every block from F to B, plus A of the block being recomputed (backward order).
    expected = max(sum(inputs[: i + 1]) + a[i] for i in range(4))
    assert device.peak_bytes == expected < sum(a)
    assert host.peak_bytes == 0


class _SquareViews(nn.Module):
    """Saves one storage several times: ``y * y`` saves y twice; ``a * b`` saves two views of h."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)  # saves x (and the weight, a parameter)
        a, b = h[:, :4], h[:, 4:]
        y = a * b  # saves two views of h's storage
        return y * y  # saves y twice


@pytest.mark.parametrize("policy", ["swap_host", "swap_nvme"])
def test_a_storage_saved_twice_is_stored_once(policy, store):
    torch.manual_seed(0)
    block = _SquareViews()
    x = torch.randn(5, 8, requires_grad=True)
    ref_out = block(x)
    ref_out.sum().backward()
    ref_grads = [x.grad.clone(), *(p.grad.clone() for p in block.parameters())]
    x.grad = None
    block.zero_grad()

    device, host = Ledger("device"), Ledger("host")
    mgr = ActivationManager(policies={"sq": policy}, device_ledger=device, host_ledger=host,
                            nvme=store if policy == "swap_nvme" else None)
    _wrap(mgr, [("sq", block)])
    out = block(x)
    mgr.synchronize()
    stats = mgr.block_activations("sq")
    # x, h (twice, as views), y (twice): 5 activation tensors over 3 storages, plus the weight.
    assert stats.num_saved_tensors == 6 and stats.num_param_tensors == 1
    assert stats.num_storages == 3
    expected = (5 * 8 + 5 * 8 + 5 * 4) * 4
    assert stats.saved_bytes == expected
    assert host.peak_bytes == expected  # each storage copied once
    if policy == "swap_nvme":
        assert store.entry(act_owner("sq", 0)).nbytes == expected  # 16-aligned sizes: no padding
    out.sum().backward()
    grads = [x.grad, *(p.grad for p in block.parameters())]
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))
    assert device.in_use_bytes == host.in_use_bytes == 0


def test_parameters_are_never_swapped():
    model = _model()
    mgr = ActivationManager(policies={f"blocks.{i}": "swap_host" for i in range(4)},
                            device_ledger=Ledger("device"), host_ledger=Ledger("host"))
    _wrap(mgr, _blocks(model))
    ids = _batches(1)[0]
    loss = causal_lm_loss(model(ids[:, :-1]), ids[:, 1:])
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for i in range(4):
        stats = mgr.block_activations(f"blocks.{i}")
        assert stats.swapped_data_ptrs and not (stats.swapped_data_ptrs & param_ptrs)
    # Layers and the head save weights for their input gradients; those stay in place.
    assert all(mgr.block_activations(f"blocks.{i}").num_param_tensors > 0 for i in (1, 2, 3))
    loss.backward()


class _MovingResolver:
    """Stands in for the chunk store: parameters are handed out as tokens, and may move."""

    def __init__(self, model: nn.Module) -> None:
        self.params = list(model.parameters())
        self.num_unpacked = 0

    def pack(self, t: torch.Tensor):
        for i, p in enumerate(self.params):
            if t.untyped_storage().data_ptr() == p.untyped_storage().data_ptr():
                return i, t.shape, t.stride(), t.storage_offset() - p.storage_offset()
        return None

    def unpack(self, token) -> torch.Tensor:
        self.num_unpacked += 1
        i, size, stride, rel = token
        p = self.params[i]
        return p.detach().as_strided(size, stride, p.storage_offset() + rel)


def test_param_resolver_unpacks_over_the_parameters_current_memory():
    ids = _batches(1)[0]
    plain = _model()
    causal_lm_loss(plain(ids[:, :-1]), ids[:, 1:]).backward()

    model = _model()
    resolver = _MovingResolver(model)
    mgr = ActivationManager(policies={f"blocks.{i}": p for i, p in enumerate(MIXED[1:] + ["swap_host"])},
                            device_ledger=Ledger("device"), host_ledger=Ledger("host"), param_resolver=resolver)
    _wrap(mgr, _blocks(model))
    loss = causal_lm_loss(model(ids[:, :-1]), ids[:, 1:])
    with torch.no_grad():  # the chunk store evicts and re-fetches: new memory, old memory poisoned
        for p in model.parameters():
            old = p.data
            p.data = old.clone()
            old.fill_(float("nan"))
    loss.backward()
    assert resolver.num_unpacked > 0
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_tensors_outside_wrapped_blocks_are_left_alone():
    model = _model()
    device = Ledger("device")
    mgr = ActivationManager(policies={"blocks.1": "swap_host", "blocks.2": "keep"},
                            device_ledger=device, host_ledger=Ledger("host"))
    _wrap(mgr, _blocks(model)[1:3])
    ids = _batches(1)[0]
    loss = causal_lm_loss(model(ids[:, :-1]), ids[:, 1:])
    assert set(device.by_owner()) == {act_owner("blocks.2", 0)}
    assert set(mgr.host_ledger.by_owner()) == {act_owner("blocks.1", 0)}
    loss.backward()
    assert device.in_use_bytes == 0 and mgr.host_ledger.in_use_bytes == 0


def test_microbatches_have_their_own_owners(store):
    ids = _batches(2)
    plain = _model()
    for b in ids:
        causal_lm_loss(plain(b[:, :-1]), b[:, 1:]).backward()

    model = _model()
    device, host = Ledger("device"), Ledger("host")
    mgr = ActivationManager(policies=dict(zip((f"blocks.{i}" for i in range(4)), MIXED)),
                            device_ledger=device, host_ledger=host, nvme=store)
    _wrap(mgr, _blocks(model))
    losses = []
    for mb, b in enumerate(ids):  # both forwards first, as a pipeline stage does
        mgr.set_microbatch(mb)
        losses.append(causal_lm_loss(model(b[:, :-1]), b[:, 1:]))
    mgr.synchronize()
    assert sorted(store.keys()) == [act_owner("blocks.0", 0), act_owner("blocks.0", 1)]
    assert {act_owner("blocks.3", 0), act_owner("blocks.3", 1)} <= set(device.by_owner())
    for loss in reversed(losses):
        loss.backward()
    assert device.in_use_bytes == host.in_use_bytes == store.ledger.in_use_bytes == 0
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_no_grad_forward_and_unwrap_leave_no_trace():
    model = _model()
    device = Ledger("device")
    mgr = ActivationManager(policies={f"blocks.{i}": "swap_host" for i in range(4)},
                            device_ledger=device, host_ledger=Ledger("host"))
    _wrap(mgr, _blocks(model))
    ids = _batches(1)[0][:, :-1]
    with torch.no_grad():
        wrapped = model(ids)
    assert device.peak_bytes == 0
    mgr.unwrap()
    assert all("forward" not in b.__dict__ for b in model.blocks)
    model(ids).sum().backward()
    assert device.peak_bytes == 0
    assert wrapped.shape == (BATCH, SEQ, 256)


class _InPlaceAfterSave(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.sigmoid()  # saves its result
        z = y * 3.0
        y.add_(1.0)  # changes a saved tensor: plain autograd would fail in backward
        return z


def test_in_place_change_of_a_swapped_tensor_is_refused():
    mgr = ActivationManager(policies={"b": "swap_host"}, device_ledger=Ledger("device"), host_ledger=Ledger("host"))
    block = _InPlaceAfterSave()
    _wrap(mgr, [("b", block)])
    with pytest.raises(RuntimeError, match="block 'b'.*modified in place"):
        block(torch.randn(3, requires_grad=True))


def test_user_mistakes_raise_value_errors(store):
    led = dict(device_ledger=Ledger("device"), host_ledger=Ledger("host"))
    with pytest.raises(ValueError, match=r"policies\['a'\].*choose one of keep"):
        ActivationManager(policies={"a": "offload"}, **led)
    with pytest.raises(ValueError, match="nvme=NvmeStore"):
        ActivationManager(policies={"a": ActPolicy.SWAP_NVME}, **led)
    with pytest.raises(ValueError, match="writes_in_flight: must be an int >= 1"):
        ActivationManager(policies={"a": "keep"}, writes_in_flight=0, **led)
    mgr = ActivationManager(policies={"a": "keep"}, **led)
    with pytest.raises(ValueError, match="no activation policy for block.*b"):
        mgr.wrap_blocks([("a", nn.Linear(2, 2)), ("b", nn.Linear(2, 2))])
    with pytest.raises(ValueError, match="set_microbatch"):
        mgr.set_microbatch(-1)
    lin = nn.Linear(2, 2)
    mgr.wrap_blocks([("a", lin)])
    with pytest.raises(ValueError, match="already wrapped"):
        mgr.wrap_blocks([("a", lin)])
    with pytest.raises(ValueError, match="no wrapped block named 'z'"):
        mgr.block_activations("z")
