"""Pooling, means over positions, upsampling and padding: Conv -> op -> Conv (maps) and
Linear -> mean over tokens -> Linear (sequences).

Rules: an average over k positions divides E[x^2] by k for uncorrelated positions and
keeps it for identical ones: E[avg^2] = E[x^2] (r + (1-r)/k) at position correlation r
(docs/theory-review.md §9: after a ReLU the shared per-channel mean makes r about 1/pi);
max pooling has no closed form (the measured value is carried); nearest upsampling copies
(E[x^2] unchanged, the gradient summed over the copies: x s^2 for scale s); zero padding
dilutes E[x^2] by the padded share. The grid adds position correlation r (a component
shared by all positions of one sample and channel) and the sequence length T.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from bench.accuracy._harness import (
    AFTER_RELU_MEANS,
    MEANS,
    Knobs,
    Spec,
    conv_sandwich,
    gaussian,
    grid,
    linear_sandwich,
    run,
)

BATCH, SIDE = 8, 16  # 8 x 16 x 16 = 2048 positions per channel

MAP_OPS = {  # name: fn(self, h) on (B, C, H, W); parts
    "nn.AvgPool2d(2)": (lambda self, h: self.op(h), lambda: nn.AvgPool2d(2)),
    "F.avg_pool2d(3, 1, 1)": (lambda self, h: F.avg_pool2d(h, 3, 1, 1), None),
    "nn.AdaptiveAvgPool2d(1)": (lambda self, h: self.op(h), lambda: nn.AdaptiveAvgPool2d(1)),
    "nn.AdaptiveAvgPool2d(4)": (lambda self, h: self.op(h), lambda: nn.AdaptiveAvgPool2d(4)),
    "Tensor.mean over H, W": (lambda self, h: h.mean((2, 3), keepdim=True), None),
    "nn.MaxPool2d(2)": (lambda self, h: self.op(h), lambda: nn.MaxPool2d(2)),
    "nn.MaxPool2d(3, 2, 1)": (lambda self, h: self.op(h), lambda: nn.MaxPool2d(3, 2, 1)),
    "nn.Upsample(2, nearest)": (lambda self, h: self.op(h), lambda: nn.Upsample(scale_factor=2)),
    "F.interpolate(2, bilinear)": (lambda self, h: F.interpolate(
        h, scale_factor=2, mode="bilinear", align_corners=False), None),
    "F.pad(2) zeros": (lambda self, h: F.pad(h, (2, 2, 2, 2)), None),
    "F.pad(2) reflect": (lambda self, h: F.pad(h, (2, 2, 2, 2), mode="reflect"), None),
}


def map_spec(name: str, knobs: Knobs, after_relu: bool, corr: float) -> Spec:
    fn, part = MAP_OPS[name]
    op = (lambda self, h: fn(self, F.relu(h))) if after_relu else fn
    build = conv_sandwich(knobs, op, **({"op": part} if part else {}))
    place = "after ReLU" if after_relu else "after the conv"
    return Spec(rule=name, case=f"{place}, r={corr:g}, {knobs.label()}", build=build,
                inputs=gaussian((BATCH, knobs.width, SIDE, SIDE), knobs.scale, corr, (2, 3)),
                width=knobs.width, tags={"after_relu": after_relu, "corr": corr,
                                         **knobs.__dict__})


def seq_spec(knobs: Knobs, tokens: int, corr: float, after_relu: bool = False) -> Spec:
    """Linear on (B, T, n) tokens -> mean over T -> Linear."""
    def fn(self, h):
        return (F.relu(h) if after_relu else h).mean(1)
    place = "after ReLU" if after_relu else "after the weight layer"
    return Spec(rule="Tensor.mean over tokens", case=f"{place}, T={tokens}, r={corr:g}, "
                f"{knobs.label()}", build=linear_sandwich(knobs, fn),
                inputs=gaussian((4096 // tokens, tokens, knobs.width), knobs.scale, corr, (1,)),
                width=knobs.width, tags={"tokens": tokens, "corr": corr,
                                         "after_relu": after_relu, **knobs.__dict__})


def specs() -> list[Spec]:
    out = []
    for name in MAP_OPS:
        for after_relu in (False, True):
            for corr in (0.0, 0.5):
                means = AFTER_RELU_MEANS if after_relu else MEANS
                ks = grid(widths=(64, 256)) if (corr == 0 and not after_relu) else \
                    grid(widths=(256,), inits=("he",), scales=(1.0,), means=means)
                out += [map_spec(name, k, after_relu, corr) for k in ks]
    for tokens in (16, 128):
        for corr in (0.0, 0.5):
            for after_relu in (False, True):
                means = AFTER_RELU_MEANS if after_relu else MEANS
                ks = grid() if (tokens == 16 and corr == 0 and not after_relu) else \
                    grid(widths=(256,), inits=("he",), scales=(1.0,), means=means)
                out += [seq_spec(k, tokens, corr, after_relu) for k in ks]
    return out


def cases(seeds: int = 8) -> list[dict]:
    return run(specs(), seeds)
