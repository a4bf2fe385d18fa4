"""The ``torch-default`` scheme carries PyTorch's default bias.

nn.Linear's reset_parameters draws the bias from U(-1/sqrt(n), 1/sqrt(n)), mean(b^2) =
1/(3n), beside a weight variance of 1/(3n): with ReLU each layer passes on 1/6 of its
input's second moment and adds 1/(3n), so a deep default-init MLP settles at the bias
floor E[y^2] = (1/(3n)) / (1 - 1/6) = 1.56e-3 (n = 256) instead of decaying as 6^-L
(1.7e-7 at the ninth layer). Measured on models PyTorch itself initialized, seeds 0-7.
"""

from __future__ import annotations

import math

import pytest
import zoo

import varprobe
from varprobe import theory

SEEDS = range(8)
WIDTH, DEPTH = 256, 9
# Per seed, a layer's E[y^2] fluctuates by (relative variances): its bias' mean(b^2)
# over 256 units, Var[b^2]/E[b^2]^2 = 4/5 for a uniform b, so 0.8/256; the per-unit
# mean a ReLU leaves (a 1/pi share of E[x^2]) projected on each row, (w.mu)^2 over 256
# rows: (1/pi)^2 2/256; the weights' own mean square over 65536 draws: 0.8/65536.
# The mean of 8 seeds divides the sd by sqrt(8); the bound is 6 sd (0.13).
TOL = 6 * math.sqrt((0.8 / WIDTH + 2 / math.pi**2 / WIDTH + 0.8 / WIDTH**2) / len(SEEDS))


def _mean_by_layer(reports, get):
    rows = [[get(layer) for layer in r.layers if layer.kind == "weight"] for r in reports]
    return [sum(col) / len(col) for col in zip(*rows)]


def test_torch_default_scheme_predicts_a_default_init_mlp():
    # The probe's input seed differs from the weights': the same seed would draw the
    # same numbers for both, and x correlated with W is not He's independent input.
    reports = [varprobe.probe(zoo.mlp([WIDTH] * (DEPTH + 1), bias=True, seed=s),
                              batch_size=256, seed=100 + s, compare="torch-default")
               for s in SEEDS]
    measured = _mean_by_layer(reports, lambda layer: layer.forward.second_moment)
    predicted = _mean_by_layer(reports, lambda layer: layer.schemes["torch-default"].forward_var)
    assert measured[-1] > 1e-3  # the bias floor, not 6^-8 of the first layer
    for m, p in zip(measured, predicted):
        assert p == pytest.approx(m, rel=TOL)


def test_torch_default_reinit_draws_the_bias_it_predicts():
    model = zoo.mlp([WIDTH] * (DEPTH + 1), bias=True, seed=0)
    reports = [varprobe.probe(model, init="torch-default", batch_size=256, seed=s)
               for s in SEEDS]
    b2 = _mean_by_layer(reports, lambda layer: layer.bias_second_moment)
    assert b2 == pytest.approx([theory.scheme_bias_variance("torch-default", model[0])] * DEPTH,
                               rel=6 * math.sqrt(0.8 / WIDTH / len(SEEDS)))
    measured = _mean_by_layer(reports, lambda layer: layer.forward.second_moment)
    predicted = _mean_by_layer(reports, lambda layer: layer.predicted.forward_var)
    for m, p in zip(measured, predicted):
        assert p == pytest.approx(m, rel=TOL)


def test_other_schemes_zero_the_bias():
    model = zoo.mlp([16, 16, 16], bias=True)
    report = varprobe.probe(model, init="he", batch_size=32)
    assert all(layer.bias_second_moment == 0 for layer in report.layers if layer.kind == "weight")
