"""vanishing_forward / exploding_forward: the signal's scale along un-normalized stretches.

He et al.'s recursion compounds a per-layer factor through the weight layers between
two points where the scale is set anew (varprobe.structure: a normalization, an
embedding, pooling, attention, or the network input). So each weight layer's input is
held against the tensor it inherits its scale from, not against the network input: a
LayerNorm'd input 2500x the embedding lookup's scale is a norm doing its job, while
a 30-layer ReLU stack at Xavier init keeps 2^-29 of its input, which no later layer can
restore. The last weight layer's output is judged too: it is what the loss sees.

A point is judged once ``Thresholds.stretch`` weight layers in series lie between it and
its reference: over one or two layers a small scale is a design (a transformer branch at
std 0.02 feeding the next norm), not a trend, and only a repeated factor compounds into
a collapse the next layers cannot undo.
"""

from __future__ import annotations

import math

from varprobe.diagnose.common import Trend, band, flag, is_weight, num, pos
from varprobe.diagnose.fix import culprits as culprits_of
from varprobe.diagnose.thresholds import Thresholds
from varprobe.report import NETWORK_INPUT, Layer, Report

CONSEQUENCE = {
    "vanishing_forward": "the layers from here on receive almost none of the signal, and "
                         "the gradients of their weights shrink with it",
    "exploding_forward": "the weight gradients grow with it, so SGD needs a learning "
                         "rate that much smaller, and whatever saturates (a softmax, a "
                         "tanh, the loss) does",
}


BRANCH_ZERO = "its input, on a residual branch,"


def points(report: Report, weights: list[int],
           depth: float = 1) -> list[tuple[int, str, float, Layer]]:
    """(layer, what, ratio to its reference, the layer) at every judged point.

    - The input of a weight layer at least ``depth`` weight layers in series after its
      reference: vanishing or exploding.
    - An input that is exactly zero, at any depth: the signal is gone (ratio 0). On a
      residual branch (``_on_branch``) it is ``BRANCH_ZERO``, and not judged where it
      ``revives`` (a LayerNorm with γ = 0 at a pre-LN branch's start); on the trunk it is
      judged even then (a final norm at γ = 0 revives, but SGD does not train it).
    - The last weight layer's output, what the loss sees: exploding only (small logits at
      init are a design), against its reference or, if that is smaller, 1, the scale a
      softmax or a unit-variance target expects.
    """
    layers = report.layers
    if report.settings.get("source") == "closed-form":
        return _predicted_points(report, weights, depth)
    last = max((i for i, layer in enumerate(layers) if is_weight(layer)), default=None)
    zeros = {i for i, layer in enumerate(layers) if is_weight(layer)
             and layer.input is not None and layer.input.second_moment == 0}
    small = small_norms(layers)
    found = []
    for i in weights:
        layer = layers[i]
        if layer.reference is None or layer.reference == f"{layer.label} (input)":
            continue  # its own input sets the scale: nothing before it to compound
        ref = 1.0 if layer.reference in small else pos(layer.reference_second_moment)
        m2 = layer.input.second_moment if layer.input is not None else None
        if m2 == 0:
            branch = _on_branch(layers, i, zeros)
            if not (branch and revives(layers, i)):
                found.append((i, BRANCH_ZERO if branch else "its input", 0.0, layer))
        elif m2 is not None and ref is not None and (layer.depth or 1) >= depth:
            found.append((i, "its input's E[x²]", m2 / ref, layer))
        out = layer.forward.second_moment if layer.forward is not None else None
        if i == last and pos(out) is not None:
            found.append((i, "its output's E[y²]", out / min(ref or 1.0, 1.0), layer))
    return found


# A norm sets its output's scale to about mean(γ²) + mean(β²). Drawn small (BatchNorm γ
# ~ N(0, 0.02), transformers' EfficientNet and MobileViT), that scale is a collapse of
# its own, which the stretch after it compounds: those layers are held against 1, a
# normalized signal's scale (at 0.1 or more, eps and channel means account for it).
SMALL_NORM = 0.1


def small_norms(layers: list[Layer]) -> dict[str, float]:
    """Label -> output E[y²] of the norm layers whose output E[y²] (measured, or predicted
    where nothing was measured) is positive and below SMALL_NORM."""
    out = {}
    for layer in layers:
        if layer.kind != "norm":
            continue
        m2 = layer.forward.second_moment if layer.forward is not None else (
            layer.predicted.forward_var if layer.predicted is not None else None)
        if m2 is not None and 0 < m2 < SMALL_NORM:
            out[layer.label] = m2
    return out


def _predicted_points(report: Report, weights: list[int],
                      depth: float) -> list[tuple[int, str, float, Layer]]:
    """``points`` of a closed-form report (``varprobe predict``): nothing is measured, so
    each weight layer's predicted input E[x²] is held against its reference's predicted
    one (the network input's assumed 1), at the same depth and band; the same small-γ
    rule; exact zeros are left to a probe (a prediction of 0 has no revival to read)."""
    layers = report.layers
    by_label = {layer.label: layer for layer in layers}

    def predicted(layer: Layer | None, own_input: bool) -> float | None:
        p = layer.predicted if layer is not None else None
        return None if p is None else pos(p.input_var if own_input else p.forward_var)

    small = small_norms(layers)
    found = []
    for i in weights:
        layer = layers[i]
        if layer.reference is None or layer.reference == f"{layer.label} (input)" \
                or (layer.depth or 1) < depth:
            continue
        name, own = layer.reference.removesuffix(" (input)"), layer.reference.endswith(
            " (input)")
        ref = 1.0 if layer.reference == NETWORK_INPUT or name in small and not own \
            else predicted(by_label.get(name), own)
        m2 = predicted(layer, True)
        if m2 is not None and ref is not None:
            found.append((i, "its input's predicted E[x²]", m2 / ref, layer))
    return found


def _on_branch(layers: list[Layer], i: int, zeros: set[int]) -> bool:
    """Whether the zero at weight layer i is confined to residual branches: it reaches
    a branch's end (``rejoins``: one that reads a zero too, or one in i's stretch past a
    bias), and a later weight layer reads a non-zero input (the trunk carries on)."""
    stretch = layers[i].stretch
    return any(layers[j].rejoins and (j in zeros or layers[j].stretch == stretch)
               for j in range(i, len(layers)) if is_weight(layers[j])) and any(
        j not in zeros and layers[j].input is not None and pos(layers[j].input.second_moment)
        is not None for j in range(i + 1, len(layers)) if is_weight(layers[j]))


def revives(layers: list[Layer], i: int) -> bool:
    """Whether the exact zero at weight layer i's input comes back after one step: the
    layer that made it (``_maker``) has a gradient at its output, so its parameters move
    (a zero-initialized layer before a tanh, a LayerNorm with γ = 0 at a pre-LN branch's
    start). Behind a ReLU the gradient is zero too, so the zero stays: its maker, and
    the layers that read it, never learn. A learned gate at 0 between modules
    (``revives``, varprobe.structure) comes back by its own gradient."""
    if layers[i].revives:
        return True
    k = _maker(layers, i)
    grad = layers[k].backward if k is not None else None
    return grad is not None and pos(grad.var) is not None and math.isfinite(grad.var)


def _maker(layers: list[Layer], i: int) -> int | None:
    """The nearest layer before weight layer i whose output is zero while its input is
    not (``_killers``; an earlier one made another zero)."""
    found = _killers(layers, i)
    return found[-1] if found else None


def _killers(layers: list[Layer], at: int) -> list[int]:
    """The layers before ``at`` whose output is exactly zero while their input is not:
    where the signal died (a ReLU after a large negative bias is named by the weight
    layer that feeds it)."""
    found = []
    for j in range(at):
        layer = layers[j]
        if (layer.forward is None or layer.forward.second_moment != 0 or layer.input is None
                or not layer.input.second_moment):
            continue
        if layer.kind == "activation":
            feeder = next((k for k in range(j - 1, -1, -1) if is_weight(layers[k])), None)
            j = feeder if feeder is not None else j
        if j not in found:
            found.append(j)
    return found


def trends(report: Report, t: Thresholds, weights: list[int]) -> list[Trend]:
    """One flag per stretch and direction, at the worst point; its suspects are the
    stretch's weight layers up to there, and its culprits the ones that stand out."""
    found = []
    by_stretch: dict[int | None, list] = {}
    judged = points(report, weights, t.stretch)
    # where the signal is gone, everything after is a consequence: the first zero only;
    # a zero on a residual branch (the trunk carries the signal around it) is a warning
    zero = next((p for p in judged if p[2] == 0 and p[1] != BRANCH_ZERO), None)
    dead_branches(report, [p for p in judged if p[1] == BRANCH_ZERO
                           and (zero is None or p[0] < zero[0])])
    judged = [p for p in judged if p[2] != 0 or p is zero]
    for p in judged:
        by_stretch.setdefault(p[3].stretch, []).append(p)
    for stretch, pts in by_stretch.items():
        for code, outside, pick in (
                ("vanishing_forward", lambda p: p[2] < t.forward[0] and "output" not in p[1],
                 min),
                ("exploding_forward",
                 lambda p: p[2] > (t.output if "output" in p[1] else t.forward[1]), max)):
            out = [p for p in pts if outside(p)]
            if not out:
                continue
            at, what, r, layer = pick(out, key=lambda p: p[2])
            suspects = [i for i in weights if i <= at and report.layers[i].stretch == stretch]
            trend = Trend(code, at, suspects)
            if r == 0:
                message = (f"{what} is exactly zero: the signal died at "
                           f"{{culprits}} and nothing after it learns")
                killed = _killers(report.layers, at)
            else:
                limit = (f"limit {num(t.output)} for the output the loss sees"
                         if "output" in what else f"band {band(t.forward)}")
                since = ("" if out[0][0] == at else
                         f"; the signal leaves the band at {report.layers[out[0][0]].label}")
                small = small_norms(report.layers)
                of = (f"a normalized signal's (1: {layer.reference} sets "
                      f"{num(small[layer.reference])} by its small γ)"
                      if layer.reference in small else f"{layer.reference}'s")
                message = (f"{what} is {num(r)} of {of}, after "
                           f"{layer.depth or len(suspects)} weight layer(s) in series with "
                           f"nothing between to restore the scale ({limit})"
                           f"{since}: {CONSEQUENCE[code]}")
                killed = None
            culprits = killed if killed is not None else (
                culprits_of(report.layers, [trend], t) or _own(report.layers, at, what, t)
                or _scalers(report.layers, at, code, t))
            labels = [report.layers[i].label for i in culprits]
            # no module's output was zero first: a functional op between them zeroed it
            where = ", ".join(labels[:3]) or f"an operation between modules before {layer.label}"
            flag(layer, code, message.replace("{culprits}", where), r, labels)
            trend.suspects = culprits if killed else suspects
            found.append(trend)
    return found


def dead_branches(report: Report, zeros: list) -> None:
    """dead_branch: a residual branch whose input is exactly zero and stays so (not
    ``revives``): its layers never learn, while the trunk carries the signal around."""
    for i, _, _, layer in zeros:
        k = _maker(report.layers, i)
        makers = [report.layers[k].label] if k is not None else []
        where = makers[0] if makers else f"an operation between modules before {layer.label}"
        flag(layer, "dead_branch",
             f"its input is exactly zero, made by {where}, and so is the gradient there: "
             "this residual branch never learns (nor does what zeroed it), while the trunk "
             "carries the signal around it; a zero-initialized scale (γ = 0) belongs at "
             "the branch's end, after its last activation", 0.0, makers)


def _own(layers: list[Layer], at: int, what: str, t: Thresholds) -> list[int]:
    """The last layer itself, where its output is judged one weight layer after its
    reference and its own measured step, E[y²]/E[x²], passes the output's limit alone:
    it made the excess (not a reference that was already too large). ``culprits``
    wants both of a layer's factors out of band, and a head's backward one, n̂·E[w²]
    over a few outputs, is small by construction (a 10-class head at Var[w] = 1/30:
    forward 15, backward 0.3)."""
    layer = layers[at]
    m_in = pos(layer.input.second_moment) if layer.input is not None else None
    m_out = layer.forward.second_moment if layer.forward is not None else None
    own = m_in is not None and m_out is not None and m_out / m_in > t.output
    return [at] if "output" in what and (layer.depth or 1) <= 1 and own else []


def _scalers(layers: list[Layer], at: int, code: str, t: Thresholds) -> list[int]:
    """Where no weight layer's factor explains a trend: the weightless modules on its
    stretch before it (the same reference) whose measured E[y²]/E[x²] lies outside the
    multiplier band that way, the furthest first (a Dropout at p = 0.999 scales by
    1000 in train mode)."""
    lo, hi = t.multiplier
    steps = {}
    for i in range(at):
        layer = layers[i]
        if is_weight(layer) or layer.kind == "norm" or layer.reference != layers[at].reference:
            continue
        m_in = pos(layer.input.second_moment) if layer.input else None
        m_out = pos(layer.forward.second_moment) if layer.forward else None
        if m_in is not None and m_out is not None:
            steps[i] = m_out / m_in
    far = (lambda r: r < lo) if code.startswith("vanishing") else (lambda r: r > hi)
    out = sorted((i for i in steps if far(steps[i])), key=lambda i: abs(math.log(steps[i])),
                 reverse=True)
    return out[:3]
