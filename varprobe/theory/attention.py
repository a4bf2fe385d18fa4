"""Second moments through softmax attention at initialization: closed forms.

Pure functions of numbers (no hooks, no tensors). One head: x (T x n, E[x^2] = q_x,
uncentered token correlation r) is projected to q, k, v (d_k wide; per-entry second
moments q_q, q_k, q_v), the logits are c q_i.k_j with c = 1/sqrt(d_k) by default, and
z_i = sum_j p_ij v_j with p = softmax over the keys query i may see (T_i of them: T,
or i when causal, or a padding mask's count). Heads are independent and add.

Sections cited are those of the research note attention.md, with these corrections,
each checked by Monte Carlo (tests/test_attention_rules.py, bench/accuracy/attention.py):

* P2 = E[sum_j p_ij^2] (§3.1) is computed exactly for Gaussian logits (a Laplace
  transform and a 2-D quadrature) and averaged over the per-query spread of the logit
  variance (chi-square in d_k and n). The lognormal form e^{s_e^2}/(e^{s_e^2}+T_i-1) is
  kept as ``method="lognormal"``: at s^2 = 1 it is 7% high for T = 64, 16% for T = 16
  and 21% for T = 4 (hence §3.4's -11% causal: early queries see few keys).
* m (§3.3) is E[sum_j p_j^2 (1 - 2 p_j + P2)]; P2 (1 - P2) is 16% high at s^2 = 1,
  T = 64 and 39% at T = 16.
* The query gradient has a coherent finite-width term (1-r)^2 (1-P2)^2 / n next to m
  (Stein's lemma on E[v|k]): +45% on E[dq^2] at T = 64, n = 128; §3.4's "T/n" error.
* Attention dropout multiplies the whole diagonal, shared part included:
  r + P2 (1/(1-p) - r), not r + (1-r) P2/(1-p).
* Gradient token correlation r_g adds r_g r (1-r) times the query-pair overlap to
  E[dk^2] (queries that share a direction push a key coherently).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from varprobe.theory import keyindex, overlap

# Above this effective logit variance (1-r) s^2 attention heads towards one-hot at init
# (entropy collapse, attention.md §3.5): sum p^2 is set by the few largest logits, so by
# the tails of the logit distribution, which only Gaussian weights make Gaussian (RoPE,
# QK-norm or trained weights need not), the softmax Jacobian and with it the query and
# key gradients shrink, and §3.4 measured the lognormal forms 20% (forward) and 29%
# (backward) off at s^2 = 1.5 causal. §3.6 tier 1 flags the layer there. (With Gaussian
# weights the forms here still hold to 4% at s_e^2 = 2: bench/accuracy/attention.py.)
SATURATED_SPREAD = 1.5
STEP = 1.05   # the log grid _interpolated evaluates P2 and m on
GRID_SD = 2.0  # a logit-variance spread this many grid steps wide is summed on the grid
FLAT = 1e-8   # a logit spread below this is the uniform limit
ONE_HOT = 1600.0  # a logit variance past which softmax_moments scales, not integrates
DX, DU = 0.25, 0.2  # softmax_moments' largest trapezoid steps in x and u (logit units)
DENSE = 32    # key counts up to this are computed one by one...
KNOT = 1.015  # ...and past it on a log grid of this ratio, interpolated in log T

Keys = int | Sequence[int]


class Forward(NamedTuple):
    second_moment: float   # E[z^2] per entry of the head output
    correlation: float     # r_out, uncentered token correlation of z
    participation: float   # P2, mean over queries of E[sum_j p_ij^2]


class Backward(NamedTuple):
    value: float           # E[dv^2]
    query: float           # E[dq^2]
    key: float             # E[dk^2]
    input: float | None    # E[dx^2] through the three projections (all heads), or None
    logit: float = 0.0     # E[dS^2] per logit entry (masked ones included)


def mean(x: np.ndarray) -> np.float64:
    """np.mean(x) to the bit (the same sum over the same count) without its Python
    overhead: the walks take thousands of means of a few dozen numbers."""
    return x.sum() / x.size


def logit_variance(q_q: float, q_k: float, d_k: int, scale: float | None = None) -> float:
    """s^2 = c^2 d_k q_q q_k, c = 1/sqrt(d_k) unless given (§3.1)."""
    c = 1 / math.sqrt(d_k) if scale is None else scale
    return c * c * d_k * q_q * q_k


def capped_scale(q_q: float, q_k: float, d_k: int, scale: float | None,
                 cap: float | None) -> float | None:
    """The logit scale under a soft cap c·tanh(s/c) (Gemma 2): the plain scale times
    sqrt(E[(c tanh(s/c))^2] / s^2), s ~ N(0, s^2) (Gauss-Hermite), so that the closed
    forms see the capped logits' variance. Exact to first order in s^2/c^2 both ways:
    the capped variance is s^2 (1 - 2 s^2/c^2 + ...), and the logits' gradient carries
    tanh'(s/c)^2 = sech^4, whose mean is 1 - 2 s^2/c^2 + ... too. Past the linear range
    (s ~ c) the capped logits are taken as Gaussian of their own variance."""
    c = 1 / math.sqrt(d_k) if scale is None else scale
    s2 = logit_variance(q_q, q_k, d_k, scale)
    if cap is None or not s2 > 0 or not math.isfinite(s2):
        return scale
    z, w = _HERMITE
    capped = float(w @ (cap * np.tanh(math.sqrt(s2) * z / cap)) ** 2)
    return c * math.sqrt(capped / s2)


_HERMITE = (lambda z, w: (z, w / w.sum()))(*np.polynomial.hermite_e.hermegauss(40))


def saturated(s2: float, r: float = 0.0) -> bool:
    """Whether the effective spread (1-r) s^2 exceeds SATURATED_SPREAD (§3.6 tier 1)."""
    return (1 - r) * s2 > SATURATED_SPREAD


def causal_keys(T: int) -> range:
    """Keys seen by each query under a causal mask: 1, 2, ..., T."""
    return range(1, T + 1)


def key_counts(keys: Keys, causal: bool = False) -> np.ndarray:
    """Per-query key counts T_i: T for every query, 1..T when causal, or as given."""
    if isinstance(keys, (int, np.integer)):
        return _counts(int(keys), bool(causal)).copy()  # a deep stack asks it again and again
    if causal:
        raise ValueError("causal=True takes the sequence length, not per-query counts")
    else:
        counts = np.asarray(keys)
    if counts.size == 0 or counts.min() < 1:
        raise ValueError("every query needs at least one key")
    return counts.astype(float)


@functools.lru_cache(maxsize=64)
def _counts(keys: int, causal: bool) -> np.ndarray:
    counts = np.arange(1, keys + 1) if causal else np.full(keys, keys)
    if counts.size == 0 or counts.min() < 1:
        raise ValueError("every query needs at least one key")
    return counts.astype(float)


def softmax_moments(v: float, counts: np.ndarray) -> tuple[np.ndarray, ...]:
    """E[sum p^2], E[sum p^3], E[(sum p^2)^2] for p = softmax of len-T i.i.d. N(0, v)
    logits, for each T in counts.

    1/S^k = int t^{k-1} e^{-tS} dt / (k-1)! with S = sum_j e^{x_j} turns each moment into
    int A(u) L(u)^{T-1} du over u = -log t, with L(u) = E[exp(-e^{x-u})] and
    A_k(u) = E[e^{k(x-u)} exp(-e^{x-u})]: both Gaussian smoothings of smooth functions,
    done by the trapezoid rule, spectrally accurate: its aliasing falls like
    e^{-2 pi^2 s^2/dx^2} for the Gaussian and like e^{-pi^2/dx} for the double
    exponential, so steps of s/4 and at most DX logit units in x and DU in u are within
    1e-10 of a 10x finer grid (v from 1e-9 to 40, T <= 4096), at a tenth to half of the
    points of the 361 x (600 + 40 s) grid, which larger v keep (within 3e-10 at v = 200).
    """
    counts = np.asarray(counts, float)
    if v < 1e-10:
        return 1 / counts, 1 / counts**2, 1 / counts**2
    if v > ONE_HOT:
        # Past it the quadrature's grid grows with sqrt(v) to no use: 1 - P2, 1 - P3,
        # 1 - P22 (and so m) fall as 1/sqrt(v), the chance that the top two logits of T
        # lie within O(1) of each other (Monte Carlo at v = 6400: P2 and m within 1%).
        k = math.sqrt(ONE_HOT / v)
        return tuple(1 - (1 - a) * k for a in _at_one_hot(counts.tobytes()))
    s = math.sqrt(v)
    x = np.linspace(-9, 9, min(361, math.ceil(18 * s / min(s / 4, DX)) + 1)) * s
    px = np.exp(-0.5 * (x / s) ** 2)
    px /= px.sum()
    # the integrand in u is O(1) wide at any s
    lo, hi = -9 * s - 8, 9 * s + math.log(counts.max()) + 40
    u = np.linspace(lo, hi, min(600 + int(40 * s), math.ceil((hi - lo) / DU) + 1))
    # e^(x - u) as the outer product e^-u e^x (a thousand exps, not a matrix of them),
    # capped at e^700 (e^-w is 0 past it anyway; the product can overflow there); in
    # place where a matrix is not read again (the same products, fewer copies)
    with np.errstate(over="ignore"):
        w = np.multiply.outer(np.exp(-u), np.exp(x))
    np.minimum(w, math.exp(700.0), out=w)
    e = np.exp(np.negative(w))
    # w^k e^-w, k = 2..4, by products (w capped where e^-w is 0 anyway: no inf * 0)
    np.minimum(w, 800.0, out=w)
    we2 = w * w
    we2 *= e
    wk = we2 * w
    a2, a3 = we2 @ px, wk @ px
    wk *= w
    a4 = wk @ px
    l_u = np.maximum(e @ px, 1e-300)
    du = u[1] - u[0]
    # L^(T-2) by exps, L^(T-1) from it by one product (L^0 = 1 where T = 1)
    lt2 = np.exp(np.outer(np.maximum(counts - 2, 0), np.log(l_u)))
    lt = lt2 * l_u
    lt[counts == 1] = 1.0
    p2 = counts * (lt @ a2) * du
    p3 = counts * (lt @ a3) * du / 2
    p22 = (counts * (lt @ a4) + counts * (counts - 1) * (lt2 @ a2**2)) * du / 6
    return p2, p3, p22


@functools.lru_cache(maxsize=64)
def _at_one_hot(counts: bytes) -> tuple[np.ndarray, ...]:
    """softmax_moments at ONE_HOT, which every larger variance scales: once per set of
    counts (a saturated stack's grid points past it would each redo it)."""
    return softmax_moments(ONE_HOT, np.frombuffer(counts))


def _moments(s2, r, counts, method, d_k, n):
    """Per-query (P2, m) with m = E[sum_j p_j^2 (1 - 2 p_j + P2)] (§3.3's m, exactly)."""
    se2 = (1 - r) * s2
    if method == "uniform":
        return 1 / counts, (counts - 1) / counts**2
    if method == "lognormal":
        p2 = math.exp(se2) / (math.exp(se2) + counts - 1)
        return p2, p2 * (1 - p2)
    if method != "gaussian":
        raise ValueError(f"method: 'gaussian', 'lognormal' or 'uniform', not {method!r}")
    # The logit variance of query i is s_e^2 |q_i|^2 |W_k q_i|^2 / E[...]: relative
    # variance 2/d_k + 2/n. Averaged over, as a lognormal factor.
    rel = (2 / d_k if d_k else 0.0) + (2 / n if n else 0.0)
    counts = np.asarray(counts)
    uniq, inv = _unique(counts.dtype.str, counts.shape, counts.tobytes())
    p2, m = _interpolated(float(se2), float(f"{rel:.4g}"), uniq)
    return p2[inv], m[inv]


@functools.lru_cache(maxsize=64)
def _unique(dtype: str, shape: tuple, data: bytes) -> tuple[tuple, np.ndarray]:
    """np.unique of the key counts (as a tuple) and where each count is in it: once per
    mask, not at each of a deep stack's calls and walks."""
    uniq, inv = np.unique(np.frombuffer(data, dtype).reshape(shape), return_inverse=True)
    inv.setflags(write=False)
    return tuple(uniq.tolist()), inv


def _interpolated(se2: float, rel: float, uniq: tuple) -> tuple[np.ndarray, np.ndarray]:
    """_spread_moments at se2, linear between the two points of a log grid (ratio
    STEP) around it: P2 and m are smooth in log se2, so the error is below 1e-5, and
    the layers of a deep stack, and the forward and backward of one call, share the
    grid points' quadratures (the cache)."""
    if se2 < FLAT:
        return _spread_moments(0.0, rel, uniq)
    k = math.floor(math.log(se2) / math.log(STEP))
    lo, hi = STEP ** k, STEP ** (k + 1)
    (p2a, ma), (p2b, mb) = _spread_at(k, rel, uniq), _spread_at(k + 1, rel, uniq)
    t = (se2 - lo) / (hi - lo)
    return p2a + t * (p2b - p2a), ma + t * (mb - ma)


@functools.lru_cache(maxsize=1024)
def _spread_at(k: int, rel: float, uniq: tuple) -> tuple[np.ndarray, np.ndarray]:
    """_spread_moments at the grid point se2 = STEP^k. The lognormal factor's average
    is a Gaussian in log se2 (sd sig, mean -sig^2/2); where sig spans GRID_SD grid steps
    or more, the trapezoid sum over the grid points themselves integrates it (a
    Gaussian sampled at sig/h >= 2 aliases at e^{-2 pi^2 sig^2/h^2} < 1e-30 relative,
    times a P2 or m that is smooth in log se2), so every spread, layer and walk shares
    the grid points' softmax quadratures: a 96-layer stack's walks, each with its own
    rel (the tokens' width moves it by the layer), need a few hundred of them instead
    of three per (grid point, rel) pair. Narrower, Gauss-Hermite as _spread_moments."""
    h = math.log(STEP)
    sig = math.sqrt(math.log1p(rel))
    if sig < GRID_SD * h:
        return _spread_moments(STEP ** k, rel, uniq)
    counts = np.array(uniq, float)
    knots = tuple(_knots(counts).tolist())
    reach = math.ceil(8 * sig / h)
    offsets = np.arange(-reach, reach + 1)
    weights = np.exp(-((offsets * h + sig * sig / 2) ** 2) / (2 * sig * sig))
    weights /= weights.sum()
    # the weighted sums over the grid points as one product (not a Python loop)
    rows = [_grid_moments(k + j, knots) for j in offsets.tolist()]
    p2, p3, p22 = (weights @ np.array(column) for column in zip(*rows))
    return _per_count(counts, np.array(knots), p2, p2 - 2 * p3 + p22)


@functools.lru_cache(maxsize=4096)
def _grid_moments(k: int, knots: tuple) -> tuple[np.ndarray, ...]:
    """softmax_moments at the grid point STEP^k, for every walk that reaches it."""
    return softmax_moments(STEP ** k, np.array(knots))


@functools.lru_cache(maxsize=1024)
def _spread_moments(se2: float, rel: float, uniq: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(P2, m) per key count, averaged over a lognormal logit-variance factor of mean 1
    and relative variance rel (Gauss-Hermite, 3 points up to rel = 0.07, d_k >= 32,
    within 2e-5 of 5; forward and backward share it)."""
    sig = math.sqrt(math.log1p(rel))
    z, wz = np.polynomial.hermite_e.hermegauss(1 if not rel else 3 if rel <= 0.07 else 5)
    counts = np.array(uniq, float)
    knots = _knots(counts)
    p2 = p3 = p22 = 0.0
    for zi, wi in zip(z, wz / wz.sum()):
        a, b, c = softmax_moments(se2 * math.exp(sig * zi - sig * sig / 2), knots)
        p2, p3, p22 = p2 + wi * a, p3 + wi * b, p22 + wi * c
    return _per_count(counts, knots, p2, p2 - 2 * p3 + p22)


def _per_count(counts: np.ndarray, knots: np.ndarray, p2: np.ndarray, m: np.ndarray,
               ) -> tuple[np.ndarray, np.ndarray]:
    """P2 and m at every count from their values at the knots."""
    if knots.size == counts.size:
        return p2, m
    # P2 and m fall off like 1/T: linear in log T between knots a ratio KNOT apart, the
    # relative error is at most (log KNOT)^2 / 8 = 2.8e-5 (a causal 2048-token layer
    # needs 312 quadrature columns instead of 2048)
    at, grid = np.log(counts), np.log(knots)
    return np.interp(at, grid, p2), np.interp(at, grid, m)


def _knots(counts: np.ndarray) -> np.ndarray:
    """The key counts the quadrature runs at: all of ``counts`` up to DENSE, then a log
    grid of ratio KNOT up to the largest. Grid points need not be integers: P2 and m
    are analytic in T (``softmax_moments`` raises L(u) to the power T - 1)."""
    top = counts.max()
    if counts.size <= DENSE or top <= DENSE:
        return counts
    grid = DENSE * KNOT ** np.arange(math.ceil(math.log(top / DENSE) / math.log(KNOT)))
    return np.unique(np.concatenate([counts[counts <= DENSE], grid[grid < top], [top]]))


def participation(s2: float, r: float, keys: Keys, causal: bool = False, *,
                  d_k: int | None = None, n: int | None = None,
                  method: str = "gaussian") -> float:
    """P2 averaged over queries (§3.1): E[sum_j p_ij^2] at effective spread (1-r) s^2.

    ``keys``: T (every query sees T keys; with causal=True query i sees i), or a
    per-query sequence of key counts (padding masks, windows). ``method``: "gaussian"
    (exact for Gaussian logits, averaged over the query-norm spread when d_k and/or
    the input width n are given), "lognormal" (§3.1's e^{s_e^2}/(e^{s_e^2}+T_i-1)) or
    "uniform" (1/T_i, the s^2 -> 0 limit).
    """
    return float(np.mean(_moments(s2, r, key_counts(keys, causal), method, d_k, n)[0]))


def _pairs(s2: float, r: float, counts: np.ndarray,
           window: int | None = None) -> tuple[float, float]:
    """Query-pair sums over i != k, divided by the number of queries N:
    (sum O_ik, sum O_ik (1 - 1/min(T_i, T_k))) with the overlap O_ik = E[sum_j p_ij p_kj].

    Key sets are nested (causal, key padding), so two queries share min(T_i, T_k) keys
    and O_ik ~ 1/max(T_i, T_k) (§3.2, last bullet), times the lognormal factor of the
    key-side logit part the two queries share (variance r (1-r) s^2; 1 at r = 0); past
    saturation, where that form sends every pair to one key, theory.overlap's. Under a
    sliding ``window`` (query i sees keys i - W + 1..i) two queries share s_ik of the
    smaller one's keys, and O_ik is s_ik/min(T_i, T_k) of the nested one (0 for queries
    W or more apart; 1/(T_i T_k) per shared key at flat attention, as nested).
    """
    counts = np.asarray(counts)
    if window is not None:
        t, below, spread = keyindex.window_pairs(counts.size, window)
    else:
        t, below, spread = keyindex.nested_pairs(counts.dtype.str, counts.tobytes())
    g = pair_overlap(s2, r, t)
    return 2 * float(g @ below) / t.size, 2 * float(g @ spread) / t.size


def pair_overlap(s2: float, r: float, t: np.ndarray) -> np.ndarray:
    """E[sum_j p_ij p_kj] of two queries over T keys, for each T in ``t``."""
    if saturated(s2, r):
        return overlap.overlaps((1 - r) * s2, r, t)
    e = math.exp(r * (1 - r) * s2)
    return e / (e + t - 1)


def forward(q_v: float, s2: float, r: float, keys: Keys, causal: bool = False,
            n: int | None = None, dropout: float = 0.0, *, d_k: int | None = None,
            method: str = "gaussian", window: int | None = None) -> Forward:
    """E[z^2] at the head output and its token correlation (§3.2, corrected):

    E[z^2] = q_v [r + P2 (1/(1-p) - r) + (1-r)^2 s^2 mean_i (1 - P2_i)^2 / n]

    The last (coupling) term is dropped when the input width n is unknown (an error of
    at most ~s^2/n relative to q_v). r_out = [r + (1-r) O] / (E[z^2]/q_v) with O the
    mean overlap of two queries' attention, ~1/max(T_i, T_k) (key sets nested, as with
    causal or key-padding masks; under a sliding ``window`` the keys they share, see
    _pairs; nan for one token). Multi-head:
    per head, then E[o^2] = H d_k sigma_o^2 E[z^2] (+ b_o^2) through the output projection.
    """
    counts = key_counts(keys, causal)
    p2i, _ = _moments(s2, r, counts, method, d_k, n)
    p2 = float(mean(p2i))
    z2 = r + p2 * (1 / (1 - dropout) - r)
    if n:
        z2 += (1 - r) ** 2 * s2 * float(mean((1 - p2i) ** 2)) / n
    tokens = counts.size
    if tokens < 2:
        return Forward(q_v * z2, math.nan, p2)
    overlap = _pairs(s2, r, counts, window)[0] / (tokens - 1)
    return Forward(q_v * z2, (r + (1 - r) * overlap) / z2, p2)


def backward(sigma_g2: float, q_v: float, q_q: float, q_k: float, d_k: int, keys: Keys, *,
             r: float = 0.0, r_g: float = 0.0, causal: bool = False,
             scale: float | None = None, heads: int = 1,
             weight_var: tuple[float, float, float] | None = None, n: int | None = None,
             dropout: float = 0.0, method: str = "gaussian",
             r_k: float | None = None, query_factor: float | None = None,
             row: int | None = None, r_q: float | None = None,
             window: int | None = None) -> Backward:
    """Gradient second moments of one self-attention head (§3.3, corrected).

    sigma_g2, r_g: E[g^2] and token correlation of the gradient at the head output z.
    With c the logit scale (``scale``, 1/sqrt(d_k) by default), f = 1/(1-p) - r, C the
    mean squared column sum of p and K the query-pair overlap sum (see _pairs):

    E[dv^2] = sigma_g^2 [r_g C + P2 (1/(1-p) - r_g)] (N/T_k)
    E[dq^2] = c^2 d_k sigma_g^2 q_v q_k [(1-r_k) f m + (1-r)^2 mean_i (1-P2_i)^2 / n]
    E[dk^2] = c^2 d_k sigma_g^2 q_v q_q [f m + (1-r) r_q r_g K] (N/T_k)

    per key: each key's gradients sum over the N queries that read it (N the length of
    ``keys`` given as per-query counts, T_k = ``row``: the largest count, or N under a
    sliding window), so a reduced key sequence (SegFormer's) or a cross-attention to a
    shorter context gets N/T_k times what the per-query sums give (autograd: 8x at
    N = 64, T_k = 8; tests/test_cross_attention.py); 1 in self-attention.

    ``weight_var`` = (sigma_q^2, sigma_k^2, sigma_v^2) per weight entry gives
    E[dx^2] = H d_k (sigma_v^2 E[dv^2] + sigma_q^2 E[dq^2] + sigma_k^2 E[dk^2]) (heads
    independent; §3.3's H d_k sigma_v^2 sigma_g^2 [P2 + s^2 (1-r)(2-r) m] when r_g = 0).
    n (the input width) adds the query path's coherent term; it is dropped when None.
    r_k (r by default) is the keys' correlation: the query path moves the query along
    sum_j p_ij (v_j - v̄_i) k_j, whose weights sum to 0, so the part the keys share
    cancels, (1 - r_k); rotary positions turn that part with the position, and a
    window's keys share less of it than the values do (attend.correlation).
    r_q (r_k by default) is the queries' correlation in the key path's query-pair term:
    key j is read by every query from j on, so the pairs span the sequence (the plain
    r of the rotated queries, which a probe takes from the keys: both are W x turned by
    the same angles).
    ``window``: a sliding window of that many keys (``keys`` its per-query counts): the
    query-pair terms count the keys two queries share (_pairs).
    ``logit``: E[dS^2] per entry of the logits, what an additive bias on them (T5's
    relative position bias) gets, = sigma_g^2 d_k q_v f m / T_k, T_k = ``row`` the
    length of a row of logits (the largest key count by default).
    ``query_factor`` replaces the query path's bracket with the one measured at the
    realized tokens (attention_stats.query_path; not under dropout, which it omits).
    """
    c2dk = (1 / d_k if scale is None else scale * scale) * d_k
    s2 = c2dk * q_q * q_k
    counts = key_counts(keys, causal)
    p2i, mi = _moments(s2, r, counts, method, d_k, n)
    p2, m = float(mean(p2i)), float(mean(mi))
    overlap, cross = _pairs(s2, r, counts, window)
    keep = 1 / (1 - dropout)
    # key j's gradients sum over the queries that read it: per key, N/T_k times the
    # per-query sums (N queries: as many as the counts; 1 in self-attention)
    row = row or (counts.size if window is not None else int(counts.max()))
    per_key = counts.size / float(row)
    dv = per_key * sigma_g2 * (r_g * (p2 + overlap) + p2 * (keep - r_g))
    f = keep - r
    coherent = (1 - r) * float(mean((1 - p2i) ** 2)) / n if n else 0.0
    r_k = r if r_k is None else r_k
    if query_factor is None or dropout:
        query_factor = (1 - r_k) * f * m + (1 - r) * coherent
    dq = c2dk * sigma_g2 * q_v * q_k * query_factor
    r_q = r_k if r_q is None else r_q
    # the pair term's dispersion |v_j - v̄_i|^2 is K's flat (1 - 1/T_i); at the actual
    # spread it is what m/P2 is to its flat value, -> 0 as p goes one-hot (the softmax
    # Jacobian vanishes: saturated attention sends the keys no gradient)
    flat = _flat(counts.tobytes())
    spread = (m / p2) / flat if p2 > 0 and flat > 0 else 1.0
    dk = per_key * c2dk * sigma_g2 * q_v * q_q * (f * m + (1 - r) * r_q * r_g * cross * spread)
    dx = None
    if weight_var is not None:
        var_q, var_k, var_v = weight_var
        dx = heads * d_k * (var_v * dv + var_q * dq + var_k * dk)
    # dS_ij = p_ij g_i.(v_j - v̄_i): per query sum_j E[dS_ij^2] = sigma_g^2 d_k q_v f m_i
    # (the query path without c k_j), spread over the T_k entries of its row
    logit = sigma_g2 * d_k * q_v * f * m / float(row)
    return Backward(dv, dq, dk, dx, logit)


@functools.lru_cache(maxsize=64)
def _flat(data: bytes) -> float:
    """mean((T_i - 1)/T_i²)/mean(1/T_i) of float key counts: once per mask."""
    counts = np.frombuffer(data, np.float64)
    return float(np.mean((counts - 1) / counts**2) / np.mean(1 / counts))


def token_correlation(sum_sq_of_token_sums_mean: float, second_moment: float, T: int) -> float:
    """r^ = (mean(S1^2)/T - E[x^2]) / ((T-1) E[x^2]), S1 the sum over the sequence axis
    (§3.6 item 3): E[S1^2] = T q + T(T-1) r q for tokens of second moment q."""
    if T < 2:
        raise ValueError("a token correlation needs T >= 2")
    if not second_moment > 0:
        return math.nan
    return (sum_sq_of_token_sums_mean / T - second_moment) / ((T - 1) * second_moment)
