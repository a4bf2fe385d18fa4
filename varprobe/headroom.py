"""Predicted ranges: what a tensor's predicted second moment says about its exponents.

Tail model, stated: the tensor's N elements are independent draws of N(0, q), q the
predicted second moment (a pre-activation is a sum of many products, Gaussian by the
central limit theorem; gradients too). Its fourth moment is not predicted, so no
kurtosis correction is made: a heavier-tailed tensor (a post-ReLU activation, an
attention output) has a larger max than predicted. From the model:

* P(|x| <= t) = erf(t / sqrt(2 q)); the expected count in each exponent bin is N times
  the probability between its edges, so a predicted row has the measured row's shape
  (``precision.Ranges``, with expected rather than whole counts) and the same format
  arithmetic and loss-scale range apply to it.
* amax: the median of the max of N draws, P(max |x| <= t) = 1/2:
  t = sqrt(q) * Phi^-1(1 - p / 2), p = 1 - 2^(-1/N).
* smallest non-zero |x|: the median of the min, t = sqrt(q) * Phi^-1(1/2 + p / 2).
"""

from __future__ import annotations

import functools
import math
from statistics import NormalDist

from varprobe.precision import BINS, FORMATS, LOW, Ranges

MODEL = "gaussian"
_UNIT = NormalDist()


def predicted(second_moment: float | None, numel: int | None) -> Ranges | None:
    """The expected range row of N(0, q) draws; None without a finite q > 0 or N."""
    if not numel or second_moment is None or not math.isfinite(second_moment) \
            or second_moment <= 0:
        return None
    sd = math.sqrt(second_moment)
    below = [_cdf_abs(2.0 ** (LOW + i), sd) for i in range(BINS)]
    hist = [numel * (b - a) for a, b in zip([0.0] + below[:-1], below)]
    hist[-1] += numel * (1 - below[-1])  # past float32: the top bin, like the kernel
    amax, amin = extremes(second_moment, numel)
    return Ranges(numel=numel, amax=amax, min_nonzero=amin, zeros=0, nonfinite=0,
                  histogram=hist, overflow={name: numel * (1 - _cdf_abs(f.overflow_cut, sd))
                                            for name, f in FORMATS.items()})


def extremes(second_moment: float | None, numel: int | None) -> tuple[float, float] | None:
    """``predicted``'s amax and smallest non-zero |x| alone (the medians of the max and
    the min of N draws), without its histogram."""
    if not numel or second_moment is None or not math.isfinite(second_moment) \
            or second_moment <= 0:
        return None
    sd = math.sqrt(second_moment)
    top, low = _unit_extremes(numel)
    return sd * top, sd * low


@functools.lru_cache(maxsize=256)
def _unit_extremes(numel: int) -> tuple[float, float]:
    """``extremes`` of N(0, 1) draws, which scale by sd: one pair per tensor size (a
    model's layers share a few), not two inverse CDFs per tensor."""
    p = -math.expm1(-math.log(2) / numel)  # 1 - 2^(-1/N), accurate for large N
    return _quantile_abs(1 - p), _quantile_abs(p)


def _cdf_abs(t: float, sd: float) -> float:
    """P(|x| <= t) for x ~ N(0, sd^2)."""
    return math.erf(t / (sd * math.sqrt(2)))


def _quantile_abs(u: float) -> float:
    """t with P(|x| <= t) = u for x ~ N(0, 1)."""
    return _UNIT.inv_cdf(0.5 + u / 2) if u < 1 else math.inf
