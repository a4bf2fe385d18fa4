"""Sums of a token Gram over nested attention windows (theory.tokens' attention rules).

Query i sees the first T_i keys (``counts``), so every window sum is a cumulative sum
read at T_i - 1. With causal counts (1, 2, ..., T) that read is the identity: the sums
are used as they come, no T x T gather. Large arrays go through torch's cumulative sums
(the same sequential sums as numpy's, several times faster at T = 256).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from varprobe.theory import keyindex


def windows(counts: np.ndarray) -> np.ndarray:
    """L[i, j] = 1 where query i sees key j (nested windows: the first counts[i])."""
    return _windows(np.asarray(counts, dtype=np.float64).tobytes())


@functools.lru_cache(maxsize=64)
def _windows(key: bytes) -> np.ndarray:
    counts = np.frombuffer(key, dtype=np.float64)
    keys = int(counts.max())
    out = (np.arange(keys)[None, :] < counts[:, None]).astype(np.float64)
    out.setflags(write=False)
    return out


SMALL = 4096  # elements: below, numpy (torch's per-call cost is more than it saves)


def cumsum(a: np.ndarray, axes: tuple[int, ...] = (0, 1), reverse: bool = False
           ) -> np.ndarray:
    """Cumulative sums of a float64 array along ``axes`` in turn (from the far end when
    ``reverse``). Large ones by torch: the same sequential sums as numpy's, 3-5x faster
    at T = 256 (numpy's along the first axis ~0.7 ms there)."""
    if a.size < SMALL:
        out = np.flip(a, axes) if reverse else a
        for axis in axes:
            out = out.cumsum(axis)
        return np.flip(out, axes) if reverse else out
    t = torch_view(a)
    if reverse:
        t = t.flip(axes)
    for axis in axes:
        # along the first axis of a matrix, torch's sums run ~2x faster over the
        # transposed view (the same sums in the same order)
        t = t.T.cumsum(1).T if axis == 0 and t.dim() == 2 else t.cumsum(axis)
    return (t.flip(axes) if reverse else t).numpy()


def diag_sums(s: np.ndarray, reverse: bool = False) -> np.ndarray:
    """D_m = Σ_{j, l ≤ m} S_jl (≥ m when ``reverse``): the diagonal of the 2-D cumulative
    sum, from each row's and column's part of the L-shaped step between m - 1 and m (below
    SMALL the whole 2-D sum's diagonal: fewer calls, half the time at T = 32)."""
    if s.size < SMALL:
        return np.diag(cumsum(s, reverse=reverse)).copy()
    rows, columns = _triangles(s.shape[0], reverse)  # a product by a mask: ~2x tril's speed
    step = torch_view(np.multiply(s, rows, order="C")).sum(1) + \
        torch_view(np.multiply(s, columns, order="C")).sum(0)
    if reverse:
        return step.flip(0).cumsum(0).flip(0).numpy()
    return step.cumsum(0).numpy()


@functools.lru_cache(maxsize=16)
def _triangles(size: int, reverse: bool) -> tuple[np.ndarray, np.ndarray]:
    """The masks of diag_sums' row and column parts: the lower triangle with the
    diagonal and the upper without it (the other way round when ``reverse``)."""
    ones = np.ones((size, size))
    out = (np.triu(ones), np.tril(ones, -1)) if reverse else (np.tril(ones), np.triu(ones, 1))
    for x in out:
        x.setflags(write=False)
    return out


def viewable(a: np.ndarray) -> bool:
    """Whether torch can view ``a`` as it is: writeable, no negative strides."""
    return a.flags.writeable and min(a.strides, default=1) > 0


def torch_view(a: np.ndarray) -> torch.Tensor:
    """torch's view of ``a`` (a copy where torch cannot view it: read-only, reversed)."""
    return torch.from_numpy(a if viewable(a) else a.copy())


def gram_cumsum(s: np.ndarray, reverse: bool = False) -> np.ndarray:
    """cumsum(s) of a symmetric s (a Gram; up to the order of the sums). The 2-D sum
    C = cumsum₀(cumsum₁(S)) is the transpose of cumsum₁(cumsum₁(S)ᵀ) for any S, and its
    own transpose for a symmetric one: two passes along rows, the faster direction,
    and a contiguous result."""
    if s.size < SMALL:
        return cumsum(s, reverse=reverse)
    t = torch_view(s)
    if reverse:
        t = t.flip((0, 1))
    t = t.cumsum(1).T.cumsum(1)
    return (t.flip((0, 1)) if reverse else t).numpy()


def gram_diag_sums(s: np.ndarray, reverse: bool = False) -> np.ndarray:
    """diag_sums(s) of a symmetric s (up to the order of the sums): the L-shaped step
    between m - 1 and m is S_mm plus twice row m's part before it (after it when
    ``reverse``), one masked row sum where diag_sums takes a row and a column one."""
    if s.size < SMALL:
        return diag_sums(s, reverse)
    step = np.einsum("ij,ij->i", s, _strict(s.shape[0], reverse))
    step *= 2
    step += np.diag(s)
    return np.ascontiguousarray(step[::-1].cumsum()[::-1]) if reverse else step.cumsum()


@functools.lru_cache(maxsize=16)
def _strict(size: int, reverse: bool) -> np.ndarray:
    """The strict lower triangle's mask (the upper's when ``reverse``)."""
    ones = np.ones((size, size))
    out = np.triu(ones, 1) if reverse else np.tril(ones, -1)
    out.setflags(write=False)
    return out


def gram_window_sums(s: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(L S Lᵀ)_ik = Σ_{j < T_i, l < T_k} S_jl of a symmetric S, by a 2-D cumulative sum
    (nested windows)."""
    index = keyindex.index(counts)
    return gram_cumsum(s) if index.causal else gram_cumsum(s)[index.grid]


def gram_window_diag(s: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """diag(L S Lᵀ) of a symmetric S: the sum of S over each query's window."""
    index = keyindex.index(counts)
    return gram_diag_sums(s) if index.causal else gram_diag_sums(s)[index.at]


def row_window_sums(s: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """R[j, i] = Σ_{l < T_i} S_jl: row j of S summed over query i's window."""
    index = keyindex.index(counts)
    return cumsum(s, (1,)) if index.causal else cumsum(s, (1,))[:, index.at]


def column_window_sums(p: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Σ_{j < T_i} P[j, i]: column i of P summed over query i's window (a masked column
    sum in one pass, not the whole first-axis cumulative sum)."""
    return np.einsum("ji,ji->i", p, _columns(np.asarray(counts, dtype=np.float64).tobytes()))


@functools.lru_cache(maxsize=64)
def _columns(key: bytes) -> np.ndarray:
    """Lᵀ, contiguous: M[j, i] = 1 where query i sees key j."""
    out = np.ascontiguousarray(_windows(key).T)
    out.setflags(write=False)
    return out


def causal_windows(counts: np.ndarray) -> bool:
    return keyindex.index(counts).causal
