"""NvmeStore against real files in tmp_path: round trips, checksums, atomicity, paths, budgets."""

import errno
import os
import threading
import time

import pytest
import torch

from memtrain.offload import nvme as nvme_mod
from memtrain.offload.ledger import BudgetExceeded
from memtrain.offload.nvme import ALIGN_BYTES, HEADER_BYTES, NvmeError, NvmeStore
from memtrain.units import format_bytes

SMALL_BLOCK = 64 * 1024  # several blocks per tensor, so block boundaries are exercised


def _tensor(dtype: torch.dtype, numel: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(numel, generator=g).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, (numel,), generator=g).bool()
    return torch.randint(-1000, 1000, (numel,), generator=g).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


@pytest.fixture
def store_factory(tmp_path):
    stores = []

    def make(name="store", **kw):
        kw.setdefault("budget_bytes", None)
        kw.setdefault("block_bytes", SMALL_BLOCK)
        s = NvmeStore(tmp_path / name, **kw).start()
        stores.append(s)
        return s

    yield make
    for s in stores:
        s.close()


CASES = [(torch.float32, 100_003), (torch.bfloat16, 70_001), (torch.float16, 1), (torch.int64, 9_000),
         (torch.bool, 333), (torch.uint8, 3 * SMALL_BLOCK), (torch.float32, 0)]


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("direct", [False, None])
def test_round_trip_is_bitwise(store_factory, compress, direct):
    store = store_factory(compress=compress, direct=direct)
    tensors = {f"chunk:{i}": _tensor(dt, n, seed=i) for i, (dt, n) in enumerate(CASES)}
    tensors["act:layer.0:3"] = torch.zeros(50_000)  # compressible: exercises compressed frames
    tensors["shaped"] = _tensor(torch.float32, 24 * 17).reshape(24, 17)
    for k, t in tensors.items():
        entry = store.write_sync(k, t)
        assert entry.nbytes == t.numel() * t.element_size() and entry.dtype == t.dtype
        assert entry.disk_bytes == HEADER_BYTES + -(-entry.stored_bytes // ALIGN_BYTES) * ALIGN_BYTES
        assert store.ledger.holds(k) == entry.disk_bytes
        assert os.path.getsize(store.file_path(k)) <= entry.disk_bytes
    if compress:
        assert store.entry("act:layer.0:3").stored_bytes < 50_000 * 4 // 10
    else:
        assert all(store.entry(k).stored_bytes == store.entry(k).nbytes for k in tensors)
    for k, t in tensors.items():
        out = torch.full_like(t, 7) if t.dtype != torch.bool else torch.ones_like(t)
        assert store.read_sync(k, out) is out
        assert torch.equal(_bits(out), _bits(t)), k


def test_direct_true_uses_o_direct_and_round_trips(store_factory):
    store = store_factory(direct=True)  # tmp_path is on a filesystem that accepts O_DIRECT here
    assert store.direct is True
    t = _tensor(torch.float32, 3 * SMALL_BLOCK // 4 + 5)
    store.write_sync("x", t)
    assert os.path.getsize(store.file_path("x")) % ALIGN_BYTES == 0  # O_DIRECT pads to alignment
    out = torch.empty_like(t)
    store.read_sync("x", out)
    assert torch.equal(out, t)


def _refuse_o_direct(monkeypatch):
    real_open = os.open

    def fake_open(path, flags, *args, **kw):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(nvme_mod.os, "open", fake_open)


def test_o_direct_refused_falls_back_to_buffered(tmp_path, monkeypatch):
    _refuse_o_direct(monkeypatch)
    with NvmeStore(tmp_path / "s", budget_bytes=None, direct=None, block_bytes=SMALL_BLOCK) as store:
        assert store.direct is False
        t = _tensor(torch.bfloat16, 200_001)
        store.write_sync("k", t)
        out = torch.empty_like(t)
        assert torch.equal(store.read_sync("k", out), t)
    with pytest.raises(NvmeError, match="does not accept O_DIRECT"):
        NvmeStore(tmp_path / "t", budget_bytes=None, direct=True).start()


def test_files_are_interchangeable_between_direct_and_buffered(tmp_path):
    """One file format whatever the I/O mode: a file written buffered reads back with O_DIRECT and
    the reverse (both modes buffered where the filesystem refuses O_DIRECT)."""
    t = _tensor(torch.float32, 123_457)
    with NvmeStore(tmp_path / "s", budget_bytes=None, direct=None) as store:
        probed = store.direct
        for write_direct, read_direct in [(False, probed), (probed, False)]:
            store.direct = write_direct
            store.write_sync("k", t)
            store.direct = read_direct
            assert torch.equal(store.read_sync("k", torch.empty_like(t)), t)


@pytest.mark.parametrize("compress", [False, True])
def test_corrupt_payload_byte_is_detected(store_factory, compress):
    store = store_factory(compress=compress, direct=False)
    t = torch.zeros(30_000) if compress else _tensor(torch.float32, 30_000)
    store.write_sync("chunk:0", t)
    path = store.file_path("chunk:0")
    with open(path, "r+b") as f:
        f.seek(HEADER_BYTES + 40)
        b = f.read(1)
        f.seek(HEADER_BYTES + 40)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(NvmeError, match=str(path.name)):
        store.read_sync("chunk:0", torch.empty_like(t))


def test_corrupt_header_and_truncated_file_are_detected(store_factory):
    store = store_factory(direct=False)
    t = _tensor(torch.float32, 10_000)
    store.write_sync("a", t)
    store.write_sync("b", t)
    with open(store.file_path("a"), "r+b") as f:
        f.seek(20)
        f.write(b"\xff")
    with pytest.raises(NvmeError, match="bad header"):
        store.read_sync("a", torch.empty_like(t))
    os.truncate(store.file_path("b"), HEADER_BYTES + 1000)
    with pytest.raises(NvmeError, match="truncated"):
        store.read_sync("b", torch.empty_like(t))


def _failing_pwrite(monkeypatch, fail_after_bytes: int):
    """Writes go through until ``fail_after_bytes``, then the disk is 'full'."""
    real = nvme_mod._pwrite_all
    written = [0]

    def fake(fd, buf, offset):
        if written[0] + len(buf) > fail_after_bytes:
            raise OSError(errno.ENOSPC, "No space left on device")
        written[0] += len(buf)
        real(fd, buf, offset)

    monkeypatch.setattr(nvme_mod, "_pwrite_all", fake)


def test_disk_full_leaves_no_file_no_temp_and_no_bytes(store_factory, monkeypatch):
    store = store_factory(direct=False)
    _failing_pwrite(monkeypatch, fail_after_bytes=2 * SMALL_BLOCK)
    t = _tensor(torch.float32, 5 * SMALL_BLOCK // 4)
    with pytest.raises(NvmeError, match=r"no space left on device .*\.tmp.*free space under"):
        store.write("chunk:7", t).result()
    assert [p.name for p in store.path.iterdir() if not p.name.startswith(".memtrain-nvme")] == []
    assert store.ledger.holds("chunk:7") == 0 and store.ledger.in_use_bytes == 0
    assert "chunk:7" not in store
    with pytest.raises(NvmeError, match="no such key"):
        store.read("chunk:7", torch.empty_like(t))
    with pytest.raises(NvmeError, match="no space left"):
        store.flush()  # the failure is also reported to whoever flushes


def test_failed_rewrite_keeps_the_previous_version(store_factory, monkeypatch):
    store = store_factory(direct=False)
    old = _tensor(torch.float32, 3 * SMALL_BLOCK // 4, seed=1)
    entry = store.write_sync("chunk:1", old)
    _failing_pwrite(monkeypatch, fail_after_bytes=SMALL_BLOCK)
    with pytest.raises(NvmeError):
        store.write_sync("chunk:1", old + 1)
    monkeypatch.undo()
    assert store.ledger.holds("chunk:1") == entry.disk_bytes
    out = torch.empty_like(old)
    assert torch.equal(store.read_sync("chunk:1", out), old)
    assert sorted(p.name for p in store.path.iterdir() if p.name.endswith(".tmp")) == []


def test_rewrite_replaces_atomically_and_keeps_order(store_factory):
    store = store_factory(direct=None)
    a, b = _tensor(torch.float32, 50_000, seed=1), _tensor(torch.float32, 50_000, seed=2)
    out = torch.empty_like(a)
    # No waiting in between: ops on one key run in submission order.
    store.write("chunk:0", a)
    store.write("chunk:0", b)
    got = store.read("chunk:0", out).result()
    assert torch.equal(got, b)
    store.write("chunk:0", a)
    assert torch.equal(store.read("chunk:0", out).result(), a)
    store.flush()
    assert store.ledger.by_owner() == {"chunk:0": store.entry("chunk:0").disk_bytes}
    assert len([p for p in store.path.iterdir() if p.name.endswith(".mt")]) == 1


def test_writes_do_not_block_the_caller(store_factory, monkeypatch):
    store = store_factory(direct=False)
    real = nvme_mod._pwrite_all
    gate = threading.Event()

    def slow(fd, buf, offset):
        gate.wait(5)
        real(fd, buf, offset)

    monkeypatch.setattr(nvme_mod, "_pwrite_all", slow)
    t0 = time.perf_counter()
    futs = [store.write(f"chunk:{i}", _tensor(torch.float32, 1000, seed=i)) for i in range(3)]
    assert time.perf_counter() - t0 < 1.0  # returned while every write is still held at the gate
    assert not any(f.done() for f in futs)
    gate.set()
    store.flush()
    assert all(f.done() and f.exception() is None for f in futs)


def test_many_concurrent_writes_then_reads(store_factory):
    store = store_factory(num_threads=4, compress=False, direct=None)
    tensors = [_tensor(torch.float32 if i % 2 else torch.bfloat16, 10_000 + 997 * i, seed=i) for i in range(48)]
    futs = [store.write(f"chunk:{i}", t) for i, t in enumerate(tensors)]
    outs = [torch.empty_like(t) for t in tensors]
    reads = [store.read(f"chunk:{i}", o) for i, o in enumerate(outs)]  # queued behind their writes
    for f in futs + reads:
        f.result()
    for t, o in zip(tensors, outs):
        assert torch.equal(_bits(t), _bits(o))
    assert store.ledger.in_use_bytes == sum(store.entry(f"chunk:{i}").disk_bytes for i in range(48))


def test_budget_is_enforced_before_any_byte_is_written(store_factory):
    t = _tensor(torch.float32, 10_000)  # 40,000 bytes -> 4 KiB header + 40,960 on disk
    one = HEADER_BYTES + 40_960
    store = store_factory(budget_bytes=2 * one + 100, direct=False)
    store.write_sync("a", t)
    store.write_sync("b", t)
    with pytest.raises(BudgetExceeded, match="nvme tier"):
        store.write("c", t)
    assert "c" not in store and not store.file_path("c").exists()
    assert store.ledger.in_use_bytes == 2 * one
    store.delete("a")
    assert store.ledger.in_use_bytes == one and not store.file_path("a").exists()
    store.write_sync("c", t)
    assert store.ledger.peak_bytes == 2 * one


def test_path_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(NvmeError, match=r"parent directory .*missing.* does not exist"):
        NvmeStore(tmp_path / "missing" / "store", budget_bytes=None).start()
    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(NvmeError, match=r"a-file exists and is not a directory"):
        NvmeStore(f, budget_bytes=None).start()
    # /proc refuses new directories and files even for root: a read-only path on any Linux box.
    with pytest.raises(NvmeError, match=r"/proc/memtrain-nvme-test: cannot create the directory"):
        NvmeStore("/proc/memtrain-nvme-test", budget_bytes=None).start()
    with pytest.raises(NvmeError, match=r"/proc/self is not writable .*choose a writable directory"):
        NvmeStore("/proc/self", budget_bytes=None).start()
    with pytest.raises(ValueError, match="budget_bytes"):
        NvmeStore(tmp_path / "x", budget_bytes=-1)


def test_user_mistakes_raise_clear_errors(store_factory, tmp_path):
    unstarted = NvmeStore(tmp_path / "u", budget_bytes=None)
    with pytest.raises(NvmeError, match="call start"):
        unstarted.write("k", torch.zeros(3))
    assert not (tmp_path / "u").exists()  # the constructor has no side effects
    store = store_factory()
    with pytest.raises(ValueError, match="contiguous"):
        store.write("k", torch.zeros(4, 4).t())
    with pytest.raises(ValueError, match="non-empty string"):
        store.write("", torch.zeros(3))
    with pytest.raises(NvmeError, match="no such key"):
        store.read("nope", torch.zeros(3))
    store.write_sync("k", torch.zeros(3))
    with pytest.raises(ValueError, match=r"float32 x 3.*pass a buffer"):
        store.read("k", torch.zeros(3, dtype=torch.float64))
    with pytest.raises(NvmeError, match="no such key"):
        store.delete("nope")


def test_second_store_on_same_directory_is_refused(store_factory, tmp_path):
    store_factory(name="shared")
    with pytest.raises(NvmeError, match="in use by another NvmeStore"):
        NvmeStore(tmp_path / "shared", budget_bytes=None).start()


def test_keys_stay_inside_the_directory(store_factory):
    store = store_factory()
    for key in ["act:layers/0:1", "../escape", "a b%c"]:
        store.write_sync(key, torch.ones(5))
        assert store.file_path(key).parent == store.path
    assert store.keys() == sorted(["act:layers/0:1", "../escape", "a b%c"])


def test_start_removes_an_earlier_runs_files_and_says_so(tmp_path):
    """[Note: stale files] The files a killed run leaves (complete ones and temp files) are removed
    by the next start(), which says so once; none is charged to the new store's budget, so a
    budget with room for one run's data is enough; files that are not memtrain's stay."""
    d = tmp_path / "s"
    d.mkdir()
    t = _tensor(torch.float16, 77_777)
    s = NvmeStore(d, budget_bytes=None).start()
    s.write_sync("chunk:2", t)
    s.write_sync("act:blocks.0:0", t)
    left = {f.name: f.read_bytes() for f in d.glob("*.mt")}  # what a kill -9 would leave behind
    budget = s.ledger.in_use_bytes
    s.close()
    for name, data in left.items():
        (d / name).write_bytes(data)
    (d / ".chunk%3A3.mt.0123.tmp").write_bytes(b"partial")  # a write cut short
    (d / "notes.mt").write_bytes(b"not a memtrain file")
    (d / "README").write_text("the user's")
    stale_bytes = sum(len(b) for b in left.values()) + len(b"partial")
    with pytest.warns(nvme_mod.StaleFilesWarning) as caught:
        s2 = NvmeStore(d, budget_bytes=budget).start()
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert str(d) in msg and "removed 3 file(s)" in msg and format_bytes(stale_bytes) in msg
    assert sorted(f.name for f in d.iterdir()) == [".memtrain-nvme.lock", "README", "notes.mt"]
    assert s2.ledger.in_use_bytes == 0 and s2.keys() == []
    with pytest.raises(NvmeError, match="no such key"):
        s2.read("chunk:2", torch.empty_like(t))
    s2.write_sync("chunk:2", t)  # BudgetExceeded if the leftovers had been counted
    s2.write_sync("act:blocks.0:0", t)
    s2.close()
    assert sorted(f.name for f in d.iterdir()) == ["README", "notes.mt"]  # files and lock gone


def test_a_clean_start_says_nothing_and_close_removes_what_the_store_made(tmp_path, recwarn):
    t = _tensor(torch.float16, 1000)
    s = NvmeStore(tmp_path / "fresh", budget_bytes=None).start()
    s.write_sync("k", t)
    s.close()
    assert not (tmp_path / "fresh").exists()  # a directory the store created is removed with it
    (tmp_path / "mine").mkdir()
    s = NvmeStore(tmp_path / "mine", budget_bytes=None).start()
    s.write_sync("k", t)
    s.close()
    assert list((tmp_path / "mine").iterdir()) == []  # files and lock gone; the directory was not its own
    assert not [w for w in recwarn if issubclass(w.category, nvme_mod.StaleFilesWarning)]


def test_checksum_is_the_zlib_crc32_whichever_implementation_runs():
    """Files must not depend on whether the optional ISA-L crc32 is installed."""
    import zlib

    data = bytes(range(256)) * 4099
    assert nvme_mod._crc32(data) == zlib.crc32(data)
    assert nvme_mod._crc32(data[1000:], nvme_mod._crc32(data[:1000])) == zlib.crc32(data)


# --- zero-copy payload (nvme_format [Note: zero-copy payload]) -------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8, torch.int64])
@pytest.mark.parametrize("numel", [0, 1, 1023, 4096, 100_003])
def test_aligned_empty_is_aligned_contiguous_and_sized(dtype, numel):
    t = nvme_mod.aligned_empty(numel, dtype)
    assert t.dtype == dtype and t.numel() == numel and t.is_contiguous() and t.device.type == "cpu"
    assert nvme_mod.is_aligned(t) and t.data_ptr() % ALIGN_BYTES == 0
    t.fill_(1)  # the whole extent is writable memory of the tensor's own storage
    assert bool((t == 1).all())


def _record_io(monkeypatch) -> dict[str, list[int]]:
    """Lengths of every payload preadv/pwrite the store issues."""
    from memtrain.offload import nvme_format

    seen: dict[str, list[int]] = {"read": [], "write": []}
    real_preadv, real_pwrite = nvme_format.os.preadv, nvme_mod._pwrite_all

    def preadv(fd, bufs, offset):
        seen["read"].append(sum(len(b) for b in bufs))
        return real_preadv(fd, bufs, offset)

    def pwrite(fd, buf, offset):
        seen["write"].append(len(buf))
        real_pwrite(fd, buf, offset)

    monkeypatch.setattr(nvme_format.os, "preadv", preadv)
    monkeypatch.setattr(nvme_mod, "_pwrite_all", pwrite)
    return seen


@pytest.mark.parametrize("numel", [1, 1024, 1025, 3 * SMALL_BLOCK // 4 + 5, 100_003])
def test_aligned_tensors_move_whole_blocks_without_the_bounce_buffer(store_factory, monkeypatch, numel):
    store = store_factory(direct=True)
    src = nvme_mod.aligned_empty(numel, torch.float32)
    src.copy_(_tensor(torch.float32, numel))
    nbytes = numel * 4
    whole = nbytes - nbytes % ALIGN_BYTES
    seen = _record_io(monkeypatch)
    store.write_sync("k", src)
    # Whole blocks in one write straight from ``src`` (not SMALL_BLOCK pieces through staging),
    # then the padded tail block, then the header.
    tail = [ALIGN_BYTES] if nbytes % ALIGN_BYTES else []
    assert seen["write"] == ([whole] if whole else []) + tail + [HEADER_BYTES]
    out = nvme_mod.aligned_empty(numel, torch.float32).fill_(7)
    store.read_sync("k", out)
    assert seen["read"] == [HEADER_BYTES] + ([whole] if whole else []) + tail
    assert torch.equal(_bits(out), _bits(src))
    # The same bytes on disk as a write from unaligned memory, and readable into it.
    plain = torch.empty(numel + 1)[1:]
    plain.copy_(src)
    assert not nvme_mod.is_aligned(plain)
    store.write_sync("u", plain)
    with open(store.file_path("k"), "rb") as a, open(store.file_path("u"), "rb") as b:
        assert a.read() == b.read()
    back = torch.empty(numel + 1)[1:]
    assert torch.equal(store.read_sync("k", back), src)


def test_corruption_is_detected_on_the_zero_copy_read(store_factory):
    store = store_factory(direct=True)
    src = nvme_mod.aligned_empty(50_000, torch.float32).copy_(_tensor(torch.float32, 50_000))
    store.write_sync("k", src)
    with open(store.file_path("k"), "r+b") as f:
        f.seek(HEADER_BYTES + 8192 + 5)  # inside the whole blocks read straight into ``out``
        b = f.read(1)
        f.seek(HEADER_BYTES + 8192 + 5)
        f.write(bytes([b[0] ^ 0x01]))
    with pytest.raises(NvmeError, match="checksum mismatch"):
        store.read_sync("k", nvme_mod.aligned_empty(50_000, torch.float32))


def test_a_reserved_rewrite_takes_no_second_reservation(store_factory):
    # offload.optim [Note: rewrite window]: the caller books the second copy itself
    store = store_factory()
    t = torch.arange(5000, dtype=torch.float32)
    first = store.write("k", t, reserved=True).result()  # nothing to rewrite yet: reserves as usual
    assert store.ledger.holds("k") == first.disk_bytes
    seen = []
    alloc = store.ledger.alloc
    store.ledger.alloc = lambda owner, n: (seen.append((owner, n)), alloc(owner, n))[1]
    store.write("k", t + 1, reserved=True).result()
    store.write("k", t + 2).result()
    assert seen == [("k", 0), ("k", first.disk_bytes)]  # the reserved rewrite added nothing
    assert store.ledger.holds("k") == first.disk_bytes and store.ledger.in_use_bytes == first.disk_bytes
    out = torch.empty(5000)
    assert torch.equal(store.read("k", out).result(), t + 2)
