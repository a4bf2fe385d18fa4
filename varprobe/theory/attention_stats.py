"""What the recording measures at attention calls, on the device and fetched with the
statistics in the pass's one transfer: Σp², the mean squared logit and the token
correlations at a scaled_dot_product_attention call; the weights' moments of an
nn.MultiheadAttention (theory.mha.moments)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from varprobe.theory import mha
from varprobe.theory.nodes import Attention, T, _arg

SUBSAMPLE = 64  # queries per head whose softmax rows the probe recomputes
# Token-pair entries of the Gram matrices query_path forms (2 MiB): at 256 tokens that is
# 8 (batch, head) slices of 64 queries each, whose X lies within 1.2% (sd of disjoint
# groups of 8, causal tokens with a shared part) of all 32 slices' of a GPT batch of 8,
# at a quarter of the cost (the 32 slices took 14% of that GPT's bare pass, CPU time)
GRAMS = 1 << 19
MASKED = -1e4   # an additive mask entry at or below this hides the key


def sdpa_facts(q: T, k: T, args: tuple, kwargs: dict) -> tuple[Attention, Any]:
    """What a scaled_dot_product_attention call is (its arguments), and its mask."""
    mask, scale = _arg(args, kwargs, 3, "attn_mask", None), _arg(args, kwargs, 6, "scale", None)
    return Attention(queries=q.shape[-2], keys=k.shape[-2], d_k=q.shape[-1],
                     heads=q.shape[-3] if q.dim() > 2 else 1,
                     kv_heads=k.shape[-3] if k.dim() > 2 else 1,
                     causal=bool(_arg(args, kwargs, 5, "is_causal", False)),
                     masked=mask is not None, scale=None if scale is None else float(scale),
                     dropout=float(_arg(args, kwargs, 4, "dropout_p", 0.0))), mask


def sdpa(q: T, k: T, v: T, mask: Any, facts: Attention) -> list[T | tuple[float, float]]:
    """Σp² and the mean squared logit over a subsample of queries (the softmax of
    64 rows per head, O(64 T d) where the call was O(T² d)), the token
    correlations of v and k (attention.token_correlation from the sums over the
    sequence), the mask's shape (``mask_shape``), the prefix shares of v and k
    (``prefix_share``) and the query path's factor (``query_path``): five pairs,
    reduced on the device.

    Elementwise in the inputs' precision, Σp² and the squared logits summed in float64
    (``_square_sum``), and without copies of the whole q, k or v: at a model's own
    attention sizes this costs a fraction of the call it measures (the bench GPT's four
    calls: 54 ms of its 0.72 s pass on one CPU thread)."""
    with torch.no_grad():
        rows = torch.linspace(0, facts.queries - 1, min(SUBSAMPLE, facts.queries),
                              device=q.device).round().long()
        keys = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3) \
            if q.dim() > 2 and k.shape[-3] != q.shape[-3] else k
        scale = facts.scale if facts.scale is not None else facts.d_k ** -0.5
        # a fresh tensor (the product, or its float32 copy): scaled in place
        logits = (q.index_select(-2, rows) @ keys.transpose(-1, -2)).float().mul_(scale)
        allowed = torch.ones(rows.numel(), facts.keys, dtype=torch.bool, device=q.device)
        if facts.causal:  # torch's is_causal: the top-left aligned lower triangle
            cols = torch.arange(facts.keys, device=q.device)
            allowed = cols[None, :] <= rows[:, None]
        if mask is not None:
            part = mask.index_select(-2, rows) if mask.shape[-2] > 1 else mask
            if part.dtype == torch.bool:
                allowed = allowed & part
            else:
                logits = logits + part.float()
                allowed = allowed & (part > MASKED)
        count = allowed.sum() * (logits.numel() // max(allowed.numel(), 1)) \
            if allowed.dim() <= 2 else allowed.expand_as(logits).sum()
        hidden = ~allowed
        # in place on the logits: the hidden entries' squares are zero, then -inf
        spread = _square_sum(logits.masked_fill_(hidden, 0.0), torch.float64) \
            / count.clamp(min=1)
        p = torch.softmax(logits.masked_fill_(hidden, -math.inf), -1).nan_to_num_(0.0)
        values = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3) \
            if q.dim() > 2 and v.shape[-3] != q.shape[-3] else v
        # the mean over rows of each row's sum: the whole sum over the row count
        squares = _square_sum(p, torch.float64) / max(p.numel() // max(p.shape[-1], 1), 1)
        q_v, q_k = _square_sum(v), _square_sum(k)
        return [torch.stack([squares, spread]),
                torch.stack([_correlation(v, q_v), _correlation(k, q_k)]),
                mask_shape(mask, facts),
                torch.stack([prefix_share(v, square_sum=q_v),
                             prefix_share(k, weighted=True, square_sum=q_k)]),
                query_path(p, values, keys)]


def _square_sum(x: T, dtype: torch.dtype | None = None) -> T:
    """sum(x^2) as a float64 scalar on x's device, from one read and no copy: a norm
    accumulated in ``dtype`` (x's own by default: torch's cascade of partial sums,
    relative error ~1e-7 in float32; float64 where the sum must be exact to rounding),
    squared in float64."""
    return torch.linalg.vector_norm(x, dtype=dtype).double().square()


def mask_shape(mask: Any, facts: Attention) -> T | tuple[float, float]:
    """(causal, full) of an SDPA call's mask on the device: 1 where every query sees
    exactly the keys up to its own position (top-left aligned, as is_causal), 1 where
    every key is seen. A float mask that carries a position bias (T5 adds its relative
    bias to the causal mask) hides a key by a large negative entry, so the shape is
    read off the entries at or below MASKED, as at an eager softmax."""
    if mask is None:  # the arguments say it all: a host pair
        return float(facts.causal), float(not facts.causal)
    cols = torch.arange(facts.keys, device=mask.device)
    tril = cols[None, :] <= torch.arange(facts.queries, device=mask.device)[:, None]
    allowed = mask if mask.dtype == torch.bool else mask > MASKED
    if facts.causal:
        allowed = allowed & tril
    return torch.stack([(allowed == tril).all(), allowed.all()]).double()


def multihead(module: nn.MultiheadAttention, args: tuple, kwargs: dict,
              ) -> tuple[Attention, list[T]]:
    """The facts of an nn.MultiheadAttention call, and (off the meta device) its
    weights' moments."""
    with torch._C.DisableTorchFunction():
        q, k = _arg(args, kwargs, 0, "query", None), _arg(args, kwargs, 1, "key", None)
        axis = 1 if module.batch_first and q.dim() == 3 else 0
        facts = Attention(queries=q.shape[axis], keys=k.shape[axis], d_k=module.head_dim,
                          heads=module.num_heads, kv_heads=module.num_heads,
                          causal=bool(kwargs.get("is_causal", False)),
                          masked=_arg(args, kwargs, 5, "attn_mask", None) is not None
                          or _arg(args, kwargs, 3, "key_padding_mask", None) is not None,
                          dropout=module.dropout if module.training else 0.0)
        if q.is_meta:
            return facts, []
        with torch.no_grad():
            return facts, mha.moments(module)


def _correlation(x: T, square_sum: T | None = None) -> T:
    """The uncentered token correlation r of x (..., T, d), on its device:
    (mean(S^2)/T - E[x^2]) / ((T-1) E[x^2]) with S the sum over the T tokens (summed in
    x's precision, finished in float64). ``square_sum``: sum(x^2) where already read."""
    tokens = x.shape[-2]
    q = (_square_sum(x) if square_sum is None else square_sum) / x.numel()
    if tokens < 2:
        return torch.zeros_like(q)
    s = torch.linalg.vector_norm(x.sum(-2)).double().square() / (x.numel() // tokens)
    return (s / tokens - q) / ((tokens - 1) * q).clamp(min=1e-300)


def prefix_share(x: T, weighted: bool = False, square_sum: T | None = None) -> T:
    """u = mean_i |x̄_i|^2 / E[x^2], x̄_i the mean of x_1..x_i (tokens on axis -2): what
    flat causal attention keeps of x, on its device. For tokens of one second moment
    and uncentered correlation r it is r + (1 - r) mean_i 1/i; where the correlation
    depends on the positions (a causal stack makes the early tokens' correlated among
    themselves) it is the r the windows of causal attention see (theory.attend).
    ``weighted``: mean_i u_i / i, the weights the query path gives query i (its m_i,
    ~1/i at flat attention)."""
    tokens = x.shape[-2]
    q = _square_sum(x) if square_sum is None else square_sum
    # |x̄_i|^2 = |S_i|^2 / i^2, S_i the running sum: one norm per prefix, then the
    # positions' weights (no division of the whole tensor)
    positions = torch.arange(1, tokens + 1, dtype=torch.float64, device=x.device)
    prefix = torch.linalg.vector_norm(x.cumsum(-2), dim=-1).double().square()
    return (prefix * positions ** (-3 if weighted else -2)).sum() / q.clamp(min=1e-300)


def query_path(p: T, v: T, k: T) -> T:
    """(X, 1): the query path's factor at the realized p, v and k, on the device.

    dq_i = c sum_j p_ij (g_i . (v_j - v̄_i)) k_j, v̄_i = sum_j p_ij v_j, so for a gradient
    g_i of i.i.d. entries (sigma_g^2) independent of v and k,
    E|dq_i|^2 = c^2 sigma_g^2 Q_i, Q_i = sum_jl p_ij p_il (v_j - v̄_i).(v_l - v̄_i) k_j.k_l,
    and X = mean_i Q_i / (d_v d_k q_v q_k) is what theory.attention.backward's query
    path writes (1 - r_k) f m + (1 - r) coherent for tokens alike. Q_i is a fourth
    moment of the tokens: where their correlations spread over the pairs (a causal
    stack's early tokens correlated among themselves, the late ones with everything)
    it exceeds the closed form by the pairs' variance times the window (the 4-block
    Llama's last two blocks: 2-3x), which no r can say.

    p: rows of the probabilities (..., R, T_k) (the subsample of queries); v, k:
    (..., T_k, d) with p's leading dims. Q_i = p^T (Gv o Gk) p - 2 sum_j p_j (v_j . v̄)
    (Gk p)_j + |v̄|^2 p^T Gk p, Gv, Gk the Gram matrices of v and k, formed for a
    subsample of the (batch, head) slices (GRAMS entries)."""
    with torch.no_grad():
        rows, keys = p.shape[-2:]
        if not (p.shape[:-2] == v.shape[:-2] == k.shape[:-2]) or v.shape[-2] != keys \
                or k.shape[-2] != keys:  # broadcast heads or batch: left to the closed form
            return torch.zeros(2, dtype=torch.float64, device=p.device)
        if p.dim() == 2:  # one slice
            p, v, k = p[None], v[None], k[None]
        slices = math.prod(p.shape[:-2])
        pick = torch.linspace(0, slices - 1, min(slices, max(1, GRAMS // keys ** 2)),
                              device=p.device).round().long()
        # only the picked (batch, head) slices: a flat view of a transposed v or k
        # would copy all of them
        at = _unravel(pick, p.shape[:-2])
        pf, vf, kf = (t[at].float() for t in (p, v, k))
        gk = kf @ kf.transpose(-1, -2)
        both = (vf @ vf.transpose(-1, -2)).mul_(gk)
        vbar = pf @ vf
        gkp = pf @ gk
        q = ((pf @ both) * pf).sum(-1) \
            - 2 * (pf * (vbar @ vf.transpose(-1, -2)) * gkp).sum(-1) \
            + vbar.square().sum(-1) * (pf * gkp).sum(-1)
        scale = vf.square().sum(-1).mean(dtype=torch.float64) \
            * kf.square().sum(-1).mean(dtype=torch.float64)
        x = q.mean(dtype=torch.float64) / scale.clamp(min=1e-300)
        return torch.stack([x, torch.ones_like(x)])


def _unravel(flat: T, shape: torch.Size) -> tuple[T, ...]:
    """The indices into ``shape`` of the flat positions ``flat`` (row-major), as
    torch.unravel_index, whose Python checks cost more than the whole statistic here."""
    found = []
    for size in reversed(shape):
        found.append(flat % size)
        flat = flat // size
    return tuple(reversed(found))
