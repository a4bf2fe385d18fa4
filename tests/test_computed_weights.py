"""A convolution whose own forward computes the weight it convolves with (weight
standardization: timm's StdConv2d / ScaledStdConv2d in BiT ResNetV2s and NF-ResNets) is
measured by that weight, and its rows' zero sums are in the prediction: the shared mean
of a rectified input does not reach the output. The truth here is float64 arithmetic on
the standardized weight and the measured output, not varprobe's own numbers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import varprobe
from tests.pristine import assert_untouched, snapshot


class StdConv2d(nn.Conv2d):
    """timm.layers.StdConv2d: each output channel's weights standardized in the forward."""

    def __init__(self, cin: int, cout: int, k: int = 1, eps: float = 1e-6):
        super().__init__(cin, cout, k, padding=k // 2, bias=False)
        self.eps = eps

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         training=True, momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class PaddedConv2d(nn.Conv2d):
    """A forward of its own that convolves with the parameter as it is."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias)


def _standardized(w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    rows = w.detach().double().reshape(w.shape[0], -1)
    centred = rows - rows.mean(1, keepdim=True)
    return centred / (centred.square().mean(1, keepdim=True) + eps).sqrt()


def test_the_standardized_weight_is_measured_and_its_zero_rows_predicted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ReLU(), StdConv2d(256, 256))
    x = torch.randn(16, 256, 8, 8)
    before = snapshot(model)
    report = varprobe.probe(model, x)
    assert_untouched(model, before)
    conv = report.layers[1]
    truth = _standardized(model[1].weight)
    assert conv.weight_var == pytest.approx(truth.var(unbiased=False).item(), rel=1e-6)
    assert conv.weight_second_moment == pytest.approx(truth.square().mean().item(), rel=1e-6)
    assert abs(conv.weight_row_share) < 1e-9  # each row sums to zero (float32 rounding)
    # E[y^2] = n E[w^2] Var[x]: the rectified input's shared mean cancels in every row.
    # 1,024 positions of 256 channels: the measured mean of y^2 has a relative standard
    # error of about sqrt(2 / 256) / sqrt(1024) = 0.3%; 3% is ten of them, and the mean
    # that He's E[x^2] would keep (1 / (1 - 1/pi) = 1.47x) is far outside it
    relu = report.layers[0].forward
    var_in = relu.second_moment - relu.mean ** 2
    expected = 256 * truth.square().mean().item() * var_in
    assert conv.forward.second_moment == pytest.approx(expected, rel=0.03)
    assert conv.predicted.forward_var == pytest.approx(conv.forward.second_moment, rel=0.03)


def test_a_forward_that_convolves_with_the_parameter_reads_the_parameter():
    torch.manual_seed(0)
    model = nn.Sequential(PaddedConv2d(8, 8, 3, bias=False))
    report = varprobe.probe(model, torch.randn(4, 8, 6, 6))
    w = model[0].weight.detach().double()
    assert report.layers[0].weight_var == pytest.approx(w.var(unbiased=False).item(), rel=1e-6)
    assert report.layers[0].weight_row_share is None
    assert "weight_row_share" not in report.to_dict()["layers"][0]


def test_the_row_share_of_independent_weights_is_near_one():
    """Without standardization (a plain parameter through a computing forward's own
    scaling) the share is sum_c (sum_i w_ci)^2 / sum w^2, 1 in expectation."""
    torch.manual_seed(0)

    class Scaled(nn.Conv2d):
        def forward(self, x):
            return F.conv2d(x, self.weight * 2.0, self.bias)

    model = nn.Sequential(Scaled(64, 128, 1, bias=False))
    report = varprobe.probe(model, torch.randn(4, 64, 4, 4))
    w = 2.0 * model[0].weight.detach().double().reshape(128, -1)
    share = (w.sum(1).square().sum() / w.square().sum()).item()
    assert report.layers[0].weight_row_share == pytest.approx(share, rel=1e-9)
    # 128 rows of 64 independent draws: sd of the share about sqrt(2 / 128)
    assert abs(share - 1.0) < 5 * math.sqrt(2 / 128)


def test_a_scheme_keeps_a_standardized_weight_as_it_is():
    """Re-drawing the parameter of a standardized conv leaves the weight it convolves
    with at the same scale: a scheme's column predicts what re-drawing it gives, checked
    by re-drawing it (He's normal) and measuring again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.ReLU(), StdConv2d(256, 256), nn.ReLU(), nn.Conv2d(256, 256, 1))
    x = torch.randn(16, 256, 8, 8)
    report = varprobe.probe(model, x, compare=["he"])
    with torch.no_grad():
        for m in (model[1], model[3]):
            m.weight.normal_(0.0, math.sqrt(2 / 256))
            if m.bias is not None:
                m.bias.zero_()
    redrawn = varprobe.probe(model, x)
    # 1,024 positions of 256 channels: within 3% (ten relative standard errors of a
    # mean of y^2, as above); the standardized rows have unit variance, so a draw of
    # He's 2 / n reaching them would predict 1/128 of the measured scale
    for i in (1, 3):
        assert report.layers[i].schemes["he"].forward_var == pytest.approx(
            redrawn.layers[i].forward.var, rel=0.03)
