"""``--trials K``: the mean of K probes and a 95% interval for every measured number.

Trial k runs with seed + k: a new input and cotangent each time (and new weights
under ``--init``). The report holds the arithmetic mean over the trials, which is
unbiased for the quantities the theory predicts (docs/theory-review.md §1, §10), and in
``intervals`` a 95% confidence interval for that mean, mean ± t(0.975, K-1)·sd/√K
(sd over the trials, with K-1 degrees of freedom). Quantities that cannot be negative
(second moments, variances, fractions) have the lower end clipped at 0. Counts of
non-finite values are the largest count of any trial, so that one bad trial shows.
Number ranges (``--precision``) are those of all the trials' elements together.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np

from varprobe.errors import VarprobeError
from varprobe.precision import merged
from varprobe.report import Layer, Report

STATS = ("input", "forward", "backward", "backward_input")
WEIGHT_FIELDS = ("weight_var", "weight_second_moment", "bias_second_moment", "bias_mean",
                 "weight_row_share", "weight_grad_ratio")
SIGNED = {"mean"}  # the only measured fields that may be negative
COUNTS = {"nonfinite"}


def aggregate(reports: Sequence[Report]) -> Report:
    """One report with the trials' means and 95% intervals (``reports`` alike in layout)."""
    first = reports[0]
    layout = [(layer.name, layer.call) for layer in first.layers]
    for report in reports[1:]:
        other = [(layer.name, layer.call) for layer in report.layers]
        if other != layout:
            differ = sorted({n for n, _ in set(layout) ^ set(other)})
            raise VarprobeError(
                f"the trials ran different layers ({', '.join(differ[:3])}"
                f"{' and more' if len(differ) > 3 else ''}): the model's execution depends "
                "on the seed or the input (LayerDrop and stochastic depth skip layers at "
                "random in train mode); use --mode eval or --trials 1")
    out = copy.deepcopy(first)
    for i, layer in enumerate(out.layers):
        _layer(layer, [r.layers[i] for r in reports])
    for name in ("input", "output"):
        tensors = [getattr(r, name) for r in reports]
        if tensors[0] is not None and all(t is not None for t in tensors):
            _fields(getattr(out, name), tensors, ("mean", "var", "second_moment"),
                    out.intervals, name)
    out.notes = list(dict.fromkeys(n for r in reports for n in r.notes))
    out.settings["trials"] = len(reports)
    return out


def _layer(layer: Layer, trials: list[Layer]) -> None:
    for name in STATS:
        stats = [getattr(t, name) for t in trials]
        if any(s is None for s in stats):
            setattr(layer, name, None)
            continue
        names = tuple(f.name for f in dataclasses.fields(stats[0]))
        _fields(getattr(layer, name), stats, names, layer.intervals, name)
    _fields(layer, trials, WEIGHT_FIELDS, layer.intervals, None)
    # Number ranges: of all the trials' elements together (K batches), not a mean.
    layer.ranges = {key: merged([t.ranges[key] for t in trials]) for key in layer.ranges
                    if all(key in t.ranges for t in trials)}


def _fields(target, sources, names, intervals: dict, prefix: str | None) -> None:
    for name in names:
        values = [getattr(s, name) for s in sources]
        if any(v is None for v in values):
            setattr(target, name, None)
            continue
        if name in COUNTS:
            setattr(target, name, max(values))
            continue
        mean, interval = summarize([float(v) for v in values], signed=name in SIGNED)
        setattr(target, name, mean)
        if interval is not None:
            intervals[f"{prefix}.{name}" if prefix else name] = interval


def summarize(values: list[float], signed: bool = True) -> tuple[float, list[float] | None]:
    """Mean and 95% t-interval of the mean; no interval for one value or non-finite ones."""
    k = len(values)
    mean = math.fsum(values) / k
    if k < 2 or not all(math.isfinite(v) for v in values):
        return mean, None
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (k - 1))
    half = t_quantile(k - 1) * sd / math.sqrt(k)
    lo = mean - half
    return mean, [lo if signed else max(lo, 0.0), mean + half]


@functools.lru_cache(maxsize=64)  # one per trial count: summarize asks for every field
def t_quantile(df: int, p: float = 0.975) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (0.5 <= p <= 0.995).

    The density integrated by the trapezoid rule on [0, 64] (step 2.4e-4: error
    below 1e-6); 64 lies beyond the 0.995 quantile for every df >= 1.
    """
    t = np.linspace(0.0, 64.0, 1 << 18)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = np.exp(log_norm - (df + 1) / 2 * np.log1p(t * t / df))
    cdf = 0.5 + np.concatenate([[0.0], np.cumsum((pdf[1:] + pdf[:-1]) / 2 * np.diff(t))])
    return float(np.interp(p, cdf, t))
