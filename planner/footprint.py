"""What a training process holds beyond the ledgers' owners, and its memory at its peak.

The ledgers count what memtrain allocates (docs/memory-accounting.md). Around them the process
holds autograd's temporaries, the loss's tensors and parameters' gradients in flight (the
``workspace`` the planner adds to the device tier), the optimizer kernels' temporaries, what the
C allocator keeps of freed memory and the NVMe store's threads. ``process_bytes`` puts them
together into the figure a run compares with its process's real peak (RSS on a CPU device, the
device's reserved bytes on a GPU) above the baseline measured before the model is built.
"""

from __future__ import annotations

from collections.abc import Iterable

from memtrain.cluster.spec import DeviceSpec
from memtrain.planner.plan import MemoryPolicy, Tier
from memtrain.planner.stats import ModelStats, dtype_bytes

__all__ = ["workspace_bytes", "param_grad_bytes", "optimizer_workspace_bytes", "optimizer_temporary_bytes",
           "NVME_IO_BYTES", "POOL_SLACK",
           "HEAP_MMAP_THRESHOLD_BYTES", "returned_bytes", "process_bytes"]


def workspace_bytes(stats: ModelStats) -> int:
    """Untracked temporaries inside one block's forward or backward (owner ``workspace``).

    [Note: workspace estimate] The largest transient of a block is its backward: autograd
    materialises gradients for the block's saved tensors one after another (bounded by the
    block's saved-activation bytes A), while the gradient arriving at the block's output (O)
    and the one it produces for its input (I) are both alive. So the estimate is
    max over blocks of A + I + O for one micro-batch of ``stats``, plus the parameters'
    gradients autograd holds (``param_grad_bytes``).

    The loss's saved tensors (``ModelStats.loss_activation_bytes``: cross entropy's fp32
    log-probabilities) are added on top: they are outside every block, so the ledger never
    records them, and they are alive from the end of the forward, when the tracked activations
    are at their peak, until the loss's backward has produced the logits' gradient (the head's
    O, already in the block term). What the C allocator keeps of freed memory is not counted
    here but in ``process_bytes``.
    """
    blocks = max((b.activation_bytes + b.input_bytes + b.output_bytes for b in stats.blocks), default=0)
    return blocks + stats.loss_activation_bytes + param_grad_bytes(stats)


def param_grad_bytes(stats: ModelStats) -> int:
    """[Note: parameter gradients in flight] Autograd makes each parameter's whole gradient (N·c)
    before the chunk store's hook adds it into the grad buffer, one parameter at a time. A
    parameter two blocks use (a tied embedding and head) keeps its first gradient from the later
    block's backward until the earlier block's arrives, and the two are summed: 2·N·c."""
    c = dtype_bytes(stats.dtype)
    numel = {name: n for b in stats.blocks for name, n in zip(b.param_names, b.param_numels)}
    shared = {name for b in stats.blocks for name in b.shared_param_names if name in numel}
    held = sum(numel[n] for n in shared) + max((numel[n] for n in shared), default=0)
    return c * max(max(numel.values(), default=0), held)


def optimizer_workspace_bytes(policy: MemoryPolicy, device: DeviceSpec) -> int:
    """Temporaries of the device chunks' optimizer update, the largest chunk's (fp32 N·4 each,
    ``optimizer_temporary_bytes``): torch's single-tensor AdamW on a CPU makes two, the foreach
    kernel on a GPU one (measured: ``memtrain.optimizers.adamw_step`` on a flat tensor). Host and
    NVMe chunks use the fused kernel, which makes none."""
    return optimizer_temporary_bytes(policy) * (2 if device.kind == "cpu" else 1)


def optimizer_temporary_bytes(policy: MemoryPolicy) -> int:
    """One temporary of the largest device chunk's optimizer update: its N elements in fp32."""
    return max((c.num_elems for c in policy.chunks if c.home is Tier.DEVICE), default=0) * 4


NVME_IO_BYTES = 2 << 20
"""What an NVMe run's process holds beyond the pool and the C heap: its store's 8 threads, each
with its stack and thread state and the pages of its bounce buffer that a file's header and an
unaligned tail pass through (payloads are aligned and move without it: offload.nvme_format
[Note: zero-copy payload]). Measured 0.6-1.0 MiB (bench/plan_accuracy.py small/swap_nvme and
small/nvme-d3 against small/device-keep, the C heap's threshold fixed: runtime.process_memory)."""


HEAP_MMAP_THRESHOLD_BYTES = 4 << 20
"""On a CPU device the C heap serves allocations below this size and keeps them when freed; one
at least this large gets a mapping of its own, returned when freed (runtime.process_memory fixes
glibc's threshold here: [Note: the C heap's threshold])."""


def returned_bytes(storage_bytes: Iterable[int]) -> int:
    """Of these storages, the bytes in those of at least ``HEAP_MMAP_THRESHOLD_BYTES``: on a CPU
    device each is a mapping of its own, returned to the system when freed, where the C heap
    keeps a smaller one's memory for reuse."""
    return sum(b for b in storage_bytes if b >= HEAP_MMAP_THRESHOLD_BYTES)


POOL_SLACK = 0.25
"""``offload.bufpool.SLACK``: the buffer pool holds up to this much more than the most it had
handed out at once ([Note: pool slack])."""


def process_bytes(*, device_peak_bytes: int, pooled_peak_bytes: int, act_peak_bytes: int, workspace_bytes: int,
                  device: DeviceSpec, uses_nvme: bool, pooled_resident_bytes: int = 0,
                  optimizer_workspace_bytes: int = 0, optimizer_temporary_bytes: int = 0,
                  mapped_peak_bytes: int | None = None, heap_act_peak_bytes: int | None = None) -> int:
    """[Note: process memory] The process's memory above its baseline at its peak, predicted.

    On a GPU: the device's reserved bytes, the device tier's peak (``device_peak_bytes``,
    workspace included). On a CPU device both tiers are RAM, held in two ways:

    - **Mappings, returned when freed.** The chunk store's chunks, buffers and staging come from
      one buffer pool (``pooled_peak_bytes`` at most at once, ``pooled_resident_bytes`` of them
      chunks that live all step); activations in storages of at least
      ``HEAP_MMAP_THRESHOLD_BYTES`` are mappings of their own. These are counted at the most they
      held together (``mapped_peak_bytes``: the pool peaks in the optimizer's phase, large
      activations at the end of the forward). The pool also keeps what was freed: at most
      ``POOL_SLACK`` of its high-water, and never more than the freed part, the peak less the
      resident chunks.
    - **The C heap, which keeps its high-water.** Smaller activations (``heap_act_peak_bytes``)
      and the backward's temporaries (``workspace_bytes``) add whenever they peak. The device
      chunks' optimizer temporaries (``optimizer_workspace_bytes``, each
      ``optimizer_temporary_bytes``) come after the backward: at least the threshold each, they
      are mappings of their own on top of what the heap kept; smaller, they reuse it.

    Plus the NVMe store's threads (``NVME_IO_BYTES``). Without the split (None), every
    activation counts as the heap's and the mapped peak is the pool's.
    """
    if device.kind != "cpu":
        return device_peak_bytes
    mapped = pooled_peak_bytes if mapped_peak_bytes is None else mapped_peak_bytes
    idle = min(int(pooled_peak_bytes * POOL_SLACK), pooled_peak_bytes - pooled_resident_bytes)
    heap = (act_peak_bytes if heap_act_peak_bytes is None else heap_act_peak_bytes) + workspace_bytes
    if optimizer_temporary_bytes >= HEAP_MMAP_THRESHOLD_BYTES:
        heap += optimizer_workspace_bytes
    else:
        heap = max(heap, optimizer_workspace_bytes)
    return mapped + idle + heap + (NVME_IO_BYTES if uses_nvme else 0)
