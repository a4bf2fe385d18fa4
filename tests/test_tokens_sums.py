"""theory.tokens' cumulative sums against numpy's own, on any square array."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from varprobe.theory import windowsums

# sizes below and above windowsums.SMALL (64 x 64): numpy's path and torch's
arrays = st.integers(1, 90).flatmap(lambda t: st.tuples(
    st.just(t), st.integers(0, 2**32 - 1), st.booleans()))


def _array(t: int, seed: int, read_only: bool) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(t, t))
    a.setflags(write=not read_only)
    return a


@settings(max_examples=60, deadline=None)
@given(arrays)
def test_cumsum_is_numpys(case):
    """The same sequential sums: equal to the last bit, forward and from the far end."""
    a = _array(*case)
    assert np.array_equal(windowsums.cumsum(a), a.cumsum(0).cumsum(1))
    assert np.array_equal(windowsums.cumsum(a, (1,)), a.cumsum(1))
    assert np.array_equal(windowsums.cumsum(a, (0,)), a.cumsum(0))
    assert np.array_equal(windowsums.cumsum(a, reverse=True),
                          a[::-1, ::-1].cumsum(0).cumsum(1)[::-1, ::-1])
    assert np.array_equal(windowsums.cumsum(a, (0,), reverse=True), a[::-1].cumsum(0)[::-1])
    assert np.array_equal(windowsums.cumsum(a, (1,), reverse=True), a[:, ::-1].cumsum(1)[:, ::-1])
    assert np.array_equal(windowsums.cumsum(a[::-1]), a[::-1].cumsum(0).cumsum(1))


@settings(max_examples=60, deadline=None)
@given(arrays)
def test_diag_sums_are_the_blocks(case):
    """D_m = the sum over the top-left (bottom-right) m + 1 block, by summing each block;
    the sums differ only in their order: float64 rounding, a few ulp of the absolute sum."""
    a = _array(*case)
    t = a.shape[0]
    top = np.array([a[:m + 1, :m + 1].sum() for m in range(t)])
    bottom = np.array([a[m:, m:].sum() for m in range(t)])
    scale = np.abs(a).sum()
    assert np.allclose(windowsums.diag_sums(a), top, rtol=0, atol=1e-13 * scale)
    assert np.allclose(windowsums.diag_sums(a, reverse=True), bottom, rtol=0, atol=1e-13 * scale)


@settings(max_examples=60, deadline=None)
@given(arrays, st.booleans())
def test_window_sums_are_the_masked_products(case, causal):
    """Sums over nested windows (query i sees the first T_i keys; causal: T_i = i + 1,
    else any counts up to T) against products with the window mask L: S Lᵀ and
    diag(L P) (L S Lᵀ of a Gram: test_gram_sums_are_the_masked_products). Only the
    order of the sums differs: a few ulp of the absolute sum."""
    a = _array(*case)
    t = a.shape[0]
    rng = np.random.default_rng(case[1] + 1)
    counts = np.arange(1.0, t + 1) if causal else rng.integers(1, t + 1, t).astype(float)
    counts[rng.integers(t)] = t  # some query sees every key
    mask = (np.arange(t)[None, :] < counts[:, None]).astype(float)
    scale = np.abs(a).sum()

    def close(x, y):
        return np.allclose(x, y, rtol=0, atol=1e-13 * scale)

    assert close(windowsums.row_window_sums(a, counts), a @ mask.T)
    assert close(windowsums.column_window_sums(a, counts), np.diag(mask @ a))


@settings(max_examples=60, deadline=None)
@given(arrays, st.booleans())
def test_gram_sums_are_the_masked_products(case, causal):
    """The sums of a symmetric array (a Gram) that use its symmetry (gram_*) against the
    masked products and the blocks: only the order of the sums differs, a few ulp of
    the absolute sum."""
    a = _array(*case)
    a = a + a.T
    t = a.shape[0]
    rng = np.random.default_rng(case[1] + 2)
    counts = np.arange(1.0, t + 1) if causal else rng.integers(1, t + 1, t).astype(float)
    counts[rng.integers(t)] = t
    mask = (np.arange(t)[None, :] < counts[:, None]).astype(float)
    scale = np.abs(a).sum()

    def close(x, y):
        return np.allclose(x, y, rtol=0, atol=1e-13 * scale)

    full = np.tril(np.ones((t, t)))
    assert close(windowsums.gram_cumsum(a), full @ a @ full.T)
    assert close(windowsums.gram_cumsum(a, reverse=True), full.T @ a @ full)
    assert close(windowsums.gram_diag_sums(a), [a[:m + 1, :m + 1].sum() for m in range(t)])
    assert close(windowsums.gram_diag_sums(a, reverse=True), [a[m:, m:].sum() for m in range(t)])
    assert close(windowsums.gram_window_sums(a, counts), mask @ a @ mask.T)
    assert close(windowsums.gram_window_diag(a, counts), np.diag(mask @ a @ mask.T))
