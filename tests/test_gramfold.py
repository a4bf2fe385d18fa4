"""theory.gramfold's folded Gram steps against the plain ones they replace: the rule's
T x T result, then divided by its mean diagonal. Only the order of the products differs
(a scale folded in before a product rather than after): a few ulp per entry, so each
result within 1e-13 of the largest entry."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from varprobe.theory import gramfold

cases = st.tuples(st.integers(1, 90), st.integers(0, 2**32 - 1))


def _gram(t: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(t, 2 * t + 3)) + 0.5
    return x @ x.T / x.shape[1]


def _normalized(x: np.ndarray) -> np.ndarray:
    return x / (np.trace(x) / x.shape[0])


def _close(got, want) -> bool:
    return got is not None and np.allclose(got, want, rtol=0, atol=1e-13 * np.abs(want).max())


@settings(max_examples=40, deadline=None)
@given(cases, st.floats(0.01, 5), st.floats(0, 3), st.floats(0, 2))
def test_mix_and_product(case, w, shared, own):
    a, b = _gram(*case), _gram(case[0], case[1] + 1)
    t = a.shape[0]
    assert _close(gramfold.mix([(w, a), (1.5, b)], shared, own),
                  _normalized(w * a + 1.5 * b + shared + own * np.eye(t)))
    assert _close(gramfold.mix([(w, a)], shared), _normalized(w * a + shared))
    assert _close(gramfold.product(a, b), _normalized(a * b))
    assert _close(gramfold.lerp(a, b, 0.3), 0.7 * a + 0.3 * b)


@settings(max_examples=40, deadline=None)
@given(cases, st.floats(0, 2))
def test_outer_scaled(case, shared):
    s = _gram(*case)
    v = np.random.default_rng(case[1] + 3).uniform(0.2, 3, s.shape[0])
    assert _close(gramfold.outer_scaled(s, v, shared), _normalized(s * np.outer(v, v) + shared))


@settings(max_examples=40, deadline=None)
@given(cases, st.integers(1, 40))
def test_kernel_map_is_interp(case, n):
    """The table read on its uniform grid by cell against np.interp's search, over
    correlations in [0, 1] with both ends and the grid points themselves among them."""
    t, seed = case
    rng = np.random.default_rng(seed)
    rho = rng.uniform(0, 1, (t, t))
    rho.flat[::7] = rng.integers(0, n + 1, rho.flat[::7].size) / n
    rho[0, 0], rho[-1, -1] = 0.0, 1.0
    table = np.cumsum(rng.uniform(0.1, 1, n + 1))
    factor = _gram(t, seed + 4)
    want = _normalized(np.interp(rho, np.linspace(0, 1, n + 1), table) * factor)
    assert _close(gramfold.kernel_map(gramfold.cells(rho.copy(), n), table, factor), want)


def test_kernel_map_carries_nan():
    rho = np.full((3, 3), 0.5)
    rho[0, 1] = np.nan
    out = gramfold.kernel_map(gramfold.cells(rho, 4), np.linspace(1, 2, 5), np.ones((3, 3)))
    assert np.isnan(out[0, 1]) and np.isfinite(np.delete(out.ravel(), 1)).all()


@pytest.mark.parametrize("rule", ["mix", "product", "outer"])
def test_no_shape_without_a_positive_diagonal(rule):
    z = np.zeros((4, 4))
    out = {"mix": lambda: gramfold.mix([(1.0, z)]), "product": lambda: gramfold.product(z, z),
           "outer": lambda: gramfold.outer_scaled(z, np.ones(4))}[rule]()
    assert out is None


@pytest.mark.parametrize("counts", [np.arange(1.0, 9.0), np.array([3.0, 1, 5, 1, 8, 2, 8, 1])])
def test_pair_weights_are_the_docstring_rule(counts):
    """theory.tokens.pair_weights (fused, from cached reciprocals) against its rule
    entry by entry: b_ik = O_ik/min(T_i, T_k) (O_ii = P₂ᵢ, b_ii × keep), a_ik = (1 -
    O_ik)/(T_i T_k - min(T_i, T_k)), 0 where there are no such pairs; O_ik =
    e/(e + max(T_i, T_k) - 1), e = exp(r(1 - r)s²). Rounding only: 1e-14."""
    from varprobe.theory import tokens
    p2i, s2, r, keep = np.linspace(0.2, 0.9, counts.size), 2.0, 0.3, 1.25
    a, extra = tokens.pair_weights(counts, p2i, s2, r, keep)
    e = math.exp(r * (1 - r) * s2)
    t = counts.size
    want_a, want_b = np.zeros((t, t)), np.zeros((t, t))
    for i in range(t):
        for k in range(t):
            o = p2i[i] if i == k else e / (e + max(counts[i], counts[k]) - 1)
            shared = min(counts[i], counts[k])
            rest = counts[i] * counts[k] - shared
            want_b[i, k] = o / shared * (keep if i == k else 1)
            want_a[i, k] = (1 - o) / rest if rest > 0 else 0.0
    assert np.allclose(a, want_a, rtol=1e-14, atol=0)
    assert np.allclose(extra, want_b - want_a, rtol=1e-14, atol=1e-16)
