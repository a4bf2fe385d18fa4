"""A scheme's walk at attention calls far past saturation (unscaled logits, as T5's).

Two checks against Monte Carlo, each independent of varprobe's own numbers:

* the query-pair overlap E[sum_j p_ij p_kj] (theory.overlap) against the softmax of
  real projections of correlated tokens: past saturation each query takes its own
  largest logit, and two queries share it about as often as their logits' common part
  (share r) makes them agree, not always (the lognormal form's e^{r(1-r)s^2} -> inf
  gave 1);
* the token correlation r a scheme's walk uses at a saturated call, against the r the
  probe measures at that call in re-initialized copies: the actual init's flat softmax
  averages the tokens' shared part into every token (r 0.74 at the second block's
  values here), a saturated one does not (0.49 measured), and a scheme's walk that
  took the actual init's measured r predicted the first, where the walk's own r
  less the actual init's walk's, added to the measured one, gives the second.

The tolerances are 4 standard errors of the Monte Carlo mean over its draws (about 1
in 16000 to fail by chance if the rule is exact), plus, for the overlap, the part the
rule leaves out by design: two independent queries' cosine spreads by ~1/sqrt(d_k)
about r, which adds to their overlap (+50% at d_k = 64, r = 0; within 1.5 standard
errors at d_k = 1024, the width used here).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import varprobe
from varprobe.theory import attention

SIGMAS = 4.0


def _overlap_samples(r: float, s2: float, seed: int, slices: int = 16, tokens: int = 32,
                     width: int = 1024) -> torch.Tensor:
    """Per slice, the mean over query pairs i != k of sum_j p_ij p_kj, p the softmax of
    q.k scaled to logit variance s2, q and k projections of tokens of correlation r."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(slices, 1, width, generator=gen, dtype=torch.float64)
    x = math.sqrt(r) * shared + math.sqrt(1 - r) * torch.randn(
        slices, tokens, width, generator=gen, dtype=torch.float64)
    wq, wk = (torch.randn(width, width, generator=gen, dtype=torch.float64) / math.sqrt(width)
              for _ in range(2))
    p = torch.softmax((x @ wq) @ (x @ wk).transpose(-1, -2) * math.sqrt(s2 / width), -1)
    o = p @ p.transpose(-1, -2)
    return (o.sum((-1, -2)) - o.diagonal(dim1=-1, dim2=-2).sum(-1)) / (tokens * (tokens - 1))


def test_pair_overlap_past_saturation_matches_monte_carlo():
    for r, s2 in ((0.2, 64.0), (0.5, 256.0)):
        samples = torch.cat([_overlap_samples(r, s2, seed) for seed in range(3)])
        mean = float(samples.mean())
        se = float(samples.std()) / math.sqrt(samples.numel())
        rule = float(attention.pair_overlap(s2, r, np.array([32]))[0])
        assert attention.saturated(s2, r)
        assert abs(rule - mean) < SIGMAS * se, (r, s2, rule, mean, se)


B, T, N, HEADS = 8, 32, 64, 2


class _Block(nn.Module):
    """Pre-norm attention (logits unscaled) and a ReLU MLP. At its own init the q and k
    weights are small (logit variance ~0.1: a flat softmax); He makes it ~100."""

    def __init__(self):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(N), nn.LayerNorm(N)
        self.q, self.k, self.v, self.o = (nn.Linear(N, N, bias=False) for _ in range(4))
        self.wi, self.wo = nn.Linear(N, 4 * N, bias=False), nn.Linear(4 * N, N, bias=False)
        for m in (self.q, self.k):
            nn.init.normal_(m.weight, std=0.3 / N ** 0.5)
        for m in (self.v, self.o):
            nn.init.normal_(m.weight, std=1.5 / N ** 0.5)

    def forward(self, x):
        h = self.n1(x)

        def split(t):
            return t.view(B, T, HEADS, -1).transpose(1, 2)

        z = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)),
                                           split(self.v(h)), scale=1.0)
        x = x + self.o(z.transpose(1, 2).reshape(B, T, N))
        return x + self.wo(torch.relu(self.wi(self.n2(x))))


def test_scheme_walk_r_at_saturated_calls_matches_reinitialized_copies(walks):
    walk_r, copy_r = [], []
    for seed in range(4):
        torch.manual_seed(seed)
        model = nn.Sequential(_Block(), _Block())
        gen = torch.Generator().manual_seed(100 + seed)
        # tokens sharing a direction (r = 0.36): what a flat softmax spreads
        x = 0.6 * torch.randn(B, 1, N, generator=gen) + 0.8 * torch.randn(B, T, N, generator=gen)
        walks.clear()
        varprobe.probe(model, x, seed=seed, compare="he")
        scheme = walks[1]
        copy = varprobe.probe(model, x, seed=seed, init="he")
        assert all(a["spread"] > 16 for a in scheme.attention)  # far past saturation
        walk_r.append([a["token_correlation"] for a in scheme.attention])
        copy_r.append([a["token_correlation"] for a in copy.attention])  # measured there
    walk_r, copy_r = np.array(walk_r), np.array(copy_r)
    se = copy_r.std(0, ddof=1) / math.sqrt(len(copy_r))
    assert np.all(np.abs(walk_r.mean(0) - copy_r.mean(0)) < SIGMAS * se + 1e-3), \
        (walk_r.mean(0), copy_r.mean(0), se)


def test_overlap_at_any_larger_spread_is_the_argmaxes_agreement():
    """Far past saturation each query's softmax is one-hot on its largest logit, so the
    overlap is the chance that two queries' logits (correlation r) peak at the same key,
    computed here from 200,000 independent draws of the argmaxes alone; finite (no
    overflow) at spreads up to inf. The bound: 4 standard errors of that chance plus 4 of
    the rule's own (4096 draws, with its control variate ~1e-3)."""
    from varprobe.theory import overlap

    t, r = 16, 0.3
    gen = np.random.default_rng(7)
    n = 200_000
    shared = math.sqrt(r) * gen.standard_normal((n, t))
    a = shared + math.sqrt(1 - r) * gen.standard_normal((n, t))
    b = shared + math.sqrt(1 - r) * gen.standard_normal((n, t))
    agree = float(np.mean(a.argmax(1) == b.argmax(1)))
    se = math.sqrt(agree * (1 - agree) / n)
    for spread in (1e5, 1e40, math.inf):
        got = float(overlap.overlaps(spread, r, np.array([t]))[0])
        assert math.isfinite(got)
        assert abs(got - agree) < SIGMAS * se + SIGMAS * 1e-3, (spread, got, agree)
