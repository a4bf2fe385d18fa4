"""A conv of ones over a profile, axis by axis: what theory.profile counts at every conv.

A kernel of ones is the product of one 1-D kernel of ones per spatial axis, so the
conv of a map e is e multiplied along each axis by a 0/1 matrix M (M[o, i] = 1 where
output o's tap lands on input i, stride, padding and dilation included), and the
transposed conv (the backward's count) is the same with each M transposed. On a
56x56 map that is two small matmuls in place of a torch conv and an autograd pass
(a tenth of the time), which matters because profiles differ from walk to walk and
node to node, so a one-shot probe computes nearly every conv's count afresh.
The counts of ones are integers (exact in float64); a profile's weighted sums round as
any other summation order does (within a few ulps of torch's conv).
"""

from __future__ import annotations

import functools

import numpy as np
from torch import nn


def matrices(module: nn.Module, spatial: tuple) -> tuple[np.ndarray, ...] | None:
    """One tap matrix per spatial axis of a non-transposed conv; None where another
    path counts (a transposed conv, an input too small for one output)."""
    if module.transposed:
        return None
    mats = tuple(_matrix(n, k, s, p, d) for n, k, s, p, d in zip(
        spatial, module.kernel_size, module.stride, module.padding, module.dilation))
    return None if any(m is None for m in mats) else mats


@functools.lru_cache(maxsize=1024)
def _matrix(n: int, k: int, s: int, p: int, d: int) -> np.ndarray | None:
    out = (n + 2 * p - d * (k - 1) - 1) // s + 1
    if out < 1:
        return None  # torch's conv raises here: the caller's torch path says so
    m = np.zeros((out, n))
    rows = np.arange(out)[:, None]
    cols = rows * s - p + d * np.arange(k)[None, :]
    inside = (cols >= 0) & (cols < n)
    m[np.broadcast_to(rows, cols.shape)[inside], cols[inside]] = 1.0
    m.flags.writeable = False  # shared by every caller of this geometry
    return m


def convolve(x: np.ndarray, mats: tuple[np.ndarray, ...]) -> np.ndarray:
    """The conv of ``x`` (the spatial shape) with a kernel of ones."""
    if len(mats) == 2:
        return mats[0] @ x @ mats[1].T
    for axis, m in enumerate(mats):
        x = np.moveaxis(np.tensordot(m, x, axes=(1, axis)), 0, axis)
    return x


def transposed(y: np.ndarray, mats: tuple[np.ndarray, ...]) -> np.ndarray:
    """The transposed conv of ``y`` (the output's spatial shape): each input position
    receives the sum over the outputs whose taps land on it."""
    if len(mats) == 2:
        return mats[0].T @ y @ mats[1]
    for axis, m in enumerate(mats):
        y = np.moveaxis(np.tensordot(m.T, y, axes=(1, axis)), 0, axis)
    return y
