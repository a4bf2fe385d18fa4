"""Linear layers: Linear -> op -> Linear with the op a weight layer (or a functional one).

Rule (He et al. 2015 Eq. 7, 12; docs/predictions.md): E[y^2] = n E[w^2] E[x^2] +
mean(b^2) and Var[dx] = n^ E[w^2] Var[dy]. Forward and backward are measured at the op
itself (its ``forward`` and ``backward_input``), so the chi-square noise is the op's own:
sqrt(2/n_out) per seed with a collinear (mean-carrying) input. A functional op
(F.linear, addmm, matmul with a parameter) is no recorded layer: it is measured at the
layers around it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from bench.accuracy._harness import (
    BATCH,
    POST_OUT,
    Knobs,
    Spec,
    gaussian,
    grid,
    linear_sandwich,
    run,
)


def _param(n: int, m: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(n, m) / math.sqrt(n))


def _bias(knobs: Knobs, kind: str):
    """Set the op's bias: zero, torch's default U(+-1/sqrt n), or a constant 0.5."""
    def fix(model: nn.Module, gen: torch.Generator) -> None:
        b = model.op.bias
        with torch.no_grad():
            if kind == "zero":
                b.zero_()
            elif kind == "uniform":
                bound = 1 / math.sqrt(knobs.width)
                b.uniform_(-bound, bound, generator=gen)
            else:
                b.fill_(0.5)
    return fix


def module_spec(name: str, knobs: Knobs, batch: int = BATCH, bias: str | None = None,
                tokens: int = 0) -> Spec:
    n = knobs.width
    out = {"Linear(n, 4n)": 4 * n}.get(name, n)
    inn = {"Linear(4n, n)": 4 * n}.get(name, n)
    make = {"Linear(n, n, bias=False)": lambda: nn.Linear(n, n, bias=False),
            "Linear(n, n)": lambda: nn.Linear(n, n),
            "Linear(n, 4n)": lambda: nn.Linear(n, 4 * n, bias=False),
            "Linear(4n, n)": lambda: nn.Linear(4 * n, n, bias=False),
            "transformers Conv1D (addmm)": lambda: Conv1D(n, n)}[name]

    build = linear_sandwich(knobs, lambda self, h: self.op(h), op_width=inn, post_in=out,
                            op=make)
    shape = (batch // tokens, tokens, n) if tokens else (batch, n)
    label = ("" if bias is None else f"bias {bias}, ") + (f"(B, {tokens}, n) tokens, "
                                                          if tokens else "") + knobs.label()
    return Spec(rule=name, case=label, build=build, inputs=gaussian(shape, knobs.scale),
                width=n, forward=("op", "forward"), backward=("op", "backward_input"),
                prepare=_bias(knobs, bias) if bias else None, fwd_out=out,
                tags={"bias": bias, "tokens": tokens, **knobs.__dict__})


FUNCTIONAL = {
    "F.linear with parameters": lambda self, h: F.linear(h, self.w.t(), self.b),
    "torch.addmm with parameters": lambda self, h: torch.addmm(self.b, h, self.w),
    "x @ W (a parameter)": lambda self, h: h @ self.w,
}


def functional_spec(name: str, knobs: Knobs, batch: int = BATCH) -> Spec:
    n = knobs.width
    build = linear_sandwich(knobs, FUNCTIONAL[name], w=lambda: _param(n, n),
                            b=lambda: nn.Parameter(torch.zeros(n)))
    return Spec(rule=name, case=knobs.label(), build=build,
                inputs=gaussian((batch, n), knobs.scale), width=n, fwd_out=POST_OUT,
                tags=dict(knobs.__dict__))


def specs() -> list[Spec]:
    out = []
    for name in ("Linear(n, n, bias=False)", "transformers Conv1D (addmm)"):
        out += [module_spec(name, k) for k in grid()]
    for bias in ("zero", "uniform", "0.5"):
        out += [module_spec("Linear(n, n)", k, bias=bias)
                for k in grid(widths=(64, 256, 1024), inits=("he",), scales=(0.1, 1.0))]
    for name in ("Linear(n, 4n)", "Linear(4n, n)"):
        out += [module_spec(name, k) for k in grid(widths=(64, 256), scales=(1.0,))]
    out += [module_spec("Linear(n, n, bias=False)", k, tokens=16)
            for k in grid(widths=(256,), inits=("he", "default"))]
    for name in FUNCTIONAL:
        out += [functional_spec(name, k) for k in grid(widths=(256,), inits=("he",))]
    return out


def cases(seeds: int = 8) -> list[dict]:
    return run(specs(), seeds)
