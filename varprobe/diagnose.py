"""Flags, culprit layers and a checked fix, read off the numbers in a Report.

Pure: thresholds held against what the report already carries (measured statistics,
and propagate's multipliers and counterfactual predictions). No hooks. Why each
default threshold is what it is: docs/flags.md and the comments below.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from varprobe.errors import VarprobeError
from varprobe.report import Fix, Flag, ForwardStats, Layer, Report

SEVERITIES = ("error", "warning", "info")
SEVERITY = {"nonfinite": "error", "vanishing_forward": "error", "exploding_forward": "error",
            "vanishing_backward": "error", "exploding_backward": "error",
            "dead_units": "warning", "shrinks": "warning", "amplifies": "warning",
            "unnormalized_input": "warning", "theory_mismatch": "info"}
TREND_CODES = ("vanishing_forward", "exploding_forward", "vanishing_backward",
               "exploding_backward")
# Modules a unit passes through without changing what the weight layer started.
PASS_THROUGH = ("norm", "activation")
PASS_THROUGH_TYPES = ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "Identity")
RECTIFIERS = ("ReLU", "LeakyReLU", "PReLU", "RReLU")
LINEAR_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d",
                "ConvTranspose2d", "ConvTranspose3d")
SAME = 1e-9  # the recorder measures a tensor once: the same tensor has identical moments


@dataclass(frozen=True)
class Thresholds:
    """Where a number becomes a flag. Bands are [low, high]; see docs/flags.md.

    forward: a weight layer's output E[y^2] over the network input's E[x^2].
    backward: the product of measured backward multipliers along a chain of layers.
    grad_ratio: a layer's ||dL/dW||/||W|| over the median layer's (a norm ratio).
    multiplier: a layer's own n E[w^2] g (forward) and n^ E[w^2] g' (backward).
    dead_units: the fraction of an activation's units that are zero for every sample.
    input: the network input's E[x^2].
    mismatch_sigmas: measured vs local prediction, in units of the width-aware
    noise sd of docs/theory-review.md §10 (sqrt(2/n) forward, sqrt(0.75/n) backward).
    """

    forward: tuple[float, float] = (1e-2, 1e2)
    backward: tuple[float, float] = (1e-2, 1e2)
    grad_ratio: tuple[float, float] = (1e-2, 1e2)
    multiplier: tuple[float, float] = (0.6, 1 / 0.6)
    dead_units: float = 0.5
    input: tuple[float, float] = (0.1, 10.0)
    mismatch_sigmas: float = 4.0

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def updated(self, values: Mapping[str, Any], where: str) -> Thresholds:
        """A copy with ``values`` applied; a VarprobeError naming the key when one is bad."""
        changes = {}
        for key, value in values.items():
            if key not in self.names():
                raise VarprobeError(f"{where}: unknown threshold {key!r} "
                                    f"(valid: {', '.join(self.names())})")
            changes[key] = _checked(key, value, isinstance(getattr(self, key), tuple), where)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}


def _checked(key: str, value: Any, band: bool, where: str) -> Any:
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if band:
        if (isinstance(value, (list, tuple)) and len(value) == 2 and all(map(number, value))
                and 0 < value[0] < value[1]):
            return (float(value[0]), float(value[1]))
        raise VarprobeError(f"{where}: threshold {key!r} must be [low, high] with "
                            f"0 < low < high, not {value!r}")
    limit = 1.0 if key == "dead_units" else math.inf
    if number(value) and 0 < value <= limit:
        return float(value)
    raise VarprobeError(f"{where}: threshold {key!r} must be a number in "
                        f"{'(0, 1]' if key == 'dead_units' else '(0, inf)'}, not {value!r}")


@dataclass
class Trend:
    """A vanishing/exploding flag and the weight layers that can be behind it."""

    code: str
    at: int
    suspects: list[int]  # weight-layer indices in execution order


# --- entry points ---------------------------------------------------------------------

def annotate(report: Report, thresholds: Thresholds | None = None,
             ignore: Iterable[str] = ()) -> Report:
    """Fill every layer's flags (most severe first) and report.summary."""
    t = thresholds or Thresholds()
    ignore = list(ignore)
    layers = report.layers
    skip = {i for i, layer in enumerate(layers) if ignored(layer, ignore)}
    for layer in layers:
        layer.flags = []
    weights = [i for i, layer in enumerate(layers) if layer.kind == "weight" and i not in skip]
    _nonfinite(layers, skip)
    _input(report, t, weights)
    trends = _forward_trend(report, t, weights) + _backward_trend(layers, t, skip)
    _grad_ratio(layers, t, weights)
    _multipliers(layers, t, weights)
    _dead_units(layers, t, skip)
    _mismatch(layers, t, weights)
    for layer in layers:
        layer.flags.sort(key=lambda f: SEVERITIES.index(f.severity))
    _summarize(report, t, trends)
    report.settings["thresholds"] = t.to_dict()
    report.settings["ignore"] = ignore
    return report


def ignored(layer: Layer, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(layer.name, p) or fnmatch.fnmatchcase(layer.label, p)
               for p in patterns)


def flags(report: Report, at_least: str = "info") -> list[tuple[Layer, Flag]]:
    """(layer, flag) for every flag at or above a severity, most severe first."""
    rank = SEVERITIES.index(at_least)
    found = [(layer, f) for layer in report.layers for f in layer.flags
             if SEVERITIES.index(f.severity) <= rank]
    return sorted(found, key=lambda lf: SEVERITIES.index(lf[1].severity))


def assert_healthy(model: Any, inputs: Any = None, *, fail_on: str = "error",
                   ignore: Iterable[str] = (), batch_size: int = 256, seed: int = 0,
                   **thresholds: Any) -> Any:
    """Probe ``model`` and raise AssertionError listing every flag at or above ``fail_on``.

    Keyword thresholds override the defaults, e.g. ``forward=(1e-3, 1e3)``. Returns the
    Report when the model passes.
    """
    from varprobe.pipeline import probe

    if fail_on not in SEVERITIES:
        raise ValueError(f"fail_on must be one of {', '.join(SEVERITIES)}, not {fail_on!r}")
    try:
        t = Thresholds().updated(thresholds, "assert_healthy")
    except VarprobeError as exc:
        raise TypeError(str(exc)) from None
    report = probe(model, inputs, batch_size=batch_size, seed=seed, thresholds=t,
                   ignore=ignore)
    found = flags(report, fail_on)
    if found:
        lines = [f"  {f.severity} {f.code} at {layer.label}: {f.message}" for layer, f in found]
        fix = report.summary.fix
        if fix is not None:
            lines.append(f"  fix: {fix.short}")
        raise AssertionError(f"varprobe: {type(model).__name__} has {len(found)} flag(s) at "
                             f"or above {fail_on}:\n" + "\n".join(lines))
    return report


# --- small helpers --------------------------------------------------------------------

def _num(value: float | None) -> str:
    if value is None:
        return "—"
    if value == 0 or 1e-2 <= abs(value) < 1e3:
        return f"{value:.3g}"
    return f"{value:.2e}"


def _band(band: tuple[float, float]) -> str:
    return f"[{band[0]:.3g}, {band[1]:.3g}]"


def _pos(value: float | None) -> float | None:
    """A finite positive number, else None."""
    return value if value is not None and math.isfinite(value) and value > 0 else None


def _same(a: ForwardStats | None, b: ForwardStats | None) -> bool:
    """Whether two measured tensors are one and the same (identical moments)."""
    if a is None or b is None or a.second_moment is None or b.second_moment is None:
        return False
    x, y = a.second_moment, b.second_moment
    return abs(x - y) <= SAME * max(abs(x), abs(y)) and (a.mean == b.mean)


def _flag(layer: Layer, code: str, message: str, value: float | None = None) -> None:
    if all(f.code != code for f in layer.flags):
        layer.flags.append(Flag(code=code, severity=SEVERITY[code], message=message,
                                value=value))


def _passes_through(layer: Layer) -> bool:
    return layer.kind in PASS_THROUGH or layer.type in PASS_THROUGH_TYPES


def _unit_end(layers: list[Layer], i: int, stop_at_norm: bool = False) -> int:
    """The last layer of weight layer i's unit: the elementwise modules (norm,
    activation, dropout) that consume its output one after the other."""
    j = i
    while (j + 1 < len(layers) and _passes_through(layers[j + 1])
           and _same(layers[j + 1].input, layers[j].forward)):
        if stop_at_norm and layers[j + 1].kind == "norm":
            break
        j += 1
    return j


def _feeds_norm(layers: list[Layer], i: int) -> bool:
    """A norm layer rescales this layer's output (possibly after an activation), so
    the layer's own scale cancels and its multiplier says nothing."""
    j = _unit_end(layers, i, stop_at_norm=True)
    return (j + 1 < len(layers) and layers[j + 1].kind == "norm"
            and _same(layers[j + 1].input, layers[j].forward))


# --- the checks -----------------------------------------------------------------------

def _nonfinite(layers: list[Layer], skip: set[int]) -> None:
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
            _flag(layer, "nonfinite", f"{n_in or n_out} non-finite values (NaN/Inf) in "
                  f"{where}, the first place they appear in the forward pass",
                  float(n_in or n_out))
            return
    for i in reversed(range(len(layers))):
        layer = layers[i]
        n = count(layer.backward, layer.backward_input)
        if i not in skip and n:
            _flag(layer, "nonfinite", f"{n} non-finite values (NaN/Inf) in its gradient, "
                  "the first place they appear in the backward pass", float(n))
            return


def _input(report: Report, t: Thresholds, weights: list[int]) -> None:
    m2 = report.input.second_moment
    if m2 is None or not math.isfinite(m2) or t.input[0] <= m2 <= t.input[1] or not weights:
        return
    _flag(report.layers[weights[0]], "unnormalized_input",
          f"the network input has E[x²] = {_num(m2)} (band {_band(t.input)}); He et al. "
          "2015 warn that an un-normalized input (e.g. in [-128, 128]) can overflow the "
          "softmax: normalize it to unit variance, or scale the first layer's weights "
          "by 1/sqrt(E[x²])", m2)


def _reference(report: Report, weights: list[int]) -> tuple[float | None, str]:
    """What forward ratios are relative to: the input's E[x^2], or the first weight
    layer's output when the input is not a float tensor (token ids)."""
    m2 = _pos(report.input.second_moment)
    if m2 is not None:
        return m2, "the network input's"
    first = report.layers[weights[0]].forward if weights else None
    return (_pos(first.second_moment) if first else None), "the first layer's output"


def _signal(report: Report, weights: list[int]) -> list[tuple[int, str, float]]:
    """(layer, what, E[.^2]) where the forward signal is judged: the input of every
    weight layer, and the last weight layer's output (the network's output).

    Inputs, not outputs: a branch output that joins a residual stream (attention at
    init averages its values over the sequence; SkipInit/GPT-2 scale branches down on
    purpose) is not where the signal lives; the next layer's input is.
    """
    points = []
    last = max((i for i, layer in enumerate(report.layers) if layer.kind == "weight"),
               default=None)
    for i in weights:
        layer = report.layers[i]
        for what, stats in (("its input's E[x²]", layer.input),
                            ("its output's E[y²]", layer.forward if i == last else None)):
            m2 = stats.second_moment if stats is not None else None
            if m2 is not None and math.isfinite(m2):
                points.append((i, what, m2))
    return points


def _forward_trend(report: Report, t: Thresholds, weights: list[int]) -> list[Trend]:
    ref, of = _reference(report, weights)
    if ref is None:
        return []
    ratios = [(i, what, m2 / ref) for i, what, m2 in _signal(report, weights)]
    trends = []
    for code, outside, pick in (("vanishing_forward", lambda r: r < t.forward[0], min),
                                ("exploding_forward", lambda r: r > t.forward[1], max)):
        out = [p for p in ratios if outside(p[2])]
        if not out:
            continue
        at, what, r = pick(out, key=lambda p: p[2])
        first = report.layers[out[0][0]].label
        since = "" if out[0][0] == at else f"; the signal leaves the band at {first}"
        _flag(report.layers[at], code, f"{what} is {_num(r)} of {of} (band "
              f"{_band(t.forward)}){since}", r)
        trends.append(Trend(code, at, [i for i in weights if i <= at]))
    return trends


@dataclass
class _Unit:
    first: int  # the weight layer
    last: int   # the last layer of its unit
    factor: float | None  # backward energy multiplier: grad energy in / grad energy out


def _units(layers: list[Layer]) -> list[_Unit]:
    """Each weight layer with the elementwise modules after it, and its measured
    backward multiplier, per element count (N_in Var[dL/dx]) / (N_out Var[dL/dy]).

    Per element count: a strided conv or a Linear into fewer units changes the
    per-element gradient variance by the ratio of element counts, which is geometry,
    not signal loss; the total gradient energy N Var is what the layer scales.
    """
    units = []
    for i, layer in enumerate(layers):
        if layer.kind != "weight":
            continue
        j = _unit_end(layers, i)
        units.append(_Unit(i, j, _energy_ratio(layer, layers[j])))
    return units


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


def _runs(layers: list[Layer], units: list[_Unit]) -> list[list[_Unit]]:
    """Maximal chains: each unit consumes exactly the previous unit's output.

    A residual add, concatenation, pooling or functional op breaks the chain: there
    the gradient also flows around the branch (the skip path), which a product of
    the branch's multipliers cannot see.
    """
    runs: list[list[_Unit]] = []
    for unit in units:
        if (runs and runs[-1][-1].factor is not None and unit.factor is not None
                and _same(layers[unit.first].input, layers[runs[-1][-1].last].forward)):
            runs[-1].append(unit)
        else:
            runs.append([unit])
    return runs


def _backward_trend(layers: list[Layer], t: Thresholds, skip: set[int]) -> list[Trend]:
    """He's Eq. 13 measured: the product of the backward multipliers of the layers
    after each weight layer, along the chain it belongs to."""
    products = []  # (weight index, product, units after it)
    for run in _runs(layers, _units(layers)):
        product = 1.0
        for k in range(len(run) - 1, -1, -1):
            if run[k].first not in skip and k < len(run) - 1:
                products.append((run[k].first, product, run[k + 1:]))
            if run[k].first not in skip and run[k].factor is not None:
                product *= run[k].factor
    # An exact zero is a zero-initialized scale (SkipInit, Fixup, zero_init_residual),
    # a deliberate design, not a trend.
    products = [p for p in products if p[1] > 0]
    trends = []
    for code, outside, pick in (("vanishing_backward", lambda p: p < t.backward[0], min),
                                ("exploding_backward", lambda p: p > t.backward[1], max)):
        out = [p for p in products if outside(p[1])]
        if not out:
            continue
        at, value, after = pick(out, key=lambda p: p[1])
        top = layers[after[-1].last].label
        _flag(layers[at], code, f"the gradient reaching it is {_num(value)} of the gradient "
              f"at {top} (product of the measured backward multipliers of the "
              f"{len(after)} layers between; band {_band(t.backward)})", value)
        trends.append(Trend(code, at, [u.first for u in after if u.first not in skip]))
    return trends


def _grad_ratio(layers: list[Layer], t: Thresholds, weights: list[int]) -> None:
    """||dL/dW|| / ||W|| against the median layer's: a structure-agnostic check (it does
    not care about residual adds or pooling) of whether one learning rate suits all."""
    ratios = [(i, layers[i].weight_grad_ratio) for i in weights
              if _pos(layers[i].weight_grad_ratio) is not None]
    if len(ratios) < 3:
        return
    median = statistics.median(r for _, r in ratios)
    lo, hi = t.grad_ratio
    for i, r in ratios:
        rel = r / median
        code = ("vanishing_backward" if rel < lo else "exploding_backward" if rel > hi
                else None)
        if code is not None:
            _flag(layers[i], code, f"its weight gradient relative to its weights "
                  f"(‖∇W‖/‖W‖ = {_num(r)}) is {_num(rel)}× the median layer's (band "
                  f"{_band(t.grad_ratio)}): one learning rate cannot suit both", rel)


def _multiplier_values(layer: Layer) -> list[float]:
    return [m for m in (layer.forward_multiplier, layer.backward_multiplier)
            if m is not None and math.isfinite(m)]


def _multipliers(layers: list[Layer], t: Thresholds, weights: list[int]) -> None:
    """shrinks / amplifies: the layer's own n E[w^2] g and n^ E[w^2] g' (propagate's,
    from the layer's actual weights) both on one side of the band.

    Both, because He et al. show either condition alone keeps a network stable (the
    other's product telescopes to a width ratio), so a non-square layer that meets
    one of them is fine. Skipped: a layer whose output a norm rescales (its scale
    cancels), and the first and last weight layers: "the factor does not matter if
    it just exists on one layer" (He et al. 2015, on the first layer's missing ReLU),
    and a factor that does not repeat cannot compound.
    """
    every = [i for i, layer in enumerate(layers) if layer.kind == "weight"]
    ends = {every[0], every[-1]} if every else set()
    lo, hi = t.multiplier
    for i in weights:
        layer = layers[i]
        values = _multiplier_values(layer)
        if i in ends or not values or _feeds_norm(layers, i):
            continue
        code = ("shrinks" if max(values) < lo else "amplifies" if min(values) > hi
                else None)
        if code is None:
            continue
        parts = []
        if layer.forward_multiplier is not None:
            parts.append(f"forward n·E[w²]·g = {_num(layer.forward_multiplier)}")
        if layer.backward_multiplier is not None:
            parts.append(f"backward n̂·E[w²]·g' = {_num(layer.backward_multiplier)}")
        _flag(layer, code, f"{', '.join(parts)} (band {_band(t.multiplier)}; 1 holds the "
              "signal)", values[0])


def _dead_units(layers: list[Layer], t: Thresholds, skip: set[int]) -> None:
    feeder = None
    for i, layer in enumerate(layers):
        if layer.kind == "weight":
            feeder = layer
        dead = layer.forward.dead_fraction if layer.forward else None
        if (i in skip or layer.kind != "activation" or dead is None
                or not math.isfinite(dead) or dead <= t.dead_units):
            continue
        source = f" (fed by {feeder.label})" if feeder is not None else ""
        _flag(layer, "dead_units", f"{dead:.0%} of its units are zero for every sample"
              f"{source} (threshold {t.dead_units:.0%}); a large negative bias or a "
              "vanished input kills them: check that layer's bias and scale", dead)


def _mismatch(layers: list[Layer], t: Thresholds, weights: list[int]) -> None:
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
        n = _pos(min(layer.effective_fan_in or layer.fan_in or 0,
                     layer.effective_fan_out or layer.fan_out or 0))
        for what, measured, predicted, c in checks:
            if _pos(measured) is None or _pos(predicted) is None or n is None:
                continue
            gap, tol = abs(math.log(measured / predicted)), t.mismatch_sigmas * math.sqrt(c / n)
            if gap > tol:
                parts.append(f"{what} measured/predicted = {measured / predicted:.3g} "
                             f"(tolerance ×{math.exp(tol):.3g})")
                worst = max(worst, measured / predicted, predicted / measured)
        if parts:
            _flag(layer, "theory_mismatch", "; ".join(parts) + ": the independence "
                  "assumptions of the theory do not hold here (trained or correlated "
                  "weights, correlated inputs)", worst)


# --- verdict, culprits, fix -----------------------------------------------------------

def _summarize(report: Report, t: Thresholds, trends: list[Trend]) -> None:
    s = report.summary
    every = [f for layer in report.layers for f in layer.flags]
    s.errors, s.warnings, s.infos = (sum(f.severity == sev for f in every)
                                     for sev in SEVERITIES)
    s.healthy = s.errors == 0
    culprits = _culprits(report.layers, trends, t)
    s.culprits = [report.layers[i].label for i in culprits]
    s.cause = _cause(report.layers, culprits) if culprits else None
    s.fix = _fix(report, t) if trends else None
    s.verdict = _verdict(report)


def _culprits(layers: list[Layer], trends: list[Trend], t: Thresholds) -> list[int]:
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
                     if (v := [x for x in _multiplier_values(layers[i]) if x > 0])}
            flagged = sorted((i for i in depth if depth[i] < 1), key=depth.get)[:3]
        found.update(flagged)
    return sorted(found)


def _cause(layers: list[Layer], culprits: list[int]) -> str:
    values = [_multiplier_values(layers[i])[0] for i in culprits
              if _multiplier_values(layers[i])]
    names = ", ".join(layers[i].label for i in culprits[:3])
    more = f" and {len(culprits) - 3} more" if len(culprits) > 3 else ""
    if not values:
        return f"{names}{more}"
    typical = statistics.median(values)
    verb = "multiplies" if len(culprits) == 1 else "each multiply"
    return (f"{names}{more} {verb} the signal by n·E[w²]·g ≈ {_num(typical)}"
            f"{_init_hint(layers, culprits)}")


def _init_hint(layers: list[Layer], culprits: list[int]) -> str:
    """Name the init that n E[w^2] points to, when the culprits agree on one."""
    scaled = []
    for i in culprits:
        layer = layers[i]
        n = layer.effective_fan_in or layer.fan_in
        w2 = layer.weight_second_moment or layer.weight_var
        if _pos(n) is None or w2 is None:
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
               f"keeps only {_num(layer.gain)} of the second moment)"
    if n and m and near(2 * n / (n + m)):
        return " (Xavier's Var[w] = 2/(n+n̂) assumes linear units)"
    return f" (n·Var[w] = {_num(v)})"


SCHEME_PREFERENCE = ("he", "he-prelu", "he-fan-out", "xavier", "lecun", "torch-default")


def _fix(report: Report, t: Thresholds) -> Fix | None:
    """The init scheme whose predicted forward trajectory stays inside the band, with
    the best end-to-end ratios; ties go to the simpler scheme."""
    from varprobe.propagate import end_to_end  # imports torch: only once a report exists

    weights = [layer for layer in report.weight_layers if layer.type in LINEAR_TYPES]
    if not weights:
        return None
    ref, _ = _reference(report, [layer.index for layer in report.weight_layers])
    best: tuple[float, str, tuple[float | None, float | None]] | None = None
    for scheme in SCHEME_PREFERENCE:
        ends = end_to_end(report, scheme)
        score = _score(report, scheme, ref, t, ends)
        if score is not None and (best is None or score < best[0] - 1e-9):
            best = (score, scheme, ends)
    if best is None:
        return None
    _, scheme, after = best
    code, short = _code(scheme, weights)
    return Fix(scheme=scheme, code=code, short=short, layers=[w.label for w in weights],
               before=list(end_to_end(report)), after=list(after))


def _score(report: Report, scheme: str, ref: float | None, t: Thresholds,
           ends: tuple[float | None, float | None]) -> float | None:
    """Worst |log| forward ratio over the predicted trajectory plus |log| end-to-end
    backward ratio; None when the trajectory leaves the forward band. Layers without
    a closed form (attention) carry no prediction and are passed over."""
    values = [_pos(p.forward_var) for layer in report.weight_layers
              if (p := layer.schemes.get(scheme)) is not None]
    values = [v for v in values if v is not None]
    if ref is None or not values:
        return None
    worst = 0.0
    for value in values:
        ratio = value / ref
        if not t.forward[0] <= ratio <= t.forward[1]:
            return None
        worst = max(worst, abs(math.log(ratio)))
    backward = _pos(ends[1])
    return worst + (abs(math.log(backward)) if backward is not None else 0.0)


def _slope(layer: Layer) -> float:
    """The PReLU slope he-prelu uses for this layer (propagate.prelu_slopes' rule): the
    activation before it, else (first layer) the one after; a = sqrt(2g - 1)."""
    act, gain = ((layer.input_activation, layer.input_gain) if layer.input_activation
                 else (layer.activation, layer.gain))
    if act not in RECTIFIERS or gain is None:
        return 0.0
    return math.sqrt(max(0.0, 2 * gain - 1))


def _init_call(scheme: str, target: str, a: float = 0.0) -> str:
    calls = {
        "he": f'nn.init.kaiming_normal_({target}, mode="fan_in", nonlinearity="relu")',
        "he-fan-out": f'nn.init.kaiming_normal_({target}, mode="fan_out", '
                      'nonlinearity="relu")',
        "he-prelu": f'nn.init.kaiming_normal_({target}, a={a:.4g}, mode="fan_in", '
                    'nonlinearity="leaky_relu")',
        "xavier": f"nn.init.xavier_normal_({target})",
        "lecun": f'nn.init.kaiming_normal_({target}, mode="fan_in", nonlinearity="linear")',
        "torch-default": f"nn.init.kaiming_uniform_({target}, a=5 ** 0.5)",
    }
    return calls[scheme]


def _code(scheme: str, weights: list[Layer]) -> tuple[str, str]:
    """Runnable code re-initializing every Linear/Conv layer (biases zeroed, as the
    prediction assumes), and the init call alone."""
    slopes = {round(_slope(layer), 4) for layer in weights}
    short = _init_call(scheme, "…", next(iter(slopes))).removeprefix("nn.init.")
    if scheme == "he-prelu" and len(slopes) > 1:
        lines = []
        for layer in weights:
            target = f"model.get_submodule({layer.name!r})"
            lines.append(_init_call(scheme, f"{target}.weight", _slope(layer)))
            lines.append(f"if {target}.bias is not None: nn.init.zeros_({target}.bias)")
        return "\n".join(lines), short
    types = sorted({layer.type for layer in weights}, key=LINEAR_TYPES.index)
    kinds = f"nn.{types[0]}" if len(types) == 1 else f"({', '.join('nn.' + k for k in types)})"
    code = (f"for m in model.modules():\n"
            f"    if isinstance(m, {kinds}):\n"
            f"        {_init_call(scheme, 'm.weight', next(iter(slopes)))}\n"
            f"        if m.bias is not None:\n"
            f"            nn.init.zeros_(m.bias)")
    return code, short


def _verdict(report: Report) -> str:
    found = flags(report, "warning")
    if not found:
        weights = [i for i, layer in enumerate(report.layers) if layer.kind == "weight"]
        ref, of = _reference(report, weights)
        ratios = [m2 / ref for _, _, m2 in _signal(report, weights)] if ref else []
        span = (f": E[x²] stays within [{_num(min(ratios))}, {_num(max(ratios))}]× {of}"
                if ratios else "")
        return f"the signal holds through every layer{span}"
    seen: dict[str, list[str]] = {}
    for layer, f in found:
        seen.setdefault(f.code, []).append(layer.label)
    return ", ".join(f"{code} at {_places(labels)}" for code, labels in seen.items())


def _places(labels: list[str]) -> str:
    if len(labels) <= 3:
        return ", ".join(labels)
    return f"{', '.join(labels[:3])} and {len(labels) - 3} more"
