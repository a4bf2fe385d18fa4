"""The tokens' Gram matrix, in the walks with nothing measured about the tokens.

A causal stack makes the positions differ: the first query's attention output is its
own value (E[z_0²] = E[v²]), the last one's an average over the whole prefix, so the
early tokens are larger and, once a LayerNorm or RMSNorm has put every token at one
scale, the late ones (averages of overlapping prefixes) are correlated among
themselves far more than the early ones. One number per tensor with one token
correlation r misses both, and a scheme re-draws the weights that set them, so the
actual init's measured token shapes (theory.tokennorm's kappa, the attention calls'
prefix shares, the gradient's u) do not carry over. The closed-form walks (a scheme's,
``varprobe predict``; ``Walk.closed_tokens``) carry instead, beside the scalar signal,
the tokens' Gram matrix G[i, j] = E[x_i·x_j]/d over positions (averaged over the batch
and the features; T x T float64, T up to ``CAP``), as a shape S = G / mean(diag G)
next to the walk's own E[x²], and the gradient's the same way (``Grad.gram``):

- a weight layer (i.i.d. weights) keeps S and adds its bias to every pair: (m S + b² J)
  / (m + b²); an add sums its independent inputs' Grams; a view, a slice of features, a
  concatenation of features keep it; dropout raises the diagonal by 1/(1 - p);
- an elementwise activation maps each entry by the 2-D Gaussian kernel of its pair
  (theory.rules.token_correlation's map of the normalized correlation
  G_ij/sqrt(G_ii G_jj), each token's own scale by the gain at the mean one), the
  gradient by the kernel of f';
- LayerNorm and RMSNorm put each token at its own scale: G_ij/sqrt((G_ii + ε)(G_jj + ε));
  their backward divides the gradient's Gram the same way, so kappa (theory.tokennorm)
  is mean_t(H_tt/(ρ_t + ε))(E[ρ] + ε)/E[H] of the two diagonals;
- a product of two factors (SwiGLU, a gate) multiplies their Grams entrywise; a rotary
  embedding multiplies the Gram by mean_f cos((i - j) θ_f) (``rotary``);
- attention (``attend``): with query i's weights p_ij over its window (T_i keys: j ≤ i
  when causal), E[p_ij p_kl] = a_ik off the shared keys and b_ik on them (j = l), where
  b_ii T_i = P₂,ᵢ (the participation of theory.attention at the call's logit variance)
  and b_ik min(T_i, T_k) = O_ik the overlap of two queries' weights
  (e^{r(1-r)s²}/(e^{r(1-r)s²} + max(T_i, T_k) - 1), as theory.attention._pairs), and
  a_ik the rest of Σ_jl E[p_ij p_kl] = 1: the output's Gram is a ⊙ (L G Lᵀ - D) + b ⊙ D
  (L the window mask, D_ik the sum of G_jj over the shared keys), plus the finite-width
  coupling term on the diagonal. The value path's gradient is the transpose of that map
  (Lᵀ (a ⊙ H) L, and the shared-key term on the diagonal); the query path reaches each
  query in proportion to its own gradient, the key path each key by the queries that
  read it.

From these the walk reads what the actual init's walk measures: the values' and keys'
prefix shares u and their plain r at each attention call (theory.attend.correlation),
the query path's factor X (``query_factor``), the gradient's u, and so r_g
(theory.gradient_stats.effective), at each attention output, and kappa at each
LayerNorm and RMSNorm. Past ``CAP`` positions, and at a call far past saturation
((1 - r)s² > ``SATURATED``), the Gram is not carried (the scalar rules, as before).
Window sums use cumulative sums (nested windows, theory.windowsums), no loop over tokens.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from varprobe.theory import correlation, diagonal, gramfold, keyindex, rules
from varprobe.theory.attention import mean
from varprobe.theory.windowsums import (
    causal_windows,
    column_window_sums,
    gram_cumsum,
    gram_diag_sums,
    gram_window_diag,
    gram_window_sums,
    row_window_sums,
    windows,
)

CAP = 256  # positions: past it, the scalar rules
# (1 - r) s² past which a call without a causal mask takes no Gram (theory.tokenshape):
# between T5's encoder under torch-default (~5, where the Gram holds) and LeCun (~57)
SATURATED = 16.0


def implied(r: float, tokens: int) -> np.ndarray:
    """The shape of tokens alike with one uncentered correlation r (read-only: kept
    for the walk's other reads at the same r, the backward's, the keys')."""
    return _implied(min(max(r, 0.0), 1.0), tokens)


@functools.lru_cache(maxsize=32)
def _implied(r: float, tokens: int) -> np.ndarray:
    out = np.full((tokens, tokens), r)
    np.fill_diagonal(out, 1.0)
    out.setflags(write=False)
    return out


def normalized(g: np.ndarray | None, fresh: bool = False) -> tuple[np.ndarray | None, float]:
    """(G / mean diag, mean diag); (None, 0) where there is nothing. ``fresh``: g is the
    caller's own temporary, divided in place (one T x T array less)."""
    if g is None:
        return None, 0.0
    m = float(g.trace()) / g.shape[0]
    if not m > 0 or not math.isfinite(m):
        return None, 0.0
    return (np.divide(g, m, out=g) if fresh else g / m), m


def off_diagonal(s: np.ndarray) -> float:
    """The mean of the off-diagonal entries over the mean of the diagonal: the plain r."""
    t = s.shape[0]
    d = float(np.trace(s))
    return float((s.sum() - d) / (t * (t - 1)) / (d / t)) if t > 1 and d > 0 else 0.0


def combine(parts: list[tuple[float, np.ndarray | None, float]], shared: float = 0.0,
            own: float = 0.0) -> np.ndarray | None:
    """Σ w_i S_i (absolute Grams of independent inputs, w_i their E[x²] weight; a part
    without a Gram is alike with its r) + ``shared`` on every pair (a bias) + ``own`` on
    the diagonal (a learned position each token has its own of); its shape."""
    sizes = {s.shape[0] for _, s, _ in parts if s is not None}
    if len(sizes) != 1:
        return None
    tokens = sizes.pop()
    return gramfold.mix([(w, s if s is not None else implied(r, tokens))
                         for w, s, r in parts], float(shared), float(own))


def weight(s: np.ndarray | None, m2: float, b2: float) -> np.ndarray | None:
    """A weight layer's output shape: (m S + b² J)/(m + b²), m = E[(Wx)²]."""
    if s is None:
        return None
    if b2 <= 0:
        return s
    return gramfold.mix([(m2, s)], b2)


def dropout(s: np.ndarray | None, p: float) -> np.ndarray | None:
    if s is None or not p:
        return s
    out = s.copy()
    out[np.diag_indices(s.shape[0])] /= (1 - p)
    return normalized(out, fresh=True)[0]


def norm(s: np.ndarray | None, m2: float, eps: float, g2: float, b2: float
         ) -> np.ndarray | None:
    """LayerNorm / RMSNorm: each token at its own scale, then γ² and β² (β on every pair)."""
    if s is None:
        return None
    # S_ij m2 g2 / sqrt(d_i d_j), d = diag(S) m2 + ε: one outer product of the scales
    return gramfold.outer_scaled(s, math.sqrt(m2 * g2) / np.sqrt(np.diag(s) * m2 + eps), b2)


def norm_backward(s_in: np.ndarray | None, m2: float, eps: float,
                  h: np.ndarray | None) -> tuple[np.ndarray | None, float]:
    """(the gradient's shape at the norm's input, kappa): H_ij/sqrt((ρ_i + ε)(ρ_j + ε))
    and mean_t(H_tt/(ρ_t + ε))(E[ρ] + ε)/E[H]; kappa 1 where the tokens are alike."""
    if s_in is None:
        return h, 1.0
    rho = np.diag(s_in) * m2
    tokens = rho.size
    h = np.eye(tokens) if h is None else h
    if h.shape[0] != tokens:
        return None, 1.0
    diag = np.diag(h)
    kappa = float(mean(diag / (rho + eps)) * (mean(rho) + eps) / mean(diag))
    return gramfold.outer_scaled(h, 1 / np.sqrt(rho + eps)), kappa


def _root_outer(d: np.ndarray) -> np.ndarray:
    """sqrt(d_i d_j), a fresh array: the roots of the T numbers, then their products."""
    return _outer(np.sqrt(d))


def _outer(v: np.ndarray) -> np.ndarray:
    """np.outer(v, v) to the bit (the same products), by torch: ~2.5x faster at T = 256."""
    t = torch.from_numpy(np.array(v, dtype=np.float64))  # a writeable, contiguous copy
    return torch.outer(t, t).numpy()


def correlations(s: np.ndarray) -> tuple[gramfold.Cells, np.ndarray]:
    """(the cells on the kernels' grid of each pair's normalized correlation
    G_ij/sqrt(G_ii G_jj), clipped to [0, 1], and sqrt(G_ii G_jj)): what an activation's
    kernels read."""
    scale = _root_outer(np.diag(s))
    rho = np.divide(s, scale)
    np.clip(rho, 0.0, 1.0, out=rho)
    return gramfold.cells(rho, rules.RHO_STEPS), scale


def activation(module: nn.Module, s: np.ndarray | None, m2: float, mu: float = 0.0,
               pairs: Callable = correlations) -> np.ndarray | None:
    """E[f(y_i) f(y_j)] of an elementwise activation: the normalized correlation of each
    pair mapped by the activation's kernel at the mean scale (theory.rules), each token's
    own scale by the gain at the mean one (exact for rectifiers). ``pairs``: s ->
    correlations(s), or a walk's copy of it kept for the backward."""
    if s is None or mu * mu > 1e-6 * m2 or not m2 > 0:
        return None
    q = float(f"{m2:.3g}")
    table = _kernel(module, q)
    if table is None:
        return None
    at, scale = pairs(s)
    return gramfold.kernel_map(at, table, scale)


def activation_backward(module: nn.Module, s: np.ndarray | None, m2: float,
                        h: np.ndarray | None, pairs: Callable = correlations
                        ) -> np.ndarray | None:
    """E[g_i g_j f'(y_i) f'(y_j)] ≈ H_ij E[f'(y_i) f'(y_j)], the derivative's kernel at
    each pair's correlation."""
    if s is None or not m2 > 0:
        return h
    table = _slope_kernel(module, float(f"{m2:.3g}"))
    if table is None:
        return h
    at = pairs(s)[0]  # a walk's kept copy: spent here either way
    h = np.eye(s.shape[0]) if h is None else h
    return gramfold.kernel_map(at, table, h) if h.shape == s.shape else None


_KERNELS: dict = {}


def _kernel(module: nn.Module, q: float) -> np.ndarray | None:
    key = (type(module), rules._attributes(module), q, False)
    if key not in _KERNELS:
        try:
            _KERNELS[key] = np.array([rules.token_correlation(module, k / rules.RHO_STEPS, q)
                                      for k in range(rules.RHO_STEPS + 1)])
        except Exception:  # noqa: BLE001 -- no map: no Gram
            _KERNELS[key] = None
    return _KERNELS[key]


def _slope_kernel(module: nn.Module, q: float) -> np.ndarray | None:
    key = (type(module), rules._attributes(module), q, True)
    if key not in _KERNELS:
        if isinstance(module, (*rules.DROPOUTS, *rules.IDENTITY_LIKE)):
            _KERNELS[key] = np.ones(rules.RHO_STEPS + 1)
            return _KERNELS[key]
        try:
            def slope(y: torch.Tensor) -> torch.Tensor:
                return rules._slope(module, y)
            kinks = rules._breakpoints(module)
            _KERNELS[key] = np.array([correlation.activation(k / rules.RHO_STEPS, slope, q,
                                                             kinks)
                                      for k in range(rules.RHO_STEPS + 1)])
        except Exception:  # noqa: BLE001
            _KERNELS[key] = None
    return _KERNELS[key]


def product(a: np.ndarray | None, ra: float, b: np.ndarray | None, rb: float
            ) -> np.ndarray | None:
    """Two independent factors: the Grams multiply entrywise."""
    if a is None and b is None:
        return None
    tokens = (a if a is not None else b).shape[0]
    a = implied(ra, tokens) if a is None else a
    b = implied(rb, tokens) if b is None else b
    return gramfold.product(a, b) if a.shape == b.shape else None


# --- attention -----------------------------------------------------------------------
def pair_weights(counts: np.ndarray, p2i: np.ndarray, s2: float, r: float,
                 keep: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(a, b - a): E[p_ij p_kl] = a_ik for j ≠ l, b_ik for j = l, over the windows of
    queries i and k (see the module's docstring); b - a is what the shared keys add,
    as the forward and the backward read it."""
    inv_shared, inv_rest, none = keyindex.pairs(counts)
    # the lognormal overlap also past attention.SATURATED_SPREAD (up to SATURATED,
    # past which no Gram is carried): theory.overlap's there put T5's torch-default
    # scheme column's backward median at 0.12, 0.05 with this one
    e = math.exp(min(r * (1 - r) * s2, 50.0))
    # e/(e + max(T_i, T_k) - 1), falling with the count: the least of the two queries'
    v = torch.from_numpy(e / (e + counts - 1))
    overlap = torch.minimum(v[:, None], v[None, :]).numpy()  # ~2x np.minimum.outer's speed
    np.fill_diagonal(overlap, p2i)
    extra = overlap * inv_shared  # b, then b - a in place
    a = np.subtract(1, overlap, out=overlap)
    a *= inv_rest
    a.flat[none] = 0.0  # no pairs off the shared keys
    extra[np.diag_indices(counts.size)] *= keep
    extra -= a
    return a, extra


def attend(sv: np.ndarray | None, rv: float, counts: np.ndarray, p2i: np.ndarray,
           s2: float, r: float, coupling: np.ndarray | None, keep: float = 1.0,
           weights: tuple | None = None) -> tuple[np.ndarray, float] | None:
    """(the output's shape, its E[z²] per unit E[v²]) of attention over values of shape
    ``sv`` (alike with ``rv`` where None), T queries over T keys; ``weights``: the
    call's pair_weights where the caller has them."""
    tokens = counts.size
    if sv is None:
        sv = implied(rv, tokens)
    if sv.shape[0] != int(counts.max()):
        return None
    a, extra = weights or pair_weights(counts, p2i, s2, r, keep)
    sums = gram_window_sums(sv, counts)
    index = keyindex.index(counts)
    cum = np.cumsum(np.diag(sv))  # non-decreasing (a diagonal of variances): the sum up
    cum = cum if index.causal else cum[index.at]  # to the last shared key is the least
    # a ⊙ sums + (b - a) ⊙ d over its mean diagonal, found first from the diagonals
    diag = np.diag(a) * np.diag(sums) + np.diag(extra) * cum
    if coupling is not None:
        diag = diag + coupling
    m = float(mean(diag))
    if not m > 0 or not math.isfinite(m):
        return None, 0.0
    c = torch.from_numpy(cum / m)
    d = torch.minimum(c[:, None], c[None, :])
    d *= torch.from_numpy(extra)
    out = d.addcmul_(torch.from_numpy(a), torch.from_numpy(sums), value=1 / m).numpy()
    if coupling is not None:
        out[np.diag_indices(tokens)] += coupling / m
    return out, m


def value_backward(h: np.ndarray | None, counts: np.ndarray, p2i: np.ndarray, s2: float,
                   r: float, keep: float = 1.0, weights: tuple | None = None
                   ) -> np.ndarray | None:
    """The value path's gradient shape: E[dv_j·dv_l] = Σ_ik L_ij L_kl (a_ik + δ_jl
    (b_ik - a_ik)) H_ik."""
    tokens = counts.size
    h = np.eye(tokens) if h is None else h
    if h.shape[0] != tokens:
        return None
    a, extra = weights or pair_weights(counts, p2i, s2, r, keep)
    if causal_windows(counts):  # Σ over i ≥ j, k ≥ l: reversed 2-D cumulative sums
        out = gram_cumsum(np.multiply(a[::-1, ::-1], h[::-1, ::-1]))[::-1, ::-1]
    else:
        lmask = windows(counts)
        out = lmask.T @ (a * h) @ lmask
    # the shared-key term: key j is shared by queries i, k where j < min(T_i, T_k)
    keys = int(counts.max())
    out[np.diag_indices(keys)] += _shared_diag(extra * h, counts, keys)
    m = float(out.trace()) / keys
    if not m > 0 or not math.isfinite(m):
        return None
    return np.multiply(out, 1 / m)  # contiguous where out is the reversed sums' view


def _shared_diag(extra: np.ndarray, counts: np.ndarray, keys: int) -> np.ndarray:
    """Σ_{i,k: min(T_i, T_k) > j} extra_ik for every key j, by sorting the queries by
    their window: a suffix sum over the sorted matrix's lower-right blocks."""
    sorted_ = keyindex.index(counts)
    e = extra if sorted_.causal else extra[sorted_.order]  # causal: already sorted
    block = gram_diag_sums(e, reverse=True)  # S[m] = Σ_{i,k ≥ m} e_ik (sorted)
    # the first sorted query whose window exceeds j (the index's keys: up to max T_i)
    if sorted_.first.size != keys:
        c = np.sort(counts)
        first = np.searchsorted(c, np.arange(keys), side="right")
        return np.where(first < c.size, block[np.minimum(first, c.size - 1)], 0.0)
    return np.where(sorted_.seen, block[sorted_.pick], 0.0)


def query_backward(h: np.ndarray | None, counts: np.ndarray, mi: np.ndarray
                   ) -> np.ndarray | None:
    """The query path: each query in proportion to its own gradient and its m_i."""
    diag = _grad_diag(h, counts.size)
    return None if diag is None else diagonal.normalized(diag * mi)


def key_backward(h: np.ndarray | None, counts: np.ndarray, mi: np.ndarray
                 ) -> np.ndarray | None:
    """The key path: key j by the queries that read it, Σ_i L_ij (m_i/T_i) H_ii."""
    diag = _grad_diag(h, counts.size)
    return None if diag is None else diagonal.normalized((diag * mi / counts) @ windows(counts))


def _grad_diag(h: np.ndarray | None, tokens: int) -> np.ndarray | None:
    """Each token's gradient scale from the gradient's Gram (None: tokens alike), or
    None where the Gram has another number of tokens."""
    diag = np.ones(tokens) if h is None else np.diag(h)
    return diag if diag.size == tokens else None


def prefix_shares(s: np.ndarray | None, counts: np.ndarray, sums: np.ndarray | None = None
                  ) -> tuple[float, float] | None:
    """(u, w) as attention_stats.prefix_share measures them: u = mean_i |x̄_i|²/E[x²] over
    the windows, w = mean_i u_i / i (``sums``: gram_window_diag(s, counts) where known)."""
    if s is None or s.shape[0] != counts.size:
        return None
    means = (gram_window_diag(s, counts) if sums is None else sums) / counts ** 2
    scale = float(np.trace(s)) / s.shape[0]
    return float(mean(means) / scale), float(mean(means / counts) / scale)


def gradient_u(h: np.ndarray | None, counts: np.ndarray, causal: bool) -> float | None:
    """u = mean_j (Σ_i p̄_ij g_i)²/E[g²] for flat attention p̄ (gradient_stats)."""
    if h is None or h.shape[0] != counts.size:
        return None
    if causal and causal_windows(counts):  # Σ_{i,k ≥ j} H_ik / (T_i T_k): reversed cumsums
        # the L-shaped steps of the symmetric H/(T_i T_k) (gram_diag_sums), weighed in
        # one pass: H_mm/T_m² + 2 Σ_{k>m} H_mk/(T_m T_k)
        step = np.einsum("ij,ij->i", h, keyindex.gradient_weights(counts))
        step += np.diag(h) / counts ** 2
        return float(mean(step[::-1].cumsum()) / mean(np.diag(h)))
    if causal:
        flat = windows(counts) / counts[:, None]
        return float(np.mean(np.einsum("ij,ik,kj->j", flat, h, flat)) / np.mean(np.diag(h)))
    return float(mean(h) / mean(np.diag(h)))


# --- rotary positions ----------------------------------------------------------------
def rotary(s: np.ndarray | None, module: nn.Module | None, dim: int) -> np.ndarray | None:
    """q·cos + rotate_half(q)·sin at positions 0..T-1: features i.i.d. across the pairs,
    so E[q'_i·q'_j] = G_ij mean_f cos((i - j) θ_f)."""
    if s is None:
        return None
    theta = _frequencies(module, dim)
    if theta is None:
        return None
    pos = np.arange(s.shape[0], dtype=np.float64)
    gap = pos[:, None] - pos[None, :]
    turn = np.cos(gap[..., None] * theta[None, None, :]).mean(-1)
    return normalized(s * turn)[0]


def _frequencies(module: nn.Module | None, dim: int) -> np.ndarray | None:
    inv = getattr(module, "inv_freq", None) if module is not None else None
    if isinstance(inv, torch.Tensor) and not inv.is_meta and inv.numel():
        return inv.detach().double().cpu().numpy()
    config = getattr(module, "config", None)
    base = getattr(config, "rope_theta", None) or getattr(module, "base", None) or 10000.0
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and rope.get("rope_theta"):
        base = rope["rope_theta"]
    if dim < 2:
        return None
    return 1.0 / float(base) ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def blend(a: np.ndarray | None, wa: float, b: np.ndarray | None, wb: float
          ) -> np.ndarray | None:
    """Two independent gradients' Grams added (weights their variances); one without a
    Gram is alike and uncorrelated."""
    if a is None and b is None:
        return None
    if a is None:  # the sum is symmetric: the one with a Gram first
        a, wa, b, wb = b, wb, a, wa
    if b is not None and a.shape != b.shape or not wa + wb > 0:
        return None
    if b is not None and diagonal.marked(a) and not diagonal.marked(b):
        a, wa, b, wb = b, wb, a, wa  # wa a + wb b, the diagonal one second
    w = wb / (wa + wb)
    if b is not None and not diagonal.marked(b):
        return gramfold.lerp(a, b, w)  # (1 - w) a + w b in one pass
    out = a * (wa / (wa + wb))
    # b = None (I) or diagonal: w b off the diagonal adds zeros, on the diagonal only
    out.flat[::a.shape[0] + 1] += w if b is None else w * np.diag(b)
    return out


def query_factor(sv: np.ndarray | None, rv: float, sk: np.ndarray | None, rk: float,
                 counts: np.ndarray, mi: np.ndarray, r: float, f: float,
                 coherent: float, sums: tuple | None = None) -> float | None:
    """The query path's factor X (attention_stats.query_path: what a probe measures at
    the actual init) from the values' and keys' Grams: for query i over its window,
    Σ_jl (v_j - v̄_i)·(v_l - v̄_i) k_j·k_l / T_i² = F_i, which for tokens alike is
    (1 - r)(1 - r_k)(T_i - 1)/T_i²; the closed form's (1 - r_k) f m_i becomes
    m_i F_i T_i² f / ((T_i - 1)(1 - r)), plus the coherent term as before. ``sums``: the
    two Grams' gram_window_diag where known."""
    tokens = counts.size
    if int(counts.max()) != tokens:
        return None
    g = implied(rv, tokens) if sv is None else sv
    k = implied(rk, tokens) if sk is None else sk
    if g.shape != (tokens, tokens) or k.shape != g.shape or r >= 1:
        return None
    s1 = gram_window_diag(g * k, counts)
    rg = row_window_sums(g, counts)  # column i: window i's sums
    rg *= rg if k is g else row_window_sums(k, counts)
    s2 = column_window_sums(rg, counts) / counts
    wg, wk = sums or (gram_window_diag(g, counts), gram_window_diag(k, counts))
    s3 = wg * wk / counts ** 2
    many = counts > 1
    x = np.zeros(tokens)
    x[many] = (s1 - 2 * s2 + s3)[many] / (counts[many] - 1)
    return float(mean(mi * x) * f / (1 - r) + (1 - r) * coherent)
