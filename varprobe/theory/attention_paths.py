"""Attention's backward at the realized tensors, for a saturated call (or one whose
values are correlated past CORRELATED, where the closed forms' (1 - r) fails): what the
value, query and key paths and the logits carry per unit of the gradient at the output,
measured by the probe in the backward.

Past (1 - r) s^2 = 1.5 (attention.SATURATED_SPREAD) the closed forms of
theory.attention rest on what no longer holds: the query-pair overlap
e^{r(1-r)s^2}/(e^{r(1-r)s^2} + T - 1) that the gradient correlation's terms use counts
one common key for every query, where the keys' shared logit part (variance
r(1-r)s^2) spreads the queries over a few keys, each column of p summing a different
number of them; and the Gaussian-logit m of the query and key paths misses what the
realized p, v and k are (float64 autograd at the call against the walk: BERT under
He, third block, value path 1/2.5, key path 1/2, query path 1/1.3 of the gradient;
T5's decoder self-attention under Xavier, logit variance ~64, value path 1.9x). With
the gradient g in hand the paths are sums of products of p, g, v, k and q, so the
probe forms them for a subsample of the (batch, head) slices: every query of a slice
(the value and key paths sum over the queries), the softmax rows recomputed from the
slice's q, k and mask, as a fused kernel never materializes them (eager attention
hands over its p).

dS_ij = p_ij g_i.(v_j - v̄_i) (the softmax's backward), and per unit of the measured
E[g^2] (sigma^2), E[v^2], E[k^2], E[q^2] of the slices (d_v the value width):

    V = mean (p^T g)^2 / sigma^2                   the value path:  E[dv^2] = sigma^2 V
    Q = mean (dS k)^2 / (d_v sigma^2 q_v q_k)      the query path: c^2 d_k sigma^2 q_v q_k Q
    K = mean (dS^T q)^2 / (d_v sigma^2 q_v q_q)    the key path:   c^2 d_k sigma^2 q_v q_q K
    L = mean dS^2 / (d_v sigma^2 q_v)              per logit:      sigma^2 d_k q_v L

Attention dropout (keep 1/(1 - p)) multiplies p by a mask the fused kernel draws and
keeps to itself: the paths above are those without it, and each has a second factor
for the mask's own noise, n_ij = (M_ij keep - 1) g_i.v_j of variance (keep - 1) A_ij^2
(A = g v^T), independent over (i, j), which adds (keep - 1) times it (below, B = p^2 A^2):

    D_V = mean_j sum_i p_ij^2 g_i^2 / sigma^2,
    D_Q = mean_i sum_j B_ij |k_j - k̄_i|^2 / d_k, k̄_i = sum_j p_ij k_j,
    D_K = mean_j sum_i |q_i|^2 E_ij / d_k, D_L = mean E_ij,
    E_ij = B_ij (1 - p_ij)^2 + p_ij^2 (sum_l B_il - B_ij),

each over the same normalization as its path. The walk (the actual init's, at a
saturated call) multiplies them by its own E[g^2], q_v, q_k, q_q: a forward error
before the call still reaches its backward.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from varprobe import transfer
from varprobe.theory import attend, attention
from varprobe.theory.constants import awaiting, deferred
from varprobe.theory.nodes import Attention, T
from varprobe.theory.signal import Signal

BUDGET = 1 << 19  # softmax entries (slices x queries x keys) read per call
# softmax entries formed at once: path_sums holds up to four float32 arrays of them (p
# among them), which add to the backward's peak memory; each chunk is ~100 small
# kernels, on a GPU ~20 us each
CHUNK = 1 << 18
PAIRS = 5  # (V, D_V), (Q, D_Q), (K, D_K), (L, D_L), (filled, 0)
# The values' token correlation past which the closed forms' one r fails: they keep
# (1 - r) of the query and key paths (the part of v_j - v̄_i the tokens do not share),
# and near r = 1 that is below the error of describing the tokens by one r. OLMo 2's
# post-norm blocks make the second block's values r = 0.999 (each token the normalized
# causal mean of the first block's values: correlated by position, not by one r); its
# k_norm's gradient was 1120x the closed form's, 1.13x the measured paths' step.
CORRELATED = 0.9


def watch(q: T, k: T, v: T, mask: Any, facts: Attention, out: T,
          probs: T | None = None) -> list:
    """The PAIRS constants the backward fills (``constants.deferred``: a Pending whose raw
    values the hook sets, the pairs made from them on the host by ``pairs``; all (0, 0)
    where it never runs); none where no gradient will come. ``probs``: eager attention's
    materialized p (its mask and scale already in it); for an SDPA call the hook
    recomputes p from q, k and ``mask``. q, k, v, the mask and p are held by reference,
    not copied: autograd keeps them for the call's own backward anyway. One of them
    written in place since (autograd would refuse that too) leaves the pairs at (0, 0),
    and the closed forms stand."""
    if out.is_meta or not out.requires_grad or q.dim() < 3 \
            or not q.dim() == k.dim() == v.dim() or out.shape[:-1] != q.shape[:-1]:
        return []
    held = [t.detach() if isinstance(t, T) else t for t in (q, k, v, mask, probs)]
    versions = [t._version for t in held if isinstance(t, T)]
    found = awaiting(PAIRS)

    def fill(grad: T) -> None:
        if not held or [t._version for t in held if isinstance(t, T)] != versions:
            return
        with torch.no_grad():
            index, qs, ks, vs = _slices(*held[:3], facts)
            gs = grad[index].float()
            step = max(1, CHUNK // (qs.shape[-2] * ks.shape[-2]))
            items: list[T] = []
            for at in range(0, qs.shape[0], step):
                part, sub = slice(at, at + step), tuple(i[at:at + step] for i in index)
                p = _probs(qs[part], ks[part], held[3], sub, held[0].shape[:-2], facts) \
                    if held[4] is None else held[4][sub].float()
                items += path_sums(gs[part], qs[part], ks[part], vs[part], p)
            # the norms of g, v, k and q last: E[x^2] on the host
            items += [torch.linalg.vector_norm(x) for x in (gs, vs, ks, qs)]
            shapes = gs.shape, ks.shape, [x.numel() for x in (gs, vs, ks, qs)]
            found.raw = transfer.Parts(items)
            found.finish = lambda r: pairs(r, *shapes)
        held.clear()  # the pass's tensors are the backward's to free

    out.register_hook(fill)
    return deferred(found, PAIRS)


def _slices(q: T, k: T, v: T, facts: Attention) -> tuple:
    """The indices of a spread subsample of the (batch, head) slices, and their q, k
    and v in float32 (a group's key and value head for each query head)."""
    lead = q.shape[:-2]
    count = math.prod(lead)
    # at most count points from 0 to count - 1 are at least 1 apart, so their rounded
    # values are distinct without a unique(), which would wait for the device
    pick = torch.linspace(0, count - 1, max(1, min(count, BUDGET // (
        facts.queries * facts.keys))), device=q.device).round().long()
    index, rest = [], pick
    for size in reversed(lead):  # torch.unravel_index, without its first-call cost
        index.insert(0, rest % size)
        rest = rest // size
    index = tuple(index)
    group = max(q.shape[-3] // max(k.shape[-3], 1), 1) if q.dim() > 3 else 1
    kv_index = (*index[:-1], index[-1] // group) if group > 1 else index

    def take(x: T, at: tuple) -> T:  # broadcast over the batch where it is
        return x.expand(*lead[:-1], *x.shape[-3:])[at].float()

    return index, q[index].float(), take(k, kv_index), take(v, kv_index)


def _probs(q: T, k: T, mask: Any, index: tuple, lead: torch.Size, facts: Attention) -> T:
    """Softmax rows of the slices as the SDPA call formed them: scale, is_causal (top-left
    aligned), a boolean mask or an additive one (a hidden key at or below -1e4)."""
    scale = facts.scale if facts.scale is not None else facts.d_k ** -0.5
    logits = (q @ k.transpose(-1, -2)).mul_(scale)  # in place: one array of the chunk
    seen = torch.ones(logits.shape[-2:], dtype=torch.bool, device=q.device)
    if facts.causal:
        seen = seen.tril()
    seen = seen.expand_as(logits)
    if isinstance(mask, T):
        full = torch.broadcast_to(mask, (*lead, *logits.shape[-2:]))[index]
        if full.dtype == torch.bool:
            seen = seen & full
        else:
            logits.add_(full.float())
            seen = seen & (full > -1e4)  # attention_stats.MASKED
    return torch.softmax(logits.masked_fill_(~seen, -math.inf), -1).nan_to_num_(0.0)


def path_sums(g: T, q: T, k: T, v: T, p: T) -> list[T]:
    """The module note's sums over slices g (S, T_q, d_v), q (S, T_q, d_k), k (S, T_k,
    d_k), v (S, T_k, d_v), p (S, T_q, T_k), 0-d tensors in the order ``pairs`` reads
    them: the even ones norms, whose squares are the sums (squared on the host, in
    float64), the odd ones float64 sums. Sums over more slices are their sum."""
    # in this order, with in-place ops, at most three arrays of the chunk's size at once
    # beside p: each is its share of the backward's peak memory
    value = [_norm(p.transpose(-1, -2) @ g), _sum(p.square().transpose(-1, -2) @ g.square())]
    a = g @ v.transpose(-1, -2)
    b = p * a
    ds = a.sub_(b.sum(-1, keepdim=True)).mul_(p)
    grads = [_norm(ds @ k), _norm(ds.transpose(-1, -2) @ q), _norm(ds)]
    del a, ds
    b.square_()
    b_rows = b.sum(-1, keepdim=True)
    kbar = p @ k
    spread = b @ k.square().sum(-1).unsqueeze(-1) + b_rows * kbar.square().sum(-1, keepdim=True) \
        - 2 * (kbar @ k.transpose(-1, -2)).mul_(b).sum(-1, True)
    noise = (1 - p).square_().mul_(b).add_((b_rows - b).mul_(p).mul_(p))
    return [*value, grads[0], _sum(spread), grads[1],
            _sum(noise.transpose(-1, -2) @ q.square().sum(-1, True)), grads[2], _sum(noise)]


def pairs(r: list[float], g_shape: torch.Size, k_shape: torch.Size,
          numel: list[int]) -> list[tuple[float, float]]:
    """The (factor, dropout factor) pairs of the module note, and (1, 0), on the host
    from the hook's values ``r``: each chunk's ``path_sums`` in turn, then the norms of
    the slices' g, v, k and q (g shaped (S, T_q, d_v), k (S, T_k, d_k); ``numel``
    their sizes)."""
    s, t_q, d_v = g_shape[-3:]
    t_k, d_k = k_shape[-2:]
    chunks = (len(r) - 4) // 8
    sums = [sum(r[8 * c + i] ** (2 if i % 2 == 0 else 1) for c in range(chunks))
            for i in range(8)]
    counts = (t_k * d_v, t_k * d_v, t_q * d_k, t_q * d_k, t_k * d_k, t_k * d_k, t_q * t_k,
              t_q * t_k)  # each sum's terms per slice; the spreads' over d_k as well
    means = [total / (s * n) for total, n in zip(sums, counts)]
    sigma, q_v, q_k, q_q = (norm * norm / max(n, 1) for norm, n in zip(r[-4:], numel))
    norm_v = max(d_v * sigma * q_v, 1e-300)
    return [(means[0] / max(sigma, 1e-300), means[1] / max(sigma, 1e-300)),
            (means[2] / max(norm_v * q_k, 1e-300), means[3] / max(norm_v * q_k, 1e-300)),
            (means[4] / max(norm_v * q_q, 1e-300), means[5] / max(norm_v * q_q, 1e-300)),
            (means[6] / norm_v, means[7] / norm_v), (1.0, 0.0)]


def _norm(x: T) -> T:
    """||x|| in x's precision (no squared temporary), a 0-d tensor."""
    return torch.linalg.vector_norm(x)


def _sum(x: T) -> T:
    return x.sum(dtype=torch.float64)


def backward(facts: Attention, g: float, q_m2: float, k_m2: float, v_m2: float,
             factors: list[tuple[float, float]]) -> tuple[float, float, float, float]:
    """E[dq^2], E[dk^2], E[dv^2] and E[dS^2] per logit from the walk's E[g^2] and the
    measured factors, in theory.attend.backward's order (grouped keys and values
    collect their group's query heads)."""
    keep = 1 / (1 - facts.dropout) - 1
    (v, dv), (q, dq), (k, dk), (s, ds) = factors[:4]
    c2dk = (1 / facts.d_k if facts.scale is None else facts.scale ** 2) * facts.d_k
    group = max(facts.heads // max(facts.kv_heads, 1), 1)
    return (c2dk * g * v_m2 * k_m2 * (q + keep * dq),
            c2dk * g * v_m2 * q_m2 * (k + keep * dk) * group,
            g * (v + keep * dv) * group,
            g * facts.d_k * v_m2 * (s + keep * ds))


def measured_paths(facts: Attention, g: float, q: Signal, k: Signal, v: Signal,
                   correlations: tuple | None, factors: list | None,
                   ) -> tuple[float, float, float, float] | None:
    """``backward`` where the probe filled the factors and the closed forms
    (theory.attend.backward) fail: the walk's call is saturated ((1 - r) s^2 past
    attention.SATURATED_SPREAD, as the report flags it), or its values' r is past
    CORRELATED; else None."""
    if factors is None or factors[-1][0] < 0.5:
        return None
    s2 = attention.logit_variance(q.m2, k.m2, facts.d_k, facts.scale)
    r = attend.correlation(facts, v, correlations)
    if not attention.saturated(s2, r) and r < CORRELATED:
        return None
    return backward(facts, g, q.m2, k.m2, v.m2, factors)
