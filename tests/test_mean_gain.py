"""The mean every input shares, through the actual weights (varprobe.mean_gain).

The truth here is a float64 convolution of a constant map: for any weights and bias,
mean over outputs and positions of (conv(mu 1) + b)^2 = mean(b^2) + 2 mu B + mu^2 G.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import varprobe

GEOMETRIES = [
    lambda: nn.Linear(24, 10),
    lambda: nn.Linear(24, 10, bias=False),
    lambda: nn.Conv1d(6, 5, 5, padding=2),
    lambda: nn.Conv2d(6, 7, 3, padding=1),
    lambda: nn.Conv2d(6, 7, 3, stride=2, padding=1),
    lambda: nn.Conv2d(6, 7, 3, padding=2, dilation=2),
    lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6),
    lambda: nn.Conv2d(6, 4, (3, 5), padding=(1, 0), stride=(1, 2), groups=2),
    lambda: nn.Conv2d(6, 7, 3, padding="same"),
    lambda: nn.Conv2d(6, 7, 1),
    lambda: nn.Conv2d(6, 7, 3, padding=1, padding_mode="circular"),
    lambda: nn.Conv3d(6, 3, 3, padding=1),
]


def _input(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.randn(16, layer.in_features)
    spatial = {nn.Conv1d: (9,), nn.Conv2d: (7, 9), nn.Conv3d: (5, 4, 6)}[type(layer)]
    return torch.randn(2, layer.in_channels, *spatial)


def _truth(layer: nn.Module, x: torch.Tensor, mu: float) -> float:
    """mean (conv(mu 1) + b)^2 in float64, by the layer's own forward."""
    layer.to(torch.float64)
    try:
        y = layer(torch.full(x.shape, mu, dtype=torch.float64))
    finally:
        layer.to(torch.float32)
    return float(y.detach().square().mean())


@pytest.mark.parametrize("make", GEOMETRIES)
def test_mean_gain_and_bias_cross_against_a_constant_map(make):
    torch.manual_seed(0)
    layer = make()
    if layer.bias is not None:
        nn.init.uniform_(layer.bias, -0.5, 0.5)  # a bias that matters beside the mean
    x = _input(layer)
    found = varprobe.probe(nn.Sequential(layer), x).layers[0]
    g, b_cross = found.weight_mean_gain, found.weight_bias_cross
    b2 = float(layer.bias.detach().double().square().mean()) if layer.bias is not None \
        else 0.0
    for mu in (0.0, 0.7, -1.3):
        expected = _truth(layer, x, mu)
        assert b2 + 2 * mu * b_cross + mu * mu * g == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_a_head_on_a_common_mean_is_predicted_by_its_own_weights():
    """Pooled features with a large common mean (mu = 1, spread 0.1) into a 10-class
    head: nearly all of E[y^2] is mean(b + S)^2, S the rows' sums. Independent draws put
    E[S^2] at n E[w^2], off by the chi-square of 10 rows (sd sqrt(2/10) = 45%); the
    actual rows' sums make it exact up to the spread's share (1% of E[y^2]) and its
    sampling over 4096 rows: within 2%."""
    errors, before = [], []
    for seed in range(4):
        torch.manual_seed(seed)
        head = nn.Linear(64, 10)
        x = 1.0 + 0.1 * torch.randn(4096, 64)
        layer = varprobe.probe(head, x).layers[0]
        measured, predicted = layer.forward.second_moment, layer.predicted.forward_var
        errors.append(abs(math.log(measured / predicted)))
        independent = 64 * layer.weight_second_moment * float(x.double().square().mean()) \
            + layer.bias_second_moment
        before.append(abs(math.log(measured / independent)))
    assert max(errors) < 0.02, errors
    assert max(before) > 0.1  # what the rule gave without the actual sums


def test_zero_padding_counts_the_taps_a_border_sees():
    """A 3x3 conv of a constant map: the border outputs sum 6 (corners 4) of the 9 taps;
    G is their mean square, not (sum of all 9)^2."""
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    layer = varprobe.probe(conv, torch.randn(4, 1, 5, 5)).layers[0]
    counts = F.conv2d(torch.ones(1, 1, 5, 5), torch.ones(1, 1, 3, 3), padding=1)
    assert layer.weight_mean_gain == pytest.approx(float(counts.square().mean()), rel=1e-6)
    assert layer.weight_mean_gain < 81


def test_meta_and_transposed_layers_measure_none():
    up = nn.ConvTranspose2d(4, 4, 2, stride=2)
    layer = varprobe.probe(up, torch.randn(2, 4, 5, 5)).layers[0]
    assert layer.weight_mean_gain is None and layer.weight_bias_cross is None


def test_a_half_precision_weight_is_summed_in_float32():
    """bfloat16 holds ~3 digits: summing a row of 256 weights in it would lose the sum's
    small remainder; the tap sums are taken in float32 (the bf16 weights themselves,
    read exactly, against a float64 sum of the same values: 1e-5)."""
    torch.manual_seed(0)
    head = nn.Linear(256, 8).to(torch.bfloat16)
    layer = varprobe.probe(head, torch.randn(32, 256, dtype=torch.bfloat16)).layers[0]
    sums = head.weight.detach().double().sum(1)
    assert layer.weight_mean_gain == pytest.approx(float(sums.square().mean()), rel=1e-5)
    assert layer.weight_bias_cross == pytest.approx(
        float((sums * head.bias.detach().double()).mean()), rel=1e-5)


def test_a_mean_beyond_the_second_moment_is_held_to_it():
    """A scheme's walk carries its own E[x^2] beside a mean from elsewhere (a carried
    measured input, another scale): with independent draws (row share 1) the mean only
    splits E[x^2] and cannot add to it, whatever mu; with the actual sums it holds no
    more than E[x^2] either. (Without the bound a Xavier walk's head of a CNN came out
    8x over: its pooled mean^2 above its E[x^2].)"""
    from varprobe.theory import rules
    from varprobe.theory.weights import Weights
    for mu in (0.0, 0.5, 3.0):
        y2, _ = rules.through_weights(10.0, 0.2, mu, Weights(0.1, 0.01))
        assert y2 == pytest.approx(10.0 * 0.2 + 0.01, rel=1e-12)
    y2, mean = rules.through_weights(10.0, 0.2, 3.0, Weights(0.1, 0.0, row_share=0.5))
    assert mean == pytest.approx(0.5 * 10.0 * 0.2) and y2 == pytest.approx(mean)


def test_transformers_conv1d_sums_its_columns():
    """GPT-2's Conv1D multiplies by a weight of shape (in, out): a unit's weights are a
    column, summed over dim 0 (no copy of the transposed weight)."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(48, 32)  # nf = 48 outputs, nx = 32 inputs
    with torch.no_grad():
        layer.bias.uniform_(-0.5, 0.5)
    found = varprobe.probe(layer, torch.randn(4, 5, 32)).layers[0]
    sums = layer.weight.detach().double().sum(0)
    assert found.weight_mean_gain == pytest.approx(float(sums.square().mean()), rel=1e-6)
    assert found.weight_bias_cross == pytest.approx(
        float((sums * layer.bias.detach().double()).mean()), rel=1e-6)


def test_predict_on_a_real_model_reads_its_weights_sums():
    """``varprobe predict`` on a model with values reads its weights, their sums too: a
    ReLU's common mean (1/pi of its E[x^2]) into a 10-class head, against the float64
    forward of the same model on 4096 N(0, 1) inputs. With the actual rows' sums the
    rest is the units' own means about the common one (sd ~9% of it: their scales
    differ by a chi-square of 64) and the batch: within 4%; with n E[w^2] for E[S^2]
    the chi-square of 10 rows (45% of the mean's third) leaves more than 10% in a seed
    of four."""
    from varprobe.predict import predict

    errors, before = [], []
    for seed in range(4):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        x = torch.randn(4096, 64)
        with torch.no_grad():
            truth = float(model.double()(x.double()).square().mean())
        model.float()
        layers = predict(model, x).layers
        head, q = layers[-1], layers[1].predicted.forward_var  # q: the ReLU's E[x^2]
        errors.append(abs(math.log(truth / head.predicted.forward_var)))
        # the expectation: n E[w^2] (q - mu^2) + mu^2 n E[w^2] + mean(b^2)
        independent = 64 * head.weight_second_moment * q + head.bias_second_moment
        before.append(abs(math.log(truth / independent)))
    assert max(errors) < 0.04, errors
    assert max(before) > 0.1, before
    # an assumed scheme's weights are not these: their sums are not read
    assert predict(model, x, init="he").layers[-1].weight_mean_gain is None
