"""Per-channel sum and sum of squares of a tensor, for what the recording measures per
channel (theory.normshape: a BatchNorm's input channels).

torch reduces a (N, C, H, W) tensor over dims (0, 2, 3) in strides across memory: its
norm over those dims reads at ~1.5 ns an element on one CPU thread, which made these
sums cost a third of a ResNet-50's recording. Laid out as (before, C, after) in memory,
each (n, c) row is contiguous: numba's kernel (``kernels.channel_sums``) reads every
element once, torch's row reductions twice; the rows are added in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from varprobe import stats


def channel_sums(x: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over everything but ``dim``, the same of x^2): two float64 vectors on x's
    device, no sync."""
    found = stats.kernel_array(x)
    if found is None:  # another device, or memory that is not dense: torch's reductions
        dims = [d for d in range(x.dim()) if d != dim]
        return (x.sum(dim=dims).double(),
                torch.linalg.vector_norm(x, dim=dims).double().square())
    array, order = found
    at = order.index(dim % x.dim())
    shape = (math.prod(array.shape[:at]), array.shape[at], math.prod(array.shape[at + 1:]))
    k = stats.cpu_kernels()
    if hasattr(k, "channel_sums") and shape[2] > 1:
        s1, s2 = np.zeros(shape[1]), np.zeros(shape[1])
        k.channel_sums(array.reshape(shape), array.dtype.type(0), s1, s2)
        return torch.from_numpy(s1), torch.from_numpy(s2)
    rows = torch.from_numpy(array).view(shape)
    if shape[2] == 1:  # channels innermost: column sums over the rows before them
        rows = rows[..., 0]
        return (rows.sum(0).double(),
                torch.linalg.vector_norm(rows, dim=0).double().square())
    return (rows.sum(-1).double().sum(0),
            torch.linalg.vector_norm(rows, dim=-1).double().square().sum(0))
