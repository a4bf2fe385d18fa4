"""Gating products: Linear -> a(x) * gate(b(x)) (and kin) -> Linear.

Rule wanted: for independent branches E[(a g)^2] = E[a^2] E[g^2] and the gradients
Var[da] = E[g^2] Var[dy], Var[dg] = E[a^2] Var[dy] (then through the gate's activation);
for a product of one tensor with a function of itself (x * sigmoid(x)) the moments of
the product. docs/graph.md: a product of two activations is not followed today.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.accuracy._harness import BATCH, Knobs, Spec, gaussian, grid, linear_sandwich, run

GATES = {  # name: (fn, branch layers, post_in as a multiple of the width)
    "x * sigmoid(y)": (lambda self, h: self.a(h) * torch.sigmoid(self.b(h)), ("a", "b"), 1.0),
    "SwiGLU: silu(a(x)) * b(x)": (lambda self, h: F.silu(self.a(h)) * self.b(h), ("a", "b"), 1.0),
    "x * sigmoid(x) (by hand)": (lambda self, h: h * torch.sigmoid(h), (), 1.0),
    "F.glu (halves)": (lambda self, h: F.glu(h, -1), (), 0.5),
    "nn.GLU (halves)": (lambda self, h: self.glu(h), ("glu",), 0.5),
    "x * γ, γ a parameter (LayerScale)": (lambda self, h: h * self.gamma, ("gamma",), 1.0),
}


def spec(name: str, knobs: Knobs, batch: int = BATCH) -> Spec:
    fn, parts, share = GATES[name]
    n = knobs.width
    makers = {"a": lambda: nn.Linear(n, n), "b": lambda: nn.Linear(n, n),
              "glu": lambda: nn.GLU(-1), "gamma": lambda: nn.Parameter(torch.full((n,), 0.1))}
    build = linear_sandwich(knobs, fn, post_in=int(n * share), **{p: makers[p] for p in parts})
    return Spec(rule=name, case=knobs.label(), build=build,
                inputs=gaussian((batch, n), knobs.scale), width=n, tags=dict(knobs.__dict__))


def specs() -> list[Spec]:
    return [spec(name, k) for name in GATES for k in grid()]


def cases(seeds: int = 8) -> list[dict]:
    return run(specs(), seeds)
