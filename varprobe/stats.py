"""On-device reductions: one small float64 vector per tensor, never a host sync.

Every vector has the same length (``WIDTH``) so that all of them can be stacked and
copied to the host in a single transfer after the backward pass.
"""

from __future__ import annotations

import torch

WIDTH = 8
# Forward slot layout.
MEAN, VAR, SECOND_MOMENT, ZERO_FRACTION, DEAD_FRACTION, NONFINITE, NUMEL = range(7)
# Gradient slot layout (reuses the first positions).
G_VAR, G_SECOND_MOMENT, G_NONFINITE, G_NUMEL = 0, 1, 2, 3
# Weight slot layout.
W_VAR, W_SECOND_MOMENT, B_SECOND_MOMENT, W_NORM = 0, 1, 2, 3


def _float(t: torch.Tensor) -> torch.Tensor:
    # fp16/bf16 moments overflow and cancel; float32 is exact enough for a variance ratio.
    return t.detach().float() if t.dtype in (torch.float16, torch.bfloat16) else t.detach()


def _pad(values: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    out = torch.zeros(WIDTH, dtype=torch.float64, device=device)
    out[: len(values)] = torch.stack([v.to(torch.float64) for v in values])
    return out


def activation(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """mean, var, E[x^2], zero fraction, dead-unit fraction, non-finite count, numel.

    A unit is one index along ``channel_dim`` (a feature or a conv channel); it is dead
    when it is zero for every sample and position.
    """
    x = _float(t)
    var, mean = torch.var_mean(x, correction=0)
    numel = x.new_tensor(float(x.numel()))
    nonzero = x.ne(0)
    zero_fraction = 1 - nonzero.sum() / numel
    if x.dim() >= 2:
        units = nonzero.movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim]).any(0)
        dead = 1 - units.float().mean()
    else:
        dead = zero_fraction.new_tensor(float("nan"))
    nonfinite = numel - torch.isfinite(x).sum()
    return _pad([mean, var, var + mean * mean, zero_fraction, dead, nonfinite, numel], x.device)


def gradient(g: torch.Tensor) -> torch.Tensor:
    """var, E[g^2], non-finite count, numel of a gradient tensor."""
    x = _float(g)
    var, mean = torch.var_mean(x, correction=0)
    numel = x.new_tensor(float(x.numel()))
    return _pad([var, var + mean * mean, numel - torch.isfinite(x).sum(), numel], x.device)


def weight(w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Var[w], E[w^2], mean(b^2) (NaN without bias), ||w||."""
    x = _float(w)
    var, mean = torch.var_mean(x, correction=0)
    b2 = _float(bias).square().mean() if bias is not None else x.new_tensor(float("nan"))
    return _pad([var, var + mean * mean, b2, torch.linalg.vector_norm(x)], x.device)


def grad_ratio(grad: torch.Tensor, w_norm: torch.Tensor) -> torch.Tensor:
    """||dL/dW|| / ||W||, in slot 0."""
    ratio = torch.linalg.vector_norm(_float(grad)).to(torch.float64) / w_norm.to(torch.float64)
    return _pad([ratio], grad.device)
