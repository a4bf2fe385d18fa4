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
import math
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import varprobe
from varprobe import channel_sums as channel_sums_module
from varprobe import kernel_choice
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
    check_against(x, *channel_sums(x, 1))


def check_against(x: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> None:
    """(s1, s2) are x's per-channel sums within the bound above."""
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
        if kernel_choice.numba_kernels() is None:
            pytest.skip("numba's kernels are not asked for (VARPROBE_NUMBA is not 1)")
    with mock.patch.object(kernel_choice, "numba_kernels",
                           kernel_choice.numba_kernels if path == "numba" else lambda: None):
        token = kernel_choice.fix_kernels()
        try:
            yield
        finally:
            kernel_choice.release_kernels(token)


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
        assert hasattr(kernel_choice.cpu_kernels(), "channel_sums") == (path == "numba")
    assert np.allclose(s1.numpy(), x.double().sum((0, 2, 3)).numpy())


@PATHS
def test_non_finite_values_reach_their_channel(path):
    x = torch.randn(2, 3, 4)
    x[1, 2, 3] = float("inf")
    with chosen(path):
        s1, s2 = channel_sums(x)
    assert torch.isfinite(s1[:2]).all() and s1[2] == float("inf") and s2[2] == float("inf")


@PATHS
def test_a_kept_read_is_what_a_batchnorm_recalls(path):
    """Inside ``keep``, an activation's read per channel gives its totals (within the
    bound above) and its sums to any view of the same unwritten memory; a write, the
    tensor's end or the end of ``keep`` forgets them."""
    x = torch.randn(2, 3, 4, 5) + 0.5
    with chosen(path):
        assert channel_sums_module.kept_read(x) is None  # nothing is kept outside keep()
        token = channel_sums_module.keep()
        try:
            total1, total2 = channel_sums_module.kept_read(x)
            d = x.double()
            assert abs(total1 - d.sum().item()) <= 21 * U * d.abs().sum().item()
            assert abs(total2 - d.square().sum().item()) <= 21 * U * d.square().sum().item()
            s1, s2 = channel_sums_module.recall(x.view_as(x))
            check_against(x, s1, s2)
            assert channel_sums_module.recall(x[:1]) is None  # another tensor's memory
            x.mul_(2)
            assert channel_sums_module.recall(x) is None  # written since
            y = torch.randn(2, 3, 4, 5)
            channel_sums_module.kept_read(y)
            alias = y.detach()
            assert channel_sums_module.recall(alias) is not None
            del y  # the tensor read is gone (its memory might be reused): forgotten
            assert channel_sums_module.recall(alias) is None
        finally:
            channel_sums_module.release(token)
    assert channel_sums_module.recall(x) is None


class ConvNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


@PATHS
def test_a_convs_read_per_channel_serves_its_batchnorm(path):
    """In a probe the conv's output is read once, per channel: its moments and the
    eval-mode BatchNorm's per-channel closed form (theory.normshape) both come from
    that read, and equal float64 arithmetic on the captured tensor."""
    torch.manual_seed(0)
    model, x = ConvNormed().eval(), torch.randn(4, 3, 10, 10)
    with torch.no_grad():
        for t in (model.bn.weight, model.bn.bias, model.bn.running_mean):
            t.uniform_(-0.5, 0.9)
        model.bn.running_var.uniform_(0.5, 2.0)
        h = model.conv(x).double()
    reads = mock.Mock(wraps=channel_sums_module.kept_read)
    with chosen(path), mock.patch.object(channel_sums_module, "kept_read", reads):
        report = varprobe.probe(model, x, mode="eval")
    assert reads.call_count == 1
    layers = {layer.name: layer for layer in report.layers}
    conv, bn = layers["conv"], model.bn
    # float32 blocks of at most 100 terms (a 10x10 row), then float64: 1e-5 relative
    assert conv.forward.mean == pytest.approx(h.mean().item(), rel=1e-5)
    assert conv.forward.var == pytest.approx(h.var(unbiased=False).item(), rel=1e-5)
    mu, v = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
    k = math.sqrt(conv.predicted.forward_var / h.square().mean().item())  # the walk's scale
    g, b, m = (t.detach().double() for t in (bn.weight, bn.bias, bn.running_mean))
    sd = (bn.running_var.double() + bn.eps).sqrt()
    out = g * (k * mu - m) / sd + b  # each channel's mean, and its variance below
    expected = out.square() + (g / sd).square() * k * k * v
    assert layers["bn"].predicted.forward_var == pytest.approx(expected.mean().item(),
                                                               rel=1e-5)


def expected_pairs(bn: nn.BatchNorm2d, x: torch.Tensor) -> list[tuple[float, float]]:
    """theory.normshape's four pairs by its module note's formulas, in float64 on the
    captured input (running statistics only where the norm uses them)."""
    d = x.double()
    mu, m2 = d.mean((0, 2, 3)), d.square().mean((0, 2, 3))
    v = m2 - mu * mu
    ones, zeros = torch.ones_like(mu), torch.zeros_like(mu)
    g = bn.weight.detach().double() if bn.weight is not None else ones
    b = bn.bias.detach().double() if bn.bias is not None else zeros
    running = not bn.training and bn.running_var is not None
    rm = bn.running_mean.double() if running else zeros
    rv = bn.running_var.double() if running else ones
    a = g / (rv + bn.eps).sqrt()
    t = b - a * rm
    terms = [m2, v, g * g / (v + bn.eps), t * t, a * a * m2, a * a * mu * mu,
             2 * a * mu * t, a * a]
    means = [float(term.mean()) for term in terms]
    return [(means[i], means[i + 1]) for i in range(0, 8, 2)]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, "bf16 chunked"])
def test_batchnorm_pairs_on_the_accelerators_path(monkeypatch, affine, mode, dtype):
    """On an accelerator the BatchNorm's pairs are made on the host from per-channel
    sums and parameters sent through the one transfer (a ``stats.Pending`` and FOLLOWS
    in the recording's constants); they equal float64 arithmetic on the captured input.
    Tolerance: float32 reductions of 4*10*10 = 400 terms per channel (torch's cascade,
    error ~ log2(400) u), 1e-5 relative; bf16 input: the same sums of its exact values."""
    from varprobe import stats
    from varprobe.theory import constants, normshape

    monkeypatch.setattr(stats, "reads_are_free", lambda device: False)
    if dtype == "bf16 chunked":  # float32 copies of one sample (600 elements) at a time
        monkeypatch.setattr(stats, "chunk_size", lambda device: 300)
        dtype = torch.bfloat16
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6, affine=affine).to(dtype)
    with torch.no_grad():
        for t in (*bn.parameters(), bn.running_mean):
            t.uniform_(-0.5, 0.9)
        bn.running_var.uniform_(0.5, 2.0)
    bn.train(mode == "train")
    x = (torch.randn(4, 6, 10, 10) * 1.5 + 0.3).to(dtype)
    got = normshape.measure(bn, x)
    assert isinstance(got[0], stats.Pending) and \
        got[1:] == [constants.FOLLOWS] * (normshape.PAIRS - 1)
    pairs = stats.collect([got[0]])[0]
    for have, want in zip(pairs, [*expected_pairs(bn, x), (1.0, 0.0)], strict=True):
        assert have == pytest.approx(want, rel=1e-5, abs=1e-12)
