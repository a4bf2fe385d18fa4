"""The diagonal gradient Grams (theory.diagonal) sum with others as the dense sums do."""

import numpy as np

from varprobe.theory import diagonal, tokens


def _dense_blend(a, wa, b, wb):
    out = wa * a
    out += wb * b
    out /= wa + wb
    return out


def test_diagonal_grams_blend_as_the_dense_sum_bit_for_bit():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 40))
    full = x @ x.T / 40
    d = diagonal.normalized(rng.random(40) + 0.1)
    assert diagonal.marked(d) and not diagonal.marked(full) and not diagonal.marked(d.copy())
    np.testing.assert_array_equal(d, np.diag(np.diag(d)))
    dense = np.diag(np.diag(d))
    for a, b in ((full, d), (d, full), (d, d)):
        got = tokens.blend(a, 0.3, b, 1.7)
        want = _dense_blend(dense if a is d else a, 0.3, dense if b is d else b, 1.7)
        np.testing.assert_array_equal(got, want)


def test_diagonal_normalized_is_the_dense_normalization():
    x = np.array([0.5, 2.0, 1e-3, 3.25])
    want = tokens.normalized(np.diag(x))[0]
    np.testing.assert_array_equal(diagonal.normalized(x), want)
    assert diagonal.normalized(np.zeros(4)) is None
    assert diagonal.normalized(np.array([1.0, np.nan])) is None
