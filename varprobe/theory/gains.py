"""Activation gains: E[f(y)^2]/q and E[f'(y)^2] for y ~ N(0, q).

Closed forms for rectifiers (He et al. 2015, incl. PReLU's (1+a^2)/2 and the
truncated-normal moments at a non-zero mean), Gauss-Legendre quadrature for every
other elementwise activation (the mean-field length map of Poole et al. 2016).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from varprobe.theory.layer_fans import is_activation

# Host copies of parameters and buffers, keyed by id(tensor): the probe copies them with
# its statistics in the pass's one transfer, so that predictions read no device tensor.
Values = Mapping[int, list[float]]


def elements(t: torch.Tensor, values: Values | None = None) -> list[float]:
    """The elements of ``t`` as floats: its host copy in ``values``, else read from it."""
    if values is not None and id(t) in values:
        return values[id(t)]
    return t.detach().double().flatten().tolist()


def prelu_slope(module: nn.Module, values: Values | None = None) -> float | None:
    """Negative-side slope a of a rectifier, such that its gain is (1+a^2)/2.

    ReLU 0; LeakyReLU its negative_slope; PReLU sqrt(mean(a_c^2)) over channels,
    so that (1+a^2)/2 is the channel average of (1+a_c^2)/2 (on the meta device, which
    holds no values, |init|, the slope it was constructed with); RReLU (lower+upper)/2
    in eval mode (its fixed slope) and, in train mode, where every element draws
    a ~ U(lower, upper), the rms slope sqrt((l^2+l*u+u^2)/3), which makes
    (1+a^2)/2 = E[(1+a^2)/2] exact. None for anything else. ``values``: host copies
    of the PReLU weights (see ``elements``).
    """
    if isinstance(module, nn.ReLU):
        return 0.0
    if isinstance(module, nn.LeakyReLU):
        return float(module.negative_slope)
    if isinstance(module, nn.PReLU):
        if module.weight.is_meta and (values is None or id(module.weight) not in values):
            # no values: the slope it was constructed with
            return abs(float(module.init))
        w = elements(module.weight, values)
        return math.sqrt(sum(a * a for a in w) / len(w))
    if isinstance(module, nn.RReLU):
        lo, hi = float(module.lower), float(module.upper)
        return math.sqrt((lo * lo + lo * hi + hi * hi) / 3) if module.training else (lo + hi) / 2
    return None


def rectified_moments(a: float, mu: float, var: float) -> tuple[float, float, float]:
    """(E[f(y)], E[f(y)^2], E[f'(y)^2]) for f(y) = y (y > 0), a*y (y < 0) and
    y ~ N(mu, var), var > 0: the truncated-normal moments, with t = mu/sigma,
    E[y 1{y>0}] = mu Phi(t) + sigma phi(t), E[y^2 1{y>0}] = (mu^2 + var) Phi(t) +
    mu sigma phi(t), and the y < 0 halves their complements."""
    sigma = math.sqrt(var)
    t = mu / sigma
    big_phi = 0.5 * math.erfc(-t / math.sqrt(2))
    phi = math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    m1_pos = mu * big_phi + sigma * phi
    m2_pos = (mu * mu + var) * big_phi + mu * sigma * phi
    return (m1_pos + a * (mu - m1_pos), m2_pos + a * a * (mu * mu + var - m2_pos),
            big_phi + a * a * (1 - big_phi))


def forward_gain(module: nn.Module, q: float = 1.0,
                 values: Values | None = None) -> float | None:
    """E[f(y)^2] / q for y ~ N(0, q): the second moment (not the variance) an
    activation passes on, per unit input variance (He's E[x^2] = g Var[y]).

    Exact for rectifiers ((1+a^2)/2, any q) and Identity (1); by quadrature at q for
    any other elementwise torch.nn activation. None when not computable; the reason
    is gain_unavailable_reason(module, q). ``values``: as for prelu_slope.
    """
    return _gain(module, q, values)[0][0]


def backward_gain(module: nn.Module, q: float = 1.0,
                  values: Values | None = None) -> float | None:
    """E[f'(y)^2] for y ~ N(0, q): the factor an activation applies to the second
    moment of the gradient. Same cases as forward_gain."""
    return _gain(module, q, values)[0][1]


def both_gains(module: nn.Module, q: float = 1.0, values: Values | None = None
               ) -> tuple[float | None, float | None]:
    """(forward_gain, backward_gain) from one lookup."""
    return _gain(module, q, values)[0]


def gain_unavailable_reason(module: nn.Module, q: float = 1.0,
                            values: Values | None = None) -> str | None:
    """Why forward_gain/backward_gain return None for this module (None if they don't)."""
    return _gain(module, q, values)[1]


Z_MAX = 12.0  # the standard normal beyond |z| = 12 carries mass < 1e-32
NODES = 96    # Gauss-Legendre nodes per smooth piece


def expectation(fn: Callable[[torch.Tensor], torch.Tensor], q: float = 1.0,
                breakpoints: Sequence[float] = ()) -> float:
    """E[fn(y)], y ~ N(0, q), by split Gauss-Legendre quadrature.

    fn takes a float64 tensor of points and returns one value per point. The
    integral over z ~ N(0, 1) on [-12, 12] is cut at 0 and at each breakpoint (in
    y units) where fn has a kink or a jump, so every piece is smooth and the rule is
    accurate to ~1e-9 for the activations here. (A Gauss-Hermite rule with an odd
    node count puts a node on ReLU's kink and gets E[relu'^2] wrong by ~9%.)
    """
    if not q > 0:
        raise ValueError(f"variance q must be positive, got {q}")
    x, w = _nodes(float(q), tuple(sorted(set(breakpoints))))
    return float(torch.dot(w, fn(x).to(torch.float64)))


@functools.lru_cache(maxsize=256)
def _nodes(q: float, breakpoints: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Points y = sqrt(q) z and weights phi(z) dz of the split rule."""
    s = math.sqrt(q)
    cuts = sorted({-Z_MAX, 0.0, Z_MAX, *(b / s for b in breakpoints if abs(b / s) < Z_MAX)})
    t, v = _legendre()
    z = np.concatenate([(lo + hi) / 2 + (hi - lo) / 2 * t for lo, hi in zip(cuts, cuts[1:])])
    dz = np.concatenate([(hi - lo) / 2 * v for lo, hi in zip(cuts, cuts[1:])])
    w = dz * np.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    return torch.from_numpy(s * z), torch.from_numpy(w)


@functools.cache
def _legendre() -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on [-1, 1] (an eigenvalue problem: once)."""
    return np.polynomial.legendre.leggauss(NODES)


def _breakpoints(module: nn.Module) -> tuple[float, ...]:
    """Where an activation other than the rectifiers has a kink or a jump (y units)."""
    if isinstance(module, nn.Hardtanh):  # ReLU6 too
        return float(module.min_val), float(module.max_val)
    if isinstance(module, (nn.Hardswish, nn.Hardsigmoid)):
        return -3.0, 3.0
    if isinstance(module, (nn.Hardshrink, nn.Softshrink)):
        return -float(module.lambd), float(module.lambd)
    if isinstance(module, nn.Threshold):
        return (float(module.threshold),)
    if isinstance(module, nn.Softplus):  # switches to the identity above threshold/beta
        return (float(module.threshold) / float(module.beta),)
    return ()


Gain = tuple[tuple[float | None, float | None], str | None]


def _gain(module: nn.Module, q: float, values: Values | None = None) -> Gain:
    if isinstance(module, nn.Identity):
        return (1.0, 1.0), None
    a = prelu_slope(module, values)
    if a is not None:
        g = (1.0 + a * a) / 2  # positively homogeneous: exact at every q
        return (g, g), None
    if not is_activation(module):
        return (None, None), f"{type(module).__name__} is not an elementwise activation"
    try:
        q = float(q)
    except (TypeError, ValueError):
        q = math.nan
    if not (math.isfinite(q) and q > 0):
        return (None, None), f"input second moment {q} is not a positive number"
    q = float(f"{q:.6g}")  # 6 significant digits: far below measurement noise
    try:
        key = (type(module), module.training, _attributes(module))
        hash(key)
    except TypeError:  # an attribute that cannot key a cache: compute directly
        return _quadrature(module, q)
    return _cached(key, q, module)


def _attributes(module: nn.Module) -> tuple:
    return tuple(sorted((k, v) for k, v in vars(module).items()
                        if not k.startswith("_") and k != "training"))


_CACHE: dict[tuple, Gain] = {}


def _cached(key: tuple, q: float, module: nn.Module) -> Gain:
    full = (*key, q)
    if full not in _CACHE:
        if len(_CACHE) >= 65536:  # one entry per (activation, q): bound it all the same
            _CACHE.clear()
        _CACHE[full] = _quadrature(module, q)
    return _CACHE[full]


class _ShapeChanged(Exception):
    pass


def _evaluate(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's values and slopes at the points ``x``, by autograd. forward, not
    __call__: no hooks fire; on a non-leaf copy: in-place modules write it."""
    leaf = x.clone().requires_grad_(True)
    y = module.forward(leaf * 1.0)
    if y.shape != x.shape:
        raise _ShapeChanged
    (dy,) = torch.autograd.grad(y.sum(), leaf)
    return y.detach(), dy


def _quadrature(module: nn.Module, q: float) -> Gain:
    """E[f(y)^2]/q and E[f'(y)^2], evaluating the module itself on the nodes."""
    name = type(module).__name__
    x, w = _nodes(q, tuple(sorted(set(_breakpoints(module)))))
    try:
        y, dy = _evaluate(module, x)
    except _ShapeChanged:
        return (None, None), f"{name} changed the shape of its input"
    except Exception as e:  # noqa: BLE001 -- any failure means "no closed form here"
        return (None, None), f"{name} could not be evaluated elementwise: {e}"
    y, dy = y.double(), dy.double()
    fwd = float(torch.dot(w, y * y)) / q
    bwd = float(torch.dot(w, dy * dy))
    if not (math.isfinite(fwd) and math.isfinite(bwd)):
        return (None, None), f"{name} is not finite on a Gaussian input of variance {q}"
    return (fwd, bwd), None


# Where a unit's pre-activation lies at init (a few sd of an O(1) signal), in float32, the
# precision a probe usually runs in (GELU's 1 + erf rounds to 0 there below y ~ -5.4).
ZERO_GRID = torch.arange(-1200, 1201, dtype=torch.float32) / 100  # 0 exactly among them
# A zero output whose slope is at most this gets no gradient to speak of: dead.
DEAD_SLOPE = 1e-3


def live_at_zero(module: nn.Module, zero_input: bool = False,
                 values: Values | None = None) -> str | None:
    """Why a unit of this activation that is zero for every sample is not dead, or None
    where it may be. Dead means no gradient: ReLU's zeros (slope 0 on y <= 0), a
    Hardswish's below -3, GELU's below -5.4 (slope < 1e-6). A SiLU, tanh or LeakyReLU
    is zero at inputs of O(1) only at y = 0, where its slope is not small: such a unit's
    input is exactly zero (a zero-initialized weight, a gate) and it learns.
    ``zero_input``: the activation's whole input was zero, so only y = 0 counts (a GELU
    fed zeros learns). Read off the module on a grid of inputs (as the gains' quadrature
    reads it); None where that fails."""
    name = type(module).__name__
    a = prelu_slope(module, values)
    if a is not None:
        return None if abs(a) <= DEAD_SLOPE else (
            f"{name}'s slope {a:.3g} on y < 0 passes gradient: none of its units die")
    try:
        y, dy = _evaluate(module, ZERO_GRID)
    except Exception:  # noqa: BLE001 -- not evaluable elementwise: it may die
        return None
    zero = y == 0
    if zero_input:
        zero &= ZERO_GRID == 0
    slopes = dy[zero].abs()
    if slopes.numel() == 0 or float(slopes.min()) <= DEAD_SLOPE:
        return None  # zero only by underflow, or somewhere without gradient: it may die
    slope = f"{float(slopes.min()):.3g}"
    if zero_input:
        return f"{name}'s whole input was zero, where its slope is {slope}: its units learn"
    return (f"{name} is zero on |y| <= 12 only where its slope is at least {slope}: a unit "
            "zero for every sample gets gradient and learns")
