"""Schedules of one step: generate a compute-only order, then lower it with pure passes.

docs/DESIGN.md rules 1-2 (model: ``torch.distributed.pipelining`` schedules). A schedule is
``{rank: (Action, ...)}``. ``generate_single_device`` gives the compute order at micro-batch
level (``0F3``: the forward of micro-batch 3); ``lower_chunks`` expands each pass into the
program the engine runs, block by block (planner.program: ``0F3/b2`` markers, ``0PREFETCH3@c5``
fetches and ``0OFFLOAD3@c5`` releases, chunks kept across pass ends, and the swapped blocks'
``0SWAP_OUT3/b2`` after their forward and ``0SWAP_IN3/b2`` ahead of their backward:
planner.program_swaps), and adds:

- ``0OPTIM3@c5``: chunk 5's optimizer step where its home is (CPU, or NVMe through the host),
  issued in the last backward as soon as its last gradient is in, overlapping the rest of the
  backward, with the states read ahead (``0OPTIM_READ``) and the write-backs waited for
  (``0OPTIM_WAIT``) around it (planner.program_optim; not under fp16 or gradient clipping);
- ``0OPTIM@c5`` (no micro-batch) after the last backward: the update of a chunk not updated
  early (the device chunks; all under fp16 or clipping, the nvme ones streamed with their reads and waits:
  planner.program_optim [Note: the step's end]), then ``0OPTIM`` (last): the early updates
  waited for; the step ends when all have finished.
"""

from __future__ import annotations

from collections.abc import Sequence

from memtrain.planner.plan import Action, MemoryPolicy, Op
from memtrain.planner.program import Layout, lower_backward, lower_forward
from memtrain.planner.program_optim import OptimLayout, Staging, add_optim_points, early_updates, final_optim_points
from memtrain.planner.stats import DType

__all__ = [
    "Schedule", "generate_single_device", "lower_chunks", "validate", "format_grid",
    "ENGINE_OPS", "engine_program",
]

ENGINE_OPS = frozenset({Op.F, Op.B, Op.PREFETCH, Op.OFFLOAD, Op.SWAP_OUT, Op.SWAP_IN, Op.OPTIM, Op.OPTIM_READ,
                        Op.OPTIM_WAIT})
"""The ops the engine executes and records (``ChunkStore.executed``); the others in a
single-device schedule describe what runs beside them."""

Schedule = dict[int, tuple[Action, ...]]

_SINGLE_DEVICE_OPS = {Op.F, Op.B, Op.PREFETCH, Op.OFFLOAD, Op.SWAP_OUT, Op.SWAP_IN, Op.OPTIM, Op.OPTIM_READ, Op.OPTIM_WAIT}


def generate_single_device(num_microbatches: int) -> Schedule:
    """``0F0, 0B0, 0F1, 0B1, ..., 0OPTIM``: gradient accumulation, F then B per micro-batch
    (so one micro-batch's activations are alive at a time)."""
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches: must be >= 1, got {num_microbatches}")
    acts: list[Action] = []
    for m in range(num_microbatches):
        acts += [Action(0, Op.F, m), Action(0, Op.B, m)]
    acts.append(Action(0, Op.OPTIM))
    return {0: tuple(acts)}


def lower_chunks(schedule: Schedule, memory_policy: MemoryPolicy, block_chunks: Sequence[Sequence[int]], *,
                 dtype: DType | str | None = None, loose: Sequence[int] = (), first_step: bool = False,
                 clip_grad_norm: bool = False) -> Schedule:
    """Expand each micro-batch ``F``/``B`` into its blocks' program (planner.program, with the
    swaps of the blocks whose ``memory_policy.activations`` swap), passes
    lowered one after another from the buffers the last one left (a backward followed at once by
    a forward keeps what that forward starts with), with the optimizer's points in the backwards
    (planner.program_optim) when ``dtype`` is given: early updates in the last backward unless it
    is fp16 or ``clip_grad_norm`` (the step clips gradients by their global norm), the param
    buffer handed over as the master under fp32, and the step's end
    (``program_optim.final_optim_points``). ``block_chunks[j]`` lists the
    chunks block ``j`` uses (``cost.block_chunk_ids``). A step begins with the write-backs the
    last one left running (``program_optim.steady_carried``); none for ``first_step``."""
    layout = Layout.of(memory_policy, block_chunks, loose)
    early = dtype is not None and early_updates(dtype, clip_grad_norm)
    opt = OptimLayout(staged_chunks=memory_policy.optim_staged_chunks, early=early)
    hand_off = early and DType(dtype) is DType.FP32
    out: Schedule = {}
    for rank, acts in schedule.items():
        new, end = _lower_rank(acts, layout, opt, hand_off, Staging(), dtype is not None)
        if not first_step and end.writing:
            new, _ = _lower_rank(acts, layout, opt, hand_off, Staging(carried=end.writing), True)
        out[rank] = tuple(new)
    return out


def _lower_rank(acts: Sequence[Action], layout: Layout, opt: OptimLayout, hand_off: bool,
                state: Staging, optim_points: bool) -> tuple[list[Action], Staging]:
    last_b = max((i for i, a in enumerate(acts) if a.op is Op.B and a.block is None), default=None)
    new: list[Action] = []
    resident: tuple[int, ...] = ()
    held = False
    for i, a in enumerate(acts):
        if a.op is Op.F and a.block is None:
            r = lower_forward(layout, a.microbatch, resident, held=held)
            new += [_on_stage(x, a.stage) for x in r.actions]
            resident, held = r.resident, r.held
        elif a.op is Op.B and a.block is None:
            follows = next((b for b in acts[i + 1:] if b.op in (Op.F, Op.B)), None)
            r = lower_backward(layout, a.microbatch, resident, next_forward=follows is not None and follows.op is Op.F,
                               hand_off=hand_off and i == last_b)
            points, state = add_optim_points(layout, opt, r.actions, a.microbatch, state, final=i == last_b)
            new += [_on_stage(x, a.stage) for x in points]
            resident, held = r.resident, False
        elif a.op is Op.OPTIM and a.chunk is None and optim_points:
            new += [_on_stage(x, a.stage) for x in final_optim_points(layout, opt)]
        else:
            new.append(a)
    return new, state


def _on_stage(a: Action, stage: int) -> Action:
    return a if a.stage == stage else Action(stage, a.op, a.microbatch, a.chunk, a.block)


def engine_program(schedule: Schedule, rank: int = 0) -> tuple[Action, ...]:
    """The part of ``rank``'s schedule the engine executes and records: ``ENGINE_OPS``."""
    return tuple(a for a in schedule[rank] if a.op in ENGINE_OPS)


def _label(action: Action) -> str:
    if isinstance(action.op, Op):
        return str(action)
    return f"{action.stage}{action.op}{'' if action.microbatch is None else action.microbatch}"  # a malformed op


def validate(schedule: Schedule) -> list[str]:
    """Problems with a single-device schedule, each naming the rank and step; [] when sound.

    Checks: only known ops; every F has a B after it (same micro-batch, same block when the
    schedule is lowered to blocks) and every B an F before it; SWAP_IN after SWAP_OUT (same
    micro-batch and block), SWAP_OUT after its F when lowered to blocks (a SWAP_IN may follow its
    own B marker: without a look-ahead the block's first use claims it);
    each PREFETCH of a chunk is followed by its OFFLOAD
    before the chunk is fetched again; no F after a chunk's optimizer step; OPTIM_READ and OPTIM_WAIT name a chunk; OPTIM last, once.
    """
    problems: list[str] = []
    for rank, acts in sorted(schedule.items()):
        where = lambda i: f"rank {rank} step {i} ({_label(acts[i])})"  # noqa: E731
        seen_f: set = set()
        seen_b: set = set()
        swapped_out: set = set()
        open_fetch: dict[tuple, int] = {}
        chunk_optim_at: int | None = None
        final_optims = [i for i, a in enumerate(acts) if isinstance(a.op, Op) and a.op is Op.OPTIM and a.chunk is None]
        for i, a in enumerate(acts):
            if not isinstance(a.op, Op) or a.op not in _SINGLE_DEVICE_OPS:
                problems.append(f"{where(i)}: unknown op {a.op!r} for a single-device schedule")
                continue
            key = (a.stage, a.microbatch)
            if a.op in (Op.F, Op.B, Op.SWAP_OUT, Op.SWAP_IN):
                key = (a.stage, a.microbatch, a.block)
            if a.op is Op.F:
                if key in seen_f:
                    problems.append(f"{where(i)}: micro-batch {a.microbatch} runs forward twice")
                if chunk_optim_at is not None:
                    problems.append(f"{where(i)}: forward after an optimizer step at step {chunk_optim_at}")
                seen_f.add(key)
            elif a.op is Op.B:
                if key not in seen_f:
                    problems.append(f"{where(i)}: backward of micro-batch {a.microbatch} before its forward")
                seen_b.add(key)
            elif a.op is Op.SWAP_OUT:
                if a.block is not None and key not in seen_f:
                    problems.append(f"{where(i)}: SWAP_OUT of micro-batch {a.microbatch} block {a.block} before its forward")
                swapped_out.add(key)
            elif a.op is Op.SWAP_IN:
                if key not in swapped_out:
                    problems.append(f"{where(i)}: SWAP_IN of micro-batch {a.microbatch} without a SWAP_OUT before it")
            elif a.op is Op.PREFETCH:
                if a.chunk is None:
                    problems.append(f"{where(i)}: PREFETCH needs a chunk (e.g. 0PREFETCH0@c3)")
                elif (a.stage, a.chunk) in open_fetch:
                    problems.append(f"{where(i)}: chunk {a.chunk} fetched again before its OFFLOAD")
                else:
                    open_fetch[(a.stage, a.chunk)] = i
            elif a.op is Op.OFFLOAD:
                if open_fetch.pop((a.stage, a.chunk), None) is None:
                    problems.append(f"{where(i)}: OFFLOAD of chunk {a.chunk} without a PREFETCH before it")
            elif a.op in (Op.OPTIM_READ, Op.OPTIM_WAIT) and a.chunk is None:
                problems.append(f"{where(i)}: {a.op.value} needs a chunk (e.g. 0{a.op.value}1@c3)")
            elif a.op is Op.OPTIM and a.chunk is not None and chunk_optim_at is None:
                chunk_optim_at = i
        for stage, mb, block in sorted(seen_f - seen_b, key=str):
            what = f"micro-batch {mb}" + ("" if block is None else f" block {block}")
            problems.append(f"rank {rank}: forward of {what} (stage {stage}) has no backward after it")
        for (stage, c), i in sorted(open_fetch.items()):
            problems.append(f"{where(i)}: chunk {c} is never offloaded after this PREFETCH")
        if len(final_optims) != 1:
            problems.append(f"rank {rank}: expected exactly one OPTIM (without a chunk), found {len(final_optims)}")
        elif final_optims[0] != len(acts) - 1:
            problems.append(f"{where(final_optims[0])}: OPTIM must be the last action")
    return problems


def format_grid(schedule: Schedule, marks: set[tuple[int, int]] = frozenset()) -> str:
    """A step × rank grid, one row per step (torch pipelining's ``_format_pipeline_order``); the
    cells ``marks`` names, (rank, step), start with ``>>``."""
    ranks = sorted(schedule)
    num_steps = max((len(a) for a in schedule.values()), default=0)
    cells = [[(">>" if (r, i) in marks else "") + (str(schedule[r][i]) if i < len(schedule[r]) else "")
              for r in ranks] for i in range(num_steps)]
    header = ["step"] + [f"rank {r}" for r in ranks]
    widths = [max(len(header[0]), len(str(max(num_steps - 1, 0))))]
    widths += [max([len(header[k + 1])] + [len(row[k]) for row in cells]) for k in range(len(ranks))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    for i, row in enumerate(cells):
        lines.append("  ".join(v.ljust(w) for v, w in zip([str(i)] + row, widths)).rstrip())
    return "\n".join(lines) + "\n"
