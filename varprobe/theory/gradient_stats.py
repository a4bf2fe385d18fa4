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

Two constants of the recording, filled by a hook when the gradient arrives: its norms
travel in the pass's one device-to-host transfer (the pipeline collects after the
backward) and the pairs are made on the host: (r_g, 1) and (u causal, u full); (0, 0)
where no gradient reached the output.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from varprobe import transfer
from varprobe.theory.constants import awaiting, deferred

T = torch.Tensor


def watch(out: T, window: T | None = None) -> list:
    """Two constants the backward fills (tokens on axis -2), ``constants.deferred``: the
    hook's three norms go through the pass's one transfer and the pairs are made on the
    host (``_pairs``; (0, 0) twice where it never runs); none where no gradient will come
    (meta, no grad). ``window``: the mask's measured sliding window (a 0-d tensor, 0 for
    none), whose flat p̄ (1/min(i, W) over keys i-W+1..i) then takes the causal one's
    place."""
    if out.is_meta or not out.requires_grad or out.dim() < 2:
        return []
    found = awaiting(2)

    def fill(grad: T) -> None:
        with torch.no_grad():  # in the gradient's precision (fp16/bf16 upcast), no copy
            g = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
            tokens, numel = g.shape[-2], g.numel()
            rows = torch.arange(1, tokens + 1, dtype=g.dtype, device=g.device).unsqueeze(-1)
            if window is not None:  # on the device: W is not read
                width = torch.where(window > 0, window, tokens).to(torch.long)
                rows = torch.minimum(rows, width.to(g.dtype))
            causal = (g / rows).flip(-2).cumsum(-2).flip(-2)  # key j: sum over i >= j
            if window is not None:  # less the queries past j's window, i >= j + W
                end = torch.arange(tokens, device=g.device) + width
                causal = causal - causal.index_select(-2, end.clamp(max=tokens - 1)) \
                    * (end < tokens).unsqueeze(-1)
            found.raw = transfer.Parts([torch.linalg.vector_norm(x)
                                        for x in (g, g.sum(-2), causal)])
            found.finish = lambda r: _pairs(r, tokens, numel)

    out.register_hook(fill)
    return deferred(found, 2)


def _pairs(r: list[float], tokens: int, numel: int) -> list[tuple[float, float]]:
    """(r_g, 1) and (u causal, u full) from the norms of g, of its sum over the tokens
    S and of the causal flat value path, g holding ``numel`` elements over ``tokens``:
    r_g = (mean(S^2)/T - E[g^2]) / ((T - 1) E[g^2]) (attention_stats._correlation), and
    u = mean_j (sum_i p̄_ij g_i)^2 / E[g^2], the full one's sum the tokens' mean."""
    norm, total, causal = r
    q = norm * norm / numel
    s = total * total / (numel // tokens)
    r_g = (s / tokens - q) / max((tokens - 1) * q, 1e-300) if tokens >= 2 else 0.0
    q = max(q, 1e-300)
    full = (total / tokens) ** 2 / (numel // tokens)
    return [(r_g, 1.0), (causal * causal / numel / q, full / q)]


def effective(slots: tuple[tuple, tuple] | None, causal: bool, masked: bool,
              counts: np.ndarray, window: int | None = None) -> float | None:
    """The gradient correlation r_g for theory.attention.backward: the one whose value
    path at flat attention gives the measured u (causal, a sliding ``window``, or every
    key seen), the plain r_g under another mask; None where the backward never filled
    the slots."""
    if slots is None or slots[0][1] < 0.5:
        return None
    if masked and not causal:
        return float(slots[0][0])
    u = slots[1][0] if causal else slots[1][1]
    p2, c = flat_moments(counts, window)
    return float((u - p2) / (c - p2)) if c > p2 else float(slots[0][0])


def flat_moments(counts: np.ndarray, window: int | None = None) -> tuple[float, float]:
    """P₂ and the mean squared column sum C of flat attention over nested key sets
    (query i sees the first counts[i] keys), or over a sliding window (query i sees keys
    i - W + 1..i): the value path's σ_g²[r_g C + (1-r_g) P₂]. Cached: every walk (the
    actual init's, each scheme's) asks it of the same calls."""
    return _flat_moments(np.asarray(counts, dtype=np.float64).tobytes(), window)


@functools.lru_cache(maxsize=256)
def _flat_moments(key: bytes, window: int | None) -> tuple[float, float]:
    counts = np.frombuffer(key, dtype=np.float64)
    if window is None:
        seen = np.arange(int(counts.max()))[None, :] < counts[:, None]
    else:  # key j by queries j..j+W-1
        lag = np.arange(counts.size)[:, None] - np.arange(counts.size)[None, :]
        seen = (lag >= 0) & (lag < window)
    columns = (seen / counts[:, None]).sum(0)
    return float(np.mean(1 / counts)), float(np.mean(columns ** 2))
