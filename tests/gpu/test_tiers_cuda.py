"""Tiers on a CUDA device: device memory under the ledger, pinned host memory, side-stream copies."""

import time

import pytest
import torch

from memtrain.offload.ledger import BudgetExceeded
from memtrain.offload.tiers import DeviceTier, HostTier, copy_async, copy_stream

pytestmark = pytest.mark.gpu


def test_device_tier_allocates_on_cuda_and_matches_the_allocator():
    tier = DeviceTier(budget_bytes=256 * 2**20)
    assert tier.device.type == "cuda"
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    t = tier.alloc("buffer:param:0", 16 * 2**20, torch.float32)  # 64 MiB
    assert t.is_cuda
    assert torch.cuda.memory_allocated() - before == tier.ledger.in_use_bytes == 64 * 2**20
    with pytest.raises(BudgetExceeded):
        tier.alloc("buffer:param:1", 50 * 2**20, torch.float32)  # 200 MiB more > 256 MiB
    assert torch.cuda.memory_allocated() - before == 64 * 2**20  # the refusal took nothing
    del t
    tier.free("buffer:param:0")
    assert torch.cuda.memory_allocated() == before and tier.ledger.in_use_bytes == 0


def test_host_tier_is_pinned_on_cuda_machines():
    host = HostTier(budget_bytes=None)
    assert host.pin
    assert host.alloc("chunk:0", 1024, torch.float32).is_pinned()
    assert not HostTier(budget_bytes=None, pin=False).alloc("chunk:1", 1024, torch.float32).is_pinned()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copies_round_trip_bitwise_on_side_streams(dtype):
    device, host = DeviceTier(budget_bytes=None), HostTier(budget_bytes=None)
    src = host.alloc("chunk:0", 3_000_001, dtype)
    src.copy_(torch.randn(3_000_001, generator=torch.Generator().manual_seed(0)).to(dtype))
    buf = device.alloc("buffer:param:0", 3_000_001, dtype)
    up = copy_async(buf, src)
    up.wait_stream()  # the current stream sees the upload without blocking the host
    doubled = buf * 2  # queued on the current stream after the upload
    back = host.alloc("staging:0", 3_000_001, dtype)
    down = copy_async(back, doubled)  # waits for the multiply: it was queued before the copy
    down.wait()
    assert down.done()
    assert torch.equal(back, src * 2)


def _timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def test_side_stream_copies_overlap_compute():
    device, host = DeviceTier(budget_bytes=None), HostTier(budget_bytes=None)
    n = 2**30  # 1 GiB: tens of ms over PCIe or NVLink-C2C
    src = host.alloc("chunk:0", n // 4, torch.float32, zero=True)
    # The upload buffer lives in the copy stream's order ([Note: copy streams] in offload/tiers.py).
    dst = device.alloc("buffer:param:0", n // 4, torch.float32, stream=copy_stream(device.device, "h2d"))
    a = torch.randn(2048, 2048, device=device.device)  # a few ms or less: reps match the copy's time

    def compute(reps: int) -> None:
        for _ in range(reps):
            a @ a

    def copy() -> None:
        copy_async(dst, src).wait()

    compute(2), copy()  # warm up kernels, streams and the pinned path
    copy_s = min(_timed(copy) for _ in range(3))
    one_s = _timed(lambda: compute(1))
    reps = max(1, round(copy_s / one_s))  # compute about as long as the copy
    compute_s = min(_timed(lambda: compute(reps)) for _ in range(3))

    def both() -> None:
        compute(reps)  # queued on the current stream
        h = copy_async(dst, src)  # must not wait for the matmuls: src is host memory
        h.wait_stream()

    both_s = min(_timed(both) for _ in range(3))
    # Perfect overlap gives max(copy, compute), serial their sum; demand at least half the overlap.
    assert both_s < max(copy_s, compute_s) + 0.5 * min(copy_s, compute_s), (copy_s, compute_s, both_s)


def test_upload_consumed_on_compute_stream_sees_the_data():
    device, host = DeviceTier(budget_bytes=None), HostTier(budget_bytes=None)
    s = copy_stream(device.device, "h2d")
    a = torch.randn(4096, 4096, device=device.device)
    totals = []
    for i in range(4):  # buffers freed and reallocated on the copy stream, as prefetch does
        src = host.alloc(f"chunk:{i}", 2**22, torch.float32)
        src.fill_(float(i))
        buf = device.alloc(f"buffer:param:{i}", 2**22, torch.float32, stream=s)
        copy_async(buf, src).wait_stream()
        for _ in range(20):  # the compute stream falls behind the copy stream
            a @ a
        totals.append(buf.sum())  # on the current stream, ordered after the upload
        device.free(f"buffer:param:{i}")
        del buf  # without record_stream the next upload could reuse it before the sum reads it
    assert [t.item() for t in totals] == [float(i) * 2**22 for i in range(4)]
