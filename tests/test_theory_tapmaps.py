"""theory.tapmaps against torch's conv of a kernel of ones and its autograd transpose,
in float64, over strides, paddings, dilations and 1-3 spatial axes. A count of ones is
an integer (exact either way); a weighted map's sums differ only by rounding order, so
the bound is 1e-13 relative (a few hundred ulps of float64's 2.2e-16)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from varprobe.theory import profile, tapmaps

GEOMETRIES = [
    (nn.Conv2d, (16, 16), dict(kernel_size=3, padding=1)),
    (nn.Conv2d, (15, 17), dict(kernel_size=3, stride=2, padding=1)),
    (nn.Conv2d, (28, 28), dict(kernel_size=7, stride=2, padding=3)),
    (nn.Conv2d, (14, 14), dict(kernel_size=1, stride=2)),
    (nn.Conv2d, (12, 13), dict(kernel_size=(3, 5), padding=(2, 1), dilation=(2, 1))),
    (nn.Conv2d, (3, 5), dict(kernel_size=3, dilation=4, padding=4)),  # taps that never land
    (nn.Conv1d, (31,), dict(kernel_size=5, stride=3, padding=2)),
    (nn.Conv3d, (6, 7, 5), dict(kernel_size=3, stride=(1, 2, 1), padding=1)),
]


def _torch_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` (1, 1, *spatial) convolved with a kernel of ones by torch."""
    ones = torch.ones((1, 1, *conv.kernel_size), dtype=torch.float64)
    f = (F.conv1d, F.conv2d, F.conv3d)[x.ndim - 3]
    return f(x, ones, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)


def _on(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x)[None, None]


@pytest.mark.parametrize("cls,spatial,kw", GEOMETRIES)
def test_tap_matrices_are_the_conv_of_ones_and_its_transpose(cls, spatial, kw):
    conv = cls(1, 1, bias=False, **kw)
    taps = tapmaps.of(conv, spatial)
    rng = np.random.default_rng(0)
    x = rng.random(spatial) + 0.5
    ref = _torch_conv(conv, _on(x))[0, 0].numpy()
    np.testing.assert_array_equal(tapmaps.convolve(np.ones(spatial), taps),
                                  _torch_conv(conv, _on(np.ones(spatial)))[0, 0].numpy())
    np.testing.assert_allclose(tapmaps.convolve(x, taps), ref, rtol=1e-13, atol=0)
    w = rng.random(ref.shape) + 0.5
    leaf = torch.ones((1, 1, *spatial), dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        y = _torch_conv(conv, leaf)
        (dx,) = torch.autograd.grad((y * torch.from_numpy(w)).sum(), leaf)
    np.testing.assert_allclose(tapmaps.transposed(w, taps), dx[0, 0].numpy(), rtol=1e-13, atol=0)


def test_transposed_convs_and_empty_outputs_keep_torchs_path():
    assert tapmaps.of(nn.ConvTranspose2d(1, 1, 3, stride=2), (8, 8)) is None
    assert tapmaps.of(nn.Conv2d(1, 1, 5), (3, 3)) is None


@pytest.mark.parametrize("cls,spatial,kw", GEOMETRIES)
def test_tap_shares_match_one_hot_kernels(cls, spatial, kw):
    """f_t, the share of outputs where tap t lands in bounds, from torch's conv of ones
    with one one-hot kernel per tap."""
    conv = cls(1, 1, bias=False, **kw)
    k = math.prod(conv.kernel_size)
    onehot = torch.eye(k, dtype=torch.float64).reshape(k, 1, *conv.kernel_size)
    f = (F.conv1d, F.conv2d, F.conv3d)[len(spatial) - 1](
        torch.ones((1, 1, *spatial), dtype=torch.float64), onehot, stride=conv.stride,
        padding=conv.padding, dilation=conv.dilation).flatten(2).mean(-1)[0]
    first, second = tapmaps.shares(tapmaps.of(conv, spatial))
    assert first == pytest.approx(float(f.sum()), rel=1e-14, abs=0)
    assert second == pytest.approx(float((f * f).sum()), rel=1e-14, abs=0)


def test_counts_match_torchs_convolution_of_ones():
    conv = nn.Conv2d(1, 1, 3, stride=2, padding=1)
    spatial = (15, 17)
    ones = torch.ones((1, 1, *spatial), dtype=torch.float64)
    y = profile._convolve(conv, ones)
    total = float(y.sum())
    assert profile._count(conv, spatial) == total / y.numel()
    assert profile._fan_out_count(conv, spatial) == total / ones.numel()
