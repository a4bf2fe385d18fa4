"""``kernels.sums`` in torch: the CPU path without numba.

The same function, arguments and accuracy as ``varprobe.kernels.sums`` (see there), on
the same numpy arrays (viewed as tensors without a copy): sums in blocks of ``BLOCK``
elements in the data's precision, blocks added in float64. Two reads of each tensor (a
row sum and a row norm) instead of numba's one, but torch's reductions use every
intra-op thread and nothing is loaded or compiled first (importing numba and loading
its cached kernels takes about a second per process). The per-unit counts have no torch
kernel of this kind: without numba they come from ``stats._units``.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK = 256


def _blocks(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` (1-D) as rows of ``BLOCK``, and the elements left over."""
    whole = t.numel() - t.numel() % BLOCK
    return t[:whole].view(-1, BLOCK), t[whole:]


def sums(a: np.ndarray, shift, zero) -> tuple[float, float]:
    """(sum(d), sum(d^2)) of a 1-D array, d = a - shift."""
    t = torch.from_numpy(a)
    if shift:  # the mean dominates the spread: read again, from a shifted copy
        t = t - float(shift)
    rows, rest = _blocks(t)
    s1 = rows.sum(1, dtype=t.dtype).sum(dtype=torch.float64) + rest.double().sum()
    norms = torch.linalg.vector_norm(rows, dim=1)
    s2 = torch.linalg.vector_norm(norms, dtype=torch.float64).square() + \
        rest.double().square().sum()
    return float(s1), float(s2)
