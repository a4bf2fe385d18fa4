"""attention_stats.sdpa's five statistics against their definitions, computed here in
float64 with other algebra (explicit per-row sums, the query path's Q_i as the Frobenius
norm of sum_j p_ij (v_j - v̄_i) k_j^T): grouped heads, bool and float masks (-inf and
-1e4 entries, a fully hidden row), causal and not, a packed (strided) q/k/v, 3-d inputs,
values wider than the keys, and sizes on both sides of the blocked code paths (half of
the keys under 64, token counts that are not a multiple of the running sums' block).

Tolerances: the inputs are float32 and sdpa computes in float32 (its float64 sums start
from float32 terms), so each statistic carries float32 rounding: a sum of n float32 terms
relative ~n_eff * 6e-8, well under 1e-5 for the sizes here; the token correlation r is a
difference of two O(1) terms (mean |S|^2 / T and E[x^2]), so its error is absolute
(1e-5 of E[x^2]); the query path's Q_i cancels its terms (p^T (Gv o Gk) p against
|v̄|^2 |k̄|^2), so its tolerance is 1e-4 relative. A wrong weight, row, head or mask
entry moves these statistics by percents."""

from __future__ import annotations

import math

import pytest
import torch

from varprobe.theory import attention_stats


def _reference(q, k, v, mask, causal, scale=None):
    """The five statistics from their definitions, in float64."""
    q, k, v = (t.double() for t in (q, k, v))
    heads, kv = q.shape[-3], k.shape[-3]
    k_rep = k.repeat_interleave(heads // kv, -3)
    v_rep = v.repeat_interleave(heads // kv, -3)
    tq, tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    rows = torch.linspace(0, tq - 1, min(attention_stats.SUBSAMPLE, tq)).round().long()
    scale = d ** -0.5 if scale is None else scale
    logits = q[..., rows, :] @ k_rep.transpose(-1, -2) * scale
    allowed = torch.ones(len(rows), tk, dtype=torch.bool)
    if causal:
        allowed = torch.arange(tk)[None, :] <= rows[:, None]
    if mask is not None:
        part = mask[..., rows, :]
        if part.dtype == torch.bool:
            allowed = allowed & part
        else:
            logits = logits + part.double()
            allowed = allowed & (part > -1e4)
    allowed = allowed.expand(logits.shape)
    spread = logits[allowed].square().sum() / allowed.sum().clamp(min=1)
    p = torch.zeros_like(logits)
    flat_l, flat_a, flat_p = (t.reshape(-1, tk) for t in (logits, allowed, p))
    for i in range(flat_l.shape[0]):
        if flat_a[i].any():
            flat_p[i, flat_a[i]] = torch.softmax(flat_l[i, flat_a[i]], -1)
    p2 = p.square().sum() / flat_p.shape[0]

    def correlation(x):
        tokens = x.shape[-2]
        m2 = x.square().mean()
        s = x.sum(-2).square().mean()
        return (s / tokens - m2) / ((tokens - 1) * m2)

    window = None
    if mask is None:
        shape = (float(causal), float(not causal), 0.0)
    else:
        seen = mask if mask.dtype == torch.bool else mask > -1e4
        tril = torch.ones(tq, tk, dtype=torch.bool).tril()
        if causal:
            seen = seen & tril
        width = int(seen.sum(-1).max())  # a sliding window: query i sees i-W+1..i
        band = tril & (torch.arange(tq)[:, None] - torch.arange(tk)[None, :] < width)
        window = width if bool((seen == band).all()) else None
        shape = (float((seen == tril).all()), float(seen.all()), float(window or 0))

    def prefix(x, power):  # mean_i |mean of i's window|^2 (/ its count) over E[x^2]
        tokens = x.shape[-2]
        w = window or tokens
        sums = torch.stack([x[..., max(0, i - w + 1):i + 1, :].sum(-2)
                            for i in range(tokens)], -2).square().sum(-1)
        counts = torch.arange(1, tokens + 1, dtype=torch.float64).clamp(max=w)
        return (sums * counts ** -power).sum() / x.square().sum()
    lead = p.shape[:-2]
    slices = math.prod(lead)
    picks = torch.linspace(0, slices - 1, min(slices, max(1, attention_stats.GRAMS // tk ** 2)))
    pf, vf, kf = (t.reshape(-1, *t.shape[-2:]) for t in (p, v_rep, k_rep))
    qs, vv, kk = [], [], []
    for s in picks.round().long().tolist():
        ps, vs, ks = pf[s], vf[s], kf[s]
        vbar = ps @ vs
        centered = vs[None] - vbar[:, None]                   # (R, T, d)
        m = torch.einsum("rj,rja,jb->rab", ps, centered, ks)  # sum_j p_j (v_j - v̄) k_j^T
        qs.append(m.square().sum((-1, -2)))
        vv.append(vs.square().sum(-1))
        kk.append(ks.square().sum(-1))
    x = torch.cat(qs).mean() / (torch.cat(vv).mean() * torch.cat(kk).mean())
    return {"p2": p2, "spread": spread, "r_v": correlation(v), "r_k": correlation(k),
            "shape": shape, "u_v": prefix(v, 2), "w_k": prefix(k, 3), "x": x}


def _measured(q, k, v, mask, causal):
    kwargs = {"is_causal": causal}
    if mask is not None:
        kwargs["attn_mask"] = mask
    facts, mask = attention_stats.sdpa_facts(q, k, (q, k, v), kwargs)
    (p2, spread), (r_v, r_k), shape, (u_v, w_k), (x, one) = (
        s if isinstance(s, tuple) else s.tolist()
        for s in attention_stats.sdpa(q, k, v, mask, facts))
    assert one == 1.0 or x == 0.0
    return {"p2": p2, "spread": spread, "r_v": r_v, "r_k": r_k, "shape": tuple(shape),
            "u_v": u_v, "w_k": w_k, "x": x}


def _tokens(gen, b, heads, t, d, packed=False):
    """Tokens with a shared part and a drift along the sequence (r ~ 0.2, u above the
    flat 1/i share), as a real model's v and k."""
    shape = (b, t, heads, d) if packed else (b, heads, t, d)
    axis = 1 if packed else 2
    x = torch.randn(shape, generator=gen) + 0.5 * torch.randn(
        tuple(1 if i == axis else n for i, n in enumerate(shape)), generator=gen)
    x = x + 0.02 * torch.randn(shape, generator=gen).cumsum(axis)
    return x.transpose(1, 2) if packed else x


def _float_mask(gen, t, hidden):
    m = 0.3 * torch.randn(t, t, generator=gen)
    m[torch.ones(t, t, dtype=torch.bool).triu(1)] = hidden
    m[:, 0] = -math.inf
    m[3, :] = -1e4  # a row that sees no key
    return m


CASES = {
    "causal": dict(b=4, heads=4, kv=4, t=256, d=64, causal=True),
    "causal_packed": dict(b=4, heads=4, kv=4, t=256, d=64, causal=True, packed=True),
    "grouped": dict(b=4, heads=4, kv=2, t=256, d=32, causal=True),
    "one_key_head": dict(b=2, heads=4, kv=1, t=160, d=32, causal=True),
    "float_mask_inf": dict(b=2, heads=4, kv=4, t=256, d=32, mask="-inf"),
    "float_mask_1e4": dict(b=2, heads=4, kv=4, t=200, d=32, mask="-1e4"),
    "bool_mask": dict(b=2, heads=4, kv=2, t=256, d=32, mask="bool"),
    "full": dict(b=2, heads=4, kv=4, t=256, d=32),
    "window": dict(b=2, heads=4, kv=2, t=256, d=32, mask="window"),
    "window_float": dict(b=2, heads=4, kv=4, t=200, d=32, mask="window", float=True),
    "short": dict(b=4, heads=4, kv=4, t=64, d=64, causal=True),
    "odd": dict(b=3, heads=6, kv=3, t=197, d=40),
    "long": dict(b=1, heads=2, kv=2, t=1024, d=64, causal=True),
    "value_width": dict(b=2, heads=4, kv=4, t=256, d=32, dv=48, causal=True),
    "ragged": dict(b=4, heads=4, kv=4, t=300, d=32, causal=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sdpa_statistics_against_their_definitions(name):
    c = dict(CASES[name])
    gen = torch.Generator().manual_seed(len(name))
    packed, masking = c.pop("packed", False), c.pop("mask", None)
    causal = c.pop("causal", False)
    b, heads, kv, t, d = c["b"], c["heads"], c["kv"], c["t"], c["d"]
    q = _tokens(gen, b, heads, t, d, packed)
    k, v = _tokens(gen, b, kv, t, d, packed), _tokens(gen, b, kv, t, c.get("dv", d), packed)
    mask = None
    if masking == "bool":
        mask = torch.rand(t, t, generator=gen) > 0.4
    elif masking == "window":  # Mistral's sliding window of 48, bool and float
        lag = torch.arange(t)[:, None] - torch.arange(t)[None, :]
        mask = (lag >= 0) & (lag < 48)
        if c.pop("float", False):
            mask = torch.zeros(t, t).masked_fill(~mask, -math.inf)
    elif masking is not None:
        mask = _float_mask(gen, t, -math.inf if masking == "-inf" else -1e4)
    got, want = _measured(q, k, v, mask, causal), _reference(q, k, v, mask, causal)
    assert got["shape"] == want["shape"]
    for key in ("p2", "spread", "u_v", "w_k"):
        assert got[key] == pytest.approx(want[key].item(), rel=1e-5), key
    for key in ("r_v", "r_k"):
        assert got[key] == pytest.approx(want[key].item(), abs=1e-5), key
    assert got["x"] == pytest.approx(want["x"].item(), rel=1e-4)


def test_query_path_three_dim_and_one_slice():
    """(heads, T, d) inputs and a single (T, d) slice take the same definition."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 64, 16, generator=gen) for _ in range(3))
    got, want = _measured(q, k, v, None, True), _reference(q[None], k[None], v[None], None, True)
    assert got["x"] == pytest.approx(want["x"].item(), rel=1e-4)
    p = torch.softmax(torch.randn(64, 64, generator=gen), -1)
    single = attention_stats.query_path(p, v[0], k[0])[0].item()
    vbar = p.double() @ v[0].double()
    m = torch.einsum("rj,rja,jb->rab", p.double(), v[0].double()[None] - vbar[:, None],
                     k[0].double())
    x = m.square().sum((-1, -2)).mean() / (v[0].double().square().sum(-1).mean()
                                           * k[0].double().square().sum(-1).mean())
    assert single == pytest.approx(x.item(), rel=1e-4)


@pytest.mark.parametrize("hidden", [0.7, -math.inf, math.inf, math.nan])
def test_hidden_entries_zeroed_as_the_select_does(hidden):
    """The CPU's in-place product equals ``where(allowed, logits, 0)`` entry for entry
    (a non-finite hidden logit included, and a NaN among the shown ones), and so does
    its sum of squares, also where the mask broadcasts beyond the logits."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 8, 16, generator=gen)
    allowed = torch.rand(8, 16, generator=gen) > 0.3
    logits[0, 1][~allowed] = hidden
    logits[1, 2, 4, allowed[4].nonzero()[0]] = math.nan  # a NaN that is shown
    for mask in (allowed, allowed.expand(5, 2, 3, 8, 16)):
        want = torch.where(mask, logits, 0.0)
        seen, spread = attention_stats._hidden_zeroed(logits.clone(), mask)
        assert torch.equal(seen.isnan(), want.isnan())
        assert torch.equal(seen.nan_to_num(), want.nan_to_num())
        assert math.isnan(spread.item())  # the shown NaN reaches the sum, as it must
        clean = torch.where(mask, logits.nan_to_num(0.0), 0.0)  # every entry finite
        got = attention_stats._hidden_zeroed(clean.clone(), mask)[1].item()
        assert got == pytest.approx(clean.double().square().sum().item(), rel=1e-12)
