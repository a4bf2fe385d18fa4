"""The backward pass's start: one scalar whose gradient w.r.t. each output is exactly
that output's cotangent, so that ``torch.autograd.grad`` needs no ``grad_outputs``.

Given ``grad_outputs``, autograd checks each one's shape through
``torch.fx.experimental.symbolic_shapes``, whose first import (sympy with it) costs
about 0.6 s of a process: more than the whole probe of a small model, and more than a
training script that calls ``loss.backward()`` ever pays. ``paired``'s backward hands
each output its cotangent itself (the same memory, as autograd's own start does), so
the gradients are bit for bit those of ``autograd.grad(outs, wrt, cotangents)``.
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
