"""memtrain.cluster: hardware specs and the inventory that fills them (catalog, config, this machine)."""

from memtrain.cluster.inventory import format_cluster, free_bytes_at, gpu_kind_from_name, local_node_spec, resolve_cluster
from memtrain.cluster.spec import ClusterSpec, DeviceSpec, HostSpec, NodeSpec, NvmeSpec

__all__ = [
    "ClusterSpec", "DeviceSpec", "HostSpec", "NodeSpec", "NvmeSpec",
    "resolve_cluster", "local_node_spec", "gpu_kind_from_name", "free_bytes_at", "format_cluster",
]
