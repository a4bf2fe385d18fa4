"""Attention's backward at a saturated call (theory.attention_paths), against float64
autograd of torch's own scaled_dot_product_attention.

The tokens share a direction (r ~ 0.5) and the gradient at the output is correlated
across the queries, with logit variance s^2 >= 4 and (1 - r) s^2 past
attention.SATURATED_SPREAD: the closed forms' query-pair overlap and Gaussian-logit m
do not hold there (the first test shows by how much), while the measured factors are
sums of products of the realized p, g, v, k and q, so without dropout they give every
path's E[grad^2] to float32 rounding (the factors are formed in float32: relative
error ~1e-6 per sum of 64 terms; 1e-4 allowed). With dropout the truth is an average
over dropout masks, and the tolerance is 4 standard errors of that average over the
masks drawn (about 1 in 16000 to fail by chance per comparison if the rule is exact).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import varprobe
from varprobe import stats
from varprobe.theory import attention, attention_paths
from varprobe.theory.nodes import Attention

B, H, T, D = 4, 2, 48, 32


def _inputs(seed: int, s2: float = 6.0) -> tuple[torch.Tensor, ...]:
    """q, k, v with a shared direction (uncentered token correlation ~0.5) and logit
    variance ~s2 at scale 1/sqrt(D); a gradient whose tokens share a component."""
    gen = torch.Generator().manual_seed(seed)

    def tokens() -> torch.Tensor:
        own = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)
        shared = torch.randn(B, H, 1, D, generator=gen, dtype=torch.float64)
        return (own + shared) / math.sqrt(2)

    amp = s2 ** 0.25
    q, k, v = tokens() * amp, tokens() * amp, tokens()
    g = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64) \
        + 0.7 * torch.randn(B, H, 1, D, generator=gen, dtype=torch.float64)
    return q, k, v, g


def _truth(q, k, v, g, causal: bool) -> tuple[float, ...]:
    """E[dq^2], E[dk^2], E[dv^2] by float64 autograd of F.scaled_dot_product_attention."""
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    return tuple(float(x.square().mean()) for x in (dq, dk, dv))


def _factors(found: list) -> list[tuple[float, float]]:
    """The pairs of ``attention_paths.watch``'s constants, through the one transfer."""
    assert len(found) == attention_paths.PAIRS
    return stats.collect([found[0]])[0]


def _measured(q, k, v, g, causal: bool, dropout: float = 0.0) -> tuple[float, ...]:
    """The walk's paths from the factors the probe's hook forms, at the measured E[g^2],
    E[q^2], E[k^2], E[v^2]."""
    facts = Attention(queries=T, keys=T, d_k=D, heads=H, kv_heads=H, causal=causal,
                      dropout=dropout)
    leaf = [x.float().clone().requires_grad_() for x in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaf, is_causal=causal)
    found = attention_paths.watch(*leaf, None, facts, out)
    out.backward(g.float())
    factors = _factors(found)
    ms = [float(x.square().mean()) for x in (g, q, k, v)]
    return attention_paths.backward(facts, *ms, factors)[:3]


@pytest.mark.parametrize("causal", [False, True])
def test_paths_match_autograd_at_a_saturated_call(causal):
    q, k, v, g = _inputs(0)
    s2 = float((q @ k.transpose(-1, -2)).square().mean()) / D
    r = attention.token_correlation(float(v.sum(-2).square().mean()),
                                    float(v.square().mean()), T)
    assert s2 >= 4 and attention.saturated(s2, r)
    truth = _truth(q, k, v, g, causal)
    for got, want in zip(_measured(q, k, v, g, causal), truth):
        assert got == pytest.approx(want, rel=1e-4)
    # the closed forms there, given the same r and the gradient's r_g, still miss what
    # the realized tensors give, far past rounding: with theory.overlap's query-pair
    # overlap the key path 0.88x (not causal) and the value path 1.07x (causal); the
    # lognormal overlap (a common key for every pair) had them 1.2-1.6x over
    sigma = float(g.square().mean())
    r_g = attention.token_correlation(float(g.sum(-2).square().mean()), sigma, T)
    m2 = [float(x.square().mean()) for x in (q, k, v)]
    closed = attention.backward(sigma, m2[2], m2[0], m2[1], D, T, r=r, r_g=r_g,
                                causal=causal)
    assert max(abs(math.log(c / t)) for c, t in
               zip((closed.query, closed.key, closed.value), truth)) > 0.05


def _dropped_truth(q, k, v, g, causal: bool, p: float, masks: int) -> list[list[float]]:
    """E[dq^2], E[dk^2], E[dv^2] by float64 autograd of attention with an explicit
    dropout mask on the probabilities, one row per mask drawn."""
    gen = torch.Generator().manual_seed(123)
    seen = torch.ones(T, T, dtype=torch.bool).tril() if causal else None
    rows = []
    for _ in range(masks):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        logits = qq @ kk.transpose(-1, -2) / math.sqrt(D)
        if seen is not None:
            logits = logits.masked_fill(~seen, -math.inf)
        keep = (torch.rand(B, H, T, T, generator=gen, dtype=torch.float64) >= p).double()
        out = (torch.softmax(logits, -1) * keep / (1 - p)) @ vv
        rows.append([float(x.square().mean()) for x in
                     torch.autograd.grad(out, (qq, kk, vv), g)])
    return rows


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_noise_terms_match_the_average_over_masks(causal):
    q, k, v, g = _inputs(1)
    rows = torch.tensor(_dropped_truth(q, k, v, g, causal, 0.1, 64), dtype=torch.float64)
    mean, se = rows.mean(0), rows.std(0) / math.sqrt(rows.shape[0])
    got = _measured(q, k, v, g, causal, dropout=0.1)
    for path, want, err in zip(got, mean.tolist(), se.tolist()):
        assert abs(path - want) <= 4 * err, (path, want, err)
    # the noise terms matter at this size: without them the paths fall short
    plain = _measured(q, k, v, g, causal)
    assert any(want - path > 4 * err for path, want, err in zip(plain, mean.tolist(),
                                                                 se.tolist()))


class _Block(torch.nn.Module):
    """x -> q, k, v projections -> SDPA -> out. For inputs of E[x^2] = 2 the q and k
    weights' std 0.16 give E[q^2] = 64 * 0.0256 * 2 = 3.3, s^2 = 10.9."""

    def __init__(self, causal: bool, n: int = 64, heads: int = 2, eager: bool = False):
        super().__init__()
        self.eager = eager
        self.q, self.k, self.v, self.o = (torch.nn.Linear(n, n, bias=False) for _ in range(4))
        for lin in (self.q, self.k):
            torch.nn.init.normal_(lin.weight, std=0.16)
        self.causal, self.heads = causal, heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, n = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, n // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if self.eager:  # spelled out, as transformers' eager attention
            logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            if self.causal:
                hidden = torch.ones(t, t, dtype=torch.bool).triu(1)
                logits = logits.masked_fill(hidden, float("-inf"))
            z = torch.softmax(logits, dim=-1) @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.o(z.transpose(1, 2).reshape(b, t, n))


def _probe_logs(causal: bool, seed: int, eager: bool = False) -> dict[str, float]:
    """log(measured/predicted) of the backward at the q, k, v projections, one seed:
    tokens and cotangent sharing a direction per sample, as a deep stack makes them."""
    import varprobe

    torch.manual_seed(seed)
    model = _Block(causal, eager=eager)
    gen = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(8, 32, 64, generator=gen) + torch.randn(8, 1, 64, generator=gen)
    cot = torch.randn(8, 32, 64, generator=gen) + 0.7 * torch.randn(8, 1, 64, generator=gen)
    report = varprobe.probe(model, x, grad_output=cot, seed=seed, mode="eval")
    att = report.attention[0]
    assert (1 - att["token_correlation"]) * att["logit_variance"] > 1.5  # saturated
    layers = {layer.name: layer for layer in report.layers}
    return {name: math.log(layers[name].backward.var / layers[name].predicted.backward_var)
            for name in ("q", "k", "v")}


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_walk_uses_the_measured_paths_through_the_probe(causal, eager):
    """The walk's backward at the projections, against the probe's own measurement, over
    6 seeds: the mean log ratio within 3 standard errors of its seed-to-seed scatter
    (what is left is the walk's E[q^2], E[k^2], E[v^2] against the realized ones: one
    weight draw on tokens that share a direction). Eager attention's p is the
    softmax's own output."""
    logs = [_probe_logs(causal, seed, eager) for seed in range(6)]
    for name in ("q", "k", "v"):
        values = torch.tensor([row[name] for row in logs], dtype=torch.float64)
        se = float(values.std()) / math.sqrt(values.numel())
        assert abs(float(values.mean())) <= 3 * se + 1e-3, (name, values.tolist())


@pytest.mark.parametrize("eager", [False, True])
def test_closed_forms_miss_that_call(eager, monkeypatch):
    """What the walk gives there without the measured paths, under a causal mask: the
    key path 0.8x (theory.overlap's query-pair overlap; the lognormal one, a common key
    for every pair, put the key and value paths 2-3x over). Without a causal mask the
    closed forms now keep r_g at this spread and follow the softmax's overlap: value
    and key paths within ~0.1 in log over 3 seeds, where dropping r_g put them 3-6x
    under; the measured paths are what the causal call still needs."""
    monkeypatch.setattr(attention_paths, "measured_paths", lambda *args: None)
    logs = [_probe_logs(True, seed, eager) for seed in range(3)]
    assert abs(sum(row["k"] for row in logs) / len(logs)) > 0.1


@pytest.mark.parametrize("causal", [False, True])
def test_logit_gradient_of_an_additive_mask(causal):
    """A float attn_mask that is an activation (T5's relative position bias, with the
    causal mask folded in as large negative entries in its decoder) gets dS itself: the
    per-logit factor against autograd of the mask, masked entries included as zeros."""
    q, k, v, g = _inputs(2)
    gen = torch.Generator().manual_seed(7)
    bias = torch.randn(B, H, T, T, generator=gen, dtype=torch.float64)
    if causal:
        hidden = torch.ones(T, T, dtype=torch.bool).triu(1)
        bias = bias.masked_fill(hidden, torch.finfo(torch.float64).min)
    leaf = bias.clone().requires_grad_()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=leaf)
    (ds,) = torch.autograd.grad(out, (leaf,), g)
    facts = Attention(queries=T, keys=T, d_k=D, heads=H, kv_heads=H, masked=True)
    tensors = [x.float().clone().requires_grad_() for x in (q, k, v)]
    mask = bias.float().clone().requires_grad_()
    out = F.scaled_dot_product_attention(*tensors, attn_mask=mask)
    found = attention_paths.watch(*tensors, mask, facts, out)
    out.backward(g.float())
    factors = _factors(found)
    ms = [float(x.square().mean()) for x in (g, q, k, v)]
    logit = attention_paths.backward(facts, *ms, factors)[3]
    assert logit == pytest.approx(float(ds.square().mean()), rel=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_the_factors_do_not_depend_on_how_the_slices_are_chunked(causal, monkeypatch):
    """The hook forms its sums a few slices at a time (CHUNK softmax entries: the
    backward's extra memory) and adds them: one slice at a time and all at once give the
    same factors, up to float32 sums in another order (1e-5 relative)."""
    q, k, v, g = _inputs(3)
    whole = _measured(q, k, v, g, causal, dropout=0.1)
    monkeypatch.setattr(attention_paths, "CHUNK", T * T)  # one slice per chunk
    assert _measured(q, k, v, g, causal, dropout=0.1) == pytest.approx(whole, rel=1e-5)


def test_measured_paths_where_the_values_are_correlated_past_one_r():
    """OLMo 2's post-norm blocks make the second block's values r = 0.999 at an
    unsaturated call (s^2 ~ 1): each token the normalized causal mean of the first
    block's, correlated by position, not by one r. The closed forms keep (1 - r) of
    the key path there and put k_norm's gradient 1120x under (the query path 1/1.6,
    the value path 1.5x, relative to the call's output); past
    attention_paths.CORRELATED the walk takes the measured paths. The step from the
    attention output's gradient (o_proj's) to each path, measured over predicted,
    within 1/4: the walk multiplies the measured factors by its own forward values (the
    values' E[v^2] 14% under at this call)."""
    pytest.importorskip("transformers")
    import corpus

    e = corpus.entry("hf_olmo2")
    torch.manual_seed(0)
    report = varprobe.probe(e.build(), e.example(), batch_size=e.batch_size)
    ratio = {layer.label: layer.backward.var / layer.predicted.backward_var
             for layer in report.layers if layer.label.startswith("model.layers.1.self_attn")}
    out = ratio["model.layers.1.self_attn.o_proj"]
    assert report.attention[1]["token_correlation"] > attention_paths.CORRELATED
    for path in ("q_norm", "k_norm", "v_proj"):
        step = ratio[f"model.layers.1.self_attn.{path}"] / out
        assert step == pytest.approx(1, abs=0.25), (path, step)
