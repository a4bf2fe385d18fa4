"""The checks of one layer at a time: non-finite values, the input's scale, a layer's own
multiplier, dead units, and the measurement against its one-step prediction."""

from __future__ import annotations

import math

from varprobe.diagnose.common import (
    band,
    feeds_norm,
    flag,
    is_weight,
    multiplier_values,
    num,
    pos,
)
from varprobe.diagnose.thresholds import Thresholds
from varprobe.report import Layer, Report


def nonfinite(layers: list[Layer], skip: set[int]) -> None:
    """The first layer where NaN/Inf appears: forward in execution order, else the
    gradient's origin (the backward pass runs from the last layer to the first)."""
    def count(*stats) -> int:
        return sum(s.nonfinite for s in stats if s is not None)

    for i, layer in enumerate(layers):
        if i in skip:
            continue
        n_in, n_out = count(layer.input), count(layer.forward)
        if n_in or n_out:
            where = "its input" if n_in else "its output"
            flag(layer, "nonfinite", f"{n_in or n_out} non-finite values (NaN/Inf) in "
                 f"{where}, the first place they appear in the forward pass: every "
                 "gradient after it is NaN", float(n_in or n_out))
            return
    for i in reversed(range(len(layers))):
        layer = layers[i]
        n = count(layer.backward, layer.backward_input)
        if i not in skip and n:
            flag(layer, "nonfinite", f"{n} non-finite values (NaN/Inf) in its gradient, "
                 "the first place they appear in the backward pass: the update is NaN",
                 float(n))
            return


def unnormalized_input(report: Report, t: Thresholds, weights: list[int]) -> None:
    m2 = report.input.second_moment
    if m2 is None or not math.isfinite(m2) or t.input[0] <= m2 <= t.input[1] or not weights \
            or report.input.indicator:  # one-hot: its scale is 1/V by design, as ids' is none
        return
    first = report.layers[weights[0]]
    if m2 > t.input_step and not any(layer.kind == "norm" for layer in report.layers):
        flag(first, "exploding_input",
             f"the network input has E[x²] = {num(m2)} and nothing in the network "
             "normalizes it: layers initialized to keep the scale they are fed carry it "
             "to the output and into every weight gradient, up to "
             f"sqrt(E[x²]) = {num(math.sqrt(m2))}x what a unit-variance input gives, and "
             "the loss's curvature with its square, so a learning rate that suits a "
             "normalized input diverges. Normalize the input to unit variance", m2)
        return
    flag(first, "unnormalized_input",
         f"the network input has E[x²] = {num(m2)} (band {band(t.input)}); He et al. "
         "2015 warn that an un-normalized input (e.g. in [-128, 128]) can overflow the "
         "softmax: normalize it to unit variance, or scale the first layer's weights "
         "by 1/sqrt(E[x²])", m2)


def multipliers(layers: list[Layer], t: Thresholds, weights: list[int]) -> None:
    """shrinks / amplifies: the layer's own n E[w^2] g and n^ E[w^2] g' (from its actual
    weights) both on one side of the band, inside an un-normalized stretch of at least
    ``t.stretch`` weight layers.

    Both, because He et al. show either condition alone keeps a network stable (the
    other's product telescopes to a width ratio). A stretch, because "the factor does
    not matter if it just exists on one layer" (He et al. 2015): a transformer branch
    at std 0.02 shrinks its signal on purpose and the next norm resets it; only a factor
    that repeats through many layers with nothing to reset it compounds. Skipped too: a
    layer whose output a norm rescales (its scale cancels), and the first and last weight
    layers of the network (a one-off factor at the ends). A stretch that is added back
    onto the trunk it branched off (a residual branch, varprobe.structure's ``rejoins``)
    does not shrink the signal, which the trunk carries: only ``amplifies`` there. Nor
    a layer whose weights are all zero (ControlNet's zero convs, a zero-initialized
    output): its factor is no scale that compounds, and the exact zero it makes is
    judged where it is read (diagnose.forward's zero-signal rules).
    """
    every = [i for i, layer in enumerate(layers) if is_weight(layer)]
    ends = {every[0], every[-1]} if every else set()
    sizes: dict[int | None, int] = {}  # a stretch's depth: weight layers in series
    for i in every:
        sizes[layers[i].stretch] = max(sizes.get(layers[i].stretch, 0), layers[i].depth or 1)
    branches = {layers[i].stretch for i in every if layers[i].rejoins}
    lo, hi = t.multiplier
    for i in weights:
        layer = layers[i]
        values = multiplier_values(layer)
        if (i in ends or not any(values) or feeds_norm(layers, i)
                or sizes.get(layer.stretch, 0) < t.stretch):
            continue
        code = ("shrinks" if max(values) < lo and layer.stretch not in branches
                else "amplifies" if min(values) > hi else None)
        if code is None:
            continue
        parts = []
        if layer.forward_multiplier is not None:
            parts.append(f"forward n·E[w²]·g = {num(layer.forward_multiplier)}")
        if layer.backward_multiplier is not None:
            parts.append(f"backward n̂·E[w²]·g' = {num(layer.backward_multiplier)}")
        flag(layer, code, f"{', '.join(parts)} (band {band(t.multiplier)}; 1 holds the "
             f"signal), in a stretch {sizes[layer.stretch]} weight layers deep with "
             "no normalization between", values[0])


def dead_units(layers: list[Layer], t: Thresholds, skip: set[int]) -> None:
    feeder = None
    for i, layer in enumerate(layers):
        if is_weight(layer):
            feeder = layer
        dead = layer.forward.dead_fraction if layer.forward else None
        if (i in skip or layer.kind != "activation" or dead is None
                or not math.isfinite(dead) or dead <= t.dead_units):
            continue
        source = f" (fed by {feeder.label})" if feeder is not None else ""
        flag(layer, "dead_units", f"{dead:.0%} of its units are zero for every sample"
             f"{source} (threshold {t.dead_units:.0%}); a dead unit passes no gradient to "
             "the weights that feed it, which stay where they are unless something they "
             "share moves (a scalar bias, a norm): check that layer's bias and scale", dead)


def mismatch(layers: list[Layer], t: Thresholds, weights: list[int]) -> None:
    """Measured vs the one-step (local) prediction, beyond k sd of the width-aware
    noise of docs/theory-review.md §10: the independence assumptions fail here."""
    for i in weights:
        layer = layers[i]
        local = layer.local
        if local is None:
            continue
        parts, worst = [], 0.0
        checks = (("forward E[y²]", layer.forward.second_moment if layer.forward else None,
                   local.forward_var, 2.0),
                  ("backward Var[dL/dx]",
                   layer.backward_input.var if layer.backward_input else None,
                   local.backward_input_var, 0.75))
        n = pos(min(layer.effective_fan_in or layer.fan_in or 0,
                    layer.effective_fan_out or layer.fan_out or 0))
        for what, measured, predicted, c in checks:
            if pos(measured) is None or pos(predicted) is None or n is None:
                continue
            gap, tol = abs(math.log(measured / predicted)), t.mismatch_sigmas * math.sqrt(c / n)
            if gap > tol:
                parts.append(f"{what} measured/predicted = {measured / predicted:.3g} "
                             f"(tolerance ×{math.exp(tol):.3g})")
                worst = max(worst, measured / predicted, predicted / measured)
        if parts:
            flag(layer, "theory_mismatch", "; ".join(parts) + ": the independence "
                 "assumptions of the theory do not hold here (trained or correlated "
                 "weights, correlated inputs)", worst)
