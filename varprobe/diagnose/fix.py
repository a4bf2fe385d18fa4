"""Culprits, their cause, and a fix: the init whose predicted trajectory stays in band.

The fix is scored with the same predictions the report shows (the scheme columns), so
what is printed is what was checked.
"""

from __future__ import annotations

import math
import statistics

from varprobe import fixcode
from varprobe.diagnose.common import Trend, multiplier_values, num, pos
from varprobe.diagnose.thresholds import Thresholds
from varprobe.report import Fix, Layer, Report

RECTIFIERS = ("ReLU", "LeakyReLU", "PReLU", "RReLU")
LINEAR_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d",
                "ConvTranspose2d", "ConvTranspose3d", "Conv1D")  # Conv1D: transformers'


def culprits(layers: list[Layer], trends: list[Trend], t: Thresholds) -> list[int]:
    """Per trend: the shrinks (vanishing) / amplifies (exploding) layers among its
    suspects; where none is flagged (the first and last layers are never flagged),
    the three suspects whose multipliers lie furthest outside the band that way."""
    found: set[int] = set()
    for trend in trends:
        vanishing = trend.code.startswith("vanishing")
        code = "shrinks" if vanishing else "amplifies"
        flagged = [i for i in trend.suspects if any(f.code == code for f in layers[i].flags)]
        if not flagged:
            # how far inside (<1) or outside (>1) the band each suspect's factor lies
            depth = {i: (max(v) / t.multiplier[0] if vanishing else t.multiplier[1] / min(v))
                     for i in trend.suspects
                     if (v := [x for x in multiplier_values(layers[i]) if x > 0])}
            flagged = sorted((i for i in depth if depth[i] < 1), key=depth.get)[:3]
        found.update(flagged)
    return sorted(found)


def cause(layers: list[Layer], culprits: list[int]) -> str:
    values = [multiplier_values(layers[i])[0] for i in culprits
              if multiplier_values(layers[i])]
    names = ", ".join(layers[i].label for i in culprits[:3])
    more = f" and {len(culprits) - 3} more" if len(culprits) > 3 else ""
    if not values:  # weightless culprits (forward._scalers): their measured steps
        steps = [layers[i].forward.second_moment / layers[i].input.second_moment
                 for i in culprits if layers[i].input and layers[i].forward
                 and pos(layers[i].input.second_moment)
                 and layers[i].forward.second_moment is not None]
        if len(steps) != len(culprits):
            return f"{names}{more}"
        return (f"{names}{more} {'scales' if len(steps) == 1 else 'each scale'} E[x²] by "
                f"{num(statistics.median(steps))} (measured, output over input)")
    typical = statistics.median(values)
    verb = "multiplies" if len(culprits) == 1 else "each multiply"
    return (f"{names}{more} {verb} the signal by n·E[w²]·g ≈ {num(typical)}"
            f"{_init_hint(layers, culprits)}")


def _init_hint(layers: list[Layer], culprits: list[int]) -> str:
    """Name the init that n E[w^2] points to, when the culprits agree on one."""
    scaled = []
    for i in culprits:
        layer = layers[i]
        n = layer.effective_fan_in or layer.fan_in
        w2 = layer.weight_second_moment or layer.weight_var
        if pos(n) is None or w2 is None:
            return ""
        scaled.append((n * w2, layer))
    values = [v for v, _ in scaled]
    if min(values) <= 0 or max(values) > 1.1 * min(values):
        return ""  # all-zero weights, or culprits that disagree: no single init to name
    v, layer = statistics.median(values), scaled[0][1]

    def near(x: float) -> bool:
        return abs(math.log(v / x)) < 0.1

    n, m = layer.fan_in or 0, layer.fan_out or 0
    if near(1 / 3):
        return " (PyTorch's default init, kaiming_uniform_ with a=√5, gives n·Var[w] = 1/3)"
    if near(1.0) and layer.gain is not None and layer.gain < 0.9:
        return " (Var[w] = 1/n: Xavier/LeCun assume linear units, and the activation " \
               f"keeps only {num(layer.gain)} of the second moment)"
    if n and m and near(2 * n / (n + m)):
        return " (Xavier's Var[w] = 2/(n+n̂) assumes linear units)"
    return f" (n·Var[w] = {num(v)})"


SCHEME_PREFERENCE = ("he", "he-prelu", "he-fan-out", "xavier", "lecun", "torch-default")


def fix(report: Report, t: Thresholds) -> Fix | None:
    """The init scheme whose predicted forward trajectory stays inside the band, with
    the best end-to-end ratios; ties go to the simpler scheme."""
    from varprobe.theory import end_to_end  # imports torch: only once a report exists

    weights = [layer for layer in report.weight_layers if layer.type in LINEAR_TYPES]
    if not weights:
        return None
    head = _hot_head(report, weights[-1])
    if head is not None and (found := _head_fix(report, t, head)) is not None:
        return found
    ref = network_reference(report)
    best: tuple[float, str, tuple[float | None, float | None]] | None = None
    for scheme in SCHEME_PREFERENCE:
        ends = end_to_end(report, scheme)
        score = _score(report, scheme, ref, t, ends)
        if score is not None and (best is None or score < best[0] - 1e-9):
            best = (score, scheme, ends)
    if best is None:
        return None
    _, scheme, after = best
    code, short = fixcode.code(scheme, weights, [_slope(layer) for layer in weights])
    return Fix(scheme=scheme, code=code, short=short, layers=[w.label for w in weights],
               before=list(end_to_end(report)), after=list(after))


def _hot_head(report: Report, last: Layer) -> Layer | None:
    """The last weight layer, where every error is its own output excess (the flag that
    names it its own culprit, diagnose.forward): re-drawing it alone is the fix."""
    errors = [(layer, f) for layer in report.layers for f in layer.flags
              if f.severity == "error"]
    own = all(layer is last and f.code == "exploding_forward" and f.culprits == [last.label]
              for layer, f in errors)
    return last if errors and own and last is report.weight_layers[-1] else None


def _head_fix(report: Report, t: Thresholds, head: Layer) -> Fix | None:
    """The head alone re-drawn with the first scheme whose output, n·Var[w]·E[x²] on its
    measured input (a linear layer's closed form, the bias zeroed), passes the output's
    limit against min(its input, 1), its reference. The end-to-end ratios move by the new
    E[w²] over the old: the head's forward and backward factors are both linear in it."""
    from varprobe.theory import end_to_end, scheme_variance  # imports torch

    m_in = pos(head.input.second_moment) if head.input is not None else None
    w2, n = pos(head.weight_second_moment), head.effective_fan_in or head.fan_in
    if m_in is None or w2 is None or not n:
        return None
    for scheme in (s for s in SCHEME_PREFERENCE if s in fixcode.VARIANCE and s != "he-prelu"):
        var = scheme_variance(scheme, head.fan_in, head.fan_out)
        if var is None or n * var * m_in / min(m_in, 1.0) > t.output:
            continue
        before = list(end_to_end(report))
        code, short = fixcode.redraw(scheme, head)
        return Fix(scheme=scheme, code=code, short=short, layers=[head.label], before=before,
                   after=[None if v is None else v * var / w2 for v in before])
    return None


def _score(report: Report, scheme: str, ref: float | None, t: Thresholds,
           ends: tuple[float | None, float | None]) -> float | None:
    """Worst |log| forward ratio over the predicted trajectory plus |log| end-to-end
    backward ratio; None when the trajectory leaves the forward band, or the last
    layer's output passes the output's own limit (what the loss sees: held, as
    diagnose.forward holds it, against the smaller of 1 and its reference: the network's,
    or for a head right after a norm or a pool, its own predicted input). Layers without
    a closed form (attention) carry no prediction and are passed over."""
    last = report.weight_layers[-1] if report.weight_layers else None
    values = [(v, pos(p.input_var) if layer is last and (layer.depth or 1) <= 1 else None,
               layer is last)
              for layer in report.weight_layers
              if (p := layer.schemes.get(scheme)) is not None
              and (v := pos(p.forward_var)) is not None]
    if ref is None or not values:
        return None
    worst = 0.0
    for value, fed, output in values:
        ratio = value / ref
        if not t.forward[0] <= ratio <= t.forward[1] or (
                output and value / min(ref, fed or 1.0, 1.0) > t.output):
            return None
        worst = max(worst, abs(math.log(ratio)))
    backward = pos(ends[1])
    return worst + (abs(math.log(backward)) if backward is not None else 0.0)


def _slope(layer: Layer) -> float:
    """The PReLU slope he-prelu uses for this layer (theory.weights.prelu_slopes' rule): the
    activation before it, else (first layer) the one after; a = sqrt(2g - 1)."""
    act, gain = ((layer.input_activation, layer.input_gain) if layer.input_activation
                 else (layer.activation, layer.gain))
    if act not in RECTIFIERS or gain is None:
        return 0.0
    return math.sqrt(max(0.0, 2 * gain - 1))


def network_reference(report: Report) -> float | None:
    """What a scheme's predicted trajectory is held against: the network input's E[x^2],
    or the first weight layer's output when the input is not a float tensor (token ids)."""
    m2 = pos(report.input.second_moment)
    if m2 is not None:
        return m2
    first = report.weight_layers[0].forward if report.weight_layers else None
    return pos(first.second_moment) if first else None
