"""nn.MultiheadAttention as one call: its projections around theory.attention.

Self-attention of x with E[x^2] = q_x: the packed in-projection gives each head
q_q = E s_q^2 q_x + mean(b_q^2) (likewise k, v), the heads average their values as
theory.attention.forward says, and the out-projection gives E[o^2] = E s_o^2 E[z^2] +
mean(b_o^2). Backward: Var[g_z] = E s_o^2 Var[dy], then the value, query and key paths
of theory.attention.backward through the in-projection, summed at x. The weights'
moments are reduced on the device during the pass (``moments``); on the meta device,
where there are none, the in-projection's recorded or default init (xavier, zero bias)
and the out-projection's PyTorch default (1/(3E), zero bias: MHA's own reset) are used.
Cross-attention (keys from another tensor) has no rule here: measured values are carried.
"""

from __future__ import annotations

import torch
from torch import nn

from varprobe.theory import attention, widths
from varprobe.theory.attend import correlation, keys
from varprobe.theory.nodes import Attention
from varprobe.theory.signal import Signal

PAIRS = 4  # constants per module: (Wq², Wk²), (Wv², Wo²), (bq², bk²), (bv², bo²)


def moments(module: nn.MultiheadAttention) -> list[torch.Tensor]:
    """Second moments of the q, k, v, out weights and biases, as PAIRS pairs."""
    e = module.embed_dim
    if module._qkv_same_embed_dim:
        w = module.in_proj_weight
        ws = (w[:e], w[e:2 * e], w[2 * e:])
    else:
        ws = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
    b = module.in_proj_bias
    bs = (b[:e], b[e:2 * e], b[2 * e:]) if b is not None else (None,) * 3
    out = module.out_proj

    def m2(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        return t.detach().double().square().mean() if t is not None \
            else torch.zeros((), dtype=torch.float64, device=like.device)

    first = ws[0]
    return [torch.stack([m2(ws[0], first), m2(ws[1], first)]),
            torch.stack([m2(ws[2], first), m2(out.weight, first)]),
            torch.stack([m2(bs[0], first), m2(bs[1], first)]),
            torch.stack([m2(bs[2], first), m2(out.bias, first)])]


def weights(module: nn.MultiheadAttention, constants: list, facts: Attention,
            in_proj: float | None) -> tuple[float, ...]:
    """(Wq², Wk², Wv², Wo², bq², bk², bv², bo²): measured, else the init's."""
    if facts.params is not None:
        pairs = constants[facts.params:facts.params + PAIRS]
        return tuple(v for pair in pairs for v in pair)
    e = module.embed_dim
    w_in = in_proj if in_proj is not None else 1.0 / (2 * e)  # xavier on (3E, E)
    return (w_in, w_in, w_in, 1.0 / (3 * e), 0.0, 0.0, 0.0, 0.0)


def forward(module: nn.MultiheadAttention, facts: Attention, x: Signal,
            w: tuple[float, ...]) -> tuple[Signal, dict]:
    e = module.embed_dim
    wq, wk, wv, wo, bq, bk, bv, bo = w
    q_q, q_k, q_v = e * wq * x.m2 + bq, e * wk * x.m2 + bk, e * wv * x.m2 + bv
    s2 = attention.logit_variance(q_q, q_k, facts.d_k)
    r = correlation(facts, x, None)
    causal = facts.causal and facts.queries == facts.keys
    z = attention.forward(q_v, s2, r, keys(facts), causal, widths.effective(e, x),
                          facts.dropout, d_k=facts.d_k)
    o2 = e * wo * z.second_moment + bo
    r_out = z.correlation if z.correlation == z.correlation else r
    tokens = (o2 - bo) / o2 * r_out + bo / o2 if o2 > 0 else 0.0
    return Signal(o2, 0.0, tokens), {"logit_variance": s2, "measured_logit_variance": None,
                             "token_correlation": r, "participation": z.participation,
                             "spread": (1 - r) * s2, "saturated": attention.saturated(s2, r),
                             "keys": facts.keys, "causal": facts.causal,
                             "masked": facts.masked, "participation_basis": "closed form"}


def backward(module: nn.MultiheadAttention, facts: Attention, x: Signal, grad: float,
             w: tuple[float, ...]) -> float:
    return paths(module, facts, x, grad, w)[0]


def paths(module: nn.MultiheadAttention, facts: Attention, x: Signal, grad: float,
          w: tuple[float, ...], r_g: float = 0.0) -> tuple[float, float]:
    """E[dx²] at the input, and the query path's part of it (H d_k σ_q² E[dq²]): the
    part that stays at each query's own position (theory.positions). ``r_g``: the
    gradient's token correlation at the output."""
    e = module.embed_dim
    wq, wk, wv, wo, bq, bk, bv, _ = w
    q_q, q_k, q_v = e * wq * x.m2 + bq, e * wk * x.m2 + bk, e * wv * x.m2 + bv
    causal = facts.causal and facts.queries == facts.keys
    b = attention.backward(e * wo * grad, q_v, q_q, q_k, facts.d_k, keys(facts),
                           r=correlation(facts, x, None), r_g=r_g, causal=causal,
                           heads=facts.heads, weight_var=(wq, wk, wv),
                           n=widths.effective(e, x),
                           dropout=facts.dropout)
    return b.input, facts.heads * facts.d_k * wq * b.query
