"""memtrain.cluster: hardware specs, the hardware catalog, and the inventory that fills the specs
(catalog, config, this machine).

Public names are loaded on first use: ``cluster.spec`` and ``cluster.catalog`` (which the planner
imports) do not pull in the inventory (psutil, nvml), and the package's import runs no module
that imports the package again.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ClusterSpec": "spec", "DeviceSpec": "spec", "HostSpec": "spec", "NodeSpec": "spec", "NvmeSpec": "spec",
    "resolve_cluster": "inventory", "local_node_spec": "inventory", "gpu_kind_from_name": "inventory",
    "free_bytes_at": "inventory", "format_cluster": "inventory",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'memtrain.cluster' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"memtrain.cluster.{module}"), name)
    globals()[name] = value
    return value
