"""From the ``cluster`` config section to a ``ClusterSpec``: catalog figures, overrides, this machine.

* Explicit nodes (``cluster.nodes``): each device starts from its catalog entry
  (``cluster.catalog``) and every override in the config replaces the matching figure.
* ``cluster: auto``: this machine, read with psutil (RAM, cores, honouring cgroup limits) and
  nvidia-ml-py (GPUs). A machine without GPUs gets one ``cpu`` device whose memory is the host
  RAM: on a CPU-only machine the device tier is host memory (docs/DESIGN.md, "The CPU-only
  path"). A driver that is there but fails is an error ([Note: no GPU or a broken driver]).

Nothing here creates files or directories; the NVMe path is only inspected for free space.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from memtrain.cluster.spec import ClusterSpec, DeviceSpec, HostSpec, NodeSpec, NvmeSpec
from memtrain.errors import UserError
from memtrain.cluster import catalog
from memtrain.units import format_bytes
from memtrain.config import ConfigError

if TYPE_CHECKING:
    from memtrain.config import ClusterConfig, DeviceConfig, NodeConfig, NvmeConfig

__all__ = ["resolve_cluster", "local_node_spec", "gpu_kind_from_name", "free_bytes_at", "format_cluster"]

_TERA = 1e12
_GIB = 2**30
# cgroup v2, then v1: a container's memory limit and CPU quota (Ray on Kubernetes runs in pods).
_CGROUP_MEMORY_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
_CGROUP_CPU_FILES = ("/sys/fs/cgroup/cpu.max",)


# --- explicit nodes --------------------------------------------------------------------------


def _positive(value: float, field: str, *, allow_zero: bool = False) -> float:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or not math.isfinite(value):
        raise ConfigError(f"{field}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


def _host_spec(base_num_cpus: int, base_memory_bytes: int, nc: NodeConfig | None, field: str) -> HostSpec:
    """``default_host_spec`` for the node's cores and RAM, then the node's host overrides."""
    num_cpus, memory = base_num_cpus, base_memory_bytes
    bw = adam = None
    if nc is not None:
        if nc.num_cpus is not None:
            num_cpus = int(_positive(nc.num_cpus, f"{field}.num_cpus"))
        if nc.host_memory is not None:
            memory = int(_positive(nc.host_memory, f"{field}.host_memory"))
        if nc.host_memory_bw_gbps is not None:
            bw = _positive(nc.host_memory_bw_gbps, f"{field}.host_memory_bw_gbps")
        if nc.cpu_adam_params_per_s is not None:
            adam = _positive(nc.cpu_adam_params_per_s, f"{field}.cpu_adam_params_per_s")
    host = catalog.default_host_spec(num_cpus, memory, memory_bw_gbps=bw)
    return host if adam is None else dataclasses.replace(host, cpu_adam_params_per_s=adam)


def _apply_device_overrides(spec: DeviceSpec, dc: DeviceConfig, field: str) -> DeviceSpec:
    changes: dict[str, Any] = {}
    if dc.memory is not None:
        changes["memory_bytes"] = int(_positive(dc.memory, f"{field}.memory"))
    for name in ("bf16", "fp16", "fp32"):
        tflops = getattr(dc, f"{name}_tflops")
        if tflops is not None:
            # 0 is allowed: it declares that the device lacks the dtype (as bf16 on a V100).
            changes[f"{name}_flops"] = _positive(tflops, f"{field}.{name}_tflops", allow_zero=True) * _TERA
    for name in ("memory_bw_gbps", "h2d_gbps", "d2h_gbps"):
        value = getattr(dc, name)
        if value is not None:
            changes[name] = _positive(value, f"{field}.{name}")
    if dc.compute_efficiency is not None:
        changes["compute_efficiency"] = dc.compute_efficiency  # range checked by DeviceConfig
    spec = dataclasses.replace(spec, **changes)
    if spec.fp32_flops <= 0:
        raise ConfigError(f"{field}.fp32_tflops: must be > 0, got {spec.fp32_flops / _TERA}")
    return spec


def _devices(nc: NodeConfig, host: HostSpec, field: str) -> tuple[DeviceSpec, ...]:
    # [Note: several CPU devices on a node] Each CPU "device" is a share of the same cores and
    # RAM (e.g. several gloo ranks on one machine), so cores and memory are split evenly.
    num_cpu_devices = sum(dc.count for dc in nc.devices if _is_cpu_kind(dc.kind))
    out: list[DeviceSpec] = []
    for j, dc in enumerate(nc.devices):
        dfield = f"{field}.devices[{j}]"
        if _is_cpu_kind(dc.kind):
            base = catalog.cpu_device_spec(
                num_cpus=max(1, host.num_cpus // num_cpu_devices),
                memory_bytes=host.memory_bytes // num_cpu_devices,
                memory_bw_gbps=host.memory_bw_gbps / num_cpu_devices,
            )
        else:
            try:
                base = catalog.device_spec(dc.kind, field=f"{dfield}.kind")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        spec = _apply_device_overrides(base, dc, dfield)
        out.extend([spec] * dc.count)
    return tuple(out)


def _is_cpu_kind(kind: str) -> bool:
    return str(kind).strip().lower() == "cpu"


def free_bytes_at(path: str | os.PathLike[str]) -> int:
    """Free bytes of the filesystem that holds ``path``, or would hold it once created.

    The path itself may not exist yet (it is created by the runtime, not here), so the nearest
    existing parent is asked.
    """
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return int(shutil.disk_usage(p).free)


def _nvme_spec(nv: NvmeConfig, field: str) -> NvmeSpec:
    if not nv.path:
        raise ConfigError(f"{field}.path: set the directory for offloaded data, e.g. /mnt/nvme/memtrain")
    if nv.capacity is not None:
        capacity = int(_positive(nv.capacity, f"{field}.capacity", allow_zero=True))
    else:
        try:
            capacity = free_bytes_at(nv.path)
        except OSError as e:
            raise ConfigError(
                f"{field}.path: cannot read the free space of {nv.path!r} ({e.strerror}); "
                f"set {field}.capacity or fix the path"
            ) from None
    spec = catalog.default_nvme_spec(nv.path, capacity)
    if nv.read_gbps is not None:
        spec = dataclasses.replace(spec, read_gbps=_positive(nv.read_gbps, f"{field}.read_gbps"))
    if nv.write_gbps is not None:
        spec = dataclasses.replace(spec, write_gbps=_positive(nv.write_gbps, f"{field}.write_gbps"))
    return spec


def _explicit_node(nc: NodeConfig, field: str) -> NodeSpec:
    if not nc.devices:
        raise ConfigError(f"{field}.devices: list at least one device, e.g. [{{kind: rtx4090}}]")
    host = _host_spec(catalog.DEFAULT_HOST_NUM_CPUS, catalog.DEFAULT_HOST_MEMORY_BYTES, nc, field)
    nvme = _nvme_spec(nc.nvme, f"{field}.nvme") if nc.nvme is not None else None
    return NodeSpec(name=nc.name, host=host, devices=_devices(nc, host, field), nvme=nvme)


def resolve_cluster(cfg: ClusterConfig) -> ClusterSpec:
    """The hardware the planner works with, from the ``cluster`` config section.

    Explicit nodes give ``source='catalog'``; ``auto`` reads this machine (``source='auto'``).
    With ``auto``, one entry in ``nodes`` may add host overrides and an NVMe to this machine;
    its devices are read from the machine and may not be listed.
    """
    network = _positive(cfg.network_gbps, "cluster.network_gbps")
    if cfg.auto:
        if len(cfg.nodes) > 1:
            raise ConfigError(
                "cluster.nodes: with cluster.auto only this machine is read; list one node of "
                "overrides (host, nvme) or set cluster.auto: false to describe several nodes"
            )
        overlay = cfg.nodes[0] if cfg.nodes else None
        if overlay is not None and _lists_devices(overlay):
            raise ConfigError(
                "cluster.nodes[0].devices: with cluster.auto the devices are read from this machine; "
                "remove them, or set cluster.auto: false to describe the node yourself"
            )
        node = _local_node(overlay)
        return ClusterSpec(nodes=(node,), network_gbps=network, source="auto")
    names = [nc.name for nc in cfg.nodes]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ConfigError(f"cluster.nodes[{i}].name: {name!r} is used twice; give each node its own name")
    nodes = tuple(_explicit_node(nc, f"cluster.nodes[{i}]") for i, nc in enumerate(cfg.nodes))
    return ClusterSpec(nodes=nodes, network_gbps=network, source="catalog")


def _lists_devices(nc: NodeConfig) -> bool:
    """Whether the node config lists devices other than the default single plain ``cpu`` entry."""
    from memtrain.config import DeviceConfig

    return [dataclasses.asdict(d) for d in nc.devices] != [dataclasses.asdict(DeviceConfig())]


# --- this machine ------------------------------------------------------------------------------


def _read_first_line(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return None


def _local_memory_bytes() -> int:
    total = int(psutil.virtual_memory().total)
    for path in _CGROUP_MEMORY_FILES:
        line = _read_first_line(path)
        if line and line.isdigit():
            total = min(total, int(line))  # "max" (v2) or a huge number (v1) means no limit
    return total


def _local_num_cpus() -> int:
    candidates = [psutil.cpu_count(logical=False) or psutil.cpu_count(logical=True) or 1]
    if hasattr(os, "sched_getaffinity"):
        candidates.append(len(os.sched_getaffinity(0)))
    for path in _CGROUP_CPU_FILES:
        line = _read_first_line(path)
        parts = line.split() if line else []
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit() and int(parts[1]) > 0:
            candidates.append(max(1, math.ceil(int(parts[0]) / int(parts[1]))))
    return max(1, min(candidates))


def gpu_kind_from_name(name: str, memory_bytes: int) -> str | None:
    """The catalog kind of a GPU from the name nvml reports (e.g. ``NVIDIA A100-SXM4-80GB``), else None.

    Memory tells the 40/80 GB A100 and 16/32 GB V100 apart; whole-word matching keeps ``A10``
    from matching ``A100`` and ``L40`` from matching ``L40S``.
    """
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    if "gh200" in words:
        return "gh200"
    if "h200" in words:
        return "h200"
    if "h100" in words:
        return "h100-pcie" if words & {"pcie", "nvl"} else "h100-sxm"
    if "a100" in words:
        return "a100-80gb" if memory_bytes > 48 * _GIB else "a100-40gb"
    if "v100" in words:
        return "v100" if memory_bytes > 24 * _GIB else "v100-16gb"
    for word, kind in (("l40s", "l40s"), ("a10", "a10"), ("4090", "rtx4090"), ("3090", "rtx3090"), ("t4", "t4")):
        if word in words:
            return kind
    return None


def _optional(fn, *args) -> Any:
    try:
        return fn(*args)
    except Exception:  # an optional nvml query a driver or GPU does not support
        return None


def _nvml_device(nvml: Any, handle: Any) -> DeviceSpec:
    name = nvml.nvmlDeviceGetName(handle)
    name = name.decode() if isinstance(name, bytes) else str(name)
    memory = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
    gen = _optional(nvml.nvmlDeviceGetMaxPcieLinkGeneration, handle)
    width = _optional(nvml.nvmlDeviceGetMaxPcieLinkWidth, handle)
    link = None
    if isinstance(gen, int) and isinstance(width, int) and width > 0:
        link = _optional(catalog.pcie_effective_gbps, gen, width)
    kind = gpu_kind_from_name(name, memory)
    if kind is not None:
        spec = catalog.device_spec(kind)
        changes: dict[str, Any] = {"name": name, "memory_bytes": memory}
        if link is not None and kind != "gh200":  # GH200 reaches its host over NVLink-C2C
            # A card in a slower slot (or fewer lanes) than its own link gets the slot's rate.
            changes["h2d_gbps"] = min(spec.h2d_gbps, link)
            changes["d2h_gbps"] = min(spec.d2h_gbps, link)
        return dataclasses.replace(spec, **changes)
    # [Note: unknown GPUs] in cluster/catalog.py: fp32 = CUDA cores x 2 FLOP (FMA) x max SM
    # clock; memory bandwidth = bus width x memory clock x 2 (double data rate).
    cores = _optional(nvml.nvmlDeviceGetNumGpuCores, handle)
    sm_mhz = _optional(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_SM)
    mem_mhz = _optional(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_MEM)
    bus_bits = _optional(nvml.nvmlDeviceGetMemoryBusWidth, handle)
    cc = _optional(nvml.nvmlDeviceGetCudaComputeCapability, handle)
    fp32 = cores * 2 * sm_mhz * 1e6 if cores and sm_mhz else None
    bw = mem_mhz * 1e6 * 2 * bus_bits / 8 / 1e9 if mem_mhz and bus_bits else None
    return catalog.generic_gpu_spec(
        name=name, memory_bytes=memory, fp32_flops=fp32, memory_bw_gbps=bw, h2d_gbps=link,
        compute_capability=tuple(cc) if cc else None,
    )


# [Note: no GPU or a broken driver] nvml answers three ways. No NVIDIA driver on this machine
# (nvidia-ml-py not installed, the NVML library missing, the kernel driver not loaded) or a
# driver that sees no GPU: a CPU-only machine, planned as one silently, as on every developer
# and CI machine. A driver that is there but fails (nvmlInit or a device query raises anything
# else: a library/driver version mismatch after an upgrade, no permission, a GPU fallen off the
# bus): a UserError naming the failure. Planning such a GPU machine as CPU-only would give a
# plan for the wrong hardware without a word.
_NO_DRIVER_ERRORS = ("NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded")


def _driver_error(call: str, error: BaseException) -> UserError:
    return UserError(
        f"cluster.auto: this machine's NVIDIA driver failed ({call}: {type(error).__name__}: {error}), so its "
        "GPUs cannot be read; check the driver with nvidia-smi (a driver upgraded without a reboot fails this "
        "way), or set cluster.auto: false and describe this machine in cluster.nodes"
    )


def _nvml_devices() -> tuple[DeviceSpec, ...]:
    """The GPUs nvml reports; () without an NVIDIA driver ([Note: no GPU or a broken driver])."""
    try:
        import pynvml as nvml
    except ImportError:
        return ()
    try:
        nvml.nvmlInit()
    except Exception as e:
        no_driver = tuple(getattr(nvml, name) for name in _NO_DRIVER_ERRORS if hasattr(nvml, name))
        if isinstance(e, no_driver):
            return ()
        raise _driver_error("nvmlInit", e) from e
    try:
        return tuple(_nvml_device(nvml, nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(nvml.nvmlDeviceGetCount()))
    except getattr(nvml, "NVMLError", Exception) as e:  # an error of ours keeps its traceback
        raise _driver_error("reading the GPUs", e) from e
    finally:
        _optional(nvml.nvmlShutdown)


def _local_node(overlay: NodeConfig | None) -> NodeSpec:
    field = "cluster.nodes[0]"
    host = _host_spec(_local_num_cpus(), _local_memory_bytes(), overlay, field)
    devices = _nvml_devices() or (
        catalog.cpu_device_spec(num_cpus=host.num_cpus, memory_bytes=host.memory_bytes,
                                memory_bw_gbps=host.memory_bw_gbps),
    )
    nvme = _nvme_spec(overlay.nvme, f"{field}.nvme") if overlay is not None and overlay.nvme is not None else None
    # "node0" is NodeConfig's default name: the user did not name the node, so the host's name is used.
    name = overlay.name if overlay is not None and overlay.name != "node0" else (socket.gethostname() or "local")
    return NodeSpec(name=name, host=host, devices=devices, nvme=nvme)


def local_node_spec() -> NodeSpec:
    """This machine: RAM and cores from psutil (within cgroup limits), GPUs from nvml, else one
    ``cpu`` device holding the host RAM; a failing driver raises ``UserError``. No NVMe
    (configure one in ``cluster.nodes[0].nvme``)."""
    return _local_node(None)


# --- reports -----------------------------------------------------------------------------------


def format_cluster(spec: ClusterSpec) -> str:
    """A header, one line per node (host, NVMe) and one line per device, for reports."""
    lines = [f"cluster: {len(spec.nodes)} node(s), figures from {spec.source}, network {spec.network_gbps:g} GB/s"]
    for node in spec.nodes:
        h = node.host
        line = (f"{node.name}: host {format_bytes(h.memory_bytes)} RAM, {h.num_cpus} cpus, "
                f"{h.memory_bw_gbps:.0f} GB/s, CPU AdamW {h.cpu_adam_params_per_s:.2e} params/s")
        if node.nvme is not None:
            n = node.nvme
            line += (f"; nvme {n.path} {format_bytes(n.capacity_bytes)} "
                     f"read {n.read_gbps:g} write {n.write_gbps:g} GB/s")
        lines.append(line)
        for i, d in enumerate(node.devices):
            lines.append(
                f"  {node.name}/{i} {d.kind:<10} {d.name}: {format_bytes(d.memory_bytes)}, "
                f"bf16 {d.bf16_flops / _TERA:.1f} fp16 {d.fp16_flops / _TERA:.1f} fp32 {d.fp32_flops / _TERA:.1f} TFLOP/s, "
                f"mem {d.memory_bw_gbps:.0f} GB/s, h2d {d.h2d_gbps:.1f} d2h {d.d2h_gbps:.1f} GB/s, "
                f"eff {d.compute_efficiency:.2f}"
            )
    return "\n".join(lines)
