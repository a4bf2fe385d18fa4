"""Backward steps of convolutional networks' parts, predicted against autograd's
gradients (the probe's measured variances): a conv paired with the BatchNorm it feeds,
a max pool of overlapping windows under a gradient shared across positions, dropout on
pooled features, and a max pool's window through a concatenation. Each was off by a
factor on the corpus's MobileNets, MNASNet or GoogLeNet before its rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import varprobe
from bench import whole_zoo as Z
from varprobe.theory import normshape, pools, shared


def _ratio(layer, side: str) -> float:
    """Measured over predicted: the gradient at the layer's output or input."""
    if side == "out":
        return layer.backward.var / layer.predicted.backward_var
    return layer.backward_input.var / layer.predicted.backward_input_var


@pytest.mark.parametrize("seed", range(3))
def test_a_depthwise_conv_and_its_batchnorm_both_hold(seed):
    """Channel c of a depthwise conv is made of its own 9 taps: the BatchNorm's gain
    mean_c 1/v_c is E[1/v] E[v] ~ 1.15 over the per-tensor one, and one step back the
    conv's own weights cancel it (theory.normshape's F). Both sides within 5% (the
    seed's scatter at 64 channels; the per-tensor gain was 12-19% low at the output)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False),
                          nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 64, 1))
    conv = varprobe.probe(model, torch.randn(8, 64, 16, 16)).layers[0]
    assert _ratio(conv, "out") == pytest.approx(1, abs=0.05)
    assert _ratio(conv, "in") == pytest.approx(1, abs=0.05)


@pytest.mark.parametrize("seed", range(3))
def test_a_conv_of_few_inputs_pairs_with_its_batchnorm(seed):
    """A 1x1 conv from 8 channels (an inverted residual's expansion): r_c = |w_c|^2
    spreads as chi-square with 8 degrees, so the conv's step is F = mean(r q) /
    (mean r mean q) ~ 6/8 of the per-tensor rule (22-28% over in three of these
    seeds). Within 1/8: the BatchNorm's projection couples the channels at O(1/n_in)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(8, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.Conv2d(64, 64, 1))
    nn.init.kaiming_normal_(model[0].weight, mode="fan_out", nonlinearity="relu")
    conv = varprobe.probe(model, torch.randn(8, 8, 16, 16)).layers[0]
    assert _ratio(conv, "in") == pytest.approx(1, abs=1 / 8)


def test_the_pairing_against_float64():
    """F from the pairs against float64 arithmetic on the conv's weights and the
    BatchNorm's input."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 32, 3, padding=1), nn.BatchNorm2d(32)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
    x = conv(torch.randn(4, 8, 10, 10))
    got = normshape.pairing(normshape.measure(bn, x))
    v = x.detach().double().var((0, 2, 3), unbiased=False)
    q = bn.weight.detach().double() ** 2 / (v + bn.eps)
    r = conv.weight.detach().double().square().sum((1, 2, 3))
    want = ((r * q).mean() / (r.mean() * q.mean())).item()
    assert got == pytest.approx(want, rel=1e-6)
    assert normshape.pairing(normshape.measure(bn, x.detach() + 0)) is None  # no conv


def test_overlapping_max_pool_windows_under_a_shared_gradient():
    """Behind a global pool every position of a channel gets the same gradient; an
    input that is the largest of K of a 3x3 stride-1 pool's windows gets K of them,
    E[K^2] ~ 6 where the independent-windows rule has E[K] = 1 (5x under). The count is
    made on an i.i.d. sample of 2^15 elements: ~2% of sampling error; the input here is
    a 1x1 conv of i.i.d. values, i.i.d. across positions too. Within 10%."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 64, 1), nn.ReLU(), nn.MaxPool2d(3, 1, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 512))
    pool = varprobe.probe(model, torch.randn(16, 64, 14, 14)).layers[2]
    assert pool.type == "MaxPool2d"
    assert _ratio(pool, "in") == pytest.approx(1, abs=0.1)


def test_the_overlap_count_against_its_definition():
    """E[K^2] - E[K] of ``pools.overlap`` against a direct count on another sample."""
    x = torch.randn(256, 1, 14, 14, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = nn.functional.max_pool2d(x, 3, 1, 1)
    (k,) = torch.autograd.grad(out, x, torch.ones_like(out))
    want = ((k * k).mean() - k.mean()).item()
    assert pools.overlap(nn.MaxPool2d(3, 1, 1), [2, 8, 14, 14]) == pytest.approx(want, rel=0.05)
    assert pools.overlap(nn.MaxPool2d(2), [2, 8, 14, 14]) == 0.0  # windows apart
    renamed = type("Pooling", (nn.MaxPool2d,), {})(3, 1, 1)  # a subclass, any name
    assert pools.overlap(renamed, [2, 8, 14, 14]) == pools.overlap(nn.MaxPool2d(3, 1, 1),
                                                                   [2, 8, 14, 14])
    assert pools.of_module(renamed, [2, 8, 14, 14], [2, 8, 14, 14]).window == 9.0
    assert pools.overlap(nn.AvgPool2d(3, 1, 1), [2, 8, 14, 14]) == 0.0


def test_dropout_on_pooled_features_keeps_the_gradient_shared():
    """Pooled features have one position: their whole gradient is what the positions
    before the pool share, dropout or not, and a train-mode BatchNorm there removes
    its batch mean (at a batch of 4, a quarter of it; it was lost at the dropout and
    the step predicted a third over). 1000 classes: the shared gradient's own scatter
    over the batch's samples is a few percent. Within 8%."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
                          nn.Linear(256, 1000))
    bn = varprobe.probe(model, torch.randn(4, 32, 7, 7)).layers[1]
    step = (bn.backward_input.var / bn.backward.var) / (
        bn.predicted.backward_input_var / bn.predicted.backward_var)
    assert step == pytest.approx(1, abs=0.08)


class _Branches(nn.Module):
    """Two rectified branches side by side, then a max pool (an Inception block and the
    pool after it)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(32, 64, 1), nn.Conv2d(32, 64, 3, padding=1)
        self.relu_a, self.relu_b = nn.ReLU(), nn.ReLU()
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.head = nn.Conv2d(128, 64, 1)

    def forward(self, x):
        return self.head(self.pool(torch.cat([self.relu_a(self.a(x)),
                                              self.relu_b(self.b(x))], 1)))


def test_a_max_pools_window_reaches_the_rectifiers_through_a_concatenation():
    """The pool hands its gradient to each window's largest element, which a ReLU
    before the concatenation passed: its step is ~1, not the mask's 1/2 (2x under when
    the window was lost at the concatenation). Within 5%: the largest of 9 is negative
    only where all nine are, 2^-9."""
    torch.manual_seed(0)
    report = varprobe.probe(_Branches(), torch.randn(8, 32, 16, 16))
    for layer in report.layers:
        if layer.type == "Conv2d" and layer.name in ("a", "b"):
            assert _ratio(layer, "out") == pytest.approx(1, abs=0.05)


def test_an_average_pool_wider_than_its_map_averages_the_map():
    """transformers' EfficientNet pools with AvgPool2d(hidden_dim, ceil_mode=True): the
    window is clipped to the map, and the divisor with it (7x7 here, not 320^2: the
    backward was 2089x under). The step is exact: each input gets 1/49 of one output's
    gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 64, 1), nn.AvgPool2d(320, ceil_mode=True),
                          nn.Flatten(), nn.Linear(64, 256))
    pool = varprobe.probe(model, torch.randn(8, 32, 7, 7)).layers[1]
    step = (pool.backward_input.var / pool.backward.var) / (
        pool.predicted.backward_input_var / pool.predicted.backward_var)
    assert step == pytest.approx(1, rel=1e-3)


def test_zero_initialized_branches_leave_the_trunks_mask_alone():
    """Post-activation blocks whose last BatchNorm starts at gamma = 0 (torchvision's
    ``zero_init_residual``): each block's ReLU sees the same x > 0 as the one before
    (the branches add exactly 0), so only the last halves the gradient. With the sum
    taken as a Gaussian of the stream's mean and variance each passed ~3/4, and the
    stem's gradient was predicted at half the truth. Within 5%: the masks are exact,
    what is left is the stem's own scatter at 64 channels."""
    torch.manual_seed(0)
    blocks = [Z.PostActBlock(64) for _ in range(4)]
    for block in blocks:
        nn.init.zeros_(block.bn2.weight)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64),
                          nn.ReLU(), *blocks)
    stem = varprobe.probe(model, torch.randn(16, 3, 16, 16)).layers[0]
    assert _ratio(stem, "out") == pytest.approx(1, abs=0.05)


@pytest.mark.parametrize("seed", range(3))
def test_a_strided_conv_hands_back_a_quarter_of_the_shared_part(seed):
    """Behind a global pool every position shares the gradient; back through a stride-2
    conv each input position meets a quarter of the taps (its own quarter), so the
    positions' mean holds (sum_t w_t / 4)^2: the shared part falls 4x more than the
    variance. Taken as the variance's, the BatchNorm before the conv removed too much
    of it at a batch of 2 (its step 14-20% under). Within 6%: the shared gradient's own
    scatter over 2 samples of 1000 classes."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64),
                          nn.ReLU(), nn.Conv2d(64, 128, 1, stride=2, bias=False), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 1000))
    bn = varprobe.probe(model, torch.randn(2, 16, 16, 16)).layers[1]
    step = (bn.backward_input.var / bn.backward.var) / (
        bn.predicted.backward_input_var / bn.predicted.backward_var)
    assert step == pytest.approx(1, abs=0.06)


def test_a_train_batchnorm_centres_the_shared_part_over_the_batch():
    """Behind a global pool each sample's channel shares one gradient ḡ_n; a train-mode
    BatchNorm subtracts its mean over the batch, so of their energy (1 - 1/N) passes
    beside its gain (half at N = 2), which later consumers of the shared part (a max
    pool's overlapping windows, a gate, a GroupNorm) read. ``shared.batch_normed``
    against float64 autograd: the mean over three seeds of E[ḡ_in^2] / (Q E[ḡ_out^2]),
    Q = mean_c 1/(v_c + eps). Within 15%: ḡ_1 ḡ_2 over 128 channels scatters ~9% a seed
    (three sd of the mean); without the centring the rule kept all of it (2x)."""
    from varprobe.theory.signal import Grad

    ratios = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(64, 128, 1, bias=False), nn.BatchNorm2d(128),
                              nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(128, 1000)).double()
        x = torch.randn(2, 64, 14, 14, dtype=torch.float64)
        z = model[0](x).detach().requires_grad_()
        y = model[1](z)
        y.retain_grad()
        out = model[2:](y)
        out.backward(torch.randn_like(out))
        q = (1 / (z.detach().var((0, 2, 3), unbiased=False) + model[1].eps)).mean()
        shared_in = z.grad.mean((2, 3)).square().mean()
        shared_out = y.grad.mean((2, 3)).square().mean()
        ratios.append((shared_in / (q * shared_out)).item())
    g = Grad(1.0, shared=0.5)
    predicted = shared.batch_normed(g, 1.0, 2)[0] / g.shared
    assert sum(ratios) / 3 == pytest.approx(predicted, rel=0.15)


@pytest.mark.parametrize("seed", range(3))
def test_a_channel_mean_is_shared_by_its_max_pool_windows(seed):
    """A conv of a rectified input gives channel c the mean w_c . E[x] + b_c (1/pi of
    E[y^2] from the ReLU before it, and the bias), and a 2x2 window lies in one channel:
    the ReLU under the pool drops each window whose four elements are all negative,
    E_m[Phi(-m/sd)^4] ~ 0.15 of them, where independent zero-mean elements give 1/16
    (the gate 0.94 against ~0.85 measured). Within 4%: 3 sd of the seed's scatter at
    256 channels (1.3% over 8 seeds)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(256, 256, 1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(256 * 8 * 8, 10))
    relu = varprobe.probe(model, torch.randn(8, 256, 16, 16)).layers[2]
    measured = relu.backward_input.var / relu.backward.var
    predicted = relu.predicted.backward_input_var / relu.predicted.backward_var
    assert measured / predicted == pytest.approx(1, abs=0.04)


def _gate_ratio(model: nn.Module, x: torch.Tensor, relu: int) -> float:
    """Measured over predicted E[f'^2] of the ReLU at ``relu`` (the step from its
    output's gradient to that of the conv before it)."""
    layers = varprobe.probe(model, x).layers
    conv, act = layers[relu - 1], layers[relu]
    return (conv.backward.var / act.backward.var) / \
        (conv.predicted.backward_var / act.predicted.backward_var)


def test_a_stack_without_norms_passes_its_units_means_on():
    """Two convs after a ReLU: the second's channels have means of share
    relu_kernel(1/pi) = 0.49 (two samples at one unit correlate, and a ReLU maps that
    correlation by the arc-cosine kernel), not the 1/pi of a fresh ReLU, so its
    pool's windows are all negative more often (gate 0.79 measured; 0.85 with 1/pi).
    Mean over 4 seeds within 3% (3 sd of that mean; one seed scatters by 1.9%)."""
    ratios = []
    for seed in range(4):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.ReLU(), nn.Conv2d(256, 256, 1), nn.ReLU(),
                              nn.Conv2d(256, 256, 1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(256 * 8 * 8, 10))
        ratios.append(_gate_ratio(model, torch.randn(8, 256, 16, 16), 4))
    assert sum(ratios) / len(ratios) == pytest.approx(1, abs=0.03)


def test_a_padded_conv_gives_each_position_its_own_mean():
    """A 3x3 conv with zero padding on a 2x2 map: each position sums 4 of the 9 taps
    of the input's channel means, two positions share 2 or 1 of them, so a window
    shares only part of its mean (maxgate's Monte Carlo over the taps). Input of mean
    share 0.82: one shared mean gives the gate 0.68, independent elements 0.94, ~0.85
    is measured. Mean over 4 seeds within 4% (sd of one seed 1.8%, of the Monte
    Carlo 0.5%)."""
    ratios = []
    for seed in range(4):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(256, 10))
        ratios.append(_gate_ratio(model, torch.randn(8, 256, 2, 2).abs() + 0.5, 1))
    assert sum(ratios) / len(ratios) == pytest.approx(1, abs=0.04)
