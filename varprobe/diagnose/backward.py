"""vanishing_backward / exploding_backward: He's Eq. 13, measured, along chains.

The gradient reaching a weight layer is the gradient at the top of its chain times
the backward multipliers of the layers between (per element count: a strided conv or
a narrower Linear changes the per-element variance by geometry, not by signal loss).
A chain is a run of weight layers each consuming exactly the previous one's output.
It ends where the gradient also flows around it: at a tensor read by more than one
operation (a residual add, a fork into branches, a gate), which a product along the
chain cannot see (varprobe.structure's ``forks``).

A chain added back onto the trunk it branched off (``rejoins``: a residual branch) is
judged for explosion only: the trunk carries the gradient around it to every layer
before, so a small product there is the branch's scale at init (a Mix-FFN of three
layers at std 0.02, the soft form of a zero-initialized branch), and the branch's last
layer, which gets the trunk's gradient in full, grows it within steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from varprobe.diagnose.common import Trend, band, flag, is_weight, num, same, unit_end
from varprobe.diagnose.fix import culprits as culprits_of
from varprobe.diagnose.thresholds import Thresholds
from varprobe.report import FROZEN, Layer

CONSEQUENCE = {
    "vanishing_backward": "its weights (and those before it) learn that much more slowly "
                          "than the layers after it under one learning rate",
    "exploding_backward": "one learning rate that suits the layers after it makes its "
                          "updates that much larger",
}


@dataclass
class Unit:
    first: int  # the weight layer
    last: int   # the last layer of its unit
    factor: float | None  # backward energy multiplier: grad energy in / grad energy out


def units(layers: list[Layer]) -> list[Unit]:
    """Each weight layer with the elementwise modules after it, and its measured
    backward multiplier, per element count (N_in Var[dL/dx]) / (N_out Var[dL/dy])."""
    found = []
    for i, layer in enumerate(layers):
        if is_weight(layer):
            j = unit_end(layers, i)
            found.append(Unit(i, j, _energy_ratio(layer, layers[j])))
    return found


def _energy_ratio(first: Layer, last: Layer) -> float | None:
    if first.backward_input is None or last.backward is None:
        return None
    if not first.input_shape or not last.shape:
        return None
    g_in = first.backward_input.var * math.prod(first.input_shape)
    g_out = last.backward.var * math.prod(last.shape)
    if not (math.isfinite(g_in) and math.isfinite(g_out)) or g_out <= 0:
        return None
    return g_in / g_out


def _balanced(product: tuple, t: Thresholds, rates: list[tuple[float, float] | None]) -> bool:
    """A small product whose weights learn at one rate with the layers after it all the
    same: a weight's gradient is its output gradient times its input, and where the
    signal shrinks up the chain as the gradient shrinks down it (Xavier under ReLU, a
    tanh stack at PyTorch's default) the layer's measured ‖∇W‖/‖W‖ stays within
    ``t.backward`` of every later weight layer's, so one learning rate suits them all;
    the small signal is the forward rule's to judge. (A 10-layer tanh MLP at PyTorch's
    default init, product 4e-5, ‖∇W‖/‖W‖ 0.02 of the head's, trains under SGD at 0.1;
    a VGG-16 at PyTorch's default, whose chains end at every pool, does not, and its
    last block's first conv is at 0.01 of the classifier's.) ``rates``: _later_rates."""
    at, value, _, _ = product
    if value >= t.backward[0]:
        return False
    if rates[at] is None:
        return False
    first, most = rates[at]
    return first >= t.backward[0] * most


def _later_rates(layers: list[Layer]) -> list[tuple[float, float] | None]:
    """Per layer index i, over the weights at i and after it that learn: (the first
    one's ‖∇W‖/‖W‖, the largest), (inf, 0) where there are none, None where one of them
    has no positive finite rate. A frozen weight (fine-tuning a backbone, a fixed
    embedding) learns at no rate by design: only the weights that learn need one rate.
    One pass from the end: every product asks it."""
    out: list[tuple[float, float] | None] = [None] * (len(layers) + 1)
    out[len(layers)] = (math.inf, 0.0)
    for i in range(len(layers) - 1, -1, -1):
        later, layer = out[i + 1], layers[i]
        if not is_weight(layer) or layer.unavailable.get("weight_grad_ratio") == FROZEN:
            out[i] = later
            continue
        r = layer.weight_grad_ratio
        ok = later is not None and r is not None and math.isfinite(r) and r > 0
        out[i] = (r, max(r, later[1])) if ok else None
    return out[:len(layers)]


def runs(layers: list[Layer], found: list[Unit]) -> list[list[Unit]]:
    """Maximal chains: each unit consumes exactly the previous unit's output, that output
    is read by nothing else, and no normalization lies between (the same stretch: a
    norm's backward 1/sigma undoes the forward scale of the layers before it, so a
    product across it mixes two stretches)."""
    chains: list[list[Unit]] = []
    for unit in found:
        prev = chains[-1][-1] if chains else None
        if (prev is not None and prev.factor is not None and unit.factor is not None
                and not layers[prev.last].forks
                and layers[prev.first].stretch == layers[unit.first].stretch
                and same(layers[unit.first].input, layers[prev.last].forward)):
            chains[-1].append(unit)
        else:
            chains.append([unit])
    return chains


def trends(layers: list[Layer], t: Thresholds, skip: set[int]) -> list[Trend]:
    """A product is judged once ``t.stretch`` weight layers lie on the chain from the
    layer to its top, itself included: over one or two layers it is a design (a gate,
    a branch at std 0.02), and only a repeated factor compounds."""
    products = []  # (weight index, product, units after it, on a residual branch)
    for run in runs(layers, units(layers)):
        branch = any(layers[i].rejoins for i in range(run[-1].first, run[-1].last + 1))
        product = 1.0
        for k in range(len(run) - 1, -1, -1):
            if run[k].first not in skip and k < len(run) - 1 and len(run) - k >= t.stretch:
                products.append((run[k].first, product, run[k + 1:], branch))
            if run[k].first not in skip and run[k].factor is not None:
                product *= run[k].factor
    # An exact zero is a zero-initialized scale (SkipInit, Fixup, zero_init_residual),
    # a deliberate design, not a trend.
    rates = _later_rates(layers) if products else []
    products = [p for p in products if p[1] > 0 and not _balanced(p, t, rates)]
    found = []
    for code, outside, pick in (
            ("vanishing_backward", lambda p: p[1] < t.backward[0] and not p[3], min),
            ("exploding_backward", lambda p: p[1] > t.backward[1], max)):
        out = [p for p in products if outside(p)]
        if not out:
            continue
        at, value, after, _ = pick(out, key=lambda p: p[1])
        top = layers[after[-1].last].label
        trend = Trend(code, at, [u.first for u in after if u.first not in skip])
        blamed = [layers[i].label for i in culprits_of(layers, [trend], t)]
        flag(layers[at], code, f"the gradient reaching it is {num(value)} of the gradient "
             f"at {top} (product of the measured backward multipliers of the "
             f"{len(after)} layers between; band {band(t.backward)}): "
             f"{CONSEQUENCE[code]}", value, blamed)
        found.append(trend)
    return found
