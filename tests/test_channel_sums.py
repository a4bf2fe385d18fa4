"""Per-channel sums (``varprobe.channel_sums``) against float64 arithmetic, in every
memory layout a BatchNorm's input comes in, with numba's kernel and with torch's row
reductions.

Bound: each (n, c) row of length L is summed in float32 in blocks of at most
B = min(L, 256) terms (numba's ``BLOCK``; torch's row reductions sum at most L), then
in float64. Any order of summing m float32 terms errs by at most (m - 1) u sum|x_i|
(Higham, Accuracy and Stability, 4.2; u = 2^-24), and each square adds u |x|^2 of its
own rounding; the float64 additions add ~1e-16 relatively. So
|s1 - S1| <= B u sum|x| and |s2 - S2| <= (B + 1) u sum x^2, plus 1e-12 of slack for the
float64 part."""

from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from varprobe import stats
from varprobe.channel_sums import channel_sums

U = 2.0 ** -24
SHAPES = st.sampled_from([(3, 5), (2, 4, 7), (2, 3, 5, 6), (1, 8, 300), (3, 2, 2, 2, 3)])
LAYOUTS = st.sampled_from(["contiguous", "channels_last", "strided"])


def arrange(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last" and x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    if layout == "strided":  # not dense in any order: every other element of a wider one
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1])
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


def check(x: torch.Tensor) -> None:
    s1, s2 = channel_sums(x, 1)
    d = x.double()
    dims = [i for i in range(x.dim()) if i != 1]
    row = x.numel() // (x.shape[0] * x.shape[1])
    b = min(row, 256) if x.dim() > 2 else min(x.shape[0], 256)
    assert s1.dtype == s2.dtype == torch.float64 and s1.shape == (x.shape[1],)
    want1, want2 = d.sum(dims), d.square().sum(dims)
    bound1 = b * U * d.abs().sum(dims) + 1e-12 * d.abs().sum(dims)
    bound2 = (b + 1) * U * want2 + 1e-12 * want2
    assert ((s1 - want1).abs() <= bound1).all()
    assert ((s2 - want2).abs() <= bound2).all()


@contextlib.contextmanager
def chosen(path: str):
    """The CPU sums of ``path`` ("numba" or "torch") chosen, as a recording does."""
    if path == "numba":
        pytest.importorskip("numba")
    with mock.patch.object(stats, "numba_kernels",
                           stats.numba_kernels if path == "numba" else lambda: None):
        token = stats.fix_kernels()
        try:
            yield
        finally:
            stats.release_kernels(token)


PATHS = pytest.mark.parametrize("path", ["numba", "torch"])


@PATHS
@settings(max_examples=60, deadline=None)
@given(shape=SHAPES, layout=LAYOUTS, shift=st.floats(-3, 3), seed=st.integers(0, 2 ** 31))
def test_per_channel_sums_against_float64(path, shape, layout, shift, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.0 + shift
    with chosen(path):
        check(arrange(x, layout))


@PATHS
def test_the_kernel_path_is_taken(path):
    """The chosen CPU sums make them: numba's kernel where numba is used."""
    x = torch.randn(2, 3, 4, 5)
    with chosen(path):
        s1, _ = channel_sums(x)
        assert hasattr(stats.cpu_kernels(), "channel_sums") == (path == "numba")
    assert np.allclose(s1.numpy(), x.double().sum((0, 2, 3)).numpy())


@PATHS
def test_non_finite_values_reach_their_channel(path):
    x = torch.randn(2, 3, 4)
    x[1, 2, 3] = float("inf")
    with chosen(path):
        s1, s2 = channel_sums(x)
    assert torch.isfinite(s1[:2]).all() and s1[2] == float("inf") and s2[2] == float("inf")
