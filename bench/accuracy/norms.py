"""Normalization layers: Linear/Conv -> [ReLU ->] norm -> Linear/Conv.

Rules (docs/predictions.md, docs/theory-review.md §9): forward, the norm resets the
second moment to mean(gamma^2 s^2/(s^2+eps) + beta^2) (train BatchNorm, LayerNorm,
GroupNorm, InstanceNorm), RMSNorm to gamma^2 E[x^2]/(E[x^2]+eps); eval BatchNorm
divides by its running variance. Backward, the gradient is divided by the variance the
norm divides by (and loses the mean and the direction of x): 1/s^2 with s^2 the
per-group variance, which after a ReLU (or with a mean) is less than E[x^2].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.accuracy._harness import (
    AFTER_RELU_MEANS,
    BATCH,
    MEANS,
    Knobs,
    Spec,
    conv_sandwich,
    gaussian,
    grid,
    linear_sandwich,
    run,
)

CONV_BATCH, SIDE = 16, 8  # 16 x 8 x 8 = 1024 positions per channel
CALIBRATION = 8  # train-mode batches that set an eval BatchNorm's running stats


class FunctionalLayerNorm(nn.Module):
    """A custom module that calls F.layer_norm itself (as many model zoos do)."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


FEATURE_NORMS = {  # on (batch, features)
    "BatchNorm1d train": lambda n: nn.BatchNorm1d(n),
    "BatchNorm1d eval (calibrated)": lambda n: nn.BatchNorm1d(n, momentum=None),
    "LayerNorm": lambda n: nn.LayerNorm(n),
    "RMSNorm": lambda n: nn.RMSNorm(n, eps=1e-6),
    "F.layer_norm in a custom module": FunctionalLayerNorm,
    "GroupNorm(8) on features": lambda n: nn.GroupNorm(8, n),
}
MAP_NORMS = {  # on (batch, channels, h, w)
    "BatchNorm2d train": lambda n: nn.BatchNorm2d(n),
    "BatchNorm2d eval (calibrated)": lambda n: nn.BatchNorm2d(n, momentum=None),
    "GroupNorm(8)": lambda n: nn.GroupNorm(8, n),
    "InstanceNorm2d(affine)": lambda n: nn.InstanceNorm2d(n, affine=True),
}


def _calibrate(draw):
    """Run CALIBRATION train-mode batches from the case's input distribution (cumulative
    running stats: momentum None), then put the model in eval mode."""
    def prepare(model: nn.Module, gen: torch.Generator) -> None:
        model.train()
        with torch.no_grad():
            for _ in range(CALIBRATION):
                model(draw(gen))
        model.eval()
    return prepare


def _fn(after_relu: bool):
    if after_relu:
        return lambda self, h: self.op(F.relu(h))
    return lambda self, h: self.op(h)


def spec(name: str, knobs: Knobs, after_relu: bool) -> Spec:
    place = "after ReLU" if after_relu else "after the weight layer"
    if name in FEATURE_NORMS:
        make = FEATURE_NORMS[name]
        build = linear_sandwich(knobs, _fn(after_relu), op=lambda: make(knobs.width))
        draw = gaussian((BATCH, knobs.width), knobs.scale)
    else:
        make = MAP_NORMS[name]
        build = conv_sandwich(knobs, _fn(after_relu), op=lambda: make(knobs.width))
        draw = gaussian((CONV_BATCH, knobs.width, SIDE, SIDE), knobs.scale)
    prepare = _calibrate(draw) if "eval" in name else None
    return Spec(rule=name, case=f"{place}, {knobs.label()}", build=build, inputs=draw,
                width=knobs.width, prepare=prepare,
                tags={"after_relu": after_relu, **knobs.__dict__})


STEM_CHANNELS = 1  # a grayscale stem: fan-in 9, so the channels' variances spread


def stem_spec(name: str, knobs: Knobs) -> Spec:
    """Conv(1, width, 3, padding 1) -> BatchNorm2d -> Conv: a fan-in-9 conv gives each
    channel its own variance (a chi-square of 9 weights), so mean_c(1/v_c) exceeds
    1/mean_c(v_c) by about 9/7 (theory.normshape; the per-tensor rule is off by that).
    The backward is held at the BatchNorm's input (the conv's output): at the conv's
    input each channel's 1/v_c meets the very weights v_c is made of, sum_t w_ct^2 / v_c
    is the same for every channel, and the spread cancels, which a rule that takes W
    and the gradient as independent does not see."""
    make = MAP_NORMS[name]
    build = conv_sandwich(knobs, _fn(False), op=lambda: make(knobs.width),
                          pre=lambda n: nn.Conv2d(STEM_CHANNELS, n, 3, padding=1))
    draw = gaussian((CONV_BATCH, STEM_CHANNELS, SIDE, SIDE), knobs.scale)
    prepare = _calibrate(draw) if "eval" in name else None
    return Spec(rule=name, case=f"after a fan-in-9 stem conv, {knobs.label()}", build=build,
                inputs=draw, width=knobs.width, prepare=prepare, backward=("pre", "backward"),
                tags={"after_relu": False, "stem": True, **knobs.__dict__})


def specs() -> list[Spec]:
    out = []
    for name in FEATURE_NORMS:
        for after_relu in (False, True):
            means = AFTER_RELU_MEANS if after_relu else MEANS
            out += [spec(name, k, after_relu) for k in grid(means=means)]
    for name in MAP_NORMS:
        for after_relu in (False, True):
            means = AFTER_RELU_MEANS if after_relu else MEANS
            out += [spec(name, k, after_relu) for k in grid(widths=(64, 256), means=means)]
    for name in ("BatchNorm2d train", "BatchNorm2d eval (calibrated)"):
        out += [stem_spec(name, k) for k in grid(widths=(64, 256), means=(0.0,))]
    return out


def cases(seeds: int = 8) -> list[dict]:
    return run(specs(), seeds)
