"""One-read moment kernels for dense CPU tensors (numba).

torch has no reduction that returns a sum and a sum of squares from one read of a
tensor: on the CPU that is two passes (``sum``, then a norm), plus a compare pass and
per-unit max/min for the zero and dead-unit counts. These kernels read each element
from memory once and return all of them (the unit counts take a second loop over a
group of rows while it is still in cache). Elements are accumulated in
blocks of ``BLOCK`` in the data's own precision (float32 lanes: at most ``BLOCK`` terms
each, relative error below 256 * 6e-8 = 1.5e-5 in the worst case, about 1e-7 in
practice), blocks in float64.

Each takes ``a`` C-contiguous and ``zero`` of ``a``'s dtype, which types the block
accumulators; ``sums`` reads ``a - shift`` (``shift`` of that dtype too: the caller reads
again from the mean when the mean dominates the spread).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from varprobe.exponent_kernel import ROWS, sampled

BLOCK = 256
GROUP = 1 << 15  # elements (128 KiB of float32)
CHUNK = 1 << 12  # elements (16 KiB) whose sampled ones ``sums_extremes`` takes together
# Let LLVM reorder the additions so that they run in vector lanes; no assumptions about
# NaN or infinities, which must still reach the sums.
_OPTIONS = {"fastmath": {"reassoc", "contract"}, "nogil": True, "boundscheck": False}


def _jit(fn):
    """Compiled on first use, and cached on disk where numba can write (beside the
    package or in the user's cache); compiled anew in each process where it cannot."""
    try:
        return njit(cache=True, **_OPTIONS)(fn)
    except RuntimeError:  # no cache locator: a read-only install without a home dir
        return njit(**_OPTIONS)(fn)


@_jit
def sums(a, shift, zero):
    """(sum(d), sum(d^2)) of a 1-D array, d = a - shift."""
    s1 = 0.0
    s2 = 0.0
    for start in range(0, a.shape[0], BLOCK):
        block = a[start:start + BLOCK]
        b1 = zero
        b2 = zero
        for i in range(block.shape[0]):
            d = block[i] - shift
            b1 += d
            b2 += d * d
        s1 += b1
        s2 += b2
    return s1, s2


@_jit
def sums_extremes(a, bits, shift, zero, idx, hist):
    """``sums`` of a float32 array and, in the same read, the range statistics' reads
    of it (``--precision``): ``exponent_kernel.extremes`` of ``bits``, its int32 view,
    and ``exponent_kernel.sample_bins`` of ``bits[idx]`` (``idx`` sorted, possibly
    empty) into ``hist`` (``ROWS`` rows), the sampled elements of each ``CHUNK`` taken
    while it is in cache: per chunk, not per block, since leaving the sample's loop
    mispredicts a branch, about as much as the few elements a block holds cost."""
    s1 = 0.0
    s2 = 0.0
    top = np.int32(0)
    low = np.int32(0x7FFFFFFF)
    p = 0
    m = idx.shape[0]
    n = a.shape[0]
    for chunk in range(0, n, CHUNK):
        stop = min(chunk + CHUNK, n)
        for start in range(chunk, stop, BLOCK):  # ``sums``' blocks, the same sums
            block = a[start:start + BLOCK]
            ints = bits[start:start + BLOCK]
            b1 = zero
            b2 = zero
            for i in range(block.shape[0]):
                d = block[i] - shift
                b1 += d
                b2 += d * d
                b = np.int32(ints[i] & np.int32(0x7FFFFFFF))
                if b > top:
                    top = b
                c = np.int32((b - np.int32(1)) & np.int32(0x7FFFFFFF))
                if c < low:
                    low = c
            s1 += b1
            s2 += b2
        while p + ROWS <= m and idx[p + ROWS - 1] < stop:
            for j in range(ROWS):
                b = bits[idx[p + j]] & 0x7FFFFFFF
                hist[j, ((b - 1) >> 23) + 1] += 1
            p += ROWS
        while p < m and idx[p] < stop:
            b = bits[idx[p]] & 0x7FFFFFFF
            hist[0, ((b - 1) >> 23) + 1] += 1
            p += 1
    return s1, s2, top, low


@_jit
def unit_sums_first(a, zero, nonzero):
    """(sum(a), sum(a^2)) of an (N, C, L) array, units along C: ``nonzero[c]`` gets the
    count of non-zero elements of ``a[:, c]`` (a conv's channels)."""
    s1 = 0.0
    s2 = 0.0
    flat = a.reshape(-1)
    units, length = a.shape[1], a.shape[2]
    group = max(1, GROUP // length)  # rows read twice while they are in cache
    for n in range(a.shape[0]):
        for first in range(0, units, group):
            last = min(first + group, units)
            r1, r2 = sums(flat[(n * units + first) * length:(n * units + last) * length],
                               zero, zero)
            s1 += r1
            s2 += r2
            for c in range(first, last):
                row = a[n, c]
                count = 0
                for i in range(row.shape[0]):
                    count += row[i] != 0
                nonzero[c] += count
    return s1, s2


@_jit
def unit_sums_last(a, zero, nonzero):
    """(sum(a), sum(a^2)) of an (N, U) array, units along U: ``nonzero[u]`` gets the
    count of non-zero elements of ``a[:, u]`` (a Linear's features)."""
    s1 = 0.0
    s2 = 0.0
    flat = a.reshape(-1)
    units = a.shape[1]
    group = max(1, GROUP // units)  # rows read twice while they are in cache
    for first in range(0, a.shape[0], group):
        last = min(first + group, a.shape[0])
        r1, r2 = sums(flat[first * units:last * units], zero, zero)
        s1 += r1
        s2 += r2
        for n in range(first, last):
            row = a[n]
            for u in range(units):
                nonzero[u] += row[u] != 0
    return s1, s2


@_jit
def _group_extremes(flat, bits, zero, idx, hist, lo, hi, p):
    """``sums`` of ``flat[lo:hi]`` and then, while it is in cache, the range kernels'
    ``sampled`` read of it (``bits`` its int32 view), the sampled indices from
    ``idx[p]`` on that fall in it shifted to it; and the next ``p``. (Not
    ``sums_extremes``, whose sums LLVM may add in another order: the units' sums stay
    those of a read without the range reads.)"""
    q = p
    while q < idx.shape[0] and idx[q] < hi:
        q += 1
    s1, s2 = sums(flat[lo:hi], zero, zero)
    top, low = sampled(bits[lo:hi], idx[p:q] - lo, hist)
    return s1, s2, top, low, q


@_jit
def unit_sums_first_extremes(a, bits, zero, nonzero, idx, hist):
    """``unit_sums_first`` and, from the same read, ``sums_extremes``' range reads:
    (sum, sum of squares, bits of the largest |x|, bits of the smallest non-zero |x|
    minus one); ``bits`` the int32 view of ``a`` flat, ``idx`` sorted."""
    s1 = 0.0
    s2 = 0.0
    top = np.int32(0)
    low = np.int32(0x7FFFFFFF)
    p = 0
    flat = a.reshape(-1)
    units, length = a.shape[1], a.shape[2]
    group = max(1, GROUP // length)
    for n in range(a.shape[0]):
        for first in range(0, units, group):
            last = min(first + group, units)
            r1, r2, t, lo, p = _group_extremes(flat, bits, zero, idx, hist,
                                               (n * units + first) * length,
                                               (n * units + last) * length, p)
            s1 += r1
            s2 += r2
            top = max(top, t)
            low = min(low, lo)
            for c in range(first, last):
                row = a[n, c]
                count = 0
                for i in range(row.shape[0]):
                    count += row[i] != 0
                nonzero[c] += count
    return s1, s2, top, low


@_jit
def unit_sums_last_extremes(a, bits, zero, nonzero, idx, hist):
    """``unit_sums_last`` with ``sums_extremes``' range reads, as
    ``unit_sums_first_extremes``."""
    s1 = 0.0
    s2 = 0.0
    top = np.int32(0)
    low = np.int32(0x7FFFFFFF)
    p = 0
    flat = a.reshape(-1)
    units = a.shape[1]
    group = max(1, GROUP // units)
    for first in range(0, a.shape[0], group):
        last = min(first + group, a.shape[0])
        r1, r2, t, lo, p = _group_extremes(flat, bits, zero, idx, hist, first * units,
                                           last * units, p)
        s1 += r1
        s2 += r2
        top = max(top, t)
        low = min(low, lo)
        for n in range(first, last):
            row = a[n]
            for u in range(units):
                nonzero[u] += row[u] != 0
    return s1, s2, top, low


@_jit
def channel_sums(a, zero, s1, s2):
    """Per unit c of an (N, C, L) array, L > 1: ``s1[c]`` += sum(a[:, c]) and
    ``s2[c]`` += sum(a[:, c]^2), in ``sums``' blocks (a BatchNorm's input channels)."""
    flat = a.reshape(-1)
    units, length = a.shape[1], a.shape[2]
    for n in range(a.shape[0]):
        for c in range(units):
            start = (n * units + c) * length
            r1, r2 = sums(flat[start:start + length], zero, zero)
            s1[c] += r1
            s2[c] += r2
