"""A rectifier of a residual sum: relu(y + relu(w)), not relu of a Gaussian.

A post-activation ResNet block (and an SE block) ends in z = y + r, r = f(w) the
rectified stream of the block before, y the block's zero-mean branch. z is no
Gaussian: r sits at exactly 0 with probability P(w < 0), so z has the branch's own
density there, and its positive part is a truncated normal shifted by y. The Gaussian
of z's mean and variance misses that: on the bench's SE-ResNet its density at 0 is
0.40 where the mixture's is 0.51 (the gate's gradient goes with its square), and
E[f(z)^2] after the block is 5-13% low on the post-activation ResNets
(docs/engine.md, Known limits).

With y ~ N(mu_y, v_y) independent of w ~ N(mu_w, v_w) (an eval-mode BatchNorm's
channel means counted in v_y), everything the walk reads of f(z) is an expectation
over w of the Gaussian closed forms at the shifted mean c = f(w) + mu_y
(theory.gains.rectified_moments):

    E[f(z)^k] = E_w[ E[f(N(c, v_y))^k] ],  E[f'(z)^2] likewise,
    E[f'(z)] = E_w[Phi(c/s) + a (1 - Phi(c/s))],  E[f''(z)] = (1 - a) E_w[phi(c/s)/s]

(s^2 = v_y, a the slope below 0), by quadrature over w with its kink at 0. Where w,
the previous rectifier's input, is itself such a sum (the block before), the
expectation runs over its own branch and stream, that stream's input taken as Gaussian
(two levels; with w taken as Gaussian, E[f''] of the second block's sum is 6.5% low
in a float64 Monte Carlo, with the two levels exact to 1e-4); else over the Gaussian
of w's mean and variance.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from varprobe.theory import norms
from varprobe.theory.gains import Values, _nodes, expectation, prelu_slope, rectified_moments
from varprobe.theory.signal import Grad, Signal, Value

RECTIFIERS = (nn.ReLU, nn.LeakyReLU)

Pre = tuple  # f(w), w ~ N(mu, var): (mu, var, slope a, w's own Mix or None, E[w̄_u^2])
Mix = tuple  # N(mu_y, v_y) + f(w): (v_y, mu, var, a, mu_y, w's own Mix or None)


def pre(module: nn.Module, mu: float, s: Signal, inner: Mix | None = None) -> Pre | None:
    """What a rectifier's output is, for an add (or a max pool) after it: f(w) at its
    input's moments (``s``, the common mean ``mu``), w's own mixture where w is itself a
    residual sum (kept one level deep), and E[w̄_u^2] of its units' own means over the
    batch (a conv's w_c . E[x], the same at every position: pools.rectified_max)."""
    if not isinstance(module, RECTIFIERS) or s.m2 - mu * mu <= 0:
        return None
    return (mu, s.m2 - mu * mu, prelu_slope(module),
            None if inner is None else (*inner[:5], None), s.mean_share * s.m2)


def joined(shares: list[float], pres: list[Pre | None]) -> Pre | None:
    """The ``pre`` of rectifier outputs concatenated (``shares``: each piece's part of
    the elements), where it is one again: f(w) of centred w (no common mean, no unit
    means of their own: a BatchNorm's output before its ReLU) under one slope, w's
    variance the pieces' weighted mean (an Inception module's branches)."""
    if not pres or any(p is None or p[0] != 0 or p[3] is not None or p[4] > 0
                       or p[2] != pres[0][2] for p in pres):
        return None
    return (0.0, sum(f * p[1] for f, p in zip(shares, pres)), pres[0][2], None, 0.0)


def mix(terms: list[tuple[float, float, Pre | None, Signal, float, Mix | None]]) -> Mix | None:
    """The sum of a branch and one rectified stream, each added once:
    ``terms`` (f_i, m_i, pre_i, signal_i, mu_i, mix_i) of the add's inputs. A branch
    added to such a sum (a pre-activation stage after a ReLU'd stem) joins its branch."""
    if len(terms) != 2 or any(abs(f - 1) > 1e-12 or abs(m - 1) > 1e-12
                              for f, m, *_ in terms):
        return None
    streams = [t for t in terms if t[2] is not None]
    branches = [t for t in terms if t[2] is None]
    if not streams and sum(t[5] is not None for t in terms) == 1:
        (m0,), (_, _, _, s, mu, _) = [t[5] for t in terms if t[5] is not None], \
            [t for t in terms if t[5] is None][0]
        return (m0[0] + s.m2 - mu * mu, *m0[1:4], m0[4] + mu, m0[5]) \
            if s.m2 - mu * mu >= 0 else None
    if len(streams) != 1 or len(branches) != 1:
        return None
    _, _, _, s, mu, _ = branches[0]
    if s.m2 - mu * mu <= 0 and s.m2 != 0:  # an exactly zero branch: z = f(w)
        return None
    p = streams[0][2]
    if s.m2 == 0 and p[2] == 0 and p[3] is not None and p[3][0] <= 0 and p[3][4] == 0:
        return p[3]  # a ReLU's stream that is a zero-branch sum itself: z is that sum
    return (s.m2 - mu * mu, *p[:3], mu, p[3])


def normalized(module: nn.Module, v: Value | None, values: Values | None) -> Mix | None:
    """A train-mode BatchNorm of ``v``, a rectifier's output f(w) (its ``pre``) or a
    sum y + f(w) (its ``mix``): every channel becomes k (z - E[z]) + beta with one
    k = gamma / sqrt(Var[z] + eps) > 0 (the same gamma for all, as at init), and
    k f(w) = f(k w) (f is positively homogeneous), so the result is again such a sum:
    the branch scaled by k, none for f(w) alone. A ReLU after it is open only where
    w > (k E[f] - beta)/k (a third of the time after a ReLU, not half), and the
    rectifier before it passes all of what that one did (k_V: a pre-activation block
    after a ReLU'd stem)."""
    if v is None or v.pre is None and v.mix is None or \
            not isinstance(module, norms.BATCH_NORMS) or norms.uses_running_stats(module):
        return None
    m, p = v.mix, v.pre
    v_y, mu, var, a, _, inner = m if m is not None else (0.0, *p[:3], 0.0, p[3])
    gammas = norms.param_values(module.weight, 1.0, values) if module.affine else [1.0]
    betas = norms.param_values(module.bias, 0.0, values) if module.affine else [0.0]
    if min(gammas) != max(gammas) or min(gammas) <= 0 or min(betas) != max(betas):
        return None
    if inner is None:
        mean, m2, _ = rectified_moments(a, mu, var)
    else:  # w itself a sum: f(w)'s moments over it, and k w = the sum scaled by k
        mean, m2 = (_over_w(inner, lambda c, t, big, phi, *_, n=n: _moment(
            c, t, big, phi, a, inner[0], n)) for n in (1, 2))
    k = gammas[0] / math.sqrt(v_y + max(m2 - mean * mean, 0.0) + module.eps)
    if inner is not None:
        inner = (k * k * inner[0], k * inner[1], k * k * inner[2], inner[3], k * inner[4],
                 None)
    return (k * k * v_y, k * mu, k * k * var, a, betas[0] - k * mean, inner)


def activate(module: nn.Module, m: Mix) -> tuple[Signal, float, float] | None:
    """(E[f(z)^2] with its mean share, E[f(z)], E[f'(z)^2]) for z = N(0, v_y) + f(w)."""
    if not isinstance(module, RECTIFIERS) or prelu_slope(module) is None:
        return None
    mean, m2, slope2 = (_over_w(m, lambda c, t, big, phi, a, *_, k=k: _moment(c, t, big, phi,
                                                                          a, m[0], k))
                        for k in (1, 2, 0))
    share = min(1.0, mean * mean / m2) if m2 > 0 else 0.0
    return Signal(m2, share, share), mean, slope2


def slopes(module: nn.Module, m: Mix) -> tuple[float, float, float] | None:
    """(E[f'], E[f'^2], E[f'']) at z = N(0, v_y) + f(w) (module note)."""
    b = prelu_slope(module) if isinstance(module, RECTIFIERS) else None
    if b is None:
        return None
    sigma = math.sqrt(m[0])
    d1 = _over_w(m, lambda c, t, big, phi, *_: big + b * (1 - big))
    d1_2 = _over_w(m, lambda c, t, big, phi, *_: big + b * b * (1 - big))
    d2 = _over_w(m, lambda c, t, big, phi, *_: (1 - b) * phi / sigma) if sigma > 0 else 0.0
    return d1, d1_2, d2


def _moment(c, t, big, phi, a, v_y: float, k: int) -> torch.Tensor:
    """E[f(y)^k] (k = 1, 2) or E[f'(y)^2] (k = 0) for y ~ N(c, v_y), per point c."""
    sigma = math.sqrt(v_y)
    if k == 0:
        return big + a * a * (1 - big)
    if k == 1:
        pos = c * big + sigma * phi
        return pos + a * (c - pos)
    pos = (c * c + v_y) * big + c * sigma * phi
    return pos + a * a * (c * c + v_y - pos)


def _over_w(m: Mix, fn) -> float:
    """E_w[fn(c, t, Phi(t), phi(t), a, w > 0)], c = f(w) + mu_y the mean of z given w,
    t = c / sqrt(v_y)."""
    v_y, mu, var, a, mu_y, inner = m

    def at(w: torch.Tensor) -> torch.Tensor:
        c = torch.where(w > 0, w, a * w) + mu_y
        if v_y <= 0:  # z = c exactly: a rectifier's slope at 0 is its slope below
            return fn(c, c, (c > 0).to(c.dtype), torch.zeros_like(c), a, w > 0)
        t = c / math.sqrt(v_y)
        big = 0.5 * torch.erfc(-t / math.sqrt(2))
        phi = torch.exp(-t * t / 2) / math.sqrt(2 * math.pi)
        return fn(c, t, big, phi, a, w > 0)

    if inner is None:
        return expectation(lambda y: at(y + mu), var, (-mu,))
    # w is itself a residual sum, N(mu_0, v_0) + f(w_0), w_0 Gaussian: over both
    v_0, mu_w0, var_0, a_0, mu_0 = inner[:5]
    ys, weights = _nodes(v_0, ())

    def outer(y: torch.Tensor) -> torch.Tensor:
        w0 = y + mu_w0
        c0 = torch.where(w0 > 0, w0, a_0 * w0) + mu_0
        return (at(c0[:, None] + ys[None, :]) * weights[None, :]).sum(1)

    return expectation(outer, var_0, (-mu_w0,))


@functools.lru_cache(maxsize=512)
def stream_factors(m: Mix) -> tuple[float, float, float, float]:
    """(k_S, k_0, k_C, k_V): how the rectified stream's own mask f'(w) meets the rectifier
    of the sum after it, taken as the stream's (slope a). Going back into the stream,
    the sum's shared gradient Ū E[f'(z)] and curvature Ū E[f''(z)] meet f'(w) at the
    stream's rectifier, and E[f'(w) f'(z)], E[f'(w)^2 f''(z)] are not the products of
    their means (z crosses 0 mostly where the stream is 0):
    k_S = E[f'(w) f'(z)] / (E[f'(w)] E[f'(z)]), k_C = E[f'(w)^2 f''(z)] /
    (E[f'(w)^2] E[f''(z)]); where w crosses 0 the stream is 0 and z = y:
    k_0 = E[f'(y)] / E[f'(z)], y ~ N(mu_y, v_y). The gradient's variance that passed
    the sum's rectifier meets the stream's likewise: k_V = E[f'(w)^2 f'(z)^2] /
    (E[f'(w)^2] E[f'(z)^2]) (the two masks are open together more often than apart)."""
    a = m[3]

    def masked(power: int, term) -> float:
        return _over_w(m, lambda c, t, big, phi, b, up: torch.where(
            up, torch.ones_like(c), torch.full_like(c, a ** power)) * term(big, phi))

    def plain(term) -> float:
        return _over_w(m, lambda c, t, big, phi, *_: term(big, phi))

    def slope(big, phi):
        return big + a * (1 - big)

    def slope2(big, phi):
        return big + a * a * (1 - big)

    def one(big, phi):
        return torch.ones_like(big)

    def density(big, phi):
        return phi

    d1 = plain(slope)
    k_s = masked(1, slope) / (masked(1, one) * d1)
    if m[0] > 0:
        k_c = masked(2, density) / (masked(2, one) * plain(density))
        above = 0.5 * math.erfc(-m[4] / math.sqrt(2 * m[0]))
    else:  # z = f(w) + mu_y exactly: no density at 0 (no curvature), z = mu_y below;
        # at mu_y = 0 (a zeroed branch: zero_init_residual) z = f(w), open just above 0
        k_c, above = 1.0, float(m[4] >= 0)
    k_v = masked(2, slope2) / (masked(2, one) * plain(slope2))
    return k_s, (above + a * (1 - above)) / d1, k_c, k_v


def deferred(grad: Grad, g: Grad, x: Value | None, a2: float) -> Grad:
    """Toward a residual sum's rectified stream f(w) (an input ``x`` with ``pre``): the
    excess that the gradient which passed a rectifier of the sum (or of a BatchNorm of
    it) carries, k_V - 1 of its variance, scaled by ``a2``; the stream's rectifier
    applies it. Into a sum that holds the stream (``mix``) it is carried on."""
    if g.rectified and x is not None and x.pre is not None:
        grad.deferred = g.rectified * a2
    elif g.rectified and x is not None and x.mix is not None:
        grad.rectified = g.rectified * a2
    return grad


def rectified(g: Grad, x: Value | None) -> Grad:
    """Mark what passed the rectifier of a residual sum (or of a BatchNorm of one): its
    mask and the stream's are open together more often than apart, k_V - 1 of its
    variance in excess."""
    if x is not None and x.mix is not None:
        g.rectified = g.var * (stream_factors(x.mix)[3] - 1)
    return g
