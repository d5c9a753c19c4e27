"""Analysis and planning time and peak RSS for large presets, without a GPU.

    python bench/plan_speed.py [--presets 1.3b 13b llama-70b 175b] [--seq-len 2048]

Each preset runs in a fresh subprocess so its peak RSS is its own. The target is planning a
175B model for one device in < 5 s with peak RSS well under 2 GB (no real weights).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import json, resource, sys, time
from memtrain.cluster.inventory import resolve_cluster
from memtrain.config import config_from_dict
from memtrain.runtime.planning import budgets_for
from memtrain.planner.analyze import analyze
from memtrain.planner.search import plan

preset, seq_len = sys.argv[1], int(sys.argv[2])
cfg = config_from_dict({
    "model": {"preset": preset},
    "train": {"global_batch_size": 32, "seq_len": seq_len, "dtype": "bf16"},
    "cluster": {"nodes": [{"host_memory": "1TiB", "num_cpus": 64, "devices": [{"kind": "h100-sxm"}],
                           "nvme": {"path": "/tmp/memtrain-bench", "capacity": "8TiB", "read_gbps": 12, "write_gbps": 10}}]},
})
node = resolve_cluster(cfg.cluster).nodes[0]
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
stats = analyze(cfg.model, seq_len=seq_len, micro_batch_size=1, dtype="bf16")
t1 = time.perf_counter()
p = plan(stats, name=preset, global_batch_size=32, micro_batch_size=0, dtype="bf16", optimizer="adamw",
         device=node.devices[0], host=node.host, nvme=node.nvme,
         budgets=budgets_for(cfg, node.devices[0], node.host, node.nvme), safety_margin=0.1, source="catalog")
t2 = time.perf_counter()
print(json.dumps({"preset": preset, "num_params": stats.num_params, "analyze_s": t1 - t0, "plan_s": t2 - t1,
                  "import_rss_mib": rss0 / 1024, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "fits": p.fits, "step_time_s": p.prediction.step_time_s}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["1.3b", "13b", "llama-70b", "175b"])
    ap.add_argument("--seq-len", type=int, default=2048)
    args = ap.parse_args()
    print(f"{'preset':>10} {'params':>10} {'analyze':>9} {'plan':>8} {'total':>8} {'peak RSS':>10} {'after import':>13}  plan")
    worst = 0.0
    for preset in args.presets:
        out = subprocess.run([sys.executable, "-c", _CHILD, preset, str(args.seq_len)], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
        total = r["analyze_s"] + r["plan_s"]
        worst = max(worst, total)
        fit = f"fits, step {r['step_time_s']:.2f} s" if r["fits"] else "does not fit"
        print(
            f"{preset:>10} {r['num_params'] / 1e9:>9.1f}B {r['analyze_s']:>8.2f}s {r['plan_s']:>7.2f}s {total:>7.2f}s "
            f"{r['peak_rss_mib']:>8.0f}MiB {r['import_rss_mib']:>11.0f}MiB  {fit}"
        )
    print(f"slowest analysis+planning: {worst:.2f} s (target < 5 s for 175B)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
