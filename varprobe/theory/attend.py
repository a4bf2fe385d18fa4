"""The attention node of the walk: theory.attention's closed forms on the walk's values.

Inputs are the walk's E[q^2], E[k^2], E[v^2] at a scaled_dot_product_attention call.
The token correlation r of the values is the probe's measurement at the call where
there is one, else the share of E[v^2] that is a per-unit mean (what a ReLU or a bias
makes every token share; a lower bound on r, and r ~ 0 for independent tokens). A probe
also measures Σp² on a subsample of queries and uses it in place of the closed form for
the participation (exact at any logit variance, saturated or not); ``predict`` uses the
closed form throughout. A counterfactual scheme changes the logit variance, so it uses
the closed form too, with the measured r, or its own far past saturation (what the
actual init's softmax averaged into the tokens a saturated one does not:
theory.tokenshape.TokenShapes.own_correlations).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

import numpy as np

from varprobe.theory import attention, tokens
from varprobe.theory.nodes import Attention
from varprobe.theory.signal import Signal

CEILING = 0.999  # r -> 1 leaves nothing for the softmax to average: keep r below it
# (1-r)s^2 past which r_g is dropped without a causal mask (backward): where the closed
# forms carry no Gram either, far past saturation
RG_SPREAD = tokens.SATURATED


def keys(facts: Attention) -> attention.Keys:
    """Per-query key counts: T, or 1..T when causal, min(i, W) under a sliding window;
    one count per query where the queries are not the keys (cross-attention, a reduced
    key sequence; top-left aligned under a causal mask, as torch does), so that the
    query-pair sums run over the queries there are."""
    if facts.window is not None:  # query i sees keys i - W + 1..i
        return _query_counts(facts.queries, facts.window, True)
    if facts.queries != facts.keys:
        return _query_counts(facts.queries, facts.keys, facts.causal)
    return facts.keys


@functools.lru_cache(maxsize=64)
def _query_counts(queries: int, keys: int, trailing: bool) -> np.ndarray:
    """min(i, keys) for query i (``trailing``: a window up to each query, top-left
    aligned), else ``keys`` for every query; read-only, once per shape."""
    counts = np.minimum(np.arange(1, queries + 1), keys) if trailing \
        else np.full(queries, keys)
    counts = counts.astype(float)
    counts.setflags(write=False)
    return counts


def correlation(facts: Attention, v: Signal, measured: tuple | None, side: int = 0) -> float:
    """r of the values (``side`` 0) or of the keys (1): the measured one where there is
    one, else the walk's. Under a causal mask the windows of flat attention see other
    than the plain r where the correlation depends on the positions: a causal stack
    leaves the early tokens' values correlated among themselves (on the 4-block Llama
    the second block's attention output is 0.7x the plain r's), and rotary positions
    turn the keys' shared part with the position, so a window of far-apart keys shares
    less of it than one of neighbours. So there:

    values: r = (u - P2)/(1 - P2), u the prefix share mean_i u_i (u_i = |x̄_i|^2/E[x^2],
    x̄_i the mean of the window 1..i, or i-W+1..i under a sliding window;
    attention_stats.prefix_share) and P2 = mean_i 1/i (1/min(i, W)),
    the r whose flat forward r + (1 - r) P2 gives u;
    keys: r = 1 - (mean_i 1/i - w)/mean_i (i-1)/i^2, w = mean_i u_i/i. In the query path
    query i sums (v_j - v̄_i) k_j over its window, whose pair sum is
    sum_jl (delta_jl - 1/i)(1-r) C_k(j,l) = (1-r) i (1 - u_i) for values of one r and any
    key correlations C_k: flat attention weighs it by 1/i^2, where the closed form has
    (1 - r_k) m_i, m_i = (i-1)/i^2."""
    if measured is None:
        r = max(v.r, v.mean_share) if side == 0 else correlation(facts, v, None)
    elif _windowed(facts):
        p2, m = _window_means(facts.keys, facts.window or facts.keys)
        r = (measured[2] - p2) / (1 - p2) if side == 0 else 1 - (p2 - measured[3]) / m
    else:
        r = measured[side]
    return min(max(r, 0.0), CEILING)


def query_correlation(facts: Attention, q: Signal, measured: tuple | None) -> float | None:
    """r of the queries for the key path's query-pair term. In self-attention the
    probe's r of the keys: both are W x of the same tokens turned by the same angles.
    Where the queries are other tokens than the keys (cross-attention, a reduced key
    sequence) the walk's own r of the queries: the keys' would count the keys' shared
    part (their biases, the context's mean) as the queries' (a cross-attention of 64
    queries to 8 keys: the key path 1.5-1.9x over at r_g = 0.3-0.8)."""
    if facts.queries != facts.keys:
        return min(max(q.r, q.mean_share, 0.0), CEILING)
    return None if measured is None else min(max(measured[1], 0.0), CEILING)


def shifted(facts: Attention, measured: tuple, r_v: float, r_k: float) -> tuple:
    """``measured`` (r_v, r_k, u_v, u_k) re-expressed so that ``correlation`` reads
    ``r_v`` and ``r_k`` from it (under a causal mask through the prefix shares)."""
    if _windowed(facts):
        p2, m = _window_means(facts.keys, facts.window or facts.keys)
        return (r_v, r_k, p2 + (1 - p2) * r_v, p2 - (1 - r_k) * m)
    return (r_v, r_k, *measured[2:])


def _windowed(facts: Attention) -> bool:
    """Whether each query sees a window of the keys up to its own position (causal, or
    a sliding window), whose shares the probe measured."""
    return (facts.causal and facts.queries == facts.keys) or facts.window is not None


@functools.lru_cache(maxsize=64)
def _window_means(keys: int, window: int) -> tuple[float, float]:
    """mean_i 1/T_i and mean_i (T_i-1)/T_i² over the windows T_i = min(i, W) (causal: W
    = T): once per (T, W) (every attention call of every walk reads them)."""
    i = _query_counts(keys, window, True)
    return float((1 / i).mean()), float(((i - 1) / i**2).mean())


CAP_RANGE = 0.01  # s²/c² up to which the closed forms take a soft cap as a scale


def past_cap(facts: Attention, q: Signal | None, k: Signal | None) -> str | None:
    """Why a soft-capped call has no closed form: its plain logits reach past a tenth of
    the cap (s² > c²/100), where the cap reshapes their distribution. Inside, the cap
    changes E[logit²] by under 2% and the closed forms hold as for plain logits; past
    it they do not (at s² = c²/9 the query projection's gradient comes out 1.3x the
    measured one, at s² = c² ~8x, tests/test_softcap.py); the probe's measured Σp²
    still gives the forward. None also where q or k has no value (nothing to judge)."""
    if facts.softcap is None or q is None or k is None:
        return None
    s2 = attention.logit_variance(q.m2, k.m2, facts.d_k, facts.scale)
    if s2 <= CAP_RANGE * facts.softcap ** 2:
        return None
    return (f"logits soft-capped at c = {facts.softcap:.3g} with s² = {s2:.3g} past the "
            "cap's linear range (c²/100)")


def capped(facts: Attention, q: Signal, k: Signal) -> Attention:
    """``facts`` with a soft cap folded into the logit scale (attention.capped_scale)."""
    if facts.softcap is None:
        return facts
    return replace(facts, scale=attention.capped_scale(q.m2, k.m2, facts.d_k, facts.scale,
                                                       facts.softcap))


def logit_variance(facts: Attention, q: Signal, k: Signal) -> float:
    """s² of the logits the softmax sees, a soft cap's included."""
    return attention.logit_variance(q.m2, k.m2, facts.d_k, capped(facts, q, k).scale)


def forward(facts: Attention, q: Signal, k: Signal, v: Signal, measured: tuple | None,
            correlations: tuple | None, n: int | None = None) -> tuple[Signal, dict[str, Any]]:
    """E[z^2] at the head outputs and what the report says about the call. ``n``: the
    width the projections read (the finite-width coupling term; dropped when None)."""
    facts = capped(facts, q, k)
    s2 = attention.logit_variance(q.m2, k.m2, facts.d_k, facts.scale)
    r = correlation(facts, v, correlations)
    causal = facts.causal and facts.queries == facts.keys
    closed = attention.forward(1.0, s2, r, keys(facts), causal, n, facts.dropout,
                               d_k=facts.d_k, window=facts.window)
    z2, p2 = closed.second_moment, closed.participation
    if measured is not None:
        p2 = measured[0]
        z2 = r + p2 * (1 / (1 - facts.dropout) - r)
        if correlations is not None and _windowed(facts):
            # the windows' measured share u where r was clipped to fit it: tokens whose
            # scale falls with the position make u > 1, which no one r gives (OLMo 2's
            # second block: u = 1.17, the output 1.6x the clipped r's); 0 elsewhere
            flat = _window_means(facts.keys, facts.window or facts.keys)[0]
            z2 += correlations[2] - (r + flat * (1 - r))
        if n:  # the coupling term of attention.forward, at the measured participation
            z2 += (1 - r) ** 2 * s2 * (1 - p2) ** 2 / n
    m2 = v.m2 * z2
    share = min(1.0, v.m2 * v.mean_share / m2) if m2 > 0 else 0.0
    r_out = closed.correlation if closed.correlation == closed.correlation else r
    facts_out = {"logit_variance": s2,
                 "measured_logit_variance": measured[1] if measured is not None else None,
                 "token_correlation": r, "participation": p2, "spread": (1 - r) * s2,
                 "saturated": attention.saturated(s2, r), "keys": facts.keys,
                 "causal": facts.causal, "masked": facts.masked, "window": facts.window,
                 "participation_basis": "measured" if measured is not None else "closed form"}
    return Signal(m2, share, min(1.0, max(share, r_out))), facts_out


def backward(facts: Attention, g: float, q: Signal, k: Signal, v: Signal,
             correlations: tuple | None, n: int | None = None,
             r_g: float | None = None, query_factor: float | None = None,
             ) -> tuple[float, float, float, float]:
    """E[dq^2], E[dk^2], E[dv^2] and E[dS^2] per logit from E[g^2] at the head outputs
    and its token correlation r_g (0 where unknown). Grouped keys and values (GQA)
    collect the gradients of every query head in their group. ``query_factor``: the
    query path's factor the probe measured at the realized p, v and k
    (attention_stats.query_path), for the actual init's walk.

    Without a causal mask r_g is dropped far past saturation ((1-r)s^2 > RG_SPREAD):
    its terms rest on the queries' overlap, which the closed form e^{r(1-r)s^2}/(e^{..}
    + T - 1) put at one key per query there (T5 under LeCun, s^2 ~ 64: the encoder's v
    predicted 240x its gradient). Below that the overlap comes from the softmax
    (theory.overlap, as the realized p gives it: BERT under He, 0.019-0.037 against
    0.018-0.035), and r_g stays: dropping it at spreads 2-5 put BERT's v 0.54-0.63x
    its gradient under He. A causal mask keeps each query's own window, and the overlap
    1/max(i, k) holds there."""
    facts = capped(facts, q, k)
    r = correlation(facts, v, correlations)
    causal = facts.causal and facts.queries == facts.keys
    r_g = min(r_g or 0.0, CEILING)  # below 0 where early tokens' gradients are small
    s2 = attention.logit_variance(q.m2, k.m2, facts.d_k, facts.scale)
    if not facts.causal and (1 - r) * s2 > RG_SPREAD:
        r_g = 0.0
    b = attention.backward(g, v.m2, q.m2, k.m2, facts.d_k, keys(facts), r=r, r_g=r_g,
                           causal=causal, scale=facts.scale, dropout=facts.dropout, n=n,
                           r_k=correlation(facts, v, correlations, 1),
                           r_q=query_correlation(facts, q, correlations),
                           query_factor=query_factor, row=facts.keys, window=facts.window)
    group = max(facts.heads // max(facts.kv_heads, 1), 1)
    return b.query, b.key * group, b.value * group, b.logit
