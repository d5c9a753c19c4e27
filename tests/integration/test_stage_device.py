"""runtime/stage_device.py on a local Ray declaring one (logical) GPU: a worker computes on a GPU
only where Ray gave it one. This machine has no GPU, so inside the workers torch is told it sees
one (``torch.cuda.is_available``, as on a GPU node, where Ray 2.60 leaves ``CUDA_VISIBLE_DEVICES``
as the node's for a worker given no GPU); what Ray assigned is Ray's own answer."""

from __future__ import annotations

import os
import sys
from unittest import mock

import pytest
import ray

from memtrain.runtime.stage_device import assigned_gpus, choose_device

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # its probe runs in the workers


@pytest.fixture(scope="module")
def ray_one_gpu():
    from memtrain.runtime.ray_cluster import _loopback_only

    _loopback_only()
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        yield
    finally:
        ray.shutdown()


class _Probe:
    def device(self) -> tuple[str, list[str] | None, str | None]:
        import torch

        from memtrain.runtime import stage_device

        with mock.patch.object(torch.cuda, "is_available", return_value=True):  # a GPU node's view
            return str(stage_device.worker_device()), stage_device.assigned_gpus(), os.environ.get("CUDA_VISIBLE_DEVICES")


def test_a_worker_computes_on_a_gpu_only_where_ray_gave_it_one(ray_one_gpu) -> None:
    on_cpu = ray.remote(num_cpus=1)(_Probe).remote()
    on_gpu = ray.remote(num_cpus=1, num_gpus=0.5)(_Probe).remote()
    (dev_cpu, ids_cpu, _), (dev_gpu, ids_gpu, visible) = ray.get([on_cpu.device.remote(), on_gpu.device.remote()])
    assert (dev_cpu, ids_cpu) == ("cpu", [])  # placed on CPUs: the CPU, whatever torch sees
    assert (dev_gpu, ids_gpu, visible) == ("cuda:0", ["0"], "0")  # Ray's GPU, the first visible
    assert assigned_gpus() is None  # the driver is no Ray worker: any GPU torch sees
    assert choose_device(True, None).type == "cuda" and choose_device(False, ["0"]).type == "cpu"
    for actor in (on_cpu, on_gpu):
        ray.kill(actor)
