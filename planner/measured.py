"""Measured pipeline costs: what ``memtrain run`` measures on its workers before it plans a
pipeline (runtime.pipeline_probe), in the form the heterogeneous planner (planner.hetero) uses
in place of the catalog's figures for the devices they were measured on.

A ``MeasuredPipeline`` holds, for one model at one micro-batch size and sequence length, on one
kind of device with the workers' threads: each block's forward, backward (whole, and split
into ``B`` and ``W``), and optimizer step (``BlockCosts``); the rest of a worker's step (the
batch, the bookkeeping); the link between two workers (latency, bandwidth, a late receive's
cost: comm.link_probe [Note: rendezvous]); and Ray's part of each step on a worker, the gap
between one step's end and the next's start, queued behind it (runtime.pipeline_driver [Note: a
step queued ahead]). [Note: measured pipeline] The planner then takes:

- a stage's passes on a device of ``device_kind``: the sum of its blocks' measured times,
  scaled in proportion to the micro-batch size (planner.stage_cost ``StageModel``); a stage
  whose states are offloaded is timed by the single-device search (``StageModel.refine``), on the
  catalog's figures of the device, not these;
- its optimizer step: the sum of its blocks' measured steps (ZeRO: ``1 / d`` of it);
- a split backward's ``B`` and ``W``: the measured shares, where the split form was timed;
- the link between two workers of that kind: the measured one, the wire's latency less the
  receive's own cost, which the receiving rank pays, and a send's own cost, which the sending
  rank pays (``wire``);
- the step: the simulated pipeline's plus ``step_overhead_s`` (the rest of a worker's step and
  Ray's gap between steps), so the prediction is the driver's wall time per step, as the run
  measures it.

Stored as JSON (``pipeline-profile.json`` in the run directory, ``save_measured``); a run given
one (config ``parallel.profile: PATH``) plans with it and measures nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from memtrain.errors import UserError
from memtrain.planner.serde import from_dict, to_dict
from memtrain.planner.simulate_pipeline import Link

__all__ = ["MAX_TIMED_LAYERS", "MEASURED_VERSION", "MEASURED_FILE", "MEASURED_SOURCE", "BlockCosts", "MeasuredPipeline", "pipeline_link", "save_measured",
           "load_measured", "planned_from_measured"]

MEASURED_VERSION = 1
MAX_TIMED_LAYERS = 2
"""Layers of a GPT the probe times (runtime.pipeline_probe); a deeper model's other layers repeat
the timed ones' mean, and the probe's step (its rest) holds the dropout walk of these alone."""
MEASURED_FILE = "pipeline-profile.json"
"""Where a run keeps what it measured, in its run directory."""
MEASURED_SOURCE = "measured on the workers"
"""What a plan made with measured costs says in its ``source``."""


def planned_from_measured(plan) -> bool:
    """``plan`` was made with measured costs (its ``source`` says so; a resumed run's saved plan too)."""
    return MEASURED_SOURCE in plan.source


@dataclass(frozen=True, kw_only=True, slots=True)
class BlockCosts:
    """Per block, one micro-batch's passes (s), measured on one thread of one worker."""

    fwd_s: tuple[float, ...]
    bwd_s: tuple[float, ...]
    """The whole backward (unsplit schedules)."""
    b_s: tuple[float, ...]
    """The input-gradient part of a split backward (half the whole one where not timed)."""
    w_s: tuple[float, ...]
    """The weight-gradient part (likewise)."""
    optim_s: tuple[float, ...]
    """The block's ``ALLREDUCE`` (one replica: the missing gradients zeroed) and ``OPTIM``."""
    rest_s: float
    """A step's time outside the actions: the batch, the bookkeeping."""
    output_bytes: int
    """A block's output for one micro-batch, what a stage sends."""


@dataclass(frozen=True, kw_only=True, slots=True)
class MeasuredPipeline:
    """One model's pipeline costs measured on the workers (see the module doc)."""

    version: int = MEASURED_VERSION
    device_kind: str
    """The cluster inventory's device kind whose figures these replace (``cpu``)."""
    device: str
    """Where the timed worker computed (``cpu``, ``cuda:0 (NAME)``)."""
    num_threads: int
    """Threads the timed worker used (the workers' ``PipelineSpec.num_threads``)."""
    model_key: str
    """planner.profile_format ``model_key``: the model config, sequence length and dtype."""
    model_name: str
    seq_len: int
    dtype: str
    micro_batch_size: int
    num_microbatches: int
    blocks: BlockCosts
    split_timed: bool
    """The split backward (``B``, ``W``) was timed; else its parts are half the whole one."""
    link_latency_s: float
    """Half the round trip of a 4-byte tensor between two workers (a trimmed mean of many:
    comm.link_probe [Note: mean, not median])."""
    link_gbps: float
    link_recv_s: float
    """A late receive's time on the receiving worker (comm.link_probe [Note: rendezvous])."""
    round_trip_s: float
    """Ray's part of each step on a worker: the median gap between two calls queued on an actor
    (runtime.pipeline_probe ``ray_step_gap_s``; the field keeps its first name, profiles hold it)."""
    link_send_s: float = 0.0
    """A send's own time on the sending worker while its receiver waits (``Link.send_s``)."""
    link_across_nodes: bool = False
    """The two probing workers were on different nodes: the link is the network's; else a node's."""
    machine: str = ""
    """Where the blocks were timed (the node's address)."""
    created: str = ""
    load_avg: float = 0.0
    """The 1-minute load average of the timing node when it was timed."""
    num_cpus: int = 0
    """The timing node's cores."""
    elapsed_s: float = 0.0
    """How long measuring took (actor start-up included)."""

    def link_for(self, same_node: bool) -> Link | None:
        """The measured link between two workers of ``device_kind`` on one node or on two
        (``same_node``), as the simulator takes it; None where the probe did not measure that kind."""
        return self.wire() if same_node != self.link_across_nodes else None

    def wire(self) -> Link:
        """The link between two workers as the simulator takes it ([Note: measured pipeline])."""
        return pipeline_link(self.link_latency_s, self.link_gbps, self.link_send_s)

    @property
    def step_overhead_s(self) -> float:
        """Per step, outside the simulated pipeline: the rest of a worker's step and Ray's gap between steps."""
        return self.blocks.rest_s + self.round_trip_s

    def block_times(self, micro_batch_size: int) -> tuple[list[float], list[float]]:
        """Per block, its forward and whole backward for one micro-batch of ``micro_batch_size``
        (in proportion to the measured size)."""
        scale = micro_batch_size / self.micro_batch_size
        return [t * scale for t in self.blocks.fwd_s], [t * scale for t in self.blocks.bwd_s]

    def w_share(self, first: int, end: int) -> float:
        """Of blocks ``[first, end)``'s split backward, the weight-gradient part's share (0.5
        where the split form was not timed)."""
        b, w = sum(self.blocks.b_s[first:end]), sum(self.blocks.w_s[first:end])
        return w / (b + w) if self.split_timed and b + w > 0 else 0.5

    def summary(self) -> str:
        """One line for people: the totals of the figures the planner takes."""
        c = self.blocks
        return (f"per micro-batch of {self.micro_batch_size} through all {len(c.fwd_s)} blocks: forward "
                f"{_ms(sum(c.fwd_s))}, backward {_ms(sum(c.bwd_s))}; optimizer {_ms(sum(c.optim_s))}; rest of a step "
                f"{_ms(c.rest_s)}; link latency {self.link_latency_s * 1e6:.0f} µs, {self.link_gbps:.2f} GB/s, a send "
                f"{self.link_send_s * 1e6:.0f} µs, a late receive {self.link_recv_s * 1e6:.0f} µs (not paid: receives are posted early); Ray between steps "
                f"{_ms(self.round_trip_s)}")

    def mismatch(self, model_key: str) -> str:
        """Why these figures are not this model's (empty when they are)."""
        if self.model_key != model_key:
            return (f"measured for another model, sequence length or dtype ({self.model_name}, seq_len "
                    f"{self.seq_len}, {self.dtype})")
        return ""


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms"


def save_measured(measured: MeasuredPipeline, path: str | Path) -> None:
    from memtrain.planner.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(to_dict(measured), indent=1) + "\n")


def load_measured(path: str | Path) -> MeasuredPipeline:
    """The figures in ``path``; ``UserError`` naming it when it cannot be read."""
    path = Path(path)
    fix = "give a pipeline-profile.json an earlier run wrote, or parallel.profile: auto to measure"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"parallel.profile: cannot read {str(path)!r} ({getattr(e, 'strerror', None) or e}); "
                        f"{fix}") from None
    if not isinstance(data, dict) or data.get("version") != MEASURED_VERSION:
        version = data.get("version") if isinstance(data, dict) else None
        raise UserError(f"parallel.profile: {path} is not a measured pipeline profile of version "
                        f"{MEASURED_VERSION} (version {version!r}); {fix}")
    try:
        return from_dict(MeasuredPipeline, data)
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"parallel.profile: {path} is not a measured pipeline profile ({e}); {fix}") from None


def pipeline_link(latency_s: float, gbps: float, send_s: float) -> Link:
    """A measured link as the simulator takes it for a pipeline's transfers: half a round trip
    (``latency_s``) holds a send's own time (``send_s``), which its rank pays, and the rest is the
    wire's. The workers post their receives a pass ahead (comm.p2p [Note: receives posted
    early]), as the probe's receiver did, so a receive costs its rank nothing once the data is
    there (``recv_s`` 0): the late receive's round (comm.link_probe [Note: rendezvous]) is not paid."""
    return Link(gbps=gbps, latency_s=max(latency_s - send_s, 0.0), recv_s=0.0, send_s=send_s)
