"""The mean overlap of two queries' attention, E[sum_j p_ij p_kj], past saturation.

Query i's logits over the keys vary with variance (1 - r) s^2 (theory.attention: r the
tokens' correlation), and two queries' logits at one key are correlated by r: the
part q̄.k̃_j every query shares (variance r (1 - r) s^2) over the whole (1 - r) s^2.
The lognormal form e^{r(1-r)s^2}/(e^{r(1-r)s^2} + T - 1) (theory.attention._pairs)
holds while the softmax averages; past saturation ((1 - r) s^2 > 1.5) it sends every
pair of queries to one common key (-> 1), where each query's softmax picks its own
largest logit and two queries share it only as often as their logit vectors' rank-1
key coincides: at T = 64, (1 - r) s^2 = 230, r = 0.2, an overlap 0.037, not 1 (T5
under He: the attention output's r went 0.1 -> 0.43 in the walk, 0.18 measured).

Computed by Monte Carlo on Gaussian logits from a fixed stream (the same numbers on
every call), with the independent-queries case (overlap exactly 1/T) on the same
draws as a control variate: the estimate is 1/T + mean(O_r - O_0), whose noise at
4096 draws is ~1e-3 at T = 64.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from varprobe.theory import threads

DRAWS = 4096
SEED = 20240607
ELEMENTS = DRAWS * 256  # draws x keys: past 256 keys fewer draws (at least MIN_DRAWS)
MIN_DRAWS = 256
# Past this spread the softmax is one-hot to double precision (the top two of T
# Gaussian logits part by ~0.3 sqrt(spread)), so the overlap is that of the two
# queries' argmaxes, the same at any larger spread; the cap keeps the logs' differences
# below (at 1e40 they cancel to overflow).
SPREAD_CAP = 1e4


def overlaps(spread: float, r: float, counts: np.ndarray) -> np.ndarray:
    """E[sum_j p_ij p_kj] for two queries over the first T keys, for each T in
    ``counts``, at a logit spread (1 - r) s^2 and query correlation r."""
    with threads.one_thread():
        table = _overlaps(round(min(spread, SPREAD_CAP), 2),
                          round(min(max(r, 0.0), 1.0), 3), int(np.max(counts)))
    return table[np.asarray(counts, dtype=int) - 1]


@functools.lru_cache(maxsize=1024)
def _overlaps(spread: float, r: float, t: int) -> np.ndarray:
    """Every window 1..T at once: sum_{j<=T} p_j q_j = sum e^{x_j + y_j}/(Z_T(x) Z_T(y))
    with Z_T the prefix sums."""
    a, b, c = _normals(t)
    s = math.sqrt(spread)
    shared = a * (s * math.sqrt(r))
    own = s * math.sqrt(1 - r)
    both = _prefix_dots(torch.add(shared, b, alpha=own), torch.add(shared, c, alpha=own))
    out = 1 / np.arange(1, t + 1) + both - _alone(spread, t)
    out[0] = 1.0
    out.flags.writeable = False
    return np.clip(out, 0.0, 1.0)


@functools.lru_cache(maxsize=8)
def _normals(t: int) -> tuple[torch.Tensor, ...]:
    """The fixed draws for T keys (the same at every call: common random numbers)."""
    gen = np.random.default_rng(SEED)
    draws = max(MIN_DRAWS, min(DRAWS, ELEMENTS // t))
    return tuple(torch.from_numpy(gen.standard_normal((draws, t))) for _ in range(3))


@functools.lru_cache(maxsize=256)
def _alone(spread: float, t: int) -> np.ndarray:
    """r = 0 on the same draws, 1/T in expectation: the control variate."""
    _, b, c = _normals(t)
    s = math.sqrt(spread)
    return _prefix_dots(b * s, c * s)


def _prefix_dots(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """The mean over draws of each prefix's sum e^{x_j + y_j}/(Z_T(x) Z_T(y)) (float64,
    torch's vectorized exp: a third of numpy's time here): in linear terms, each draw
    shifted by its largest logit, where no prefix's normalizers come near underflow; in
    logs where they would (a prefix whose largest logit sits ~300 under the draw's:
    spreads past ~10^3)."""
    ex = (x - x.amax(1, keepdim=True)).exp_()
    ey = (y - y.amax(1, keepdim=True)).exp_()
    norm = ex.cumsum(1).mul_(ey.cumsum(1))
    if float(norm[:, 0].min()) > 1e-250:  # the first prefix's is a draw's smallest
        return ex.mul_(ey).cumsum(1).div_(norm).mean(0).numpy()
    cum = torch.logcumsumexp
    return (cum(x + y, 1) - cum(x, 1) - cum(y, 1)).exp_().mean(0).numpy()
