"""Eager attention through the probe: Linear -> attention spelled out -> Linear.

The op: q, k, v projections (nn.Linear), ``scores = q @ k^T * c`` (matmul, bmm or
einsum), an optional causal mask (additive -inf, or masked_fill), ``softmax(scores,
-1)``, optional dropout on p, ``p @ v``, heads merged. Rule wanted: the same closed forms
as scaled_dot_product_attention (varprobe.theory.attention, docs/research attention §3):
forward E[z²] = E[v²][r + P₂(1/(1-p) - r) + (1-r)² s² (1-P₂)²/n], backward the value,
query and key paths summed at the block's input.

The setting: x ~ N(0, 1) tokens (B, T, n); ``pre`` N(0, 1/n) so E[h²] = 1; q and k
weights N(0, sqrt(s2)/n), so the logit variance is s2 at c = 1/sqrt(d_k); v N(0, 1/n);
``post`` Linear(n, POST_OUT). Forward is measured at ``post`` (E[y²], predicted from the
walk's E[z²]); backward at ``pre``'s input gradient (the three paths through q, k, v).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bench.accuracy._harness import POST_OUT, Spec, run

HEADS, BATCH = 4, 16


class Eager(nn.Module):
    def __init__(self, n: int, s2: float, how: str, causal: bool, dropout: float):
        super().__init__()
        self.pre = nn.Linear(n, n, bias=False)
        self.q, self.k, self.v = (nn.Linear(n, n, bias=False) for _ in range(3))
        self.post = nn.Linear(n, POST_OUT, bias=False)
        self.how, self.causal, self.dropout = how, causal, dropout
        with torch.no_grad():
            for m, var in ((self.pre, 1 / n), (self.q, math.sqrt(s2) / n),
                           (self.k, math.sqrt(s2) / n), (self.v, 1 / n), (self.post, 1 / n)):
                m.weight.normal_(0, math.sqrt(var))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        B, T, n = h.shape
        d = n // HEADS
        q, k, v = (f(h).view(B, T, HEADS, d).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.how == "sdpa":  # the reference: the same attention as one call
            z = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                               dropout_p=self.dropout if self.training else 0)
            return self.post(z.transpose(1, 2).reshape(B, T, n))
        if self.how == "einsum":
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(d)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) * d ** -0.5
        if self.causal:
            upper = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            scores = (scores.masked_fill(upper, float("-inf")) if self.how == "einsum"
                      else scores + torch.zeros(T, T).masked_fill(upper, float("-inf")))
        p = F.softmax(scores, dim=-1)
        p = F.dropout(p, self.dropout, self.training)
        z = torch.einsum("bhqk,bhkd->bhqd", p, v) if self.how == "einsum" else p @ v
        return self.post(z.transpose(1, 2).reshape(B, T, n))


def spec(s2: float, tokens: int, causal: bool, how: str = "matmul", width: int = 256,
         dropout: float = 0.0) -> Spec:
    label = (f"s2 {s2:g}, T {tokens}, {'causal' if causal else 'full'}, {how}, width {width}"
             + (f", dropout {dropout:g}" if dropout else ""))

    def inputs(gen: torch.Generator) -> torch.Tensor:
        return torch.randn(BATCH, tokens, width, generator=gen)
    return Spec(rule="eager attention", case=label,
                build=lambda: Eager(width, s2, how, causal, dropout), inputs=inputs,
                width=width, tags={"s2": s2, "tokens": tokens, "causal": causal, "how": how,
                                   "dropout": dropout, "width": width})


def specs() -> list[Spec]:
    return [spec(s2, t, causal, how, dropout=p)
            for s2 in (0.1, 0.3, 1.0) for t in (16, 64) for causal in (False, True)
            for how in ("matmul", "einsum") for p in (0.0, 0.1)]


def cases(seeds: int = 8) -> list[dict]:
    return run(specs(), seeds)
