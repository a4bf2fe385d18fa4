"""The backward pass's start: one scalar whose gradient w.r.t. each output is exactly
that output's cotangent, so that ``torch.autograd.grad`` needs no ``grad_outputs``.

Given ``grad_outputs``, autograd checks each one's shape through
``torch.fx.experimental.symbolic_shapes``, whose first import (sympy with it) costs
about 0.6 s of a process: more than the whole probe of a small model, and more than a
training script that calls ``loss.backward()`` ever pays. ``paired``'s backward hands
each output its cotangent itself (the same memory, as autograd's own start does), so
the gradients are bit for bit those of ``autograd.grad(outs, wrt, cotangents)``.
``gradients`` takes them from that scalar.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from varprobe.errors import VarprobeError


class _Pairing(torch.autograd.Function):
    """<outs, cotangents>, whose value nothing reads: backward returns the cotangents."""

    @staticmethod
    def forward(ctx, count: int, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.cotangents = tensors[count:]
        return tensors[0].new_zeros(())

    @staticmethod
    def backward(ctx, _: torch.Tensor):
        return None, *ctx.cotangents, *(None,) * len(ctx.cotangents)


def paired(outs: list[torch.Tensor], cotangents: list[torch.Tensor]) -> torch.Tensor:
    """The scalar to differentiate: d/d outs[i] is cotangents[i]. A cotangent of
    another shape is refused here (autograd would sum a broadcastable one silently)."""
    for i, (o, g) in enumerate(zip(outs, cotangents)):
        if g.shape != o.shape:
            where = f"output tensor {i}" if len(outs) > 1 else "the output"
            raise VarprobeError(f"grad_output has shape {tuple(g.shape)}, {where} has "
                                f"{tuple(o.shape)}; they must match")
    return _Pairing.apply(len(outs), *outs, *(g.detach() for g in cotangents))


def aligned(grad_output: Any, output: Any) -> Any:
    """``grad_output`` laid out as ``output``: mappings matched by key, not by position
    (``{"b": gb, "a": ga}`` for an output ``{"a": ..., "b": ...}``, which flattening
    would pair by order, silently). Keys that differ are refused."""
    if isinstance(output, Mapping) and isinstance(grad_output, Mapping):
        if set(output) != set(grad_output):
            raise VarprobeError(f"grad_output's keys {sorted(map(str, grad_output))} are "
                                f"not the output's {sorted(map(str, output))}")
        return [aligned(grad_output[k], output[k]) for k in output]
    if isinstance(output, (list, tuple)) and isinstance(grad_output, (list, tuple)) \
            and len(output) == len(grad_output):
        return [aligned(g, o) for g, o in zip(grad_output, output)]
    return grad_output


def gradients(start: torch.Tensor, outs, wrt) -> tuple:
    """d start/d wrt (``start`` = cotangent.paired(outs, ...)), without touching any
    ``.grad`` the user holds.

    ``autograd.grad`` is the clean way, but a use_reentrant=True checkpoint refuses it;
    then ``backward()`` runs with every ``.grad`` cleared and they are read back (the
    caller's ``preserved`` puts the user's own tensors back afterwards).
    """
    if not wrt:
        return ()
    if not _has_reentrant_checkpoint(outs):
        return torch.autograd.grad(start, wrt, allow_unused=True)
    # backward() writes every leaf it reaches (parameters, and any tensor the model
    # keeps that requires grad) and runs their post-accumulate hooks (an optimizer in
    # the backward): both are held off and put back as they were
    # a reentrant checkpoint's parameters are out of the outer graph's sight: with wrt
    leaves = list({id(t): t for t in (*_leaves(start), *wrt) if t.is_leaf}.values())
    # autograd holds each leaf's hook dict itself: emptied in place, refilled after
    hooks = [(t._post_accumulate_grad_hooks, dict(t._post_accumulate_grad_hooks or {}))
             for t in leaves]
    held = [(t, t.grad) for t in leaves]
    for t in leaves:
        t.grad = None
    for table, _ in hooks:
        if table:
            table.clear()
    for t in wrt:
        if not t.is_leaf:  # a computed weight (a parametrization), made for this pass
            t.retain_grad()
    try:
        torch.autograd.backward(start)
        return tuple(t.grad for t in wrt)
    finally:
        for t, grad in held:
            t.grad = grad
        for table, saved in hooks:
            if saved:
                table.update(saved)


def _leaves(start: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors a backward from ``start`` accumulates into."""
    found, seen, stack = {}, set(), [start.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad
        if isinstance(variable, torch.Tensor):
            found[id(variable)] = variable
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(found.values())


def _has_reentrant_checkpoint(outs) -> bool:
    seen, stack = set(), [o.grad_fn for o in outs if o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if type(node).__name__ == "CheckpointFunctionBackward":
            return True
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False
