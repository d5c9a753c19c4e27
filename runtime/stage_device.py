"""Which device a pipeline worker computes on (runtime.stage_worker [Note: devices of a worker]).

A worker computes on a GPU only where it was given one: in a Ray task or actor, the GPUs Ray
assigned to it (its bundle's ``GPU`` resource, for which Ray sets ``CUDA_VISIBLE_DEVICES`` to
them, so the first is ``cuda:0``); outside Ray (a worker made in-process, as the unit tests do),
any GPU torch sees. ``torch.cuda.is_available()`` alone is not enough in Ray: for a task or actor
given no GPU, Ray (2.60) leaves ``CUDA_VISIBLE_DEVICES`` as the node's unless
``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1``, so a rank placed on CPUs of a GPU node would compute on
that node's first GPU, beside (or instead of) the ranks that were given it, and the plan's CPU
figures would not hold.
"""

from __future__ import annotations

import os

import torch

__all__ = ["worker_device", "assigned_gpus", "choose_device", "pin_to_core", "pins_cores"]


def worker_device() -> torch.device:
    """This process's compute device as a pipeline worker (the module doc)."""
    return choose_device(torch.cuda.is_available(), assigned_gpus())


def assigned_gpus() -> list[str] | None:
    """The ids of the GPUs Ray assigned to the task or actor running in this process; None
    outside a Ray worker process (the driver, or no Ray)."""
    try:
        import ray
    except ImportError:  # pragma: no cover (ray is a dependency)
        return None
    if not ray.is_initialized():
        return None
    ctx = ray.get_runtime_context()
    if ctx.worker.mode != ray.WORKER_MODE:
        return None
    return [str(i) for i in ctx.get_accelerator_ids().get("GPU", [])]


def choose_device(cuda_available: bool, gpus: list[str] | None) -> torch.device:
    """``cuda:0`` where torch sees a GPU and Ray gave this worker one (``gpus`` non-empty) or
    this is no Ray worker (``gpus`` None); else the CPU."""
    if not cuda_available or gpus == []:
        return torch.device("cpu")
    return torch.device("cuda", 0)


def pin_to_core(index: int) -> int:
    """Bind this process to one core, the ``index``-th (modulo their number) of those it may run
    on, and return that core. [Note: a worker per core] The embedded Ray runs one single-threaded
    worker per core and nothing else of its own that computes; left to the scheduler, two
    workers of a pipeline move between the cores as each waits and wakes (a rank idles at each
    transfer), and on 2 cores the tiny example's step took 24.0 ms at the median of 7 runs against
    18.0 ms with each worker bound to its own core (``memtrain run examples/gpt-tiny-pp2.yaml``,
    alternating bound and unbound runs through a switch kept only for that measurement, quiet
    machine). Only where the workers take every core (``pins_cores``): with
    cores to spare, a worker's other threads (gloo's, the offload pools') use them. A joined
    cluster's cores are shared with others: its workers are not bound (``PipelineSpec.pin_cores``)."""
    cores = sorted(os.sched_getaffinity(0))
    core = cores[index % len(cores)]
    os.sched_setaffinity(0, {core})
    return core


def pins_cores(num_workers: int, num_threads: int) -> bool:
    """Whether the embedded Ray binds its CPU workers ([Note: a worker per core]): single-threaded
    workers that take every core this process may use."""
    return num_threads == 1 and num_workers >= len(os.sched_getaffinity(0))

