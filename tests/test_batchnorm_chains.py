"""Train-mode BatchNorm chains at small maps: what each BatchNorm's centring takes of the
gradient behind another (theory.shared.behind_loss) and the positional profile it
leaves in the forward (theory.profile.centred), against float64 autograd and the
probe's own measurements."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

import corpus
import varprobe
from varprobe.theory import profile, shared
from varprobe.theory.signal import Signal, Value

C, H, BATCH, SEEDS = 64, 7, 2, 6


def _measured_count(act: nn.Module, depthwise: bool) -> tuple[float, float]:
    """M x the share of the gradient a BatchNorm's backward takes beyond its gain
    (mean(g)^2 + mean(g x̂)^2 over E[g^2], per channel), for a BatchNorm whose output
    goes through ``act`` and a 3x3 conv (depthwise or not) into another BatchNorm;
    float64, mean and its sd over the seeds."""
    counts = []
    for seed in range(SEEDS):
        torch.manual_seed(seed)
        norm = nn.BatchNorm2d(C)
        net = nn.Sequential(
            nn.Conv2d(C, C, 3, padding=1, bias=False), norm, act,
            nn.Conv2d(C, C, 3, padding=1, groups=C if depthwise else 1, bias=False),
            nn.BatchNorm2d(C), nn.ReLU(), nn.Conv2d(C, C, 3, padding=1, bias=False),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(C, 10)).double()
        seen: dict = {}

        def hook(module, args, out, seen=seen):
            seen["x"] = args[0].detach()
            out.register_hook(lambda g: seen.update(g=g.detach()))

        norm.register_forward_hook(hook)
        y = net(torch.randn(BATCH, C, H, H, dtype=torch.float64))
        y.backward(torch.randn_like(y))
        x, grad, dims = seen["x"], seen["g"], (0, 2, 3)
        xhat = (x - x.mean(dims, keepdim=True)) / x.var(dims, unbiased=False, keepdim=True).sqrt()
        taken = (grad.mean(dims) ** 2 + (grad * xhat).mean(dims) ** 2) / (grad * grad).mean(dims)
        counts.append(float(taken.mean()) * BATCH * H * H)
    return statistics.mean(counts), statistics.stdev(counts) / math.sqrt(SEEDS)


@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU])
def test_behind_another_batchnorm_the_count_follows_the_mask(act):
    """Through a conv that mixes the channels, the count is Var[f'] + E[f'^2 x̂^2] over
    E[f'^2] (ReLU 1.5, SiLU 1.70); measured 1.58 +- 0.07 and 1.91 +- 0.10, the rest
    the 3x3 convs' borders, which the rule leaves out (measured without an activation:
    1.31 against its 1). So within 0.45 (the borders' 0.3 and three sd); the walk before
    took nothing behind another BatchNorm (0, 1.5 off)."""
    measured, sd = _measured_count(act(), depthwise=False)
    rule = shared.behind_loss(act(), Value(Signal(1.0)), per_channel=False)
    assert rule == pytest.approx({nn.ReLU: 1.5, nn.SiLU: 1.7048}[act], abs=1e-3)
    assert abs(rule - measured) <= 0.45, (rule, measured, sd)
    assert measured - 3 * sd > 1.0  # nothing at all is far outside


def test_through_a_depthwise_conv_the_projection_on_xhat_is_gone():
    """A depthwise conv keeps each channel to itself: the next BatchNorm's projection
    makes the gradient orthogonal to this channel's f(y), and a ReLU's f'(y) x̂ is
    f(y)/sigma, so x̂ takes nothing: the count is f' beyond f and 1 (0.27), measured
    0.37 +- 0.05 (borders), far from the 1.5 of a mixing conv."""
    measured, sd = _measured_count(nn.ReLU(), depthwise=True)
    rule = shared.behind_loss(nn.ReLU(), Value(Signal(1.0)), per_channel=True)
    assert rule == pytest.approx(0.2665, abs=1e-3)
    assert abs(rule - measured) <= 0.3
    assert measured + 3 * sd < 1.0


def _stem_logs(name: str, seeds: tuple[int, ...] = (0, 1)) -> list[float]:
    """log(measured / predicted) of the gradient at a corpus entry's first weight layer,
    at its own probe batch, for each seed's weights and input."""
    entry, logs = corpus.entry(name), []
    for seed in seeds:
        report = varprobe.probe(entry.build(seed), entry.example(seed=seed),
                                batch_size=entry.batch_size)
        stem = report.weight_layers[0]
        logs.append(math.log(stem.backward.var / stem.predicted.backward_var))
    return logs


def test_resnet50_at_a_batch_of_two_reaches_the_stem():
    """ResNet-50 (corpus, torchvision's init) at its probe batch of 2: M = 98 values a
    channel in the last stage, where each BatchNorm behind another takes 1.5/98 of the
    gradient. The gradient predicted at the stem over the measured, for two seeds'
    weights: 0.88 and 0.97 with the count, 0.77 and 0.86 without; within 0.1 of 1 in
    log for their geometric mean (what the rest of the walk leaves: the two seeds lie
    0.1 apart)."""
    logs = _stem_logs("resnet50")
    assert abs(statistics.mean(logs)) < 0.1, logs


def _dw_chain(blocks: int = 6) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C), nn.ReLU6(),
                   nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False), nn.BatchNorm2d(C),
                   nn.ReLU6()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(C, 10))


def _dw_forward_errors() -> list[float]:
    errors = []
    for seed in range(SEEDS):
        torch.manual_seed(seed)
        model = _dw_chain()
        report = varprobe.probe(model, torch.randn(4, C, H, H))
        depthwise = [layer for layer, module in zip(report.layers, model)
                     if isinstance(module, nn.Conv2d) and module.groups > 1]
        errors += [math.log(layer.forward.second_moment / layer.predicted.forward_var)
                   for layer in depthwise[1:]]
    return errors


def test_batchnorm_flattens_a_padded_convs_profile(monkeypatch):
    """MobileNet-like blocks at 7x7: a depthwise 3x3 conv's border outputs sum fewer
    taps; BatchNorm's centring then takes the channel's mean over the positions out,
    which leaves the borders the larger share of the mean's part. Kept as the conv
    made it (before), the profile put each depthwise conv's forward 3.2% over the
    measured (mean over 30 steps, sd of the mean 0.35%); centred, within 1%. Within
    2% here (the steps' own spread four times), and the uncentred outside it."""
    errors = _dw_forward_errors()
    assert abs(statistics.mean(errors)) < 0.02, statistics.mean(errors)
    monkeypatch.setattr(profile, "centred", lambda *args: None)
    assert statistics.mean(_dw_forward_errors()) < -0.02


def test_a_probe_keeps_no_reference_to_the_model():
    """The centred profile's tap counts are cached per conv geometry, by the geometry,
    not the module: once the caller drops the model, nothing of varprobe keeps its
    weights alive (an accelerator's memory with them)."""
    import gc
    import weakref

    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
    varprobe.probe(model, torch.randn(2, 4, 7, 7))
    ref = weakref.ref(model[0])
    del model
    gc.collect()
    assert ref() is None


def test_zero_init_residual_keeps_the_masks_curvature():
    """torchvision's zero_init_residual: every block's last BatchNorm at γ = 0, so the
    sum after it is the stream itself, relu(0 + relu(w)). Where w crosses 0 the sum's
    rectifier is open from above (the stream's own mask), so the gradient's curvature
    (its mean over the positions times the mask's correlation with x̂) reaches the
    BatchNorm before it, which at M = 98 takes 41.6% of the gradient in float64 (25%
    without that part). The stem's gradient over the prediction for two seeds' weights:
    0.905 and 0.896 with it, 0.713 and 0.706 before; within 0.15 in log of their mean
    (what the rest of the walk leaves on ResNet-50 at a batch of 2: 0.88-0.97)."""
    logs = _stem_logs("resnet50_residual_bn_zero_twin")
    assert abs(statistics.mean(logs)) < 0.15, logs
