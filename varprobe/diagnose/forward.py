"""vanishing_forward / exploding_forward: the signal's scale along un-normalized stretches.

He et al.'s recursion compounds a per-layer factor through the weight layers between
two points where the scale is set anew (varprobe.structure: a normalization, an
embedding, pooling, attention, or the network input). So each weight layer's input is
held against the tensor it inherits its scale from, not against the network input: a
LayerNorm'd input 2500x the embedding lookup's scale is a norm doing its job, while
a 30-layer ReLU stack at Xavier init keeps 2^-29 of its input, which no later layer can
restore. The last weight layer's output is judged too: it is what the loss sees.
"""

from __future__ import annotations

from varprobe.diagnose.common import Trend, band, flag, is_weight, num, pos
from varprobe.diagnose.thresholds import Thresholds
from varprobe.report import Layer, Report

CONSEQUENCE = {
    "vanishing_forward": "the layers from here on receive almost none of the signal, and "
                         "the gradients of their weights shrink with it",
    "exploding_forward": "whatever reads it (a softmax, a saturating activation, the loss) "
                         "saturates, and the gradients grow with it",
}


def points(report: Report, weights: list[int]) -> list[tuple[int, str, float, Layer]]:
    """(layer, what, ratio to its reference, the layer) at every judged point."""
    layers = report.layers
    last = max((i for i, layer in enumerate(layers) if is_weight(layer)), default=None)
    found = []
    for i in weights:
        layer = layers[i]
        ref = pos(layer.reference_second_moment)
        if ref is None or layer.reference == f"{layer.label} (input)":
            continue  # its own input sets the scale: nothing before it to compound
        for what, stats in (("its input's E[x²]", layer.input),
                            ("its output's E[y²]", layer.forward if i == last else None)):
            m2 = stats.second_moment if stats is not None else None
            if m2 is None or m2 != m2 or (m2 == 0 and _deliberate_zero(layers, i)):
                continue
            found.append((i, what, m2 / ref, layer))
    return found


def _deliberate_zero(layers: list[Layer], i: int) -> bool:
    """An exact zero made on purpose: a zero-initialized weight in the same stretch
    (a zero-init head, a ControlNet zero conv, zero initial flow) before it or at it."""
    stretch = layers[i].stretch
    return any(layer.weight_second_moment == 0 for layer in layers[: i + 1]
               if is_weight(layer) and layer.stretch == stretch)


def trends(report: Report, t: Thresholds, weights: list[int]) -> list[Trend]:
    """One flag per stretch and direction, at the worst point; its suspects are the
    stretch's weight layers up to there."""
    found = []
    by_stretch: dict[int | None, list] = {}
    for p in points(report, weights):
        by_stretch.setdefault(p[3].stretch, []).append(p)
    for stretch, pts in by_stretch.items():
        for code, outside, pick in (("vanishing_forward", lambda r: r < t.forward[0], min),
                                    ("exploding_forward", lambda r: r > t.forward[1], max)):
            out = [p for p in pts if outside(p[2])]
            if not out:
                continue
            at, what, r, layer = pick(out, key=lambda p: p[2])
            suspects = [i for i in weights if i <= at and report.layers[i].stretch == stretch]
            since = ("" if out[0][0] == at else
                     f"; the signal leaves the band at {report.layers[out[0][0]].label}")
            flag(layer, code, f"{what} is {num(r)} of {layer.reference}'s, after "
                 f"{layer.depth or len(suspects)} weight layer(s) in series with nothing "
                 f"between to restore the scale (band {band(t.forward)}){since}: "
                 f"{CONSEQUENCE[code]}", r)
            found.append(Trend(code, at, suspects))
    return found
