"""Two queries' attention overlap past saturation (theory.overlap via attention._pairs)
against the softmax of real query and key vectors, float64 Monte Carlo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from varprobe.theory import attend, attention
from varprobe.theory.nodes import Attention
from varprobe.theory.signal import Signal

T, D_K, TRIALS = 64, 64, 4000


def realized_overlap(s2: float, r: float, seed: int = 0) -> tuple[float, float]:
    """Mean and standard error of sum_j p_1j p_2j for two queries over T keys, tokens of
    correlation r (a shared vector plus each token's own, unit-variance entries) and
    logits c q.k with c^2 d_k = s2: the shared part of the keys' logits is
    sqrt(r(1-r)) c qbar.k~_j, what the closed forms call a_j."""
    gen = torch.Generator().manual_seed(seed)
    shape = (TRIALS, 1, D_K)
    qbar, kbar = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    q = math.sqrt(r) * qbar + math.sqrt(1 - r) * torch.randn(
        (TRIALS, 2, D_K), generator=gen, dtype=torch.float64)
    k = math.sqrt(r) * kbar + math.sqrt(1 - r) * torch.randn(
        (TRIALS, T, D_K), generator=gen, dtype=torch.float64)
    p = torch.softmax(math.sqrt(s2 / D_K) * q @ k.transpose(1, 2), dim=-1)
    o = (p[:, 0] * p[:, 1]).sum(-1)
    return o.mean().item(), o.std().item() / math.sqrt(TRIALS)


@pytest.mark.parametrize("s2, r", [
    (4.0, 0.227),   # BERT's second attention under He: (1-r)s^2 3.1, closed form 1.12x
    (7.11, 0.391),  # T5's fourth encoder attention under torch-default: 1.69x
    (16.0, 0.3),    # spread 11: 5.9x
])
def test_saturated_overlap_follows_the_softmax(s2, r):
    """The bound: 4 standard errors of the reference mean (1.6-3.1% here) plus 3% for
    theory.overlap's own draws (4096, with a control variate: ~1e-3 absolute) and the
    logits' finite d_k (their parts are sums of 64 products, taken as Gaussian; it
    comes out 3% under).
    The closed form e^{r(1-r)s^2}/(e^{r(1-r)s^2} + T - 1) fails each case."""
    assert attention.saturated(s2, r)
    predicted = attention._pairs(s2, r, np.full(T, T))[0] / (T - 1)
    mean, se = realized_overlap(s2, r)
    assert abs(math.log(predicted / mean)) < 4 * se / mean + 0.03, (predicted, mean, se)


def realized_value_gradient(s2: float, r: float, r_g: float, trials: int = 400,
                            seed: int = 1) -> tuple[float, float]:
    """Mean and standard error over trials of E[dv^2] per element, one head without a
    mask, float64 autograd: queries and keys of token correlation r (as above), unit
    values, and a cotangent at the head output of token correlation r_g (a shared
    vector plus each query's own, unit variance)."""
    gen = torch.Generator().manual_seed(seed)

    def tokens(rows: int, share: float) -> torch.Tensor:
        shared = torch.randn((trials, 1, D_K), generator=gen, dtype=torch.float64)
        own = torch.randn((trials, rows, D_K), generator=gen, dtype=torch.float64)
        return math.sqrt(share) * shared + math.sqrt(1 - share) * own

    q, k = tokens(T, r), tokens(T, r)
    v = torch.randn((trials, T, D_K), generator=gen, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(math.sqrt(s2 / D_K) * q @ k.transpose(1, 2), dim=-1)
    (p @ v).backward(tokens(T, r_g))
    per_trial = v.grad.pow(2).mean(dim=(1, 2))
    return per_trial.mean().item(), per_trial.std().item() / math.sqrt(trials)


def test_saturated_value_path_keeps_the_gradients_correlation():
    """BERT's second attention under He ((1-r)s^2 3.1, no causal mask) with a gradient of
    token correlation 0.3: dv_j = sum_i p_ij g_i collects r_g times the squared column
    sum of p. Dropping r_g past (1-r)s^2 = 1.5 put it at 0.19x the softmax's (0.98x
    with it). The bound: 4 standard errors of the reference (1.2%) plus 3% for the
    overlap's draws and finite d_k, as above, plus 5% for P2's and the column sum's
    Gaussian logits."""
    s2, r, r_g = 4.0, 0.227, 0.3
    facts = Attention(queries=T, keys=T, d_k=D_K, heads=1, scale=math.sqrt(s2 / D_K))
    unit = Signal(1.0, 0.0, r)
    dv = attend.backward(facts, 1.0, unit, unit, unit, None, r_g=r_g)[2]
    mean, se = realized_value_gradient(s2, r, r_g)
    assert abs(math.log(dv / mean)) < 4 * se / mean + 0.08, (dv, mean, se)
