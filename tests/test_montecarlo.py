"""The predictions against Monte Carlo: measured variances follow He et al. 2015.

Tolerances come from docs/theory-review.md §10 (n = width, l = layer depth, single seed):

* local, per layer: the measured E[y_l^2] against n E[w^2] (measured E[x_l^2]) has a
  deep-layer sd of about sqrt(2/n) in log space (the chi-square of one row of W), so
  |log(meas/pred)| <= 4 sqrt(2/n) (4 sd);
* global, layer l of the chain: every layer multiplies the squared norm by a random
  factor of log-variance 5/n (2/n from W, 3/n from the ReLU sign pattern), so the
  log error at layer l has sd <= sqrt(5 l/n) and |log(meas/pred)| <= 3 sqrt(5 l/n)
  (exceeded by 0-0.3% of 400 seeds at n = 512). Backward errors are about half the
  forward ones, so the same bound, with l the number of layers crossed, holds there;
* the measured layer-to-layer factor: sd about sqrt(5/n), bound 4 sqrt(5/n);
* the local backward step Var[dx] against n^ E[w^2] (measured Var[dy]): sd about
  sqrt(0.75/n), bound 4 sqrt(0.75/n).

Width 512 and batch 256 make these bounds tight enough to separate every pair of
inits tested here by many sd (He vs Xavier differ by 2^-29 at layer 30).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from zoo import gauss, mlp

from tests.test_walk_exact import probe  # one pass, annotated over the chain of calls

N, DEPTH, BATCH = 512, 30, 256


def log_ratio(measured: float, predicted: float) -> float:
    return abs(math.log(measured / predicted))


def check_forward(report, n: int, local: bool = True) -> None:
    for depth, layer in enumerate(report.weight_layers, start=1):
        meas = layer.forward.second_moment
        if local:
            assert log_ratio(meas, layer.local.forward_var) <= 4 * math.sqrt(2 / n), layer.name
        bound = 3 * math.sqrt(5 * depth / n)
        assert log_ratio(meas, layer.predicted.forward_var) <= bound, layer.name


def check_backward(report, n: int) -> None:
    ws = report.weight_layers
    for crossed, layer in enumerate(reversed(ws)):
        meas = layer.backward.var
        bound = 3 * math.sqrt(5 * max(crossed, 1) / n)
        assert log_ratio(meas, layer.predicted.backward_var) <= bound, layer.name
        # The local step dx = W^T dy: docs/theory-review.md §10's backward factor, sd sqrt(0.75/n).
        dx = layer.backward_input.var
        assert log_ratio(dx, layer.local.backward_input_var) <= 4 * math.sqrt(0.75 / n), \
            layer.name


def test_xavier_30_layers_vanish_as_predicted():
    # Var[w] = 1/n, the paper's "Xavier": every ReLU layer halves the signal.
    report = probe(mlp([N] * (DEPTH + 1), gauss(lambda i, o: 1 / i)), batch_size=BATCH)
    ws = report.weight_layers
    check_forward(report, N)
    check_backward(report, N)
    first, last = ws[0].forward.second_moment, ws[-1].forward.second_moment
    # 2^-29 = 1.9e-9; the global bound at l = 30 (a factor e^1.62 = 5) keeps it far
    # from He's 1: the measured end-to-end ratio must be within it.
    assert log_ratio(last / first, 2.0 ** -29) <= 3 * math.sqrt(5 * DEPTH / N)
    assert log_ratio(ws[0].backward.var / report.layers[-1].backward.var, 2.0 ** -29) <= \
        3 * math.sqrt(5 * DEPTH / N)


def test_he_30_layers_stay_flat():
    report = probe(mlp([N] * (DEPTH + 1), gauss(lambda i, o: 2 / i)), batch_size=BATCH)
    check_forward(report, N)
    check_backward(report, N)
    x2 = report.input.second_moment
    for depth, layer in enumerate(report.weight_layers, start=1):
        # the chain predicts 2 E[x^2] up to the sampling of each E[w^2] (n^2 Gaussian
        # entries, relative sd sqrt(2)/n each) and of each layer's rows' sums, which
        # carry the mean a ReLU's units share (1/pi of its output) at their own
        # mean(S^2) (varprobe.mean_gain: n rows, relative sd sqrt(2/n)): sqrt(l) of
        # each, 4 sd.
        sd = math.sqrt(depth * (2 / N ** 2 + 2 / (math.pi ** 2 * N)))
        assert log_ratio(layer.predicted.forward_var, 2 * x2) <= 4 * sd
        assert log_ratio(layer.forward.second_moment, 2 * x2) <= 3 * math.sqrt(5 * depth / N)


def test_prelu_factor_053125_and_prelu_he_flat():
    a, depth = 0.25, 15  # 0.53125^14 = 1.4e-4: far outside the bound at l = 15 (e^0.9)
    for var_of, factor in ((lambda i, o: 1 / i, 0.53125),
                           (lambda i, o: 2 / ((1 + a * a) * i), 1.0)):
        model = mlp([N] * (depth + 1), gauss(var_of), act=lambda: nn.PReLU(init=a))
        report = probe(model, batch_size=BATCH)
        check_forward(report, N)
        check_backward(report, N)
        ws = report.weight_layers
        first = ws[0].forward.second_moment
        for depth, layer in enumerate(ws, start=1):
            expected = first * factor ** (depth - 1)
            assert log_ratio(layer.forward.second_moment, expected) <= \
                3 * math.sqrt(5 * depth / N)


def test_fan_in_and_fan_out_he_on_widening_layers():
    # docs/theory-review.md §2: fan_in keeps Var[y] = 2 and the gradient grows by d_L/d_1 = 8;
    # fan_out keeps the gradient at 1 and Var[y_L] = 2 d_1/d_L = 0.25. n is the
    # narrowest width (256), the bound's worst case.
    widths = [256, 256, 512, 1024, 2048, 2048]
    n, depth = min(widths), len(widths) - 1
    bound = 3 * math.sqrt(5 * depth / n)
    for mode, fwd, bwd in (("fan_in", 2.0, 8.0), ("fan_out", 0.25, 1.0)):
        init = lambda w: nn.init.kaiming_normal_(w, mode=mode, nonlinearity="relu")  # noqa: E731, B023
        report = probe(mlp(widths, init), batch_size=BATCH)
        check_forward(report, n)
        check_backward(report, n)
        ws = report.weight_layers
        x2, cot = report.input.second_moment, report.layers[-1].backward.var
        assert log_ratio(ws[-1].forward.second_moment / x2, fwd) <= bound, mode
        assert log_ratio(ws[0].backward.var / cot, bwd) <= bound, mode


def test_pytorch_default_init_shrinks_by_one_sixth_per_relu_layer():
    depth = 8
    report = probe(mlp([N] * (depth + 1), None), batch_size=BATCH)  # Var[w] = 1/(3n)
    check_forward(report, N)
    ws = report.weight_layers
    for prev, layer in zip(ws, ws[1:]):
        factor = layer.forward.second_moment / prev.forward.second_moment
        assert log_ratio(factor, 1 / 6) <= 4 * math.sqrt(5 / N), layer.name
    # With the default biases (Var 1/(3n)) the chain adds mean(b^2) and still holds.
    report = probe(mlp([N] * (depth + 1), None, bias=True), batch_size=BATCH)
    check_forward(report, N)


def test_batchnorm_stack_backward_counts_the_mean_relu_leaves():
    # Linear -> BatchNorm -> ReLU x 10, train mode. BatchNorm divides the gradient by
    # the per-unit variance, which after a ReLU input is (1 - 1/pi) of E[y^2]: ignoring
    # that would put the first layer's gradient off by (1/(1 - 1/pi))^10 = 47.
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(10):
        layers += [nn.Linear(N, N), nn.BatchNorm1d(N), nn.ReLU()]
    report = probe(nn.Sequential(*layers, nn.Linear(N, N)), batch_size=BATCH)
    check_forward(report, N)
    check_backward(report, N)
