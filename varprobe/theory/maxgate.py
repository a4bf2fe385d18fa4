"""A rectifier under a max pool: the share of the windows whose elements are all negative.

The gradient a max pool sends back lands on each window's largest element, which a
rectifier of slope a below 0 passes at 1 when it is positive and at a when not:
E[f'^2] = 1 - P + a^2 P, P = P(all k elements < 0), where a gradient spread over all
elements gets 1/2 (1 + a^2).

The elements of a conv's output are y(p) = b + m(p) + e(p): the channel's bias b, the
sum over the conv's in-bounds taps t of u_t = sum_c' w_c't E[x_c'] (the input's channel
means, i.i.d. Gaussian over the taps) and the rest e, independent over positions (on
VGG-16 without norms, neighbours correlate by < 0.03 once each position's mean is
taken out). So P = E_{b,u}[prod_p Phi(-(mu + b + m(p)) / sd)].

Inside the map every element of a window has all the taps: the window shares one mean
and P = E_m[Phi(-(mu + m)/sd)^k] (a 1-D quadrature); with zero-mean units that is
2^-k. Where the conv's zero padding cuts taps (a border, every position of a 2x2 map:
VGG's last stage on CIFAR) each position sums its own subset, and P is taken by Monte
Carlo over the taps (4096 draws, a fixed seed: ~0.5% of the gate) once per class of
windows, a class being the tap subsets of its members axis by axis: a few per axis,
whatever the map's size.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from varprobe.theory.gains import expectation, prelu_slope
from varprobe.theory.residual import RECTIFIERS
from varprobe.theory.signal import Signal

DRAWS = 4096
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


@dataclass(frozen=True)
class Geometry:
    """The conv that makes the rectifier's input and the max pool after it, each with
    its input's spatial shape (``windows`` reads them), and the conv's mean(b^2)."""

    conv: nn.Module
    conv_in: tuple[int, ...]
    pool: nn.Module
    pool_in: tuple[int, ...]
    b2: float


def gate(module: nn.Module, s: Signal, mu: float, window: float,
         at: Geometry | None = None) -> float | None:
    """E[f'(y)^2] of a rectifier (``module``) over what a max pool of ``window``
    elements sends back, y of second moment s.m2, common mean mu and per-unit mean
    share s.mean_share; ``at``: the conv and pool around it (None: a shared mean)."""
    a = prelu_slope(module) if isinstance(module, RECTIFIERS) else None
    var = s.m2 - mu * mu
    if a is None or var <= 0:
        return None
    between = min(max(s.mean_share * s.m2 - mu * mu, 0.0), var)
    sd, k = math.sqrt(var - between), round(window)
    if sd <= 0:
        return None
    classes = windows(at) if at is not None and between > 0 else None
    if not classes:
        below = _shared(_sig(mu / sd), _sig(between / (sd * sd)), k)
    else:
        bias, z = min(at.b2, between), sd * sd
        below = sum(n * (_shared(_sig(mu / sd), _sig(between / z), size) if full else
                         _taps(members, _sig(mu / sd), _sig(bias / z),
                               _sig((between - bias) / z)))
                    for members, size, full, n in classes) / sum(c[-1] for c in classes)
    return 1 - below + a * a * below


def windows(at: Geometry) -> list[tuple[tuple, int, bool, int]] | None:
    """The pool's windows by class: (members, their number, whether each has all the
    conv's taps, how many windows), members = (each axis's tap subsets, the kernel, the
    mean in-bounds count per axis); None where the geometry is not one this reads."""
    if not isinstance(at.conv, CONVS) or not isinstance(at.pool, MAX_POOLS) or \
            len(at.conv_in) != at.conv.weight.dim() - 2 or \
            len(at.pool_in) != len(at.conv_in):
        return None
    axes = [_conv_taps(at.conv, i, h) for i, h in enumerate(at.conv_in)]
    if any(t is None for t in axes) or tuple(len(t) for t in axes) != at.pool_in:
        return None
    per_axis = []
    for i, taps in enumerate(axes):
        members = pool_members(at.pool, i, len(taps))
        if members is None:
            return None
        per_axis.append(Counter(_canonical(tuple(taps[o] for o in m)) for m in members))
    kernel = tuple(at.conv.kernel_size)
    mean_count = tuple(sum(len(t) for t in taps) / len(taps) for taps in axes)
    out = []
    for combo in itertools.product(*(c.items() for c in per_axis)):
        subsets = tuple(key for key, _ in combo)
        full = all(len(t) == k for key, k in zip(subsets, kernel) for t in key)
        out.append(((subsets, kernel, mean_count), math.prod(len(key) for key in subsets),
                    full, math.prod(n for _, n in combo)))
    return out


def _canonical(key: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    """One name for the members' tap subsets along an axis wherever they differ only by
    a reflection or a renaming of the taps, whose means are i.i.d. (the two borders of
    a map): the smaller of the members in order and reversed, the taps numbered by
    first appearance."""
    def named(members: tuple) -> tuple:
        names: dict[int, int] = {}
        return tuple(tuple(sorted(names.setdefault(t, len(names)) for t in taps))
                     for taps in members)
    return min(named(key), named(key[::-1]))


def _conv_taps(conv: nn.Module, axis: int, h: int) -> tuple[tuple[int, ...], ...] | None:
    """Per output position along ``axis``, the taps that read inside the input."""
    k, s, d = conv.kernel_size[axis], conv.stride[axis], conv.dilation[axis]
    if isinstance(conv.padding, str):
        p = 0 if conv.padding == "valid" else d * (k - 1) // 2
    else:
        p = conv.padding[axis]
    outs = (h + 2 * p - d * (k - 1) - 1) // s + 1
    if outs <= 0:
        return None
    if conv.padding_mode != "zeros":  # a padded value is a copy: every tap reads one
        return tuple(tuple(range(k)) for _ in range(outs))
    return tuple(tuple(t for t in range(k) if 0 <= o * s - p + t * d < h)
                 for o in range(outs))


def pool_members(pool: nn.Module, axis: int, h: int) -> list[list[int]] | None:
    """Per pool output along ``axis``, the input positions its window reads (padding,
    which a max pool fills with -inf, left out)."""
    def at(v):
        return v[axis] if isinstance(v, (tuple, list)) else v
    k, p, d = at(pool.kernel_size), at(pool.padding), at(pool.dilation)
    s = at(pool.stride) if pool.stride is not None else k
    span = h + 2 * p - d * (k - 1) - 1
    outs = (-(-span // s) if pool.ceil_mode else span // s) + 1
    if pool.ceil_mode and (outs - 1) * s >= h + p:
        outs -= 1  # torch drops a last window that would start in the right padding
    if outs <= 0:
        return None
    return [[j * s - p + i * d for i in range(k) if 0 <= j * s - p + i * d < h]
            for j in range(outs)]


def _sig(x: float) -> float:
    """3 significant digits: a deep stack repeats its arguments, the cache sees it."""
    return float(f"{x:.3g}")


@functools.lru_cache(maxsize=512)
def _shared(mu: float, between: float, k: int) -> float:
    """E[Phi(-(mu + m))^k], m ~ N(0, between): k unit-variance elements around one
    shared mean mu + m all below 0."""
    if between <= 0:
        return (0.5 * math.erfc(mu / math.sqrt(2))) ** k
    return expectation(lambda m: torch.special.ndtr(-(mu + m)) ** k, between, (-mu,))


@functools.lru_cache(maxsize=512)
def _taps(members: tuple, mu: float, bias: float, tap: float) -> float:
    """The same where each member sums its own subset of the taps: E over the bias
    (variance ``bias``) and the taps (i.i.d., ``tap`` of the mean's variance per the
    map's mean in-bounds count) of prod_p Phi(-(mu + b + m(p))), by Monte Carlo."""
    logs = torch.special.log_ndtr(-_member_means(members, mu, bias, tap)).sum(1)
    return float(logs.exp().mean())


def largest(members: tuple, a: float, mu: float, bias: float, tap: float,
            ) -> tuple[float, float]:
    """(E[y], E[y^2]) of y = f(max_p (mu + b + m(p) + e_p)) over a window of
    ``members`` (as ``_taps``, e_p i.i.d. N(0, 1): the forward of a max pool over the
    rectifier, theory.pools.rectified_max); see ``_largest``."""
    return _largest(members, a, _sig(mu), _sig(bias), _sig(tap))


@functools.lru_cache(maxsize=512)
def _largest(members: tuple, a: float, mu: float, bias: float, tap: float,
             ) -> tuple[float, float]:
    """By Monte Carlo over the bias and the taps; for each draw the largest element's
    distribution prod_p Phi(x - y_p) on a
    grid of x 6.5 sds past the means (Phi(-6.5) ~ 4e-11), in steps of 0.25 sd: the
    midpoint sums' error, ~h^2/24 of the second moment, is 0.3%, a fifth of the draws'
    1.5%; at most 400 steps, coarser only where the means spread over 100 sds."""
    y = _member_means(members, mu, bias, tap)
    lo, hi = float(y.min()) - 6.5, float(y.max()) + 6.5
    x = torch.arange(lo, hi, max(0.25, (hi - lo) / 400), dtype=torch.float64)
    cdf = sum(torch.special.log_ndtr(x[None, :] - y[:, p, None]) for p in range(y.shape[1]))
    cdf = cdf.exp()
    mass, mid = cdf.diff(dim=1), (x[1:] + x[:-1]) / 2
    f = torch.where(mid > 0, mid, a * mid)
    return float((mass @ f).mean()), float((mass @ (f * f)).mean())


def _member_means(members: tuple, mu: float, bias: float, tap: float) -> torch.Tensor:
    """mu + b + m(p) for each draw and member p [DRAWS, members] (see ``_taps``)."""
    subsets, kernel, mean_count = members
    u, b = _draws(kernel)
    m = u
    for axis, (key, k) in enumerate(zip(subsets, kernel)):
        select = torch.zeros(len(key), k, dtype=torch.float64)
        for row, taps in enumerate(key):
            select[row, list(taps)] = 1.0
        m = torch.movedim(torch.tensordot(m, select, dims=([1 + axis], [1])), -1, 1 + axis)
    scale = math.sqrt(tap / math.prod(mean_count))
    return (mu + math.sqrt(bias) * b.view(-1, *([1] * len(kernel))) + scale * m).flatten(1)


@functools.lru_cache(maxsize=8)
def _draws(kernel: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(DRAWS, *kernel, generator=generator, dtype=torch.float64),
            torch.randn(DRAWS, generator=generator, dtype=torch.float64))
