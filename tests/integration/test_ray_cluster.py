"""The Ray cluster side of a distributed run on simulated nodes (``ray.cluster_utils.Cluster``):
two GPU kinds described by custom resources and a CPU-only node; what the inventory reads, where
placement puts each rank, and how a dead or silent worker is reported."""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from memtrain.config import ConfigError, config_from_dict
from memtrain.errors import UserError
from memtrain.runtime.distributed import run_distributed
from memtrain.runtime.ray_cluster import Assignment, WorkerFailure, cluster_inventory, place_workers

from ray_helpers import listening_beyond_loopback, listening_ports, process_tree, token_auth

GIB = 2**30
# fast failure detection: a removed node is declared dead within about a second
_SYSTEM_CONFIG = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 200,
                  "health_check_failure_threshold": 3}


@pytest.fixture(scope="module")
def cluster():
    with token_auth():
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "node_ip_address": "127.0.0.1", "_system_config": _SYSTEM_CONFIG})
        nodes = {
            "a100": c.add_node(num_cpus=2, num_gpus=2, resources={"device:a100": 2}, memory=4 * GIB),
            "rtx4090": c.add_node(num_cpus=1, num_gpus=1, resources={"device:rtx4090": 1}, memory=2 * GIB),
            "cpu": c.add_node(num_cpus=2, resources={"device:cpu": 2}, memory=2 * GIB),
            "t4": c.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:T4": 1}, memory=1 * GIB),  # Ray's GPU type
            "plain": c.add_node(num_cpus=1, memory=1 * GIB),  # no device beside GPU nodes: left out
        }
        ray.init(address=c.address, log_to_driver=False)
        c.wait_for_nodes()
        try:
            yield c, {kind: node.node_id for kind, node in nodes.items()}
        finally:
            ray.shutdown()
            c.shutdown()


@ray.remote(num_cpus=0)
class Probe:
    """A stand-in worker: says where it runs, sleeps, fails."""

    def __init__(self, rank: int = -1):
        self.rank = rank

    def where(self):
        return self.rank, ray.get_runtime_context().get_node_id()

    def sleep(self, seconds):
        time.sleep(seconds)
        return self.rank

    def fail(self):
        raise ValueError(f"rank {self.rank} broke")


def test_inventory_reads_device_kinds_cpus_and_memory(cluster):
    _, node_of = cluster
    inv = cluster_inventory(network_gbps=25.0)
    assert inv.spec.source == "ray" and inv.spec.network_gbps == 25.0
    by_id = {n.node_id: n for n in inv.nodes}
    assert set(by_id) == {node_of[k] for k in ("a100", "rtx4090", "cpu", "t4")}  # not the head, not "plain"
    assert [d.kind for d in by_id[node_of["t4"]].spec.devices] == ["t4"]
    assert [s.resources for s in by_id[node_of["t4"]].slots] == [{"CPU": 1.0, "GPU": 1.0}]
    a100, rtx, cpu = (by_id[node_of[k]] for k in ("a100", "rtx4090", "cpu"))
    assert [d.kind for d in a100.spec.devices] == ["a100-80gb", "a100-80gb"]
    assert [d.kind for d in rtx.spec.devices] == ["rtx4090"]
    assert rtx.spec.devices[0].memory_bytes == 24 * GIB and rtx.spec.devices[0].bf16_flops == pytest.approx(165.2e12)
    assert [d.kind for d in cpu.spec.devices] == ["cpu", "cpu"]  # one per core
    assert [d.memory_bytes for d in cpu.spec.devices] == [1 * GIB, 1 * GIB]
    assert (a100.num_cpus, a100.num_gpus, a100.memory_bytes) == (2, 2, 4 * GIB)
    assert a100.spec.host.num_cpus == 2 and a100.spec.host.memory_bytes == 4 * GIB
    assert [s.resources for s in a100.slots] == [{"CPU": 1.0, "device:a100": 1.0, "GPU": 1.0}] * 2
    assert [s.resources for s in cpu.slots] == [{"CPU": 1.0, "device:cpu": 1.0}] * 2
    head, devices = inv.describe().split(": ", 1)
    assert head == "4 node(s)" and sorted(devices.split(", ")) == ["1 rtx4090", "1 t4", "2 a100-80gb", "2 cpu"]
    assert len(inv.slots) == 6


def test_placement_puts_each_rank_on_a_node_with_its_device_kind(cluster):
    _, node_of = cluster
    inv = cluster_inventory()
    slot = {s.kind: s for s in inv.slots}
    # rank order deliberately not the inventory's: 4090, a100, cpu, a100 (the second by resource only)
    assignments = [Assignment.of_slot(0, slot["rtx4090"]), Assignment.of_slot(1, slot["a100-80gb"]),
                   Assignment.of_slot(2, slot["cpu"]), Assignment(rank=3, resources={"CPU": 1, "device:a100": 1})]
    workers = place_workers(Probe, list(reversed(assignments)), kwargs_of=lambda r: {"rank": r}, timeout_s=30)
    try:
        where = workers.get([a.where.remote() for a in workers.actors], timeout_s=30, what="where")
        assert [r for r, _ in where] == [0, 1, 2, 3]  # handles come back in rank order
        assert [n for _, n in where] == [node_of["rtx4090"], node_of["a100"], node_of["cpu"], node_of["a100"]]
        assert workers.node_ids == tuple(n for _, n in where)
    finally:
        workers.shutdown()


def test_a_pinned_rank_stays_on_its_node_under_spread(cluster):
    _, node_of = cluster
    assignments = [Assignment(rank=0, resources={"CPU": 1}, node_id=node_of["cpu"]),
                   Assignment(rank=1, resources={"CPU": 1}, node_id=node_of["a100"])]
    workers = place_workers(Probe, assignments, strategy="STRICT_SPREAD", kwargs_of=lambda r: {"rank": r})
    try:
        assert [n for _, n in workers.get([a.where.remote() for a in workers.actors], timeout_s=30)] == \
            [node_of["cpu"], node_of["a100"]]
    finally:
        workers.shutdown()


def test_placement_the_cluster_cannot_hold_is_a_user_error(cluster):
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"could not place 2 worker\(s\).*device:rtx4090 1.*ray status"):
        place_workers(Probe, [Assignment(rank=r, resources={"CPU": 1, "device:rtx4090": 1}) for r in range(2)],
                      timeout_s=2)
    assert time.monotonic() - t0 < 15
    assert ray.available_resources().get("device:rtx4090") == 1.0  # the placement group was removed


def test_a_silent_worker_is_an_error_naming_its_rank_and_node_not_a_hang(cluster):
    _, node_of = cluster
    workers = place_workers(Probe, [Assignment(rank=r, resources={"CPU": 1}, node_id=node_of["cpu"]) for r in range(2)],
                            kwargs_of=lambda r: {"rank": r})
    try:
        workers.get([a.where.remote() for a in workers.actors], timeout_s=60)  # both started
        t0 = time.monotonic()
        refs = [workers.actors[0].sleep.remote(0), workers.actors[1].sleep.remote(60)]
        with pytest.raises(WorkerFailure, match=r"rank 1 on 127\.0\.0\.1 \(node .{8}\) did not answer step 3 within 1 s") as e:
            workers.get(refs, timeout_s=1, what="step 3")
        assert time.monotonic() - t0 < 10 and e.value.rank == 1
        with pytest.raises(WorkerFailure, match=r"rank 0 on .* failed during the call: ValueError: rank 0 broke"):
            workers.get([workers.actors[0].fail.remote(), workers.actors[0].sleep.remote(0)], timeout_s=30)
    finally:
        workers.shutdown()


def test_removing_a_node_makes_its_workers_call_fail_naming_the_rank(cluster):
    c, _ = cluster
    doomed = c.add_node(num_cpus=1, resources={"device:rtx4090": 1})
    c.wait_for_nodes()
    workers = place_workers(Probe, [Assignment(rank=0, resources={"CPU": 1}),
                                    Assignment(rank=1, resources={"CPU": 1, "device:rtx4090": 1}, node_id=doomed.node_id)],
                            kwargs_of=lambda r: {"rank": r}, timeout_s=30)
    try:
        assert workers.node_ids[1] == doomed.node_id
        refs = [a.sleep.remote(15) for a in workers.actors]  # short: a removed node leaves its workers to end alone
        time.sleep(0.5)
        t0 = time.monotonic()
        c.remove_node(doomed, allow_graceful=False)
        with pytest.raises(WorkerFailure, match=rf"rank 1 on 127\.0\.0\.1 \(node {doomed.node_id[:8]}\) died during "
                                                r"step 7: its node has left the cluster") as e:
            workers.get(refs, timeout_s=12, what="step 7")
        assert time.monotonic() - t0 < 30 and e.value.rank == 1
    finally:
        workers.shutdown()


def test_the_cluster_listens_on_loopback_only(cluster):
    procs = process_tree([os.getpid()])
    assert listening_ports(procs) >= 3  # gcs, raylets, object managers: the check sees them
    assert listening_beyond_loopback(procs) == []


def test_run_distributed_plans_places_and_trains_over_device_kinds_on_several_nodes(cluster, tmp_path):
    """pp 2 × dp 2 over the simulated nodes' devices (the stages compute on this CPU): each rank
    runs on a node holding the device kind the plan gave it, and every step is in the metrics."""
    c, ids = cluster
    cfg = config_from_dict({"parallel": {"pipeline": 2, "data": 2, "comm_timeout_s": 60},
                            "train": {"steps": 2, "global_batch_size": 8, "micro_batch_size": 2},
                            "run_dir": str(tmp_path / "run")})
    out = run_distributed(cfg, print_fn=lambda line: None)
    result, plan = out["result"], out["plan"]
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    kind_of_node = {node_id: kind for kind, node_id in ids.items()}
    labels = {n["NodeID"]: f"{n['NodeManagerAddress']} (node {n['NodeID'][:8]})" for n in ray.nodes()}
    for rp, node in zip(plan.pipeline.ranks, result.nodes, strict=True):
        node_id = next(i for i, label in labels.items() if label == node)
        assert kind_of_node[node_id].startswith(rp.device.kind[:4]), (rp, node)
    for step_records in result.records:  # the program is what runs
        for rank, record in enumerate(step_records):
            assert list(record) == [str(a) for a in plan.schedule[rank % 2]]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and len(metrics[0]["peak_bytes"]) == 4
    assert ray.is_initialized()  # a connection made before the run is left alone
    with pytest.raises(ConfigError, match=r"parallel.pipeline × parallel.data: 4 × 2 = 8 workers .* has 6 \(4 node\(s\)"):
        run_distributed(config_from_dict({"parallel": {"pipeline": 4, "data": 2}}), print_fn=lambda line: None)
    with pytest.raises(ConfigError, match="parallel.pipeline: 5 rank.*gpt-tiny has 4 blocks"):
        run_distributed(config_from_dict({"parallel": {"pipeline": 5}, "train": {"global_batch_size": 10}}))