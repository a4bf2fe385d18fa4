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
