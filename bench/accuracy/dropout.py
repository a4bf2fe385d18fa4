"""Dropout in train mode: Linear -> [ReLU ->] dropout -> Linear.

Rule (docs/theory-review.md §9): inverted dropout multiplies E[x^2] by 1/(1-p) (the second
moment, also with a mean) and the gradient variance by 1/(1-p). The masks add a relative
noise of about sqrt(p/((1-p) N)) over N elements: under 0.1% here.
"""

from __future__ import annotations

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


def spec(kind: str, p: float, knobs: Knobs, after_relu: bool) -> Spec:
    act = F.relu if after_relu else (lambda h: h)
    n = knobs.width
    if kind == "nn.Dropout":
        build = linear_sandwich(knobs, lambda self, h: self.op(act(h)), op=lambda: nn.Dropout(p))
    elif kind == "F.dropout":
        build = linear_sandwich(knobs, lambda self, h: F.dropout(act(h), p, training=True))
    else:  # nn.Dropout2d on conv maps: whole channels
        build = conv_sandwich(knobs, lambda self, h: self.op(act(h)), op=lambda: nn.Dropout2d(p))
    shape = (16, n, 8, 8) if kind == "nn.Dropout2d" else (BATCH, n)
    place = "after ReLU" if after_relu else "after the weight layer"
    # Dropout2d drops whole channels: B*C = 16 n masks, relative noise sqrt(p/((1-p) 16 n)).
    extra = (p / ((1 - p) * 16 * n)) ** 0.5 if kind == "nn.Dropout2d" else 0.0
    return Spec(rule=f"{kind}(p={p:g})", case=f"{place}, {knobs.label()}", build=build,
                inputs=gaussian(shape, knobs.scale), width=n, extra_noise=(extra, extra),
                tags={"after_relu": after_relu, "p": p, **knobs.__dict__})


def specs() -> list[Spec]:
    out = []
    for kind in ("nn.Dropout", "F.dropout", "nn.Dropout2d"):
        for p in (0.1, 0.5):
            for after_relu in (False, True):
                # the full star for nn.Dropout(0.1), the scale x mean arm for the rest
                full = kind == "nn.Dropout" and p == 0.1
                means = AFTER_RELU_MEANS if after_relu else MEANS
                ks = grid(means=means) if full else \
                    grid(widths=(256,), inits=("he",), means=means)
                out += [spec(kind, p, k, after_relu) for k in ks]
    return out


def cases(seeds: int = 8) -> list[dict]:
    return run(specs(), seeds)
