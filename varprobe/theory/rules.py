"""One step per recorded module call: forward (second moment, shared mean) and backward.

He et al. 2015's recursion for a weight layer,

    forward   E[y^2] = n E[w^2] E[x^2] + mean(b^2)
    backward  Var[dx] = n^ E[w^2] Var[dy]

with the effective fans (theory.layer_fans.effective_fans: taps on zero padding do not
count forward; with stride an input feeds fewer than k outputs backward). Activations
apply their gains at the predicted input (closed form for rectifiers at any mean,
quadrature otherwise), norms reset the scale (theory.norms), dropout scales it by
1/(1-p), identity-like modules keep it. Each function returns None where it has no
closed form; the walk then carries the measured value past the call.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn

from varprobe.report import Layer
from varprobe.theory import correlation, norms, pools
from varprobe.theory.gains import (
    Values,
    _attributes,
    _breakpoints,
    both_gains,
    expectation,
    prelu_slope,
    rectified_moments,
)
from varprobe.theory.layer_fans import is_linear_map
from varprobe.theory.signal import Signal
from varprobe.theory.weights import Weights


class _Empty(type):
    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, nn.Sequential) and len(obj) == 0


class EmptySequential(metaclass=_Empty):
    """``isinstance``: an nn.Sequential with no modules, which returns its input
    (pytorch-cifar's identity shortcut, ``nn.Sequential()``)."""


IDENTITY_LIKE = (nn.Identity, EmptySequential, nn.Flatten, nn.Unflatten)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)  # not the alpha kinds
CENTRED = 1e-6  # mu^2/q below this: the input of an activation counts as zero-mean
SQRT_2PI = math.sqrt(2 * math.pi)
RECTIFIERS = (nn.ReLU, nn.LeakyReLU)  # one fixed slope: closed-form moments at any mean
KEEP_MEAN = (*DROPOUTS, *IDENTITY_LIKE)


SCALES = ("scalar_embed_scale", "embed_scale")  # a scaled word embedding's factor


def lookup_scale(module: nn.Embedding, values: Values | None = None) -> float | None:
    """What an embedding multiplies the rows it looks up by: a scaled word embedding's
    factor (transformers' ``*ScaledWordEmbedding``, Gemma's sqrt(d), BART's with
    scale_embedding: ``scalar_embed_scale``, or ``embed_scale``, a number or a one-element
    buffer copied in the pass's transfer), else 1: nn.Embedding's own forward, or an
    override that looks its rows up at other ids (the learned positional embeddings of
    OPT, BART and Whisper). None: a buffer with no value (meta)."""
    for name in SCALES:
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            found = norms.param_values(value, math.nan, values)[0]
            return None if math.isnan(found) else found
    return 1.0


def forward(layer: Layer, module: nn.Module, s: Signal | None, w: Weights | None,
            values: Values | None = None, mu: float = 0.0) -> Signal | None:
    """The predicted output of one call from its predicted input; None: no closed form.
    ``mu``: the mean every element of the input shares (see ``activate``)."""
    if isinstance(module, nn.Embedding) and w is not None:
        scale = lookup_scale(module, values)  # a lookup: E[y^2] = E[w^2] scale^2, no mean
        return None if scale is None else Signal(w.w2 * scale * scale)
    if s is None:
        return None
    if layer.kind == "weight":
        if (w is None or not is_linear_map(module)
                or layer.effective_fan_in is None):
            return None
        n_w2 = layer.effective_fan_in * w.w2
        spread, common = n_w2 * s.m2, n_w2 * min(mu * mu, s.m2)
        y2, mean = through_weights(n_w2, s.m2, mu, w)
        if y2 <= 0:
            return Signal(y2)
        return Signal(y2, (max(spread * s.mean_share - common, 0.0) + mean) / y2,
                      (max(spread * s.r - common, 0.0) + mean) / y2)
    if layer.kind == "activation":
        out = activate(module, s, mu, values)
        return None if out is None else out[0]
    if layer.kind == "norm":
        return norms.forward(module, s, values, mu)
    if isinstance(module, DROPOUTS):
        if not module.training:
            return s
        return None if module.p >= 1 else Signal(s.m2 / (1 - module.p),
                                                 s.mean_share * (1 - module.p),
                                                 s.r * (1 - module.p))
    if isinstance(module, IDENTITY_LIKE):
        return s
    if isinstance(module, nn.GLU):
        out = glu(s, mu, values)
        return None if out is None else out[0]
    pool = pools.of_module(module, layer.input_shape, layer.shape)
    exact = pools.exact(pool, s, mu) if pool is not None else None
    return exact[0] if exact is not None else None


def through_weights(n_w2: float, m2: float, mu: float, w: Weights) -> tuple[float, float]:
    """(E[y^2], the part of it that is mean(b + mu S)^2) of a weight layer whose input
    has E[x^2] = m2 and a mean mu every element shares. That mean reaches output unit o
    as mu S_o, S_o the sum of its weights: E[S^2] = n E[w^2] for independent draws,
    0 where each unit's weights sum to zero (weight standardization), the actual
    weights' own where measured (theory.weights row_share); it meets the bias there."""
    common = n_w2 * min(mu * mu, m2)  # a mean holds no more than E[x^2] (a walk whose
    # mean and E[x^2] come from different places: a scheme's scale, a carried mean)
    mean = max(w.b2 + 2 * mu * w.bias_cross + w.row_share * common, 0.0)
    return max(n_w2 * m2 - common, 0.0) + mean, mean


def backward(layer: Layer, module: nn.Module, grad: float | None, s: Signal | None,
             w: Weights | None, values: Values | None = None, mu: float = 0.0) -> float | None:
    """Var of the gradient at the call's input from the one at its output."""
    if grad is None:
        return None
    if layer.kind == "weight":
        if (w is None or not is_linear_map(module)
                or layer.effective_fan_out is None):
            return None
        return layer.effective_fan_out * w.w2 * grad
    if layer.kind == "activation":
        out = activate(module, s, mu, values) if s is not None else None
        return None if out is None or out[2] is None else out[2] * grad
    if layer.kind == "norm":
        factor = norms.backward(module, s, values, mu)
        return None if factor is None else factor * grad
    if isinstance(module, DROPOUTS):
        if not module.training:
            return grad
        return None if module.p >= 1 else grad / (1 - module.p)
    if isinstance(module, IDENTITY_LIKE):
        return grad
    if isinstance(module, nn.GLU):
        out = glu(s, mu, values) if s is not None else None
        return None if out is None or out[2] is None else out[2] * grad
    pool = pools.of_module(module, layer.input_shape, layer.shape)
    return None if pool is None else grad * pools.backward(pool)


def activate(module: nn.Module, s: Signal, mu: float = 0.0, values: Values | None = None,
             ) -> tuple[Signal, float, float | None] | None:
    """An elementwise activation of y with E[y^2] = q and common mean mu (every unit
    shifted alike, as after a rectifier passed on by a residual add): (E[f(y)^2] with
    its mean share, E[f(y)], E[f'(y)^2]) by quadrature over y = mu + N(0, q - mu^2);
    the closed forms of theory.gains when mu is 0. None: no closed form.

    A per-unit mean's share of E[y^2] (a conv of a rectified input: w_c . E[x]) is the
    correlation of two samples at one unit, so the output's is the activation's map of
    it (theory.correlation; ReLU: 1/pi at 0, 0.70 at a max pool's 0.64): a stack
    without norms drifts toward 1, as mean-field theory has it."""
    if isinstance(module, nn.GLU):
        return glu(s, mu, values)
    if mu * mu <= CENTRED * s.m2:
        g, slope2 = both_gains(module, s.m2, values)
        if g is None:
            return None
        share = activation_share(module, s.m2, g, values)
        if s.mean_share > 0:  # units with means of their own: samples correlate at a unit
            share = max(share, token_correlation(module, s.mean_share, s.m2))
        r = max(share, token_correlation(module, s.r, s.m2))
        return Signal(g * s.m2, share, r), activation_mean(module, s.m2, 0.0), slope2
    var = s.m2 - mu * mu
    if var <= 0:
        return None
    if isinstance(module, RECTIFIERS):
        a = prelu_slope(module)
        mean, m2, slope2 = rectified_moments(a, mu, var)
        between = min(s.mean_share * s.m2 - mu * mu, var)
        means = _unit_means(a, mu, var, between) if between > 0 else mean * mean
        share = min(1.0, means / m2) if m2 > 0 else 0.0
        return Signal(m2, share, max(share, s.r)), mean, slope2
    try:
        kinks = _kinks(module, mu)
        m2 = expectation(lambda y: _apply(module, y + mu) ** 2, var, kinks)
        mean = activation_mean(module, var, mu)
        slope2 = expectation(lambda y: _slope(module, y + mu) ** 2, var, kinks)
    except Exception:  # noqa: BLE001 -- a module that cannot run on a vector of points
        return None
    share = min(1.0, mean * mean / m2) if m2 > 0 else 0.0
    return Signal(m2, share, max(share, s.r)), mean, slope2


def _unit_means(a: float, mu: float, var: float, between: float) -> float:
    """E_m[E[f(mu + m + e) | m]^2], m ~ N(0, between), e ~ N(0, var - between): the
    square of each unit's own mean after a rectifier of slope a below 0, where the
    units' means spread by ``between`` around mu. Scale-free: taken at unit variance
    with mu and between at 3 significant digits (a deep stack repeats them)."""
    if var - between <= 0:
        return rectified_moments(a, mu, var)[1]  # each unit constant: all of it a mean
    sd = math.sqrt(var)
    return var * _unit_means_at(a, float(f"{mu / sd:.3g}"), float(f"{between / var:.3g}"))


@functools.lru_cache(maxsize=1024)
def _unit_means_at(a: float, mu: float, between: float) -> float:
    sd = math.sqrt(1.0 - between)

    def squared(m: torch.Tensor) -> torch.Tensor:
        c = (mu + m) / sd
        above = sd * (c * torch.special.ndtr(c) + torch.exp(-0.5 * c * c) / SQRT_2PI)
        return ((1 - a) * above + a * (mu + m)) ** 2
    return expectation(squared, between, (-mu,)) if between > 0 else \
        rectified_moments(a, mu, 1.0)[0] ** 2


def token_correlation(module: nn.Module, r: float, q: float) -> float:
    """The activation's map of the uncentered token correlation (theory.correlation:
    the arc-cosine kernel for ReLU, 2-D quadrature otherwise), linear between the
    points of a grid in r (steps of 1/RHO_STEPS; the map is smooth and convex, so the
    error is below 1e-3) at 3 significant digits of q: a deep stack computes a handful
    of quadratures, not one per layer."""
    if isinstance(module, nn.ReLU):
        return correlation.relu(r)
    r = min(max(r, 0.0), 1.0)
    j = min(int(r * RHO_STEPS), RHO_STEPS - 1)
    t = r * RHO_STEPS - j
    lo, hi = (_correlation_at(module, k, float(f"{q:.3g}")) for k in (j, j + 1))
    return lo + t * (hi - lo)


RHO_STEPS = 20


def _correlation_at(module: nn.Module, k: int, q: float) -> float:
    key = (type(module), _attributes(module), k, q)
    if key not in _CORRELATIONS:
        try:
            _CORRELATIONS[key] = correlation.activation(k / RHO_STEPS, module, q,
                                                        _breakpoints(module))
        except Exception:  # noqa: BLE001 -- no map: the correlation the mean gives stays
            _CORRELATIONS[key] = 0.0
    return _CORRELATIONS[key]


_CORRELATIONS: dict[tuple, float] = {}


def activation_share(module: nn.Module, q: float, g: float,
                     values: Values | None = None) -> float:
    """E[f(y)]^2 / E[f(y)^2] for y ~ N(0, q): the mean every unit shares after f."""
    if isinstance(module, nn.PReLU):  # the mean slope, where the gain has the rms one
        slopes = norms.param_values(module.weight, float(module.init), values)
        a = sum(slopes) / len(slopes)
    else:
        a = prelu_slope(module, values)
    if a is not None:
        mean = (1 - a) * math.sqrt(q / (2 * math.pi))
    else:
        mean = activation_mean(module, q, 0.0)
    return min(1.0, mean * mean / (g * q)) if g * q > 0 else 0.0


def activation_mean(module: nn.Module, var: float, mu: float) -> float:
    """E[f(mu + N(0, var))]: the mean an activation gives every unit (0 where no mean
    is known: the output taken as centred)."""
    if var <= 0:
        return 0.0
    if isinstance(module, RECTIFIERS):
        return rectified_moments(prelu_slope(module), mu, var)[0]
    return _remembered((type(module), _attributes(module), var, mu), lambda: expectation(
        lambda y: _apply(module, y + mu), var, _kinks(module, mu)), 0.0)


def mean_slope(module: nn.Module, var: float, mu: float) -> float | None:
    """E[f'(mu + N(0, var))]: what a gradient shared by many positions keeps through
    the activation, E[f'(y_i) f'(y_j)] ~ E[f']² for weakly correlated y_i, y_j (None
    where no slope is known: nothing kept)."""
    if var <= 0:
        return None
    return _remembered((type(module), _attributes(module), var, mu, "slope"), lambda: (
        expectation(lambda y: _slope(module, y + mu), var, _kinks(module, mu))), None)


def _kinks(module: nn.Module, mu: float) -> tuple[float, ...]:
    return tuple(b - mu for b in (0.0, *_breakpoints(module)))


def _remembered(key: tuple, compute: Callable[[], float], fallback: float | None,
                ) -> float | None:
    """``compute()`` once per key, ``fallback`` where it raises: a deep stack repeats
    the same (var, mu). Bounded, for a process that probes many models."""
    if key not in _MEANS:
        if len(_MEANS) >= 65536:
            _MEANS.clear()
        try:
            _MEANS[key] = compute()
        except Exception:  # noqa: BLE001 -- a module that cannot run on a vector of points
            _MEANS[key] = fallback
    return _MEANS[key]


_MEANS: dict[tuple, float | None] = {}


def glu(s: Signal, mu: float = 0.0, values: Values | None = None,
        ) -> tuple[Signal, float, float | None] | None:
    """GLU, a * sigmoid(b) with a and b the two halves of one tensor, taken as independent
    factors alike in E[x²] and mean: E[y²] = E[a²] E[σ(b)²]. Backward, half of the input's
    elements get Var[dy] E[σ(b)²] (the a half), half Var[dy] E[a²] E[σ'(b)²] (the b half):
    their mean is the gain."""
    gate = activate(nn.Sigmoid(), s, mu, values)
    if gate is None:
        return None
    sig, mean, gain = gate
    back = None if gain is None else 0.5 * (sig.m2 + s.m2 * gain)
    return (Signal(s.m2 * sig.m2, s.mean_share * sig.mean_share, s.r * sig.r), mu * mean,
            back)


def mean_after(module: nn.Module, mu: float, values: Values | None = None,
               w: Weights | None = None) -> float:
    """The common mean after a module other than an activation: kept by dropout and
    identities, mean(beta) after a norm, mean(b) after a weight layer (its weights give
    each unit a mean of random sign), lost elsewhere."""
    if isinstance(module, KEEP_MEAN):
        return mu
    if w is not None:
        return w.b1
    if norms.is_norm(module):
        return norms.mean_beta(module, values)
    return 0.0


def _apply(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module.forward(y.clone()).to(torch.float64)


def _slope(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        leaf = y.clone().requires_grad_(True)
        (dy,) = torch.autograd.grad(module.forward(leaf * 1.0).sum(), leaf)
    return dy.to(torch.float64)
