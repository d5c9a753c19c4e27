"""An offloaded pipeline stage's memory: what ``memtrain run`` measured against what its plan charged.

    python bench/pipeline_offload_memory.py RUN_DIR

reads RUN_DIR/plan.json and RUN_DIR/metrics.jsonl of a pipeline run with offloaded stages (for
example ``memtrain run examples/gpt-tiny-pp2.yaml --set memory.offload=host --set
parallel.profile=catalog --set train.steps=3 --set run_dir=/tmp/off``) and prints, per rank, the
figures the runtime measures on any device against the plan's (planner.stage_offload_cost
[Note: an offloaded stage's residency]; planner.hetero_plan [Note: gradient copies after the
passes]), the most over the steps after the first (which warms up):

- ``host``: the chunk stores' host ledgers (fp32 masters, gradient accumulators, optimizer
  states; ``offload_host``) against the rank's predicted host peak;
- ``buffers``: the chunk stores' device ledgers (every chunk's param buffer for the step, one
  chunk's grad buffer at ``OFFLOAD``; ``offload_device``) against ``4 · n`` + that buffer's excess over
  the param buffers already released (planner.stage_offload_cost ``home_policy``);
- ``grads``: the gradients held while they are summed (the parameters' ``.grad``, over replicas
  without ZeRO-2 also their flat copy, under ZeRO-2 a chunk's copy for its reduce;
  ``grad_bytes.reduce_peak``) against ``4 · n`` (twice that over replicas under ZeRO-0/1, plus
  the largest chunk's under ZeRO-2).

- ``nvme`` (NVMe homes): the chunk files' ledger (``nvme``) against the rank's predicted NVMe peak.

On a GPU the rank's whole device peak (``device``, ``torch.cuda.max_memory_allocated``) is set
against the plan's too. The errors are (measured - predicted) / measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from memtrain.planner.plan import Plan
from memtrain.planner.stage_offload_cost import PARAM_BYTES

__all__ = ["compare", "main"]


def compare(run_dir: Path) -> list[dict]:
    """Per world rank with offloaded stages: ``{"rank", figure: (measured, predicted), ...}``."""
    plan = Plan.load(run_dir / "plan.json")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    later = metrics[1:] or metrics
    pipe = plan.pipeline
    assert pipe is not None, f"{run_dir}: not a pipeline run"
    dp, zero2 = pipe.data_parallel_degree, any("REDUCE_SCATTER" in str(a) for acts in plan.schedule.values()
                                               for a in acts)
    rows = []
    for rp in pipe.ranks:
        chunks = [c for pol in rp.policies if pol is not None for c in pol.chunks if str(c.home) != "device"]
        r = rp.rank
        if not chunks or "offload_host" not in later[0]["peak_bytes"][r]:
            continue
        n = sum(c.num_elems for c in chunks)
        pred = plan.prediction.devices[rp.pipeline_rank]

        def most(key: str, where: str = "peak_bytes") -> int:
            return max(m[where][r].get(key, 0) for m in later)

        over, before = 0, 0  # OFFLOAD's grad buffer beside the later chunks' param buffers (home_policy)
        for c in chunks:
            over, before = max(over, c.num_elems - before), before + c.num_elems
        row = {"rank": r,
               "host": (most("offload_host"), pred.peak_bytes["host"]),
               "buffers": (most("offload_device"), PARAM_BYTES * (n + over)),
               "grads": (most("reduce_peak", "grad_bytes"),
                         PARAM_BYTES * (2 * n if dp > 1 and not zero2 else n + max(c.num_elems for c in chunks)
                                        if zero2 else n))}
        if "nvme" in later[0]["peak_bytes"][r]:
            row["nvme"] = (most("nvme"), pred.peak_bytes["nvme"])
        if "device" in later[0]["peak_bytes"][r]:
            row["device"] = (most("device"), pred.peak_bytes["device"])
        rows.append(row)
    return rows


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    for row in compare(Path(argv[0])):
        for key, figures in row.items():
            if key != "rank":
                got, want = figures
                err = (got - want) / got if got else 0.0
                print(f"rank {row['rank']}  {key:8s} measured {got:>14,} B  predicted {want:>14,} B  {err:+7.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
