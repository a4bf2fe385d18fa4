"""Range kernels for dense CPU tensors (numba): abs max, smallest non-zero |x|, zeros,
non-finite elements, a histogram of ceil(log2|x|) and the counts at or past a few cuts.

float32 is read through its bits: for a positive float the bit pattern orders like the
value, so max, min and the cuts are integer compares, and ceil(log2|x|) is the exponent
field of the next float down (bits - 1) plus one. One read (``exponent_bins``), and a
second only for the rare tensor that reaches an overflow cut; for a large tensor, one
vector read for the extremes (``extremes``) and ``exponent_bins`` over a sample.
float64 goes through ``frexp``.
Exponents outside float32's range land in the end bins (below every flush cut, above
every overflow cut).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

LOW, HIGH = -149, 128  # precision.LOW/HIGH (kept free of imports: numba compiles this)
ROWS = 8  # histogram rows exponent_bins takes in turn
BLOCK = 1 << 12  # elements ``sampled`` reads before taking the sample's among them
_OPTIONS = {"nogil": True, "boundscheck": False}


def _jit(fn):
    try:
        return njit(cache=True, **_OPTIONS)(fn)
    except RuntimeError:  # no cache locator: a read-only install without a home dir
        return njit(**_OPTIONS)(fn)


@_jit
def exponent_bins(a, hist):
    """``a`` the int32 view of a 1-D float32 array; ``hist`` (ROWS, 257) int64 gets,
    per element, one count at (bits of |x| - 1) >> 23, plus 1: 0 for zero, 1 for 0 <
    |x| <= 2^-126 (refined by ``small_bins``), f + 1 for |x| in (2^(f-127), 2^(f-126)],
    255 also for inf (``cut_counts`` counts those), 256 for NaN. Returns the bits of
    the largest finite and the smallest non-zero |x|.

    Rows taken in turn: consecutive elements usually land in the same bin, and one row
    would make each increment wait for the one before; the max and min ride along in
    the slots those increments leave free. No branches: zeros scattered at random
    (after a ReLU) cost nothing."""
    n = a.shape[0]
    whole = n - n % ROWS
    amax = 0
    amin = 0x7F800000
    for i in range(0, whole, ROWS):
        for j in range(ROWS):
            b = a[i + j] & 0x7FFFFFFF
            hist[j, ((b - 1) >> 23) + 1] += 1
            amax = max(amax, b if b < 0x7F800000 else 0)
            amin = min(amin, b if b != 0 else 0x7F800000)
    for i in range(whole, n):
        b = a[i] & 0x7FFFFFFF
        hist[0, ((b - 1) >> 23) + 1] += 1
        amax = max(amax, b if b < 0x7F800000 else 0)
        amin = min(amin, b if b != 0 else 0x7F800000)
    return amax, amin


@_jit
def sample_bins(a, idx, hist):
    """``exponent_bins``' counts (without the extremes) of the elements ``a[idx]``,
    gathered in the same loop."""
    n = idx.shape[0]
    whole = n - n % ROWS
    for i in range(0, whole, ROWS):
        for j in range(ROWS):
            b = a[idx[i + j]] & 0x7FFFFFFF
            hist[j, ((b - 1) >> 23) + 1] += 1
    for i in range(whole, n):
        b = a[idx[i]] & 0x7FFFFFFF
        hist[0, ((b - 1) >> 23) + 1] += 1


@_jit
def extremes(a):
    """(bits of the largest |x|, bits of the smallest non-zero |x| minus one) of the
    int32 view of a float32 array; inf and NaN count as the largest (past 0x7F800000),
    zero as 2^31 - 1 in the second. Compares and selects only, so that they run in
    vector lanes: a tenth of ``exponent_bins``' time per element."""
    top = np.int32(0)
    low = np.int32(0x7FFFFFFF)
    for i in range(a.shape[0]):
        b = np.int32(a[i] & np.int32(0x7FFFFFFF))
        if b > top:
            top = b
        c = np.int32((b - np.int32(1)) & np.int32(0x7FFFFFFF))
        if c < low:
            low = c
    return top, low


@_jit
def sampled(a, idx, hist):
    """``extremes`` of every element and ``sample_bins`` of ``a[idx]`` (``idx`` sorted)
    in one read: block by block, the sample's elements taken while the block is in
    cache (a sorted sample of a tenth of the elements touches most cache lines, so
    gathered apart it costs another read of the tensor)."""
    top = np.int32(0)
    low = np.int32(0x7FFFFFFF)
    n = a.shape[0]
    m = idx.shape[0]
    p = 0
    for start in range(0, n, BLOCK):
        t, lo = extremes(a[start:start + BLOCK])
        top = max(top, t)
        low = min(low, lo)
        end = min(start + BLOCK, n)
        while p + ROWS <= m and idx[p + ROWS - 1] < end:
            for j in range(ROWS):
                b = a[idx[p + j]] & 0x7FFFFFFF
                hist[j, ((b - 1) >> 23) + 1] += 1
            p += ROWS
        while p < m and idx[p] < end:
            b = a[idx[p]] & 0x7FFFFFFF
            hist[0, ((b - 1) >> 23) + 1] += 1
            p += 1
    return top, low


@_jit
def cut_counts(a, c0, c1, c2, c3):
    """(infinities, then the count of finite |x| at or past each cut) of the int32
    view of a float32 array, cuts as bits. Run only when some element can reach a cut
    or be infinite (the largest finite |x| past the lowest cut, or anything in the top
    bin): usually never."""
    infs = 0
    o0 = 0
    o1 = 0
    o2 = 0
    o3 = 0
    for i in range(a.shape[0]):
        b = a[i] & 0x7FFFFFFF
        f = b if b < 0x7F800000 else 0
        infs += b == 0x7F800000
        o0 += f >= c0
        o1 += f >= c1
        o2 += f >= c2
        o3 += f >= c3
    return infs, o0, o1, o2, o3


@_jit
def small_bins(a, hist):
    """ceil(log2|x|) - LOW counts of the elements with 0 < |x| <= 2^-126 (float32
    subnormals, and 2^-126 itself): a count of 2^-149 steps, whose bit length minus
    one's gives the exponent. Run only when there are such elements."""
    for i in range(a.shape[0]):
        b = a[i] & 0x7FFFFFFF
        if 0 < b <= 0x800000:
            n = b - 1
            length = 0
            while n > 0:
                n >>= 1
                length += 1
            hist[length] += 1


@_jit
def ranges64(a, cuts, hist, over):
    """(amax, min non-zero, zeros, non-finite) of a float64 array, filling ``hist``
    (BINS) and ``over`` (per cut, |x| >= cut); amax -1.0 with no finite non-zero
    element. Rare (float64 models), so one plain loop."""
    amax = -1.0
    amin = np.inf
    zeros = 0
    nonfinite = 0
    lowest = cuts.min()
    for i in range(a.shape[0]):
        v = abs(a[i])
        if v == 0:
            zeros += 1
            continue
        if not v < np.inf:
            nonfinite += 1
            continue
        amax = max(amax, v)
        amin = min(amin, v)
        m, e = math.frexp(v)
        k = e - 1 if m == 0.5 else e
        hist[min(max(k, LOW), HIGH) - LOW] += 1
        if v >= lowest:
            for j in range(cuts.shape[0]):
                over[j] += v >= cuts[j]
    return amax, amin, zeros, nonfinite
