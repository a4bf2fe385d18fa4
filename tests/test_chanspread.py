"""theory.chanspread's closed forms for BatchNorm's channels against Monte Carlo.

Each test draws conv weights, computes in float64 what a BatchNorm would see per
channel (the variance over the batch and positions, the per-unit means over the
positions) and holds the mean over many channels against the closed form. The
tolerances are Monte Carlo standard errors computed from the same draws (the spread
of the per-channel quantity over the square root of the channel count), times 4.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from varprobe.report import Layer
from varprobe.theory import chanspread
from varprobe.theory.signal import Signal

SIDE, C_IN, BATCH = 16, 3, 64
DRAWS, C_OUT = 8, 512  # 4096 channels in all
SE = 4.0


def _conv(c_in: int = C_IN, padding: int = 1) -> tuple[nn.Conv2d, Layer]:
    conv = nn.Conv2d(c_in, C_OUT, 3, padding=padding, bias=False)
    layer = Layer(0, "conv", 0, "Conv2d", "weight", input_shape=[BATCH, c_in, SIDE, SIDE],
                  fan_in=c_in * 9)
    return conv, layer


def _channel_variances(weight: torch.Tensor, padding: int) -> torch.Tensor:
    """v_c over the batch and positions of the conv of i.i.d. N(0, 1) images."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(BATCH, weight.shape[1], SIDE, SIDE, generator=gen, dtype=torch.float64)
    y = F.conv2d(x, weight, padding=padding)
    return y.var(dim=(0, 2, 3), unbiased=False)


def _relvar_se(v: torch.Tensor) -> tuple[float, float]:
    """Var_c[v]/E_c[v]^2 and its standard error (delta method over the channels)."""
    mean = v.mean()
    z = (v - mean) ** 2 / mean ** 2 - 2 * (v - mean) * ((v - mean) ** 2).mean() / mean ** 3
    return float(((v - mean) ** 2).mean() / mean ** 2), float(z.std() / math.sqrt(len(v)))


def _draw(sampler, c_in: int = C_IN) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    return torch.cat([sampler((C_OUT, c_in, 3, 3), gen) for _ in range(DRAWS)])


def _gaussian(shape, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _uniform(shape, gen):
    return torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1


def test_spread_gaussian_weights_padded_stem():
    """v_c = sum_t w_t^2 f_t over a fan-in of 27: relative variance 2/n, n counted
    with each tap's share of in-bounds outputs (a weighted chi-square)."""
    conv, layer = _conv()
    n, _ = chanspread.fans(conv, layer)
    rel = chanspread.weight_layer(chanspread.ALIKE, n, chanspread.GAUSSIAN, 0.0,
                                  Signal(1.0), 1.0, 1.0).rel
    # a batch of 64 images adds its own sampling spread, 2 sum_j rho_ij^2 / (N P) with
    # sum_j rho_ij^2 = (1 + 2 (2/3)^2 + 2 (1/3)^2)^2 = 4.46 for 3x3 taps: 5e-4
    sampling = 2 * 4.46 / (BATCH * SIDE * SIDE)
    measured, se = _relvar_se(_channel_variances(_draw(_gaussian), 1))
    assert abs(measured - rel - sampling) < SE * se, (measured, rel, se)
    assert 0.07 < rel < 0.08  # 2/27 with the borders' taps weighed in


def test_spread_uniform_weights_kurtosis():
    """Uniform weights: E[w^4]/E[w^2]^2 = 9/5, so the spread is 0.8/n, not 2/n."""
    conv, layer = _conv(padding=0)
    n, phi = chanspread.fans(conv, layer)
    assert n == C_IN * 9 and phi == 0.0
    rel = chanspread.weight_layer(chanspread.ALIKE, n, 9 / 5, 0.0, Signal(1.0),
                                  1.0, 1.0).rel
    sampling = 2 * 4.46 / (BATCH * (SIDE - 2) ** 2)
    measured, se = _relvar_se(_channel_variances(_draw(_uniform), 0))
    assert abs(measured - rel - sampling) < SE * se, (measured, rel, se)


def test_spread_factor_mean_inverse():
    """mean_c(1/v_c) mean_c(v_c) = 1/(1 - rel) for chi-square channel variances."""
    conv, layer = _conv(padding=0)
    n, _ = chanspread.fans(conv, layer)
    ch = chanspread.weight_layer(chanspread.ALIKE, n, chanspread.GAUSSIAN, 0.0,
                                 Signal(1.0), 1.0, 1.0)
    w = _draw(_gaussian)
    v = (w * w).sum(dim=(1, 2, 3))  # the population variance of each channel
    product = (1 / v) * v.mean()
    measured, se = float(product.mean()), float(product.std() / math.sqrt(len(v)))
    assert abs(measured - chanspread.spread_factor(ch)) < SE * se, (measured, ch)


def test_input_spread_enters_the_next_conv():
    """An input whose channels' variances spread by rel_in: (kappa - 1)(1 + rel_in)/n."""
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    c_in = 64
    s = torch.distributions.Gamma(4.0, 4.0).sample((c_in,)).double()  # rel_in = 1/4
    rel_in = float(s.var(unbiased=False) / s.mean() ** 2)
    w = torch.randn(DRAWS * C_OUT, c_in, generator=gen, dtype=torch.float64)
    v = (w * w * s).sum(dim=1)
    rel = chanspread.weight_layer(chanspread.Channels(rel_in), c_in, chanspread.GAUSSIAN,
                                  0.0, Signal(1.0), 1.0, 1.0).rel
    measured, se = _relvar_se(v)
    assert abs(measured - rel) < SE * se, (measured, rel, se)


def test_positional_share_of_a_padded_conv():
    """Channel means constant over the positions: the conv's per-unit means at the
    borders miss taps, so a share phi of their energy varies over the positions."""
    conv, layer = _conv(c_in=16)
    _, phi = chanspread.fans(conv, layer)
    gen = torch.Generator().manual_seed(5)
    means = torch.randn(1, 16, 1, 1, generator=gen, dtype=torch.float64)
    w = torch.randn(DRAWS * C_OUT, 16, 3, 3, generator=gen, dtype=torch.float64)
    ybar = F.conv2d(means.expand(1, 16, SIDE, SIDE), w, padding=1)[0]  # exact unit means
    varying = ybar.var(dim=(1, 2), unbiased=False)  # per channel
    energy = (ybar * ybar).mean(dim=(1, 2))
    ratio = float(varying.mean() / energy.mean())
    z = varying / energy.mean() - ratio * energy / energy.mean()
    se = float(z.std() / math.sqrt(len(z)))
    assert abs(ratio - phi) < SE * se, (ratio, phi, se)
    assert 0.07 < phi < 0.09  # 1 - (1 + 2 (15/16)^2)^2 / (1 + 2 15/16)^2 = 0.080


def test_sum_of_independent_branches():
    """Channel variances of two independently drawn parts add: the spread of the sum is
    sum V_i^2 rel_i / (sum V_i)^2."""
    torch.manual_seed(9)
    c = DRAWS * C_OUT
    a = torch.distributions.Chi2(27.0).sample((c,)).double() / 27 * 2.0  # V 2, rel 2/27
    b = torch.distributions.Chi2(2304.0).sample((c,)).double() / 2304  # V 1, rel 2/2304
    parts = [(1.0, Signal(2.0), chanspread.Channels(2 / 27)),
             (1.0, Signal(1.0), chanspread.Channels(2 / 2304))]
    rel = chanspread.summed(parts, 3.0).rel
    measured, se = _relvar_se(a + b)
    assert abs(measured - rel) < SE * se, (measured, rel, se)


def test_positional_means_through_batchnorm_relu_conv():
    """relu(z) -> padded conv -> BatchNorm -> ReLU -> padded conv, z i.i.d. N(0, 1):
    BatchNorm keeps the positional part of the first conv's unit means, the ReLU passes
    E[f']^2 of it (and adds it to its own 1/pi mean share), the second conv adds its
    borders' part again. Closed-form V/m2 at the second conv's output against float64:
    the ratio over the channels, standard error by the delta method."""
    # each output channel's mean is one Gaussian draw (its square spreads by sqrt(2)),
    # so the second conv has many channels: 8192 give a standard error of ~0.003
    c, wide, batch = 64, 8192, 4
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(batch, c, SIDE, SIDE, generator=gen, dtype=torch.float64).relu()
    w1 = torch.randn(c, c, 3, 3, generator=gen, dtype=torch.float64)
    w2 = torch.randn(wide, c, 3, 3, generator=gen, dtype=torch.float64)
    h = F.conv2d(x, w1, padding=1)
    h = F.batch_norm(h, None, None, training=True).relu()
    y = F.conv2d(h, w2, padding=1)
    v = y.var(dim=(0, 2, 3), unbiased=False)
    m2 = (y * y).mean(dim=(0, 2, 3))
    ratio = float(v.mean() / m2.mean())
    z = v / m2.mean() - ratio * m2 / m2.mean()
    se = float(z.std() / math.sqrt(wide))

    conv, layer = _conv(c_in=c)
    n, phi = chanspread.fans(conv, layer)
    relu = Signal(0.5, 1 / math.pi)  # the walk's ReLU of a zero-mean unit Gaussian
    first = chanspread.weight_layer(chanspread.ALIKE, n, chanspread.GAUSSIAN, phi, relu,
                                    1.0, 1.0)
    normed = chanspread.batch_norm(nn.BatchNorm2d(c), first, Signal(1.0, 1 / math.pi), None)
    rectified = chanspread.activation(normed, 0.5, 1.0, 0.5)
    second = chanspread.weight_layer(rectified, n, chanspread.GAUSSIAN, phi, relu, 1.0, 1.0)
    closed = chanspread.variance(Signal(1.0, 1 / math.pi), second)
    assert abs(ratio - closed) < SE * se, (ratio, closed, se)
    # the per-tensor rule, 1 - 1/pi, is off by more than the tolerance
    assert abs(ratio - (1 - 1 / math.pi)) > SE * se
