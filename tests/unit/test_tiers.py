"""Memory tiers on CPU: budgets through the ledger, ownership, copies, and the NVMe tier."""

import pytest
import torch

from memtrain.offload.ledger import BudgetExceeded
from memtrain.offload.nvme import NvmeStore
from memtrain.offload.tiers import CopyHandle, DeviceTier, HostTier, NvmeTier, copy_async, copy_stream, nbytes_of

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def test_nbytes_of():
    assert nbytes_of(10, torch.float32) == 40
    assert nbytes_of((3, 5), torch.bfloat16) == 30
    assert nbytes_of(torch.Size([2, 2, 2]), torch.int64) == 64
    assert nbytes_of((), torch.float16) == 2


@needs_no_cuda
def test_device_tier_is_host_memory_on_cpu_machines():
    tier = DeviceTier(budget_bytes=1 << 20)
    assert tier.device == torch.device("cpu") and tier.ledger.tier == "device"
    t = tier.alloc("buffer:param:0", (16, 8), torch.bfloat16)
    assert t.device.type == "cpu" and t.shape == (16, 8) and t.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="CUDA is not available"):
        DeviceTier(budget_bytes=None, device="cuda:0")
    with pytest.raises(ValueError, match="pin"):
        HostTier(budget_bytes=None, pin=True)
    assert not HostTier(budget_bytes=None).alloc("chunk:0", 4, torch.float32).is_pinned()


def test_device_tier_budget_is_enforced_and_owners_are_tracked():
    tier = DeviceTier(budget_bytes=1000, device="cpu")
    a = tier.alloc("buffer:param:0", 100, torch.float32)  # 400 bytes
    tier.alloc("act:layer.0:0", (10, 10), torch.float16, zero=True)  # 200 bytes
    assert tier.ledger.by_owner() == {"buffer:param:0": 400, "act:layer.0:0": 200}
    with pytest.raises(BudgetExceeded, match=r"device tier: allocating .* buffer:grad:0"):
        tier.alloc("buffer:grad:0", 101, torch.float32)  # 404 more: 1004 > 1000
    assert tier.ledger.in_use_bytes == 600 and tier.holds("buffer:grad:0") == 0
    assert "buffer:grad:0" not in tier.owners()
    tier.alloc("buffer:grad:0", 100, torch.float32)  # exactly at the budget is allowed
    assert tier.ledger.in_use_bytes == 1000 == tier.ledger.peak_bytes
    assert tier.free("buffer:param:0") == 400
    assert tier.ledger.in_use_bytes == 600 and tier.holds("buffer:param:0") == 0
    assert a.numel() == 100  # the caller's reference stays valid; the tier no longer counts it
    assert tier.ledger.peak_breakdown() == {"buffer": 800, "act": 200}


def test_free_one_tensor_of_an_owner():
    tier = HostTier(budget_bytes=None, pin=False)
    master = tier.alloc("chunk:3", 1000, torch.float32)
    grad = tier.alloc("chunk:3", 1000, torch.float32)
    assert tier.holds("chunk:3") == 8000
    assert tier.free("chunk:3", grad) == 4000  # e.g. the grad accumulator after the optimizer step
    assert tier.holds("chunk:3") == 4000
    with pytest.raises(ValueError, match="not allocated under this owner"):
        tier.free("chunk:3", grad)
    assert tier.free("chunk:3", master) == 4000
    assert tier.owners() == [] and tier.ledger.in_use_bytes == 0
    assert tier.free("never-allocated") == 0


def test_alloc_rejects_bad_arguments():
    tier = HostTier(budget_bytes=None, pin=False)
    with pytest.raises(ValueError, match="negative"):
        tier.alloc("x", (3, -1), torch.float32)
    with pytest.raises(ValueError, match="budget_bytes"):
        DeviceTier(budget_bytes=-5, device="cpu")
    with pytest.raises(ValueError, match="not supported"):
        DeviceTier(budget_bytes=None, device="meta")


def test_zero_alloc_is_zero():
    t = HostTier(budget_bytes=None, pin=False).alloc("a", 4096, torch.float32, zero=True)
    assert torch.count_nonzero(t) == 0


def test_copy_async_on_cpu_copies_and_is_done():
    device, host = DeviceTier(budget_bytes=None, device="cpu"), HostTier(budget_bytes=None, pin=False)
    src = device.alloc("buffer:grad:0", (64, 33), torch.bfloat16)
    src.copy_(torch.randn(64, 33, generator=torch.Generator().manual_seed(3)))
    dst = host.alloc("chunk:0", (64, 33), torch.bfloat16)
    h = copy_async(dst, src)
    assert isinstance(h, CopyHandle) and h.done()
    h.wait()
    h.wait_stream()  # a no-op without CUDA, but callable the same way
    assert torch.equal(dst.view(torch.int16), src.view(torch.int16))
    with pytest.raises(ValueError, match="shapes and dtypes must match"):
        copy_async(dst, src.float())
    with pytest.raises(ValueError, match="shapes and dtypes must match"):
        copy_async(dst.view(-1), src)
    with pytest.raises(ValueError, match="direction"):
        copy_stream(None, "sideways")


def test_round_trip_device_host_nvme_is_bitwise(tmp_path):
    """A chunk's life: device -> host -> NVMe -> host staging -> device, every byte intact."""
    device, host = DeviceTier(budget_bytes=1 << 20, device="cpu"), HostTier(budget_bytes=1 << 20, pin=False)
    with NvmeStore(tmp_path / "nvme", budget_bytes=1 << 20) as store:
        nvme = NvmeTier(store)
        w = device.alloc("buffer:param:5", 10_000, torch.float32)
        w.copy_(torch.randn(10_000, generator=torch.Generator().manual_seed(5)))
        expected = w.clone()
        master = host.alloc("chunk:5", 10_000, torch.float32)
        copy_async(master, w).wait()
        device.free("buffer:param:5")
        entry = nvme.write("chunk:5", master).result()
        assert nvme.holds("chunk:5") == entry.disk_bytes == nvme.ledger.in_use_bytes
        host.free("chunk:5")
        staging = host.alloc("staging:5", 10_000, torch.float32)
        nvme.read("chunk:5", staging).result()
        back = device.alloc("buffer:param:5", 10_000, torch.float32)
        copy_async(back, staging).wait()
        host.free("staging:5")
        assert torch.equal(back, expected)
        assert nvme.entry("chunk:5").nbytes == 40_000
        assert nvme.free("chunk:5") == entry.disk_bytes and nvme.ledger.in_use_bytes == 0
        assert host.ledger.in_use_bytes == 0 and device.ledger.in_use_bytes == 40_000
        assert host.ledger.peak_bytes == 40_000  # master and staging never coexisted
