"""BatchNorm's channels, measured: what one scalar per tensor misses there.

A BatchNorm treats each channel on its own, and the walk carries one second moment per
tensor. Two things follow that the per-tensor rules (theory.norms) get wrong:

- train mode divides each channel by its own variance v_c, so the backward gain is
  mean_c(gamma_c^2/(v_c + eps)), not mean(gamma^2)/(mean_c v_c + eps) (Jensen: the
  channels' variances spread, most at a small fan-in), and mean_c v_c is not the
  walk's m2 (1 - mean_share): zero padding makes each channel's mean depend on the
  position, which BatchNorm counts as variance, and a ReLU of a residual sum is not
  the Gaussian the mean share is derived for;
- eval mode applies a per-channel affine map, so E[out^2] is a sum over channels of
  what each channel's own mean and variance become, not the pooled variance times
  mean(1/var_r) (the input's channel means, which the running means subtract, are
  known to the walk only through their energy).

So at each BatchNorm call the probe measures, on the device and in the pass's one
transfer, the input's per-channel means mu_c and variances v_c reduced to the few
numbers the rules need (``measure``). The walk keeps its own scale: the measured shape
is taken at the walk's input second moment m2, i.e. mu_c and sqrt(v_c) scaled by
k = sqrt(m2 / m2_measured). For the actual walk k is the walk's own forward error at
the input; a counterfactual scheme's walk has its own m2. ``varprobe predict`` measures
nothing and keeps the per-tensor rules.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from varprobe import stats
from varprobe.channel_sums import channel_sums, recall
from varprobe.theory import norms
from varprobe.theory.constants import deferred
from varprobe.theory.signal import Signal

PAIRS = 5  # the measured numbers, stored as pairs (the recording's constants are pairs)


def wanted(module: nn.Module, x: object) -> bool:
    """A BatchNorm (train, or eval with running statistics) on a float input with its
    channels on dim 1 and values (not the meta device). Other channel counts are the
    model's error to raise, from the BatchNorm itself."""
    return (isinstance(module, nn.modules.batchnorm._BatchNorm)
            and isinstance(x, torch.Tensor) and x.is_floating_point()
            and not x.is_meta and x.dim() >= 2 and x.numel() > 0
            and x.shape[1] == module.num_features
            and (module.training or module.running_var is not None))


def _param(module: nn.Module, name: str, like, default: float):
    """A BatchNorm's parameter or buffer in float64 on the host; ``default`` in every
    channel where it has none."""
    t = getattr(module, name, None)
    if not isinstance(t, torch.Tensor) or t.is_meta:
        return np.full(like.shape, default)
    return t.detach().double().numpy()


def _present(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and buffers the pairs read (running statistics only where used)
    that the module has, with values (not on the meta device)."""
    names = ["weight", "bias"] + (["running_mean", "running_var"]
                                  if norms.uses_running_stats(module) else [])
    return {n: t for n in names
            if isinstance(t := getattr(module, n, None), torch.Tensor) and not t.is_meta}


def measure(module: nn.Module, x: torch.Tensor) -> list:
    """Four float64 pairs:

    (m2, V)   the input's E[x^2] and mean_c v_c (the per-channel variance over the
              batch and positions, as BatchNorm takes it);
    (Q, C)    Q = mean_c gamma_c^2/(v_c + eps) (train mode's backward gain);
              C = mean_c t_c^2, t_c = beta_c - a_c mu_r,c, a_c = gamma_c/sqrt(var_r,c + eps);
    (A, A1)   A = mean_c a_c^2 (v_c + mu_c^2), A1 = mean_c a_c^2 mu_c^2;
    (B, a2)   B = mean_c 2 a_c mu_c t_c, a2 = mean_c a_c^2;
    (F, known) F = mean_c r_c q_c / (mean_c r_c mean_c q_c), q_c = gamma_c^2/(v_c + eps)
              and r_c the sum of squares of the weights that make channel c, where a
              conv made the input (``_rows``; known = 1, else (1, 0)).

    Eval mode's output is then a_c k mu_c + t_c + a_c k (x - mu_c) per channel, whose
    E[out^2] is A k^2 + B k + C (the running-statistics terms are zero in train mode,
    where only (m2, V) and Q are read). F is the conv's step's pairing: channel c's
    variance is made of that conv's own weights r_c, and the gradient goes back through
    the same weights, so the conv's backward is mean_c(r_c q_c G_c) where the per-tensor
    rule takes mean(r) mean(q G) (a small fan-in: 16 inputs spread r_c as chi-square
    with 16 degrees, F = 14/16; a depthwise 3x3 conv's 9 taps, F ~ 0.8).

    A CPU tensor's are host pairs, whose reads are free. On an accelerator, no sync:
    a ``stats.Pending`` and ``FOLLOWS`` four times (the recording's constants are
    pairs); the per-channel sums and the parameters go through the pass's one transfer
    as they are and the pairs are made on the host (``_deferred``): three launches
    for a float32 input (one more for the making conv's r_c), where making them on the
    device took two dozen."""
    with torch.no_grad():
        if not stats.reads_are_free(x.device):
            return deferred(_on_device(module, x), PAIRS)
        # sums in x's precision (in rows, added in float64), no copy of the norm's
        # input (its largest activations: a float64 copy cost more than the BatchNorm
        # itself); E[x^2] - mu^2 loses digits only where a channel's mean^2 exceeds its
        # variance ~1e4-fold, which no initialized network feeds a BatchNorm
        s1, s2 = recall(x) or channel_sums(x.detach(), 1)  # kept: read already
        count = x.numel() // x.shape[1]
        rows = _rows(x)
        return _pairs(module, s1.numpy() / count, s2.numpy() / count,
                      rows=None if rows is None else rows.double().numpy())


def _rows(x: torch.Tensor) -> torch.Tensor | None:
    """r_c: the sum of squares of the weights of the conv that made ``x`` (autograd's
    node holds them), one per channel of ``x``; None where no conv made it directly."""
    node = x.grad_fn
    while node is not None and type(node).__name__ == "AliasBackward0":  # the probe's
        node = node.next_functions[0][0]  # own alias of a recorded output
    if node is None or type(node).__name__ != "ConvolutionBackward0":
        return None
    try:
        w, transposed, groups = node._saved_weight, node._saved_transposed, node._saved_groups
    except (RuntimeError, AttributeError):  # not saved (no grad for the weight)
        return None
    if transposed:  # (in, out / groups, taps): output channel c is w[:, c]
        if groups != 1:
            return None
        w = w.transpose(0, 1)
    if w.shape[0] != x.shape[1] or w.is_meta:
        return None
    with torch.no_grad():  # a norm per row: no copy of the weight's squares
        return torch.linalg.vector_norm(w.detach().reshape(w.shape[0], -1).float(),
                                        dim=1).square()


def _on_device(module: nn.Module, x: torch.Tensor) -> stats.Pending:
    """The Pending of ``measure`` on an accelerator: per-channel sums and norms of
    ``x`` (fp16/bf16 in float32 copies of at most a chunk of it), then the present
    parameters (on x's device, else copied there), one vector by ``torch.cat``."""
    present = [t if t.device == x.device else t.to(x.device)
               for t in _present(module).values()]
    made = _rows(x)
    present += [] if made is None else [made.to(x.device, x.dtype if x.dtype in (
        torch.float32, torch.float64) else torch.float32)]
    dims = [d for d in range(x.dim()) if d != 1]
    if x.dtype in (torch.float32, torch.float64):
        sums, norms_ = [x.sum(dim=dims)], [torch.linalg.vector_norm(x, dim=dims)]
    else:  # float32 sums of the exact values, not sums rounded to x's few bits
        rows = max(1, stats.chunk_size(x.device) // max(1, x[0].numel()))
        pieces = [p.float() for p in x.split(rows)]
        sums = [p.sum(dim=dims) for p in pieces]
        norms_ = [torch.linalg.vector_norm(p, dim=dims) for p in pieces]
    if len(sums) > 1:
        sums = [torch.stack(sums).sum(0)]
        norms_ = [torch.linalg.vector_norm(torch.stack(norms_), dim=0)]
    raw = torch.cat([*sums, *norms_, *present])
    shape = x.shape  # not x: the closure would keep the activation alive until collect
    return stats.Pending(raw, lambda r: _deferred(module, shape, r, made is not None))


def _deferred(module: nn.Module, shape: torch.Size, r: list[float], rows: bool) -> list:
    """``_pairs`` from the values ``_on_device`` sent (``rows``: r_c last)."""
    c, count = shape[1], math.prod(shape) // shape[1]
    values = np.asarray(r, dtype=np.float64)
    given = {name: values[at:at + c]
             for name, at in zip(_present(module), range(2 * c, len(values), c))}
    return _pairs(module, values[:c] / count, np.square(values[c:2 * c]) / count, given,
                  values[-c:] if rows else None)


def _pairs(module: nn.Module, mu: np.ndarray, m2: np.ndarray,
           given: dict[str, np.ndarray] | None = None,
           rows: np.ndarray | None = None) -> list[tuple[float, float]]:
    """The pairs of ``measure`` from the input's per-channel mean and E[x^2], the
    parameters (``given``, else read from the module) and the making conv's r_c."""
    v = np.maximum(m2 - mu * mu, 0.0)  # NaN stays NaN
    eps = norms.eps_of(module)

    def param(name: str, default: float) -> np.ndarray:
        if given is not None:
            return given.get(name, np.full(v.shape, default))
        return _param(module, name, v, default)

    gamma, beta = param("weight", 1.0), param("bias", 0.0)
    running = norms.uses_running_stats(module)
    rm = param("running_mean", 0.0) if running else np.zeros(v.shape)
    rv = param("running_var", 1.0) if running else np.ones(v.shape)
    a = gamma / (rv + eps) ** 0.5
    t = beta - a * rm
    terms = [v + mu * mu, v, gamma * gamma / (v + eps), t * t,
             a * a * (v + mu * mu), a * a * mu * mu, 2 * a * mu * t, a * a]
    means = np.stack(terms).mean(1).tolist()  # one mean over the channels for all eight
    return [(means[i], means[i + 1]) for i in range(0, 2 * PAIRS - 2, 2)] + [
        _pairing(rows, terms[2])]


def _pairing(rows: np.ndarray | None, q: np.ndarray) -> tuple[float, float]:
    """(F, 1) of ``measure``; (1, 0) without the rows or a gain to weight them by."""
    if rows is None:
        return 1.0, 0.0
    r_mean, q_mean = float(rows.mean()), float(q.mean())
    if not (r_mean > 0 and q_mean > 0 and math.isfinite(r_mean * q_mean)):
        return 1.0, 0.0
    return float((rows * q).mean()) / (r_mean * q_mean), 1.0


def pairing(shape: list[tuple[float, float]] | None) -> float | None:
    """F of a measured shape: the making conv's backward over its per-tensor rule;
    None where it was not measured."""
    if shape is None or len(shape) < PAIRS or shape[PAIRS - 1][1] < 0.5:
        return None
    return shape[PAIRS - 1][0]


def _scale(shape: list[tuple[float, float]], s: Signal) -> float | None:
    """k^2: the walk's input second moment over the measured one."""
    m2 = shape[0][0]
    return s.m2 / m2 if m2 > 0 and math.isfinite(m2) else None


def backward_gain(module: nn.Module, shape: list[tuple[float, float]],
                  s: Signal) -> float | None:
    """Train mode: Var[dx]/Var[dy] = mean_c gamma_c^2/(k^2 v_c + eps), from Q measured
    at k = 1 (exact there; eps moves with the scale as for the pooled variance).
    None in eval mode, whose gain does not depend on the input (theory.norms)."""
    k2 = _scale(shape, s)
    if k2 is None or norms.uses_running_stats(module):
        return None
    (_, var), (q, _) = shape[0], shape[1]
    eps = norms.eps_of(module)
    return q * (var + eps) / (k2 * var + eps)


def running_forward(module: nn.Module, shape: list[tuple[float, float]], s: Signal,
                    scheme: bool) -> Signal | None:
    """Eval mode: E[out^2] = A k^2 + B k + C, and the share of it that is a channel
    mean, A1 k^2 + B k + C. A scheme re-draws the weights, so its channel means and
    variances are no longer the ones the running statistics were taken from: they keep
    their measured energies (mean_c mu_c^2 = m2 - V, and V) but point anywhere, so
    the cross terms B average out and a_c^2 enters through its mean."""
    k2 = _scale(shape, s)
    if k2 is None or not norms.uses_running_stats(module):
        return None
    (m2, var), (_, c), (a_full, a_mean), (b, a2) = shape[:4]
    k = math.sqrt(k2)
    if scheme:
        total, shared = a2 * k2 * m2 + c, a2 * k2 * (m2 - var) + c
    else:
        total, shared = a_full * k2 + b * k + c, a_mean * k2 + b * k + c
    if total <= 0:
        return Signal(max(total, 0.0))
    share = min(1.0, max(0.0, shared / total))
    return Signal(total, share, share)
