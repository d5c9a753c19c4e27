"""A plain PyTorch loop with memtrain's ``wrap()``, durable checkpoints and resume.

    python examples/wrap_resume.py --dir runs/wrap-resume [--steps 20] [--every 5] [--stop-after N]

Run it once with ``--stop-after 8`` (as if the job were preempted after step 8), then again
without: the second run finds the newest valid checkpoint in ``--dir``, restores the parameters,
the optimizer states (wherever each chunk lives: here the AdamW states are on the host), the
random generators and the data position, and continues. The losses of all steps go to
``<dir>/losses.json``; they equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from memtrain.models.gpt import GPT, gpt_config
from memtrain.runtime import checkpoint, wrap


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's batch: a pure function of the step, so a resumed loop reads the same data."""
    ids = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1000 + step))
    return ids[:, :-1], ids[:, 1:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="directory for checkpoints and losses.json")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    ap.add_argument("--stop-after", type=int, default=None, help="stop after this step, with a checkpoint")
    args = ap.parse_args(argv)
    out = Path(args.dir)
    torch.manual_seed(0)
    model = GPT(gpt_config("tiny", dropout=0.1))
    engine = wrap(model, optimizer={"name": "adamw", "lr": 1e-3}, verbose=False, seq_len=32, global_batch_size=4,
                  memory={"device": "1700KiB", "host": "64MiB"})
    losses_path = out / "losses.json"
    losses: list[float] = []
    start = 0
    loaded = checkpoint.latest(out / "checkpoints")  # None on the first run; a corrupt one is skipped, named
    if loaded is not None:
        checkpoint.restore_engine_state(engine, loaded)
        start = loaded.step
        losses = json.loads(losses_path.read_text())[:start]
        print(f"resumed after step {start} from {loaded.path}")
    saver = checkpoint.Checkpointer(out / "checkpoints", keep=2)
    try:
        for step in range(start, args.steps):
            losses.append(engine.train_step(batch(step)))
            print(f"step {step + 1}: loss {losses[-1]:.6f}")
            done = step + 1
            if done % args.every == 0 or done == args.steps or done == args.stop_after:
                saver.save(done, {0: checkpoint.engine_state(engine, step=done)}, copy=False)
                saver.wait()  # before losses.json says this step is done
                losses_path.write_text(json.dumps(losses))
            if done == args.stop_after:
                print(f"stopped after step {done}; run again to resume")
                break
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
