"""theory.tokens: the tokens' Gram rules against Monte Carlo in float64.

Each test draws a small causal attention stack many times (new tokens and new weights
per draw) and compares E[x_i·x_j]/d over the draws with the rule. The tolerance is
stated per test: the Monte Carlo standard error of the compared mean (k sigma), plus
the rule's own approximation where it has one (measured here and named).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from varprobe.theory import attention, tokens

T, N_IN, D_K, DRAWS = 16, 128, 64, 300


def _draws(seed: int, sigma2: float, layernorm: bool = False):
    """Per draw: the values' Gram, the attention output's, and the value path's gradient
    Gram for a cotangent of i.i.d. N(0, 1) entries. Tokens: a causal mix of i.i.d.
    vectors (early ones alike among themselves, late ones averages), so the Gram is not
    one of tokens alike."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(1, T + 1, dtype=torch.float64)[:, None]
    mix = 0.5 * torch.eye(T, dtype=torch.float64) + torch.tril(torch.ones(T, T)) / rows
    hidden = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    gv, gz, gg = [], [], []
    for _ in range(DRAWS):
        x = mix @ torch.randn(T, N_IN, generator=gen, dtype=torch.float64)
        if layernorm:
            x = torch.nn.functional.layer_norm(x, (N_IN,))
        wq, wk = (torch.randn(N_IN, D_K, generator=gen, dtype=torch.float64)
                  * math.sqrt(sigma2 / N_IN) for _ in range(2))
        wv = torch.randn(N_IN, D_K, generator=gen, dtype=torch.float64) / math.sqrt(N_IN)
        v = (x @ wv).requires_grad_(True)
        logits = ((x @ wq) @ (x @ wk).T / math.sqrt(D_K)).masked_fill(hidden, -math.inf)
        z = logits.softmax(-1) @ v
        (z * torch.randn(T, D_K, generator=gen, dtype=torch.float64)).sum().backward()
        gv.append((v @ v.T / D_K).detach())
        gz.append((z @ z.T / D_K).detach())
        gg.append(v.grad @ v.grad.T / D_K)
    return [torch.stack(a).numpy() for a in (gv, gz, gg)]


def _rule_inputs(gv: np.ndarray, sigma2: float):
    shape, m2 = tokens.normalized(gv.mean(0))
    counts = attention.key_counts(T, True)
    s2 = sigma2 * sigma2 * m2  # q and k: sigma2 E[x²] each, c² d_k = 1
    u = tokens.prefix_shares(shape, counts)[0]
    p2 = float(np.mean(1 / counts))
    r = (u - p2) / (1 - p2)  # theory.attend.correlation's r of the values, causal
    p2i, _ = attention._moments(s2, r, counts, "gaussian", D_K, N_IN)
    return shape, m2, counts, s2, r, p2i


def test_attention_forward_gram_against_monte_carlo():
    """The output Gram a ⊙ (L G Lᵀ - D) + b ⊙ D: the per-token scale profile (early
    tokens up to 4x the late ones) and the mean off-diagonal. Tolerance: 4 standard
    errors of the Monte Carlo mean, plus 13% relative on each diagonal entry for the
    rule's approximation (one P₂ per window count at the call's mean logit spread, where
    each window of this mix spreads its own; measured here at s² = 0.68: the diagonal
    7-12% low past token 0), and 5% on the off-diagonal mean."""
    sigma2 = 1.0
    gv, gz, _ = _draws(0, sigma2)
    shape, m2, counts, s2, r, p2i = _rule_inputs(gv, sigma2)
    coupling = (1 - r) ** 2 * s2 * (1 - p2i) ** 2 / N_IN
    out, z2 = tokens.attend(shape, r, counts, p2i, s2, r, coupling)
    predicted = out * z2 * m2
    measured = gz.mean(0)
    se = gz.std(0) / math.sqrt(DRAWS)
    diag_p, diag_m, diag_se = np.diag(predicted), np.diag(measured), np.diag(se)
    assert np.all(np.abs(diag_p - diag_m) <= 4 * diag_se + 0.13 * diag_m), \
        (diag_p / diag_m)
    # the profile itself: token 0 sees only itself, the rule is exact there
    assert abs(diag_p[0] / diag_m[0] - 1) <= 4 * diag_se[0] / diag_m[0]
    assert diag_m[0] > 3 * diag_m[-1] and diag_p[0] > 3 * diag_p[-1]
    off = ~np.eye(T, dtype=bool)
    off_se = gz[:, off].mean(1).std() / math.sqrt(DRAWS)
    assert abs(predicted[off].mean() - measured[off].mean()) <= \
        4 * off_se + 0.05 * measured[off].mean()


def test_value_path_gradient_gram_against_monte_carlo():
    """dv = Pᵀ g for a gradient of i.i.d. entries: early keys collect every later query's
    gradient. The rule's diagonal (per unit of its mean) against the measured one.
    Tolerance: 4 standard errors plus 25% relative per key (the shared-key overlap
    e^{r(1-r)s²} of one r for every pair; measured here at s² = 0.68: -6% to +23%),
    and the ordering (key 0 the largest, the last key the smallest) exactly."""
    sigma2 = 1.0
    gv, _, gg = _draws(1, sigma2)
    shape, m2, counts, s2, r, p2i = _rule_inputs(gv, sigma2)
    rule = tokens.value_backward(None, counts, p2i, s2, r)
    measured = gg.mean(0)
    scale = float(np.mean(np.diag(measured)))
    se = np.diag(gg.std(0)) / math.sqrt(DRAWS)
    diag_p, diag_m = np.diag(rule) * scale, np.diag(measured)
    assert np.all(np.abs(diag_p - diag_m) <= 4 * se + 0.25 * diag_m), diag_p / diag_m
    assert np.argmax(diag_p) == np.argmax(diag_m) == 0
    assert np.argmin(diag_p) == np.argmin(diag_m) == T - 1


def test_gradient_u_and_prefix_shares_match_the_probe_definitions():
    """tokens.gradient_u and tokens.prefix_shares are the Gram forms of what
    gradient_stats and attention_stats.prefix_share compute from the tensors: equal to
    rounding on one sample's own Gram."""
    from varprobe import stats
    from varprobe.theory import attention_stats, gradient_stats

    gen = torch.Generator().manual_seed(3)
    g = torch.randn(1, T, 32, generator=gen, dtype=torch.float64).cumsum(1)
    gram = (g[0] @ g[0].T / 32).numpy()
    counts = attention.key_counts(T, True)
    y = torch.zeros_like(g, requires_grad=True) * 1.0
    found = gradient_stats.watch(y)
    y.backward(g)
    q = stats.collect([found[0]])[0][1][0]  # u under causal flat attention
    assert abs(tokens.gradient_u(gram, counts, True) - q) < 1e-12
    assert abs(tokens.prefix_shares(gram, counts)[0]
               - attention_stats.prefix_share(g).item()) < 1e-12
    assert abs(tokens.prefix_shares(gram, counts)[1]
               - attention_stats.prefix_share(g, weighted=True).item()) < 1e-12


def test_norm_gram_and_kappa_against_monte_carlo():
    """LayerNorm of tokens with a per-token scale (x_t = a_t z_t plus a shared part): the
    output's correlation and the backward's kappa for a gradient whose scale depends on
    the position too. Tolerance: 4 standard errors plus 1/d (the projection the rule
    leaves out) on kappa; the output Gram within 3 standard errors + 2% per entry."""
    gen = torch.Generator().manual_seed(4)
    d, draws = 256, 200
    a = torch.linspace(3.0, 0.5, T, dtype=torch.float64)[:, None]
    b = torch.linspace(0.5, 2.0, T, dtype=torch.float64)[:, None]
    grams, outs, ratios = [], [], []
    for _ in range(draws):
        shared = torch.randn(1, d, generator=gen, dtype=torch.float64)
        x = (a * torch.randn(T, d, generator=gen, dtype=torch.float64) + shared) \
            .requires_grad_(True)
        y = torch.nn.functional.layer_norm(x, (d,))
        gy = b * torch.randn(T, d, generator=gen, dtype=torch.float64)
        y.backward(gy)
        grams.append((x @ x.T / d).detach())
        outs.append((y @ y.T / d).detach())
        ratios.append(float(x.grad.square().mean() / gy.square().mean()))
    gram = torch.stack(grams).mean(0).numpy()
    shape, m2 = tokens.normalized(gram)
    h = np.diag((b[:, 0] ** 2).numpy())
    out_shape, kappa = tokens.norm_backward(shape, m2, 1e-5, tokens.normalized(h)[0])
    rule_gain = 1 / m2 * kappa  # theory.norms.backward (γ = 1) times kappa
    measured = float(np.mean(ratios))
    se = float(np.std(ratios)) / math.sqrt(draws)
    assert abs(rule_gain - measured) <= 4 * se + measured / d, (rule_gain, measured)
    out = tokens.norm(shape, m2, 1e-5, 1.0, 0.0)
    meas_out = torch.stack(outs).numpy()
    out_se = meas_out.std(0) / math.sqrt(draws)
    assert np.all(np.abs(out - meas_out.mean(0)) <= 3 * out_se + 0.02)
    assert out_shape is not None


def test_shared_diag_matches_the_direct_sum():
    """The value path's shared-key term by sorted suffix sums equals the direct sum over
    the query pairs that share each key."""
    rng = np.random.default_rng(5)
    counts = np.array([3, 1, 4, 2, 4, 5], dtype=float)
    extra = rng.normal(size=(6, 6))
    direct = np.array([extra[np.ix_(counts > j, counts > j)].sum() for j in range(5)])
    assert np.allclose(tokens._shared_diag(extra, counts, 5), direct)


def test_rotary_decorrelates_with_the_gap():
    """q·cos + rotate_half(q)·sin of tokens alike with correlation r: E[q'_i·q'_j]
    = r mean_f cos((i - j) θ_f), the Monte Carlo of the real rotation within 4 standard
    errors plus 0.01."""
    gen = torch.Generator().manual_seed(6)
    dim, draws, r = 32, 400, 0.6
    theta = 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * theta[None, :]
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    grams = []
    for _ in range(draws):
        q = math.sqrt(r) * torch.randn(1, dim, generator=gen, dtype=torch.float64) \
            + math.sqrt(1 - r) * torch.randn(T, dim, generator=gen, dtype=torch.float64)
        half = torch.cat([-q[:, dim // 2:], q[:, : dim // 2]], -1)
        out = q * cos + half * sin
        grams.append(out @ out.T / dim)
    grams = torch.stack(grams).numpy()
    rule = tokens.rotary(tokens.implied(r, T), None, dim)
    se = grams.std(0) / math.sqrt(draws)
    assert np.all(np.abs(rule - grams.mean(0)) <= 4 * se + 0.01)
