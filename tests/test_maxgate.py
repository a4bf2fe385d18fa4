"""theory.maxgate's share of all-negative max-pool windows against a brute-force draw.

The truth is made without maxgate's geometry: each of 4000 channels draws its bias and
its taps' means, torch's own conv of a map of ones lays the means out over the
positions (zero padding, stride, dilation as the conv has them), independent unit noise
is added, and torch's own max pool (padding, dilation, ceil_mode) says which windows
are all negative. maxgate classifies the windows itself and takes its own 4096 draws
per class, so the two share nothing but the model. Within 0.025 absolute: about 3.5 sd
of the two draws together (each ~0.005)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from varprobe.theory import maxgate
from varprobe.theory.signal import Signal

CHANNELS = 4000


def brute(conv: nn.Conv2d, pool: nn.MaxPool2d, size: tuple[int, int], bias: float,
          tap: float, seed: int) -> float:
    """P(a window's elements all < 0) over channels y = b + m(p) + e(p), m(p) the sum of
    the taps' means u_t over the taps in bounds at p, Var[u_t] = tap / (mean count)."""
    g = torch.Generator().manual_seed(seed)
    ones = torch.ones(1, 1, *size, dtype=torch.float64)
    count = F.conv2d(ones, torch.ones(1, 1, *conv.kernel_size, dtype=torch.float64),
                     stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    u = torch.randn(CHANNELS, 1, *conv.kernel_size, generator=g, dtype=torch.float64)
    u *= math.sqrt(tap / count.mean().item())
    m = F.conv2d(ones, u, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    b = math.sqrt(bias) * torch.randn(1, CHANNELS, 1, 1, generator=g, dtype=torch.float64)
    y = m + b + torch.randn(m.shape, generator=g, dtype=torch.float64)
    pooled = F.max_pool2d(y, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                          ceil_mode=pool.ceil_mode)
    return (pooled < 0).double().mean().item()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(kernel=st.sampled_from([1, 2, 3, 5]), padding=st.integers(0, 2),
       stride=st.sampled_from([1, 2]), dilation=st.sampled_from([1, 2]),
       size=st.sampled_from([(2, 2), (4, 4), (5, 7), (8, 8)]),
       window=st.sampled_from([(2, 2, 0, False), (3, 2, 1, False), (3, 2, 0, True),
                               (2, 1, 0, False)]),
       shares=st.sampled_from([(0.0, 1.0), (0.3, 0.0), (0.2, 2.0), (1.0, 4.0)]),
       seed=st.integers(0, 3))
def test_the_share_of_all_negative_windows(kernel, padding, stride, dilation, size,
                                           window, shares, seed):
    conv = nn.Conv2d(1, 1, kernel, stride=stride, padding=min(padding, kernel // 2),
                     dilation=dilation)
    spatial = [(s + 2 * conv.padding[0] - dilation * (kernel - 1) - 1) // stride + 1
               for s in size]
    k, s, p, ceil = window
    if min(spatial) < k or p > k // 2:
        return  # no window fits, or a padding torch refuses
    pool = nn.MaxPool2d(k, s, p, ceil_mode=ceil)
    bias, tap = shares
    at = maxgate.Geometry(conv, size, pool, tuple(spatial), bias)
    # unit noise, per-unit means of variance bias + tap: share = (bias + tap) / m2
    m2 = 1.0 + bias + tap
    gate = maxgate.gate(nn.ReLU(), Signal(m2, (bias + tap) / m2), 0.0, k * k, at)
    assert 1 - gate == pytest.approx(brute(conv, pool, size, bias, tap, seed), abs=0.025)
