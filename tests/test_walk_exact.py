"""theory.walk over the chain of calls: the closed-form predictions, checked by exact
arithmetic.

The recursions are deterministic functions of the recorded numbers, so these checks
use tight relative tolerances (1e-9: float64 round-off over a few dozen products).
How well the measurements follow them is tests/test_montecarlo.py's subject.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from zoo import gauss, mlp

from varprobe import inputs, theory
from varprobe.pipeline import _record
from varprobe.report import Report, TensorInfo
from varprobe.state import preserved
from varprobe.theory import annotate, end_to_end

EXACT = 1e-9  # float64 round-off over <= 30 products and sums


def probe(model: nn.Module, batch_size: int, input_shape=None, mode: str = "train",
          seed: int = 0, mean_zero: bool = False) -> Report:
    """Record one pass and annotate it without a recording: the calls in execution order
    stand in for the dataflow (theory.nodes.chain); ``mean_zero``: the input less its
    mean."""
    generator = torch.Generator().manual_seed(seed)
    with preserved(model):  # BatchNorm running stats, modes: as the pipeline leaves them
        model.train(mode == "train")
        x = inputs.synthesize(model, batch_size, input_shape, generator, torch.device("cpu"))
        x = x - x.mean() if mean_zero else x
        report, modules = _record(model, x, None, None, generator, settings={}, target="m")
        annotate(report, modules)
        return report


def centred(model: nn.Module) -> nn.Module:
    """Biases with mean 0 over their units. A bias's mean shifts every ReLU input alike
    (theory.rules.activate: a first-order change in E[relu(y)²]), which the bare
    recursions these tests write out leave out."""
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias -= m.bias.mean()
    return model


def weights(report: Report):
    return report.weight_layers


def w2(layer) -> float:
    return layer.weight_second_moment


def through(layer, fan: float, m2: float, mu: float) -> float:
    """A weight layer's E[y^2] from an input of E[x^2] = m2 whose elements share the
    mean mu: the rest of the input by n E[w^2], the mean by the measured sums of the
    layer's own weights (G, and B with its bias: mean (b + mu S)^2, varprobe.mean_gain)."""
    b2 = layer.bias_second_moment if math.isfinite(layer.bias_second_moment) else 0.0
    mean = b2 + 2 * mu * layer.weight_bias_cross \
        + mu * mu * layer.weight_mean_gain
    return fan * w2(layer) * (m2 - mu * mu) + max(mean, 0.0)


def relu_of(var: float) -> tuple[float, float]:
    """(E[relu(z)^2], E[relu(z)]) for z ~ N(0, var)."""
    return var / 2, math.sqrt(var / (2 * math.pi))


def test_chain_is_he_recursion_over_30_relu_layers():
    n, depth = 64, 30
    model = mlp([n] * (depth + 1), gauss(lambda i, o: 1 / i))
    report = probe(model, batch_size=8)
    ws = weights(report)
    x2 = report.input.second_moment
    expected = through(ws[0], n, x2, report.input.mean)
    for i, layer in enumerate(ws):
        if i:  # a ReLU of a zero-mean input: half of E[x^2], and a mean every unit shares
            expected = through(layer, n, *relu_of(expected))
        assert layer.predicted.basis == "graph"
        assert layer.predicted.forward_var == pytest.approx(expected, rel=EXACT)
    # Var[w] = 1/n (the paper's "Xavier", scheme lecun): layer 30 is 2^-29 of layer 1.
    lecun = [layer.schemes["lecun"].forward_var for layer in ws]
    assert lecun[0] == pytest.approx(x2, rel=EXACT)
    assert lecun[-1] / lecun[0] == pytest.approx(2.0 ** -29, rel=EXACT)
    # He keeps every layer at 2 E[x^2] forward and the cotangent's Var backward.
    cot = report.layers[-1].backward.var
    for layer in ws:
        assert layer.schemes["he"].forward_var == pytest.approx(2 * x2, rel=EXACT)
        assert layer.schemes["he"].backward_var == pytest.approx(cot, rel=EXACT)
    assert ws[0].schemes["lecun"].backward_var == pytest.approx(cot * 2.0 ** -29, rel=EXACT)
    assert end_to_end(report, "he") == pytest.approx((2.0, 1.0), rel=EXACT)
    fwd, bwd = end_to_end(report)
    assert (fwd, bwd) == (report.summary.forward_ratio, report.summary.backward_ratio)
    assert fwd == pytest.approx(ws[-1].predicted.forward_var / x2, rel=EXACT)


def test_backward_chain_and_multipliers():
    model = centred(mlp([32, 48, 40, 24], gauss(lambda i, o: 0.09 / i), bias=True))
    report = probe(model, batch_size=16)
    ws = weights(report)
    grad = report.layers[-1].backward.var
    for layer in reversed(ws):
        assert layer.predicted.backward_var == pytest.approx(grad, rel=EXACT)
        dx = layer.fan_out * w2(layer) * grad
        assert layer.predicted.backward_input_var == pytest.approx(dx, rel=EXACT)
        assert layer.backward_multiplier == pytest.approx(
            layer.fan_out * w2(layer) * (layer.backward_gain or 1.0), rel=EXACT)
        grad = 0.5 * dx
    assert ws[0].forward_multiplier == pytest.approx(32 * w2(ws[0]), rel=EXACT)
    assert ws[1].forward_multiplier == pytest.approx(48 * w2(ws[1]) * 0.5, rel=EXACT)
    assert (ws[0].activation, ws[0].gain, ws[0].backward_gain) == ("ReLU", 0.5, 0.5)
    assert (ws[1].input_activation, ws[1].input_gain) == ("ReLU", 0.5)
    assert ws[-1].activation is None and ws[-1].gain is None


def test_local_prediction_is_one_step_from_the_measured_input():
    model = mlp([16, 32, 8], gauss(lambda i, o: 1 / i), bias=True)
    report = probe(model, batch_size=32)
    for layer in weights(report):
        local = layer.local
        assert local.basis == "local"
        # the independence assumptions' step (the theory_mismatch check's): n E[w^2] E[x^2]
        expected = layer.fan_in * w2(layer) * layer.input.second_moment + \
            layer.bias_second_moment
        assert local.forward_var == pytest.approx(expected, rel=EXACT)
        assert local.backward_input_var == pytest.approx(
            layer.fan_out * w2(layer) * layer.backward.var, rel=EXACT)
    assert Report.from_dict(report.to_dict()).layers[0].local == report.layers[0].local


def test_prelu_factor_and_he_prelu_scheme():
    a, n, depth = 0.25, 32, 12
    model = mlp([n] * (depth + 1), gauss(lambda i, o: 1 / i), act=lambda: nn.PReLU(init=a))
    report = probe(model, batch_size=8)
    ws = weights(report)
    lecun = [layer.schemes["lecun"].forward_var for layer in ws]
    for prev, cur in zip(lecun, lecun[1:]):
        assert cur / prev == pytest.approx(0.53125, rel=EXACT)
    x2 = report.input.second_moment
    # Eq. 15 with the slope a of the PReLU that feeds each layer: 2/(1+a^2) E[x^2], flat.
    for layer in ws:
        assert layer.schemes["he-prelu"].forward_var == pytest.approx(2 / (1 + a * a) * x2,
                                                                      rel=EXACT)
    assert ws[0].gain == pytest.approx(0.53125, rel=EXACT)


def test_fan_in_and_fan_out_he_telescope_on_widening_layers():
    # docs/theory-review.md §2: widths 256 -> 2048; products telescope to c_2/d_L and d_L/d_1.
    widths = [256, 256, 512, 1024, 2048, 2048]
    model = mlp(widths)
    report = probe(model, batch_size=2)
    ws = weights(report)
    x2, cot = report.input.second_moment, report.layers[-1].backward.var
    d1, dl = widths[1], widths[-1]
    for layer in ws:
        assert layer.schemes["he"].forward_var == pytest.approx(2 * x2, rel=EXACT)
        assert layer.schemes["he-fan-out"].backward_var == pytest.approx(cot, rel=EXACT)
    assert ws[0].schemes["he"].backward_var == pytest.approx(cot * dl / d1, rel=EXACT)
    assert ws[-1].schemes["he-fan-out"].forward_var == pytest.approx(2 * x2 * d1 / dl,
                                                                     rel=EXACT)
    assert dl / d1 == 8 and 2 * d1 / dl == 0.25


def test_torch_default_scheme_shrinks_by_one_sixth_per_relu_layer():
    n = 64
    model = centred(mlp([n] * 8, bias=True))  # PyTorch's default init, biases included
    report = probe(model, batch_size=8)
    ws = weights(report)
    default = [layer.schemes["torch-default"].forward_var for layer in ws]
    for prev, cur in zip(default, default[1:]):  # and adds its bias' 1/(3n)
        assert cur == pytest.approx(prev / 6 + 1 / (3 * n), rel=EXACT)
    # The measured weights: kaiming_uniform_(a=sqrt(5)) has Var = 1/(3n); the sample
    # second moment of n^2 uniform entries has relative sd sqrt(0.8)/n (E[w^4]/E[w^2]^2
    # = 9/5), so 4 sd bounds the multiplier's distance from 1/6.
    for layer in ws[1:]:
        assert layer.forward_multiplier == pytest.approx(1 / 6, rel=4 * math.sqrt(0.8) / n)
    # and the chain adds each layer's mean(b^2), with the mean its ReLU passes on.
    for prev, layer in zip(ws, ws[1:]):
        expected = through(layer, n, *relu_of(prev.predicted.forward_var))
        assert layer.predicted.forward_var == pytest.approx(expected, rel=EXACT)


VGG = (64, 64, 128, 128, 256, 256, 512, 512, 512, 512)


def vgg(std: float) -> nn.Sequential:
    """3x3 convs with the given channels, ReLU after each; weights exactly +-std."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for c_in, c_out in zip((3, *VGG), VGG):
        conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(std * torch.randint(0, 2, conv.weight.shape).mul(2).sub(1))
        layers += [conv, nn.ReLU()]
    return nn.Sequential(*layers)


def test_vgg_std_001_gradient_is_1_over_17000_of_backward_he():
    # He et al. 2015, "Discussions": std 0.01 vs the Eq. 14 stds sqrt(2/n^) makes the
    # conv10 -> conv2 gradient 1/(1.7e4) of theirs (docs/theory-review.md §4: exact 1.67e4).
    report = probe(vgg(0.01), 1, input_shape=(3, 4, 4))
    conv2 = weights(report)[1]
    ours = conv2.predicted.backward_input_var
    he = conv2.schemes["he-fan-out"].backward_input_var
    # Per layer l >= 2: (1/2 n^ E[w^2]) / (1/2 n^ 2/n^); the effective fan-out cancels.
    ws = weights(report)
    ratio = math.prod(math.sqrt(0.5 * 9 * d * w2(w)) for d, w in zip(VGG[1:], ws[1:]))
    assert math.sqrt(ours / he) == pytest.approx(ratio, rel=EXACT)
    # float32 holds 0.01 to 2e-8 and its float32 reduction E[w^2] to ~1e-7 relative.
    assert all(w2(w) == pytest.approx(1e-4, rel=1e-6) for w in ws)
    exact = math.prod(math.sqrt(0.5 * 9 * d * 1e-4) for d in VGG[1:])
    assert 1 / exact == pytest.approx(1.67e4, rel=0.01)  # the figure, to its 3 digits
    # Eq. 14's stds for 64/128/256/512 channels are the paper's 0.059/0.042/0.029/0.021.
    stds = [math.sqrt(theory.scheme_variance("he-fan-out", None, 9 * d)) for d in VGG[::2]]
    assert [round(s, 3) for s in stds] == [0.059, 0.042, 0.029, 0.021, 0.021]


def test_padding_makes_the_effective_fan_in_smaller_and_the_prediction_uses_it():
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    report = probe(nn.Sequential(conv), batch_size=4, input_shape=(8, 7, 7))
    layer = report.layers[0]
    f = theory.tap_fraction(conv, [4, 8, 7, 7])
    assert layer.effective_fan_in == pytest.approx(72 * f, rel=EXACT) and f < 0.85
    expected = 72 * f * w2(layer) * layer.input.second_moment
    assert layer.local.forward_var == pytest.approx(expected, rel=EXACT)


def test_norms_and_dropout():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(32)
    with torch.no_grad():
        bn.weight.fill_(0.5)
        bn.bias.fill_(0.3)
    model = nn.Sequential(nn.Linear(16, 32), bn, nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 8))
    report = probe(model, batch_size=64)
    bn_layer, drop, ln, last = report.layers[1], report.layers[3], report.layers[5], \
        report.layers[6]
    # Train-mode BatchNorm resets E[x^2] to gamma^2 s^2/(s^2+eps) + beta^2 (= 0.34 here).
    assert bn_layer.predicted.forward_var == pytest.approx(0.34, rel=1e-3)
    relu_out = report.layers[2].predicted.forward_var
    assert drop.predicted.forward_var == pytest.approx(2 * relu_out, rel=EXACT)
    assert ln.predicted.forward_var == pytest.approx(1.0, rel=1e-3)
    assert last.predicted.forward_var == pytest.approx(32 * w2(last) + last.bias_second_moment,
                                                       rel=1e-3)
    # Eval mode: running stats at their initial 0/1 divide by sqrt(1 + eps): no reset.
    report = probe(model, batch_size=64, mode="eval")
    lin = report.layers[0].predicted.forward_var
    assert report.layers[1].predicted.forward_var == pytest.approx(
        0.25 * lin / (1 + bn.eps) + float(bn.bias.detach()[0]) ** 2, rel=EXACT)
    assert report.layers[3].predicted.forward_var == report.layers[2].predicted.forward_var


def test_max_pool_is_carried_measured_and_named():
    torch.manual_seed(0)
    # No bias before the pool and an input of mean 0: a channel's mean (its bias, its
    # weights' sum times the input's mean) is shared by its windows (rules.max_gate).
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 4))
    report = probe(centred(model), batch_size=8, input_shape=(3, 8, 8), mean_zero=True)
    pool, conv = report.layers[2], report.layers[3]
    assert pool.predicted is None or pool.predicted.forward_var is None
    assert "carried the measured output of MaxPool2d at 2" in conv.predicted.note
    assert conv.predicted.forward_var == pytest.approx(through(
        conv, conv.effective_fan_in, conv.input.second_moment, conv.input.mean), rel=EXACT)
    # A counterfactual applies the measured ratio across the pool, not its value.
    he0 = report.layers[0].schemes["he"].forward_var
    ratio = pool.forward.second_moment / pool.input.second_moment
    expected_in = he0 * 0.5 * ratio
    he1 = conv.schemes["he"]
    assert he1.forward_var == pytest.approx(
        conv.effective_fan_in * 2 / 72 * expected_in, rel=EXACT)
    assert "ratio across MaxPool2d at 2" in he1.note
    # Backward: exact through the pool. Each 2x2 window's gradient lands on its maximum
    # (a quarter of the elements), which the ReLU before it passes unless all four of
    # its inputs are negative (1/16 for zero-mean Gaussians; theory.pools, rules.max_gate).
    first = report.layers[0].predicted
    assert first.backward_var == pytest.approx(
        conv.predicted.backward_input_var / 4 * (1 - 1 / 16), rel=EXACT)


class Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.inner = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.relu(self.inner(x))


def test_unrecorded_operations_are_noticed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), Residual(16), nn.Linear(16, 4))
    report = probe(model, batch_size=32)
    last = report.layers[-1]
    assert "an unrecorded operation (before 2)" in last.predicted.note
    assert last.predicted.forward_var == pytest.approx(through(
        last, last.fan_in, last.input.second_moment, last.input.mean), rel=EXACT)
    assert report.layers[0].predicted.backward_var is not None


def test_closed_form_with_nothing_measured():
    """The `predict` situation: no input, no gradients, no weight statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.MaxPool1d(2), nn.Linear(16, 4))
    x = torch.randn(4, 16)
    report, modules = _record(model, x, None, None, torch.Generator().manual_seed(0),
                              settings={}, target="m")
    for layer in report.layers:
        layer.input = layer.forward = layer.backward = layer.backward_input = None
        layer.weight_var = layer.weight_second_moment = layer.bias_second_moment = None
    report.input = TensorInfo(shape=[4, 16], dtype="float32", mean=None, var=None,
                              second_moment=None)
    annotate(report, modules)
    first, second, last = report.weight_layers
    # PyTorch's default init assumed: Var[w] = mean(b^2) = 1/(3 n), input E[x^2] = 1.
    assert first.predicted.forward_var == pytest.approx(16 / 48 + 1 / 48, rel=EXACT)
    assert "input E[x²] = 1 assumed" in first.predicted.note
    assert "PyTorch's default" in first.predicted.note
    expected = 32 / 96 * 0.5 * first.predicted.forward_var + 1 / 96
    assert second.predicted.forward_var == pytest.approx(expected, rel=EXACT)
    assert last.predicted.forward_var is None
    assert "could not follow MaxPool1d at 4" in last.predicted.note
    assert last.schemes["he"].forward_var is None
    assert last.predicted.backward_var == 1.0  # cotangent Var = 1 assumed
    assert report.summary.forward_ratio is None
