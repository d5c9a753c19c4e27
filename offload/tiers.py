"""Memory tiers: device, host and NVMe, each with a ledger of bytes by owner, and copies between.

docs/DESIGN.md rule 5 and docs/memory-accounting.md. Everything memtrain allocates for model
state, buffers and activations goes through a tier, so the tier's ``Ledger`` knows who holds
what and refuses (``BudgetExceeded``) before a budget is overrun.

    device = DeviceTier(budget_bytes=40 * 2**30)          # cuda:current, or host memory on CPU
    host = HostTier(budget_bytes=200 * 2**30)             # pinned when CUDA is available
    master = host.alloc("chunk:3", 1 << 20, torch.bfloat16)
    buf = device.alloc("buffer:param:3", 1 << 20, torch.bfloat16)
    h = copy_async(buf, master)                           # side stream + event on CUDA
    h.wait()                                              # copy done: safe for CPU and GPU use
    device.free("buffer:param:3")                         # releases all of the owner's bytes

API
- ``DeviceTier(*, budget_bytes, device=None)`` and ``HostTier(*, budget_bytes, pin=None)``:
  ``alloc(owner, shape, dtype, *, zero=False, stream=None) -> Tensor`` records the bytes under
  ``owner`` (several tensors may share an owner) and returns a new tensor; ``free(owner,
  tensor=None) -> int`` releases one tensor's bytes or all the owner's, returning the bytes
  released; ``holds(owner)``, ``owners()``, ``.ledger``, ``.name``. The tier keeps a reference to
  each tensor until it is freed, so the ledger and the tensors alive agree. ``stream`` (CUDA
  device tier only) allocates in that stream's order, for upload buffers ([Note: copy streams]).
  On a CPU-only machine the device tier is plain host memory under its own budget, so every
  path runs without a GPU. The host tier pins its memory when CUDA is available (page-locked
  memory is what lets host<->device copies run asynchronously on a copy engine).
- ``NvmeTier(store)`` puts an ``NvmeStore`` (offload/nvme.py) behind the same owner vocabulary:
  ``write(owner, tensor) -> Future``, ``read(owner, out) -> Future``, ``free(owner)``.
- ``copy_async(dst, src, *, stream=None, after_current=None) -> CopyHandle``: on CUDA the copy
  runs on a side stream (``copy_stream(device, "h2d" | "d2h")`` by default, so uploads and
  downloads use both copy engines) and an event marks its end; a download waits for the compute
  queued before it, an upload does not ([Note: copy streams] gives the rules that keep this
  safe). On CPU it is a plain synchronous copy. ``CopyHandle.wait()`` blocks the caller until
  the copy is done (for host readers); ``wait_stream(stream=None)`` instead makes a CUDA stream
  (default: current) wait, without blocking the host, and records that stream on the copy's
  device tensors: the way to consume a copy on the GPU. ``done()`` polls.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Sequence

import torch

from memtrain.offload.ledger import Ledger
from memtrain.offload.nvme import NvmeEntry, NvmeStore

__all__ = ["DeviceTier", "HostTier", "NvmeTier", "CopyHandle", "copy_async", "copy_stream", "nbytes_of"]

Shape = int | Sequence[int] | torch.Size


def nbytes_of(shape: Shape, dtype: torch.dtype) -> int:
    """Bytes of a dense tensor of ``shape`` (or that many elements) and ``dtype``."""
    numel = shape if isinstance(shape, int) else _numel(shape)
    return numel * dtype.itemsize


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class _TensorTier:
    """A tier whose memory is torch tensors on one device, tracked by owner."""

    name = "?"

    def __init__(self, budget_bytes: int | None, device: torch.device, pin: bool) -> None:
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"{self.name} tier budget_bytes: must be >= 0 or None (unlimited), got {budget_bytes}")
        self.device = device
        self.pin = pin
        self.ledger = Ledger(self.name, budget_bytes)
        self._lock = threading.Lock()
        self._tensors: dict[str, list[torch.Tensor]] = {}

    def alloc(
        self, owner: str, shape: Shape, dtype: torch.dtype, *, zero: bool = False, stream: torch.cuda.Stream | None = None
    ) -> torch.Tensor:
        """A new tensor of ``shape`` (or that many elements) and ``dtype``, recorded under ``owner``.

        ``stream`` (CUDA device tier only): allocate, and zero, in that stream's order.
        """
        size = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
        if any(d < 0 for d in size):
            raise ValueError(f"{self.name} tier alloc({owner!r}): shape must not be negative, got {shape}")
        num_bytes = nbytes_of(size, dtype)
        self.ledger.alloc(owner, num_bytes)  # BudgetExceeded before any memory is taken
        try:
            make = torch.zeros if zero else torch.empty
            if stream is not None and self.device.type == "cuda":
                with torch.cuda.stream(stream):
                    t = make(size, dtype=dtype, device=self.device)
            else:
                t = make(size, dtype=dtype, device=self.device, pin_memory=self.pin)
        except BaseException:
            self.ledger.free(owner, num_bytes)
            raise
        with self._lock:
            self._tensors.setdefault(owner, []).append(t)
        return t

    def free(self, owner: str, tensor: torch.Tensor | None = None) -> int:
        """Release ``tensor`` (one allocated under ``owner``), or all of ``owner``'s; bytes released."""
        with self._lock:
            held = self._tensors.get(owner, [])
            if tensor is None:
                gone, keep = held, []
            else:
                gone = [t for t in held if t is tensor]
                if not gone:
                    raise ValueError(f"{self.name} tier free({owner!r}): that tensor was not allocated under this owner")
                keep = [t for t in held if t is not tensor]
            if keep:
                self._tensors[owner] = keep
            else:
                self._tensors.pop(owner, None)
        return self.ledger.free(owner, sum(t.numel() * t.element_size() for t in gone)) if gone else 0

    def holds(self, owner: str) -> int:
        """Bytes ``owner`` holds in this tier."""
        return self.ledger.holds(owner)

    def owners(self) -> list[str]:
        with self._lock:
            return sorted(self._tensors)


class DeviceTier(_TensorTier):
    """Accelerator memory under a budget; host memory standing in for it on CPU-only machines."""

    name = "device"

    def __init__(self, *, budget_bytes: int | None, device: str | torch.device | None = None) -> None:
        if device is None:
            dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        else:
            dev = torch.device(device)
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device: {device!r} asked for, but CUDA is not available here; pass device='cpu' or None")
            if dev.type == "cuda" and dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            if dev.type not in ("cuda", "cpu"):
                raise ValueError(f"device: {device!r} is not supported; use 'cuda[:i]' or 'cpu'")
        super().__init__(budget_bytes, dev, pin=False)


class HostTier(_TensorTier):
    """Host RAM under a budget; page-locked (pinned) when a CUDA device will copy to and from it."""

    name = "host"

    def __init__(self, *, budget_bytes: int | None, pin: bool | None = None) -> None:
        if pin is None:
            pin = torch.cuda.is_available()
        elif pin and not torch.cuda.is_available():
            raise ValueError("pin: pinned host memory needs CUDA, which is not available here; pass pin=None or False")
        super().__init__(budget_bytes, torch.device("cpu"), pin=pin)


class NvmeTier:
    """The NVMe tier: an ``NvmeStore`` addressed by the same owner names as the other tiers."""

    name = "nvme"

    def __init__(self, store: NvmeStore) -> None:
        self.store = store

    @property
    def ledger(self) -> Ledger:
        return self.store.ledger

    def write(self, owner: str, tensor: torch.Tensor) -> cf.Future:
        """Write (or atomically rewrite) ``owner``'s data; the future's result is an ``NvmeEntry``."""
        return self.store.write(owner, tensor)

    def read(self, owner: str, out: torch.Tensor) -> cf.Future:
        return self.store.read(owner, out)

    def free(self, owner: str) -> int:
        """Delete ``owner``'s file; returns the bytes released."""
        held = self.ledger.holds(owner)
        self.store.delete(owner)
        return held

    def holds(self, owner: str) -> int:
        return self.ledger.holds(owner)

    def entry(self, owner: str) -> NvmeEntry:
        return self.store.entry(owner)


# --- copies between tiers -------------------------------------------------------------------

_streams: dict[tuple[int, str], torch.cuda.Stream] = {}
_streams_lock = threading.Lock()
_DIRECTIONS = ("h2d", "d2h")


def copy_stream(device: torch.device | str | None = None, direction: str = "h2d") -> torch.cuda.Stream:
    """The side stream ``copy_async`` uses for one direction on one CUDA device (made on first use)."""
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction: must be 'h2d' or 'd2h', got {direction!r}")
    dev = torch.device("cuda") if device is None else torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    with _streams_lock:
        s = _streams.get((index, direction))
        if s is None:
            s = _streams[(index, direction)] = torch.cuda.Stream(device=index)
        return s


class CopyHandle:
    """An issued copy. ``wait()`` blocks until it is done; ``wait_stream()`` orders a CUDA stream."""

    __slots__ = ("_event", "_device", "_refs")

    def __init__(self, event: torch.cuda.Event | None, device: torch.device | None, refs: tuple[torch.Tensor, ...]) -> None:
        self._event = event
        self._device = device
        self._refs = refs  # keep both tensors alive until the copy is known to be done

    def done(self) -> bool:
        return self._event is None or self._event.query()

    def detached(self) -> "CopyHandle":
        """A handle on the same copy that keeps no tensor alive: for a holder that only waits for
        it, so it cannot keep a buffer the copy's owner has freed."""
        return CopyHandle(self._event, self._device, ())

    def wait(self) -> None:
        """Block the calling thread until the copy has finished. For host readers: a CUDA stream
        that then uses a device tensor of the copy needs ``wait_stream`` instead, which also
        records that stream on the tensor ([Note: copy streams]); this does not."""
        if self._event is not None:
            self._event.synchronize()
        self._refs = ()

    def wait_stream(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make ``stream`` (default: the current one) wait for the copy; the host does not block.

        The copied tensors are also recorded as used by ``stream`` (see [Note: copy streams]).
        """
        if self._event is None:
            return
        stream = stream or torch.cuda.current_stream(self._device)
        stream.wait_event(self._event)
        for t in self._refs:
            if t.device.type == "cuda":
                t.record_stream(stream)


# [Note: copy streams] The CUDA caching allocator reuses a freed block in the order of the
# stream it was allocated on. A copy on a side stream is therefore safe when (1) it starts after
# whatever produced ``src`` and (2) ``dst``'s memory is not still being read by another stream.
# (1): a device source was written by queued compute, so by default the copy waits for the
# current stream (``after_current``); a host source was written by the CPU, which is done, so an
# upload does not wait and overlaps the compute already queued. (2): allocate an upload's
# destination on the copy stream (``DeviceTier.alloc(..., stream=copy_stream(dev))``); the
# consumer's ``wait_stream`` records its stream on the tensor, so the block is not reused for
# the next upload while compute still reads it.


def copy_async(
    dst: torch.Tensor, src: torch.Tensor, *, stream: torch.cuda.Stream | None = None, after_current: bool | None = None
) -> CopyHandle:
    """Copy ``src`` into ``dst`` (same shape and dtype) across tiers; see the module docstring.

    ``after_current`` (default: whether ``src`` is on a CUDA device) makes the copy start only
    after the work already queued on the current stream; see [Note: copy streams].
    """
    if dst.shape != src.shape or dst.dtype != src.dtype:
        raise ValueError(
            f"copy_async: dst is {dst.dtype}{list(dst.shape)}, src is {src.dtype}{list(src.shape)}; "
            "shapes and dtypes must match (a copy between tiers never converts)"
        )
    cuda = dst.device if dst.device.type == "cuda" else src.device if src.device.type == "cuda" else None
    if cuda is None:
        dst.copy_(src)
        return CopyHandle(None, None, ())
    side = stream or copy_stream(cuda, "d2h" if src.device.type == "cuda" else "h2d")
    if after_current if after_current is not None else src.device.type == "cuda":
        side.wait_stream(torch.cuda.current_stream(cuda))
    with torch.cuda.stream(side):
        dst.copy_(src, non_blocking=True)
        event = torch.cuda.Event()
        event.record(side)
    # Tensors allocated on another stream are now also used by the side stream: tell the
    # allocator, so freeing them there does not hand the memory out before the copy ends.
    for t in (dst, src):
        if t.device.type == "cuda":
            t.record_stream(side)
    return CopyHandle(event, cuda, (dst, src))
