"""A bf16 stage's backward workspace for its largest weight: what autograd makes at once.

    python bench/stage_grad_workspace.py [--rows 4096] [--cols 1024] [--tokens 256]

One linear layer (weight ``rows × cols``, fp32 as a pipeline worker keeps it) runs a forward of
``tokens`` rows under ``torch.autocast(bfloat16)`` on the CPU (or in fp32), then its backward
twice, the second time onto an existing ``.grad`` (a later micro-batch's). A dispatch mode
tracks the bytes of every tensor the backward makes that is still alive, and prints its peak
less the input's gradient: under bf16 the weight's gradient is made in bf16 (``mm``), then cast
to fp32 (autocast's ``ToCopyBackward``) and added, so the two are alive together, 6 B a
parameter, where an fp32 backward's is 4 B (planner.stage_cost [Note: a device stage's states]
charges ``4 · max_param``).
"""

from __future__ import annotations

import argparse
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _Live(TorchDispatchMode):
    """Bytes of the tensors made under the mode that are still alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t._base is None:
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self._seen:
                    self._seen.add(key)
                    n = st.nbytes()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, key, n)
        return out

    def _free(self, key: int, n: int) -> None:
        self._seen.discard(key)
        self.live -= n


def backward_peak(rows: int, cols: int, tokens: int, bf16: bool, existing_grad: bool) -> int:
    torch.manual_seed(0)
    lin = torch.nn.Linear(cols, rows, bias=False)
    x = torch.randn(tokens, cols, requires_grad=True)
    if existing_grad:
        lin.weight.grad = torch.zeros_like(lin.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = lin(x)
    gy = torch.ones_like(y)
    mode = _Live()
    with mode:
        y.backward(gy)
    return mode.peak - x.numel() * 4  # less the input's gradient (fp32, kept)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    n = args.rows * args.cols
    for existing in (False, True):
        for bf16 in (False, True):
            peak = backward_peak(args.rows, args.cols, args.tokens, bf16, existing)
            print(f"{'bf16' if bf16 else 'fp32'} backward, .grad {'exists' if existing else 'none':6}: "
                  f"peak {peak:,} B = {peak / n:.2f} B per weight element")


if __name__ == "__main__":
    main()
