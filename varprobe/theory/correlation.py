"""Token correlation through layers: scalar rules for the uncentered r (attention.md §3.7).

r = mean over token pairs i != j of E[x_i x_j] / E[x^2], the quantity attention's
closed forms take (varprobe.theory.attention). Weights are zero-mean and independent of
the tokens; every rule maps (second moments, r) of the inputs to r of the output.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

Z_MAX = 12.0  # N(0, 1) mass beyond |z| = 12 is < 1e-32
NODES = 48    # Gauss-Legendre nodes per smooth piece


def linear(r: float, q: float, bias_var: float = 0.0) -> float:
    """y = W x + b: W keeps r; a bias (E[b^2] = bias_var, q = E[(W x)^2]) is shared by
    all tokens: r' = (q r + b^2) / (q + b^2)."""
    total = q + bias_var
    return (q * r + bias_var) / total if total > 0 else r


def norm(r: float) -> float:
    """LayerNorm / RMSNorm: r unchanged to first order (every token is rescaled alike)."""
    return r


def relu(rho: float) -> float:
    """ReLU on zero-mean Gaussian pre-activations with correlation rho (the arc-cosine
    kernel of degree 1, normalized by E[relu^2] = q/2):
    rho' = [sqrt(1 - rho^2) + (pi - arccos rho) rho] / pi; 0 -> 1/pi, 1 -> 1."""
    rho = min(1.0, max(-1.0, rho))
    return (math.sqrt(1 - rho * rho) + (math.pi - math.acos(rho)) * rho) / math.pi


def dropout(r: float, p: float) -> float:
    """Inverted dropout: independent masks, E[d_i d_j] = 1, E[d^2] = 1/(1-p): r' = (1-p) r."""
    return (1 - p) * r


def residual_add(q_a: float, r_a: float, q_b: float, r_b: float) -> float:
    """a + b with independent zero-mean branches: r' = (q_a r_a + q_b r_b) / (q_a + q_b)."""
    total = q_a + q_b
    return (q_a * r_a + q_b * r_b) / total if total > 0 else 0.0


def embedding(same_id: float, q_token: float = 1.0, q_position: float = 0.0) -> float:
    """Token embedding (E[e^2] = q_token) plus learned random positions (q_position):
    two positions share a vector only when their ids agree, with probability same_id
    (1/V for uniform ids over a vocabulary of V, sum_v p_v^2 in general):
    r = q_token same_id / (q_token + q_position)."""
    return q_token * same_id / (q_token + q_position)


def activation(rho: float, fn: Callable[[torch.Tensor], torch.Tensor], q: float = 1.0,
               breakpoints: Sequence[float] = ()) -> float:
    """E[f(a) f(b)] / E[f(a)^2] for (a, b) ~ N(0, q [[1, rho], [rho, 1]]): the mean-field
    correlation map of an elementwise activation f, beside the length map E[f(a)^2].

    ``fn`` takes a float64 tensor of points (a torch function or module). Split
    Gauss-Legendre in both variables: b = rho a + sqrt(1-rho^2) z, and the inner rule is
    cut where b crosses 0 or a breakpoint (kinks, in pre-activation units), so ReLU-like
    kinks cost no accuracy (relu agrees with the closed form to ~1e-9).
    """
    if not q > 0:
        raise ValueError(f"variance q must be positive, got {q}")
    rho = min(1.0, max(-1.0, float(rho)))
    s = math.sqrt(q)
    kinks = sorted({0.0, *(float(b) / s for b in breakpoints)})
    z1, w1 = _rule(np.array([[-Z_MAX, *[k for k in kinks if abs(k) < Z_MAX], Z_MAX]]))
    fa = _points(fn, s * z1[0])
    norm2 = float(w1[0] @ (fa * fa))
    if not norm2 > 0:
        raise ValueError("f(a) is zero almost surely: no correlation")
    c = math.sqrt(1 - rho * rho)
    if c < 1e-12:
        fb = fa if rho > 0 else _points(fn, -s * z1[0])
        return float(w1[0] @ (fa * fb)) / norm2
    inner = (np.array(kinks)[None, :] - rho * z1[0][:, None]) / c     # z where b hits a kink
    cuts = np.sort(np.clip(np.hstack([np.full((inner.shape[0], 1), -Z_MAX), inner,
                                      np.full((inner.shape[0], 1), Z_MAX)]), -Z_MAX, Z_MAX))
    z2, w2 = _rule(cuts)
    fb = _points(fn, s * (rho * z1[0][:, None] + c * z2)).reshape(z2.shape)
    return float(w1[0] @ (fa * (w2 * fb).sum(1))) / norm2


def _points(fn: Callable, points: np.ndarray) -> np.ndarray:
    out = fn(torch.from_numpy(np.ascontiguousarray(points)))
    return torch.as_tensor(out, dtype=torch.float64).detach().numpy().reshape(points.shape)


def _rule(cuts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of nodes z and weights phi(z) dz: NODES Gauss-Legendre nodes on each piece
    between consecutive cuts (a zero-length piece gets zero weight)."""
    t, v = _legendre()
    lo, hi = cuts[:, :-1, None], cuts[:, 1:, None]
    z = ((lo + hi) / 2 + (hi - lo) / 2 * t).reshape(cuts.shape[0], -1)
    dz = ((hi - lo) / 2 * v).reshape(cuts.shape[0], -1)
    return z, dz * np.exp(-z * z / 2) / math.sqrt(2 * math.pi)


@functools.cache
def _legendre() -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(NODES)
