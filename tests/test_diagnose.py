"""Flags, culprits and fixes: each flag raised by a small model built to have the
problem, absent on a healthy one, and every suggested fix applied and re-measured.

Widths are small (64) where the tolerance allows it. The separations used are large
against the single-draw noise of docs/theory-review.md §10 (log sd of a layer-to-layer factor
≈ sqrt(5/n) = 0.28 at n = 64, of a depth-l ratio ≈ sqrt(5 l / n)).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import zoo
from torch import nn
from torch.nn import functional as F

from varprobe import assert_healthy, probe
from varprobe.diagnose import Thresholds, annotate
from varprobe.errors import VarprobeError
from varprobe.report import Report

WIDTH = 64


def codes(report: Report, severity: str | None = None) -> set[str]:
    return {f.code for layer in report.layers for f in layer.flags
            if severity is None or f.severity == severity}


def flagged(report: Report, code: str) -> list[str]:
    return [layer.label for layer in report.layers if any(f.code == code for f in layer.flags)]


def mlp(depth: int, init=None, act=nn.ReLU, width: int = WIDTH, bias: bool = False,
        seed: int = 0) -> nn.Sequential:
    return zoo.mlp([width] * (depth + 1), init, act, bias, seed)


def he(w):
    nn.init.kaiming_normal_(w, nonlinearity="relu")


def apply_fix(model: nn.Module, report: Report) -> None:
    """Run the suggested code exactly as a user would paste it."""
    exec(report.summary.fix.code, {"nn": nn, "model": model})


# --- healthy models ------------------------------------------------------------------

def test_he_mlp_raises_no_flag_at_all():
    report = probe(mlp(12, he), batch_size=256)
    assert codes(report) == set()
    s = report.summary
    assert (s.healthy, s.errors, s.warnings, s.infos) == (True, 0, 0, 0)
    assert s.fix is None and s.culprits == [] and "holds" in s.verdict


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1, zero_init: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        if zero_init:
            nn.init.zeros_(self.bn2.weight)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return self.relu(out)


class ResNet(nn.Module):
    """A small ResNet: BatchNorm, residual adds, global average pooling, default init."""

    def __init__(self, blocks: int = 2, widths=(8, 16), zero_init: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        layers, c_in = [], widths[0]
        for i, c in enumerate(widths):
            for k in range(blocks):
                layers.append(Block(c_in, c, 2 if i and not k else 1, zero_init))
                c_in = c
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


@pytest.mark.parametrize("kwargs", [{}, {"blocks": 8}, {"zero_init": True}],
                         ids=["resnet", "deep-stages", "zero-init-residual"])
def test_resnet_with_batchnorm_and_global_pooling_is_healthy(kwargs):
    # Global pooling over P = 16 positions makes every conv's per-element gradient
    # ~1e-4 of the cotangent, and 8 blocks per stage make a product of the branches'
    # multipliers taken in series fall below 1e-2; neither is a vanishing gradient.
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    report = probe(ResNet(**kwargs), x)
    assert codes(report, "error") == set() and codes(report, "warning") == set()
    assert report.summary.healthy


# --- the trend flags, their culprits and fixes ---------------------------------------

def test_xavier_relu_vanishes_names_culprits_and_he_fixes_it():
    # every Linear->ReLU step multiplies by n Var[w] g = 1/2: 2^-19 ~ 2e-6 after 20 layers,
    # forward and backward. The weights' gradients g^T x stay level: up the stack E[x²]
    # halves as Var[g] doubles, so ‖∇W‖/‖W‖ is the same in every layer (theory: ratio 1;
    # the backward rule's 1e-2 is e^4.6 away) and the small product is no
    # vanishing_backward: the signal is what vanished, and the forward rule says so
    model = mlp(20, nn.init.xavier_normal_)
    report = probe(model, batch_size=256)
    assert {"vanishing_forward", "shrinks"} <= codes(report)
    assert "vanishing_backward" not in codes(report)
    first, last = report.weight_layers[1], report.weight_layers[-2]
    assert 0.1 < first.weight_grad_ratio / last.weight_grad_ratio < 10
    weights = [layer.label for layer in report.weight_layers]
    assert flagged(report, "vanishing_forward") == [weights[-1]]
    # He: the first layer's missing ReLU is one factor; the last cannot compound
    assert flagged(report, "shrinks") == weights[1:-1]
    s = report.summary
    assert not s.healthy and s.errors == 1 and s.warnings == len(weights) - 2
    assert s.culprits[:2] == weights[1:3] and "Xavier" in s.cause
    fix = s.fix
    assert fix.scheme == "he" and "std=math.sqrt(2 / fan_in)" in fix.code
    assert fix.before[0] < 1e-4 and 0.5 < fix.after[0] < 4
    apply_fix(model, report)
    after = probe(model, batch_size=256)
    assert codes(after, "error") == set() and "shrinks" not in codes(after)


def test_torch_default_init_shrinks_by_a_sixth_and_the_cause_says_so():
    model = mlp(12)  # nn.Linear's own init: n Var[w] = 1/3, times 1/2 for the ReLU
    report = probe(model, batch_size=256)
    assert {"vanishing_forward", "shrinks"} <= codes(report)  # backward: as Xavier's
    shrinks = [f for layer in report.layers for f in layer.flags if f.code == "shrinks"]
    assert all(abs(math.log(f.value * 6)) < 0.1 for f in shrinks)
    assert "1/3" in report.summary.cause
    apply_fix(model, report)
    assert codes(probe(model, batch_size=256), "error") == set()


def test_std_one_weights_explode_and_the_fix_tames_them():
    model = mlp(6, lambda w: nn.init.normal_(w, std=1.0))  # n Var[w] g = 32 per layer
    report = probe(model, batch_size=256)
    assert {"exploding_forward", "exploding_backward", "amplifies"} <= codes(report)
    assert report.summary.fix.after[0] < 10
    apply_fix(model, report)
    assert codes(probe(model, batch_size=256), "error") == set()


def hot_head(classes: int = 10) -> nn.Sequential:
    """BatchNorm'd convs, a pooling module, and a head drawn as torchvision's MNASNet draws
    it: kaiming_uniform_(fan_out), Var[w] = 1/classes, so a 256-wide head starts the
    logits at 256/classes times the pooled features' E[x²]."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.Conv2d(64, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, classes))
    nn.init.kaiming_uniform_(model[-1].weight, mode="fan_out", nonlinearity="sigmoid")
    return model


def test_a_hot_head_is_its_own_culprit_and_the_fix_cools_it():
    model = hot_head()
    x = torch.randn(16, 3, 8, 8)
    report = probe(model, x)
    assert flagged(report, "exploding_forward") == ["8"]
    head = report.layers[-1]
    # its output over its input, the pooled features (its reference): 256 · Var[w] = 25.6
    assert head.forward.second_moment / head.input.second_moment == pytest.approx(
        256 * model[-1].weight.double().square().mean().item(), rel=0.3)
    assert report.summary.culprits == ["8"] and report.summary.cause.startswith("8 ")
    # the fix re-draws the head alone, and pasting it clears the error
    fix = report.summary.fix
    assert fix.layers == ["8"] and "get_submodule('8')" in fix.code
    others = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("8.")}
    apply_fix(model, report)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in others.items())
    after = probe(model, x)
    assert codes(after, "error") == set()
    # its predicted end-to-end forward ratio against the one measured after the paste,
    # within theory_mismatch's 4 sd of a fresh draw over 10 outputs, sqrt(2/10) in log
    # (docs/theory-review.md §10); the old weights' ratio is 25.6/2 = 12.8x away
    head = after.layers[-1]
    measured = head.forward.second_moment / report.input.second_moment
    assert abs(math.log(measured / fix.after[0])) < 4 * math.sqrt(2 / 10)


def test_a_head_fed_an_already_hot_pool_is_not_its_culprit():
    """No norm: the pooled features carry the input's 1e4x scale into the head, whose own
    step is PyTorch's default 1/3: the excess is not the head's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(64, 10))
    report = probe(model, 100 * torch.randn(16, 3, 8, 8))
    assert "exploding_forward" in codes(report, "error")
    assert report.layers[-1].label == "4" and "4" not in report.summary.culprits


def test_prelu_model_gets_he_prelu_with_its_own_slope():
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(16):
        linear = nn.Linear(WIDTH, WIDTH, bias=False)
        nn.init.normal_(linear.weight, std=0.3 / math.sqrt(WIDTH))  # n Var[w] g ~ 0.05
        layers += [linear, nn.PReLU(init=0.25)] if i < 15 else [linear]
    model = nn.Sequential(*layers)
    report = probe(model, batch_size=256)
    assert "vanishing_forward" in codes(report)
    fix = report.summary.fix
    assert fix.scheme == "he-prelu" and "a = 0.25\n" in fix.code
    apply_fix(model, report)
    assert codes(probe(model, batch_size=256), "error") == set()


def test_he_init_under_prelu_is_not_flagged_but_xavier_is():
    # he-relu init under PReLU(0.25): n Var[w] g = 2 * 0.53 = 1.06, inside the band
    model = nn.Sequential(*[m for _ in range(8) for m in
                            (nn.Linear(WIDTH, WIDTH, bias=False), nn.PReLU(init=0.25))])
    for m in model:
        if isinstance(m, nn.Linear):
            he(m.weight)
    assert codes(probe(model, batch_size=256)) <= {"theory_mismatch"}
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)  # 1 * 0.53
    assert "shrinks" in codes(probe(model, batch_size=256))


def test_a_layer_the_user_ignores_is_not_judged():
    model = mlp(4, he)
    with torch.no_grad():
        model[-1].weight.mul_(1e3)  # a deliberately large output layer
    assert flagged(probe(model), "exploding_forward") == ["6"]
    report = probe(model, ignore=["6"])
    assert codes(report) == set() and report.settings["ignore"] == ["6"]


def test_a_scale_invariant_layer_is_not_an_error():
    # BatchNorm makes a layer scale-invariant: forward is fine whatever its scale (while
    # Var[y] >> BatchNorm's eps = 1e-5), and ||dL/dW||/||W|| grows as 1/||W||^2, so a
    # layer scaled by 0.03 gets ~1/0.03^2 = 1100 times the others' relative gradient.
    # That is self-correcting in training (a large relative step grows ||W||, which
    # shrinks the next one), so no error: ||dL/dW||/||W|| is reported, not judged.
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(5) for m in
                            (nn.Linear(WIDTH, WIDTH, bias=False), nn.BatchNorm1d(WIDTH),
                             nn.ReLU())])
    with torch.no_grad():
        model[6].weight.mul_(0.03)
    report = probe(model, batch_size=256)
    ratios = [layer.weight_grad_ratio for layer in report.weight_layers]
    assert ratios[2] > 300 * sorted(ratios)[2]  # the 1/||W||^2 effect is there, ~1100x
    assert report.summary.errors == 0


# --- the other flags -----------------------------------------------------------------

def test_a_zero_initialized_layer_is_no_shrinking_factor():
    """Its n·E[w²]·g is 0, which is no scale that compounds: no ``shrinks``; the exact
    zero it makes is the zero-signal rule's, which names it."""
    model = mlp(8, he)
    nn.init.zeros_(model[8].weight)
    report = probe(model, batch_size=256)
    assert "shrinks" not in codes(report)
    [(layer, f)] = [(la, f) for la in report.layers for f in la.flags
                    if f.code == "vanishing_forward"]
    assert f.value == 0 and "8" in f.culprits


def test_dead_units():
    model = mlp(3, he, bias=True)
    with torch.no_grad():
        model[0].bias[: WIDTH * 3 // 4] = -100.0  # 3/4 of the first ReLU's units never fire
    report = probe(model, batch_size=256)
    assert flagged(report, "dead_units") == ["1"]
    assert "fed by 0" in report.layers[1].flags[0].message
    assert "dead_units" not in codes(probe(mlp(3, he, bias=True)))


def zeroed_units(act: nn.Module, bias: float, units: int) -> nn.Sequential:
    """Linear -> act -> Linear whose first layer's first ``units`` units have zero
    weights and a constant bias: their pre-activation is exactly ``bias`` for every
    sample."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), act, nn.Linear(WIDTH, WIDTH))
    with torch.no_grad():
        model[0].weight[:units] = 0.0
        model[0].bias[:units] = bias
    return model


def zero_rows_learn(model: nn.Sequential, units: int) -> bool:
    """Whether the zeroed units' incoming weights get a gradient (more than 1e-6 of the
    largest): plain autograd on a batch, independent of varprobe."""
    model.zero_grad()
    model(torch.randn(256, WIDTH)).square().sum().backward()
    grad = model[0].weight.grad
    return bool(grad[:units].abs().amax() > 1e-6 * grad.abs().amax())


@pytest.mark.parametrize("act, bias, units, dead", [
    (nn.ReLU(), 0.0, 48, True),      # relu'(0) = 0 in torch: zero units get no gradient
    (nn.SiLU(), 0.0, 48, False),     # silu'(0) = 1/2 and no other zero near O(1) inputs
    (nn.Tanh(), 0.0, 48, False),
    (nn.LeakyReLU(), 0.0, 48, False),
    (nn.GELU(), 0.0, WIDTH, False),  # a whole input of zeros: gelu'(0) = 1/2
    (nn.GELU(), -10.0, 48, True),    # float32's 1 + erf(-10/sqrt 2) is 0: slope ~1e-22
    (nn.Hardswish(), -5.0, 48, True),
])
def test_dead_means_no_gradient(act, bias, units, dead):
    """``units`` of 64 units are zero for every sample; they are flagged dead exactly
    where autograd gives their weights no gradient. (GELU's zeros at part of a layer
    stay ambiguous: zero at y = 0, where it learns, and below -5.4, where it does not.)"""
    model = zeroed_units(act, bias, units)
    assert zero_rows_learn(model, units) is not dead
    layer = probe(model, batch_size=256).layers[1]
    assert layer.forward.zero_fraction >= units / WIDTH
    assert ("dead_units" in {f.code for f in layer.flags}) is dead
    if dead:
        assert layer.forward.dead_fraction == units / WIDTH
    else:
        assert layer.forward.dead_fraction is None
        assert type(act).__name__ in layer.unavailable["dead_fraction"]


class Log(nn.Module):
    def forward(self, x):
        return torch.log(x)  # NaN for every negative input


def test_nonfinite_is_flagged_where_it_first_appears():
    model = nn.Sequential(nn.Linear(8, 8), Log(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    report = probe(model, batch_size=32)
    assert flagged(report, "nonfinite") == ["1"]
    assert report.layers[1].flags[0].severity == "error"
    json.loads(report.to_json())  # NaN stays out of the JSON


def test_theory_mismatch_when_weights_are_not_zero_mean():
    model = mlp(3, he)
    with torch.no_grad():
        model[2].weight.abs_()  # all-positive weights on a ReLU's positive outputs
        model[4].weight.mul_(0.1)  # and a head that keeps the logits small (E[y^2] < 11)
    report = probe(model, batch_size=256)
    assert flagged(report, "theory_mismatch") == ["2"]
    assert report.layers[2].flags[0].severity == "info" and report.summary.healthy


def test_unnormalized_input():
    model = mlp(3, he)
    with torch.no_grad():  # a small head: the logits stay below the output's limit
        model[4].weight.mul_(0.1)
    x = 5 * torch.randn(256, WIDTH, generator=torch.Generator().manual_seed(0))
    report = probe(model, x)
    assert flagged(report, "unnormalized_input") == ["0"]
    assert "softmax" in report.layers[0].flags[0].message
    assert codes(report, "error") == set()


def test_exploding_input_where_nothing_normalizes_it():
    """E[x^2] = 1e4 into a bias-free He ReLU stack: every weight gradient is 100x the
    unit input's (the stack is 1-homogeneous; checked here with autograd), and the error
    says so; a LayerNorm after the first layer makes the stack scale-invariant, and
    leaves only the warning."""
    model = mlp(3, he)
    x = torch.randn(256, WIDTH, generator=torch.Generator().manual_seed(0))
    cot = torch.randn(256, WIDTH, generator=torch.Generator().manual_seed(1))

    def grads(inp):
        model.zero_grad()
        model(inp).backward(cot)
        return [p.grad.norm().item() for p in model.parameters()]

    assert [a / b for a, b in zip(grads(100 * x), grads(x))] == pytest.approx([100] * 3)
    model.zero_grad(set_to_none=True)
    report = probe(model, 100 * x)
    assert flagged(report, "exploding_input") == ["0"]
    assert f"{math.sqrt(report.input.second_moment):.3g}x" in report.layers[0].flags[0].message
    normed = nn.Sequential(model[0], nn.LayerNorm(WIDTH), *model[1:])
    report = probe(normed, 100 * x)
    assert codes(report, "error") == set()
    assert flagged(report, "unnormalized_input") == ["0"]


# --- thresholds, ordering, JSON, assert_healthy --------------------------------------

def test_thresholds_are_configurable_and_recorded():
    model = mlp(8, nn.init.xavier_normal_)  # 2^-7 ~ 8e-3 at the end
    report = probe(model, batch_size=256)
    assert "vanishing_forward" not in codes(report)  # inside the default [1e-6, 1e2]
    tight = Thresholds().updated({"forward": [1e-1, 1e1]}, "test")
    annotate(report, tight)
    assert "vanishing_forward" in codes(report)
    loose = Thresholds().updated({"forward": [1e-4, 1e4], "backward": [1e-4, 1e4]}, "test")
    annotate(report, loose)
    assert codes(report, "error") == set()
    assert report.settings["thresholds"]["forward"] == [1e-4, 1e4]


def test_bad_thresholds_name_the_key():
    with pytest.raises(VarprobeError, match="'forwards'"):
        Thresholds().updated({"forwards": [1, 2]}, "test")
    with pytest.raises(VarprobeError, match="'multiplier'"):
        Thresholds().updated({"multiplier": [2, 1]}, "test")


def test_flags_are_ordered_by_severity_and_survive_json():
    model = mlp(3, he)
    with torch.no_grad():
        model[2].weight.abs_().mul_(50)
    report = probe(model, 100 * torch.randn(64, WIDTH))
    for layer in report.layers:
        ranks = [("error", "warning", "info").index(f.severity) for f in layer.flags]
        assert ranks == sorted(ranks)
    again = Report.from_dict(json.loads(report.to_json()))
    assert again.summary == report.summary
    assert [layer.flags for layer in again.layers] == [layer.flags for layer in report.layers]


def test_assert_healthy():
    assert_healthy(mlp(6, he))
    with pytest.raises(AssertionError, match=r"(?s)vanishing_forward at 38.*fix: he init"):
        assert_healthy(mlp(20, nn.init.xavier_normal_))
    assert_healthy(mlp(20, nn.init.xavier_normal_), forward=(1e-9, 1e9),
                   backward=(1e-9, 1e9))
    with pytest.raises(TypeError, match="'fwd'"):
        assert_healthy(mlp(2, he), fwd=(0.1, 10))


class ZeroedBetween(nn.Module):
    """The signal zeroed by a functional op between two modules, not by a module."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(5))
        self.act = nn.ReLU()

    def forward(self, x):
        h = self.act(self.layers[0](x))
        h = torch.where(h > 100, h, torch.zeros_like(h))
        for layer in self.layers[1:]:
            h = self.act(layer(h))
        return h


def test_a_signal_zeroed_between_modules_says_so():
    report = probe(ZeroedBetween(), batch_size=64)
    message = next(f.message for f in report.layers[2].flags if f.code == "vanishing_forward")
    assert report.layers[2].label == "layers.1"
    assert "died at an operation between modules before layers.1" in message


def test_a_dropout_that_scales_the_signal_is_named():
    """MobileNetV1's config in transformers defaults to classifier dropout 0.999: in
    train mode the survivors are scaled by 1/(1 - p), E[x²] by 1000 on average. No
    weight layer's factor explains the logits' scale; the dropout is named."""
    torch.manual_seed(0)
    model = nn.Sequential(*mlp(3, he, width=WIDTH), nn.Dropout(0.99), nn.Linear(WIDTH, 10))
    report = probe(model, batch_size=256)
    flag_ = next(f for f in report.layers[-1].flags if f.code == "exploding_forward")
    assert flag_.culprits == [report.layers[-2].label]
    assert "scales E[x²] by" in report.summary.cause


class FunctionalMLP(nn.Module):
    """x = F.relu(fc(x)) in a loop, as hand-written code does: no activation module."""

    def __init__(self, init, depth=8):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(depth))
        for layer in self.layers:
            init(layer.weight)

    def forward(self, x):
        for layer in self.layers:
            x = F.relu(layer(x))
        return x


def test_a_functional_relu_is_the_layers_activation():
    """He's n·Var[w]·½ = 1 under F.relu as under nn.ReLU: no flag; the multiplier from
    the layer's own weights (float64) and relu's ½."""
    torch.manual_seed(0)
    model = FunctionalMLP(he)
    report = probe(model, batch_size=256)
    assert codes(report) == set()
    for layer, module in zip(report.layers[1:], model.layers[1:]):
        w2 = module.weight.detach().double().square().mean().item()
        assert (layer.activation, layer.input_activation) == ("ReLU", "ReLU")
        assert layer.forward_multiplier == pytest.approx(WIDTH * w2 * 0.5, rel=1e-6)
    xavier = probe(FunctionalMLP(nn.init.xavier_normal_), batch_size=256)
    assert "shrinks" in codes(xavier)  # ½ per layer under ReLU


class SharedActivation(nn.Module):
    """One ReLU (a module, or F.relu) read by two weight layers, as a pre-activation
    block's first conv and shortcut read relu(bn(x))."""

    def __init__(self, functional: bool):
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.relu = F.relu if functional else nn.ReLU()

    def forward(self, x):
        h = self.relu(self.a(x))
        return self.b(h) + self.c(h)


@pytest.mark.parametrize("functional", [False, True])
def test_every_layer_reading_an_activation_takes_its_gain(functional):
    torch.manual_seed(0)
    model = SharedActivation(functional)
    layers = {la.name: la for la in probe(model, batch_size=64).layers}
    for name in ("b", "c"):
        w2 = getattr(model, name).weight.detach().double().square().mean().item()
        assert (layers[name].input_activation, layers[name].input_gain) == ("ReLU", 0.5)
        assert layers[name].forward_multiplier == pytest.approx(WIDTH * w2 * 0.5, rel=1e-6)


def test_a_small_product_whose_weights_learn_at_one_rate_is_no_vanishing_gradient():
    """A 10-layer tanh MLP at PyTorch's default init (bench: trains under SGD at lr 0.1):
    plain autograd shows the gradient w.r.t. the first layer's output below 1e-2 of the
    last hidden layer's, while ‖∇W‖/‖W‖ stays within 1e-2, because the signal shrinks
    up the stack as the gradient shrinks down it."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(9) for m in (nn.Linear(256, 256), nn.Tanh())],
                          nn.Linear(256, 10))
    x, g = torch.randn(256, 256), torch.randn(256, 10)
    outs = []

    def keep(module, args, out):
        out.retain_grad()
        outs.append(out)

    hooks = [m.register_forward_hook(keep) for m in model[:-1:2]]
    model(x).backward(g)
    for h in hooks:
        h.remove()
    first, last = model[0], model[-3]
    assert outs[0].grad.var() < 1e-2 * outs[-1].grad.var()
    rate = [m.weight.grad.norm() / m.weight.norm() for m in (first, last)]
    assert rate[0] > 1e-2 * rate[1]
    report = probe(model, x, grad_output=g)
    assert "vanishing_backward" not in codes(report)
    model.zero_grad()


def test_a_vanishing_gradient_across_pools_is_still_judged_by_the_layers_after_it():
    """A VGG-16 without BatchNorm at PyTorch's default init (bench's label protocol: SGD
    does not train it at any rate, AdamW does): its chains end at every max pool, and
    within the last one ‖∇W‖/‖W‖ is level, but against the classifier after it the
    block's first conv learns at 1e-2 of the rate (plain autograd), so the small
    product stays vanishing_backward."""
    from corpus.cnn import VGG

    torch.manual_seed(0)
    model = VGG(bn=False)
    x = torch.randn(16, 3, 32, 32)
    g = torch.randn(16, 10)
    model(x).backward(g)
    conv, head = model.features[24], model.classifier  # the last block's first conv
    rate = [m.weight.grad.norm() / m.weight.norm() for m in (conv, head)]
    model.zero_grad()
    assert rate[0] < 1e-2 * rate[1]
    report = probe(model, x, grad_output=g)
    assert "vanishing_backward" in codes(report)


def _after_a_norm(gamma_std: float | None, gamma: float = 1.0) -> nn.Sequential:
    """A BatchNorm (γ drawn N(0, gamma_std²), or set to ``gamma``) and then a stretch of
    four linear layers, each keeping 0.05 of E[x²] (0.05⁴ = 6.25e-6), and a head."""
    torch.manual_seed(0)
    layers = [nn.Linear(32, 64), nn.BatchNorm1d(64)]
    layers += [nn.Linear(64, 64, bias=False) for _ in range(4)] + [nn.Linear(64, 10)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        if gamma_std is None:
            model[1].weight.fill_(gamma)
        else:
            model[1].weight.normal_(0, gamma_std)
        for lin in model[2:6]:
            lin.weight.normal_(0, math.sqrt(0.05 / 64))
    return model


@pytest.mark.parametrize(("gamma_std", "gamma", "flagged"), [
    (0.02, 1.0, True),        # E[y²] ~ 4e-4 at the norm, 2.5e-9 at the head: collapsed
    (None, 1.0, False),       # E[y²] = 1 at the norm: 6.25e-6 of it, inside the band
    (None, 0.45, False)])     # E[y²] = 0.2: a scale eps or channel means can set too
def test_a_norm_with_small_gamma_does_not_excuse_the_stretch_after_it(gamma_std, gamma,
                                                                     flagged):
    """A norm sets its output's scale to about mean(γ²); γ drawn N(0, 0.02) (transformers'
    EfficientNet and MobileViT) is a collapse of its own. Held against it, the stretch
    after it keeps 6.25e-6 (inside the 1e-6 band) and nothing was flagged; held against a
    normalized signal's 1, the input at the head is 2.5e-9 of it."""
    report = probe(_after_a_norm(gamma_std, gamma), torch.randn(256, 32))
    errors = [(layer.name, f) for layer in report.layers for f in layer.flags
              if f.code == "vanishing_forward"]
    assert bool(errors) == flagged
    if flagged:
        name, found = errors[0]
        assert found.value == pytest.approx(
            report.layers[int(name)].input.second_moment, rel=1e-12)  # over 1
        assert "by its small γ" in found.message
