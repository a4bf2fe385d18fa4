"""A class token (theory.positions): one position whose forward and gradient differ from
the others', against the measured values of the real model over seeds.

The model is a ViT's skeleton: a Linear embeds 32 tokens, a zero class token is put in
front of them and learned positions (0.02) added; one pre-LN block of
nn.MultiheadAttention; the head reads the class token through a LayerNorm. Its stream
at the class token is the positions' 0.0004 where the patch tokens have 0.33, so the
first LayerNorm multiplies the class token's gradient by ~2500 and the patch tokens'
by ~3: only the class token's query has a gradient, and attention spreads it to every
key through the value and key paths (theory.positions). One number per tensor puts the
embedding's gradient at the average token's, the class token's included. Below it,
the part of the gradient the value path hands every key alike
(positions.attention_shared) against softmax attention in float64.

The closed form serves the walks with nothing measured about the tokens: a scheme's
(here torch-default's, which re-draws the Linear weights and keeps the zero class
token), judged against the measurement of the re-initialized copy. The actual init's
walk over a measured pass takes the tokens' shapes from the measurement
(theory.tokennorm, theory.catshare) and does not carry the class token.

Tolerance: |log(seed mean measured / seed mean predicted)| <= log(1 + delta) + 3 se,
delta = 5% + 4 s_e²/d_k (the attention backward's own error, tests/test_attention_rules.py,
attention.md §3.4; s_e² = 0.25, d_k = 32) and se the standard error over the seeds.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bench import whole_models as W
from bench.whole_zoo import Case, gaussian
from varprobe.theory import positions

SEEDS, WIDTH, TOKENS, HEADS = 6, 128, 32, 4
DELTA = 0.05 + 4 * 0.25 / (WIDTH // HEADS)


class ClassTokenNet(nn.Module):
    def __init__(self, d: int = WIDTH, tokens: int = TOKENS, heads: int = HEADS):
        super().__init__()
        self.embed = nn.Linear(d, d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, d) * 0.02)
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], dim=1) + self.pos
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.norm(x)[:, 0])


def class_token_net() -> nn.Module:
    return ClassTokenNet()


CASE = Case("class_token", class_token_net, gaussian(TOKENS, WIDTH), 32,
            "embedding, [CLS], one pre-LN nn.MultiheadAttention block, head on [CLS]")


SCHEME = "torch-default"


def backward_errors() -> dict[str, tuple[float, float]]:
    """Per weight layer: (|log| of the seed means, its standard error) backward, of the
    scheme's prediction against its copy's measurement."""
    compared, _ = W.compare_series(W.seed_series(CASE, SEEDS, SCHEME).values())
    return {c.name: (abs(c.log), c.se or 0.0) for c in compared if c.direction == "backward"}


@pytest.fixture(scope="module")
def errors() -> dict[str, tuple[float, float]]:
    return backward_errors()


def test_class_token_backward_within_tolerance(errors):
    bad = {name: f"{log:.3f} > {math.log1p(DELTA) + 3 * se:.3f}"
           for name, (log, se) in errors.items() if log > math.log1p(DELTA) + 3 * se}
    assert not bad, bad
    assert set(errors) == {"embed", "attn", "head"}


def test_average_token_rule_is_rejected(monkeypatch):
    """Without the class token's own statistics (every position taken alike, as before
    theory.positions) the same bound fails at the embedding: the check can fail."""
    monkeypatch.setattr(positions, "cat_lead", lambda *args, **kwargs: None)
    found = backward_errors()
    log, se = found.get("embed", (math.inf, 0.0))
    assert log > math.log1p(DELTA) + 3 * se


def test_value_path_shared_part_against_monte_carlo():
    """attention_shared against softmax attention in float64: a lead gradient at
    query 0, the others sharing a random vector per sample. The pairs of keys share
    E[dv_j dv_j'] = E[g²](1 + (T-1) r_g)/T at flat attention; at logit variance 0.25
    the softmax's spread moves it by about P₂ T - 1 = 28% of 1/T, within 2%
    (tolerance 5% + 3 se over 8 draws)."""
    tokens, d, batch, lead, shared, own = 33, 32, 256, 4.0, 0.3, 0.2
    gen = torch.Generator().manual_seed(0)
    pairs, total = [], []
    for _ in range(8):
        q, k = (torch.randn(batch, tokens, d, generator=gen, dtype=torch.float64) * 0.5 ** 0.5
                for _ in range(2))
        v = torch.randn(batch, tokens, d, generator=gen, dtype=torch.float64).requires_grad_()
        p = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, -1)
        g = torch.randn(batch, 1, d, generator=gen, dtype=torch.float64) * shared ** 0.5 + \
            torch.randn(batch, tokens, d, generator=gen, dtype=torch.float64) * own ** 0.5
        g[:, 0] = torch.randn(batch, d, generator=gen, dtype=torch.float64) * lead ** 0.5
        (p @ v).backward(g)
        dv = v.grad
        sums = dv.sum(1).pow(2).mean() - dv.pow(2).sum(1).mean()
        pairs.append(float(sums) / (tokens * (tokens - 1)))
        total.append(float(g.pow(2).mean()))
    mean_var = (lead + (tokens - 1) * (shared + own)) / tokens
    _, predicted = positions.attention_shared(mean_var, shared, tokens)
    measured = sum(pairs) / len(pairs)
    se = (sum((x - measured) ** 2 for x in pairs) / (len(pairs) - 1)) ** 0.5 / len(pairs) ** 0.5
    assert abs(math.log(measured / predicted)) <= math.log1p(0.05) + 3 * se / measured
