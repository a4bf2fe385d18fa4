"""The range kernels without numba (``torch_exponent_kernel``) against float
arithmetic: extremes and exponent histograms of float32 bit patterns of every kind
(zeros of both signs, subnormals, normals, inf, NaN), in one chunk and across several,
in numpy's small-array path and torch's chunked one."""

from __future__ import annotations

from unittest import mock

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from varprobe import torch_exponent_kernel as k

INF_BITS = 0x7F800000
KINDS = st.sampled_from([0, -0x80000000, 1, 0x7FFFFF, 0x800000, 0x3F800000, 0x7F7FFFFF,
                         INF_BITS, -0x800000, 0x7FC00000, -1])
PATTERNS = st.lists(st.one_of(st.integers(-2 ** 31, 2 ** 31 - 1), KINDS),
                    min_size=1, max_size=300)


def magnitudes(bits: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # NaN's cast
        return np.abs(bits.view(np.float32).astype(np.float64))


def want_extremes(bits: np.ndarray) -> tuple[float, float]:
    """(largest |x|, NaN if any; smallest non-zero |x| other than NaN, None if none:
    inf counts, as the kernels' bits compare)."""
    a = magnitudes(bits)
    live = a[(a != 0) & ~np.isnan(a)]
    return np.nan if np.isnan(a).any() else a.max(), live.min() if live.size else None


def as_float(bits: int) -> float:
    return float(np.array([bits], dtype=np.int32).view(np.float32)[0])


@settings(max_examples=300, deadline=None)
@given(PATTERNS, st.sampled_from([16, 64, k.CHUNK]))
def test_extremes_are_the_largest_and_smallest_nonzero_magnitudes(values, chunk):
    bits = np.array(values, dtype=np.int32)
    with mock.patch.object(k, "CHUNK", chunk):
        top, low = k.extremes(bits)
    largest, smallest = want_extremes(bits)
    if np.isnan(largest):
        assert top > INF_BITS
    else:
        assert as_float(top) == largest and top <= INF_BITS
    if smallest is not None:
        assert as_float(low + 1) == smallest
    elif np.isnan(largest):  # NaN, as bits, is past inf
        assert low + 1 > INF_BITS
    else:
        assert low == 0x7FFFFFFF


def want_bins(bits: np.ndarray) -> np.ndarray:
    """0: zero; 256: NaN; else ceil(log2|x|) + 127 clipped to 1..255 (frexp's
    exponent, one less at an exact power of two; inf in 255)."""
    a = magnitudes(bits)
    m, e = np.frexp(np.where(np.isfinite(a), a, 1.0))
    ceil = np.where(m == 0.5, e - 1, e)
    field = np.where(np.isinf(a), 255, np.clip(ceil + 127, 1, 255))
    field = np.where(a == 0, 0, np.where(np.isnan(a), 256, field))
    return np.bincount(field, minlength=257)


@settings(max_examples=300, deadline=None)
@given(PATTERNS, st.sampled_from([0, 1 << 15]), st.sampled_from([64, k.CHUNK]))
def test_exponent_bins_count_ceil_log2(values, small, chunk):
    """numpy's path (up to SMALL elements) and torch's chunks give the same counts and
    extremes (the largest finite |x|, the smallest non-zero)."""
    bits = np.array(values, dtype=np.int32)
    rows = np.zeros((k.ROWS, 257), dtype=np.int64)
    with mock.patch.object(k, "SMALL", small), mock.patch.object(k, "CHUNK", chunk):
        finite, nonzero = k.exponent_bins(bits, rows)
    assert np.array_equal(rows.sum(0), want_bins(bits))
    a = magnitudes(bits)
    kept = a[np.isfinite(a)]
    assert as_float(finite) == (kept.max() if kept.size else 0.0)
    live = kept[kept > 0]
    assert (as_float(nonzero) == live.min()) if live.size else nonzero == INF_BITS


@settings(max_examples=100, deadline=None)
@given(PATTERNS, st.data())
def test_sample_bins_count_the_drawn_elements(values, data):
    bits = np.array(values, dtype=np.int32)
    idx = np.sort(np.array(data.draw(st.lists(st.integers(0, len(values) - 1),
                                              min_size=1, max_size=50))))
    rows = np.zeros((k.ROWS, 257), dtype=np.int64)
    k.sample_bins(bits, idx, rows)
    assert np.array_equal(rows.sum(0), want_bins(bits[idx]))
