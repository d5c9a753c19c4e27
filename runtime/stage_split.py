"""The two walks of a split backward: ``B`` (input gradients) and ``W`` (weight gradients).

runtime.stage_worker [Note: B and W] says what each walk does; this module does them. ``F``
keeps, per parameter-owning module it runs, a ``Kept``: the module's own parameters, the
gradient edge of its output, and the graph nodes of its tensor inputs. ``input_grads`` is the
``B``; ``weight_grads`` the ``W``, which yields each parameter's gradient of the micro-batch
once, summed over the modules of the stage that use it.

[Note: a parameter two modules of one graph use] A walk from a module's output to its
parameters goes down every path that reaches them. Where an earlier module of the same graph
uses one of them too (a stage holding both ends of a GPT with tied embeddings: the head's
``lm_head`` and the embedding's ``wte`` share the table; a module run twice), that path runs
through the module's input and the rest of the stage to the other use: the walk would count
that use's gradient a second time and free the stage's graph on the way, so the next module's
walk fails ("backward through the graph a second time"). Such a module's walk is cut at its own
use of the shared parameter: the nodes between its output and the parameter that lead to no
other input (``TBackward`` of ``weight.t()``, a cast under autocast) are found from the graph,
the first walk stops at their edge (capturing the gradient there) and a second walk goes from
those edges to the parameter. Each node still computes what it computes in a whole backward,
from the same incoming gradient, and the uses' gradients are summed (the later module's
first) before they reach ``.grad``, as a whole backward's accumulator sums them: the step is
one process's, bit for bit. A module that uses a shared parameter directly in an op that also
takes its input cannot be cut this way; it fails loudly, naming the module.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

__all__ = ["Kept", "keep", "input_grads", "weight_grads"]


@dataclass(frozen=True, slots=True)
class Kept:
    """What ``F`` keeps of one parameter-owning module's call for the split backward."""

    module: str
    """The module's class, for messages."""
    params: tuple[nn.Parameter, ...]
    """Its own parameters (not its children's)."""
    out: GradientEdge
    """The gradient edge of its output: the graph node, not the tensor (whose memory would
    otherwise stay from ``F`` to ``W`` beside what the activation policy holds)."""
    stops: tuple[Node, ...]
    """The graph nodes of its tensor inputs: where a cut walk ([Note: a parameter two modules of
    one graph use]) leaves the module."""


def keep(module: nn.Module, args: tuple, kwargs: dict, output: object) -> Kept:
    """A forward hook's record of ``module``'s call (``register_forward_hook(..., with_kwargs=True)``)."""
    assert isinstance(output, torch.Tensor), f"{type(module).__name__} returned {type(output).__name__}"
    inputs = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    return Kept(type(module).__name__, tuple(module.parameters(recurse=False)), get_gradient_edge(output),
                tuple(get_gradient_edge(t).node for t in inputs))


def input_grads(out: torch.Tensor, grad: torch.Tensor | None, leaf: torch.Tensor | None,
                kept: Sequence[Kept]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """``B``: the gradient of the stage's input ``leaf`` (None for the first stage) and of each
    kept module's output, from ``out`` with its incoming ``grad`` (None: ``out`` is the loss);
    the graph stays for ``W``, no weight gradient is computed."""
    inputs = ([] if leaf is None else [leaf]) + [k.out for k in kept]
    grads = torch.autograd.grad(out, inputs, grad, retain_graph=True)
    return (None if leaf is None else grads[0]), list(grads[len(inputs) - len(kept):])


def weight_grads(kept: Sequence[Kept], grads: Sequence[torch.Tensor]) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
    """``W``: walk from each kept module's output (its gradient from ``B``) to its parameters,
    the last module first, as a whole backward finishes them; yield each parameter once, with
    its gradient summed over the modules that use it, when the last of them is done (the
    graph is freed as it goes)."""
    todo = list(zip(kept, grads, strict=True))[::-1]
    final = {id(q): j for j, (k, _) in enumerate(todo) for q in k.params}  # its earliest use in the forward
    pending: dict[int, torch.Tensor] = {}
    for j, (k, grad) in enumerate(todo):
        shared = [q for q in k.params if final[id(q)] > j]  # used again upstream: cut the walk there
        for q, g in zip(k.params, _module_grads(k, grad, shared), strict=True):
            before = pending.pop(id(q), None)
            total = g if before is None else before + g
            if final[id(q)] == j:
                yield q, total
            else:
                pending[id(q)] = total


def _module_grads(k: Kept, grad: torch.Tensor, shared: list[nn.Parameter]) -> tuple[torch.Tensor, ...]:
    """The gradients of ``k.params`` through ``k``'s own use of them: one walk, or, where some
    are ``shared`` with an earlier module of the graph, a walk cut at their use and one from
    there ([Note: a parameter two modules of one graph use])."""
    if not shared:
        return torch.autograd.grad(k.out, k.params, grad)
    cut = _cut(k, shared)
    plain = [q for q in k.params if all(q is not s for s in shared)]
    if cut == [k.out]:  # the output's node leads to the shared parameters alone (a ``plain`` one: unused, refused)
        got = (*(torch.autograd.grad(k.out, plain, grad, retain_graph=True) if plain else ()), grad)
    else:
        got = torch.autograd.grad(k.out, [*plain, *cut], grad)
    through = dict(zip(map(id, shared), torch.autograd.grad(cut, shared, got[len(plain):]), strict=True))
    by_id = dict(zip(map(id, plain), got[:len(plain)], strict=True)) | through
    return tuple(by_id[id(q)] for q in k.params)


def _cut(k: Kept, shared: list[nn.Parameter]) -> list[GradientEdge]:
    """The edges into ``k``'s graph nodes that lead to the ``shared`` parameters and to nothing
    else (its output's own edge if its node is one), found between its output and its inputs."""
    accs = {get_gradient_edge(q).node for q in shared}
    stops = set(k.stops)
    only: dict[Node, bool] = {}  # a node that leads to the shared parameters only

    def leads_to_shared_only(root: Node) -> bool:
        stack = [root]
        while stack:  # iterative post-order: a module's region may be deep
            n = stack[-1]
            if n in only:
                stack.pop()
                continue
            kids = [c for c, _ in n.next_functions if c is not None]
            todo = [c for c in kids if c not in accs and c not in stops and c not in only]
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            only[n] = n not in stops and bool(kids) and all(c in accs or only.get(c, False) for c in kids)
        return only[root]

    if leads_to_shared_only(k.out.node):
        return [k.out]
    edges: list[GradientEdge] = []
    seen: set[Node] = set()
    stack = [k.out.node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for c, nr in n.next_functions:
            if c is None or c in stops:
                continue
            if c in accs:
                raise RuntimeError(f"the split backward cannot separate {k.module}'s use of a parameter an earlier "
                                   f"module of its stage uses too: {type(n).__name__} takes it with the module's "
                                   "input; run a schedule without W (gpipe, 1f1b, interleaved-1f1b)")
            if leads_to_shared_only(c):
                if all(not (e.node is c and e.output_nr == nr) for e in edges):
                    edges.append(GradientEdge(c, nr))
            else:
                stack.append(c)
    return edges
