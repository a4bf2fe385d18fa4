"""Token-correlation rules (varprobe.theory.correlation) against sampling.

The closed forms of attention.md §3.7 are exact for their stated inputs (zero-mean
weights independent of the tokens, Gaussian pre-activations), so the only slack is
sampling noise: 4 standard errors of the sample estimate, computed from the samples.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from varprobe.theory import correlation

RNG = 11


def _pairs(rho: float, count: int, d: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(RNG)
    a = rng.standard_normal((count, d))
    return a, rho * a + math.sqrt(1 - rho * rho) * rng.standard_normal((count, d))


def _ratio_and_se(num: np.ndarray, den: np.ndarray) -> tuple[float, float]:
    """mean(num)/mean(den) and its delta-method standard error."""
    n = num.size
    ratio = num.mean() / den.mean()
    resid = (num - ratio * den) / den.mean()
    return float(ratio), float(resid.std() / math.sqrt(n))


@pytest.mark.parametrize("rho", [-1.0, -0.7, 0.0, 0.3, 0.9, 1.0])
def test_relu_quadrature_matches_arc_cosine(rho):
    assert correlation.activation(rho, torch.relu) == pytest.approx(correlation.relu(rho), abs=1e-9)
    assert correlation.activation(rho, torch.relu, q=3.0) == pytest.approx(correlation.relu(rho),
                                                                           abs=1e-9)


def test_relu_fixed_points():
    assert correlation.relu(0.0) == pytest.approx(1 / math.pi)
    assert correlation.relu(1.0) == 1.0
    assert correlation.activation(0.4, lambda x: x) == pytest.approx(0.4, abs=1e-12)


@pytest.mark.parametrize("fn,kinks", [(torch.tanh, ()), (nn.GELU(), ()),
                                      (torch.sigmoid, ()), (nn.Hardtanh(), (-1.0, 1.0))])
@pytest.mark.parametrize("rho", [0.0, 0.5])
def test_activation_map_against_sampling(fn, kinks, rho):
    a, b = _pairs(rho, 200_000)
    fa, fb = (fn(torch.from_numpy(t)).numpy().ravel() for t in (a, b))
    ratio, se = _ratio_and_se(fa * fb, fa * fa)
    assert correlation.activation(rho, fn, breakpoints=kinks) == pytest.approx(ratio, abs=4 * se)


def test_linear_bias_dropout_residual_against_sampling():
    rng = np.random.default_rng(RNG)
    B, T, n, out = 400, 8, 64, 64
    r = 0.3
    x = math.sqrt(r) * rng.standard_normal((B, 1, n))
    x = x + math.sqrt(1 - r) * rng.standard_normal((B, T, n))

    def measured(y):
        s1 = (y.sum(1) ** 2).mean()
        q = (y**2).mean()
        return (s1 / T - q) / ((T - 1) * q)

    w = rng.standard_normal((n, out)) / math.sqrt(n)
    b = 0.5 * rng.standard_normal(out)
    y = x @ w
    # Noise: the shared part of B*out columns, sd ~ r sqrt(2/(B out)) (plus weights).
    tol = 6 * math.sqrt(2 / (B * out))
    assert correlation.linear(r, 1.0) == pytest.approx(measured(y), abs=tol)
    assert correlation.linear(r, 1.0, 0.25) == pytest.approx(measured(y + b), abs=tol)
    p = 0.4
    mask = (rng.random(y.shape) >= p) / (1 - p)
    assert correlation.dropout(r, p) == pytest.approx(measured(y * mask), abs=tol)
    z = 2.0 * rng.standard_normal((B, T, out))  # an independent branch, r = 0, q = 4
    assert correlation.residual_add(1.0, r, 4.0, 0.0) == pytest.approx(measured(y + z), abs=tol)


def test_embedding_against_sampling():
    rng = np.random.default_rng(RNG)
    B, T, d, vocab = 200, 8, 1024, 8
    table = rng.standard_normal((vocab, d))
    positions = rng.standard_normal((1, T, d))  # learned positions, q_position = 1
    e = table[rng.integers(0, vocab, (B, T))]

    def measured(y):
        q = (y**2).mean()
        return ((y.sum(1) ** 2).mean() / T - q) / ((T - 1) * q)

    # Noise: one table (r / V... scaled by the chi-square of d columns, sd (1/V) sqrt(2/d))
    # and the share of same-id pairs among B T (T-1) pairs, sd sqrt(p (1-p) / (B T (T-1))).
    p = 1 / vocab
    tol = 4 * (p * math.sqrt(2 / d) + math.sqrt(p * (1 - p) / (B * T * (T - 1))))
    assert correlation.embedding(p) == pytest.approx(measured(e), abs=tol)
    assert correlation.embedding(p, 1.0, 1.0) == pytest.approx(measured(e + positions), abs=tol)
