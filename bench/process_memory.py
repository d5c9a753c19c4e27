"""The whole process's memory: memtrain's plan against the measured peak, beside plain PyTorch.

    python bench/process_memory.py [--layers 8] [--seq 256] [--gbs 4] [--steps 3] [--nvme-path DIR]

A GPT of the ``100m`` preset (``--layers`` deep: 8 gives about 70M parameters) trains ``--steps``
steps of AdamW on the CPU, each configuration in a fresh interpreter: plain PyTorch with
everything resident, then memtrain with every chunk's home on the device, the host and NVMe
(real files). Each prints the peak RSS above a baseline measured just before the model is built
(``runtime.process_memory.ProcessPeak``, as ``memtrain run`` measures it), the plan's
``process_bytes`` and both errors: above the baseline and of the whole process (the target:
within 10%), and each peak as a ratio of plain PyTorch's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HOMES = ("plain", "device", "host", "nvme")


def _one(home: str, args) -> dict:
    import torch

    from memtrain.models.gpt import GPT, gpt_config
    from memtrain.offload.chunks import make_chunk_plans, named_blocks, param_order
    from memtrain.planner.analyze import analyze
    from memtrain.cluster import catalog
    from memtrain.cluster.inventory import local_node_spec
    from memtrain.planner.plan import ActPolicy, MemoryPolicy, Tier, TrainShape
    from memtrain.planner.search import predicted_process_bytes
    from memtrain.planner.simulate import simulate_step
    from memtrain.config import ModelConfig
    from memtrain.runtime.process_memory import ProcessPeak, return_large_frees
    from memtrain.runtime.wrapping import wrap

    overrides = {"num_layers": args.layers}
    gen = torch.Generator().manual_seed(0)
    vocab = gpt_config("100m", **overrides).vocab_size
    batches = [torch.randint(0, vocab, (args.gbs, args.seq + 1), generator=gen) for _ in range(args.steps)]
    predicted = 0
    if home != "plain":
        return_large_frees()  # as wrap() does, before the baseline
        with torch.device("meta"):
            meta = GPT(gpt_config("100m", **overrides))
        params = param_order(meta, named_blocks(meta, None))
        chunk = 4 * 2**20
        policy = MemoryPolicy(chunk_size_elems=chunk, chunks=make_chunk_plans(params, chunk, Tier(home)),
                              prefetch_depth=3, activations=(ActPolicy.KEEP,) * len(meta.blocks))
        stats = analyze(ModelConfig(preset="100m", overrides=overrides), seq_len=args.seq, micro_batch_size=1, dtype="fp32")
        node = local_node_spec()
        device = catalog.cpu_device_spec(num_cpus=node.host.num_cpus, memory_bytes=node.host.memory_bytes // 2)
        nvme = catalog.default_nvme_spec(args.nvme_path, 2**40)
        train = TrainShape(global_batch_size=args.gbs, micro_batch_size=args.gbs, num_microbatches=1, seq_len=args.seq,
                           dtype="fp32", optimizer="adamw")
        sim = simulate_step(stats, train, device, node.host, nvme, policy, timeline=False)
        predicted = predicted_process_bytes(stats, train, device, policy, sim)
        del meta
    meter = ProcessPeak("cpu")
    torch.manual_seed(0)
    model = GPT(gpt_config("100m", **overrides))
    if home == "plain":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for ids in batches:
            loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        engine = wrap(model, optimizer={"name": "adamw", "lr": 1e-4}, plan=policy, device="cpu", verbose=False,
                      micro_batch_size=args.gbs,
                      memory={"device": 2**40, "host": 2**40, "nvme_path": str(Path(args.nvme_path) / "run")})
        try:
            for ids in batches:
                engine.train_step((ids[:, :-1], ids[:, 1:]))
        finally:
            engine.close()
    return {"home": home, "baseline": meter.baseline_bytes, "measured": meter.peak_bytes(), "predicted": predicted,
            "params": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--gbs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--nvme-path", default=None, help="directory for the NVMe files (default: a temporary directory)")
    ap.add_argument("--only", choices=HOMES, help=argparse.SUPPRESS)  # one configuration, in this interpreter
    args = ap.parse_args(argv)
    if args.only:
        print(json.dumps(_one(args.only, args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="memtrain-process-", dir=args.nvme_path) as tmp:
        rows = []
        for home in HOMES:
            cmd = [sys.executable, __file__, "--only", home, "--layers", str(args.layers), "--seq", str(args.seq),
                   "--gbs", str(args.gbs), "--steps", str(args.steps), "--nvme-path", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{home}: failed\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    mib = 2**20
    print(f"GPT 100m preset, {args.layers} layers ({rows[0]['params'] / 1e6:.0f}M parameters), seq {args.seq}, "
          f"batch {args.gbs}, AdamW fp32, {args.steps} steps on the CPU")
    print(f"{'configuration':<16} {'baseline':>9} {'measured':>9} {'predicted':>9} {'err':>7} {'total err':>9} {'vs plain':>8}")
    plain = rows[0]["measured"]
    worst = 0.0
    for r in rows:
        b, m, p = r["baseline"], r["measured"], r["predicted"]
        name = "plain PyTorch" if r["home"] == "plain" else f"memtrain {r['home']}"
        if r["home"] == "plain":
            print(f"{name:<16} {b / mib:>7.0f}Mi {m / mib:>7.0f}Mi {'-':>9} {'':>7} {'':>9} {1.0:>7.2f}x")
            continue
        total = (b + p - (b + m)) / (b + m)
        worst = max(worst, abs(total))
        print(f"{name:<16} {b / mib:>7.0f}Mi {m / mib:>7.0f}Mi {p / mib:>7.0f}Mi {(p - m) / m:>+7.1%} {total:>+9.1%} "
              f"{m / plain:>7.2f}x")
    print(f"worst whole-process error {worst:.1%} (target within 10%)")
    return 0 if worst <= 0.10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
