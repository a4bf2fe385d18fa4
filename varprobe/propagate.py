"""Closed-form predictions for every recorded layer: local, chain and counterfactual.

He et al. 2015's recursion, walked over the recorded calls in execution order:

    forward   E[y_l^2] = n_l E[w_l^2] E[x_l^2] + mean(b_l^2),  E[x_{l+1}^2] = g(q) E[y_l^2]
    backward  Var[dx_l] = n^_l E[w_l^2] Var[dy_l],             Var[dy_{l-1}] = g'(q) Var[dx_l]

n and n^ are the fans; for convs the effective ones (theory.effective_fans: taps that
fall on zero padding do not count forward, and with stride an input feeds fewer than
k outputs backward), for Linear the nominal in/out features. For zero-mean weights
E[w^2] = Var[w], and E[w^2] is what a realized sum sees. g and g' are the activation
gains at the predicted second moment q (exact for rectifiers, by quadrature
otherwise). Normalization layers reset the second moment (BatchNorm divides by the
per-unit variance, which excludes the mean every unit keeps after a ReLU: see
Signal), dropout scales it, identity-like modules keep it.

Three kinds of prediction:

* ``local`` (weight layers): one step from the layer's own measured input (forward) or
  measured output gradient (backward). Always available when that was measured.
* ``chain``: the recursion from the measured network input (E[x^2] = 1 assumed when
  nothing was measured) and from the measured output cotangent (Var = 1 assumed).
  Where a layer has no closed form (max pooling, attention, softmax, an unknown
  module) the walk carries the *measured* value past it, and where the measured input
  of a layer differs from the measured output of the call before it, something the
  recorder does not see (a residual add, a functional op) changed the signal and the
  walk carries the measured input. Each prediction's ``note`` names the last such
  place. With nothing measured the chain stops there and later predictions are None.
  Since it carries measured values, the chain exists wherever ``local`` does, and
  ``Layer.predicted`` is the chain.
* ``schemes``: the same walk with every Linear/Conv weight variance replaced by an init
  scheme's (theory.scheme_variance) and its biases (zero, but torch-default's
  U(±1/sqrt(n))). Where the actual chain carries a measured value, a counterfactual
  applies the measured *ratio* across that place instead (exact for positively
  homogeneous modules such as pooling), since the actual model's absolute scale says
  nothing about another init's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from operator import mul

import torch
from torch import nn

from varprobe import initlog, runningnorm, theory
from varprobe.report import Layer, Prediction, Report

IDENTITY_LIKE = (nn.Identity, nn.Flatten, nn.Unflatten)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)  # not the alpha kinds
BATCH_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
FEATURE_NORMS = (nn.LayerNorm, nn.GroupNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
LINEAR_MAPS = (nn.Linear, nn.modules.conv._ConvNd)
SAME = 1e-9  # relative: the same tensor measured twice gives bit-identical moments


@dataclass(frozen=True)
class Signal:
    """A predicted second moment, and the share of it that is a per-unit mean.

    ``mean_share`` matters only where a layer normalizes each unit over the batch
    (BatchNorm): it divides by the per-unit variance, m2 * (1 - mean_share). After a
    ReLU every unit has mean sqrt(q/2pi), so the share is 1/pi, and the next layer
    passes it on (y_c = w_c . x has batch mean w_c . mean(x)).
    """

    m2: float
    mean_share: float = 0.0


@dataclass
class Weights:
    """E[w^2] and mean(b^2) of a weight layer, and why they are what they are."""

    w2: float
    b2: float
    note: str | None = None


@dataclass
class Walk:
    """One trajectory: per layer the predicted input, output and gradients."""

    inputs: list[Signal | None]
    outputs: list[Signal | None]
    grads: list[float | None]        # Var[dL/dy], gradient w.r.t. the layer's output
    grad_inputs: list[float | None]  # Var[dL/dx], gradient w.r.t. the layer's input
    forward_notes: list[str | None]
    backward_notes: list[str | None]


# --- the public entry points --------------------------------------------------------

def annotate(report: Report, modules: list[nn.Module],
             values: theory.Values | None = None) -> Report:
    """Fill activations, gains, fans, multipliers and local/chain/scheme predictions.

    ``values``: host copies of the norm and PReLU tensors ``host_tensors`` names (the
    probe's one transfer); a tensor not in it is read directly.
    """
    layers = report.layers
    values = _Memo(values)
    for layer, module in zip(layers, modules):
        _effective_fans(layer, module)
    weights = _actual_weights(layers, modules)
    actual = _walk(report, modules, weights, by_ratio=False, values=values)
    _gains(layers, modules, actual, values)
    for i, layer in enumerate(layers):
        chain = _prediction(actual, i, "chain")
        if layer.kind == "weight":
            layer.local = _local(layer, modules[i], weights[i])
            if isinstance(modules[i], (*LINEAR_MAPS, nn.Embedding)):
                _multipliers(layer, weights[i])
        if _has_value(chain):
            layer.predicted = chain
    slopes = prelu_slopes(modules, values)
    for scheme in theory.SCHEMES:
        walk = _walk(report, modules, _scheme_weights(scheme, layers, modules, slopes),
                     by_ratio=True, values=values)
        for i, layer in enumerate(layers):
            if layer.kind == "weight":
                layer.schemes[scheme] = _prediction(walk, i, "chain")
    report.summary.forward_ratio, report.summary.backward_ratio = end_to_end(report)
    return report


def end_to_end(report: Report, scheme: str | None = None) -> tuple[float | None, float | None]:
    """Predicted (forward, backward) end-to-end ratios for the actual init or a scheme.

    forward: the last weight layer's E[y^2] over the network input's E[x^2] (over the
    first weight layer's E[y^2] when the input is not a float tensor, e.g. token ids);
    backward: the first weight layer's Var[dL/dy] over the output cotangent's Var.
    """
    weights = report.weight_layers
    if not weights:
        return None, None

    def get(layer: Layer) -> Prediction | None:
        return layer.predicted if scheme is None else layer.schemes.get(scheme)

    first, last = get(weights[0]), get(weights[-1])
    start = _start(report)[0]
    fwd_ref = start.m2 if start is not None else (first.forward_var if first else None)
    fwd = _ratio(last.forward_var if last else None, fwd_ref)
    bwd = _ratio(first.backward_var if first else None, _cotangent(report)[0])
    return fwd, bwd


# --- per-layer facts ----------------------------------------------------------------

def _effective_fans(layer: Layer, module: nn.Module) -> None:
    if layer.kind != "weight":
        return
    shape = layer.input_shape
    if shape is not None and isinstance(module, nn.modules.conv._ConvNd):
        layer.effective_fan_in, layer.effective_fan_out = theory.effective_fans(module, shape)
    else:  # no borders or stride: the nominal fans
        layer.effective_fan_in = None if layer.fan_in is None else float(layer.fan_in)
        layer.effective_fan_out = None if layer.fan_out is None else float(layer.fan_out)


def _gains(layers: list[Layer], modules: list[nn.Module], walk: Walk,
           values: theory.Values | None = None) -> None:
    """Name the activation after (and before) each weight layer and give its gains.

    The gain is taken at the activation's measured input second moment, else at the
    predicted one (it depends on it only for non-rectifiers).
    """
    before: tuple[str, float | None] | None = None
    owner: Layer | None = None
    for i, (layer, module) in enumerate(zip(layers, modules)):
        if layer.kind == "weight":
            if before is not None:
                layer.input_activation, layer.input_gain = before
            before, owner = None, layer
        elif layer.kind == "activation" and owner is not None and owner.activation is None:
            q = _measured_m2(layer.input)
            if q is None and walk.inputs[i] is not None:
                q = walk.inputs[i].m2
            owner.activation = layer.type
            if q is None:
                owner.unavailable["gain"] = "the activation's input is unknown"
            else:
                owner.gain = theory.forward_gain(module, q, values)
                owner.backward_gain = theory.backward_gain(module, q, values)
                if owner.gain is None:
                    owner.unavailable["gain"] = theory.gain_unavailable_reason(module, q,
                                                                               values)
            before = (layer.type, owner.gain)


def _multipliers(layer: Layer, w: Weights | None) -> None:
    """n E[w^2] g_prev and n^ E[w^2] g'_next: the layer's own factors (1 holds)."""
    if w is None:
        return
    if layer.effective_fan_in is not None:
        g = layer.input_gain if layer.input_activation is not None else 1.0
        layer.forward_multiplier = None if g is None else layer.effective_fan_in * w.w2 * g
    if layer.effective_fan_out is not None:
        g = layer.backward_gain if layer.activation is not None else 1.0
        layer.backward_multiplier = None if g is None else layer.effective_fan_out * w.w2 * g


def _local(layer: Layer, module: nn.Module, w: Weights | None) -> Prediction | None:
    """One step from the layer's own measured input and output gradient."""
    if w is None or not isinstance(module, (*LINEAR_MAPS, nn.Embedding)):
        return Prediction(None, None, basis="local",
                          note=f"no closed form for {layer.type}")
    if isinstance(module, nn.Embedding):
        return Prediction(w.w2, None, basis="local", note=w.note)
    x2 = _measured_m2(layer.input)
    dy = layer.backward.var if layer.backward else None
    fwd = None if x2 is None else layer.effective_fan_in * w.w2 * x2 + w.b2
    dx = None if dy is None else layer.effective_fan_out * w.w2 * dy
    return Prediction(fwd, None, basis="local", note=w.note, backward_input_var=dx)


# --- weights: actual or a scheme's --------------------------------------------------

def _actual_weights(layers: list[Layer], modules: list[nn.Module]) -> list[Weights | None]:
    """The measured E[w^2] and mean(b^2); PyTorch's default init where not measured."""
    return [_actual(layer, module) if layer.kind == "weight" else None
            for layer, module in zip(layers, modules)]


def _actual(layer: Layer, module: nn.Module) -> Weights | None:
    if layer.unavailable.get("weight_var", "").startswith(initlog.UNKNOWN):
        return None  # its init code did what no closed form follows: no default either
    w2 = _finite(layer.weight_second_moment)
    w2 = _finite(layer.weight_var) if w2 is None else w2
    if w2 is not None:
        return Weights(w2, _finite(layer.bias_second_moment) or 0.0)
    if isinstance(module, nn.Embedding):
        return Weights(1.0, 0.0, note="weights not measured: N(0, 1), PyTorch's default")
    n = theory.torch_fans(module)[0]
    if n is None:
        return None
    b2 = 1.0 / (3 * n) if getattr(module, "bias", None) is not None else 0.0
    return Weights(1.0 / (3 * n), b2, note="weights not measured: PyTorch's default assumed")


def _scheme_weights(scheme: str, layers: list[Layer], modules: list[nn.Module],
                    slopes: list[float]) -> list[Weights | None]:
    """Var[w] of ``scheme`` for Linear/Conv layers and its bias (zero but for
    torch-default's); embeddings as they are. ``slopes``: ``prelu_slopes(modules)``."""
    out: list[Weights | None] = []
    for layer, module, a in zip(layers, modules, slopes):
        if layer.kind != "weight" or not isinstance(module, LINEAR_MAPS):
            out.append(_actual(layer, module) if layer.kind == "weight" else None)
            continue
        fan_in, fan_out = (theory.torch_fans(module) if scheme == "torch-default"
                           else theory.fans(module))
        var = theory.scheme_variance(scheme, fan_in, fan_out, a)
        out.append(None if var is None
                   else Weights(var, theory.scheme_bias_variance(scheme, module)))
    return out


def prelu_slopes(modules: list[nn.Module], values: theory.Values | None = None) -> list[float]:
    """The PReLU slope a that he-prelu uses for each module (0 for non-weight ones).

    The slope of the activation feeding the layer: He's Eq. 15 is the forward
    condition 1/2 (1+a^2) n Var[w] = 1, whose gain belongs to x_l = f(y_{l-1}). A
    layer with no activation before it (the first) takes the one after it, as He
    adopts the same rule in the first layer; 0 where there is none.
    """
    found: list[float | None] = [None] * len(modules)
    before: float | None = None
    pending: list[int] = []
    for i, module in enumerate(modules):
        kind = theory.kind(module)
        if kind == "weight":
            found[i] = before
            if before is None:
                pending.append(i)
            before = None
        elif kind == "activation" and before is None:
            before = theory.prelu_slope(module, values)
            for j in pending:
                found[j] = before
            pending = []
    return [a or 0.0 for a in found]


# --- the walk -----------------------------------------------------------------------

def _walk(report: Report, modules: list[nn.Module], weights: list[Weights | None],
          by_ratio: bool, values: theory.Values | None = None) -> Walk:
    n = len(report.layers)
    walk = Walk([None] * n, [None] * n, [None] * n, [None] * n, [None] * n, [None] * n)
    _forward(report, modules, weights, by_ratio, walk, values)
    _backward(report, modules, weights, by_ratio, walk, values)
    return walk


def _forward(report, modules, weights, by_ratio, walk: Walk, values) -> None:
    signal, note = _start(report)
    before = _measured_m2(report.input)  # the measured twin of ``signal``
    for i, (layer, module) in enumerate(zip(report.layers, modules)):
        m_in, m_out = _measured_m2(layer.input), _measured_m2(layer.forward)
        if m_in is not None and (signal is None or (before is not None
                                                    and not _same(m_in, before))):
            where = f"an unrecorded operation before {layer.label}"
            signal, note = _carry(signal, m_in, before, _share(layer.input), by_ratio, where)
        walk.inputs[i] = signal
        out = _step_forward(layer, module, signal, weights[i], values)
        own = weights[i].note if weights[i] is not None else None
        walk.outputs[i], walk.forward_notes[i] = out, _join(note, own)
        if out is not None:
            signal = out
        elif signal is not None:
            where = f"{layer.type} at {layer.label}"
            walk.forward_notes[i] = _join(f"no closed form for {where}", own)
            signal, note = _carry(signal, m_out, m_in if m_in is not None else before,
                                  _share(layer.forward), by_ratio, where)
            if signal is None:
                note = f"the chain stops at {where}: no closed form, nothing measured"
        before = m_out


def _backward(report, modules, weights, by_ratio, walk: Walk, values) -> None:
    grad, note = _cotangent(report)
    after: float | None = None  # measured Var of the gradient at the next call's input
    for i in reversed(range(len(report.layers))):
        layer, module = report.layers[i], modules[i]
        g_out = layer.backward.var if layer.backward else None
        g_in = layer.backward_input.var if layer.backward_input else None
        if g_out is not None and (grad is None or (after is not None
                                                   and not _same(g_out, after))):
            where = f"an unrecorded operation after {layer.label}"
            grad, note = _carry_grad(grad, g_out, after, by_ratio, where)
        walk.grads[i], walk.backward_notes[i] = grad, note
        pred = _step_backward(layer, module, grad, walk.inputs[i], weights[i], values)
        walk.grad_inputs[i] = pred
        if pred is None and grad is not None and not isinstance(module, nn.Embedding):
            where = f"{layer.type} at {layer.label}"
            pred, note = _carry_grad(grad, g_in, g_out if g_out is not None else after,
                                     by_ratio, where)
            if pred is None:
                note = f"the chain stops at {where}: no closed form, nothing measured"
        grad, after = pred, g_in


def _start(report: Report) -> tuple[Signal | None, str | None]:
    """The network input's measured E[x^2] (1 assumed when nothing was measured)."""
    measured = _measured_m2(report.input)
    if measured is not None:
        return Signal(measured, _share(report.input)), None
    if report.input.dtype is not None and "int" in report.input.dtype:
        return None, None  # token ids: the first (embedding) layer starts the chain
    return Signal(1.0), "input E[x²] = 1 assumed"


def _cotangent(report: Report) -> tuple[float, str | None]:
    """The measured Var of the gradient at the last call's output (1 assumed)."""
    last = report.layers[-1] if report.layers else None
    if last is not None and last.backward is not None and last.backward.var is not None:
        return last.backward.var, None
    return 1.0, "output cotangent Var = 1 assumed"


def _carry(signal, measured, measured_before, share, by_ratio, where):
    """Continue past ``where``: the measured value, or (by_ratio) the measured ratio."""
    if not by_ratio:
        if measured is None:
            return None, None
        return Signal(measured, share), f"carried the measured value past {where}"
    if signal is None or measured is None or not measured_before:
        return None, None
    return (Signal(signal.m2 * measured / measured_before, share),
            f"scaled by the measured ratio across {where}")


def _carry_grad(grad, measured, measured_before, by_ratio, where):
    if not by_ratio:
        if measured is None:
            return None, None
        return measured, f"carried the measured gradient past {where}"
    if grad is None or measured is None or not measured_before:
        return None, None
    return grad * measured / measured_before, f"scaled by the measured ratio across {where}"


# --- one step per module ------------------------------------------------------------

def _step_forward(layer: Layer, module: nn.Module, s: Signal | None,
                  w: Weights | None, values: theory.Values | None = None) -> Signal | None:
    """The predicted output of one call from its predicted input; None: no closed form."""
    if isinstance(module, nn.Embedding) and w is not None:
        return Signal(w.w2)  # a lookup: E[y^2] = E[w^2]; rows share no mean
    if s is None:
        return None
    if layer.kind == "weight":
        if (w is None or not isinstance(module, LINEAR_MAPS)
                or layer.effective_fan_in is None):
            return None
        spread = layer.effective_fan_in * w.w2 * s.m2
        y2 = spread + w.b2
        return Signal(y2, (spread * s.mean_share + w.b2) / y2 if y2 > 0 else 0.0)
    if layer.kind == "activation":
        g = theory.forward_gain(module, s.m2, values)
        return None if g is None else Signal(g * s.m2,
                                             _activation_share(module, s.m2, g, values))
    if layer.kind == "norm":
        return _norm_forward(module, s, values)
    if isinstance(module, DROPOUTS):
        if not module.training:
            return s
        return None if module.p >= 1 else Signal(s.m2 / (1 - module.p),
                                                 s.mean_share * (1 - module.p))
    if isinstance(module, IDENTITY_LIKE):
        return s
    return None


def _step_backward(layer: Layer, module: nn.Module, grad: float | None, s: Signal | None,
                   w: Weights | None, values: theory.Values | None = None) -> float | None:
    """Var of the gradient at the call's input from the one at its output."""
    if grad is None:
        return None
    if layer.kind == "weight":
        if (w is None or not isinstance(module, LINEAR_MAPS)
                or layer.effective_fan_out is None):
            return None
        return layer.effective_fan_out * w.w2 * grad
    if layer.kind == "activation":
        g = theory.backward_gain(module, s.m2, values) if s is not None else None
        return None if g is None else g * grad
    if layer.kind == "norm":
        factor = _norm_backward(module, s, values)
        return None if factor is None else factor * grad
    if isinstance(module, DROPOUTS):
        if not module.training:
            return grad
        return None if module.p >= 1 else grad / (1 - module.p)
    if isinstance(module, IDENTITY_LIKE):
        return grad
    return None


def _activation_share(module: nn.Module, q: float, g: float,
                      values: theory.Values | None = None) -> float:
    """E[f(y)]^2 / E[f(y)^2] for y ~ N(0, q): the mean every unit shares after f."""
    if isinstance(module, nn.PReLU):  # the mean slope, where the gain has the rms one
        slopes = _values(module.weight, float(module.init), values)
        a = sum(slopes) / len(slopes)
    else:
        a = theory.prelu_slope(module, values)
    if a is not None:
        mean = (1 - a) * math.sqrt(q / (2 * math.pi))
    else:
        try:
            mean = theory.expectation(lambda y: module(y.float()).double(), q)
        except Exception:  # noqa: BLE001 -- no mean: treat it as centred
            return 0.0
    return min(1.0, mean * mean / (g * q)) if g * q > 0 else 0.0


def _channels(*values: list[float]) -> list[list[float]]:
    """Per-channel lists of one length: a single value (no affine part, meta) repeats."""
    n = max(len(v) for v in values)
    return [v * n if len(v) == 1 else v for v in values]


def _values(t, default: float, values: theory.Values | None = None) -> list[float]:
    """A parameter or buffer as floats (its host copy in ``values`` where there); its
    initial value where it is absent or on the meta device (the closed-form `predict`
    builds models there, without data) with no recorded value."""
    if t is None or (t.is_meta and (values is None or id(t) not in values)):
        return [default]
    return theory.elements(t, values)


def host_tensors(modules: list[nn.Module]) -> list[torch.Tensor]:
    """The tensors whose values the predictions read: the weights of PReLUs, the affine
    parameters of norms and, where used, BatchNorm's running statistics. The probe
    copies them in its one transfer and passes them to ``annotate`` as ``values``."""
    out: dict[int, torch.Tensor] = {}
    for module in modules:
        names: tuple[str, ...] = ()
        if isinstance(module, nn.PReLU):
            names = ("weight",)
        elif isinstance(module, (*BATCH_NORMS, *FEATURE_NORMS)):
            running = ("running_mean", "running_var") if _uses_running_stats(module) else ()
            names = ("weight", "bias", *running)
        for name in names:
            t = getattr(module, name, None)
            if isinstance(t, torch.Tensor) and not t.is_meta:
                out[id(t)] = t
    return list(out.values())


def _affine(module: nn.Module, values: theory.Values | None = None) -> list[list[float]]:
    """gamma and beta per channel (1 and 0 without an affine part)."""
    return _channels(_values(getattr(module, "weight", None), 1.0, values),
                     _values(getattr(module, "bias", None), 0.0, values))


def _uses_running_stats(module: nn.Module) -> bool:
    return (isinstance(module, BATCH_NORMS) and not module.training
            and module.running_var is not None)


def _norm_eps(module: nn.Module) -> float:
    eps = getattr(module, "eps", None)  # RMSNorm's None means the dtype's epsilon
    return torch.finfo(torch.float32).eps if eps is None else float(eps)


def _norm_variance(module: nn.Module, s: Signal) -> float:
    """What the normalizer divides by: per-unit variance over the batch for BatchNorm
    (the shared per-unit mean does not count), the second moment across features
    for Layer/Group/RMS norm (each unit's own mean is spread across features)."""
    if isinstance(module, BATCH_NORMS):
        return s.m2 * (1 - s.mean_share)
    return s.m2


def _norm_forward(module: nn.Module, s: Signal,
                  values: theory.Values | None = None) -> Signal | None:
    """Train mode: E[out^2] = mean_c(gamma_c^2 s^2/(s^2+eps) + beta_c^2), a reset.
    Eval BatchNorm: (x - mu_r)/sqrt(var_r + eps) * gamma + beta (runningnorm)."""
    if not isinstance(module, (*BATCH_NORMS, *FEATURE_NORMS)):
        return None  # LocalResponseNorm and the like
    eps = _norm_eps(module)
    if _uses_running_stats(module):
        return _running(module, s, eps, values)
    var = _norm_variance(module, s)
    return _normalized(module, var / (var + eps), values)


def _running(module: nn.Module, s: Signal, eps: float,
             values: theory.Values | None = None) -> Signal:
    gamma, beta, rm, rv = _channels(*_affine(module, values),
                                    _values(module.running_mean, 0.0, values),
                                    _values(module.running_var, 1.0, values))
    return Signal(*runningnorm.moments(gamma, beta, rm, rv, eps, s.m2, s.mean_share))


def reset(module: nn.Module, values: theory.Values | None = None) -> Signal | None:
    """What a normalizer outputs whatever its input, when that input's second moment is
    far above eps: mean(gamma^2) + mean(beta^2). None where the output depends on the
    input (eval BatchNorm's running statistics, LocalResponseNorm)."""
    if not isinstance(module, (*BATCH_NORMS, *FEATURE_NORMS)) or _uses_running_stats(module):
        return None
    return _normalized(module, 1.0, values)


def _normalized(module: nn.Module, kept: float, values: theory.Values | None = None) -> Signal:
    """mean_c(gamma_c^2 kept + beta_c^2), the beta part shared by every sample."""
    g2, n, b2 = _affine_sums(module, values)
    m2 = kept * g2 / n + b2
    return Signal(m2, b2 / m2 if m2 > 0 else 0.0)


class _Memo(Mapping):
    """``values`` with a place for what is derived from them: every walk (the actual
    init's and each scheme's) reads the same norm parameters, summed once."""

    def __init__(self, values: theory.Values | None):
        self.values: theory.Values = values if values is not None else {}
        self.memo: dict[int, tuple[float, int, float]] = {}

    def __getitem__(self, key: int) -> list[float]:
        return self.values[key]

    def __iter__(self):
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


def _affine_sums(module: nn.Module, values: theory.Values | None) -> tuple[float, int, float]:
    """(sum_c gamma_c^2, channels, mean_c beta_c^2), once per module where ``values`` is
    a _Memo."""
    memo = getattr(values, "memo", None)
    if memo is not None and id(module) in memo:
        return memo[id(module)]
    gamma, beta = _affine(module, values)
    sums = sum(map(mul, gamma, gamma)), len(gamma), sum(map(mul, beta, beta)) / len(beta)
    if memo is not None:
        memo[id(module)] = sums
    return sums


def _norm_backward(module: nn.Module, s: Signal | None,
                   values: theory.Values | None = None) -> float | None:
    """Var[dx]/Var[dy] = mean(gamma^2)/(s^2 + eps); the centring terms remove O(1/N)."""
    if not isinstance(module, (*BATCH_NORMS, *FEATURE_NORMS)):
        return None
    eps = _norm_eps(module)
    if _uses_running_stats(module):
        gamma, rv = _channels(_affine(module, values)[0],
                              _values(module.running_var, 1.0, values))
        return sum(g * g / (v + eps) for g, v in zip(gamma, rv)) / len(rv)
    if s is None:
        return None
    g2, n, _ = _affine_sums(module, values)
    return g2 / n / (_norm_variance(module, s) + eps)


# --- small helpers ------------------------------------------------------------------

def _prediction(walk: Walk, i: int, basis: str) -> Prediction:
    out = walk.outputs[i]
    return Prediction(forward_var=None if out is None else out.m2,
                      backward_var=walk.grads[i], basis=basis,
                      note=_notes(walk.forward_notes[i], walk.backward_notes[i]),
                      backward_input_var=walk.grad_inputs[i])


def _notes(forward: str | None, backward: str | None) -> str | None:
    parts = [f"forward: {forward}" if forward else None,
             f"backward: {backward}" if backward else None]
    return "; ".join(p for p in parts if p) or None


def _join(*parts: str | None) -> str | None:
    return "; ".join(p for p in parts if p) or None


def _has_value(p: Prediction) -> bool:
    return any(v is not None for v in (p.forward_var, p.backward_var, p.backward_input_var))


def _measured_m2(stats) -> float | None:
    return _finite(stats.second_moment) if stats is not None else None


def _share(stats) -> float:
    """mean^2 / E[x^2] of a measured tensor: its shared mean (a lower bound on the
    per-unit one, exact after an activation, where every unit has the same mean)."""
    if stats is None or not stats.second_moment or stats.mean is None:
        return 0.0
    return min(1.0, stats.mean * stats.mean / stats.second_moment)


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= SAME * max(abs(a), abs(b))


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None
