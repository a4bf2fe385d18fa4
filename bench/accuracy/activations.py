"""Elementwise activations, module and functional: Linear -> act -> Linear.

Rule (docs/theory.md): E[f(y)^2] = g(q) q and E[f'(y)^2] = g'(q) for y ~ N(0, q), by
quadrature at the predicted q (closed form (1+a^2)/2 for the ReLU family). The mean axis
gives the op a nonzero-mean input, outside the rule's zero-mean assumption.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from bench.accuracy._harness import BATCH, Knobs, Spec, gaussian, grid, linear_sandwich, run

ACTIVATIONS = {
    "ReLU": (nn.ReLU, F.relu),
    "LeakyReLU(0.2)": (lambda: nn.LeakyReLU(0.2), lambda h: F.leaky_relu(h, 0.2)),
    "GELU": (nn.GELU, F.gelu),
    "SiLU": (nn.SiLU, F.silu),
    "Tanh": (nn.Tanh, lambda h: h.tanh()),
    "Sigmoid": (nn.Sigmoid, lambda h: h.sigmoid()),
    "ELU": (nn.ELU, F.elu),
}


def spec(name: str, functional: bool, knobs: Knobs, batch: int = BATCH) -> Spec:
    module, fn = ACTIVATIONS[name]
    if functional:
        build = linear_sandwich(knobs, lambda self, h: fn(h))
    else:
        build = linear_sandwich(knobs, lambda self, h: self.op(h), op=module)
    kind = "F" if functional else "nn"
    return Spec(rule=name, case=f"{kind}, {knobs.label()}", build=build,
                inputs=gaussian((batch, knobs.width), knobs.scale), width=knobs.width,
                tags={"functional": functional, **knobs.__dict__})


def specs() -> list[Spec]:
    out = []
    for name in ACTIVATIONS:
        for k in grid():
            out.append(spec(name, False, k))
        # functional: the star's scale x mean arm (the rule is the module's)
        for k in grid(widths=(256,), inits=("he",)):
            out.append(spec(name, True, k))
    return out


def cases(seeds: int = 8) -> list[dict]:
    return run(specs(), seeds)
