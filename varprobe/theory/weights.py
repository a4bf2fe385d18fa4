"""E[w^2] and mean(b^2) of every weight layer: the actual init's, or a scheme's.

The walk reads a layer's weights from here only, so one walk serves the actual model
(measured moments, or what its init code was recorded to do on meta) and every
counterfactual scheme (theory.layer_fans.scheme_variance with varprobe's own fans, the
bias zeroed but for torch-default's U(±1/sqrt(n))).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import nn

from varprobe import initlog
from varprobe.report import Layer
from varprobe.theory.gains import Values, prelu_slope
from varprobe.theory.layer_fans import (
    default_bias_variance,
    fans,
    is_linear_map,
    kind,
    scheme_bias_variance,
    scheme_variance,
    torch_fans,
)

# a row share below this: every row sums to zero up to float32 rounding (weight
# standardization), where independent draws give ~1 (sd sqrt(2 / rows))
STANDARDIZED = 1e-6


@dataclass
class Weights:
    """E[w^2] and mean(b^2) of a weight layer, and why they are what they are."""

    w2: float
    b2: float
    note: str | None = None
    b1: float = 0.0  # mean(b): a common mean every unit of the output gets
    out: Weights | None = None  # a scheme's draw for nn.MultiheadAttention's out_proj
    kurtosis: float = 3.0  # E[w^4]/E[w^2]^2: Gaussian (every scheme's draw) unless recorded
    row_share: float = 1.0  # Layer.weight_row_share: 1 for independent zero-mean draws
    bias_cross: float = 0.0  # Layer.weight_bias_cross: mean of b S (varprobe.mean_gain)


def actual_weights(layers: list[Layer], modules: list[nn.Module]) -> list[Weights | None]:
    """The measured E[w^2] and mean(b^2); PyTorch's default init where not measured."""
    return [actual(layer, module) if layer.kind == "weight" else None
            for layer, module in zip(layers, modules)]


def actual(layer: Layer, module: nn.Module) -> Weights | None:
    if layer.unavailable.get("weight_var", "").startswith(initlog.UNKNOWN):
        return None  # its init code did what no closed form follows: no default either
    w2 = _finite(layer.weight_second_moment)
    w2 = _finite(layer.weight_var) if w2 is None else w2
    if w2 is not None:
        b1 = _finite(layer.bias_mean) or 0.0
        if isinstance(module, nn.Embedding) and layer.forward is not None:
            b1 = _finite(layer.forward.mean) or 0.0  # the rows it looked up: sinusoids'
        return Weights(w2, _finite(layer.bias_second_moment) or 0.0, b1=b1,
                       kurtosis=_finite(layer.weight_kurtosis) or 3.0,
                       row_share=_row_share(layer, w2),
                       bias_cross=_finite(layer.weight_bias_cross) or 0.0)
    if isinstance(module, nn.Embedding):
        return Weights(1.0, 0.0, note="weights not measured: N(0, 1), PyTorch's default")
    n = torch_fans(module)[0]
    if n is None:
        return None
    b2 = 1.0 / (3 * n) if getattr(module, "bias", None) is not None else 0.0
    return Weights(1.0 / (3 * n), b2, note="weights not measured: PyTorch's default assumed",
                   kurtosis=9 / 5)  # its kaiming_uniform_ draw


def _row_share(layer: Layer, w2: float) -> float:
    """The share of a common input mean's expected gain n_eff E[w^2] that the actual
    weights pass: their measured gain G over it (varprobe.mean_gain: borders counted),
    else Layer.weight_row_share (0 is a value: zero-sum rows), else 1."""
    gain, n = _finite(layer.weight_mean_gain), layer.effective_fan_in
    if gain is not None and n and w2 > 0:
        return gain / (n * w2)
    share = _finite(layer.weight_row_share)
    return 1.0 if share is None else share


class Drawable(NamedTuple):
    """What a scheme reads of a Linear/Conv layer: varprobe's fans, torch's, whether it
    has a bias, and its weight (a weight tied to it follows it; held, so that its id
    stays its own while the schemes are drawn)."""

    fans: tuple
    torch: tuple
    bias: bool
    weight: Any


def drawables(layers: list[Layer], modules: list[nn.Module]) -> list[Drawable | None]:
    """Per layer, what ``scheme_weights`` reads (None: not a re-drawn layer), read once
    for all the schemes. A standardized weight (its rows sum to zero: the forward
    standardizes the parameter, ``Layer.weight_row_share``) keeps its scale whatever
    the parameter's draw: every scheme keeps the measured one."""
    return [Drawable(fans(module), torch_fans(module), getattr(module, "bias", None)
                     is not None, module.weight)
            if layer.kind == "weight" and is_linear_map(module) and not _standardized(layer)
            else None for layer, module in zip(layers, modules)]


def _standardized(layer: Layer) -> bool:
    share = _finite(layer.weight_row_share)
    return share is not None and share < STANDARDIZED




def scheme_weights(scheme: str, layers: list[Layer], modules: list[nn.Module],
                   slopes: list[float], drawn_from: list[Drawable | None] | None = None,
                   ) -> list[Weights | None]:
    """Var[w] of ``scheme`` for Linear/Conv layers and its bias (zero but for
    torch-default's); embeddings as they are. ``slopes``: ``prelu_slopes(modules)``;
    ``drawn_from``: ``drawables(layers, modules)`` where several schemes are asked."""
    out: list[Weights | None] = []
    drawn: dict[int, Weights | None] = {}  # id(weight): what the scheme draws for it
    if drawn_from is None:
        drawn_from = drawables(layers, modules)
    for d, a in zip(drawn_from, slopes):
        if d is None:
            out.append(None)
            continue
        fan_in, fan_out = d.torch if scheme == "torch-default" else d.fans
        var = scheme_variance(scheme, fan_in, fan_out, a)
        out.append(None if var is None else Weights(var, _bias_variance(scheme, d)))
        drawn[id(d.weight)] = out[-1]
    for i, (layer, module, d) in enumerate(zip(layers, modules, drawn_from)):
        if layer.kind == "weight" and d is None:
            # a weight tied to a re-drawn Linear (an LM head and its embedding) is re-drawn
            w = getattr(module, "weight", None)
            tied = drawn.get(id(w)) if w is not None else None
            out[i] = Weights(tied.w2, 0.0) if tied is not None else actual(layer, module)
            if isinstance(module, nn.MultiheadAttention) and out[i] is not None:
                # its out_proj is a Linear, which the scheme re-draws (varprobe.reinit);
                # the packed in-projection stays
                out[i].out = _drawn(scheme, module.out_proj)
    return out


def _bias_variance(scheme: str, d: Drawable) -> float:
    """layer_fans.scheme_bias_variance from what ``drawables`` read."""
    if not d.bias or scheme != "torch-default":
        return 0.0
    return default_bias_variance(d.torch[0])


def _drawn(scheme: str, module: nn.Module) -> Weights | None:
    fan_in, fan_out = torch_fans(module) if scheme == "torch-default" else fans(module)
    var = scheme_variance(scheme, fan_in, fan_out, 0.0)
    return None if var is None else Weights(var, scheme_bias_variance(scheme, module))


def prelu_slopes(modules: list[nn.Module], values: Values | None = None) -> list[float]:
    """The PReLU slope a that he-prelu uses for each module (0 for non-weight ones).

    The slope of the activation feeding the layer: He's Eq. 15 is the forward
    condition 1/2 (1+a^2) n Var[w] = 1, whose gain belongs to x_l = f(y_{l-1}). A
    layer with no activation before it (the first) takes the one after it, as He
    adopts the same rule in the first layer; 0 where there is none.
    """
    found: list[float | None] = [None] * len(modules)
    before: float | None = None
    pending: list[int] = []
    for i, module in enumerate(modules):
        what = kind(module)
        if what == "weight":
            found[i] = before
            if before is None:
                pending.append(i)
            before = None
        elif what == "activation" and before is None:
            before = prelu_slope(module, values)
            for j in pending:
                found[j] = before
            pending = []
    return [a or 0.0 for a in found]


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
