"""Eval-mode BatchNorm: what its running statistics do to a predicted signal.

Per channel, out = gamma (x - mu_r)/sqrt(var_r + eps) + beta, so

    E[out^2] = gamma^2 (Var[x] + d^2)/(var_r + eps) + 2 gamma beta d/sqrt(var_r + eps)
               + beta^2,

with d = E[x_c] - mu_r the gap between the input's channel mean and the running one,
and the channel mean of out is gamma d/sqrt(var_r + eps) + beta.

The prediction knows the input's channel means only through their energy,
mean_c(E[x_c]^2) = mean_share * m2. Running statistics are averages of such inputs, so
the channel means are taken to point where the running means do, E[x_c] = k mu_r with
k = sqrt(energy / mean_c(mu_r^2)): calibrated statistics (k = 1) subtract the mean
exactly, partly calibrated ones (momentum after a few passes, k > 1) part of it. With
running means all zero (never updated) nothing is subtracted and d^2 is the energy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def moments(gamma: Sequence[float], beta: Sequence[float], running_mean: Sequence[float],
            running_var: Sequence[float], eps: float, m2: float,
            mean_share: float) -> tuple[float, float]:
    """(E[out^2], the share of it that is a channel mean) for an input of second
    moment ``m2`` whose channel means carry ``mean_share`` of it; per-channel lists of
    equal length."""
    energy = m2 * mean_share
    spread = m2 - energy  # Var[x]: what no mean subtraction touches
    running = sum(m * m for m in running_mean) / len(running_mean)
    k = math.sqrt(energy / running) if running > 0 else 0.0
    total = shared = 0.0
    for g, b, m, v in zip(gamma, beta, running_mean, running_var):
        d = (k - 1) * m
        d2 = d * d if running > 0 else energy
        mean_out2 = g * g * d2 / (v + eps) + 2 * g * b * d / math.sqrt(v + eps) + b * b
        total += g * g * spread / (v + eps) + mean_out2
        shared += mean_out2
    n = len(running_var)
    return total / n, shared / total if total > 0 else 0.0
