"""Ops over positions: means and sums, average and max pools, padding, upsampling.

Each is described by its kind, the window k (elements that meet in one output) and
the fraction numel(out)/numel(in). The backward steps are exact for every kind given
Var[dL/dy] (a mean hands each input 1/k of each output's gradient; a max pool the whole
of it to one input per window; nearest upsampling sums the copies' gradients):

    Var[dx] = Var[dy] * fraction * {mean: 1/k, sum: k, max: 1, nearest: 1, pad: 1/fraction}

The forward is exact for zero padding (zeros added: E[x^2] times numel(in)/numel(out))
and nearest upsampling (copies). For means and max pools it depends on how neighbouring
positions correlate, which the second moment does not say: ``approximate`` treats the k
elements as independent (a mean keeps the per-unit mean and 1/k of the rest; a max pool
of a rectifier's output takes the rectifier of the largest of k Gaussian inputs, with
the units' own means shared by the window, ``rectified_max``; of anything else the k-th
order statistic of Gaussians with the input's mean and variance). The
walk uses the approximation only where nothing is measured (``varprobe predict``) and
names it in the prediction's note; a probe carries the measured value past the op.

A max pool's backward is exact only for a gradient independent across windows: an
input that is the largest of K windows gathers their K gradients, so the part of the
gradient shared across positions (behind a global pool: theory.shared) adds
(E[K^2] - E[K]) E[ḡ^2] beside E[K] Var[dy] (E[K] = fraction). Overlapping windows make
K large: a 3x3 stride-1 pool (GoogLeNet's pool branch) has E[K^2] ~ 6 on i.i.d. inputs,
a 3x3 stride-2 one 2.2 times E[K] (``overlap``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from varprobe.theory import maxgate
from varprobe.theory.gains import Z_MAX, _legendre, _nodes, expectation
from varprobe.theory.signal import Signal

AVG = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
ADAPTIVE_AVG = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
MAX = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
ADAPTIVE_MAX = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
ZERO_PADS = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
             nn.ConstantPad3d)
EXACT_FORWARD = ("pad", "nearest")
POOLS = (*AVG, *ADAPTIVE_AVG, *MAX, *ADAPTIVE_MAX, *ZERO_PADS, nn.Upsample)


@dataclass(frozen=True)
class Pool:
    kind: str        # "mean" | "sum" | "max" | "pad" | "nearest"
    window: float    # k
    fraction: float  # numel(out) / numel(in)
    # a max pool whose windows hold fewer elements at the borders (padding, ceil_mode):
    # (elements, share of the outputs) of each size; None: every window holds k
    sizes: tuple[tuple[int, float], ...] | None = None


def of_module(module: nn.Module, input_shape, output_shape) -> Pool | None:
    """The pool a module call is; None for anything else (told first: every walk asks
    at every call)."""
    cls = type(module)
    if cls not in _IS_POOL:
        _IS_POOL[cls] = issubclass(cls, POOLS)
    if not _IS_POOL[cls] or not input_shape or not output_shape:
        return None
    fraction = math.prod(output_shape) / max(math.prod(input_shape), 1)
    if isinstance(module, AVG):
        return Pool("mean", _window(module, input_shape), fraction)
    if isinstance(module, ADAPTIVE_AVG):
        return Pool("mean", 1 / fraction, fraction)
    if isinstance(module, MAX):
        return Pool("max", _window(module, input_shape), fraction,
                    _sizes(module, input_shape, output_shape))
    if isinstance(module, ADAPTIVE_MAX):
        return Pool("max", 1 / fraction, fraction)
    if isinstance(module, ZERO_PADS) and float(getattr(module, "value", 0.0)) == 0.0:
        return Pool("pad", 1.0, fraction)
    if isinstance(module, nn.Upsample) and module.mode == "nearest":
        return Pool("nearest", 1.0, fraction)
    return None


_IS_POOL: dict[type, bool] = {}


def _window(module: nn.Module, input_shape) -> float:
    """The elements one window holds: the kernel's, clipped per dim to the padded input
    (a kernel larger than the map, as transformers' EfficientNet pooler's AvgPool2d of
    hidden_dim with ceil_mode, averages the whole map)."""
    dims = _dims(module)
    spatial = list(input_shape[-dims:]) if len(input_shape) > dims else [None] * dims
    kernel, padding = (_each(getattr(module, name, 0), dims) for name in ("kernel_size",
                                                                          "padding"))
    return float(math.prod(k if n is None else min(k, n + 2 * p)
                           for k, n, p in zip(kernel, spatial, padding)))


def _sizes(module: nn.Module, input_shape, output_shape) -> tuple | None:
    """``Pool.sizes`` of a max pool module: along each spatial dim, how many elements
    its window reads inside the input at each output position (theory.maxgate's
    members: a padded element is -inf, never the max), combined over the dims."""
    dims = _dims(module)
    if len(input_shape) <= dims or len(output_shape) <= dims:
        return None
    found = {1: 1.0}
    for axis, n in enumerate(input_shape[-dims:]):
        members = maxgate.pool_members(module, axis, int(n))
        if not members:
            return None
        combined: dict[int, float] = {}
        for a, share in found.items():
            for m in members:
                combined[a * len(m)] = combined.get(a * len(m), 0.0) + share / len(members)
        found = combined
    if len(found) == 1 and next(iter(found)) == round(_window(module, input_shape)):
        return None
    return tuple(sorted(found.items()))


def _each(value, dims: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * dims


def _dims(module: nn.Module) -> int:
    """The spatial dims of an average or max pool module (1, 2, 3), by its torch class:
    a subclass keeps them under any name."""
    for classes in (AVG, MAX):
        for d, cls in enumerate(classes, 1):
            if isinstance(module, cls):
                return d
    return 1


def exact(pool: Pool, s: Signal, mu: float) -> tuple[Signal, float] | None:
    """The forward where it is exact (padding with zeros, nearest upsampling)."""
    if pool.kind == "nearest":
        return s, mu
    if pool.kind == "pad":
        kept = 1 / pool.fraction  # numel(in)/numel(out) of the output is the input
        return Signal(s.m2 * kept, s.mean_share, s.r), mu * kept
    return None


def approximate(pool: Pool, s: Signal, mu: float, pre: tuple | None = None,
                at: maxgate.Geometry | None = None) -> tuple[Signal, float]:
    """The forward with the k pooled elements independent (see the module note); a
    max pool of a rectifier's output (``pre``: theory.residual.pre) by
    ``rectified_max``."""
    if pool.kind in EXACT_FORWARD:
        return exact(pool, s, mu)
    found = rectified_max(pool, pre, s, at) if pre is not None else None
    if found is not None:
        return found
    k = max(pool.window, 1.0)
    shared = s.m2 * max(s.mean_share, mu * mu / s.m2 if s.m2 > 0 else 0.0)
    if pool.kind in ("mean", "sum"):
        m2 = shared + (s.m2 - shared) / k
        scale = k * k if pool.kind == "sum" else 1.0
        share = shared / m2 if m2 > 0 else 0.0
        return Signal(m2 * scale, share, share), mu * math.sqrt(scale)
    mean = mu if mu else math.sqrt(shared)
    sigma = math.sqrt(max(s.m2 - mean * mean, 0.0))
    z1, z2 = _over_sizes(pool, lambda size: _max_moments(size))
    m2 = mean * mean + 2 * mean * sigma * z1 + sigma * sigma * z2
    out_mean = mean + sigma * z1
    return Signal(m2, min(1.0, out_mean * out_mean / m2) if m2 > 0 else 0.0), out_mean


def rectified_max(pool: Pool, pre: tuple, s: Signal, at: maxgate.Geometry | None = None,
                  ) -> tuple[Signal, float] | None:
    """A max pool's forward over a rectifier's output f(w) (``pre``: w's (mu, var, slope
    a, ..., E[w̄_u^2]), theory.residual.pre), exact for windows of independent w.

    f is non-decreasing for a >= 0, so the largest of the k outputs is f of the largest
    input: max_i f(w_i) = f(max_i w_i). A unit's own mean over the batch, w̄_u (a conv's
    w_c . E[x]: the same at every position of a window inside the map), is shared by the
    window, so w_i = mu + c + e_i, c ~ N(0, v_c), v_c = E[w̄_u^2] - mu^2, and e_i i.i.d.
    N(0, v_e), v_e = var - v_c; the largest is mu + c + sqrt(v_e) Z_k, Z_k the largest
    of k standard normals (density k phi Phi^(k-1)), and E[f^j] is a quadrature over
    Z_k and c. Where the conv ``at`` cuts taps at the borders each position sums its own
    subset of them (theory.maxgate.largest, by Monte Carlo over the taps); a padded
    pool's windows hold fewer elements there (``Pool.sizes``). ``approximate`` took the
    k elements as Gaussians with f(w)'s mean and variance, 1.3-1.5x under a 3x3 max pool
    of a ReLU's output (E[max^2] 2.56 against 1.72 for w ~ N(0, 1)).

    The output's mean share is its common mean's, E[y]^2 / E[y^2], as ``approximate``
    gives it: the spread of the units' own means past the pool is not passed on (on the
    corpus VGGs without norms passing it on moved predict's forward closer and its
    backward, through the rectifiers' gates, further: left as it was). None where f is
    not non-decreasing or the window's elements are alike."""
    mu, var, a, unit_means = pre[0], pre[1], pre[2], pre[4]
    k = int(round(pool.window))
    v_c = min(max(unit_means - mu * mu, 0.0), var)
    v_e = var - v_c
    if pool.kind != "max" or a < 0 or k < 1 or v_e <= 1e-12 * var:
        return None
    classes = maxgate.windows(at) if at is not None and v_c > 0 else None
    if classes:  # the conv's zero padding gives border positions means of their own
        m1, m2 = _over_classes(classes, a, mu, v_c, v_e, min(at.b2, v_c))
    else:
        m1, m2 = _over_sizes(pool, lambda size: _max_of_rectified(
            size, a, mu / math.sqrt(v_e), v_c / v_e))
    m1, m2 = m1 * math.sqrt(v_e), m2 * v_e
    if not m2 > 0:
        return None
    share = min(1.0, m1 * m1 / m2)
    return Signal(m2, share, max(share, s.r)), m1


def _over_classes(classes: list, a: float, mu: float, v_c: float, v_e: float,
                  bias: float) -> tuple[float, ...]:
    """``_max_of_rectified``'s moments (units of sqrt(v_e)) over a max pool's
    windows by class (theory.maxgate.windows): a window inside the map shares one
    unit mean; one where the conv's zero padding cuts taps, each member its own part of
    it (maxgate.largest, by Monte Carlo over the taps; the bias shared)."""
    found = [(_max_of_rectified(size, a, mu / math.sqrt(v_e), v_c / v_e) if full else
              maxgate.largest(members, a, mu / math.sqrt(v_e), bias / v_e,
                              (v_c - bias) / v_e), n)
             for members, size, full, n in classes]
    total = sum(n for _, n in found)
    return tuple(sum(m[i] * n for m, n in found) / total for i in range(2))


def _over_sizes(pool: Pool, moments) -> tuple[float, ...]:
    """``moments(k)`` at the pool's window, or averaged over its windows' sizes."""
    sizes = pool.sizes or ((int(round(pool.window)), 1.0),)
    found = [(moments(size), share) for size, share in sizes]
    return tuple(sum(m[i] * share for m, share in found) for i in range(len(found[0][0])))


@functools.lru_cache(maxsize=256)
def _max_of_rectified(k: int, a: float, t: float, c: float) -> tuple[float, float]:
    """(E[y], E[y^2]) for y = f(t + c' + Z_k), c' ~ N(0, c) (f and Z_k as in
    ``rectified_max``; w in units of sqrt(v_e)): E[y | c'] is smooth in c', so the
    outer rule is Gauss's over c' (theory.gains._nodes)."""
    if c > 0:
        offsets, weights = _nodes(c, ())
        means = t + offsets
    else:
        means, weights = torch.tensor([t], dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    first, second = _given(k, a, means)
    return float(weights @ first), float(weights @ second)


def _given(k: int, a: float, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E[f(m + Z_k)] and E[f(m + Z_k)^2] at each m: Gauss-Legendre over z in [-12, 12]
    split at f's kink z = -m, the weights phi(z) k Phi(z)^(k-1) dz."""
    x, v = (torch.from_numpy(u) for u in _legendre())
    cut = (-m).clamp(-Z_MAX, Z_MAX)[:, None]
    lo = torch.cat([torch.full_like(cut, -Z_MAX), cut], 1)[..., None]  # [M, 2 pieces, 1]
    hi = torch.cat([cut, torch.full_like(cut, Z_MAX)], 1)[..., None]
    z = (lo + hi) / 2 + (hi - lo) / 2 * x
    w = (hi - lo) / 2 * v * torch.exp(-z * z / 2) / math.sqrt(2 * math.pi) \
        * k * torch.special.ndtr(z) ** (k - 1)
    y = m[:, None, None] + z
    y = torch.where(y > 0, y, a * y)
    return (w * y).sum((1, 2)), (w * y * y).sum((1, 2))


def backward(pool: Pool) -> float:
    """Var[dx] / Var[dy] (see the module note)."""
    if pool.kind == "pad":
        return 1.0
    k = max(pool.window, 1.0)
    return pool.fraction * {"mean": 1 / k, "sum": k, "max": 1.0, "nearest": 1.0}[pool.kind]


@functools.cache
def _max_moments(k: int) -> tuple[float, float]:
    """E[Z] and E[Z^2] of the largest of k independent standard normals: the density
    k phi(z) Phi(z)^(k-1), integrated by theory.gains.expectation."""
    if k <= 1:
        return 0.0, 1.0

    def weight(z: torch.Tensor) -> torch.Tensor:
        return k * (0.5 * torch.erfc(-z / math.sqrt(2))) ** (k - 1)

    return (expectation(lambda z: z * weight(z), 1.0),
            expectation(lambda z: z * z * weight(z), 1.0))


def overlap(module: nn.Module, input_shape) -> float:
    """E[K^2] - E[K] for a max pool module's windows over i.i.d. inputs of the call's
    spatial shape (see the module note); 0 for other modules, or windows that do not
    overlap."""
    if not isinstance(module, MAX) or not input_shape or len(input_shape) < 3:
        return 0.0
    dims = _dims(module)
    spatial = tuple(input_shape[-dims:])  # batched or not: the trailing dims
    args = (_each(getattr(module, name), dims) for name in ("kernel_size", "stride",
                                                            "padding", "dilation"))
    return _overlap(dims, spatial, *args, module.ceil_mode)


@functools.lru_cache(maxsize=256)
def _overlap(dims: int, spatial: tuple, kernel, stride, padding, dilation,
             ceil_mode: bool) -> float:
    """Counted on a float64 i.i.d. sample of at least 2^15 elements (seeded: the same
    every run): the backward of ones gives each input its K."""
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[dims - 1]
    batch = max(1, -(-(1 << 15) // max(math.prod(spatial), 1)))
    generator = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        x = torch.randn(batch, 1, *spatial, dtype=torch.float64, generator=generator,
                        requires_grad=True)
        out = pool(x, kernel, stride, padding, dilation, ceil_mode)
        # the sum's gradient, not grad_outputs=ones: autograd checks a grad_outputs
        # tensor's shape with torch's symbolic shapes, whose first import (sympy) costs
        # ~0.4 s, once per process: a CLI run's whole analysis several times over
        (counts,) = torch.autograd.grad(out.sum(), x)
    return max(float((counts * counts).mean() - counts.mean()), 0.0)
