"""BatchNorm's channels in closed form: what the walks with no measured channel shape
(a scheme's, ``varprobe predict``'s) use where a probe measures it (theory.normshape).

A train-mode BatchNorm divides each channel by its own batch variance v_c, so its
backward gain is mean_c(gamma_c^2/(v_c + eps)), and v_c is not the walk's
m2 (1 - mean_share). Two things set it apart, both carried here per node:

- ``rel``, the channels' spread: with i.i.d. weights a conv's channel c has variance
  v_c = sum_j w_cj^2 s_j over its fan-in j (s_j the input's variance there), so over
  channels Var[v_c]/E[v_c]^2 = (kappa - 1)(1 + rel_in)/n, kappa = E[w^4]/E[w^2]^2 the
  weights' kurtosis (3 Gaussian, 9/5 uniform), n the fan-in, rel_in the input's own
  spread. Taken as a Gamma law (the chi-square of Gaussian weights: exact there),
  mean_c(1/v_c) mean_c(v_c) = 1/(1 - rel): 1.08 after the fan-in-27 stem of an image.
  BatchNorm sets every channel to gamma_c^2 (rel = the spread of gamma^2), activations
  keep it, a sum of independently drawn branches weighs each part's by its V^2.
- ``pos``, the share of E[x^2] that is a per-unit mean which changes with the
  position inside a channel. The walk's mean_share counts it as mean; BatchNorm, which
  takes one mean per channel over the batch and the positions, counts it as variance.
  A zero-padded conv of an input whose channel means are constant makes it: the mean
  at output i is sum_{t in bounds(i)} u_t (u_t = sum_c' w_c'ct m_c', i.i.d. over the
  taps), so of its mean energy a fraction phi = 1 - sum_t f_t^2 / sum_t f_t varies with
  i (f_t the share of the outputs where tap t is in bounds): 0.080 for 3x3 taps on
  16x16. The part that already varied passes as it is; BatchNorm keeps it (it removes
  only the channel's mean), a rectifier passes E[f']^2 of it, a global pool ends it.

Then V = m2 (1 - mean_share + pos) and the gain is mean(gamma^2)/(1 - rel)/(V + eps).
``predict`` uses it as it is. A scheme over a measured pass (``walk_gain``) also has the
actual weights' measured gain there (theory.normshape): it multiplies its own closed
form by that over the closed form for the actual weights, which keeps what the closed
form leaves out (the spread a hidden conv's correlated inputs add) and moves what the
scheme changes (a pre-activation stack whose stem, at a scheme's fan-in variance,
outweighs its branches: the stream's mean share and spread are the stem's, not those
of the actual weights' branch-dominated stream).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import repeat

import torch
import torch.nn.functional as F
from torch import nn

from varprobe.theory import norms, normshape, pools, tapmaps
from varprobe.theory.layer_fans import kernel_fits
from varprobe.theory.signal import Signal

GAUSSIAN = 3.0  # E[w^4]/E[w^2]^2 of Gaussian weights (every scheme's draw)


@dataclass(frozen=True)
class Channels:
    """Per node: ``rel`` = Var_c[v_c]/E_c[v_c]^2 of the per-channel variances, ``pos``
    = the share of E[x^2] that is a per-unit mean varying over positions."""

    rel: float = 0.0
    pos: float = 0.0
    miss: float = 0.0  # of the per-unit mean share, what the walk's mean_share lacks

    def __init__(self, rel: float = 0.0, pos: float = 0.0, miss: float = 0.0) -> None:
        # set in one step, as theory.signal.Signal: every node of every sweep makes one
        d = self.__dict__
        d["rel"], d["pos"], d["miss"] = rel, pos, miss


ALIKE = Channels()


def mean_share(s: Signal, ch: Channels) -> float:
    """The per-unit mean's share of E[x^2]: the walk's, and the positional means a
    BatchNorm left, which the walk takes as gone."""
    return min(1.0, s.mean_share + ch.miss)


def variance(s: Signal, ch: Channels) -> float:
    """mean_c v_c, as BatchNorm takes it: the variance and the positional means."""
    return s.m2 * min(1.0, max(0.0, 1.0 - mean_share(s, ch)) + ch.pos)


def spread_factor(ch: Channels) -> float:
    """mean_c(1/v_c) mean_c(v_c) for Gamma-distributed v_c of relative variance rel."""
    return 1.0 / (1.0 - min(ch.rel, 0.5))


def gain(module: nn.Module, s: Signal, ch: Channels, values) -> float:
    """Train-mode BatchNorm's Var[dx]/Var[dy]: mean(gamma^2) mean_c 1/(v_c + eps)."""
    g2, n, _ = norms.affine_sums(module, values)
    return g2 / n * spread_factor(ch) / (variance(s, ch) + norms.eps_of(module))


def taps(module: nn.Module, input_shape) -> tuple[float, float] | None:
    """(sum_t f_t, sum_t f_t^2) of a zero-padded conv, f_t the share of the output
    positions where tap t lands in bounds; None for other layers. Once per process for
    each geometry and spatial shape: every walk asks it at every conv."""
    spatial = tuple(map(int, (input_shape or ())[2:]))
    if not isinstance(module, nn.modules.conv._ConvNd) or module.transposed \
            or module.padding_mode != "zeros" or not isinstance(module.padding, tuple) \
            or len(spatial) != len(module.kernel_size) or not kernel_fits(module, spatial):
        return None
    key = (module.kernel_size, module.stride, module.padding, module.dilation, spatial)
    if key not in _TAPS:
        if len(_TAPS) > 4096:
            _TAPS.clear()
        _TAPS[key] = _count_taps(module, spatial)
    return _TAPS[key]


_TAPS: dict[tuple, tuple[float, float]] = {}


def _count_taps(module: nn.Module, spatial: tuple) -> tuple[float, float]:
    if (taps := tapmaps.of(module, spatial)) is not None:
        return tapmaps.shares(taps)
    k = math.prod(module.kernel_size)
    onehot = torch.eye(k, dtype=torch.float64).reshape(k, 1, *module.kernel_size)
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(spatial) - 1]
    covered = conv(torch.ones((1, 1, *spatial), dtype=torch.float64), onehot,
                   stride=module.stride, padding=module.padding, dilation=module.dilation)
    f = covered.flatten(2).mean(-1)[0]
    return float(f.sum()), float((f * f).sum())


def fans(module: nn.Module, layer) -> tuple[float | None, float]:
    """(n, phi): the fan-in over which a channel's variance sums its weights' squares,
    each tap weighted by where it lands, (sum_t f_t)^2 / sum_t f_t^2 per input channel;
    and phi = 1 - sum_t f_t^2 / sum_t f_t, the part of a constant channel mean's energy
    that the zero-padded borders make vary over the positions."""
    counted = taps(module, layer.input_shape)
    if counted is None or counted[0] <= 0:
        return layer.fan_in, 0.0
    first, second = counted
    return module.in_channels // module.groups * first * first / second, 1.0 - second / first


def weight_layer(ch: Channels, n: float | None, kappa: float, phi: float,
                 s_in: Signal, no_bias: float, m2_out: float) -> Channels:
    """A conv or Linear with i.i.d. weights: each output channel its own draw.
    ``no_bias``: the output's E[y^2] without the bias (what the input's means give)."""
    rel = (kappa - 1.0) * (1.0 + ch.rel) / n if n else ch.rel
    share = mean_share(s_in, ch)
    pos_in = min(ch.pos, share)
    positional = no_bias * (pos_in + phi * (share - pos_in))
    kept = no_bias / m2_out if m2_out > 0 else 0.0
    return Channels(rel, positional / m2_out if m2_out > 0 else 0.0, ch.miss * kept)


def batch_norm(module: nn.Module, ch: Channels, s_in: Signal, values) -> Channels:
    """Train mode: channel c becomes gamma_c^2 (its spread that of gamma^2); the
    positional means stay, relative to the channel's variance."""
    g2, g4 = _gamma_moments(module, values)
    rel = g4 / (g2 * g2) - 1.0 if g2 > 0 else 0.0
    var = variance(s_in, ch)
    pos = min(ch.pos, mean_share(s_in, ch)) * s_in.m2 / var if var > 0 else 0.0
    out = norms.forward(module, s_in, values)
    kept = min(1.0, pos) * min(1.0, g2 / out.m2 if out is not None and out.m2 > 0 else 1.0)
    return Channels(rel, kept, kept)  # the walk takes the output's unit means as 0


def _gamma_moments(module: nn.Module, values) -> tuple[float, float]:
    """(mean_c gamma_c^2, mean_c gamma_c^4), once per module where ``values`` is a
    norms.Memo (every closed-form walk reads them at every BatchNorm)."""
    memo = getattr(values, "gammas", None)
    if memo is not None and id(module) in memo:
        return memo[id(module)]
    gamma = norms.affine(module, values)[0]
    g2, n, _ = norms.affine_sums(module, values)  # its sum of gamma^2, kept in the Memo
    moments = (g2 / n, sum(map(pow, gamma, repeat(4))) / len(gamma))  # pow is ** (no frame)
    if memo is not None:
        memo[id(module)] = moments
    return moments


def activation(ch: Channels, slope: float | None, m2_in: float, m2_out: float) -> Channels:
    """An elementwise function keeps each channel's share of the variance; a per-unit
    mean that moves with the position moves the output's by E[f'] (taken as E[f'^2]:
    exact for a rectifier, whose f' is 0 or 1)."""
    if slope is None or m2_out <= 0:
        return Channels(ch.rel)
    moved = slope * slope * m2_in / m2_out
    return Channels(ch.rel, min(1.0, ch.pos * moved), min(1.0, ch.miss * moved))


def summed(parts: list[tuple[float, Signal, Channels]], m2_out: float) -> Channels:
    """An add of independently drawn parts (factor f on E[x^2]): the channels'
    variances add, so Var over channels is sum (f V_i)^2 rel_i over (sum f V_i)^2."""
    v = [(f * variance(s, c), c) for f, s, c in parts]
    total = sum(x for x, _ in v)
    rel = sum(x * x * c.rel for x, c in v) / (total * total) if total > 0 else 0.0
    pos = sum(f * s.m2 * min(c.pos, mean_share(s, c)) for f, s, c in parts)
    miss = sum(f * s.m2 * c.miss for f, s, c in parts)
    return Channels(rel, pos / m2_out if m2_out > 0 else 0.0,
                    miss / m2_out if m2_out > 0 else 0.0)


def pooled(pool: pools.Pool, ch: Channels) -> Channels:
    """A mean, sum or max over positions: taken as over all of them (a global pool,
    which leaves no position for a mean to vary over); padding and upsampling keep."""
    return Channels(ch.rel, 0.0, ch.miss) if pool.kind in ("mean", "sum", "max") else ch


def concatenated(parts: list[tuple[float, Signal, Channels]]) -> Channels:
    """Channels side by side (f_i each piece's share of them): the spread of the
    mixture, E_c[v^2]/E_c[v]^2 - 1 over all of them."""
    v = [(f, variance(s, c), c) for f, s, c in parts]
    mean = sum(f * x for f, x, _ in v)
    second = sum(f * x * x * (1.0 + c.rel) for f, x, c in v)
    pos = sum(f * s.m2 * min(c.pos, mean_share(s, c)) for f, s, c in parts)
    miss = sum(f * s.m2 * c.miss for f, s, c in parts)
    m2 = sum(f * s.m2 for f, s, _ in parts)
    return Channels(second / (mean * mean) - 1.0 if mean > 0 else 0.0,
                    pos / m2 if m2 > 0 else 0.0, miss / m2 if m2 > 0 else 0.0)


def sweep(walk) -> list[Channels | None]:
    """``Channels`` of every node of a walk's forward (after it ran), in its order."""
    out: list[Channels | None] = []
    for k, node in enumerate(walk.nodes):
        try:
            out.append(_node(walk, k, node, out))
        except (ArithmeticError, TypeError, ValueError):
            out.append(None)  # its consumers take their channels alike
    return out


def _node(walk, k: int, node, out: list[Channels | None]) -> Channels | None:
    s = walk.values[k].signal
    ins = [(out[i] or ALIKE, walk.values[i].signal) for i in node.inputs if i >= 0]
    ch_in, s_in = ins[0] if ins else (ALIKE, None)
    if node.op == "input" or s is None:
        return ALIKE if node.op == "input" else None
    if node.op == "call":
        return _call(walk, k, node.index, ch_in, s_in, s)
    if node.op == "act":
        return activation(ch_in, walk.backward_gains.get(k), s_in.m2, s.m2)
    if node.op == "pool":
        return pooled(node.pool, ch_in)
    if node.op == "linear" and all(x is not None for _, x in ins):
        parts = [(f, x, c) for f, (c, x) in zip(node.forward, ins)]
        if node.cat:
            return concatenated(parts)
        m2 = sum(f * x.m2 for f, x, _ in parts)
        return summed(parts, m2)
    return ch_in


def _call(walk, k: int, i: int, ch: Channels, s_in: Signal | None, s: Signal) -> Channels:
    layer, module = walk.report.layers[i], walk.modules[i]
    if s_in is None:
        return ALIKE
    if layer.kind == "weight" and (w := walk.weights[i]) is not None:
        n, phi = _layer_fans(walk.host, i, module, layer)
        return weight_layer(ch, n, w.kurtosis, phi, s_in,
                            max(s.m2 - w.b2, 0.0), s.m2)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) \
            and not norms.uses_running_stats(module):
        return batch_norm(module, ch, s_in, walk.host)
    if layer.kind == "activation":
        return activation(ch, walk.backward_gains.get(k), s_in.m2, s.m2)
    pool = pools.of_module(module, layer.input_shape, layer.shape)
    return pooled(pool, ch) if pool is not None else ch


def _layer_fans(values, i: int, module: nn.Module, layer) -> tuple[float | None, float]:
    """``fans`` of layer ``i``, once per annotate where ``values`` is a norms.Memo (every
    closed-form walk's sweep asks it at every weight layer)."""
    memo = getattr(values, "fans", None)
    if memo is None:
        return fans(module, layer)
    if i not in memo:
        memo[i] = fans(module, layer)
    return memo[i]


def walk_gain(walk, node, module: nn.Module, s_in: Signal | None) -> float | None:
    """The train-mode BatchNorm gain a scheme's or ``predict``'s walk uses at ``node``;
    None where the rule is another one (the actual init's walk reads the measured
    shape, eval mode has its running statistics, a depthwise conv's norm keeps the
    per-tensor rule: theory.walk.norm_shape)."""
    if s_in is None or not isinstance(module, nn.modules.batchnorm._BatchNorm) \
            or norms.uses_running_stats(module) or (walk.measured and walk.actual is None) \
            or walk._per_channel_producer(node):
        return None
    mine = _channels(walk)[node.inputs[0]] if node.inputs else None
    if mine is None:
        return None
    own = gain(module, s_in, mine, walk.host)
    shape = walk.norm_shape(node)
    theirs_in = walk.actual.calls[node.index].input if walk.actual is not None else None
    if shape is None or theirs_in is None or theirs_in.signal is None:
        return own
    # a scheme over a measured pass: the actual weights' measured gain corrects what
    # the closed form misses for them (the spread the inputs' correlations add:
    # mean(1/v) mean(v) 1.005-1.02 after a 256-channel conv, 1.0009 in closed form),
    # and the closed form carries the change from the actual weights to the scheme's;
    # it also carries their draw's channel means, which the scheme's draw does not share
    measured, closed = _actual_gains(walk, node, module, shape, theirs_in.signal)
    return own * measured / closed if measured and closed else own


def _actual_gains(walk, node, module: nn.Module, shape, s: Signal) -> tuple:
    """(measured, closed-form) gain of the actual weights at ``node``: the same for
    every scheme's walk, so kept on the actual walk."""
    kept = walk.actual.__dict__.setdefault("_actual_gains", {})
    if id(node) not in kept:
        theirs = _channels(walk.actual)[node.inputs[0]]
        kept[id(node)] = (normshape.backward_gain(module, shape, s),
                          gain(module, s, theirs, walk.host) if theirs else None)
    return kept[id(node)]


def _channels(walk) -> list[Channels | None]:
    cached = getattr(walk, "_channel_sweep", None)
    if cached is None:
        cached = walk._channel_sweep = sweep(walk)
    return cached
