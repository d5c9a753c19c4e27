"""Hardware specs the planner reasons with: devices, host, NVMe, nodes, the cluster.

Values come from the catalog (``cluster.catalog``), from the config's overrides, from the
local machine (``cluster.inventory``), or from a measured profile. Units are in the names.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DeviceSpec", "HostSpec", "NvmeSpec", "NodeSpec", "ClusterSpec"]


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceSpec:
    kind: str
    """Catalog key, e.g. ``rtx4090``, ``a100-80gb``; ``cpu`` for the CPU-as-device."""
    name: str
    """Human name, e.g. ``NVIDIA GeForce RTX 4090``."""
    memory_bytes: int
    """Device memory capacity."""
    bf16_flops: float
    """Dense peak bf16 FLOP/s (tensor cores); 0 when the device has no bf16."""
    fp16_flops: float
    """Dense peak fp16 FLOP/s with fp32 accumulate."""
    fp32_flops: float
    """Peak fp32 FLOP/s (no TF32)."""
    memory_bw_gbps: float
    """Device memory bandwidth, GB/s (10^9 bytes/s)."""
    h2d_gbps: float
    """Achievable host->device copy bandwidth from pinned memory, GB/s."""
    d2h_gbps: float
    """Achievable device->host copy bandwidth to pinned memory, GB/s."""
    compute_efficiency: float = 0.5
    """Fraction of peak FLOP/s a transformer block reaches (measured by the profiler, else a default)."""

    def peak_flops(self, dtype: str) -> float:
        return {"bf16": self.bf16_flops, "fp16": self.fp16_flops, "fp32": self.fp32_flops}[str(dtype)]


@dataclass(frozen=True, kw_only=True, slots=True)
class HostSpec:
    memory_bytes: int
    """Host RAM capacity."""
    num_cpus: int
    memory_bw_gbps: float
    """Host memory bandwidth, GB/s."""
    cpu_adam_params_per_s: float
    """Parameters per second a vectorised CPU AdamW step updates (fp32 master + m + v)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class NvmeSpec:
    path: str
    """Directory where offloaded chunks and swapped activations are written."""
    capacity_bytes: int
    read_gbps: float
    write_gbps: float
    read_latency_s: float = 100e-6
    """Fixed cost of one read request before its bytes flow (open, first block); the catalog's
    default is a datacenter NVMe's ~100 µs at queue depth 1, a profile measures it."""
    write_latency_s: float = 100e-6
    """Fixed cost of one durable write (open, header, ``fdatasync``, rename), as for reads."""
    read_cpu_share: float = 0.0
    """CPU seconds the store's threads spend per second of reading (checksums, the kernel's side
    of each request): on a CPU device they take it from the compute, which uses every core. The
    catalog's 0 charges nothing; a profile measures it (``runtime.disk_probe``)."""
    write_cpu_share: float = 0.0
    """The same for durable writes."""


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeSpec:
    name: str
    host: HostSpec
    devices: tuple[DeviceSpec, ...]
    nvme: NvmeSpec | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ClusterSpec:
    nodes: tuple[NodeSpec, ...]
    network_gbps: float = 12.5
    """Inter-node bandwidth, GB/s (100 Gb/s Ethernet by default)."""
    source: str = "catalog"
    """Where the figures came from: ``catalog``, ``auto`` (this machine) or ``profile:<path>``."""
