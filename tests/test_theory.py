"""theory.py against the published values, torch.nn.init, exact counts and Monte Carlo."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from varprobe import probe, theory

# docs/theory-review.md §8, values at q = 1: (module, E[phi^2], E[phi'^2]).
TABLE = [
    (nn.ReLU(), 0.500000, 0.500000),
    (nn.PReLU(init=0.25), 0.531250, 0.531250),
    (nn.Tanh(), 0.394294, 0.464403),
    (nn.Sigmoid(), 0.293379, 0.044836),
    (nn.GELU(), 0.425221, 0.455851),
    (nn.SiLU(), 0.355776, 0.379482),
    (nn.ELU(), 0.644945, 0.668102),
    (nn.SELU(), 1.000000, 1.071575),
]


@pytest.mark.parametrize(("module", "second_moment", "slope_moment"), TABLE,
                         ids=[type(m).__name__ for m, *_ in TABLE])
def test_gains_match_the_published_table(module, second_moment, slope_moment):
    # The table is printed to 6 decimals: 1e-4 leaves room only for rounding.
    assert theory.forward_gain(module, 1.0) == pytest.approx(second_moment, abs=1e-4)
    assert theory.backward_gain(module, 1.0) == pytest.approx(slope_moment, abs=1e-4)


def test_split_rule_is_exact_on_the_relu_kink_where_odd_gauss_hermite_is_not():
    # Threshold(0, 0) is ReLU, but goes through the quadrature path, not the closed form.
    relu = nn.Threshold(0.0, 0.0)
    assert theory.forward_gain(relu, 1.0) == pytest.approx(0.5, abs=1e-9)
    assert theory.backward_gain(relu, 1.0) == pytest.approx(0.5, abs=1e-9)
    # An odd Gauss-Hermite rule puts a node on the kink
    # (docs/theory-review.md §8: 0.45585 at n=201).
    z, w = np.polynomial.hermite_e.hermegauss(201)
    odd = float(np.sum(w / math.sqrt(2 * math.pi) * (z > 0)))
    assert abs(odd - 0.5) > 0.04


@pytest.mark.parametrize("q", [0.01, 0.3, 1.0, 7.0, 250.0])
def test_prelu_gain_is_053125_at_every_q(q):
    # (1 + a^2)/2 at a = 0.25, exactly, by positive homogeneity.
    prelu = nn.PReLU(init=0.25)
    assert theory.forward_gain(prelu, q) == 0.53125
    assert theory.backward_gain(prelu, q) == 0.53125
    leaky = lambda y: F.leaky_relu(y, 0.25)  # noqa: E731 -- the same map, by quadrature
    assert theory.expectation(lambda y: leaky(y) ** 2, q) / q == pytest.approx(0.53125, abs=1e-9)


def test_slopes_of_the_rectifiers():
    assert theory.prelu_slope(nn.ReLU()) == 0.0
    assert theory.prelu_slope(nn.LeakyReLU(0.1)) == pytest.approx(0.1)
    assert theory.prelu_slope(nn.Tanh()) is None
    channelwise = nn.PReLU(3)
    with torch.no_grad():
        channelwise.weight.copy_(torch.tensor([0.1, 0.5, -0.9]))
    mean_gain = float(((1 + channelwise.weight.detach().double() ** 2) / 2).mean())
    assert theory.forward_gain(channelwise) == pytest.approx(mean_gain, rel=1e-12)
    assert theory.prelu_slope(nn.RReLU(0.1, 0.3).eval()) == pytest.approx(0.2)


def test_rrelu_train_gain_matches_sampling():
    # Train mode draws a ~ U(0, 2) per element: E[f^2] = q/2 (1 + E[a^2]) = 7/6 q,
    # not q/2 (1 + 1^2) = q as the mean slope would say.
    rrelu = nn.RReLU(0.0, 2.0).train()
    gen = torch.Generator().manual_seed(0)
    n = 1_000_000
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = float(rrelu(y).square().mean())
    # sd of the mean of f^2: sqrt((E f^4 - (E f^2)^2)/n), E f^4 = 3/2 (1 + E a^4) = 3/2 * 21/5.
    sd = math.sqrt((1.5 * 4.2 - (7 / 6) ** 2) / n)
    assert theory.forward_gain(rrelu) == pytest.approx(7 / 6, rel=1e-12)
    assert abs(m - 7 / 6) < 5 * sd
    assert theory.forward_gain(rrelu.eval()) == pytest.approx(1.0)


def test_every_elementwise_activation_has_gains():
    for module in (nn.GELU(approximate="tanh"), nn.CELU(), nn.Softplus(), nn.Mish(),
                   nn.Hardswish(), nn.Hardsigmoid(), nn.Hardtanh(), nn.ReLU6(inplace=True),
                   nn.LogSigmoid(), nn.Softsign(), nn.Tanhshrink(), nn.Hardshrink()):
        assert theory.gain_unavailable_reason(module, 2.0) is None, module
        assert theory.forward_gain(module, 2.0) > 0 and theory.backward_gain(module, 2.0) > 0
    assert theory.forward_gain(nn.Identity(), 5.0) == theory.backward_gain(nn.Identity()) == 1.0


@pytest.mark.parametrize("a", [0.0, 0.01, 0.25, -0.5])
@pytest.mark.parametrize("mu, var", [(0.0, 1.0), (0.8, 0.3), (-1.5, 2.0), (3.0, 0.1)])
def test_rectified_moments_with_a_mean_match_quadrature(a, mu, var):
    # The truncated-normal closed forms against the split Gauss-Legendre rule (cut at
    # the kink, which sits at y = -mu; accurate to ~1e-9, see theory.expectation).
    def f(y):
        z = y + mu
        return torch.where(z > 0, z, a * z)

    def slope(y):
        return torch.where(y + mu > 0, 1.0, a).double()

    mean, m2, slope2 = theory.rectified_moments(a, mu, var)
    kink = (-mu,)
    assert mean == pytest.approx(theory.expectation(f, var, kink), abs=1e-9)
    assert m2 == pytest.approx(theory.expectation(lambda y: f(y) ** 2, var, kink), abs=1e-9)
    assert slope2 == pytest.approx(theory.expectation(lambda y: slope(y) ** 2, var, kink),
                                   abs=1e-9)


def test_kinks_away_from_zero_are_split_exactly():
    # Hardtanh' = 1 on (-1, 1): E[f'^2] = P(|y| < 1) = erf(1/sqrt(2q)); Hardsigmoid' = 1/6
    # on (-3, 3). A rule cut only at 0 is off by 1e-2 (Hardtanh) and 2e-3 relative
    # (Hardsigmoid, q=4). torch's hardsigmoid slope is 1/6 rounded to float32: 6e-8 relative.
    for q in (0.5, 1.0, 4.0):
        assert theory.backward_gain(nn.Hardtanh(), q) == pytest.approx(
            math.erf(1 / math.sqrt(2 * q)), abs=1e-10)
        assert theory.backward_gain(nn.Hardsigmoid(), q) == pytest.approx(
            math.erf(3 / math.sqrt(2 * q)) / 36, rel=1e-6)


def test_gains_are_none_with_a_reason():
    softmax = nn.Softmax(dim=-1)
    assert theory.forward_gain(softmax) is None and theory.backward_gain(softmax) is None
    assert "not an elementwise" in theory.gain_unavailable_reason(softmax)
    assert theory.forward_gain(nn.Linear(2, 2)) is None
    assert theory.forward_gain(nn.Tanh(), 0.0) is None
    assert "positive" in theory.gain_unavailable_reason(nn.Tanh(), float("nan"))
    broken = nn.Tanh()
    broken.forward = lambda x: (_ for _ in ()).throw(RuntimeError("boom"))
    assert theory.forward_gain(broken) is None
    assert "boom" in theory.gain_unavailable_reason(broken)
    reducing = nn.Tanh()
    reducing.forward = lambda x: x.sum()
    assert "shape" in theory.gain_unavailable_reason(reducing)


def _ones_counts(module, input_shape):
    """Mean taps per output and mean outputs per input, counted by running the module
    itself with unit weights on a unit input and backpropagating a unit gradient."""
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(1.0) if p.dim() > 1 else p.zero_()
    x = torch.ones(input_shape, dtype=torch.float64, requires_grad=True)
    y = module(x)
    y.backward(torch.ones_like(y))
    return float(y.detach().mean()), float(x.grad.mean())


CONVS = [
    (nn.Conv2d(4, 4, 3, groups=4), (2, 4, 9, 9)),
    (nn.Conv2d(6, 8, 3, padding=1, stride=2, groups=2), (1, 6, 8, 8)),
    (nn.Conv2d(3, 5, 3, padding=2, dilation=2), (1, 3, 7, 6)),
    (nn.Conv2d(3, 5, 4, padding="same"), (1, 3, 7, 7)),
    (nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), (1, 3, 7, 7)),
    (nn.Conv1d(2, 3, 5, padding=2, stride=3), (1, 2, 11)),
    (nn.Conv3d(2, 2, 3, padding=1), (1, 2, 4, 5, 3)),
    (nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1, groups=2), (1, 8, 5, 5)),
    (nn.ConvTranspose1d(3, 6, 4, stride=2, padding=1), (1, 3, 9)),
]


@pytest.mark.parametrize(("module", "shape"), CONVS, ids=[
    "depthwise", "grouped-strided", "dilated", "same-even-kernel", "reflect", "conv1d-strided",
    "conv3d", "transposed-grouped", "transposed1d"])
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_effective_fans_count_the_taps_the_module_really_uses(module, shape):
    taps, feeds = _ones_counts(module, shape)
    fan_in, fan_out = theory.effective_fans(module, shape)
    assert fan_in == pytest.approx(taps, rel=1e-12)
    assert fan_out == pytest.approx(feeds, rel=1e-12)


class CausalConv3d(nn.Conv3d):
    """A video model's causal conv: no padding of its own, two frames of zeros in front
    and a spatial border added in its forward (diffusers' WanCausalConv3d)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 3)

    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 1, 1, 2, 0)))


def test_a_conv_that_pads_in_its_own_forward_keeps_its_nominal_fans():
    """Its attributes describe another conv than the one it runs (on one frame the kernel
    outgrows the unpadded input): the effective fans are unknown, the nominal ones stand,
    and the probe predicts every layer."""
    conv = CausalConv3d(4, 4)
    assert theory.effective_fans(conv, (2, 4, 1, 8, 8)) is None
    assert theory.effective_fans(conv, (2, 4, 5, 8, 8), (2, 4, 5, 8, 8)) is None
    torch.manual_seed(0)
    report = probe(nn.Sequential(CausalConv3d(4, 8), nn.ReLU(), CausalConv3d(8, 4)),
                   torch.randn(2, 4, 1, 8, 8))
    for layer in report.weight_layers:
        assert layer.effective_fan_in == layer.fan_in and layer.predicted.forward_var > 0


def test_grouped_and_depthwise_fans():
    depthwise = nn.Conv2d(4, 4, 3, groups=4)
    assert theory.fans(depthwise) == (9, 9)
    assert theory.torch_fans(depthwise) == (9, 36)  # pytorch#23854
    grouped = nn.Conv2d(8, 16, (3, 5), groups=4)
    assert theory.fans(grouped) == (2 * 15, 4 * 15)
    # Away from borders, every output sees fan_in taps and every input feeds fan_out outputs.
    assert _ones_counts(depthwise, (1, 4, 3, 3)) == (9.0, 1.0)
    # Unpadded 3x3 on 100x100: 98x98 outputs, each taking 9 taps, spread over 100x100 inputs.
    _, fan_out = theory.effective_fans(nn.Conv2d(8, 16, 3, groups=4), (1, 8, 100, 100))
    assert fan_out == pytest.approx(4 * 9 * 98 * 98 / 100**2, rel=1e-12)


def test_transposed_conv_fans():
    up = nn.ConvTranspose2d(8, 6, 3, stride=2, groups=2)  # weight (8, 3, 3, 3)
    assert theory.fans(up) == (4 * 9, 3 * 9)
    assert theory.torch_fans(up) == (27, 72)  # torch reads the weight's dims the other way
    # Stride 2 in 2-D: an output receives about 9/4 of the 9 taps.
    fan_in, _ = theory.effective_fans(nn.ConvTranspose2d(1, 1, 3, stride=2), (1, 1, 200, 200))
    assert fan_in == pytest.approx(9 / 4, rel=0.01)


def test_other_fans():
    assert theory.fans(nn.Linear(7, 3)) == (7, 3)
    assert _ones_counts(nn.Linear(7, 3), (2, 7)) == (7.0, 3.0)
    assert theory.fans(nn.Embedding(10, 4)) == (1, None)
    assert theory.fans(nn.LSTM(10, 20)) == theory.fans(nn.LSTMCell(10, 20)) == (10, 80)
    assert theory.param_fans(nn.GRUCell(10, 20))["weight_hh"] == (20, 60)
    gru = theory.param_fans(nn.GRU(10, 20, num_layers=2, bidirectional=True))
    assert gru["weight_hh_l0"] == (20, 60) and gru["weight_ih_l1"] == (40, 60)
    assert theory.fans(nn.MultiheadAttention(16, 4)) == (16, 16)
    assert theory.fans(nn.ReLU()) == (None, None)
    bilinear = nn.Bilinear(3, 4, 5).double()
    with torch.no_grad():
        bilinear.weight.fill_(1.0)
        bilinear.bias.zero_()
    x1 = torch.ones(1, 3, dtype=torch.float64, requires_grad=True)
    y = bilinear(x1, torch.ones(1, 4, dtype=torch.float64))
    y.backward(torch.ones_like(y))
    assert theory.fans(bilinear) == (float(y.detach().mean()), float(x1.grad.mean())) == (12, 20)


def test_embedding_fan_in_one_means_output_second_moment_is_the_weights():
    emb = nn.Embedding(50, 8).requires_grad_(False)
    y = emb(torch.arange(50).repeat(3))  # every row read equally often
    fan_in, _ = theory.fans(emb)
    assert float(y.square().mean()) == pytest.approx(
        fan_in * float(emb.weight.square().mean()), rel=1e-6)  # float32 sums


def _fraction(size, k, pad):
    """Mean fraction of in-bounds taps of a 1-D stride-1 conv, by counting."""
    inside = [sum(0 <= i - pad + t < size for t in range(k)) for i in range(size + 2 * pad - k + 1)]
    return sum(inside) / (len(inside) * k)


@pytest.mark.parametrize(("size", "k", "pad", "f"), [
    (32, 3, 1, (94 / 96) ** 2),    # 0.9588 (docs/theory-review.md §9: 0.959)
    (7, 3, 1, (19 / 21) ** 2),     # 0.8186 (0.819)
    (7, 7, 3, (37 / 49) ** 2),     # 0.5702 (0.570)
])
def test_padding_fractions(size, k, pad, f):
    conv = nn.Conv2d(16, 16, k, padding=pad)
    assert _fraction(size, k, pad) ** 2 == pytest.approx(f, rel=1e-12)
    assert theory.tap_fraction(conv, (1, 16, size, size)) == pytest.approx(f, rel=1e-12)
    assert theory.effective_fans(conv, (1, 16, size, size))[0] == pytest.approx(16 * k * k * f)


@pytest.mark.parametrize(("k", "pad", "stride", "size"), [(3, 1, 1, 7), (7, 3, 1, 7)])
def test_padding_correction_against_monte_carlo(k, pad, stride, size):
    # He weights on N(0,1) inputs: E[y^2] = n Var[w] f E[x^2] = 2f, exact in expectation
    # (docs/theory-review.md §1). Relative sd of the all-element mean of y^2 for one draw:
    # weights 2/N_w, the n x n patch Gram seen by C_out independent filters 2/(C_out B P),
    # input norms 2/N_x (docs/theory-review.md §10: local checks go as sqrt(c/n)). 5 sd.
    c, batch = 64, 32
    gen = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(c, c, k, padding=pad, stride=stride, bias=False).double()
    n = c * k * k
    with torch.no_grad():
        conv.weight.normal_(0.0, math.sqrt(2 / n), generator=gen)
        x = torch.randn(batch, c, size, size, generator=gen, dtype=torch.float64)
        y = conv(x)
    positions = y.shape[-1] * y.shape[-2]
    sd = math.sqrt(2 / conv.weight.numel() + 2 / (c * batch * positions) + 2 / x.numel())
    f = theory.tap_fraction(conv, x.shape)
    ratio = float(y.square().mean()) / (2 * f)
    assert abs(ratio - 1) < 5 * sd
    assert abs(float(y.square().mean()) / 2 - 1) > 5 * sd  # the uncorrected 2 is rejected


def _sampled(init, shape, a=None):
    w = torch.empty(shape, dtype=torch.float64)
    torch.manual_seed(3)
    init(w) if a is None else init(w, a=a, nonlinearity="leaky_relu")
    return float(w.var())


# Relative sd of a sample variance over N weights: sqrt(2/N) for a Gaussian,
# sqrt(0.8/N) for a uniform (kurtosis 9/5). 5 sd.
def _close(measured, expected, n, kurtosis=3.0):
    return abs(measured / expected - 1) < 5 * math.sqrt((kurtosis - 1) / n)


def test_scheme_variances_match_torch_init():
    conv = nn.Conv2d(32, 64, 3)
    shape = conv.weight.shape
    n = conv.weight.numel()
    fan_in, fan_out = theory.fans(conv)
    he = theory.scheme_variance("he", fan_in, fan_out)
    assert he == 2 / 288
    assert _close(_sampled(nn.init.kaiming_normal_, shape), he, n)
    assert _close(_sampled(lambda w: nn.init.kaiming_normal_(w, mode="fan_out"), shape),
                  theory.scheme_variance("he-fan-out", fan_in, fan_out), n)
    assert _close(_sampled(nn.init.xavier_normal_, shape),
                  theory.scheme_variance("xavier", fan_in, fan_out), n)
    assert _close(_sampled(nn.init.kaiming_normal_, shape, a=0.25),
                  theory.scheme_variance("he-prelu", fan_in, fan_out, a=0.25), n)
    assert _close(_sampled(lambda w: nn.init.kaiming_normal_(w, nonlinearity="linear"), shape),
                  theory.scheme_variance("lecun", fan_in, fan_out), n)
    # The schemes differ by far more than the sampling error.
    assert not _close(_sampled(nn.init.kaiming_normal_, shape),
                      theory.scheme_variance("xavier", fan_in, fan_out), n)


def test_torch_default_init_is_one_third_over_fan_in():
    torch.manual_seed(0)
    linear = nn.Linear(300, 400)
    expected = theory.scheme_variance("torch-default", *theory.fans(linear))
    assert expected == 1 / 900
    w = linear.weight.detach()
    assert _close(float(w.var()), expected, w.numel(), kurtosis=1.8)
    # Transposed convs: torch's default scales by its own (swapped) fan-in.
    up = nn.ConvTranspose2d(16, 48, 3)
    expected = theory.scheme_variance("torch-default", *theory.torch_fans(up))
    assert expected == 1 / (3 * 48 * 9)
    assert _close(float(up.weight.detach().var()), expected, up.weight.numel(), kurtosis=1.8)


def test_scheme_errors_and_missing_fans():
    with pytest.raises(ValueError, match="xavier, he, he-fan-out, he-prelu, torch-default, lecun"):
        theory.scheme_variance("glorot", 10, 10)
    assert theory.scheme_variance("xavier", 1, None) is None
    assert theory.scheme_variance("he", 1, None) == 2.0
    assert theory.scheme_variance("he-fan-out", None, 4) == 0.5


# Where an activation is zero with (next to) no slope, a unit zero for every sample may
# be dead: ReLU's y <= 0, Hardswish's y <= -3, Hardsigmoid's, the shrinks' band, GELU's
# float32 tail below -5.4 (1 + erf rounds to 0), tanh-approximated GELU's (tanh rounds
# to -1). Elsewhere the only zero at O(1) inputs is y = 0, where the slope is f'(0).
MAY_DIE = [nn.ReLU(), nn.ReLU6(), nn.Hardswish(), nn.Hardsigmoid(), nn.Hardshrink(),
           nn.Softshrink(), nn.Threshold(0.1, 0.0), nn.GELU(), nn.GELU("tanh"),
           nn.PReLU(init=0.0), nn.Tanhshrink()]  # tanhshrink'(0) = 1 - sech^2(0) = 0
LEARNS = [(nn.SiLU(), 0.5), (nn.Tanh(), 1.0), (nn.ELU(), 1.0), (nn.Mish(), 0.6),
          (nn.Softsign(), 1.0), (nn.Hardtanh(), 1.0), (nn.SELU(), 1.0507 * 1.67326),
          (nn.CELU(), 1.0), (nn.SiLU(inplace=True), 0.5)]


@pytest.mark.parametrize("module", MAY_DIE, ids=lambda m: repr(m))
def test_activations_whose_zeros_may_be_dead(module):
    assert theory.live_at_zero(module) is None


@pytest.mark.parametrize("module, slope", LEARNS, ids=lambda m: repr(m))
def test_activations_whose_zeros_learn(module, slope):
    why = theory.live_at_zero(module)
    assert why is not None and f"{slope:.3g}" in why


@pytest.mark.parametrize("module, a", [(nn.LeakyReLU(0.01), 0.01), (nn.PReLU(), 0.25)])
def test_rectifiers_with_a_negative_slope_never_die(module, a):
    assert f"slope {a:.3g}" in theory.live_at_zero(module)


def test_a_gelu_fed_only_zeros_learns():
    assert theory.live_at_zero(nn.GELU()) is None  # a zero may be its tail's
    assert "0.5" in theory.live_at_zero(nn.GELU(), zero_input=True)
    assert theory.live_at_zero(nn.ReLU(), zero_input=True) is None
