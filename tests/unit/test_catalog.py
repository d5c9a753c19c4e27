"""Hardware catalog figures, config → ClusterSpec resolution, and reading this machine."""

import dataclasses
import shutil
import subprocess
import sys
import types
from pathlib import Path

import psutil
import pytest

from memtrain.cluster import format_cluster, free_bytes_at, gpu_kind_from_name, local_node_spec, resolve_cluster
from memtrain.cluster import inventory
from memtrain.cluster import catalog
from memtrain.cluster.catalog import KNOWN_DEVICES, device_spec
from memtrain.config import ClusterConfig, ConfigError, DeviceConfig, NodeConfig, NvmeConfig, config_from_dict

GIB = 2**30
ROOT = Path(__file__).resolve().parents[2]

# --- catalog ---------------------------------------------------------------------------------

REQUIRED = ["h100-sxm", "h100-pcie", "h200", "a100-40gb", "a100-80gb", "l40s", "a10", "rtx4090", "rtx3090",
            "v100", "t4", "cpu"]


def test_catalog_has_required_kinds():
    assert set(REQUIRED) <= set(KNOWN_DEVICES)


@pytest.mark.parametrize("kind", sorted(KNOWN_DEVICES))
def test_entry_is_sane(kind):
    d = KNOWN_DEVICES[kind]
    assert d.kind == kind and d.name
    assert 1 * GIB <= d.memory_bytes <= 256 * GIB
    assert d.fp32_flops > 0 and d.fp16_flops >= d.fp32_flops
    if d.bf16_flops:
        assert d.bf16_flops >= d.fp32_flops
    assert 0 < d.memory_bw_gbps < 10_000
    assert 0 < d.h2d_gbps <= 500 and 0 < d.d2h_gbps <= 500
    assert 0 < d.compute_efficiency <= 1
    # Dense peaks: no GPU here exceeds 1 PFLOP/s dense bf16 (H100/H200 are 989).
    assert d.bf16_flops < 1.0e15 and d.fp16_flops < 1.0e15
    assert d.peak_flops("fp32") == d.fp32_flops


@pytest.mark.parametrize(
    "kind,memory_gib,bf16_tflops,fp32_tflops,memory_bw_gbps",
    [
        ("h100-sxm", 80, 989.4, 66.9, 3350),
        ("h100-pcie", 80, 756.5, 51.2, 2000),
        ("h200", 141, 989.5, 67.0, 4800),
        ("a100-40gb", 40, 312, 19.5, 1555),
        ("a100-80gb", 80, 312, 19.5, 2039),
        ("l40s", 48, 362.05, 91.6, 864),
        ("a10", 24, 125, 31.2, 600),
        ("rtx4090", 24, 165.2, 82.6, 1008),
        ("rtx3090", 24, 71, 35.6, 936),
        ("v100", 32, 0, 15.7, 900),
        ("t4", 16, 0, 8.1, 320),
    ],
)
def test_datasheet_values(kind, memory_gib, bf16_tflops, fp32_tflops, memory_bw_gbps):
    d = device_spec(kind)
    assert d.memory_bytes == memory_gib * GIB
    assert d.bf16_flops == pytest.approx(bf16_tflops * 1e12)
    assert d.fp32_flops == pytest.approx(fp32_tflops * 1e12)
    assert d.memory_bw_gbps == memory_bw_gbps


def test_no_bf16_on_volta_and_turing_but_fp16_tensor_cores():
    assert device_spec("v100").bf16_flops == 0 and device_spec("v100").fp16_flops == pytest.approx(125e12)
    assert device_spec("t4").bf16_flops == 0 and device_spec("t4").fp16_flops == pytest.approx(65e12)


def test_host_links_follow_pcie_generation():
    assert catalog.pcie_effective_gbps(4) == pytest.approx(31.5 * 0.8)
    assert catalog.pcie_effective_gbps(4, 8) == pytest.approx(catalog.pcie_effective_gbps(4) / 2)
    assert device_spec("v100").h2d_gbps < device_spec("a100-80gb").h2d_gbps < device_spec("h100-sxm").h2d_gbps
    assert device_spec("gh200").h2d_gbps > 5 * device_spec("h100-sxm").h2d_gbps  # NVLink-C2C
    with pytest.raises(ValueError):
        catalog.pcie_effective_gbps(9)


@pytest.mark.parametrize("alias,kind", [("4090", "rtx4090"), ("a100", "a100-80gb"), ("H100", "h100-sxm"),
                                        ("RTX_3090", "rtx3090"), (" T4 ", "t4")])
def test_aliases_and_case(alias, kind):
    assert device_spec(alias) is KNOWN_DEVICES[kind]


def test_unknown_kind_names_field_and_known_kinds():
    with pytest.raises(ValueError) as e:
        device_spec("rtx9090")
    msg = str(e.value)
    assert msg.startswith("cluster.nodes[].devices[].kind:") and "'rtx9090'" in msg
    assert all(k in msg for k in REQUIRED)


def test_cpu_device_scales_with_cores():
    one = catalog.cpu_device_spec(num_cpus=1, memory_bytes=4 * GIB)
    eight = catalog.cpu_device_spec(num_cpus=8, memory_bytes=4 * GIB)
    assert eight.fp32_flops == pytest.approx(8 * one.fp32_flops)
    assert one.fp32_flops == pytest.approx(32 * 2.5e9)  # AVX2: 2 FMA x 8 lanes x 2 FLOP at 2.5 GHz
    assert eight.bf16_flops == eight.fp32_flops  # no AMX assumed: bf16 is no faster
    assert eight.h2d_gbps == pytest.approx(eight.memory_bw_gbps / 2)  # a memcpy reads and writes
    with pytest.raises(ValueError, match="num_cpus"):
        catalog.cpu_device_spec(num_cpus=0, memory_bytes=GIB)


def test_default_host_scales_with_cores_and_is_bandwidth_bound():
    small, big, huge = (catalog.default_host_spec(n, 64 * GIB) for n in (2, 16, 256))
    assert small.cpu_adam_params_per_s < big.cpu_adam_params_per_s <= huge.cpu_adam_params_per_s
    assert small.memory_bw_gbps < big.memory_bw_gbps <= huge.memory_bw_gbps
    # ZeRO-Offload's reference point: ~4e9 params/s on 48 cores.
    assert catalog.default_host_spec(48, 64 * GIB).cpu_adam_params_per_s == pytest.approx(4e9, rel=0.1)
    # Many cores: the step cannot move more than the memory bandwidth (28 bytes per parameter).
    assert huge.cpu_adam_params_per_s == pytest.approx(huge.memory_bw_gbps * 1e9 / 28)
    assert catalog.default_host_spec(4, GIB, memory_bw_gbps=1.0).cpu_adam_params_per_s == pytest.approx(1e9 / 28)
    with pytest.raises(ValueError, match="host_memory"):
        catalog.default_host_spec(4, 0)


def test_default_nvme():
    n = catalog.default_nvme_spec("/mnt/x", 10 * GIB)
    assert (n.path, n.capacity_bytes) == ("/mnt/x", 10 * GIB)
    assert 1 < n.write_gbps <= n.read_gbps < 8  # a PCIe 4.0 x4 drive tops out near 7 GB/s
    with pytest.raises(ValueError, match="nvme.path"):
        catalog.default_nvme_spec("", 1)


# --- explicit nodes --------------------------------------------------------------------------


def _cluster(**node) -> ClusterConfig:
    return config_from_dict({"cluster": {"nodes": [node]}}).cluster


def test_every_device_override_takes_effect():
    cfg = _cluster(devices=[{
        "kind": "rtx4090", "memory": "20GiB", "bf16_tflops": 150, "fp16_tflops": 140, "fp32_tflops": 80,
        "memory_bw_gbps": 900, "h2d_gbps": 20, "d2h_gbps": 19, "compute_efficiency": 0.6,
    }])
    spec = resolve_cluster(cfg)
    assert spec.source == "catalog"
    d = spec.nodes[0].devices[0]
    assert d == dataclasses.replace(
        device_spec("rtx4090"), memory_bytes=20 * GIB, bf16_flops=150e12, fp16_flops=140e12, fp32_flops=80e12,
        memory_bw_gbps=900, h2d_gbps=20, d2h_gbps=19, compute_efficiency=0.6,
    )


def test_no_override_gives_catalog_entry():
    assert resolve_cluster(_cluster(devices=[{"kind": "a100"}])).nodes[0].devices[0] == device_spec("a100-80gb")


def test_every_host_and_nvme_override_takes_effect(tmp_path):
    cfg = _cluster(
        name="n1", host_memory="96GiB", num_cpus=24, host_memory_bw_gbps=70, cpu_adam_params_per_s=2e9,
        devices=[{"kind": "l40s"}],
        nvme={"path": str(tmp_path / "nvme"), "capacity": "500GiB", "read_gbps": 3.5, "write_gbps": 2.5},
    )
    node = resolve_cluster(cfg).nodes[0]
    assert node.name == "n1"
    assert (node.host.memory_bytes, node.host.num_cpus) == (96 * GIB, 24)
    assert (node.host.memory_bw_gbps, node.host.cpu_adam_params_per_s) == (70, 2e9)
    assert node.nvme == inventory.NvmeSpec(path=str(tmp_path / "nvme"), capacity_bytes=500 * GIB,
                                           read_gbps=3.5, write_gbps=2.5)
    assert not (tmp_path / "nvme").exists()  # resolving reads the machine, never writes to it


def test_host_defaults_scale_with_overridden_cores():
    node = resolve_cluster(_cluster(num_cpus=4, devices=[{"kind": "t4"}])).nodes[0]
    assert node.host == catalog.default_host_spec(4, catalog.DEFAULT_HOST_MEMORY_BYTES)
    assert node.nvme is None


def test_count_expands_devices():
    node = resolve_cluster(_cluster(devices=[{"kind": "h100-sxm", "count": 8}, {"kind": "t4", "count": 2}])).nodes[0]
    assert [d.kind for d in node.devices] == ["h100-sxm"] * 8 + ["t4"] * 2


def test_cpu_devices_share_the_host():
    node = resolve_cluster(_cluster(host_memory="64GiB", num_cpus=8, devices=[{"kind": "cpu", "count": 2}])).nodes[0]
    assert len(node.devices) == 2
    for d in node.devices:
        assert (d.kind, d.memory_bytes) == ("cpu", 32 * GIB)
        assert d.fp32_flops == pytest.approx(catalog.cpu_device_spec(num_cpus=4, memory_bytes=GIB).fp32_flops)


def test_several_nodes_and_network():
    cfg = config_from_dict({"cluster": {"network_gbps": 50, "nodes": [
        {"name": "a", "devices": [{"kind": "a10"}]}, {"name": "b", "devices": [{"kind": "rtx3090"}]}]}}).cluster
    spec = resolve_cluster(cfg)
    assert [n.name for n in spec.nodes] == ["a", "b"] and spec.network_gbps == 50


def test_unknown_kind_in_config_names_indexed_field():
    cfg = config_from_dict({"cluster": {"nodes": [{"devices": [{"kind": "t4"}]},
                                                   {"name": "x", "devices": [{"kind": "t4"}, {"kind": "b200"}]}]}}).cluster
    with pytest.raises(ConfigError, match=r"^cluster\.nodes\[1\]\.devices\[1\]\.kind: unknown device kind 'b200'.*rtx4090"):
        resolve_cluster(cfg)


@pytest.mark.parametrize(
    "node,field",
    [
        ({"devices": [{"kind": "t4", "memory": 0}]}, r"cluster\.nodes\[0\]\.devices\[0\]\.memory"),
        ({"devices": [{"kind": "t4", "h2d_gbps": -1}]}, r"cluster\.nodes\[0\]\.devices\[0\]\.h2d_gbps"),
        ({"devices": [{"kind": "t4", "fp32_tflops": 0}]}, r"cluster\.nodes\[0\]\.devices\[0\]\.fp32_tflops"),
        ({"num_cpus": 0}, r"cluster\.nodes\[0\]\.num_cpus"),
        ({"devices": []}, r"cluster\.nodes\[0\]\.devices"),
        ({"nvme": {"capacity": "1GiB"}}, r"cluster\.nodes\[0\]\.nvme\.path"),
        ({"nvme": {"path": "/tmp/x", "capacity": 1, "read_gbps": 0}}, r"cluster\.nodes\[0\]\.nvme\.read_gbps"),
    ],
)
def test_bad_overrides_name_the_field(node, field):
    with pytest.raises(ConfigError, match="^" + field):
        resolve_cluster(_cluster(**node))


def test_duplicate_node_names_rejected():
    cfg = config_from_dict({"cluster": {"nodes": [{"name": "a"}, {"name": "a"}]}}).cluster
    with pytest.raises(ConfigError, match=r"cluster\.nodes\[1\]\.name"):
        resolve_cluster(cfg)


def test_bf16_can_be_declared_absent():
    d = resolve_cluster(_cluster(devices=[{"kind": "a10", "bf16_tflops": 0}])).nodes[0].devices[0]
    assert d.bf16_flops == 0 and d.fp16_flops == device_spec("a10").fp16_flops


# --- NVMe capacity from the filesystem ----------------------------------------------------------


def test_nvme_capacity_defaults_to_free_space(tmp_path):
    target = tmp_path / "not" / "yet" / "there"
    node = resolve_cluster(_cluster(nvme={"path": str(target)})).nodes[0]
    assert node.nvme.path == str(target)
    # Other processes write to this disk meanwhile: equal within 1 GiB.
    assert abs(node.nvme.capacity_bytes - shutil.disk_usage(tmp_path).free) < GIB
    assert (node.nvme.read_gbps, node.nvme.write_gbps) == (catalog.default_nvme_spec("x", 0).read_gbps,
                                                          catalog.default_nvme_spec("x", 0).write_gbps)
    assert not (tmp_path / "not").exists()


def test_free_bytes_asks_nearest_existing_parent(tmp_path, monkeypatch):
    asked = []
    usage = types.SimpleNamespace(total=10, used=3, free=7)
    monkeypatch.setattr(inventory.shutil, "disk_usage", lambda p: asked.append(Path(p)) or usage)
    assert free_bytes_at(tmp_path / "a" / "b") == 7
    assert asked == [tmp_path]


# --- this machine ----------------------------------------------------------------------------------


class _FailingNvml(types.ModuleType):
    def __init__(self):
        import pynvml

        super().__init__("pynvml")
        self.NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound

    def nvmlInit(self):
        import pynvml

        raise pynvml.NVMLError_LibraryNotFound()


def _fake_nvml(gpus):
    """A stand-in for nvidia-ml-py reporting ``gpus``: dicts of name, memory and optional queries."""
    m = types.ModuleType("pynvml")
    m.NVML_CLOCK_SM, m.NVML_CLOCK_MEM = 1, 2
    m.calls = []
    m.nvmlInit = lambda: m.calls.append("init")
    m.nvmlShutdown = lambda: m.calls.append("shutdown")
    m.nvmlDeviceGetCount = lambda: len(gpus)
    m.nvmlDeviceGetHandleByIndex = lambda i: gpus[i]
    m.nvmlDeviceGetName = lambda h: h["name"]
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=h["memory"], free=h["memory"], used=0)

    def query(key):
        def f(h, *args):
            if key not in h:
                raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
            v = h[key]
            return v[args[0]] if args else v
        return f

    m.nvmlDeviceGetMaxPcieLinkGeneration = query("gen")
    m.nvmlDeviceGetMaxPcieLinkWidth = query("width")
    m.nvmlDeviceGetNumGpuCores = query("cores")
    m.nvmlDeviceGetMaxClockInfo = query("clocks")
    m.nvmlDeviceGetMemoryBusWidth = query("bus_bits")
    m.nvmlDeviceGetCudaComputeCapability = query("cc")
    return m


@pytest.fixture
def no_cgroup(monkeypatch, tmp_path):
    monkeypatch.setattr(inventory, "_CGROUP_MEMORY_FILES", (str(tmp_path / "absent"),))
    monkeypatch.setattr(inventory, "_CGROUP_CPU_FILES", (str(tmp_path / "absent"),))


def test_auto_without_nvml_is_one_cpu_device_with_host_memory(monkeypatch, no_cgroup):
    monkeypatch.setitem(sys.modules, "pynvml", _FailingNvml())
    spec = resolve_cluster(ClusterConfig(auto=True))
    assert spec.source == "auto" and len(spec.nodes) == 1
    node = spec.nodes[0]
    assert [d.kind for d in node.devices] == ["cpu"]
    total = psutil.virtual_memory().total
    assert node.host.memory_bytes == total and node.devices[0].memory_bytes == total
    assert 1 <= node.host.num_cpus <= psutil.cpu_count(logical=True)
    assert node.nvme is None


def test_auto_on_this_machine_with_real_nvml(no_cgroup):
    # No GPU on the development machines: the real nvidia-ml-py fails to initialise and is ignored.
    node = local_node_spec()
    assert node.devices
    if node.devices[0].kind == "cpu":
        assert node.devices[0].memory_bytes == psutil.virtual_memory().total


def test_auto_with_zero_gpus_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake := _fake_nvml([]))
    assert [d.kind for d in local_node_spec().devices] == ["cpu"]
    assert fake.calls == ["init", "shutdown"]


def test_auto_reads_gpus_from_nvml(monkeypatch):
    gpus = [
        # A known card in a gen3 x16 slot: catalog figures, nvml memory, the slot's bandwidth.
        {"name": b"NVIDIA GeForce RTX 4090", "memory": 25_757_220_864, "gen": 3, "width": 16},
        # An unknown card: figures from nvml's cores, clocks and bus.
        {"name": "NVIDIA Foo 9000", "memory": 12 * GIB, "gen": 4, "width": 8, "cores": 10_000,
         "clocks": {1: 2000, 2: 10_000}, "bus_bits": 256, "cc": (8, 9)},
        # An unknown card whose optional queries are unsupported: conservative defaults.
        {"name": "NVIDIA Bar 1", "memory": 8 * GIB},
    ]
    monkeypatch.setitem(sys.modules, "pynvml", fake := _fake_nvml(gpus))
    spec = resolve_cluster(ClusterConfig(auto=True))
    known, unknown, bare = spec.nodes[0].devices
    assert known == dataclasses.replace(device_spec("rtx4090"), name="NVIDIA GeForce RTX 4090",
                                        memory_bytes=25_757_220_864, h2d_gbps=catalog.pcie_effective_gbps(3),
                                        d2h_gbps=catalog.pcie_effective_gbps(3))
    assert (unknown.kind, unknown.name, unknown.memory_bytes) == ("gpu", "NVIDIA Foo 9000", 12 * GIB)
    assert unknown.fp32_flops == pytest.approx(10_000 * 2 * 2000e6)
    assert unknown.bf16_flops == pytest.approx(2 * unknown.fp32_flops)  # compute capability 8.9 has bf16
    assert unknown.memory_bw_gbps == pytest.approx(10_000e6 * 2 * 256 / 8 / 1e9)
    assert unknown.h2d_gbps == pytest.approx(catalog.pcie_effective_gbps(4, 8))
    assert (bare.kind, bare.memory_bytes, bare.bf16_flops) == ("gpu", 8 * GIB, 0)
    assert bare.fp32_flops > 0 and bare.h2d_gbps > 0
    assert fake.calls == ["init", "shutdown"]


@pytest.mark.parametrize(
    "name,memory_gib,kind",
    [
        ("NVIDIA H100 80GB HBM3", 80, "h100-sxm"), ("NVIDIA H100 PCIe", 80, "h100-pcie"), ("NVIDIA H100 NVL", 94, "h100-pcie"),
        ("NVIDIA H200", 141, "h200"), ("NVIDIA GH200 480GB", 96, "gh200"),
        ("NVIDIA A100-SXM4-80GB", 80, "a100-80gb"), ("NVIDIA A100-PCIE-40GB", 40, "a100-40gb"),
        ("NVIDIA A10", 24, "a10"), ("NVIDIA L40S", 48, "l40s"), ("NVIDIA L40", 48, None),
        ("NVIDIA GeForce RTX 4090", 24, "rtx4090"), ("NVIDIA GeForce RTX 3090", 24, "rtx3090"),
        ("Tesla V100-SXM2-32GB", 32, "v100"), ("Tesla V100-PCIE-16GB", 16, "v100-16gb"), ("Tesla T4", 15, "t4"),
        ("NVIDIA A10G", 24, None), ("NVIDIA GeForce RTX 2080 Ti", 11, None),
    ],
)
def test_gpu_kind_from_nvml_name(name, memory_gib, kind):
    assert gpu_kind_from_name(name, memory_gib * GIB) == kind


def test_auto_respects_cgroup_limits(monkeypatch, tmp_path):
    mem, cpu = tmp_path / "memory.max", tmp_path / "cpu.max"
    mem.write_text(f"{3 * GIB}\n")
    cpu.write_text("150000 100000\n")  # 1.5 CPUs -> 2
    monkeypatch.setattr(inventory, "_CGROUP_MEMORY_FILES", (str(mem),))
    monkeypatch.setattr(inventory, "_CGROUP_CPU_FILES", (str(cpu),))
    monkeypatch.setitem(sys.modules, "pynvml", _FailingNvml())
    node = local_node_spec()
    assert node.host.memory_bytes == min(3 * GIB, psutil.virtual_memory().total)
    assert node.host.num_cpus <= 2
    mem.write_text("max\n")
    assert local_node_spec().host.memory_bytes == psutil.virtual_memory().total


def test_auto_with_host_and_nvme_overrides(monkeypatch, tmp_path, no_cgroup):
    monkeypatch.setitem(sys.modules, "pynvml", _FailingNvml())
    cfg = ClusterConfig(auto=True, nodes=[NodeConfig(name="box", host_memory=2 * GIB, num_cpus=1,
                                                     nvme=NvmeConfig(path=str(tmp_path), capacity=GIB))])
    node = resolve_cluster(cfg).nodes[0]
    assert node.name == "box" and node.host.memory_bytes == 2 * GIB and node.host.num_cpus == 1
    assert node.devices[0].memory_bytes == 2 * GIB  # the CPU device is the (overridden) host RAM
    assert node.nvme.capacity_bytes == GIB


def test_auto_rejects_listed_devices_and_several_nodes():
    with pytest.raises(ConfigError, match=r"cluster\.nodes\[0\]\.devices"):
        resolve_cluster(ClusterConfig(auto=True, nodes=[NodeConfig(devices=[DeviceConfig(kind="t4")])]))
    with pytest.raises(ConfigError, match=r"^cluster\.nodes:"):
        resolve_cluster(ClusterConfig(auto=True, nodes=[NodeConfig(name="a"), NodeConfig(name="b")]))


# --- reports and wiring ------------------------------------------------------------------------


def test_format_cluster_one_line_per_device():
    spec = resolve_cluster(_cluster(name="w", devices=[{"kind": "rtx4090", "count": 2}, {"kind": "t4"}]))
    text = format_cluster(spec)
    device_lines = [line for line in text.splitlines() if line.startswith("  w/")]
    assert len(device_lines) == 3
    assert "rtx4090" in device_lines[0] and "24.0 GiB" in device_lines[0] and "bf16 165.2" in device_lines[0]
    assert "t4" in device_lines[2] and "bf16 0.0" in device_lines[2]
    assert "catalog" in text.splitlines()[0]


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_resolve(path, monkeypatch):
    from memtrain.runtime.config_file import load_config

    monkeypatch.setitem(sys.modules, "pynvml", _FailingNvml())
    spec = resolve_cluster(load_config(path).cluster)
    assert spec.nodes and all(n.devices for n in spec.nodes)


def test_imports_in_either_order():
    # The inventory uses the catalog, which uses cluster.spec; the package loads its names lazily.
    for first in ("memtrain.cluster.catalog", "memtrain.cluster", "memtrain.cluster.inventory"):
        code = f"import {first}; from memtrain.cluster import resolve_cluster; from memtrain.cluster.catalog import device_spec"
        subprocess.run([sys.executable, "-c", code], check=True)


def test_spec_and_catalog_load_without_the_inventory():
    # The planner imports cluster.spec and cluster.catalog; neither may pull in the inventory
    # (psutil, nvml) through the package's __init__.
    code = ("import sys, memtrain.cluster.catalog, memtrain.cluster.spec; "
            "assert 'memtrain.cluster.inventory' not in sys.modules, 'inventory loaded'")
    subprocess.run([sys.executable, "-c", code], check=True)
