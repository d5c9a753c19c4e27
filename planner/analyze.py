"""Model analysis on the meta device: parameters, saved-activation bytes and FLOPs per block.

``analyze`` builds the model on ``meta`` in the compute dtype (no weights are allocated, so a
175B model analyses in seconds in a few hundred MB) and runs one forward and backward of one
micro-batch, recording per block:

- **parameters**: each tensor once, in the first block whose module holds it; a parameter
  outside every block goes to the block running when the forward first uses it, else to the
  last block. Names are fully qualified, in order of first use in the forward.
- **activation bytes**: what autograd saves for backward (``saved_tensors_hooks``), each
  storage counted once in the block that first saves it, parameter and buffer storages
  excluded, with each storage's size (the process's memory depends on it: planner.footprint
  [Note: process memory]). A layer's input is saved by its first norm, so it counts in the layer, as in
  Korthikanti et al. 2022. What the work after the last block's forward saves (the loss:
  cross entropy keeps its fp32 log-probabilities, b·s·V·4 bytes) goes to
  ``ModelStats.loss_activation_bytes`` instead: it is outside every block, so the runtime's
  activation manager neither tracks nor moves it (docs/memory-accounting.md).
- **FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` totals read at every block switch
  (the loss's FLOPs count toward the head, whose measured time includes the loss too).
  Forward switches come from module pre-hooks; backward switches from gradient hooks on each
  block's output, which fire when that block's backward is about to start.
- **input/output bytes** of each block's primary tensor.

[Note: kernels as on the accelerator]
On meta (and CPU) tensors PyTorch decomposes two ops differently from CUDA, which would make
the analysis describe a CPU run rather than the GPU run being planned:
- ``F.dropout`` becomes ``bernoulli_`` + ``mul`` and saves a mask in the input dtype; CUDA runs
  ``aten.native_dropout``, which saves a 1-byte bool mask (the mask Korthikanti et al. count).
- ``F.scaled_dot_product_attention`` falls back to the math path (saving the s×s probabilities,
  upcast to fp32 for bf16); CUDA runs flash attention (bf16/fp16, no mask, head size ≤ 256) or
  memory-efficient attention, which save q, k, v, the output and the log-sum-exp only.
During the pass a ``TorchFunctionMode`` sends both calls to the CUDA ops, whose meta kernels
and autograd formulas are PyTorch's own, so the saved tensors and FLOPs are those of the GPU run.

[Note: a pipeline worker's autocast]
A pipeline worker (runtime.stage_worker) does not compute in bf16 as the single-device engine
does: it keeps its blocks in fp32 and runs each stage's forward of a micro-batch under
``torch.autocast(bfloat16)``. Its blocks then save other tensors: the built-in GPT's residual
stream stays fp32 (a norm saves an fp32 input; a stage receives and sends fp32), and every matmul
saves autocast's bf16 copy of its weight (runtime.stage_worker [Note: one weight cast a step]:
one a step shared by a stage's micro-batches where its blocks keep their activations, else one
per micro-batch). For a bf16 analysis of the built-in GPT (the only model a pipeline runs) ``analyze`` therefore traces
the model a second time as the worker runs it (``autocast_figures``): built in fp32 under
``FakeTensorMode`` on the CPU (no memory, no draw from the generators, as runtime.stage_rng's
trace), one forward under CPU autocast with the same kernel substitution as above (the
attention's inputs cast to bf16 first, as autocast casts them for attention), the saved storages
counted by the same rules; a saved tensor that is a cast of a parameter (through views) is
autocast's weight copy, counted apart (``BlockStats.autocast_weight_bytes``: whatever the
micro-batch's size, so ``ModelStats.scaled`` leaves it). The parameters' storages are excluded as
before; the copies are not parameters, and the worker's count (runtime.stage_keep) counts them
too. CPU and CUDA autocast cast differently: CUDA's runs a list of calls in fp32 (softmax,
log-softmax, norms, ``exp``, ``pow``, losses...) that the CPU's runs in their inputs' dtype, so
the trace casts their bf16 inputs to fp32 first, as CUDA's does (``_CUDA_FP32``: an explicit
softmax, ``fused_attention: false``, then saves fp32 probabilities and its matmul their bf16
copy). Its matmul list is the CPU's, which holds every matmul the built-in GPT calls.
``accelerator=False`` leaves both the kernels and the casts the CPU's. The planner's pipeline
takes these figures for bf16 (planner.stage_cost [Note: a bf16 stage's activations]); the
single-device figures stay. The built-in GPT's layers are alike, so the trace runs the model
with two of them and gives every layer the second's figures (checked equal to the first's, else
the whole model is traced): a 96-layer model's trace costs what a 2-layer one's does.

[Note: tensors made in forward]
Models written for one device make tensors inside ``forward`` without ``device=`` (a causal
mask ``torch.ones(s, s).triu(1)``, positions ``torch.arange(T)``), name a device outright, or
move a tensor with ``.to(device)`` / ``.cpu()``. The pass runs under ``torch.device("meta")``
and the same mode sends every ``device=`` and every move of a meta tensor to meta, so such a
forward traces as it runs. What cannot run without values (``.item()``, ``if mask.any():``)
raises a ``UserError`` naming the block and the ways out.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from memtrain.errors import UserError
from memtrain.models.built import BuiltModel, first_tensor
from memtrain.models.gpt import gpt_config
from memtrain.models.source import build_model
from memtrain.planner.stats import (BlockStats, DType, ModelStats, Optimizer, cast_of_parameter,
                                    model_state_bytes_per_param)
from memtrain.config import ConfigError

if TYPE_CHECKING:
    from memtrain.config import ModelConfig

__all__ = ["analyze", "analyze_built", "autocast_figures", "model_state_bytes", "TORCH_DTYPES"]

TORCH_DTYPES: dict[DType, torch.dtype] = {DType.FP32: torch.float32, DType.BF16: torch.bfloat16, DType.FP16: torch.float16}
"""The torch dtype of each compute dtype."""


def model_state_bytes(stats: ModelStats, optimizer: Optimizer | str = Optimizer.ADAMW) -> int:
    """Bytes of parameters, gradients and optimizer states of the whole model.

    Mixed-precision AdamW keeps (2+4+12)Ψ bytes (ZeRO's (2+2+12)Ψ with fp32 gradient
    accumulators), fp32 AdamW 16Ψ (see ``stats.model_state_bytes_per_param``).
    """
    return stats.num_params * model_state_bytes_per_param(stats.dtype, optimizer)


def _check_sizes(seq_len: int, micro_batch_size: int, dtype: DType | str) -> DType:
    if seq_len < 1:
        raise ConfigError(f"train.seq_len: must be >= 1, got {seq_len}")
    if micro_batch_size < 1:
        raise ConfigError(f"train.micro_batch_size: analysis needs >= 1 sequence, got {micro_batch_size}")
    try:
        return DType(dtype)
    except ValueError:
        raise ConfigError(f"train.dtype: must be 'fp32', 'bf16' or 'fp16', got {dtype!r}") from None


def analyze(cfg: ModelConfig, *, seq_len: int, micro_batch_size: int = 1, dtype: DType | str = "fp32") -> ModelStats:
    """Per-block figures of the model ``cfg`` for one micro-batch of ``micro_batch_size``
    sequences of ``seq_len`` tokens, computed in ``dtype``."""
    dt = _check_sizes(seq_len, micro_batch_size, dtype)
    with torch.device("meta"):
        built = build_model(cfg, max_seq_len=seq_len)
    stats = analyze_built(built, seq_len=seq_len, micro_batch_size=micro_batch_size, dtype=dt)
    if dt is not DType.BF16 or cfg.source != "gpt":
        return stats
    # [Note: a pipeline worker's autocast] the figures the pipeline's planner takes instead
    figures = autocast_figures(cfg, seq_len=seq_len, micro_batch_size=micro_batch_size)
    blocks = tuple(dataclasses.replace(b, **f) for b, f in zip(stats.blocks, figures, strict=True))
    return dataclasses.replace(stats, blocks=blocks, autocast=True)


def autocast_figures(cfg: ModelConfig, *, seq_len: int, micro_batch_size: int = 1,
                     accelerator: bool = True) -> list[dict[str, int]]:
    """Per block of the built-in GPT ``cfg``, its ``BlockStats.autocast_*`` figures: one
    micro-batch's forward as a bf16 pipeline worker runs it ([Note: a pipeline worker's
    autocast]). ``accelerator=False`` keeps the CPU's kernels for dropout and attention and its
    autocast's casts (what a CPU worker runs, [Note: kernels as on the accelerator]), to set the
    trace against one. Traced on two layers, the others alike (the note)."""
    num_layers = gpt_config(cfg.preset, **cfg.overrides).num_layers
    if num_layers > 2:
        two = dataclasses.replace(cfg, overrides={**cfg.overrides, "num_layers": 2})
        emb, first, second, head = trace_autocast(two, seq_len=seq_len, micro_batch_size=micro_batch_size,
                                                  accelerator=accelerator)
        if first == second:
            return [emb, *[second] * num_layers, head]
    return trace_autocast(cfg, seq_len=seq_len, micro_batch_size=micro_batch_size, accelerator=accelerator)


def trace_autocast(cfg: ModelConfig, *, seq_len: int, micro_batch_size: int = 1,
                   accelerator: bool = True) -> list[dict[str, int]]:
    """``autocast_figures`` of every block of ``cfg``, each traced."""
    with FakeTensorMode(), torch.device("cpu"):
        built = build_model(cfg, max_seq_len=seq_len)  # fp32, as runtime.stage_worker builds its blocks
        built.module.train()
        rec = _Recorder(built, split_casts=True)
        ids = torch.zeros(micro_batch_size, seq_len, dtype=torch.long)
        hooks = rec.install()
        try:
            with (torch.autocast("cpu", dtype=torch.bfloat16), _AsOnAccelerator(rec, kernels=accelerator, meta=False),
                  torch.autograd.graph.saved_tensors_hooks(rec.pack, _unpack)):
                built.forward(ids)
        finally:
            for h in hooks:
                h.remove()
    return [dict(autocast_activation_bytes=rec.activation_bytes[i], autocast_weight_bytes=rec.weight_bytes[i],
                 autocast_input_bytes=rec.input_bytes[i] or 0, autocast_output_bytes=rec.output_bytes[i] or 0)
            for i in range(len(built.blocks))]


def analyze_built(
    built: BuiltModel, *, seq_len: int, micro_batch_size: int = 1, dtype: DType | str = "fp32"
) -> ModelStats:
    """As ``analyze`` for a model already built on the meta device (converted to ``dtype`` in
    place; its meta gradients are cleared afterwards)."""
    dt = _check_sizes(seq_len, micro_batch_size, dtype)
    module = built.module
    if any(t.device.type != "meta" for t in (*module.parameters(), *module.buffers())):
        raise ConfigError("analyze_built: build the model under `with torch.device('meta'):` so no weights are allocated")
    module.to(TORCH_DTYPES[dt])
    module.train()  # dropout on: its masks are saved for backward
    rec = _Recorder(built)
    ids = torch.zeros(micro_batch_size, seq_len, dtype=torch.long, device="meta")
    labels = torch.zeros(micro_batch_size, seq_len, dtype=torch.long, device="meta")
    hooks = rec.install()
    try:
        # [Note: tensors made in forward] the default device and _AsOnAccelerator keep them on meta
        with torch.device("meta"), FlopCounterMode(display=False) as counter:
            rec.counter = counter
            with _AsOnAccelerator(rec), torch.autograd.graph.saved_tensors_hooks(rec.pack, _unpack):
                loss = built.loss_fn(built.forward(ids), labels)
            rec.start_backward()
            loss.backward()
            rec.switch(rec.cur)  # flush the last block's backward FLOPs
    except (RuntimeError, NotImplementedError) as e:
        if "meta" not in str(e).lower():
            raise
        raise rec.untraceable(e) from e
    finally:
        for h in hooks:
            h.remove()
        module.zero_grad(set_to_none=True)
    blocks = rec.block_stats()
    return ModelStats(
        name=built.name,
        num_params=sum(b.num_params for b in blocks),
        dtype=dt,
        micro_batch_size=micro_batch_size,
        seq_len=seq_len,
        blocks=blocks,
        loss_activation_bytes=rec.loss_activation_bytes,
    )


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    """Identity and size of the storage behind ``t`` (views share their base's storage)."""
    try:
        storage = t.untyped_storage()
        return storage._cdata, storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):  # tensors without a plain storage
        return id(t), _nbytes(t)


class _Recorder:
    """Per-block tallies of one forward+backward pass (see the module docstring)."""

    def __init__(self, built: BuiltModel, *, split_casts: bool = False) -> None:
        self.built = built
        self.split_casts = split_casts
        """Count saved casts of parameters (autocast's weight copies) in ``weight_bytes``, not
        in ``activation_bytes`` ([Note: a pipeline worker's autocast])."""
        n = len(built.blocks)
        self.cur = 0
        """Index of the block whose work is being recorded."""
        self.inside: int | None = None
        """Index of the block whose forward is running; None between blocks."""
        self.last_done: int | None = None
        """Index of the block whose forward returned last."""
        self.backward = False
        self.counter: FlopCounterMode | None = None
        self.flops_seen = 0
        self.fwd_flops = [0] * n
        self.bwd_flops = [0] * n
        self.activation_bytes = [0] * n
        self.weight_bytes = [0] * n
        self.random_elems = [0] * n
        """Per block, the elements its forward's dropouts draw (``note_random``)."""
        self.saved_sizes: list[list[int]] = [[] for _ in range(n)]
        self.in_loss = False
        """True once the last block's forward has returned: what the forward saves from then on
        is the loss's (outside every block)."""
        self.loss_activation_bytes = 0
        self.input_bytes: list[int | None] = [None] * n
        self.output_bytes: list[int | None] = [None] * n
        self.first_use: dict[int, tuple[int, int]] = {}
        """id(parameter) → (order of first use in the forward, block running then)."""
        self.saved: dict[int, torch.Tensor] = {}
        """Storage key → one tensor on it, kept alive so no key is reused during the pass."""
        self.excluded = {_storage_key(t)[0] for t in (*built.module.parameters(), *built.module.buffers())}

    def install(self) -> list[Any]:
        hooks = []
        for i, (_, blk) in enumerate(self.built.blocks):
            hooks.append(blk.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
            hooks.append(blk.register_forward_hook(self._post_hook(i), with_kwargs=True))
        return hooks

    def switch(self, index: int) -> None:
        total = self.counter.get_total_flops() if self.counter is not None else 0
        tally = self.bwd_flops if self.backward else self.fwd_flops
        tally[self.cur] += total - self.flops_seen
        self.flops_seen = total
        self.cur = index

    def start_backward(self) -> None:
        self.switch(len(self.built.blocks) - 1)  # flush the forward; backward starts in the head
        self.backward = True

    def _pre_hook(self, i: int):
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            self.switch(i)
            self.inside = i
            if self.input_bytes[i] is None:
                x = first_tensor(args)
                if x is None:
                    x = first_tensor(kwargs.get("hidden_states", None))
                if x is None:
                    x = first_tensor(list(kwargs.values()))
                self.input_bytes[i] = _nbytes(x)

        return hook

    def _post_hook(self, i: int):
        last = len(self.built.blocks) - 1

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self.inside, self.last_done = None, i
            out = first_tensor(output)
            if self.output_bytes[i] is None:
                self.output_bytes[i] = _nbytes(out)
            if i < last and out is not None and out.requires_grad:
                # The gradient of this block's output is complete once the next block's
                # backward has finished: from then on backward work is this block's.
                out.register_hook(lambda grad: self.switch(i))
            if i == last - 1:
                self.switch(last)  # work between the last layer and the head (final norm) is the head's
            if i == last:
                self.in_loss = True

        return hook

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage_key(t)
        if key not in self.excluded and key not in self.saved:
            self.saved[key] = t
            if self.in_loss and not self.backward:
                self.loss_activation_bytes += nbytes
            elif self.split_casts and cast_of_parameter(t):
                self.weight_bytes[self.cur] += nbytes
            else:
                self.activation_bytes[self.cur] += nbytes
                self.saved_sizes[self.cur].append(nbytes)
        return t

    def note_random(self, numel: int) -> None:
        """A dropout of ``numel`` elements in the forward: what a pipeline's walk replays
        (planner.stage_cost [Note: the dropout walk])."""
        if not self.backward:
            self.random_elems[self.cur] += numel

    def note_params(self, values: Any) -> None:
        if self.backward:
            return
        for v in values:
            if isinstance(v, nn.Parameter):
                if id(v) not in self.first_use:
                    self.first_use[id(v)] = (len(self.first_use), self.cur)
            elif isinstance(v, (list, tuple)):
                self.note_params(v)

    def untraceable(self, error: BaseException) -> UserError:
        """The error for a forward that cannot run on the meta device, naming the block it was in."""
        names = [name for name, _ in self.built.blocks]
        if self.backward:
            phase, where = "backward", f"in block {names[self.cur]!r}"
        elif self.inside is not None:
            phase, where = "forward", f"in block {names[self.inside]!r}"
        elif self.last_done is not None:
            phase, where = "forward", f"after block {names[self.last_done]!r}, outside every block,"
        else:
            phase, where = "forward", "before the first block"
        return UserError(
            f"model analysis: the {phase} pass {where} cannot run without weights on the 'meta' device "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]}). memtrain plans from a weightless "
            "trace, so forward must not read tensor values (.item(), if tensor: ...); compute such values "
            "outside forward, or pass a plan to wrap(plan=...)"
            + ("; and call= must run the model it is given, call(model, ids), not another one" if self.built.call else "")
        )

    def block_stats(self) -> tuple[BlockStats, ...]:
        n = len(self.built.blocks)
        owner: dict[int, int] = {}
        for i, (_, blk) in enumerate(self.built.blocks):
            for p in blk.parameters():
                owner.setdefault(id(p), i)
        per_block: list[list[tuple[int, int, str, nn.Parameter]]] = [[] for _ in range(n)]
        for reg, (name, p) in enumerate(self.built.module.named_parameters()):
            used = self.first_use.get(id(p))
            i = owner.get(id(p), used[1] if used else n - 1)
            # Used parameters in order of first use; unused ones after, in registration order.
            per_block[i].append((used[0] if used else len(self.first_use) + reg, reg, name, p))
        canon = {id(p): name for name, p in self.built.module.named_parameters()}
        stats = []
        for i, (name, blk) in enumerate(self.built.blocks):
            params = sorted(per_block[i], key=lambda e: e[:2])
            shared = tuple(dict.fromkeys(canon[id(p)] for p in blk.parameters() if owner[id(p)] != i))
            stats.append(
                BlockStats(
                    name=name,
                    num_params=sum(p.numel() for *_, p in params),
                    param_bytes=sum(p.numel() * p.element_size() for *_, p in params),
                    activation_bytes=self.activation_bytes[i],
                    saved_storage_bytes=tuple(self.saved_sizes[i]),
                    input_bytes=self.input_bytes[i] or 0,
                    output_bytes=self.output_bytes[i] or 0,
                    fwd_flops=self.fwd_flops[i],
                    bwd_flops=self.bwd_flops[i],
                    param_names=tuple(e[2] for e in params),
                    param_numels=tuple(e[3].numel() for e in params),
                    shared_param_names=shared,
                    random_elems=self.random_elems[i],
                )
            )
        return tuple(stats)


class _AsOnAccelerator(TorchFunctionMode):
    """Run dropout and attention with the CUDA kernels' meta versions ([Note: kernels as on the
    accelerator]) and note the first use of each parameter."""

    def __init__(self, rec: _Recorder, *, kernels: bool = True, meta: bool = True) -> None:
        super().__init__()
        self.rec = rec
        self.kernels = kernels
        """Send dropout and attention to the CUDA ops (False: the tensors' own device's)."""
        self.meta = meta
        """Keep tensors made or moved in forward on meta (False: a FakeTensorMode trace)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.rec.note_params(args)
        self.rec.note_params(kwargs.values())
        if func is F.dropout:
            self.rec.note_random(_dropout_elems(*args, **kwargs))
            return _dropout(*args, **kwargs) if self.kernels else func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            self.rec.note_random(_attention_dropout_elems(*args, **kwargs))
            return _attention(*args, **kwargs) if self.kernels else func(*args, **kwargs)
        if not self.meta:
            if self.kernels and func in _CUDA_FP32 and "dtype" not in kwargs and torch.is_autocast_enabled("cpu"):
                args, kwargs = _to_fp32(args), _to_fp32(kwargs)  # [Note: a pipeline worker's autocast]
            return func(*args, **kwargs)
        if func in _MOVES and args and isinstance(args[0], torch.Tensor) and args[0].device.type == "meta":
            return _stay_on_meta(func, args, kwargs)  # [Note: tensors made in forward]
        if kwargs.get("device") is not None:
            kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


_MOVES = (torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda)

_CUDA_FP32 = frozenset(
    f for name in ("__pow__", "__rdiv__", "__rpow__", "__rtruediv__", "acos", "asin",
                   "binary_cross_entropy_with_logits", "cosh", "cosine_embedding_loss", "cdist",
                   "cosine_similarity", "cross_entropy", "cumprod", "cumsum",
                   "dist", "erfinv", "exp", "expm1", "group_norm", "hinge_embedding_loss", "kl_div", "l1_loss",
                   "layer_norm", "log", "log_softmax", "log10", "log1p", "log2", "margin_ranking_loss", "mse_loss",
                   "multilabel_margin_loss", "multi_margin_loss", "nll_loss", "norm", "normalize", "pdist",
                   "poisson_nll_loss", "pow", "prod", "reciprocal", "rsqrt", "sinh", "smooth_l1_loss",
                   "soft_margin_loss", "softmax", "softmin", "softplus", "sum", "renorm", "tan", "triplet_margin_loss")
    for mod in (torch, torch.Tensor, F) if (f := getattr(mod, name, None)) is not None)
"""The calls CUDA's autocast runs in fp32 (PyTorch's AMP reference, "CUDA Ops that can autocast to
float32"); the CPU's runs most of them in their inputs' dtype ([Note: a pipeline worker's autocast])."""


def _to_fp32(tree: Any) -> Any:
    """``tree`` with its bf16 and fp16 tensors cast to fp32, as CUDA's autocast casts ``_CUDA_FP32``'s."""
    if isinstance(tree, torch.Tensor):
        return tree.float() if tree.dtype in (torch.bfloat16, torch.float16) else tree
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_fp32(v) for v in tree)
    if isinstance(tree, dict):
        return {k: _to_fp32(v) for k, v in tree.items()}
    return tree


def _weightless(t: torch.Tensor) -> bool:
    """``t`` belongs to a trace without values: on meta, or a ``FakeTensorMode`` tensor."""
    return t.device.type == "meta" or isinstance(t, FakeTensor)


def _stay_on_meta(func, args: tuple, kwargs: dict) -> torch.Tensor:
    """``t.to(...)``, ``t.cpu()`` or ``t.cuda()`` of a meta tensor: keep it on meta, apply only the
    dtype (and memory format) that ``to`` asks for."""
    tensor = args[0]
    if func is not torch.Tensor.to:
        return tensor
    _, dtype, _, memory_format = torch._C._nn._parse_to(*args[1:], **kwargs)
    if isinstance(args[1] if len(args) > 1 else None, torch.Tensor):
        dtype = args[1].dtype  # t.to(other) takes other's dtype too
    return tensor.to(dtype=dtype or tensor.dtype, copy=bool(kwargs.get("copy", False)),
                     memory_format=memory_format or torch.preserve_format)


def _dropout_elems(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> int:
    """The random elements ``F.dropout`` draws: one per element of its input, when it drops any."""
    return input.numel() if training and p > 0.0 else 0


def _attention_dropout_elems(query: torch.Tensor, key: torch.Tensor, *args: Any, dropout_p: float = 0.0,
                             **kwargs: Any) -> int:
    """The random elements attention's dropout draws: one per attention probability,
    batch × heads × queries × keys, when ``dropout_p`` > 0."""
    p = args[1] if len(args) > 1 else dropout_p  # (value, attn_mask, dropout_p, ...)
    return query.shape[:-1].numel() * key.shape[-2] if p > 0.0 and query.dim() >= 2 else 0


def _dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    if not training or p == 0.0 or not _weightless(input):
        return F.dropout(input, p, training, inplace)
    # CUDA's at::dropout: native_dropout, saving a bool mask (1 byte per element).
    return torch.native_dropout(input, p, True)[0]


def _attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    if not _weightless(query) or query.dim() != 4:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if query.device.type != "meta" and torch.is_autocast_enabled(query.device.type):
        # autocast runs attention in its dtype ([Note: a pipeline worker's autocast]): the kernels take the casts
        low = torch.get_autocast_dtype(query.device.type)
        query, key, value = (t.to(low) if t.is_floating_point() else t for t in (query, key, value))
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(low)
    aten = torch.ops.aten
    if attn_mask is None and query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] <= 256:
        # Flash attention (Dao 2022): saves q, k, v, output, log-sum-exp and the RNG state.
        return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    # Memory-efficient attention (Rabe & Staats 2021; xformers): same saved set, takes a bias.
    if key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, dim=-3), value.repeat_interleave(rep, dim=-3)
    bias = attn_mask
    if bias is not None and bias.dtype == torch.bool:
        # SDPA turns a bool mask into an additive one (0 where kept, -inf where masked).
        bias = torch.zeros(bias.shape, dtype=query.dtype, device=bias.device).masked_fill(~bias, float("-inf"))
    need_lse = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    return aten._scaled_dot_product_efficient_attention(query, key, value, bias, need_lse, dropout_p, is_causal,
                                                        scale=scale)[0]
