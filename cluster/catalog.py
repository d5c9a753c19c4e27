"""Hardware catalog: datasheet figures of common GPUs, a CPU-as-device entry, default host and NVMe.

The planner starts from these figures when no measured profile exists; ``cluster.inventory``
applies the config's overrides on top, and the profiler (``runtime.profiling``) replaces them
with measurements. Every entry cites the vendor document its numbers come from.

Conventions used by every entry:

* ``memory_bytes`` is the nominal capacity in GiB (HBM stacks and GDDR chips come in powers
  of two). The driver reports slightly less on some parts (ECC, reserved pages: an H100 SXM
  shows 79.6 GiB); the memory safety margin covers that, and ``cluster: auto`` uses the figure
  nvml reports instead.
* FLOP/s are **dense** peaks (the "with sparsity" datasheet figures halved). fp16 is the tensor
  rate with fp32 accumulate, which is what mixed-precision training uses. fp32 is the plain
  CUDA-core rate (no TF32).
* Host↔device bandwidth is what a pinned ``cudaMemcpyAsync`` achieves, per direction; see
  [Note: effective PCIe bandwidth].
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Mapping

from memtrain.cluster.spec import DeviceSpec, HostSpec, NvmeSpec
from memtrain.optimizers import ADAMW

__all__ = [
    "KNOWN_DEVICES", "DEVICE_ALIASES", "DEFAULT_HOST_NUM_CPUS", "DEFAULT_HOST_MEMORY_BYTES",
    "device_spec", "cpu_device_spec", "generic_gpu_spec", "pcie_effective_gbps",
    "default_host_spec", "default_nvme_spec", "adamw_bytes_per_param",
]

_GIB = 2**30
_TERA = 1e12

# [Note: effective PCIe bandwidth]
# Raw x16 rates per direction (PCI-SIG base specifications): gen3 8 GT/s, gen4 16 GT/s, gen5
# 32 GT/s per lane with 128b/130b encoding -> 15.75 / 31.5 / 63.0 GB/s. TLP headers, flow
# control and DMA setup leave about 80% for large pinned copies: CUDA's bandwidthTest shows
# ~12-13 GB/s on gen3, ~25-26 GB/s on gen4 and ~50-55 GB/s on gen5 x16 slots.
_PCIE_RAW_GBPS_PER_LANE = {1: 0.25, 2: 0.5, 3: 15.75 / 16, 4: 31.5 / 16, 5: 63.0 / 16, 6: 121.0 / 16}
_PCIE_EFFICIENCY = 0.8


def pcie_effective_gbps(gen: int, num_lanes: int = 16) -> float:
    """Achievable pinned-copy bandwidth of a PCIe link, GB/s per direction (see the note above)."""
    if gen not in _PCIE_RAW_GBPS_PER_LANE or num_lanes < 1:
        raise ValueError(f"PCIe link: unknown generation {gen} or lane count {num_lanes}")
    return _PCIE_RAW_GBPS_PER_LANE[gen] * num_lanes * _PCIE_EFFICIENCY


_GEN3 = pcie_effective_gbps(3)
_GEN4 = pcie_effective_gbps(4)
_GEN5 = pcie_effective_gbps(5)
# NVIDIA GH200 Grace Hopper Superchip datasheet: NVLink-C2C 900 GB/s total = 450 GB/s per
# direction; the same 80% achievable fraction as PCIe is assumed until the profiler measures it.
_NVLINK_C2C = 450.0 * _PCIE_EFFICIENCY

# [Note: default compute efficiency]
# Fraction of dense peak a transformer block reaches in training (model FLOPs utilisation):
# - A100: Narayanan et al. 2021 (Megatron-LM, SC'21), Table 1: up to 163 TFLOP/s per GPU of
#   312 (52% of peak) -> 0.5.
# - H100/H200/GH200: Dubey et al. 2024 (The Llama 3 Herd of Models), Table 4: 38-43% BF16 MFU
#   -> 0.4 (the higher peak is harder to reach).
# - V100/T4: Shoeybi et al. 2019 (Megatron-LM), Sec. 5.1: 39 TFLOP/s per V100 = 30% of peak
#   -> 0.3; T4 is a 70 W part of the next generation and is given the same figure.
# - L40S, A10, RTX 4090/3090: no published large-run figure; 0.45 sits between the above for
#   single-device work where no communication competes. The profiler replaces all of these.
_EFF_HOPPER = 0.4
_EFF_AMPERE_DC = 0.5
_EFF_VOLTA = 0.3
_EFF_OTHER = 0.45


def _gpu(
    kind: str, name: str, *, memory_gib: float, bf16_tflops: float, fp16_tflops: float, fp32_tflops: float,
    memory_bw_gbps: float, link_gbps: float, compute_efficiency: float,
) -> DeviceSpec:
    return DeviceSpec(
        kind=kind, name=name, memory_bytes=int(memory_gib * _GIB), bf16_flops=bf16_tflops * _TERA,
        fp16_flops=fp16_tflops * _TERA, fp32_flops=fp32_tflops * _TERA, memory_bw_gbps=memory_bw_gbps,
        h2d_gbps=link_gbps, d2h_gbps=link_gbps, compute_efficiency=compute_efficiency,
    )


# [Note: CPU as a device]
# On CPU-only machines the "device" is the host's cores and RAM. Peak fp32 FLOP/s is estimated
# from the core count: an AVX2 core has two 256-bit FMA units (Intel 64 and IA-32 Architectures
# Optimization Reference Manual, Haswell and later; AMD Zen 2 and later likewise), i.e.
# 2 units x 8 fp32 lanes x 2 FLOP = 32 FLOP/cycle, at an assumed 2.5 GHz all-core clock ->
# 80 GFLOP/s per core. AVX-512 and AMX are not assumed. bf16/fp16 get the fp32 rate: without
# AMX, PyTorch's CPU kernels widen them to fp32, so they are no faster. A copy between the
# "device" and the host tier is a memcpy in the same RAM: it reads and writes every byte, so it
# runs at half the memory bandwidth. Efficiency 0.3: oneDNN GEMMs reach most of peak, but
# attention, norms and element-wise ops in a block are memory-bound on a CPU.
_CPU_FLOPS_PER_CORE = 32 * 2.5e9
_CPU_EFFICIENCY = 0.3
_CPU_REFERENCE_NUM_CPUS = 8
_CPU_REFERENCE_MEMORY_BYTES = 32 * _GIB

# [Note: default host]
# Host memory bandwidth: ~5 GB/s per core, from a desktop with dual-channel DDR4-3200
# (JEDEC JESD79-4: 25.6 GB/s per channel, 51.2 GB/s peak) reaching ~80% in STREAM triad shared
# by 8 cores; at least 10 GB/s (one core alone streams about that); at most 160 GB/s, an
# 8-channel DDR4-3200 server socket (204.8 GB/s peak) at the same 80%.
# CPU AdamW: Ren et al. 2021 (ZeRO-Offload, USENIX ATC'21), CPU-Adam latency table: 4B
# parameters are updated in about 1.0 s on a DGX-2's 2x 24-core Xeon Platinum 8168, i.e.
# ~4e9 params/s over 48 cores ~= 8e7 params/s per core. The step is also bounded by memory
# traffic: see adamw_bytes_per_param.
_HOST_BW_PER_CORE_GBPS = 5.0
_HOST_BW_MIN_GBPS = 10.0
_HOST_BW_MAX_GBPS = 160.0
_CPU_ADAM_PARAMS_PER_S_PER_CORE = 8e7
DEFAULT_HOST_NUM_CPUS = 16
"""Cores of a host the config does not describe (a typical single-GPU workstation or cloud VM)."""
DEFAULT_HOST_MEMORY_BYTES = 128 * _GIB
"""RAM of a host the config does not describe; set ``cluster.nodes[].host_memory`` to yours."""

# Samsung 980 PRO (PCIe 4.0 x4) datasheet: 7.0 GB/s sequential read, 5.0 GB/s sequential write.
# Sustained large transfers come in lower: ~6 GB/s reads with direct I/O, and writes fall once
# the drive's SLC cache fills, so 4 GB/s is used for writes.
_NVME_READ_GBPS = 6.0
_NVME_WRITE_GBPS = 4.0


_ENTRIES: tuple[DeviceSpec, ...] = (
    # NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022), spec table, H100 SXM5: BF16/FP16
    # (FP32 accumulate) 989.4 dense, FP32 66.9 TFLOP/s; NVIDIA H100 datasheet: 80 GB HBM3,
    # 3.35 TB/s; host link PCIe gen5 x16.
    _gpu("h100-sxm", "NVIDIA H100 SXM5 80GB", memory_gib=80, bf16_tflops=989.4, fp16_tflops=989.4,
         fp32_tflops=66.9, memory_bw_gbps=3350, link_gbps=_GEN5, compute_efficiency=_EFF_HOPPER),
    # Same whitepaper and table, H100 PCIe: BF16/FP16 756.5 dense, FP32 51.2 TFLOP/s; H100
    # datasheet: 80 GB HBM2e, 2.0 TB/s; PCIe gen5 x16.
    _gpu("h100-pcie", "NVIDIA H100 PCIe 80GB", memory_gib=80, bf16_tflops=756.5, fp16_tflops=756.5,
         fp32_tflops=51.2, memory_bw_gbps=2000, link_gbps=_GEN5, compute_efficiency=_EFF_HOPPER),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): 141 GB HBM3e, 4.8 TB/s; BF16/FP16 1,979
    # TFLOP/s with sparsity -> 989.5 dense; FP32 67 TFLOP/s; PCIe gen5 x16 to the host.
    _gpu("h200", "NVIDIA H200 SXM 141GB", memory_gib=141, bf16_tflops=989.5, fp16_tflops=989.5,
         fp32_tflops=67.0, memory_bw_gbps=4800, link_gbps=_GEN5, compute_efficiency=_EFF_HOPPER),
    # NVIDIA GH200 Grace Hopper Superchip datasheet (96 GB HBM3 variant): 4 TB/s; BF16/FP16
    # 1,979 TFLOP/s with sparsity -> 989.5 dense; FP32 67 TFLOP/s; NVLink-C2C to Grace memory.
    _gpu("gh200", "NVIDIA GH200 96GB", memory_gib=96, bf16_tflops=989.5, fp16_tflops=989.5,
         fp32_tflops=67.0, memory_bw_gbps=4000, link_gbps=_NVLINK_C2C, compute_efficiency=_EFF_HOPPER),
    # NVIDIA A100 Tensor Core GPU Architecture whitepaper (2020), spec table: BF16/FP16 312 dense,
    # FP32 19.5 TFLOP/s; A100 40GB SXM: HBM2 1,555 GB/s; PCIe gen4 x16.
    _gpu("a100-40gb", "NVIDIA A100 SXM4 40GB", memory_gib=40, bf16_tflops=312, fp16_tflops=312,
         fp32_tflops=19.5, memory_bw_gbps=1555, link_gbps=_GEN4, compute_efficiency=_EFF_AMPERE_DC),
    # NVIDIA A100 datasheet (2021), A100 80GB SXM: HBM2e 2,039 GB/s; compute as above.
    _gpu("a100-80gb", "NVIDIA A100 SXM4 80GB", memory_gib=80, bf16_tflops=312, fp16_tflops=312,
         fp32_tflops=19.5, memory_bw_gbps=2039, link_gbps=_GEN4, compute_efficiency=_EFF_AMPERE_DC),
    # NVIDIA L40S datasheet: 48 GB GDDR6, 864 GB/s; BF16/FP16 362.05 dense (733 with sparsity),
    # FP32 91.6 TFLOP/s; PCIe gen4 x16.
    _gpu("l40s", "NVIDIA L40S", memory_gib=48, bf16_tflops=362.05, fp16_tflops=362.05,
         fp32_tflops=91.6, memory_bw_gbps=864, link_gbps=_GEN4, compute_efficiency=_EFF_OTHER),
    # NVIDIA A10 datasheet: 24 GB GDDR6, 600 GB/s; BF16/FP16 125 dense (250 with sparsity),
    # FP32 31.2 TFLOP/s; PCIe gen4 x16.
    _gpu("a10", "NVIDIA A10", memory_gib=24, bf16_tflops=125, fp16_tflops=125,
         fp32_tflops=31.2, memory_bw_gbps=600, link_gbps=_GEN4, compute_efficiency=_EFF_OTHER),
    # NVIDIA Ada GPU Architecture whitepaper, RTX 4090 spec table: BF16 and FP16 with FP32
    # accumulate 165.2 dense, FP32 82.6 TFLOP/s; 24 GB GDDR6X, 1,008 GB/s; PCIe gen4 x16.
    _gpu("rtx4090", "NVIDIA GeForce RTX 4090", memory_gib=24, bf16_tflops=165.2, fp16_tflops=165.2,
         fp32_tflops=82.6, memory_bw_gbps=1008, link_gbps=_GEN4, compute_efficiency=_EFF_OTHER),
    # NVIDIA Ampere GA102 GPU Architecture whitepaper, RTX 3090 spec table: BF16 and FP16 with FP32
    # accumulate 71 dense, FP32 35.6 TFLOP/s; 24 GB GDDR6X, 936 GB/s; PCIe gen4 x16.
    _gpu("rtx3090", "NVIDIA GeForce RTX 3090", memory_gib=24, bf16_tflops=71, fp16_tflops=71,
         fp32_tflops=35.6, memory_bw_gbps=936, link_gbps=_GEN4, compute_efficiency=_EFF_OTHER),
    # NVIDIA Tesla V100 datasheet (SXM2): 32 GB HBM2, 900 GB/s; tensor (FP16, FP32 accumulate)
    # 125 TFLOP/s, FP32 15.7 TFLOP/s; no bf16; PCIe gen3 x16 to the host.
    _gpu("v100", "NVIDIA Tesla V100 SXM2 32GB", memory_gib=32, bf16_tflops=0, fp16_tflops=125,
         fp32_tflops=15.7, memory_bw_gbps=900, link_gbps=_GEN3, compute_efficiency=_EFF_VOLTA),
    # Same datasheet, the 16 GB SXM2 part.
    _gpu("v100-16gb", "NVIDIA Tesla V100 SXM2 16GB", memory_gib=16, bf16_tflops=0, fp16_tflops=125,
         fp32_tflops=15.7, memory_bw_gbps=900, link_gbps=_GEN3, compute_efficiency=_EFF_VOLTA),
    # NVIDIA T4 datasheet: 16 GB GDDR6, 320 GB/s; mixed-precision (FP16/FP32) 65 TFLOP/s,
    # FP32 8.1 TFLOP/s; no bf16; PCIe gen3 x16.
    _gpu("t4", "NVIDIA T4", memory_gib=16, bf16_tflops=0, fp16_tflops=65,
         fp32_tflops=8.1, memory_bw_gbps=320, link_gbps=_GEN3, compute_efficiency=_EFF_VOLTA),
)


def _host_memory_bw_gbps(num_cpus: int) -> float:
    # [Note: default host]
    return min(max(_HOST_BW_PER_CORE_GBPS * num_cpus, _HOST_BW_MIN_GBPS), _HOST_BW_MAX_GBPS)


def cpu_device_spec(*, num_cpus: int, memory_bytes: int, memory_bw_gbps: float | None = None) -> DeviceSpec:
    """The host's cores and RAM as the device tier of a CPU-only machine ([Note: CPU as a device])."""
    if num_cpus < 1:
        raise ValueError(f"cluster.nodes[].num_cpus: must be >= 1, got {num_cpus}")
    if memory_bytes <= 0:
        raise ValueError(f"cluster.nodes[].host_memory: must be > 0, got {memory_bytes}")
    bw = _host_memory_bw_gbps(num_cpus) if memory_bw_gbps is None else memory_bw_gbps
    flops = num_cpus * _CPU_FLOPS_PER_CORE
    return DeviceSpec(
        kind="cpu", name=f"CPU ({num_cpus} cores)", memory_bytes=int(memory_bytes), bf16_flops=flops,
        fp16_flops=flops, fp32_flops=flops, memory_bw_gbps=bw, h2d_gbps=bw / 2, d2h_gbps=bw / 2,
        compute_efficiency=_CPU_EFFICIENCY,
    )


KNOWN_DEVICES: Mapping[str, DeviceSpec] = MappingProxyType(
    {d.kind: d for d in _ENTRIES}
    | {"cpu": cpu_device_spec(num_cpus=_CPU_REFERENCE_NUM_CPUS, memory_bytes=_CPU_REFERENCE_MEMORY_BYTES)}
)
"""Catalog entries by kind. ``cpu`` is a reference 8-core, 32 GiB machine; ``cluster.inventory``
sizes the CPU device from the node's own cores and RAM with ``cpu_device_spec``."""

DEVICE_ALIASES: Mapping[str, str] = MappingProxyType({
    "h100": "h100-sxm", "h100-80gb": "h100-sxm", "h100-sxm5": "h100-sxm",
    "h200-sxm": "h200", "gh200-96gb": "gh200",
    "a100": "a100-80gb", "a100-80": "a100-80gb", "a100-40": "a100-40gb",
    "4090": "rtx4090", "rtx-4090": "rtx4090", "3090": "rtx3090", "rtx-3090": "rtx3090",
    "v100-32gb": "v100", "tesla-t4": "t4", "l40-s": "l40s",
})
"""Other spellings accepted for a kind (lower-case)."""


def device_spec(kind: str, *, field: str = "cluster.nodes[].devices[].kind") -> DeviceSpec:
    """The catalog entry for ``kind`` (case-insensitive; aliases such as ``4090`` or ``a100`` accepted).

    Raises ValueError naming ``field`` and listing the known kinds when ``kind`` is not in the catalog.
    """
    key = str(kind).strip().lower().replace("_", "-")
    key = DEVICE_ALIASES.get(key, key)
    if key not in KNOWN_DEVICES:
        raise ValueError(
            f"{field}: unknown device kind {kind!r}; known kinds: {', '.join(KNOWN_DEVICES)} "
            f"(aliases: {', '.join(DEVICE_ALIASES)}). For another GPU pick the closest kind and "
            f"override its figures (memory, bf16_tflops, fp32_tflops, memory_bw_gbps, h2d_gbps)"
        )
    return KNOWN_DEVICES[key]


# [Note: unknown GPUs]
# A GPU that nvml reports but the catalog does not know keeps every figure nvml can give
# (memory, CUDA cores x max SM clock, memory bus width x memory clock, PCIe link) and
# conservative guesses for the rest. Tensor-core rates are taken as 2x fp32, the lowest ratio
# of any tensor-core part above (RTX 3090: 71 vs 35.6; RTX 4090: 165.2 vs 82.6): bf16 from
# compute capability 8.0 (Ampere) on, fp16 from 7.0 (Volta) on. Without nvml figures: a T4's.
_GENERIC_FP32_FLOPS = 8.1 * _TERA
_GENERIC_MEMORY_BW_GBPS = 320.0
_GENERIC_EFFICIENCY = _EFF_VOLTA


def generic_gpu_spec(
    *, name: str, memory_bytes: int, fp32_flops: float | None = None, memory_bw_gbps: float | None = None,
    h2d_gbps: float | None = None, compute_capability: tuple[int, int] | None = None,
) -> DeviceSpec:
    """A GPU the catalog does not know, from what nvml reports ([Note: unknown GPUs])."""
    fp32 = _GENERIC_FP32_FLOPS if fp32_flops is None else fp32_flops
    cc = compute_capability or (0, 0)
    link = _GEN3 if h2d_gbps is None else h2d_gbps
    return DeviceSpec(
        kind="gpu", name=name, memory_bytes=int(memory_bytes),
        bf16_flops=2 * fp32 if cc >= (8, 0) else 0.0, fp16_flops=2 * fp32 if cc >= (7, 0) else fp32,
        fp32_flops=fp32, memory_bw_gbps=_GENERIC_MEMORY_BW_GBPS if memory_bw_gbps is None else memory_bw_gbps,
        h2d_gbps=link, d2h_gbps=link, compute_efficiency=_GENERIC_EFFICIENCY,
    )


def adamw_bytes_per_param(*, mixed: bool = False) -> int:
    """Bytes of host memory traffic of one CPU AdamW update of one parameter.

    Reads fp32 param, grad, m, v (16 B) and writes param, m, v (12 B: the descriptor's
    ``fused_bytes_per_elem``); in mixed precision it also writes the 2-byte compute copy (Ren et
    al. 2021, ZeRO-Offload, Sec. 5.1: the fp16 parameter copy is produced by the CPU step).
    """
    return ADAMW.fused_bytes_per_elem + (2 if mixed else 0)


def default_host_spec(
    num_cpus: int = DEFAULT_HOST_NUM_CPUS, memory_bytes: int = DEFAULT_HOST_MEMORY_BYTES, *,
    memory_bw_gbps: float | None = None,
) -> HostSpec:
    """A host with ``num_cpus`` cores and ``memory_bytes`` of RAM, other figures scaled by cores.

    Memory bandwidth (unless given) and CPU AdamW throughput follow [Note: default host]; AdamW
    is the smaller of the per-core compute rate times cores and what the memory bandwidth can feed.
    """
    if num_cpus < 1:
        raise ValueError(f"cluster.nodes[].num_cpus: must be >= 1, got {num_cpus}")
    if memory_bytes <= 0:
        raise ValueError(f"cluster.nodes[].host_memory: must be > 0, got {memory_bytes}")
    bw = _host_memory_bw_gbps(num_cpus) if memory_bw_gbps is None else memory_bw_gbps
    adam = min(_CPU_ADAM_PARAMS_PER_S_PER_CORE * num_cpus, bw * 1e9 / adamw_bytes_per_param())
    return HostSpec(memory_bytes=int(memory_bytes), num_cpus=int(num_cpus), memory_bw_gbps=bw,
                    cpu_adam_params_per_s=adam)


def default_nvme_spec(path: str, capacity_bytes: int) -> NvmeSpec:
    """A typical PCIe 4.0 NVMe drive at ``path`` with ``capacity_bytes`` usable (figures above)."""
    if not path:
        raise ValueError("cluster.nodes[].nvme.path: set the directory for offloaded data, e.g. /mnt/nvme/memtrain")
    if capacity_bytes < 0 or not math.isfinite(capacity_bytes):
        raise ValueError(f"cluster.nodes[].nvme.capacity: must be >= 0, got {capacity_bytes}")
    return NvmeSpec(path=str(path), capacity_bytes=int(capacity_bytes), read_gbps=_NVME_READ_GBPS,
                    write_gbps=_NVME_WRITE_GBPS)
