"""tests/integration: a real local Ray on loopback, token authentication left on."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def local_ray():
    """One embedded Ray per test module (``address="local"``: never a cluster another process
    started; 4 logical CPUs, no dashboard), on 127.0.0.1; gloo on
    the loopback interface. Shut down after the module."""
    import ray

    from memtrain.runtime.ray_cluster import _loopback_only

    _loopback_only()  # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, here too: Ray read it when it was imported
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # the workers inherit it from the raylet
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}, "Ray left loopback"
    try:
        yield ray
    finally:
        ray.shutdown()
