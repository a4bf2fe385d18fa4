"""The rules that look at positions: a padded conv's profile (theory.profile), the
rectifier of a residual sum (theory.residual), a gate's gradient (theory.shared),
each against a float64 Monte Carlo of the isolated op.

Tolerances: n Monte Carlo draws of a second moment have a relative standard error of
about sqrt(Var[y²]/n)/E[y²] <= sqrt(3/n) for Gaussian-like y (kurtosis <= 3 + 6 for
the products here); every check is at 5 standard errors or more of that."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from varprobe.theory import profile, residual, shared
from varprobe.theory.signal import Grad, Signal, Value

GEN = torch.Generator().manual_seed(0)


def _conv(c: int = 64) -> nn.Conv2d:
    conv = nn.Conv2d(c, c, 3, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=GEN, dtype=torch.float64))
    return conv


class _Layer:
    input_shape = (1, 64, 16, 16)


def test_padded_conv_reads_its_input_profile():
    """x with E[x²] = e(j) per position (e: one padded conv's tap count, mean 1): the
    next conv's E[y²] is n E[w²] mean_i Σ_t e(i+t), 1.0265x the uniform rule's."""
    conv = _conv()
    _, e = profile.conv_forward(conv, None, _Layer.input_shape)
    corr, _ = profile.conv_forward(conv, e, _Layer.input_shape)
    assert corr == pytest.approx(1.0265, abs=5e-4)
    x = torch.randn((64, 64, 16, 16), generator=GEN, dtype=torch.float64) * \
        torch.from_numpy(e).sqrt()
    with torch.no_grad():
        y2 = conv(x).pow(2).mean().item()
    taps = float(profile._count(conv, (16, 16)))
    uniform = 64 * taps * conv.weight.pow(2).mean().item() * x.pow(2).mean().item()
    assert abs(y2 / uniform / corr - 1) < 0.01  # 64^2 x 256 draws: se ~0.002


def test_padded_conv_backward_reads_the_gradient_profile():
    conv = _conv()
    _, e = profile.conv_backward(conv, None, _Layer.input_shape)
    corr, _ = profile.conv_backward(conv, e, _Layer.input_shape)
    g = torch.randn((64, 64, 16, 16), generator=GEN, dtype=torch.float64) * \
        torch.from_numpy(e).sqrt()
    x = torch.zeros((64, 64, 16, 16), dtype=torch.float64, requires_grad=True)
    conv(x).backward(g)
    taps = profile._fan_out_count(conv, (16, 16))
    uniform = 64 * taps * conv.weight.pow(2).mean().item() * g.pow(2).mean().item()
    assert corr > 1.02
    assert abs(x.grad.pow(2).mean().item() / uniform / corr - 1) < 0.01


def _mixture(n: int, v_y: float, mu: float, var: float):
    y = torch.randn(n, generator=GEN, dtype=torch.float64) * math.sqrt(v_y)
    w = mu + torch.randn(n, generator=GEN, dtype=torch.float64) * math.sqrt(var)
    return y, w, y + torch.relu(w)


def test_rectifier_of_a_residual_sum_is_the_mixture():
    """relu(y + relu(w)): E[f(z)²], E[f(z)], E[f'(z)²], and E[f''(z)] by Stein
    (E[y 1{z>0}] = v_y E[f''(z)]), against 4M draws (se <= 0.001)."""
    v_y, mu, var = 0.25, 0.4, 0.59
    y, w, z = _mixture(4_000_000, v_y, mu, var)
    m = (v_y, mu, var, 0.0, 0.0, None)
    out, mean, slope2 = residual.activate(nn.ReLU(), m)
    d1, d1_2, d2 = residual.slopes(nn.ReLU(), m)
    on = (z > 0).double()
    assert abs(out.m2 / torch.relu(z).pow(2).mean().item() - 1) < 0.005
    assert abs(mean / torch.relu(z).mean().item() - 1) < 0.005
    assert abs(slope2 / on.mean().item() - 1) < 0.005 and abs(d1 - d1_2) < 1e-12
    assert abs(d2 * v_y / (y * on).mean().item() - 1) < 0.01
    # the Gaussian of z's mean and variance misses the density at 0 by ~20%
    sigma = z.std().item()
    gauss = math.exp(-z.mean().item() ** 2 / (2 * sigma ** 2)) / (sigma * math.sqrt(2 * math.pi))
    assert d2 / gauss > 1.15


def test_rectifier_of_two_residual_sums():
    """z1 = y1 + relu(z0), z0 = y0 + relu(w0) itself a residual sum (the second block
    of a post-activation stack): the nested mixture, against 4M draws; the one-level
    mixture (z0 taken as Gaussian) misses E[f''(z1)] by ~6%."""
    v_0, mu_0, var_0, v_1 = 0.25, 0.0, 1.0, 0.25
    y0, w0, z0 = _mixture(4_000_000, v_0, mu_0, var_0)
    y1 = torch.randn(z0.shape, generator=GEN, dtype=torch.float64) * math.sqrt(v_1)
    z1 = y1 + torch.relu(z0)
    inner = (v_0, mu_0, var_0, 0.0, 0.0, None)
    m = (v_1, z0.mean().item(), z0.var().item(), 0.0, 0.0, inner)
    out, mean, _ = residual.activate(nn.ReLU(), m)
    _, _, d2 = residual.slopes(nn.ReLU(), m)
    on = (z1 > 0).double()
    assert abs(out.m2 / torch.relu(z1).pow(2).mean().item() - 1) < 0.005
    assert abs(mean / torch.relu(z1).mean().item() - 1) < 0.005
    assert abs(d2 * v_1 / (y1 * on).mean().item() - 1) < 0.01


def test_masks_into_the_stream_meet():
    """k_V = E[f'(w)² f'(z)²] / (E[f'(w)²] E[f'(z)²]) and k_S, against the draws."""
    v_y, mu, var = 0.25, 0.4, 0.59
    _, w, z = _mixture(4_000_000, v_y, mu, var)
    k_s, _, _, k_v = residual.stream_factors((v_y, mu, var, 0.0, 0.0, None))
    a, b = (w > 0).double(), (z > 0).double()
    joint = (a * b).mean().item() / (a.mean().item() * b.mean().item())
    assert abs(k_v / joint - 1) < 0.005 and abs(k_s / joint - 1) < 0.005


def test_gate_gradient_collects_the_shared_gradient():
    """y = s x over P positions, z = y + relu(w), a gradient U shared by the positions
    of one sample and channel (a global pool's) through relu(z): Var[Σ_i g_i x_i]
    against the independent-terms rule (P Var[g] E[x²], ~20x too small here) and the
    walk's (theory.shared), over 20000 (sample, channel) draws (se ~0.01)."""
    n, p, s, v_y = 20_000, 256, 0.5, 1.0
    mu, var = 0.4, 0.59
    x = torch.randn((n, p), generator=GEN, dtype=torch.float64)
    w = mu + torch.randn((n, p), generator=GEN, dtype=torch.float64) * math.sqrt(var)
    u = torch.randn((n, 1), generator=GEN, dtype=torch.float64)
    g = u * ((s * x + torch.relu(w)) > 0).double()
    ds = (g * x).sum(1)
    m = (s * s * v_y, mu, var, 0.0, 0.0, None)
    top = Grad(1.0, shared=1.0, shared0=1.0)  # U: one value per sample and channel
    parts = shared.activation(top, nn.ReLU(), Value(Signal(1.0), mix=m))
    at_y = Grad(g.pow(2).mean().item())
    at_y.shared, at_y.curv, at_y.cross, at_y.shared0, at_y.cross0, at_y.centred = parts
    xv = Value(Signal(1.0))
    walk = p * at_y.var * 1.0 + shared.gate_gradient(at_y, p, xv, s * s)
    measured = ds.pow(2).mean().item()
    assert measured / (p * at_y.var) > 10
    assert abs(measured / walk - 1) < 0.06
