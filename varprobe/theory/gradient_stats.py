"""What the probe measures of a gradient during the backward: how the gradient g at an
attention call's output is correlated across tokens, as the value path sees it
(attention.md §3.3, §3.7).

The value path sums the gradient over the queries that read each key, dv_j = Σ_i p_ij g_i,
so E[dv²] depends on the gradient's token Gram matrix weighted by p, not on one
correlation: a causal stack makes the early positions' gradients correlated among
themselves and their variance differ from the late ones'. The probe measures
u = mean_j (Σ_i p̄_ij g_i)² / E[g²] for flat attention p̄ (causal: p̄_ij = 1/(i+1) for
j ≤ i, a reversed cumulative sum; every key seen: the mean over the queries), O(B H T d),
and the walk reads it as the gradient correlation r_g that makes the closed form at flat
attention exact (``effective``); the closed form then carries it to the actual logit
spread. The plain uncentered r_g is kept beside it for a mask that is neither.

The slots are device tensors made during the forward, among the recording's constants,
and filled by a hook when the gradient arrives, so they travel in the pass's one
device-to-host transfer (the pipeline collects after the backward): (r_g, 1) and
(u causal, u full); (0, 0) where no gradient reached the output.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from varprobe.theory.attention_stats import _correlation

T = torch.Tensor


def watch(out: T) -> list[T]:
    """Two (2,) float64 slots on ``out``'s device that the backward fills (tokens on
    axis -2); none where no gradient will come (meta, no grad)."""
    if out.is_meta or not out.requires_grad or out.dim() < 2:
        return []
    slots = [torch.zeros(2, dtype=torch.float64, device=out.device) for _ in range(2)]

    def fill(grad: T) -> None:
        with torch.no_grad():  # in the gradient's precision (fp16/bf16 upcast), no copy
            g = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
            one = torch.ones((), dtype=torch.float64, device=g.device)
            slots[0].copy_(torch.stack([_correlation(g), one]))
            slots[1].copy_(torch.stack(_flat_value_path(g)))

    out.register_hook(fill)
    return slots


def _flat_value_path(g: T) -> list[T]:
    """mean_j (Σ_i p̄_ij g_i)² / E[g²] under causal and under full flat attention."""
    tokens = g.shape[-2]
    q = _mean_square(g).clamp(min=1e-300)
    rows = torch.arange(1, tokens + 1, dtype=g.dtype, device=g.device).unsqueeze(-1)
    causal = (g / rows).flip(-2).cumsum(-2).flip(-2)
    return [_mean_square(causal) / q, _mean_square(g.mean(-2)) / q]


def _mean_square(x: T) -> T:
    """E[x^2] in float64 from a norm in x's precision (no squared temporary)."""
    return torch.linalg.vector_norm(x).double().square() / x.numel()


def effective(slots: tuple[tuple, tuple] | None, causal: bool, masked: bool,
              counts: np.ndarray) -> float | None:
    """The gradient correlation r_g for theory.attention.backward: the one whose value
    path at flat attention gives the measured u (causal or every key seen), the plain
    r_g under another mask; None where the backward never filled the slots."""
    if slots is None or slots[0][1] < 0.5:
        return None
    if masked and not causal:
        return float(slots[0][0])
    u = slots[1][0] if causal else slots[1][1]
    p2, c = flat_moments(counts)
    return float((u - p2) / (c - p2)) if c > p2 else float(slots[0][0])


def flat_moments(counts: np.ndarray) -> tuple[float, float]:
    """P₂ and the mean squared column sum C of flat attention over nested key sets
    (query i sees the first counts[i] keys): the value path's σ_g²[r_g C + (1-r_g) P₂].
    Cached: every walk (the actual init's, each scheme's) asks it of the same calls."""
    return _flat_moments(np.asarray(counts, dtype=np.float64).tobytes())


@functools.lru_cache(maxsize=256)
def _flat_moments(key: bytes) -> tuple[float, float]:
    counts = np.frombuffer(key, dtype=np.float64)
    keys = int(counts.max())
    seen = np.arange(keys)[None, :] < counts[:, None]
    columns = (seen / counts[:, None]).sum(0)
    return float(np.mean(1 / counts)), float(np.mean(columns ** 2))
