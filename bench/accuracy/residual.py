"""Residual adds: Linear -> h + f(h) (and kin) -> Linear, the branch f a weight layer.

Rule (docs/graph.md, docs/theory-review.md §9): Var[x + a F] = Var[x] + a^2 Var[F] for
independent zero-mean branches (Cov = 0 in expectation when F ends in a zero-mean
weight layer); the gradient reaches both branches. Two branches that share their input
and keep a mean (two ReLUs of one tensor, x + relu(x)) are correlated: E[a b] != 0.
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
    gaussian,
    grid,
    linear_sandwich,
    run,
)


def _inplace(self, h):
    out = h.clone()
    out += self.f(h)
    return out


def _skipinit():
    return nn.Parameter(torch.tensor(0.3))


RESIDUALS = {  # name: (fn, parts)
    "x + f(x)": (lambda self, h: h + self.f(h), ("f",)),
    "x + f(relu(x))": (lambda self, h: h + self.f(F.relu(h)), ("f",)),
    "x += f(x) (in place)": (_inplace, ("f",)),
    "x + 0.2 f(x)": (lambda self, h: h + 0.2 * self.f(h), ("f",)),
    "torch.add(x, f(x), alpha=0.5)": (lambda self, h: torch.add(h, self.f(h), alpha=0.5), ("f",)),
    "0.8 x + 0.6 f(x)": (lambda self, h: 0.8 * h + 0.6 * self.f(h), ("f",)),
    "x + α f(x), α a parameter (SkipInit)": (lambda self, h: h + self.alpha * self.f(h),
                                             ("f", "alpha")),
    "relu(a(x)) + relu(b(x))": (lambda self, h: F.relu(self.a(h)) + F.relu(self.b(h)),
                                ("a", "b")),
    "x + relu(x) (shared input)": (lambda self, h: h + F.relu(h), ()),
    "x + x": (lambda self, h: h + h, ()),
}


def spec(name: str, knobs: Knobs, batch: int = BATCH) -> Spec:
    fn, parts = RESIDUALS[name]
    n = knobs.width
    makers = {"f": lambda: nn.Linear(n, n), "a": lambda: nn.Linear(n, n),
              "b": lambda: nn.Linear(n, n), "alpha": _skipinit}
    build = linear_sandwich(knobs, fn, **{p: makers[p] for p in parts})
    return Spec(rule=name, case=knobs.label(), build=build,
                inputs=gaussian((batch, n), knobs.scale), width=n, tags=dict(knobs.__dict__))


def specs() -> list[Spec]:
    return [spec(name, k) for name in RESIDUALS
            for k in grid(means=AFTER_RELU_MEANS if "relu" in name else MEANS)]


def cases(seeds: int = 8) -> list[dict]:
    return run(specs(), seeds)
