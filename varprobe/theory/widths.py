"""How many directions the features of a token spread over: the participation ratio
w = (tr Σ)² / tr(Σ²) of their covariance Σ (the part the tokens do not share), which
attention's finite-width terms read in place of the layer width n.

Attention tilts each query's weights towards keys along a random direction a
(|a|² = s², the logit variance); for Gaussian tokens with covariance Σ the tilted mean
of the keys is Σ a, so the coupling term of attention.forward is q_v s² tr(Σ²)/(tr Σ)²
= q_v s²/w, and the query path's coherent term and the per-query spread of the logit
variance (2/w from the chi-square of |x_i|²) likewise: n for isotropic tokens (w = n),
but a ViT's patch embedding maps 48 pixels to 256 channels, so its tokens span
48·256/(48 + 256) ≈ 40 directions (measured 39.6, and 40-43 at every block's
LayerNorm; the walk's 1/n put the first blocks' attention outputs 15-30% low).

Rules (``None``: as many as the tensor has features):

* y = W x + b with i.i.d. W (n_out x n_in): E tr(Σ_y²) = σ⁴ [n_out² tr Σ² + n_out (tr Σ)²],
  so 1/w_y = 1/w_x + 1/n_out; a conv reads k taps of w_x each (w_x k, at most its
  fan-in); the bias is a shared part (the token correlation r), not a direction;
* norms, activations, dropout, views keep w (an activation's nonlinear part spreads
  over more directions: GELU 39 -> 56 measured; it is a small part of the stream);
* a sum of parts along the same directions (a residual branch is a function of the
  stream; see ``mix``): 1/w = Σ_i v_i/w_i / Σ_i v_i, v_i the part's variance
  (1 - r_i) E[x_i²]; an input with w unknown, and a constant with its own value at
  each position, count as spread over every direction (their O(1/n) terms dropped);
* attention's output: the values' w (theory.mha adds its projections).
"""

from __future__ import annotations

import math

from torch import nn

from varprobe.theory.layer_fans import is_linear_map
from varprobe.theory.signal import Signal


def effective(n: int | None, s: Signal | None) -> float | None:
    """The width attention's finite-width terms read: the layer width ``n``, or fewer
    where the tokens span fewer directions."""
    if s is None or s.width is None:
        return n
    return s.width if n is None else min(float(n), s.width)


def after_call(module: nn.Module, kind: str, s_in: Signal | None,
               out: Signal | None) -> Signal | None:
    """The output's w for one module call (``kind``: the layer's kind)."""
    if out is None or s_in is None:
        return out
    if is_linear_map(module):
        shape = _features(module)
        if shape is None:
            return _width(out, None)
        n_in, taps, n_out = shape
        w_in = min(float(n_in), s_in.width) if s_in.width else float(n_in)
        return _width(out, 1 / (1 / (w_in * taps) + 1 / n_out))
    if isinstance(module, nn.MultiheadAttention):
        e = module.embed_dim
        w = s_in.width or e
        return _width(out, 1 / (1 / w + 2 / e))  # W_v, then W_o
    if kind in ("norm", "activation") or isinstance(module, (nn.Dropout, nn.Identity)):
        return _width(out, s_in.width)
    return _width(out, None)


def _features(module: nn.Module) -> tuple[int, int, int] | None:
    """(input features, taps per output, output features); None for grouped and
    transposed convs."""
    if isinstance(module, nn.Linear):
        return module.in_features, 1, module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups != 1 or module.transposed:
            return None
        return module.in_channels, math.prod(module.kernel_size), module.out_channels
    w = getattr(module, "weight", None)  # transformers' Conv1D: W is (in, out)
    return (w.shape[0], 1, w.shape[1]) if w is not None and w.dim() == 2 else None


def mix(parts: list[tuple[float, Signal]], spread: float, out: Signal) -> Signal:
    """A sum (or concatenation) of parts (factor f_i, input) plus ``spread`` of
    E[x²] that spans every direction: 1/w = Σ_i v_i/w_i / (Σ_i v_i + spread).

    The parts are taken to lie along the same directions: a residual branch is a
    function of the stream, mostly a linear one (GELU's linear part carries 94% of
    its output's variance), so x + F(x) spans about what x spans (measured on the
    ViT: stream 39.7, MLP output 45.8, their sum 40.6, where parts along independent
    directions, 1/w = Σ v_i²/w_i / (Σ v_i)², would give 48)."""
    known = [(f * s.m2 * (1 - s.r), s.width) for f, s in parts]
    if all(w is None for _, w in known):
        return out
    total = sum(v for v, _ in known) + spread
    inverse = sum(v / w for v, w in known if w) / total if total > 0 else 0.0
    return _width(out, 1 / inverse if inverse > 0 else None)


def keep(out: Signal | None, s: Signal | None) -> Signal | None:
    """An elementwise step or attention's average of the values: w unchanged."""
    if out is None or s is None:
        return out
    return _width(out, s.width)


def _width(s: Signal, width: float | None) -> Signal:
    """``s`` with another w: built directly (dataclasses.replace costs ~20 us a call, and
    every node of every walk passes here); ``s`` itself where w is already that one
    (a Signal is frozen)."""
    if width is s.width:
        return s
    return Signal(s.m2, s.mean_share, s.r, s.lead, width)
