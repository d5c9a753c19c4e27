"""The Ray cluster a distributed run uses: join or start it, read its nodes, place one worker per device.

* ``connect`` joins the cluster at ``--address`` / ``RAY_ADDRESS`` (``ray job submit`` sets
  the latter for its driver), else starts the embedded local Ray ([Note: loopback and token auth]).
* ``cluster_inventory`` reads ``ray.nodes()`` into the planner's ``ClusterSpec`` and the device
  slots a worker can be placed on ([Note: devices of a Ray node]).
* ``place_workers`` creates one actor per rank in a placement group, each bundle pinned to its
  node, and returns them in rank order; ``Workers.get`` waits for their answers and turns a dead
  or silent worker into a ``WorkerFailure`` naming its rank and node, never a hang.

[Note: loopback and token auth] The embedded Ray listens on 127.0.0.1 only: its node address
is loopback and ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps Ray from binding some services
to the machine's routable address as well; the dashboard is off. Ray's token authentication
stays on: memtrain sets ``RAY_AUTH_MODE=token`` where it is unset, for the embedded cluster (Ray
makes ``~/.ray/auth_token`` when no token exists) and for a joined one (whose token must be here:
``~/.ray/auth_token``, ``RAY_AUTH_TOKEN_PATH`` or ``RAY_AUTH_TOKEN``). A user who started a
cluster with ``RAY_AUTH_MODE=disabled`` says so with the same variable.

[Note: the embedded Ray's workers] Ray starts its workers 15 nicer than the raylet by default,
so that on a shared node its control plane comes first; but then the driver's own work (taking
a step's results, writing metrics) takes a core from a worker mid-pass, and a worker woken by a
transfer waits behind any other process: on 2 cores a pipeline rank of the tiny example idled
half its step where its transfers and peers account for a third. The embedded Ray runs this
job only, so its workers keep the driver's niceness (``RAY_worker_niceness=0`` where the user
left it unset); a joined cluster keeps its own setting (docs/cluster.md).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray

from memtrain.cluster import catalog
from memtrain.cluster.inventory import gpu_kind_from_name
from memtrain.cluster.spec import ClusterSpec, DeviceSpec, NodeSpec
from memtrain.errors import UserError

__all__ = ["connect", "connected", "embedded", "cluster_inventory", "place_workers", "RayNode", "DeviceSlot", "RayInventory",
           "Assignment", "Workers", "WorkerFailure", "DEVICE_RESOURCE_PREFIX", "PLACEMENT_STRATEGIES"]

DEVICE_RESOURCE_PREFIX = "device:"
"""A node's custom resource ``device:<kind>: N`` says it holds N devices of catalog kind ``<kind>``
(``ray start --resources '{"device:a100": 8}'``)."""
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_GIB = 2**30
_LOOPBACK = "127.0.0.1"
_AUTH_HELP = ("copy the head node's ~/.ray/auth_token to this machine, or point RAY_AUTH_TOKEN_PATH at a "
              "copy, or set RAY_AUTH_TOKEN (RAY_AUTH_MODE=disabled only for a cluster started without auth)")


def _address_source(address: str | None) -> tuple[str | None, str]:
    if address:
        return address, "--address"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    return (env or None), "RAY_ADDRESS"


def connect(address: str | None = None, *, num_cpus: int | None = None) -> str:
    """Join the Ray cluster at ``address`` (else ``RAY_ADDRESS``), or start the embedded local one
    with ``num_cpus`` CPUs (default: this machine's); returns a line saying which. Already
    connected (a test's cluster, a second call): nothing changes.

    Raises ``UserError`` for an address that no cluster answers at, a dashboard URL given for
    the cluster's address, or a missing token ([Note: loopback and token auth])."""
    if ray.is_initialized():
        return f"using the Ray cluster this process is connected to ({ray.get_runtime_context().gcs_address})"
    address, source = _address_source(address)
    _keep_token_auth_on()
    if address is None:
        _loopback_only()
        os.environ.setdefault("RAY_worker_niceness", "0")  # [Note: the embedded Ray's workers]
        ray.init(address="local", _node_ip_address=_LOOPBACK, include_dashboard=False, num_cpus=num_cpus,
                 logging_level="WARNING")
        global _embedded
        _embedded = ray.get_runtime_context().gcs_address
        return f"started the embedded Ray on {_LOOPBACK} ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"
    if address.startswith(("http://", "https://")):
        raise UserError(f"{source} {address!r}: that is a dashboard's address (for 'ray job submit'); give the "
                        "cluster's address, host:port of the head node (6379 unless 'ray start --port' changed it)")
    _probe(address, source)
    try:
        ray.init(address=address, logging_level="WARNING")
    except ray.exceptions.AuthenticationError as e:
        raise UserError(f"{source} {address!r}: the Ray cluster needs its authentication token ({_first_line(e)}); "
                        f"{_AUTH_HELP}") from None
    except (ConnectionError, TimeoutError) as e:
        raise UserError(f"{source} {address!r}: no Ray cluster answers there ({_first_line(e)}); start one with "
                        "'ray start --head' or fix the address") from None
    return f"joined the Ray cluster at {address}"


def _loopback_only() -> None:
    """Ray's switch that keeps a local Ray on loopback ([Note: loopback and token auth]): for the
    processes it starts (the variable) and for this one, which read it when ``ray`` was imported."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _keep_token_auth_on() -> None:
    """``RAY_AUTH_MODE=token`` where the user left it unset ([Note: loopback and token auth]);
    Ray reads the mode once per process, so it is told to read it again."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError:  # a Ray without token authentication
        return
    _enable_token_auth()  # sets RAY_AUTH_MODE=token here (and for the processes Ray starts) and re-reads it


@contextlib.contextmanager
def connected(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[str]:
    """``connect`` for the block, yielding its line; afterwards disconnects (which stops an
    embedded Ray) when the block made the connection, and leaves one made before it alone."""
    owned = not ray.is_initialized()
    line = connect(address, num_cpus=num_cpus)
    try:
        yield line
    finally:
        if owned:
            ray.shutdown()
            global _embedded
            _embedded = None


_embedded: str | None = None
"""The address of the embedded Ray ``connect`` started in this process, while it runs."""


def embedded() -> bool:
    """Whether the Ray this process is connected to is the embedded one it started: a node that
    runs this job alone (its workers may be bound to cores, runtime.stage_device)."""
    return _embedded is not None and ray.is_initialized() and ray.get_runtime_context().gcs_address == _embedded


_PROBE_TIMEOUT_S = 5.0


def _probe(address: str, source: str) -> None:
    """Refuse a ``host:port`` nothing listens on within seconds: Ray itself retries for minutes."""
    host, sep, port = address.rpartition(":")
    if address.startswith("ray://") or address == "auto" or not sep or not port.isdigit():
        return  # Ray's client mode and "auto" find their own way; Ray reports a malformed address
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=_PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise UserError(f"{source} {address!r}: no Ray cluster answers there ({e.strerror or e}); start one with "
                        "'ray start --head' or fix the address") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --- inventory -------------------------------------------------------------------------------

# [Note: devices of a Ray node] A node's devices, in this order of precedence:
# 1. custom resources ``device:<kind>: N`` (the kind a catalog key or alias): N such devices, for
#    GPUs Ray cannot name and for clusters simulated in tests;
# 2. ``GPU: N`` with Ray's ``accelerator_type:<T>`` resource: N devices of the catalog kind for T
#    (an unknown T asks for a ``device:<kind>`` resource);
# 3. neither, in a cluster where no node has either (a CPU cluster): one CPU device per core of
#    Ray's ``CPU`` resource, each with its share of the node's memory, as ``cluster.nodes[].devices``
#    splits a node's CPU devices: a CPU pipeline runs one single-threaded worker per core. In a
#    cluster with GPUs such a node (a head without GPUs, say) offers none; ``device:cpu: N`` opts
#    it in.
# Host memory is Ray's ``memory`` resource: what the node lets tasks and actors use.


@dataclass(frozen=True, slots=True)
class DeviceSlot:
    """One device of a node: where a rank can run, and the resources its bundle asks for."""

    node_id: str
    kind: str
    resources: Mapping[str, float]
    """The bundle: ``CPU`` 1, plus ``GPU`` 1 and the ``device:<kind>`` resource where the node has them."""


@dataclass(frozen=True, slots=True)
class RayNode:
    node_id: str
    address: str
    num_cpus: int
    num_gpus: int
    memory_bytes: int
    resources: Mapping[str, float]
    spec: NodeSpec
    slots: tuple[DeviceSlot, ...]

    @property
    def label(self) -> str:
        """``address (node id's first 8)``: simulated nodes share one address."""
        return f"{self.address} (node {self.node_id[:8]})"


@dataclass(frozen=True, slots=True)
class RayInventory:
    nodes: tuple[RayNode, ...]
    spec: ClusterSpec
    """The planner's input: one ``NodeSpec`` per alive node with devices, named ``RayNode.label``."""

    @property
    def slots(self) -> tuple[DeviceSlot, ...]:
        return tuple(s for n in self.nodes for s in n.slots)

    def node(self, node_id: str) -> RayNode:
        return next(n for n in self.nodes if n.node_id == node_id)

    def describe(self) -> str:
        """``3 node(s): 2 a100-80gb, 1 rtx4090`` for messages."""
        counts: dict[str, int] = {}
        for s in self.slots:
            counts[s.kind] = counts.get(s.kind, 0) + 1
        devices = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no devices"
        return f"{len(self.nodes)} node(s): {devices}"


def _catalog_kind(kind: str, where: str) -> DeviceSpec:
    try:
        return catalog.device_spec(kind, field=where)
    except ValueError as e:
        raise UserError(str(e)) from None


def _accelerator_kind(accel: str, where: str) -> DeviceSpec:
    """The catalog entry for Ray's accelerator type (``A100``, ``A100-80G``, ``H100``, ``T4``)."""
    try:
        return catalog.device_spec(accel)
    except ValueError:
        pass
    guess_gib = 40 if "40" in accel else 16 if "16" in accel else 80
    kind = gpu_kind_from_name(accel.replace("-", " "), guess_gib * _GIB)
    if kind is None:
        raise UserError(f"{where}: Ray's GPU type {accel!r} is not in memtrain's catalog; start the node with a "
                        f"resource naming the closest kind, e.g. ray start --resources "
                        f"'{{\"{DEVICE_RESOURCE_PREFIX}a100-80gb\": N}}' (kinds: {', '.join(catalog.KNOWN_DEVICES)})")
    return catalog.device_spec(kind)


def _node_devices(res: Mapping[str, float], num_cpus: int, memory_bytes: int, where: str, node_id: str,
                  cpu_cores_are_devices: bool) -> tuple[list[DeviceSpec], list[DeviceSlot]]:
    """[Note: devices of a Ray node]"""
    devices: list[DeviceSpec] = []
    slots: list[DeviceSlot] = []
    custom = sorted((k, v) for k, v in res.items() if k.startswith(DEVICE_RESOURCE_PREFIX))
    num_gpus = int(res.get("GPU", 0))
    for key, count in custom:
        kind = key[len(DEVICE_RESOURCE_PREFIX):]
        spec = _catalog_kind(kind, f"{where} resource {key!r}")
        if spec.kind == "cpu":
            spec = catalog.cpu_device_spec(num_cpus=1, memory_bytes=max(memory_bytes // max(int(count), 1), 1))
        bundle = {"CPU": 1.0, key: 1.0} | ({"GPU": 1.0} if spec.kind != "cpu" and num_gpus else {})
        devices += [spec] * int(count)
        slots += [DeviceSlot(node_id, spec.kind, bundle)] * int(count)
    if custom:
        return devices, slots
    if num_gpus:
        accel = [k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")]
        if not accel:
            raise UserError(f"{where}: Ray reports {num_gpus} GPU(s) but not their type; start the node with "
                            f"ray start --resources '{{\"{DEVICE_RESOURCE_PREFIX}<kind>\": {num_gpus}}}'")
        spec = _accelerator_kind(accel[0], where)
        return [spec] * num_gpus, [DeviceSlot(node_id, spec.kind, {"CPU": 1.0, "GPU": 1.0})] * num_gpus
    if num_cpus and cpu_cores_are_devices:
        spec = catalog.cpu_device_spec(num_cpus=1, memory_bytes=max(memory_bytes // num_cpus, 1))
        return [spec] * num_cpus, [DeviceSlot(node_id, "cpu", {"CPU": 1.0})] * num_cpus
    return [], []


def cluster_inventory(network_gbps: float = 12.5) -> RayInventory:
    """The alive nodes of the connected cluster, their devices ([Note: devices of a Ray node])
    and hosts, as the planner's ``ClusterSpec`` (``source='ray'``) and placement slots. Nodes
    with no device (a head started with ``--num-cpus=0``, a CPU node beside GPU nodes) are left out."""
    nodes = []
    alive = sorted((n for n in ray.nodes() if n.get("Alive")), key=lambda n: n["NodeID"])
    cpu_cluster = not any(k == "GPU" or k.startswith(DEVICE_RESOURCE_PREFIX)
                          for n in alive for k, v in n.get("Resources", {}).items() if v > 0)
    for info in alive:
        res = info.get("Resources", {})
        node_id, address = info["NodeID"], info.get("NodeManagerAddress", "?")
        num_cpus, memory = int(res.get("CPU", 0)), int(res.get("memory", 0))
        where = f"Ray node {address} (node {node_id[:8]})"
        devices, slots = _node_devices(res, num_cpus, memory, where, node_id, cpu_cluster)
        if not devices:
            continue
        host = catalog.default_host_spec(max(num_cpus, 1), max(memory, 1))
        label = f"{address} (node {node_id[:8]})"
        spec = NodeSpec(name=label, host=host, devices=tuple(devices))
        nodes.append(RayNode(node_id=node_id, address=address, num_cpus=num_cpus, num_gpus=int(res.get("GPU", 0)),
                             memory_bytes=memory, resources=dict(res), spec=spec, slots=tuple(slots)))
    spec = ClusterSpec(nodes=tuple(n.spec for n in nodes), network_gbps=network_gbps, source="ray")
    return RayInventory(nodes=tuple(nodes), spec=spec)


# --- placement -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Assignment:
    """Where rank ``rank`` runs: on ``node_id`` (None: any node with the resources), with ``resources``."""

    rank: int
    resources: Mapping[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    node_id: str | None = None

    @classmethod
    def of_slot(cls, rank: int, slot: DeviceSlot) -> Assignment:
        return cls(rank=rank, resources=dict(slot.resources), node_id=slot.node_id)


class WorkerFailure(RuntimeError):
    """A worker died, failed or did not answer in time; the message names its rank and node."""

    def __init__(self, message: str, *, rank: int, node: str) -> None:
        super().__init__(message)
        self.rank = rank
        self.node = node


def _node_labels() -> dict[str, tuple[str, bool]]:
    return {n["NodeID"]: (f"{n.get('NodeManagerAddress', '?')} (node {n['NodeID'][:8]})", bool(n.get("Alive")))
            for n in ray.nodes()}


@dataclass(slots=True)
class Workers:
    """The placed actors, in rank order, with their nodes and placement group."""

    actors: tuple[Any, ...]
    node_ids: tuple[str, ...]
    placement_group: Any

    def node_label(self, rank: int) -> str:
        return _node_labels().get(self.node_ids[rank], (f"node {self.node_ids[rank][:8]}", False))[0]

    def _failure(self, rank: int, error: BaseException, what: str) -> WorkerFailure:
        label, alive = _node_labels().get(self.node_ids[rank], (f"node {self.node_ids[rank][:8]}", False))
        if isinstance(error, ray.exceptions.RayActorError):
            why = ("its node has left the cluster" if not alive else
                   "its process exited (its node is still alive; see the worker's log in the Ray session's logs)")
            return WorkerFailure(f"rank {rank} on {label} died during {what}: {why}", rank=rank, node=label)
        cause = getattr(error, "cause", None) or error  # a RayTaskError carries the worker's exception
        return WorkerFailure(f"rank {rank} on {label} failed during {what}: {type(cause).__name__}: "
                             f"{_first_line(cause)} (the worker's traceback is chained below)", rank=rank, node=label)

    def get(self, refs: Sequence[Any], *, timeout_s: float, what: str = "the call") -> list[Any]:
        """The results of ``refs`` (one per rank, in rank order). The first worker to die or fail
        raises ``WorkerFailure`` at once; nothing within ``timeout_s`` raises one naming the
        first rank still silent. Either way the caller gets an error, not a hang."""
        assert len(refs) == len(self.actors), "one reference per rank"
        rank_of = {ref: r for r, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        pending = list(refs)
        deadline = time.monotonic() + timeout_s
        while pending:
            left = deadline - time.monotonic()
            done, pending = ray.wait(pending, num_returns=1, timeout=max(left, 0.0))
            if not done:
                rank = min(rank_of[ref] for ref in pending)
                label = self.node_label(rank)
                ranks = sorted(rank_of[ref] for ref in pending)
                raise WorkerFailure(f"rank {rank} on {label} did not answer {what} within {timeout_s:g} s "
                                    f"(ranks still silent: {ranks})", rank=rank, node=label)
            for ref in done:
                rank = rank_of[ref]
                try:
                    results[rank] = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                    raise self._failure(rank, e, what) from e
        return [results[r] for r in range(len(refs))]

    def shutdown(self) -> None:
        """Kill the actors and free their placement group."""
        for actor in self.actors:
            ray.kill(actor)
        ray.util.remove_placement_group(self.placement_group)


def place_workers(actor_cls: Any, assignments: Sequence[Assignment], *, strategy: str = "PACK",
                  kwargs_of: Callable[[int], Mapping[str, Any]] | None = None,
                  timeout_s: float = 60.0) -> Workers:
    """One actor of ``actor_cls`` (a class or a ``ray.remote`` class) per assignment, in a
    placement group of one bundle per rank (its resources, pinned to its node by the
    ``ray.io/node-id`` label where it names one) under ``strategy``; ``kwargs_of(rank)`` are
    the actor's constructor arguments. Returns the workers in rank order.

    Raises ``UserError`` when the cluster cannot hold the bundles within ``timeout_s``."""
    if strategy not in PLACEMENT_STRATEGIES:
        raise ValueError(f"strategy: one of {', '.join(PLACEMENT_STRATEGIES)}, got {strategy!r}")
    ordered = sorted(assignments, key=lambda a: a.rank)
    assert [a.rank for a in ordered] == list(range(len(ordered))), "ranks 0..n-1, once each"
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundles = [{k: float(v) for k, v in a.resources.items()} for a in ordered]
    selectors = [{"ray.io/node-id": a.node_id} if a.node_id else {} for a in ordered]
    pg = placement_group(bundles, strategy=strategy, bundle_label_selector=selectors)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise UserError(f"the Ray cluster could not place {len(bundles)} worker(s) ({_show_bundles(ordered)}, "
                        f"strategy {strategy}) within {timeout_s:g} s: it lacks the resources, or a node they are "
                        "pinned to is gone; see 'ray status', or ask for fewer workers (parallel.pipeline, parallel.data)")
    table = ray.util.placement_group_table(pg)
    node_ids = tuple(table["bundles_to_node_id"][i] for i in range(len(bundles)))
    remote_cls = actor_cls if isinstance(actor_cls, ray.actor.ActorClass) else ray.remote(actor_cls)
    actors = []
    for i, a in enumerate(ordered):
        res = dict(bundles[i])
        num_cpus, num_gpus = res.pop("CPU", 0.0), res.pop("GPU", 0.0)
        options = dict(num_cpus=num_cpus, num_gpus=num_gpus, resources=res or None,
                       scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
        actors.append(remote_cls.options(**options).remote(**dict(kwargs_of(a.rank) if kwargs_of else {})))
    return Workers(actors=tuple(actors), node_ids=node_ids, placement_group=pg)


def _show_bundles(assignments: Sequence[Assignment]) -> str:
    shown = [", ".join(f"{k} {v:g}" for k, v in a.resources.items()) + (f" on node {a.node_id[:8]}" if a.node_id else "")
             for a in assignments[:4]]
    return "; ".join(f"rank {a.rank}: {s}" for a, s in zip(assignments, shown)) + ("; ..." if len(assignments) > 4 else "")
