"""The files of cluster/recipes/ read as memtrain reads them: each node type's ``device:<kind>``
resources name catalog devices (as ``runtime.ray_cluster`` turns a Ray node's resources into
devices), the worker nodes hold exactly the job's ``parallel.pipeline × parallel.data`` devices
with a GPU each, the job's config loads and plans over those devices, every Ray start and client
keeps token authentication on, and the dashboard stays on loopback."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from memtrain.cluster.spec import ClusterSpec, NodeSpec
from memtrain.cluster import catalog
from memtrain.runtime.config_file import load_config
from memtrain.runtime.distributed import check_devices
from memtrain.runtime.ray_cluster import DEVICE_RESOURCE_PREFIX, _node_devices

RECIPES = Path(__file__).resolve().parents[2] / "cluster" / "recipes"
JOB = RECIPES / "gpt-1.3b-mixed.yaml"
GIB = 2**30


def _load(name: str):
    return yaml.safe_load((RECIPES / name).read_text())


def _devices(resources: dict, num_cpus: int, memory: int, where: str):
    """The devices and slots memtrain reads from a node with these Ray resources."""
    return _node_devices(resources, num_cpus, memory, where, node_id=where, cpu_cores_are_devices=False)


def _check_job_fits(nodes: list[tuple[str, dict, int, int]]) -> None:
    """The job's config over nodes (name, Ray resources, CPUs, memory): as many devices as
    workers, a device set check_devices accepts for identical replicas, and a plan that fits."""
    from memtrain.planner.analyze import analyze
    from memtrain.planner.hetero import plan_cluster

    cfg = load_config(JOB)
    specs, slots = [], []
    for name, res, cpus, mem in nodes:
        devices, node_slots = _devices(res, cpus, mem, name)
        assert devices, f"{name}: no device read from {res}"
        specs.append(NodeSpec(name=name, host=catalog.default_host_spec(cpus, mem), devices=tuple(devices)))
        slots += node_slots
    assert len(slots) == cfg.parallel.num_workers, "the recipe's GPUs are the job's workers"

    class Inventory:  # what check_devices reads of runtime.ray_cluster.RayInventory
        def describe(self):
            return f"{len(specs)} nodes"
    inv = Inventory()
    inv.slots = tuple(slots)
    chosen = check_devices(cfg, inv)
    kinds = [slots[i].kind for i in chosen]
    assert all(kinds.count(k) % cfg.parallel.data == 0 for k in kinds), "every replica gets the same devices"
    stats = analyze(cfg.model, seq_len=cfg.train.seq_len, micro_batch_size=1, dtype=cfg.train.dtype)
    plan = plan_cluster(stats, ClusterSpec(nodes=tuple(specs), network_gbps=cfg.cluster.network_gbps, source="ray"),
                        name=cfg.name, global_batch_size=cfg.train.global_batch_size,
                        micro_batch_size=cfg.train.micro_batch_size, dtype=cfg.train.dtype,
                        optimizer=cfg.train.optimizer.name, schedules=(cfg.parallel.schedule,),
                        pipeline_degree=cfg.parallel.pipeline, data_parallel_degree=cfg.parallel.data)
    assert plan.fits and plan.pipeline.pipeline_degree == 3 and plan.pipeline.data_parallel_degree == 4


def test_the_job_config_loads_and_splits_over_its_workers():
    cfg = load_config(JOB)
    assert cfg.cluster.auto and not cfg.cluster.nodes  # the devices come from the Ray cluster
    assert cfg.parallel.num_workers == 12
    cfg.parallel.check_batch(cfg.train)
    from memtrain.runtime.stage_worker import PIPELINE_DTYPES

    assert cfg.train.dtype in PIPELINE_DTYPES  # what the pipeline workers train in


def test_the_cluster_launcher_config_reads_as_the_jobs_devices():
    rc = _load("ray-cluster-aws-mixed.yaml")
    types = rc["available_node_types"]
    head = types[rc["head_node_type"]]
    assert not any(k.startswith(DEVICE_RESOURCE_PREFIX) or k == "GPU" for k in head["resources"]), \
        "the head offers no device"
    nodes = []
    for name, t in types.items():
        res = t["resources"]
        if name == rc["head_node_type"]:
            continue
        custom = {k: v for k, v in res.items() if k.startswith(DEVICE_RESOURCE_PREFIX)}
        assert sum(custom.values()) == res["GPU"], f"{name}: one device:<kind> per GPU"
        assert t["min_workers"] >= 1
        for i in range(t["min_workers"]):
            nodes.append((f"{name}-{i}", res, res["CPU"], 256 * GIB))
    _check_job_fits(nodes)
    starts = " ".join(rc["head_start_ray_commands"] + rc["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token ray start") == 2
    assert "--dashboard-host=127.0.0.1" in starts and "ray get-auth-token --generate" in starts
    assert "/mnt/nvme" in " ".join(rc["setup_commands"])


def test_the_kuberay_job_runs_memtrain_on_the_jobs_devices_with_token_auth():
    job = _load("kuberay-rayjob.yaml")
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["memtrain", "run"] and Path(argv[2]).name == JOB.name
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["RAY_AUTH_MODE"] == "token"
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1" and head["rayStartParams"]["num-gpus"] == "0"
    mounts = {m["mountPath"] for m in head["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert str(Path(argv[2]).parent) in mounts, "the head mounts the job's config where the entrypoint reads it"
    nodes = []
    containers = [head["template"]["spec"]["containers"][0]]
    for group in cluster["workerGroupSpecs"]:
        res = json.loads(yaml.safe_load(group["rayStartParams"]["resources"]))  # Ray's --resources JSON
        container = group["template"]["spec"]["containers"][0]
        containers.append(container)
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert sum(res.values()) == gpus, f"{group['groupName']}: one device:<kind> per GPU"
        mem = int(container["resources"]["limits"]["memory"].removesuffix("Gi")) * GIB
        for i in range(group["replicas"]):
            nodes.append((f"{group['groupName']}-{i}", {"GPU": gpus, **res}, int(container["resources"]["limits"]["cpu"]), mem))
        assert "/mnt/nvme" in {m["mountPath"] for m in container["volumeMounts"]}
    _check_job_fits(nodes)
    for c in containers:
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"]


def test_the_runtime_env_keeps_token_auth_on():
    env = _load("runtime_env.yaml")
    assert env["env_vars"]["RAY_AUTH_MODE"] == "token"
    assert set(env) <= {"env_vars", "pip", "py_modules", "working_dir", "excludes"}


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_recipe_is_yaml_with_placeholders_marked(name):
    text = (RECIPES / name).read_text()
    assert yaml.safe_load(text) is not None
    assert "ami-" not in text or "ami-REPLACE-ME" in text
