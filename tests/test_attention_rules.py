"""Attention's closed forms (varprobe.theory.attention) against Monte Carlo.

Each case builds real attention in torch float64 (bench/accuracy/attention.py: x with
token correlation r, random projections, softmax(QK^T/sqrt(d_k)), causal mask,
autograd) over SEEDS independent draws of weights and data, and compares the seed mean
with the prediction in log space: |log(measured/predicted)| <= log(1 + delta) + 3 se.

* delta, the rule's own error, is what attention.md §3.4 measured for its forms
  (numpy, n = 256, d_k = 64): forward within 5% for s_e^2 <= 1, backward within 5% when
  T <= n/2. §3.4's causal exceptions (-11% forward, -17% backward at s^2 = 1) came from
  the lognormal P2 and from m = P2(1-P2); the module computes both exactly, so the 5%
  holds there too. The separate gradient paths also drop O(s^2/d_k) terms (p^2 tilts
  q_i towards k_j: Gaussian integration by parts gives 2-4 s_e^2/d_k), hence
  delta = 5% + 4 s_e^2/d_k for E[dv^2], E[dq^2], E[dk^2].
* se, the sampling noise: the standard error over the seeds, sd/sqrt(SEEDS), and never
  below the chi-square noise of the value weights, sqrt(2/(n d_k H SEEDS)) (theory.md §10:
  the realised E[w^2] of n d_k H entries), which every seed carries.

The same bound rejects the forms the module replaced (the uniform limit, §3.4's
lognormal P2 and m, the query path without its coherent term, §3.2's dropout factor),
so the checks can fail.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from bench.accuracy.attention import measure, predict
from varprobe.theory import attention

SEEDS, TOKENS = 4, 2048
FORWARD_DELTA = 0.05    # attention.md §3.4, s_e^2 <= 1
BACKWARD_DELTA = 0.05   # attention.md §3.4, T <= n/2


def _grid() -> list[dict]:
    out = []
    for s2 in (0.1, 0.25, 1.0):
        for T in (16, 64):
            for causal in (False, True):
                for r in (0.0, 0.3):
                    n, d_k = ((128, 32), (256, 64))[len(out) % 2]
                    out.append({"s2": s2, "T": T, "causal": causal, "r": r, "n": n, "d_k": d_k})
    return out


GRID = _grid()
EXTRA = [  # gradient correlation, dropout (with P2 large), two heads, a sliding window
    {"s2": 1.0, "T": 64, "causal": False, "r": 0.3, "n": 128, "d_k": 32, "r_g": 0.3},
    {"s2": 0.25, "T": 64, "causal": True, "r": 0.3, "n": 128, "d_k": 32, "r_g": 0.3},
    {"s2": 1.0, "T": 4, "causal": False, "r": 0.5, "n": 128, "d_k": 32, "dropout": 0.5},
    {"s2": 1.0, "T": 64, "causal": True, "r": 0.3, "n": 128, "d_k": 32, "dropout": 0.2},
    {"s2": 1.0, "T": 64, "causal": False, "r": 0.0, "n": 128, "d_k": 32, "heads": 2},
    {"s2": 1.0, "T": 64, "causal": True, "r": 0.0, "n": 128, "d_k": 32, "window": 8},
]
ALL = GRID + EXTRA


def _id(case: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in case.items())


@functools.cache
def _measured(index: int) -> tuple[dict, dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return measure(ALL[index], SEEDS, TOKENS)
    finally:
        torch.set_num_threads(threads)


def _noise(case: dict, se: float) -> float:
    floor = math.sqrt(2 / (case["n"] * case["d_k"] * case.get("heads", 1) * SEEDS))
    return 3 * max(se, floor)


def _off(measured: float, predicted: float) -> float:
    return abs(math.log(measured / predicted))


@functools.cache
def _predicted(index: int, method: str) -> dict:
    return predict(**ALL[index], method=method)


def _within(case: dict, quantity: str, delta: float, method: str = "gaussian"):
    index = ALL.index(case)
    mean, se = _measured(index)
    pred = _predicted(index, method)[quantity]
    return _off(mean[quantity], pred), math.log1p(delta) + _noise(case, se[quantity])


def _path_delta(case: dict) -> float:
    return BACKWARD_DELTA + 4 * (1 - case["r"]) * case["s2"] / case["d_k"]


@pytest.mark.parametrize("case", ALL, ids=_id)
def test_forward_second_moment(case):
    off, bound = _within(case, "z2", FORWARD_DELTA)
    assert off <= bound, (off, bound)


@pytest.mark.parametrize("case", ALL, ids=_id)
def test_backward_through_projections(case):
    off, bound = _within(case, "dx", BACKWARD_DELTA)
    assert off <= bound, (off, bound)


@pytest.mark.parametrize("case", ALL, ids=_id)
def test_gradient_paths(case):
    for quantity in ("dv", "dq", "dk", "ds"):
        off, bound = _within(case, quantity, _path_delta(case))
        assert off <= bound, (quantity, off, bound)


@pytest.mark.parametrize("case", [c for c in ALL if "window" not in c], ids=_id)
def test_output_token_correlation(case):
    # r_out is a ratio of two second moments, each within the forward delta. (A sliding
    # window has no nested key sets: the pair overlap there is not 1/max(T_i, T_k).)
    off, bound = _within(case, "r_out", 2 * FORWARD_DELTA)
    assert off <= bound, (off, bound)


@pytest.mark.parametrize("case", ALL, ids=_id)
def test_participation_is_exact_for_gaussian_logits(case):
    # Exact up to the query-norm spread beyond second order, O(s^4 (2/d_k)^2) < 1%.
    off, bound = _within(case, "p2", 0.01)
    assert off <= bound, (off, bound)


def test_uniform_limit_is_rejected_where_attention_is_not_flat():
    # §3.4: r + (1-r)/T is off 1.3x at s^2 = 0.25 and 3x at s^2 = 1.
    for case in (c for c in GRID if c["s2"] == 1.0 and c["r"] == 0.0):
        for quantity in ("z2", "dx"):
            off, bound = _within(case, quantity, BACKWARD_DELTA, method="uniform")
            assert off > bound, (case, quantity, off, bound)


def test_lognormal_participation_is_rejected_on_short_rows():
    # §3.1's e^s/(e^s+T-1) and §3.3's m = P2(1-P2), at s^2 = 1 with 16 keys (or causal
    # rows, most of them short): about -13% forward and -22% backward.
    for case in (c for c in GRID if c["s2"] == 1.0 and c["T"] == 16 and c["r"] == 0.0):
        for quantity, delta in (("z2", FORWARD_DELTA), ("dx", BACKWARD_DELTA)):
            off, bound = _within(case, quantity, delta, method="lognormal")
            assert off > bound, (case, quantity, off, bound)
            assert _within(case, quantity, delta)[0] < off / 3


def test_query_path_needs_its_coherent_term():
    # Without n the coherent (1-r)^2 (1-P2)^2/n term goes: E[dq^2] is ~T/n = 50% low here.
    case = next(c for c in GRID if c["T"] == 64 and c["n"] == 128 and c["s2"] == 0.1)
    mean, se = _measured(ALL.index(case))
    q = math.sqrt(case["s2"])
    common = (1.0, 1.0, q, q, case["d_k"], case["T"])
    kw = {"r": case["r"], "causal": case["causal"]}
    bound = math.log1p(_path_delta(case)) + _noise(case, se["dq"])
    assert _off(mean["dq"], attention.backward(*common, n=case["n"], **kw).query) <= bound
    assert _off(mean["dq"], attention.backward(*common, **kw).query) > bound


def test_dropout_multiplies_the_shared_part_too():
    # §3.2's r + (1-r) P2/(1-p) against r + P2 (1/(1-p) - r): 21% apart at T = 4, r = 0.5.
    case = next(c for c in EXTRA if c.get("dropout") == 0.5)
    mean, se = _measured(ALL.index(case))
    pred = predict(**case)
    r, p = case["r"], case["dropout"]
    doc = pred["z2"] - pred["p2"] * (1 / (1 - p) - r) + (1 - r) * pred["p2"] / (1 - p)
    assert _off(mean["z2"], doc) > math.log1p(FORWARD_DELTA) + _noise(case, se["z2"])


def test_gradient_correlation_adds_a_coherent_key_term():
    case = EXTRA[0]
    mean, se = _measured(ALL.index(case))
    without = predict(**{**case, "r_g": 0.0})["dk"]
    assert _off(mean["dk"], without) > math.log1p(_path_delta(case)) + _noise(case, se["dk"])


# ---------------------------------------------------------------------------
# The pieces, without Monte Carlo of the whole layer
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("v", [0.25, 1.0, 2.0])
@pytest.mark.parametrize("T", [2, 16])
def test_softmax_moments_against_sampling(v, T):
    rng = np.random.default_rng(7)
    rows = 40_000
    x = rng.standard_normal((rows, T)) * math.sqrt(v)
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    samples = {"p2": (p**2).sum(1), "p3": (p**3).sum(1), "p22": (p**2).sum(1) ** 2}
    for got, (name, s) in zip(attention.softmax_moments(v, np.array([T])), samples.items()):
        se = s.std() / math.sqrt(rows) / s.mean()
        assert _off(s.mean(), got[0]) <= 4 * se + 1e-3, name


@pytest.mark.parametrize("T", [2, 32])
def test_saturated_softmax_moments_against_sampling(T):
    # Past v = 1600 the moments are scaled, not integrated: 1 - P2 and m fall as 1/sqrt(v).
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40_000, T)) * 80.0  # v = 6400
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p2, p3, p22 = (a[0] for a in attention.softmax_moments(6400.0, np.array([T])))
    want = (p**2).sum(1)
    m = ((p**2) * (1 - 2 * p)).sum(1) + want**2
    assert _off(want.mean(), p2) < 0.01
    assert _off(m.mean(), p2 - 2 * p3 + p22) <= 4 * m.std() / m.mean() / math.sqrt(40_000) \
        + 0.02


def test_softmax_moments_limits():
    p2, p3, p22 = attention.softmax_moments(1e-6, np.array([1, 7, 300]))
    np.testing.assert_allclose(p2, [1, 1 / 7, 1 / 300], rtol=1e-5)
    p2, _, _ = attention.softmax_moments(3.0, np.array([1]))
    assert abs(p2[0] - 1) < 1e-6


def _hermite_moments(v: float, T: int, n: int) -> np.ndarray:
    """E[sum p^2], E[sum p^3], E[(sum p^2)^2] of a softmax over T i.i.d. N(0, v) logits by
    n-node Gauss-Hermite in each of the T dimensions: another quadrature altogether."""
    z, w = np.polynomial.hermite_e.hermegauss(n)
    x = np.stack(np.meshgrid(*([z * math.sqrt(v)] * T), indexing="ij"), -1)
    weight = np.prod(np.stack(np.meshgrid(*([w / w.sum()] * T), indexing="ij"), -1), -1)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    s2, s3 = (p**2).sum(-1), (p**3).sum(-1)
    return np.array([(weight * s2).sum(), (weight * s3).sum(), (weight * s2**2).sum()])


@pytest.mark.parametrize("T", [2, 3])
@pytest.mark.parametrize("v", [0.01, 0.3, 1.0, 4.0])
def test_softmax_moments_against_gauss_hermite(v, T):
    # softmax_moments' trapezoid rule claims 1e-10; the reference's error is bounded by
    # the gap between two of its node counts (1e-16 to 2e-10 here)
    fine, finer = (_hermite_moments(v, T, n) for n in ((120, 150) if T == 2 else (90, 120)))
    gap = np.max(np.abs(fine / finer - 1))
    got = np.array([a[0] for a in attention.softmax_moments(v, np.array([float(T)]))])
    assert np.max(np.abs(got / finer - 1)) <= 1e-10 + gap


@pytest.mark.parametrize("v", [0.05, 1.0, 4.0, 10.0])
def test_long_causal_key_counts_interpolate_within_their_bound(v):
    # Every count up to 32 is computed; past it a log grid of ratio 1.015, linear in
    # log T: for P2 ~ 1/T the relative error is at most (log 1.015)^2 / 8 = 2.8e-5.
    counts = tuple(range(1, 2049))
    p2, m = attention._spread_moments(v, 0.0, counts)
    e2, e3, e22 = attention.softmax_moments(v, np.array(counts, float))
    assert np.max(np.abs(p2 / e2 - 1)) < 2.8e-5
    assert np.max(np.abs(m[1:] / (e2 - 2 * e3 + e22)[1:] - 1)) < 2.8e-5  # m = 0 at T = 1
    assert np.array_equal(attention._knots(np.array(counts[:32], float)), counts[:32])


def test_participation_forms():
    T = 256
    harmonic = sum(1 / i for i in range(1, T + 1))
    assert attention.participation(0.7, 0.0, T, causal=True, method="uniform") == \
        pytest.approx(harmonic / T)
    # §3.6's worked example: s^2 = 0.25, T = 32 gives 0.0398.
    assert attention.participation(0.25, 0.0, 32, method="lognormal") == pytest.approx(0.0398, 1e-3)
    assert attention.participation(0.25, 0.0, 32) == pytest.approx(0.0398, 0.02)
    assert attention.participation(1.0, 0.2, attention.causal_keys(T)) == pytest.approx(
        attention.participation(1.0, 0.2, T, causal=True), rel=1e-12)
    # Per-query counts: a key-padding mask of 20 keys is a row of 20s.
    assert attention.participation(1.0, 0.2, [20] * 5) == pytest.approx(
        attention.participation(1.0, 0.2, 20), rel=1e-12)
    with pytest.raises(ValueError):
        attention.key_counts([3, 0])
    with pytest.raises(ValueError):
        attention.key_counts([3, 4], causal=True)


def test_worked_example_transformer_block():
    # attention.md §3.6: q_v = 0.5, s^2 = 0.25, r = 0.001, T = 32, d = 128 -> E[z^2] ~ 0.021.
    fwd = attention.forward(0.5, 0.25, 0.001, 32, n=128, d_k=32)
    assert fwd.second_moment == pytest.approx(0.021, rel=0.05)
    assert attention.forward(0.5, 0.25, 0.001, 32, method="uniform").second_moment == \
        pytest.approx(0.5 * (0.001 + 0.999 / 32))


def test_logit_variance_and_saturation():
    assert attention.logit_variance(1.0, 1.0, 64) == pytest.approx(1.0)
    assert attention.logit_variance(0.5, 0.5, 64, scale=1 / 64) == pytest.approx(0.25 / 64)
    assert not attention.saturated(1.5)
    assert attention.saturated(1.6)
    assert not attention.saturated(2.0, r=0.5)


def test_token_correlation_estimator():
    g = torch.Generator().manual_seed(3)
    B, T, D, r = 512, 32, 64, 0.4
    x = math.sqrt(r) * torch.randn(B, 1, D, generator=g, dtype=torch.float64) \
        + math.sqrt(1 - r) * torch.randn(B, T, D, generator=g, dtype=torch.float64)
    q = (x**2).mean().item()
    s1 = (x.sum(1) ** 2).mean().item()
    # Unbiased up to the noise of B D shared parts: sd of r^ ~ r sqrt(2/(B D)).
    tol = 4 * r * math.sqrt(2 / (B * D))
    assert attention.token_correlation(s1, q, T) == pytest.approx(r, abs=tol)
    with pytest.raises(ValueError):
        attention.token_correlation(1.0, 1.0, 1)
    assert math.isnan(attention.token_correlation(0.0, 0.0, 4))


@pytest.mark.parametrize("rel", [0.0158, 0.07, 0.2])
@pytest.mark.parametrize("k", [-40, 0, 25])
def test_spread_on_the_grid_equals_a_fine_gauss_hermite_average(rel, k):
    # _spread_at sums the lognormal factor's Gaussian (in log se2) on the STEP grid
    # itself; at sig >= 2 grid steps its aliasing is below 1e-30, so what is left is
    # the reference's: 21-point Gauss-Hermite, whose own truncation is far below the
    # 1e-8 allowed (the 3-point rule _spread_moments uses is up to 1e-4 off it).
    counts = tuple(range(1, 129))
    sig = math.sqrt(math.log1p(rel))
    knots = attention._knots(np.array(counts, float))
    z, wz = np.polynomial.hermite_e.hermegauss(21)
    p2 = p3 = p22 = 0.0
    for zi, wi in zip(z, wz / wz.sum()):
        a, b, c = attention.softmax_moments(
            attention.STEP ** k * math.exp(sig * zi - sig * sig / 2), knots)
        p2, p3, p22 = p2 + wi * a, p3 + wi * b, p22 + wi * c
    want = attention._per_count(np.array(counts, float), knots, p2, p2 - 2 * p3 + p22)
    got = attention._spread_at(k, rel, counts)
    assert np.max(np.abs(got[0] / want[0] - 1)) < 1e-8
    assert np.max(np.abs(got[1][1:] / want[1][1:] - 1)) < 1e-8  # m = 0 at T = 1


def test_spreads_of_many_widths_share_the_grid_quadratures():
    # A deep stack's tokens' width moves rel = 2/d_k + 2/n a little at every layer; the
    # grid sum needs softmax_moments only at the grid points within 8 sd of se2, so 50
    # widths cost what one does: 2 ceil(8 sig/h) + 2 quadratures, not 3 per width.
    attention._spread_at.cache_clear()
    attention._grid_moments.cache_clear()
    widths = range(12000, 12400, 8)
    for n in widths:
        attention.participation(1.3, 0.1, 64, causal=True, d_k=128, n=n)
    sig = math.sqrt(math.log1p(2 / 128 + 2 / widths[0]))
    reach = math.ceil(8 * sig / math.log(attention.STEP))
    assert attention._grid_moments.cache_info().misses <= 2 * reach + 2
