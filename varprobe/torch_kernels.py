"""``kernels.sums`` in torch: the CPU path without numba.

The same function, arguments and accuracy as ``varprobe.kernels.sums`` (see there), on
the same numpy arrays (viewed as tensors without a copy): the sum is torch's (a cascade of
float32 partial sums), the sum of squares is taken in rows of ``BLOCK`` elements in the
data's precision, the rows added in float64. Up to ``SMALL`` elements (a bias, a norm's
weight, a small layer's activations) numpy's float64 sums instead: each torch op costs
~5 µs of dispatch, a few times what numpy's take there. Two reads of each tensor (a
row sum and a row norm) instead of numba's one, but torch's reductions use every
intra-op thread and nothing is loaded or compiled first (importing numba and loading
its cached kernels takes about a second per process). The per-unit counts have no torch
kernel of this kind: without numba they come from ``stats._units``.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK = 256
SMALL = 1 << 14  # elements: numpy's float64 sums 3-12 µs here against torch's 15-19


def sums(a: np.ndarray, shift, zero) -> tuple[float, float]:
    """(sum(d), sum(d^2)) of a 1-D array, d = a - shift."""
    if a.shape[0] <= SMALL:  # pairwise float64 sum, float64 dot
        d = a.astype(np.float64)
        if shift:
            d -= float(shift)
        with np.errstate(all="ignore"):  # inf - inf is NaN here as in torch, unannounced
            return float(d.sum()), _dot(d)
    t = torch.from_numpy(a)
    if shift:  # the mean dominates the spread: read again, from a shifted copy
        t = t - float(shift)
    # torch's float sum is a cascade of float32 partial sums (error ~ eps * log2(n))
    return t.sum().item(), _square_sum(t)


def square_sum(a: np.ndarray) -> float:
    """sum(a^2) of a 1-D array: ``sums``' second value without its first read (a weight
    gradient's norm needs no sum)."""
    if a.shape[0] <= SMALL:
        return _dot(a.astype(np.float64))
    return _square_sum(torch.from_numpy(a))


def _dot(d: np.ndarray) -> float:
    """sum(d^2) of a float64 array by numpy's own loop, not BLAS: numpy's OpenBLAS runs a
    dot of more than 10,000 elements on its own threads, which then spin for a while
    beside torch's and, with as many threads as cores, slow the next torch op ~100x
    (a 65,536-element row norm: 5 ms instead of 20 µs)."""
    return float(np.einsum("i,i->", d, d))


def _square_sum(t: torch.Tensor) -> float:
    """The squares go by row norms (no temporary), their squares added in float64 (the
    last square on the host: the same rounded float64 product, one op less). Fewer than
    BLOCK elements: no rows, whose norm would be 0."""
    n = t.numel()
    whole = n - n % BLOCK
    s2 = 0.0
    if whole:
        rows = (t if whole == n else t[:whole]).view(-1, BLOCK)
        norm = torch.linalg.vector_norm(torch.linalg.vector_norm(rows, dim=1),
                                        dtype=torch.float64).item()
        s2 = norm * norm
    if whole < n:
        s2 += float(t[whole:].double().square().sum())
    return s2
