"""Where a conv's taps land: the second moment's profile over positions.

A zero-padded conv's output position i sees only its in-bounds taps, so E[y^2](i) is
proportional to sum_{t in bounds} E[x^2](i + t): a 3x3 'same' conv of a uniform map
gives its border rows 6/9 (its corners 4/9) of the interior's. The effective fan
(theory.layer_fans) is the mean of that count, exact for a uniform input. The next
conv's input is not uniform (BatchNorm divides a channel by one deviation over all
positions and a ReLU halves every position alike, so each keeps its share), and most
of its taps are interior ones, which land on the larger interior values:

    E[y^2] = n_eff E[w^2] E[x^2] * mean_i sum_t e(i + t) / mean_i sum_t 1,

e the input's profile (E[x^2] at each position over the mean). For a 16x16 map and
3x3 taps, e = one conv's count gives (8.375 / 2.875^2)^2 = 1.0265: +2.7% per conv, in
float64 measurements of the bench's ResNets 2-3% per conv. A train-mode BatchNorm
resets the scale after it; an eval-mode one and a residual stream compound it. The
backward is the same count transposed: an input position receives from the outputs
whose taps touch it, in proportion to their gradients' profile.

The walk carries e (a float64 numpy array of the spatial shape, mean 1; None: uniform)
on values and gradients: a conv makes it; elementwise ops, BatchNorm, GroupNorm and
InstanceNorm keep it; an add and a concatenation average it by second moment;
anything else drops it. numpy rather than torch: on maps this small an elementwise
step costs a tenth of torch's, with the same IEEE results.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from varprobe.theory import norms, tapmaps
from varprobe.theory.layer_fans import ELEMENTWISE_LIBRARIES, NORMS, is_activation, kernel_fits
from varprobe.theory.signal import Signal

KEEP = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
        nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def _convolve(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    d = len(module.kernel_size)
    ones = torch.ones((1, 1, *module.kernel_size), dtype=torch.float64)
    if module.transposed:
        conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[d - 1]
        return conv(x, ones, stride=module.stride, padding=module.padding,
                    output_padding=module.output_padding, dilation=module.dilation)
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    return conv(x, ones, stride=module.stride, padding=module.padding,
                dilation=module.dilation)


def _counted(module: nn.Module, spatial: tuple) -> bool:
    return (isinstance(module, nn.modules.conv._ConvNd) and module.padding_mode == "zeros"
            and isinstance(module.padding, tuple) and len(spatial) == len(module.kernel_size)
            and kernel_fits(module, spatial))


def _keeps(module: nn.Module) -> bool:
    """Whether a call keeps its input's profile: an elementwise op or a per-channel
    norm. Once per class where only the class decides (every walk asks at every call)."""
    cls = type(module)
    known = _KEEPS.get(cls)
    if known is None:
        known = isinstance(module, KEEP) or (is_activation(module)
                                             and not isinstance(module, NORMS))
        if cls.__module__ not in ELEMENTWISE_LIBRARIES:  # else its own contents decide
            _KEEPS[cls] = known
    return known


_KEEPS: dict[type, bool] = {}


def _fits(e: Any, spatial: tuple) -> bool:
    return e is not None and tuple(e.shape) == spatial


def _uniform(e: Any, spatial: tuple) -> torch.Tensor:
    if _fits(e, spatial):
        return torch.from_numpy(e)
    return torch.ones(spatial, dtype=torch.float64)


def _memo(step):
    """The same conv on the same profile gives the same answer in every walk (the actual
    init's, each scheme's, the fix's), so each is computed once per process: keyed by
    the conv's geometry, the spatial shape and the profile's bytes."""
    def cached(module: nn.Module, e: Any, input_shape) -> tuple[float, Any]:
        spatial = tuple(map(int, (input_shape or ())[2:]))
        if not spatial or not _counted(module, spatial):
            return 1.0, None
        key = (_key(module), spatial, None if e is None else (e.shape, e.tobytes()))
        found = memo.get(key)
        if found is None:
            if len(memo) > 4096:
                memo.clear()
            found = memo[key] = step(module, e, spatial)
        return found
    memo = _MEMO[step] = {}
    cached.__doc__ = step.__doc__
    return cached


_MEMO: dict = {}


@_memo
def conv_forward(module: nn.Module, e: Any, spatial: tuple) -> tuple[float, Any]:
    """(E[y^2] over the effective-fan rule's, the output's profile)."""
    taps = tapmaps.of(module, spatial)
    if taps is not None:
        y = tapmaps.convolve(e if _fits(e, spatial) else np.ones(spatial), taps)
        mean = tapmaps.mean(y)
        return float(mean) / taps.per_output, y / mean
    x = _uniform(e, spatial)[None, None]
    y = _convolve(module, x)
    base = _count(module, spatial)
    return float(y.mean()) / base, (y / y.mean())[0, 0].numpy()


@_memo
def conv_backward(module: nn.Module, e: Any, spatial: tuple) -> tuple[float, Any]:
    """(Var[dx] over the effective-fan rule's, the input gradient's profile): the
    transposed count (torch's autograd through the convolution of ones where
    theory.tapmaps has no matrices)."""
    taps = tapmaps.of(module, spatial)
    if taps is not None:
        dx = tapmaps.transposed(e if _fits(e, taps.outputs) else np.ones(taps.outputs), taps)
        mean = tapmaps.mean(dx)
        return float(mean) / taps.per_input, dx / mean
    x = torch.ones((1, 1, *spatial), dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        y = _convolve(module, x)
        weight = _uniform(e, tuple(y.shape[2:]))[None, None]
        (dx,) = torch.autograd.grad((y * weight).sum(), x)
    base = _fan_out_count(module, spatial)
    return float(dx.mean()) / base, (dx / dx.mean())[0, 0].detach().numpy()


def _key(module: nn.Module) -> tuple:
    return (module.transposed, module.kernel_size, module.stride, module.padding,
            module.dilation, getattr(module, "output_padding", ()))


def _count(module: nn.Module, spatial: tuple) -> float:
    return _counts(_key(module), spatial, module)[0]


def _fan_out_count(module: nn.Module, spatial: tuple) -> float:
    return _counts(_key(module), spatial, module)[1]


def _counts(key: tuple, spatial: tuple, module: nn.Module) -> tuple[float, float]:
    """Mean in-bounds taps per output, and mean outputs per input position."""
    if (key, spatial) not in _COUNTS and (taps := tapmaps.of(module, spatial)):
        _COUNTS[(key, spatial)] = (taps.per_output, taps.per_input)
    if (key, spatial) not in _COUNTS:
        ones = torch.ones((1, 1, *spatial), dtype=torch.float64)
        total = float(_convolve(module, ones).sum())
        n_out = _convolve(module, ones).numel()
        _COUNTS[(key, spatial)] = (total / n_out, total / ones.numel())
    return _COUNTS[(key, spatial)]


_COUNTS: dict[tuple, tuple[float, float]] = {}


def after_call(module: nn.Module, layer, src: Any, out: Signal | None, w: Any = None
               ) -> tuple[Signal | None, Any, Any]:
    """A call's output, its profile and its centred profile (``centred``): a conv's by
    its count (its bias, alike at every position, blended in), a per-position map's
    kept, a norm that centres each channel's the centred one where its input has one,
    anything else's dropped. ``src``: the input Value; ``w``: the call's Weights."""
    e = src.profile if src is not None else None
    if out is None:
        return out, None, None
    b2 = w.b2 if w is not None else 0.0
    if isinstance(module, nn.modules.conv._ConvNd):
        corr, made = conv_forward(module, e, layer.input_shape)
        if made is None:
            return out, None, None
        spread = max(out.m2 - b2, 0.0) * corr
        m2 = spread + b2
        if m2 <= 0:
            return out, None, None
        shape = made * spread  # (made * spread + b2) / m2, in place
        shape += b2
        shape /= m2
        return Signal(m2, out.mean_share, out.r), shape, centred(
            module, layer, made, spread, src.mu if src is not None else 0.0, w)
    if not _keeps(module):
        return out, None, None
    if src is not None and src.centred is not None and norms.centres_channels(module):
        return out, src.centred, None
    return out, e, None


def centred(module: nn.Module, layer, made: np.ndarray, spread: float, mu: float,
            w: Any) -> np.ndarray | None:
    """The profile of a zero-padded conv's output once each channel's mean over the
    positions is taken out (a train-mode BatchNorm, an InstanceNorm, a GroupNorm). A
    mean mu every input element shares reaches output o at p as mu S_o(p), S_o(p) its
    weights' sum over the taps in bounds there: fewer at the borders, so the channel's
    mean over p is the interior's less a share, and what centring leaves of the mean
    is mu^2 sum_t (I_t(p) - a_t)^2 per unit of a tap sum's variance (I_t(p): tap t in
    bounds at p, a_t its mean over p; for independent draws, whose tap sums are
    independent). Small in the interior, large at the borders: the border deficit of
    the conv's own count comes back once normalized (MobileNetV2's 7x7 maps: corners
    0.5-0.65 of the mean measured at the next depthwise conv's input, 0.19 from the
    uncentred count, 0.5 from this). None where there is no mean or no border."""
    if not mu or w is None or layer.input_shape is None:
        return None
    spatial = tuple(map(int, layer.input_shape[2:]))
    found = _deficit((_key(module), module.padding_mode), spatial, module)
    if found is None:
        return None
    deficit, taps = found
    fan = module.in_channels // module.groups
    tap2 = fan * w.w2 * w.row_share * mu * mu  # a tap sum's variance times mu^2
    mean_part = tap2 * taps
    fluct = max(spread - mean_part, 0.0)
    shape = made * fluct + tap2 * deficit
    total = float(shape.sum()) / shape.size  # ndarray.mean's value, without its Python
    return shape / total if total > 0 else None


def _deficit(key: tuple, spatial: tuple, module: nn.Module) -> tuple | None:
    """(sum_t (I_t(p) - a_t)^2 over the output positions, the mean taps in bounds);
    None where every tap is in bounds everywhere. Once per geometry (the key, not the
    module: a cache must not keep the model alive)."""
    if (key, spatial) not in _DEFICITS:
        valid = _valid(module, spatial)
        found = None
        if valid is not None and valid.min() < 1:
            spread = valid - valid.mean(axis=tuple(range(1, valid.ndim)), keepdims=True)
            found = (spread * spread).sum(0), float(valid.sum(0).mean())
        _DEFICITS[(key, spatial)] = found
    return _DEFICITS[(key, spatial)]


_DEFICITS: dict[tuple, tuple | None] = {}


def _valid(module: nn.Module, spatial: tuple) -> np.ndarray | None:
    """I_t(p) [taps, *output positions]: one convolution of a map of ones per tap."""
    if module.transposed or not _counted(module, spatial):
        return None
    taps = int(np.prod(module.kernel_size))
    ones = torch.ones((1, 1, *spatial), dtype=torch.float64)
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(spatial) - 1]
    out = []
    for t in range(taps):
        one = torch.zeros(taps, dtype=torch.float64)
        one[t] = 1.0
        out.append(conv(ones, one.reshape(1, 1, *module.kernel_size), stride=module.stride,
                        padding=module.padding, dilation=module.dilation)[0, 0])
    return torch.stack(out).numpy()


def before_call(module: nn.Module, layer, e: Any) -> tuple[float, Any]:
    """Backward across a call: (the factor on the rule's Var[dx], dx's profile)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return conv_backward(module, e, layer.input_shape)
    keeps = _keeps(module)
    return 1.0, e if keeps else None


def blend(parts: list[tuple[Any, float]]) -> Any:
    """The mean of profiles weighted by second moment (None: uniform); None where none
    has one or their shapes differ."""
    shaped = [e for e, _ in parts if e is not None]
    if not shaped or any(e.shape != shaped[0].shape for e in shaped):
        return None
    total = sum(w for _, w in parts)
    if total <= 0:
        return None
    out = None  # sum(e w) / total as sum() adds (0 + the first, then each), in place
    for e, w in parts:
        term = e * w if e is not None else np.full_like(shaped[0], w)  # 1 * w is w
        if out is None:
            out = term
            out += 0  # -0.0 + 0 is +0.0, as in sum()
        else:
            out += term
    out /= total
    return out
