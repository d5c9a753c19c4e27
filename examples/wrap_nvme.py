"""Train a small GPT in a plain PyTorch loop with every model-state chunk in files on disk.

    python examples/wrap_nvme.py [--dir /fast/local/disk] [--steps 5]

The device budget holds little more than the working set and the host budget only the gradient
accumulators and staging, so the plan puts most parameters and AdamW states on NVMe (here: a
temporary directory).
The script checks that it did, that the losses equal plain PyTorch's step for step, and that
``engine.close()`` leaves no file behind; it exits non-zero otherwise. CI runs it on a fresh
install without extras.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from memtrain.models.gpt import GPT, causal_lm_loss, gpt_config
from memtrain.runtime import wrap


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=None, help="directory for the chunk files (default: a temporary one)")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="memtrain-wrap-", dir=args.dir) as scratch:
        nvme_path = Path(scratch) / "chunks"
        torch.manual_seed(0)
        model, reference = GPT(gpt_config("tiny")), GPT(gpt_config("tiny"))
        reference.load_state_dict(model.state_dict())
        engine = wrap(model, optimizer={"name": "adamw", "lr": 1e-3}, host_kernel="single", verbose=False,
                      memory={"device": "1700KiB", "host": "1600KiB", "nvme": "64MiB", "nvme_path": str(nvme_path)},
                      seq_len=32, global_batch_size=4)
        homes = sorted({str(c.home) for c in engine.store.chunks})
        print(f"chunk homes: {', '.join(homes)}; activations: {sorted({str(a) for a in engine.plan.memory.activations})}")
        opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        same = True
        for step in range(args.steps):
            ids = torch.randint(0, 256, (4, 32), generator=g)
            labels = torch.roll(ids, -1, 1)
            loss = engine.train_step((ids, labels))
            num = 4 // engine.micro_batch_size
            expected = 0.0
            for x, y in zip(ids.split(engine.micro_batch_size), labels.split(engine.micro_batch_size)):
                ref_loss = causal_lm_loss(reference(x), y)
                expected += ref_loss.item() / num
                (ref_loss / num).backward()
            opt.step()
            opt.zero_grad()
            same &= abs(loss - expected) <= 1e-6
            print(f"step {step + 1}: loss {loss:.6f} (plain PyTorch {expected:.6f})")
        files = sorted(p.name for p in nvme_path.glob("*.mt"))
        engine.close()
        left = list(nvme_path.glob("*")) if nvme_path.exists() else []
    problems = []
    if "nvme" not in homes:
        problems.append(f"no chunk was placed on NVMe (homes: {homes})")
    if not files:
        problems.append("no chunk file was written")
    if not same:
        problems.append("the losses differ from plain PyTorch's")
    if left:
        problems.append(f"engine.close() left {len(left)} file(s) behind")
    for p in problems:
        print(f"wrap_nvme: {p}", file=sys.stderr)
    if not problems:
        print(f"ok: {len(files)} chunk files on disk while training, none left after close()")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
