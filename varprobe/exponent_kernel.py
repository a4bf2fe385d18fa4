"""Range kernels for dense CPU tensors (numba): abs max, smallest non-zero |x|, zeros,
non-finite elements, a histogram of ceil(log2|x|) and the counts at or past a few cuts.

float32 is read through its bits: for a positive float the bit pattern orders like the
value, so max, min and the cuts are integer compares, and ceil(log2|x|) is the exponent
field of the next float down (bits - 1) plus one. Two reads: the histogram's scattered
increments (``exponent_bins``) cannot run in vector lanes and the rest (``stats32``)
can; one loop doing both ran at half their combined speed. float64 goes through
``frexp``.
Exponents outside float32's range land in the end bins (below every flush cut, above
every overflow cut).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

LOW, HIGH = -149, 128  # precision.LOW/HIGH (kept free of imports: numba compiles this)
_OPTIONS = {"nogil": True, "boundscheck": False}


def _jit(fn):
    try:
        return njit(cache=True, **_OPTIONS)(fn)
    except RuntimeError:  # no cache locator: a read-only install without a home dir
        return njit(**_OPTIONS)(fn)


@_jit
def exponent_bins(a, hist):
    """``a`` the int32 view of a 1-D float32 array; ``hist`` (4, 257) int64 gets, per
    element, one count at (bits of |x| - 1) >> 23, plus 1: 0 for zero, 1 for 0 < |x| <=
    2^-126 (refined by ``small_bins``), f + 1 for |x| in (2^(f-127), 2^(f-126)], 255
    also for inf (the caller takes ``stats32``'s count off), 256 for NaN. Four rows
    taken in turn: consecutive elements usually land in the same bin, and one row would
    make each increment wait for the one before."""
    n = a.shape[0]
    quad = n - n % 4
    for i in range(0, quad, 4):
        hist[0, (((a[i] & 0x7FFFFFFF) - 1) >> 23) + 1] += 1
        hist[1, (((a[i + 1] & 0x7FFFFFFF) - 1) >> 23) + 1] += 1
        hist[2, (((a[i + 2] & 0x7FFFFFFF) - 1) >> 23) + 1] += 1
        hist[3, (((a[i + 3] & 0x7FFFFFFF) - 1) >> 23) + 1] += 1
    for i in range(quad, n):
        hist[0, (((a[i] & 0x7FFFFFFF) - 1) >> 23) + 1] += 1


@_jit
def stats32(a, c0, c1, c2, c3):
    """(amax bits over finite elements, min non-zero bits, infinities, then the count
    at or past each cut) of the int32 view of a float32 array: no branches, so that
    zeros scattered at random (after a ReLU) cost nothing."""
    amax = 0
    amin = 0x7F800000
    infs = 0
    o0 = 0
    o1 = 0
    o2 = 0
    o3 = 0
    for i in range(a.shape[0]):
        b = a[i] & 0x7FFFFFFF
        f = b if b < 0x7F800000 else 0
        amax = max(amax, f)
        amin = min(amin, b if b != 0 else 0x7F800000)
        infs += b == 0x7F800000
        o0 += f >= c0
        o1 += f >= c1
        o2 += f >= c2
        o3 += f >= c3
    return amax, amin, infs, o0, o1, o2, o3


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
