"""Flags, culprit layers and a checked fix, read off the numbers in a Report.

Pure: thresholds held against what the report already carries (measured statistics,
the structure read off the dataflow, and the predictions; a fix asks for the init
schemes' predictions it weighs). No hooks. Each rule lives in
one module with its rationale: ``forward`` (the signal's scale along un-normalized
stretches), ``backward`` (gradient products along chains), ``local`` (one layer at a
time), ``fix`` (culprits and the init that fixes them); the defaults in ``thresholds``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

from varprobe import range_flags
from varprobe.diagnose import attention, backward, forward, local
from varprobe.diagnose import fix as fixes
from varprobe.diagnose.common import SEVERITY, TREND_CODES, Trend, is_weight, num, places
from varprobe.diagnose.thresholds import SEVERITIES, Thresholds
from varprobe.report import Flag, Layer, Report

__all__ = ["SEVERITIES", "SEVERITY", "TREND_CODES", "Thresholds", "annotate", "flags",
           "ignored", "places"]


def annotate(report: Report, thresholds: Thresholds | None = None,
             ignore: Iterable[str] = (),
             schemes: Callable[[Iterable[str]], None] | None = None) -> Report:
    """Fill every layer's flags (most severe first) and report.summary.

    ``schemes(names)``: fills those init schemes' predictions (theory's
    ``Counterfactuals.add``) where a fix is to be weighed; without it the fix weighs
    the schemes the report already carries."""
    t = thresholds or Thresholds()
    ignore = list(ignore)
    layers = report.layers
    skip = {i for i, layer in enumerate(layers) if ignored(layer, ignore)}
    for layer in layers:
        layer.flags = []
    weights = [i for i, layer in enumerate(layers) if is_weight(layer) and i not in skip]
    local.nonfinite(layers, skip)
    local.unnormalized_input(report, t, weights)
    local.multipliers(layers, t, weights)  # first: culprits are read off these flags
    trends = forward.trends(report, t, weights) + backward.trends(layers, t, skip)
    local.dead_units(layers, t, skip)
    local.mismatch(layers, t, weights)
    attention.saturation(report, t, skip)
    range_flags.annotate(report, t.underflow, skip)
    once_per_module(layers)
    for layer in layers:
        layer.flags.sort(key=lambda f: SEVERITIES.index(f.severity))
    if trends and schemes is not None:
        schemes(fixes.SCHEME_PREFERENCE)
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


def once_per_module(layers: list[Layer]) -> None:
    """A module called k times (shared weights, a block applied in a loop) is one thing
    to fix: each code stays on its first flagged call, which says how many calls it
    holds for; the other calls lose it. Every call records the module's call count."""
    calls: dict[str, list[Layer]] = {}
    for layer in layers:
        calls.setdefault(layer.name, []).append(layer)
    for group in calls.values():
        for layer in group:
            layer.calls = len(group)
        if len(group) < 2:
            continue
        first: dict[str, tuple[Layer, Flag, list[int]]] = {}
        for layer in group:
            for f in list(layer.flags):
                if f.code in first:
                    first[f.code][2].append(layer.call)
                    layer.flags.remove(f)
                else:
                    first[f.code] = (layer, f, [layer.call])
        for _, f, at in first.values():
            f.message += (f" (the module is called {len(group)} times; flagged at call"
                          f"{'s' if len(at) > 1 else ''} {', '.join(map(str, at))})")


def _summarize(report: Report, t: Thresholds, trends: list[Trend]) -> None:
    s = report.summary
    every = [f for layer in report.layers for f in layer.flags]
    s.errors, s.warnings, s.infos = (sum(f.severity == sev for f in every)
                                     for sev in SEVERITIES)
    s.healthy = s.errors == 0
    index = {layer.label: i for i, layer in enumerate(report.layers)}
    named = {c for f in every if f.severity == "error" for c in f.culprits}
    culprits = sorted(index[c] for c in named if c in index)
    s.culprits = [report.layers[i].label for i in culprits]
    s.cause = fixes.cause(report.layers, culprits) if culprits else None
    s.fix = fixes.fix(report, t) if trends else None
    s.verdict = _verdict(report)


def _verdict(report: Report) -> str:
    found = flags(report, "warning")
    if not found:
        weights = [i for i, layer in enumerate(report.layers) if is_weight(layer)]
        ratios = [r for _, _, r, _ in forward.points(report, weights)]
        span = (f": each weight layer's E[x²] stays within [{num(min(ratios))}, "
                f"{num(max(ratios))}]× its reference's" if ratios else "")
        return f"the signal holds through every layer{span}"
    seen: dict[str, list[str]] = {}
    for layer, f in found:
        seen.setdefault(f.code, []).append(layer.label)
    return ", ".join(f"{code} at {places(labels)}" for code, labels in seen.items())
