"""One-read range kernels for dense CPU tensors (numba): abs max, smallest non-zero
|x|, zeros, non-finite elements, a histogram of ceil(log2|x|) and the counts at or past
a few cuts.

float32 is read through its bits: for a positive float the bit pattern orders like the
value, so max, min and the cuts are integer compares, and ceil(log2|x|) is the exponent
field of the next float down (bits - 1) plus one. float64 goes through ``frexp``.
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
def _ceil_log2_small(bits):
    """ceil(log2 |x|) - LOW for 0 < |x| <= 2^-126 given as float32 bits (a count of
    2^-149 steps): the bit length of bits - 1."""
    n = bits - 1
    length = 0
    while n > 0:
        n >>= 1
        length += 1
    return length


@_jit
def ranges32(a, cuts, hist, over):
    """``a`` int32 view of a 1-D float32 array; ``cuts`` int32 bits of positive floats.
    Fills ``hist`` (HIGH - LOW + 1 bins) and ``over`` (per cut); returns (amax bits,
    min non-zero bits, zeros, non-finite). amax is -1 with no finite non-zero element."""
    amax = -1
    amin = 0x7F800000
    zeros = 0
    nonfinite = 0
    lowest = cuts.min()
    for i in range(a.shape[0]):
        b = a[i] & 0x7FFFFFFF
        if b == 0:
            zeros += 1
            continue
        if b >= 0x7F800000:
            nonfinite += 1
            continue
        amax = max(amax, b)
        amin = min(amin, b)
        field = (b - 1) >> 23
        if field == 0:
            hist[_ceil_log2_small(b)] += 1
        else:
            hist[field - 126 - LOW] += 1
        if b >= lowest:
            for j in range(cuts.shape[0]):
                over[j] += b >= cuts[j]
    return amax, amin, zeros, nonfinite


@_jit
def ranges64(a, cuts, hist, over):
    """``ranges32`` for a float64 array (values, not bits); amax -1.0 with no finite
    non-zero element."""
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
