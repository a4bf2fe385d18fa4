"""The gradient's token correlation the probe measures at attention outputs
(theory.gradient_stats), against a float64 computation of the value path's gradient.

At flat attention (zero queries: every logit 0) the value path is exact linear algebra,
dv = pᵀ g with p̄_ij = 1/T_i over the keys query i sees, so the closed form
σ_g²[r_g C + (1 - r_g) P₂] fed the effective r_g must reproduce mean(dv²) to rounding,
for a gradient whose variance and correlation vary with the position (what a causal
stack makes), where one uncentered r_g does not.
"""

from __future__ import annotations

import pytest
import torch

from varprobe import stats
from varprobe.theory import attention, gradient_stats


def _gradient(causal: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(4, 2, 32, 16, generator=gen, dtype=torch.float64)
    # early positions larger and sharing a component, as in a causal decoder's backward
    shared = torch.randn(4, 2, 1, 16, generator=gen, dtype=torch.float64)
    weight = torch.linspace(2.0, 0.2, 32, dtype=torch.float64)[:, None]
    return g * weight + shared * weight if causal else g + 0.5 * shared


@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 8)])
def test_effective_correlation_makes_the_flat_value_path_exact(causal, window):
    """Also under a sliding window of 8 (query i sees keys i-7..i): the probe's flat p̄
    is the window's, and the closed form's query pairs share their windows' keys."""
    g = _gradient(causal)
    tokens = g.shape[-2]
    lag = torch.arange(tokens)[:, None] - torch.arange(tokens)[None, :]
    seen = ((lag >= 0) & (lag < (window or tokens)) if causal else lag == lag).double()
    p = seen / seen.sum(-1, keepdim=True)
    exact = float((p.transpose(0, 1) @ g).square().mean())  # dv_j = Σ_i p_ij g_i
    g.requires_grad_(False)
    slots = _filled(g, window)
    counts = attention.key_counts(tokens, causal) if window is None else \
        torch.arange(1, tokens + 1).clamp(max=window).double().numpy()
    r_g = gradient_stats.effective(slots, causal, causal, counts, window)
    sigma = float(g.square().mean())
    keys, flag = (tokens, causal) if window is None else (counts, False)
    closed = attention.backward(sigma, 1.0, 0.0, 0.0, 16, keys, r_g=r_g, causal=flag,
                                window=window)
    assert closed.value == pytest.approx(exact, rel=1e-9)
    plain = attention.backward(sigma, 1.0, 0.0, 0.0, 16, keys, r_g=slots[0][0],
                               causal=flag, window=window).value
    if causal:  # one uncentered r_g misses the position dependence
        assert abs(plain / exact - 1) > 0.2


def _filled(g: torch.Tensor, window: int | None = None) -> list[tuple[float, float]]:
    """The pairs as the probe fills them: a hook on an output whose gradient is g, its
    values through the one transfer."""
    out = torch.zeros_like(g, requires_grad=True)
    y = out * 1.0
    found = gradient_stats.watch(y, None if window is None else torch.tensor(float(window)))
    y.backward(g)
    assert len(found) == 2
    return stats.collect([found[0]])[0]


def test_no_gradient_leaves_the_slots_unfilled():
    y = torch.zeros(2, 8, 4, requires_grad=True) * 1.0
    slots = stats.collect([gradient_stats.watch(y)[0]])[0]
    assert gradient_stats.effective(slots, True, True, attention.key_counts(8, True)) is None
    assert gradient_stats.watch(torch.zeros(2, 8, 4)) == []
