"""Attention heads that are one-hot at init (report.attention, from theory.attend).

The effective logit variance (1-r) s^2 sets how peaked the softmax is. Past
``attention_spread`` the closed forms of theory.attention stop holding and the softmax
heads towards one-hot: a warning. Where the average query's sum_j p_ij^2 reaches
``attention_participation`` (measured on a subsample of queries by the probe, from the
closed form in ``predict``), most of its weight is on one key: the softmax Jacobian,
and with it every gradient through the queries and keys, has all but vanished (entropy
collapse). That is an error, blamed on the query and key projections. Σp² is read
over its floor, what uniform weights give (1/k over k keys; the mean of 1/i where query
i sees the first i keys of a causal mask): two keys at uniform weights have Σp² = 1/2,
and a query that sees one key has Σp² = 1 whatever its logits (a cross-attention to one
conditioning token), neither of them collapsed. A call whose queries each see one key
has no softmax to saturate and is not judged.
"""

from __future__ import annotations

import math

from varprobe.diagnose.common import flag, num
from varprobe.diagnose.thresholds import Thresholds
from varprobe.report import Layer, Report

FIX = ("scale the query and key projections down (std ~ 1/sqrt(d_model)), or normalize "
       "queries and keys (QK-norm)")


def saturation(report: Report, t: Thresholds, skip: set[int]) -> None:
    by_label = {layer.label: (i, layer) for i, layer in enumerate(report.layers)}
    for call in report.attention:
        spread, p2 = call.get("spread"), call.get("participation")
        owner = by_label.get(call.get("layer") or "")
        if owner is None or owner[0] in skip or spread is None or p2 is None:
            continue
        floor = uniform_participation(call.get("keys"), bool(call.get("causal")),
                                      call.get("window"))
        if floor is None:
            continue
        culprits = [c for c in (call.get("layer"), call.get("key_layer")) if c in by_label]
        _flag(owner[1], call, spread, p2, floor, t, list(dict.fromkeys(culprits)))


def uniform_participation(keys: int | None, causal: bool,
                          window: int | None = None) -> float | None:
    """Σp² of uniform weights, averaged over the queries (query i of a causal mask sees
    i keys, of a sliding window min(i, W)); None where every query sees one key, or the
    count is unknown."""
    if not keys or keys < 2 or window == 1:
        return None
    if causal or window:
        return sum(1 / min(i, window or keys) for i in range(1, keys + 1)) / keys
    return 1 / keys


def _flag(layer: Layer, call: dict, spread: float, p2: float, floor: float, t: Thresholds,
          culprits: list[str]) -> None:
    where = f"attention {call.get('where')}: logit variance s² = {num(call['logit_variance'])}" \
            f", token correlation r = {num(call['token_correlation'])}"
    excess = (p2 - floor) / (1 - floor)
    if excess >= t.attention_participation and math.isfinite(excess):
        flag(layer, "attention_collapsed", f"{where}, Σp² = {num(p2)} ({call.get('keys')} keys"
             f", {num(floor)} at uniform weights): most of each query's weight is on one key, "
             f"and the gradients through the queries and keys vanish; {FIX}", excess,
             culprits)
    elif spread > t.attention_spread:
        flag(layer, "attention_saturated", f"{where}: (1-r)s² = {num(spread)} > "
             f"{num(t.attention_spread)}, the softmax is heading for one-hot at init; "
             f"{FIX}", spread, culprits)
