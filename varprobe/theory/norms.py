"""The normalization layers' steps: BatchNorm (train, and eval with running
statistics), InstanceNorm, LayerNorm, GroupNorm, RMSNorm.

Train mode resets the scale: E[out^2] = mean_c(gamma_c^2 s^2/(s^2+eps) + beta_c^2), where
s^2 is what the normalizer divides by (the per-unit variance over the batch for
BatchNorm, the second moment across features otherwise); the backward multiplies
Var[dy] by mean(gamma^2)/(s^2 + eps). Eval BatchNorm applies its running statistics
(varprobe.runningnorm). The affine parameters are read from the host copies the probe
made in its one transfer (``values``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from operator import mul

import torch
from torch import nn

from varprobe import runningnorm
from varprobe.theory.gains import Values, elements
from varprobe.theory.layer_fans import RMS_NAMES, gamma_offset, norm_like
from varprobe.theory.signal import Signal

BATCH_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
FEATURE_NORMS = (nn.LayerNorm, nn.GroupNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
NORMS = (*BATCH_NORMS, *FEATURE_NORMS)
_ABSENT = object()


def _channels(*values: list[float]) -> list[list[float]]:
    """Per-channel lists of one length: a single value (no affine part, meta) repeats."""
    n = max(len(v) for v in values)
    return [v * n if len(v) == 1 else v for v in values]


def param_values(t, default: float, values: Values | None = None) -> list[float]:
    """A parameter or buffer as floats (its host copy in ``values`` where there); its
    initial value where it is absent or on the meta device (the closed-form `predict`
    builds models there, without data) with no recorded value."""
    if t is None or (t.is_meta and (values is None or id(t) not in values)):
        return [default]
    return elements(t, values)


def host_tensors(modules: list[nn.Module]) -> list[torch.Tensor]:
    """The tensors whose values the predictions read: the weights of PReLUs, the affine
    parameters of norms and, where used, BatchNorm's running statistics, a scaled word
    embedding's factor. The probe
    copies them in its one transfer and passes them to ``annotate`` as ``values``."""
    out: dict[int, torch.Tensor] = {}
    for module in modules:
        names: tuple[str, ...] = ()
        if isinstance(module, nn.PReLU):
            names = ("weight",)
        elif isinstance(module, nn.Embedding):
            names = ("embed_scale",)  # a scaled word embedding's buffer (rules.lookup_scale)
        elif is_norm(module):
            running = ("running_mean", "running_var") if uses_running_stats(module) else ()
            names = ("weight", "bias", *running)
        for name in names:
            t = getattr(module, name, None)
            if isinstance(t, torch.Tensor) and not t.is_meta:
                out[id(t)] = t
    return list(out.values())


def affine(module: nn.Module, values: Values | None = None) -> list[list[float]]:
    """gamma and beta per channel (1 and 0 without an affine part); gamma is 1 + weight
    for a (1 + weight) norm (``gamma_offset``: Gemma's RMSNorm), whose weight starts at 0."""
    offset = gamma_offset(module)
    gamma = param_values(getattr(module, "weight", None), 1.0 - offset, values)
    return _channels([g + offset for g in gamma] if offset else gamma,
                     param_values(getattr(module, "bias", None), 0.0, values))


def uses_running_stats(module: nn.Module) -> bool:
    return (isinstance(module, BATCH_NORMS) and not module.training
            and module.running_var is not None)


def is_norm(module: nn.Module) -> bool:
    """torch.nn's norms, and those of other code told by name (layer_fans.norm_like)."""
    return isinstance(module, NORMS) or norm_like(module)


def eps_of(module: nn.Module) -> float:
    eps = getattr(module, "eps", _ABSENT)
    if eps is _ABSENT:  # asked only then: a Module's missing attribute raises inside
        eps = getattr(module, "variance_epsilon", None)
    # RMSNorm's None means the dtype's epsilon
    return torch.finfo(torch.float32).eps if eps is None else float(eps)


def normalizes(module: nn.Module, m_out: float | None, values: Values | None = None) -> bool:
    """Whether a norm set its output's scale: its measured E[y²] ``m_out`` is at least a
    tenth of mean(gamma²) + mean(beta²), what it gives an input far above its eps. Its
    output is gamma² v/(v + eps) + beta² (v what it divides by, per channel or token), so
    below that tenth v < eps/9: the norm then multiplies what reaches it by ~gamma²/eps
    and hands its scale on. Measured on the output, not the input, because a BatchNorm
    removes each channel's mean: a conv's bias makes a tensor's variance large while
    the per-channel variance the norm divides by is far below eps. Unmeasured, with
    running statistics (an eval-mode BatchNorm divides by those) or with gamma = beta = 0
    (a zero-initialized branch end): taken to set it."""
    if m_out is None or uses_running_stats(module):
        return True
    gamma2, channels, beta2 = affine_sums(module, values)
    own = gamma2 / channels + beta2
    return not own > 0 or m_out >= 0.1 * own


def _variance(module: nn.Module, s: Signal, mu: float = 0.0) -> float:
    """What the normalizer divides by: the per-unit variance over the batch for
    BatchNorm and InstanceNorm (each unit's own mean is removed), the variance across
    features for LayerNorm and GroupNorm (the mean every element shares, ``mu``, is
    removed: after a ReLU it is a third of the second moment), the plain second moment
    for RMSNorm."""
    if isinstance(module, BATCH_NORMS):
        return s.m2 * (1 - s.mean_share)
    if _is_rms(module):
        return s.m2
    if isinstance(module, nn.GroupNorm):  # a group's mean holds 1/k of its units' own
        k = module.num_channels // module.num_groups
        return max(s.m2 - mu * mu - max(s.m2 * s.mean_share - mu * mu, 0.0) / k, 0.0)
    return max(s.m2 - mu * mu, 0.0)


def _is_rms(module: nn.Module) -> bool:
    if hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm):
        return True
    return norm_like(module) and type(module).__name__.endswith(RMS_NAMES)


def forward(module: nn.Module, s: Signal, values: Values | None = None,
            mu: float = 0.0) -> Signal | None:
    """Train mode: E[out^2] = mean_c(gamma_c^2 s^2/(s^2+eps) + beta_c^2), a reset.
    Eval BatchNorm: (x - mu_r)/sqrt(var_r + eps) * gamma + beta (runningnorm)."""
    if not is_norm(module):
        return None  # LocalResponseNorm and the like
    eps = eps_of(module)
    if uses_running_stats(module):
        return _running(module, s, eps, values)
    var = _variance(module, s, mu)
    share = _kept_share(module, s, mu)
    r = share if isinstance(module, BATCH_NORMS) else max(share, s.r)  # §3.7: r passes
    return _normalized(module, var / (var + eps), values, share, r)


def _kept_share(module: nn.Module, s: Signal, mu: float) -> float:
    """The share of the normalized output that is a per-unit mean, before the affine
    part. BatchNorm and InstanceNorm remove each unit's mean. LayerNorm and GroupNorm
    remove only the mean across features, which is the common mean mu: a per-unit
    mean that differs between units (a direction every token shares, as a Linear makes
    of a ReLU's mean) stays, so the token correlation passes (attention.md §3.7)."""
    if isinstance(module, BATCH_NORMS) or s.m2 <= mu * mu:
        return 0.0
    return min(1.0, max(0.0, s.m2 * s.mean_share - mu * mu) / (s.m2 - mu * mu))


def _running(module: nn.Module, s: Signal, eps: float,
             values: Values | None = None) -> Signal:
    gamma, beta, rm, rv = _channels(*affine(module, values),
                                    param_values(module.running_mean, 0.0, values),
                                    param_values(module.running_var, 1.0, values))
    return Signal(*runningnorm.moments(gamma, beta, rm, rv, eps, s.m2, s.mean_share))


def reset(module: nn.Module, values: Values | None = None) -> Signal | None:
    """What a normalizer outputs whatever its input, when that input's second moment is
    far above eps: mean(gamma^2) + mean(beta^2). None where the output depends on the
    input (eval BatchNorm's running statistics, LocalResponseNorm)."""
    if not is_norm(module) or uses_running_stats(module):
        return None
    return _normalized(module, 1.0, values)


def _normalized(module: nn.Module, kept: float, values: Values | None = None,
                share: float = 0.0, r: float = 0.0) -> Signal:
    """mean_c(gamma_c^2 kept + beta_c^2), the beta part and ``share`` of the rest shared
    by every sample (``r`` of it by every token)."""
    g2, n, b2 = affine_sums(module, values)
    m2 = kept * g2 / n + b2
    if m2 <= 0:
        return Signal(m2)
    scaled = kept * g2 / n
    return Signal(m2, (scaled * share + b2) / m2, (scaled * r + b2) / m2)


class Memo(Mapping):
    """``values`` with a place for what is derived from them: every walk (the actual
    init's and each scheme's) reads the same norm parameters, summed once, and the same
    facts of one annotate's graph (its constants, chanspread's fans, measured shapes)."""

    def __init__(self, values: Values | None):
        self.values: Values = values if values is not None else {}
        self.memo: dict[int, tuple[float, int, float]] = {}
        self.means: dict[int, float] = {}
        self.gammas: dict[int, tuple[float, float]] = {}  # theory.chanspread's
        self.fans: dict[int, tuple[float | None, float]] = {}  # chanspread's, per layer
        self.shapes: dict[int, list | None] = {}  # Walk.norm_shape's, per node
        self._constants: dict[int, list] = {}
        self.downstream: dict[int, tuple] = {}  # theory.downstream's facts, per graph

    def constants_of(self, graph) -> list:
        """``graph.constants()``, made once for every walk over the graph."""
        if id(graph) not in self._constants:
            self._constants[id(graph)] = graph.constants()
        return self._constants[id(graph)]

    def __getitem__(self, key: int) -> list[float]:
        return self.values[key]

    def __contains__(self, key: object) -> bool:  # Mapping's goes through __getitem__
        return key in self.values

    def __iter__(self):
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


def affine_sums(module: nn.Module, values: Values | None) -> tuple[float, int, float]:
    """(sum_c gamma_c^2, channels, mean_c beta_c^2), once per module where ``values`` is
    a Memo."""
    memo = getattr(values, "memo", None)
    if memo is not None and id(module) in memo:
        return memo[id(module)]
    gamma, beta = affine(module, values)
    sums = sum(map(mul, gamma, gamma)), len(gamma), sum(map(mul, beta, beta)) / len(beta)
    if memo is not None:
        memo[id(module)] = sums
    return sums


def mean_beta(module: nn.Module, values: Values | None) -> float:
    """mean_c beta_c, once per module where ``values`` is a Memo (every walk reads it at
    every norm)."""
    means = getattr(values, "means", None)
    if means is not None and id(module) in means:
        return means[id(module)]
    beta = affine(module, values)[1]
    mean = sum(beta) / len(beta)
    if means is not None:
        means[id(module)] = mean
    return mean


def backward(module: nn.Module, s: Signal | None, values: Values | None = None,
             mu: float = 0.0) -> float | None:
    """Var[dx]/Var[dy] = mean(gamma^2)/(s^2 + eps), s^2 as the forward divides by; the
    centring terms remove O(1/N)."""
    if not is_norm(module):
        return None
    eps = eps_of(module)
    if uses_running_stats(module):
        gamma, rv = _channels(affine(module, values)[0],
                              param_values(module.running_var, 1.0, values))
        return sum(g * g / (v + eps) for g, v in zip(gamma, rv)) / len(rv)
    if s is None:
        return None
    g2, n, _ = affine_sums(module, values)
    return g2 / n / (_variance(module, s, mu) + eps)


def normalized_shape(module: nn.Module) -> tuple[int, ...] | None:
    """The dims a LayerNorm or RMSNorm normalizes each token over: its
    normalized_shape, else (other code's norms) its weight's shape; None if neither."""
    shape = getattr(module, "normalized_shape", None)
    if shape is None:
        weight = getattr(module, "weight", None)
        shape = weight.shape if isinstance(weight, torch.Tensor) and weight.dim() >= 1 \
            else None
    return None if shape is None else tuple(shape)


def features(module: nn.Module) -> int | None:
    """How many values of a token a LayerNorm or RMSNorm normalizes together."""
    shape = normalized_shape(module)
    return math.prod(shape) if shape else None


def centres_batch(module: nn.Module) -> bool:
    """A BatchNorm on its batch's statistics: its backward takes each channel's mean
    over the batch out of the gradient (an InstanceNorm's stays within each sample)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and \
        not uses_running_stats(module)


def centres_channels(module: nn.Module) -> bool:
    """A norm that takes each channel's mean over the positions out: BatchNorm on its
    batch's statistics, an InstanceNorm on its own, a GroupNorm (its group's)."""
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return module.training or not module.track_running_stats
    return centres_batch(module) or isinstance(module, nn.GroupNorm)


def centring(module: nn.Module) -> float:
    """What a LayerNorm's backward keeps of a gradient that does not know it, beside its
    gain: dx = (gamma/s)(g - mean(g) - x̂ mean(g x̂)) projects each token's d values off
    their mean and off x̂, (d - 2)/d of the variance; (d - 1)/d for an RMS norm, which
    takes no mean (theory.downstream says where the gradient does not know it)."""
    d = features(module)
    return max(1.0 - (1 if _is_rms(module) else 2) / d, 0.0) if d else 1.0
