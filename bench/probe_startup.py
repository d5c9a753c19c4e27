"""Where ``memtrain run``'s measuring before planning spends its time, and how steady its figures are.

    python bench/probe_startup.py [--runs 3] [--config examples/gpt-tiny-pp2.yaml]

On the embedded Ray on 127.0.0.1 (token authentication on, ``runtime.ray_cluster``), the run's
``runtime.pipeline_probe.measured_for_run`` is called ``--runs`` times as ``memtrain run`` calls it
for a CPU pipeline (``parallel.profile: auto``). Each run's progress lines come with their time
since the call, so the phases show (the probes' start: process, imports; the link; the blocks:
their build, then the timed steps); then each run's total and the figures it measured, and
their spread over the runs (max / min - 1). The machine's load moves every figure: it is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E402 (the checkout, when not installed)


def _figures(m) -> dict[str, float]:
    c = m.blocks
    return {"fwd ms": sum(c.fwd_s) * 1e3, "bwd ms": sum(c.bwd_s) * 1e3, "optim ms": sum(c.optim_s) * 1e3,
            "rest ms": c.rest_s * 1e3, "latency us": m.link_latency_s * 1e6, "GB/s": m.link_gbps,
            "recv us": m.link_recv_s * 1e6, "send us": m.link_send_s * 1e6, "rtt ms": m.round_trip_s * 1e3}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--config", default="examples/gpt-tiny-pp2.yaml")
    args = ap.parse_args(argv)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    from memtrain.runtime import ray_cluster
    from memtrain.runtime.config_file import load_config
    from memtrain.runtime.pipeline_probe import measured_for_run

    with ray_cluster.connected(None) as line, tempfile.TemporaryDirectory(prefix="memtrain-probe-") as tmp:
        print(line)
        inventory = ray_cluster.cluster_inventory(None)
        kinds = [s.kind for s in inventory.slots[:2]]
        assignments = [ray_cluster.Assignment.of_slot(r, inventory.slots[r]) for r in range(2)]
        got = []
        for k in range(args.runs):
            cfg = load_config(args.config, [f"run_dir={tmp}/{k}"])
            t0 = time.perf_counter()

            def show(text: str, t0: float = t0) -> None:
                print(f"  +{time.perf_counter() - t0:5.2f} s  {text}")

            print(f"run {k + 1}: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
            m = measured_for_run(cfg, kinds, assignments, Path(tmp) / str(k), show)
            if m is None:
                print("  measuring failed (see above)")
                continue
            print(f"  total {time.perf_counter() - t0:.2f} s (elapsed_s {m.elapsed_s:.2f})")
            got.append(m)
    if not got:
        return 1
    rows = [_figures(m) for m in got]
    print(f"\n{'figure':>12} " + " ".join(f"{'run ' + str(i + 1):>9}" for i in range(len(rows))) + "    spread")
    for name in rows[0]:
        vals = [r[name] for r in rows]
        spread = max(vals) / min(vals) - 1 if min(vals) > 0 else float("nan")
        print(f"{name:>12} " + " ".join(f"{v:9.3f}" for v in vals) + f"  {spread:7.0%}")
    secs = [m.elapsed_s for m in got]
    print(f"{'seconds':>12} " + " ".join(f"{v:9.2f}" for v in secs) + f"   median {statistics.median(secs):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
