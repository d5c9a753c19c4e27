"""Gradient clipping by global norm over a chunk store's accumulators, as
``torch.nn.utils.clip_grad_norm_`` computes it (Pascanu et al. 2013).

[Note: the norm of the chunks] torch's total norm is the 2-norm of the per-parameter 2-norms,
taken in parameter order (``torch._foreach_norm`` per parameter, then ``vector_norm`` of them
stacked), and the coefficient is ``clamp(max_norm / (total + 1e-6), max=1)``, multiplied into
every gradient. Here each parameter's gradient is its slot's view of its chunk's fp32
accumulator (offload.grads [Note: fp32 accumulators]: a device chunk's on the device, a host or
nvme chunk's on the host, an nvme one's until the step's end), so the same per-parameter norms
come out of the same kernels, in ``model.parameters()`` order (or the optimizer's groups' order,
``clip_order="groups"``, which Lightning's ``clip_gradients`` passes), and the same reduction of
them: on a CPU the norm and the clipped gradients are bitwise torch's. Parameters without a gradient this
step are left out, as torch leaves out a ``None`` grad. The coefficient is applied to a chunk's
whole accumulator before its update (elementwise, so the same products). It needs every gradient
of the step first, so a clipped step has no early updates (planner.program_optim
``early_updates``), and the plan and the simulator lower the same program.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from memtrain.errors import UserError

if TYPE_CHECKING:
    from memtrain.offload.chunks import ChunkStore

__all__ = ["check_max_norm", "param_grads", "total_norm", "clip_coefficient", "GradClip"]


def check_max_norm(value: object, field: str = "max_grad_norm") -> float | None:
    """``max_grad_norm`` as the engine takes it: None or 0 for no clipping, else a number > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise UserError(f"{field}: the largest global gradient norm, a finite number > 0 (0 or None: no "
                        f"clipping), got {value!r}")
    return float(value) if value > 0 else None


def param_grads(store: "ChunkStore", order: list[str] | None = None) -> list[torch.Tensor]:
    """Each parameter's gradient of this step, a view of its chunk's accumulator shaped as the
    parameter, in ``order`` (parameter names; default ``model.parameters()``'s); parameters that
    got none are left out."""
    by_name: dict[str, torch.Tensor] = {}
    for c in store.chunks:
        if not c.has_grad:
            continue
        for si, s in enumerate(c.slots):
            if si in c.step_seen:
                by_name[s.name] = c.grad[s.offset:s.offset + s.numel].view(s.shape)
    return [by_name[n] for n in (store.param_order() if order is None else order) if n in by_name]


def total_norm(grads: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """torch's ``_get_total_norm`` with the per-parameter norms kept in parameter order when the
    gradients are on several devices ([Note: the norm of the chunks]); a 0-d fp32 tensor on the
    first gradient's device."""
    if not grads:
        return torch.tensor(0.0)
    by_device: dict[torch.device, list[int]] = {}
    for i, g in enumerate(grads):
        by_device.setdefault(g.device, []).append(i)
    norms: list[torch.Tensor | None] = [None] * len(grads)
    for idx in by_device.values():
        for i, n in zip(idx, torch._foreach_norm([grads[i] for i in idx], norm_type)):
            norms[i] = n
    first = grads[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]), norm_type)


def clip_coefficient(max_norm: float, total: torch.Tensor) -> torch.Tensor:
    """``clamp(max_norm / (total + 1e-6), max=1)``, the expression torch evaluates."""
    clip_coef = max_norm / (total + 1e-6)
    return torch.clamp(clip_coef, max=1.0)


class GradClip:
    """A step's gradient norm and clipping for ``offload.optim.OffloadedOptimizer``: the norm is
    computed once per step (asked for before the step, or by it), the step's updates multiply by
    the coefficient, and ``reset`` ends the step."""

    def __init__(self, max_norm: float | None, order: str = "model") -> None:
        if order not in ("model", "groups"):
            raise UserError(f"clip_order: 'model' (model.parameters()' order) or 'groups' (the param groups'), "
                            f"got {order!r}")
        self.max_norm = max_norm
        """The largest global norm; None: no clipping (the norm is still given when asked)."""
        self.order = order
        """The per-parameter norms' order: ``model`` or the parameter ``groups``' ([Note: the norm of the chunks])."""
        self.last_norm: float | None = None
        """The norm of the last step it was computed for, before clipping."""
        self.coef: torch.Tensor | None = None
        """The coefficient the updates multiply by, while the step runs (``start``)."""
        self.unscaled = False
        """``norm`` unscaled this step's gradients (fp16): the step must not again."""
        self._norm: torch.Tensor | None = None

    def norm(self, store: "ChunkStore", order: list[str] | None, inv_scale: float = 1.0) -> torch.Tensor:
        """This step's global norm, computed at the first call after every gradient is in; under
        fp16 the gradients are first unscaled by ``inv_scale``, in their fp32 accumulators."""
        if self._norm is None:
            store.grads.finish()
            if inv_scale != 1.0:
                for c in store.chunks:
                    if c.has_grad:
                        c.grad.mul_(inv_scale)
                self.unscaled = True
            self._norm = total_norm(param_grads(store, order if self.order == "groups" else None))
            self.last_norm = float(self._norm)
        return self._norm

    def start(self, store: "ChunkStore", order: list[str] | None, inv_scale: float) -> None:
        """At the step's start, when clipping: the coefficient of this step's norm."""
        if self.max_norm is not None:
            self.coef = clip_coefficient(self.max_norm, self.norm(store, order, inv_scale))

    def reset(self) -> None:
        """The step ran, or fp16 overflow skipped it: the next step computes its own norm."""
        self._norm, self.coef, self.unscaled = None, None, False
