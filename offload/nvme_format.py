"""The NVMe store's on-disk file format: header, checksum, frames, aligned block I/O.

``NvmeStore`` (memtrain.offload.nvme) owns keys, threads, the ledger and atomic replacement;
this module owns what one file holds and how its bytes are moved in aligned blocks:

File format (version 1): a 4 KiB header (magic, version, flags, dtype, numel, payload length,
payload CRC-32, header CRC-32), then the payload: the tensor's bytes, or with ``compress`` a
sequence of frames ``[u32 stored_len][u32 raw_len][bytes]``, each frame one ``block_bytes`` slice
compressed with zstandard (stored raw when compression does not shrink it).

[Note: alignment] With O_DIRECT every buffer, file offset and length must be a multiple of the
sector size: ``ALIGN_BYTES`` (4 KiB) covers 512 B and 4 KiB sector disks. The header is one such
block, and payload I/O goes through a page-aligned bounce buffer (``_Staging``), except where the
caller's tensor is itself aligned (``aligned_empty``): then its whole 4 KiB blocks move straight
between the disk and the tensor, and only the last partial block is bounced (see [Note: zero-copy
payload]). The last block is zero-padded on write; the header's payload length says where the
data ends.

[Note: zero-copy payload] Copying a chunk through the bounce buffer costs about as much CPU as
the disk transfer itself on a busy host, and on a CPU-only machine that CPU is taken from the
compute the I/O should overlap. So an aligned tensor is read into and written from directly;
the checksum is still computed over the same bytes, in the I/O thread.

[Note: checksum] CRC-32 (the zlib polynomial) over the stored payload: ``zlib.crc32`` is several
times faster than a cryptographic hash such as blake2b and releases the GIL; when the ``isal``
package is installed its ``crc32`` (same values, faster still) is used instead. It detects
corruption, which is all that is asked of it (it is no defence against tampering). docs/nvme.md
has the figures.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import zstandard

from memtrain.errors import UserError

__all__ = ["ALIGN_BYTES", "HEADER_BYTES", "NvmeEntry", "NvmeError", "aligned_empty", "is_aligned"]

ALIGN_BYTES = 4096
"""O_DIRECT alignment of buffers, offsets and lengths (covers 512 B and 4 KiB sector disks)."""
HEADER_BYTES = 4096
_MAGIC = b"MTNVME\x00\x01"
_FORMAT_VERSION = 1
_FLAG_COMPRESSED = 1
# magic, version, flags, numel, nbytes, stored_bytes, payload_crc, dtype name
_HEADER = struct.Struct("<8sIIQQQI24s")
_FRAME = struct.Struct("<II")
_ZSTD_LEVEL = 1  # the fastest standard level: the disk, not the ratio, is what we are saving


class NvmeError(UserError):
    """An NVMe-tier failure a user can act on: bad path, disk full, corrupt or missing file."""


@dataclass(frozen=True, kw_only=True, slots=True)
class NvmeEntry:
    """One key's file as last written."""

    key: str
    """The key given to ``write``."""
    dtype: torch.dtype
    """The tensor's dtype; ``read`` requires ``out`` to have it."""
    numel: int
    """Elements in the tensor."""
    nbytes: int
    """Bytes of tensor data (uncompressed)."""
    stored_bytes: int
    """Payload bytes in the file (after compression and frame headers)."""
    disk_bytes: int
    """What the ledger records: header plus payload rounded up to ``ALIGN_BYTES``."""
    compressed: bool
    """Whether the payload is zstandard frames."""


def _round_up(n: int, align: int = ALIGN_BYTES) -> int:
    return (n + align - 1) // align * align


def _disk_bytes(stored_bytes: int) -> int:
    return HEADER_BYTES + _round_up(stored_bytes)


try:  # ISA-L computes the same CRC-32 about 5x faster; files are identical either way.
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - depends on the environment
    _crc32 = zlib.crc32


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's storage as a flat uint8 tensor (no copy; ``t`` is contiguous)."""
    return t.detach().reshape(-1).view(torch.uint8)


def is_aligned(t: torch.Tensor) -> bool:
    """Whether ``t``'s first byte sits on an ``ALIGN_BYTES`` boundary (O_DIRECT can use it as is)."""
    return t.device.type == "cpu" and t.data_ptr() % ALIGN_BYTES == 0


def aligned_empty(numel: int, dtype: torch.dtype, *, pin_memory: bool = False) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor whose data starts on an ``ALIGN_BYTES`` boundary.

    torch's CPU allocator aligns to 64 bytes only; this over-allocates one block and starts the
    tensor at the first aligned byte, so ``NvmeStore`` can move it without a bounce copy
    ([Note: zero-copy payload]). Pinned memory (CUDA's host allocator) is page-aligned already.
    """
    nbytes = numel * dtype.itemsize
    if pin_memory:
        return torch.empty(numel, dtype=dtype, pin_memory=True)
    raw = torch.empty(nbytes + ALIGN_BYTES, dtype=torch.uint8)
    skip = -raw.data_ptr() % ALIGN_BYTES
    out = raw[skip:skip + nbytes].view(dtype)
    assert out.data_ptr() % ALIGN_BYTES == 0 and out.numel() == numel
    return out


class _Staging:
    """A page-aligned bounce buffer owned by one worker thread (O_DIRECT needs alignment)."""

    def __init__(self, num_bytes: int) -> None:
        self.mm = mmap.mmap(-1, num_bytes)
        self.mv = memoryview(self.mm)


class _BlockWriter:
    """Appends bytes to a file at ``offset`` in ``block`` sized, aligned writes; keeps a CRC."""

    def __init__(self, fd: int, staging: _Staging, *, direct: bool, offset: int,
                 pwrite: Callable[[int, memoryview, int], None]) -> None:
        self.fd, self.staging, self.direct, self.offset = fd, staging, direct, offset
        # The store does the raw I/O (whole-buffer pwrite, retried on short writes); this class
        # only decides which bytes go where.
        self.pwrite = pwrite
        self.block = len(staging.mv)
        self.fill = 0
        self.crc = 0
        self.total = 0

    def append(self, data: memoryview, *, aligned: bool = False) -> None:
        """Add ``data``; ``aligned`` says its first byte is on an ``ALIGN_BYTES`` boundary."""
        self.crc = _crc32(data, self.crc)
        self.total += len(data)
        if self.direct and aligned and self.fill == 0 and len(data) >= ALIGN_BYTES:
            # [Note: zero-copy payload] whole blocks straight from the caller's aligned memory.
            n = len(data) - len(data) % ALIGN_BYTES
            self.pwrite(self.fd, data[:n], self.offset)
            self.offset += n
            data = data[n:]
        if not self.direct and self.fill == 0 and len(data) >= self.block:
            # Buffered I/O needs no alignment: write straight from the caller's memory.
            self.pwrite(self.fd, data, self.offset)
            self.offset += len(data)
            return
        while len(data):
            take = min(len(data), self.block - self.fill)
            self.staging.mv[self.fill:self.fill + take] = data[:take]
            self.fill += take
            data = data[take:]
            if self.fill == self.block:
                self._flush_staging()

    def _flush_staging(self) -> None:
        n = self.fill
        if self.direct and n % ALIGN_BYTES:
            padded = _round_up(n)
            self.staging.mv[n:padded] = bytes(padded - n)
            n = padded
        self.pwrite(self.fd, self.staging.mv[:n], self.offset)
        self.offset += n
        self.fill = 0

    def finish(self) -> tuple[int, int]:
        """Write what is left; return (payload bytes, CRC-32)."""
        if self.fill:
            self._flush_staging()
        return self.total, self.crc


class _BlockReader:
    """Reads ``length`` payload bytes from ``offset`` in aligned blocks; keeps a CRC."""

    def __init__(self, fd: int, staging: _Staging, *, direct: bool, offset: int, length: int, path: Path) -> None:
        self.fd, self.staging, self.direct, self.path = fd, staging, direct, path
        self.file_offset = offset
        self.left = length  # payload bytes not yet read from the file
        self.pos = self.end = 0
        self.crc = 0

    def _refill(self) -> None:
        want = min(len(self.staging.mv), _round_up(self.left))
        got = os.preadv(self.fd, [self.staging.mv[:want]], self.file_offset)
        if got <= 0:
            raise NvmeError(f"{self.path}: file is truncated ({self.left} payload bytes missing); delete it and write the key again")
        self.file_offset += got
        self.pos, self.end = 0, min(got, self.left)
        self.left -= self.end

    def readinto(self, dst: memoryview, *, aligned: bool = False) -> None:
        """Fill ``dst``; ``aligned`` says its first byte is on an ``ALIGN_BYTES`` boundary."""
        while len(dst):
            if self.pos == self.end and self.direct and aligned and min(len(dst), self.left) >= ALIGN_BYTES:
                # [Note: zero-copy payload] whole blocks straight into the caller's aligned memory.
                want = min(len(dst), self.left)
                want -= want % ALIGN_BYTES
                got = os.preadv(self.fd, [dst[:want]], self.file_offset)
                if got <= 0:
                    raise NvmeError(f"{self.path}: file is truncated ({self.left} payload bytes missing); delete it and write the key again")
                self.crc = _crc32(dst[:got], self.crc)
                self.file_offset += got
                self.left -= got
                dst = dst[got:]
                aligned = got % ALIGN_BYTES == 0
                continue
            if self.pos == self.end and not self.direct and len(dst) >= len(self.staging.mv):
                got = os.preadv(self.fd, [dst[: min(len(dst), self.left)]], self.file_offset)
                if got <= 0:
                    raise NvmeError(f"{self.path}: file is truncated; delete it and write the key again")
                self.crc = _crc32(dst[:got], self.crc)
                self.file_offset += got
                self.left -= got
                dst = dst[got:]
                continue
            if self.pos == self.end:
                self._refill()
            take = min(len(dst), self.end - self.pos)
            piece = self.staging.mv[self.pos:self.pos + take]
            dst[:take] = piece
            self.crc = _crc32(piece, self.crc)
            self.pos += take
            dst = dst[take:]

    def read_exact(self, n: int) -> memoryview:
        """``n`` bytes; a view into the staging buffer, valid until the next call."""
        if self.end - self.pos >= n:
            view = self.staging.mv[self.pos:self.pos + n]
            self.pos += n
            self.crc = _crc32(view, self.crc)
            return view
        buf = memoryview(bytearray(n))
        self.readinto(buf)
        return buf


def _pack_header(*, dtype: torch.dtype, numel: int, nbytes: int, stored_bytes: int, payload_crc: int,
                 compressed: bool) -> bytes:
    """The ``HEADER_BYTES`` block that starts a file (fields, then their CRC-32, then zeros)."""
    header = _HEADER.pack(
        _MAGIC, _FORMAT_VERSION, _FLAG_COMPRESSED if compressed else 0, numel,
        nbytes, stored_bytes, payload_crc, str(dtype).removeprefix("torch.").encode(),
    )
    header += struct.pack("<I", _crc32(header))
    return header + bytes(HEADER_BYTES - len(header))


def _parse_header(raw: bytes, path: Path, key: str) -> tuple[NvmeEntry, int]:
    """The entry described by a file's header, and the payload's CRC-32."""
    n = _HEADER.size
    if len(raw) < n + 4:
        raise NvmeError(f"{path}: truncated header; delete the file and write key {key!r} again")
    (crc,) = struct.unpack_from("<I", raw, n)
    magic, version, flags, numel, nbytes, stored, payload_crc, dtype_name = _HEADER.unpack_from(raw)
    if magic != _MAGIC or _crc32(raw[:n]) != crc:
        raise NvmeError(f"{path}: bad header (checksum mismatch or not a memtrain file); delete it and write key {key!r} again")
    if version != _FORMAT_VERSION:
        raise NvmeError(f"{path}: file format version {version}, this memtrain reads {_FORMAT_VERSION}")
    dtype = getattr(torch, dtype_name.rstrip(b"\x00").decode(), None)
    if not isinstance(dtype, torch.dtype):
        raise NvmeError(f"{path}: unknown dtype {dtype_name!r} in header")
    compressed = bool(flags & _FLAG_COMPRESSED)
    if nbytes != numel * dtype.itemsize or (not compressed and stored != nbytes):
        raise NvmeError(f"{path}: header sizes disagree (corrupt file); delete it and write key {key!r} again")
    entry = NvmeEntry(
        key=key, dtype=dtype, numel=numel, nbytes=nbytes, stored_bytes=stored,
        disk_bytes=_disk_bytes(stored), compressed=compressed,
    )
    return entry, payload_crc


def _write_frames(writer: _BlockWriter, src: memoryview, block_bytes: int, cctx: zstandard.ZstdCompressor) -> None:
    """Encode ``src`` as ``[u32 stored_len][u32 raw_len][bytes]`` frames of ``block_bytes`` each."""
    for start in range(0, len(src), block_bytes):
        raw = src[start:start + block_bytes]
        packed = cctx.compress(raw)
        # Incompressible data (most fp32 weights) is stored raw: never grows the file.
        body = memoryview(packed) if len(packed) < len(raw) else raw
        writer.append(memoryview(_FRAME.pack(len(body), len(raw))))
        writer.append(body)


def _read_frames(reader: _BlockReader, dst: memoryview, dctx: zstandard.ZstdDecompressor, path: Path) -> None:
    """Decode ``[u32 stored_len][u32 raw_len][bytes]`` frames into ``dst``."""
    pos = 0
    while pos < len(dst):
        stored_len, raw_len = _FRAME.unpack(bytes(reader.read_exact(_FRAME.size)))
        if raw_len == 0 or pos + raw_len > len(dst) or stored_len > raw_len:
            raise NvmeError(f"{path}: corrupt frame header at payload byte {pos}; delete the file and write it again")
        body = reader.read_exact(stored_len)
        if stored_len == raw_len:
            dst[pos:pos + raw_len] = body
        else:
            try:
                dst[pos:pos + raw_len] = dctx.decompress(body, max_output_size=raw_len)
            except (zstandard.ZstdError, ValueError) as e:
                raise NvmeError(f"{path}: corrupt compressed frame ({e}); delete the file and write it again") from None
        pos += raw_len
