"""Rule accuracy: single- and multi-head self-attention at init against Monte Carlo.

Each case builds real attention in torch float64 (x with token correlation r, random
projections, softmax(QK^T/sqrt(d_k)) with an optional causal mask, autograd for the
gradients), averages E[z^2] and E[dx^2] over seeds and compares them with
varprobe.theory.attention. Relative error |measured/predicted - 1|.
"""

from __future__ import annotations

import itertools
import math
import zlib

import numpy as np
import torch

from varprobe.theory import attention

QUANTITIES = ("z2", "r_out", "p2", "dv", "dq", "dk", "dx", "ds")


def simulate(s2: float, T: int, n: int, d_k: int, *, r: float = 0.0, causal: bool = False,
             heads: int = 1, r_g: float = 0.0, dropout: float = 0.0, window: int | None = None,
             tokens: int = 4096, seed: int = 0) -> dict[str, float]:
    """One draw of weights and data. E[x^2] = 1, W_q, W_k entries N(0, sqrt(s2)/n) (so
    q_q = q_k = sqrt(s2) and the logit variance is s2), W_v entries N(0, 1/n), the head
    output gradient N(0, 1) with token correlation r_g. ``window``: each query also sees
    at most the last ``window`` keys (with causal), so key counts are min(i, window)."""
    g = torch.Generator().manual_seed(seed)
    B = max(1, tokens // T)
    x = _correlated(g, B, T, n, r).requires_grad_(True)
    sd_qk = s2**0.25 / math.sqrt(n)
    w_q, w_k, w_v = (torch.randn(n, heads * d_k, generator=g, dtype=torch.float64) * sd
                     for sd in (sd_qk, sd_qk, 1 / math.sqrt(n)))
    q, k, v = ((x @ w).view(B, T, heads, d_k).transpose(1, 2) for w in (w_q, w_k, w_v))
    for t in (q, k, v):
        t.retain_grad()
    scores = q @ k.transpose(-1, -2) / math.sqrt(d_k)
    scores.retain_grad()  # dS, what an additive bias on the logits gets
    logits = scores
    mask = _mask(T, causal, window)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    p = logits.softmax(-1)
    kept = p
    if dropout:
        keep = torch.rand(p.shape, generator=g, dtype=torch.float64) >= dropout
        kept = p * keep / (1 - dropout)
    z = kept @ v
    grad = _correlated(g, B * heads, T, d_k, r_g).view(B, heads, T, d_k)
    (z * grad).sum().backward()
    with torch.no_grad():
        z2 = (z**2).mean().item()
        s1 = (z.sum(2) ** 2).mean().item()
        return {"z2": z2, "r_out": attention.token_correlation(s1, z2, T),
                "p2": (p**2).sum(-1).mean().item(), "dv": (v.grad**2).mean().item(),
                "dq": (q.grad**2).mean().item(), "dk": (k.grad**2).mean().item(),
                "dx": (x.grad**2).mean().item(), "ds": (scores.grad**2).mean().item()}


def _correlated(g: torch.Generator, B: int, T: int, d: int, r: float) -> torch.Tensor:
    """N(0, 1) entries, uncentered token correlation r: a shared part per sequence."""
    shared = torch.randn(B, 1, d, generator=g, dtype=torch.float64)
    own = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    return math.sqrt(r) * shared + math.sqrt(1 - r) * own


def _mask(T: int, causal: bool, window: int | None) -> torch.Tensor | None:
    if not causal and window is None:
        return None
    i = torch.arange(T)
    keep = torch.ones(T, T, dtype=torch.bool)
    if causal:
        keep &= i[None, :] <= i[:, None]
    if window is not None:
        keep &= i[None, :] > i[:, None] - window
    return keep


def predict(s2: float, T: int, n: int, d_k: int, *, r: float = 0.0, causal: bool = False,
            heads: int = 1, r_g: float = 0.0, dropout: float = 0.0, window: int | None = None,
            method: str = "gaussian", **_) -> dict[str, float]:
    """The closed forms for the setting simulate() draws from."""
    keys: attention.Keys = T
    if window is not None:
        keys = [min(i, window) if causal else window for i in range(1, T + 1)]
        causal = False
    q_qk = math.sqrt(s2)
    fwd = attention.forward(1.0, s2, r, keys, causal, n, dropout, d_k=d_k, method=method)
    var_qk = q_qk / n
    bwd = attention.backward(1.0, 1.0, q_qk, q_qk, d_k, keys, r=r, r_g=r_g, causal=causal,
                             heads=heads, weight_var=(var_qk, var_qk, 1 / n), n=n,
                             dropout=dropout, method=method, row=T)
    return {"z2": fwd.second_moment, "r_out": fwd.correlation, "p2": fwd.participation,
            "dv": bwd.value, "dq": bwd.query, "dk": bwd.key, "dx": bwd.input, "ds": bwd.logit}


def measure(case: dict, seeds: int, tokens: int = 4096, offset: int = 0) -> tuple[dict, dict]:
    """Seed means and their standard errors (relative, sd/sqrt(seeds)/mean). Seeds are
    drawn per case (a hash of the case, plus ``offset``), so errors of different cases
    are independent."""
    base = zlib.crc32(repr(sorted(case.items())).encode()) % 1_000_000 + offset
    runs = [simulate(**case, tokens=tokens, seed=base + i) for i in range(seeds)]
    mean = {q: float(np.mean([run[q] for run in runs])) for q in QUANTITIES}
    se = {q: float(np.std([run[q] for run in runs], ddof=1) / math.sqrt(seeds) / abs(mean[q]))
          if seeds > 1 and mean[q] else math.nan for q in QUANTITIES}
    return mean, se


def grid() -> list[dict]:
    """s^2 from nn.Linear's default (0.11) to past saturation (2), short to long
    sequences, causal or not, token correlation 0 to 0.5, two widths."""
    out = []
    for s2, T, causal, r, (n, d_k) in itertools.product(
            (0.1, 0.25, 1.0, 1.5, 2.0), (16, 64, 256), (False, True), (0.0, 0.3, 0.5),
            ((128, 32), (256, 64))):
        out.append({"s2": s2, "T": T, "n": n, "d_k": d_k, "r": r, "causal": causal})
    return out


def describe(case: dict) -> str:
    extra = ", ".join(f"{k}={case[k]}" for k in ("heads", "r_g", "dropout", "window")
                      if k in case)
    return (f"s2={case['s2']:g} T={case['T']} {'causal' if case['causal'] else 'full'} "
            f"r={case['r']:g} n={case['n']} d_k={case['d_k']}" + (f" {extra}" if extra else ""))


def cases(seeds: int = 8, method: str = "gaussian") -> list[dict]:
    """One row per grid case: forward (E[z^2]) and backward (E[dx^2]) relative error."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is as fast, and leaves the rest
    try:
        rows = []
        for case in grid():
            mean, _ = measure(case, seeds)
            pred = predict(**case, method=method)
            rows.append({"rule": "attention", "case": describe(case),
                         "forward_error": abs(mean["z2"] / pred["z2"] - 1),
                         "backward_error": abs(mean["dx"] / pred["dx"] - 1)})
        return rows
    finally:
        torch.set_num_threads(threads)
