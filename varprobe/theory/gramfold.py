"""Token Gram steps with their normalization folded in (theory.tokens' rules).

Every rule of theory.tokens ends in ``normalized``: the result over the mean of its
diagonal. The diagonal of each rule's result is known from T numbers before the T x T
work (the inputs' diagonals), so the mean is found first and its reciprocal folded
into a scale the rule applies anyway: one T x T pass less per rule, and no T x T
temporaries where torch fuses a scaled sum (``add(x, y, alpha=w)``, ``lerp``). The
results differ from the unfolded ones by the rounding of a reordered product (a few
ulp per entry); theory.tokens' docstring gives the rules themselves.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from varprobe.theory.windowsums import torch_view, viewable


def _scale(total: float, tokens: int) -> float | None:
    """1 / (mean diagonal) from the diagonal's sum; None where there is no shape."""
    m = total / tokens
    return 1 / m if m > 0 and math.isfinite(m) else None


def mix(parts: list[tuple[float, np.ndarray]], shared: float = 0.0, own: float = 0.0
        ) -> np.ndarray | None:
    """normalized(Σ w_i S_i + shared J + own I): each part added once, scaled."""
    tokens = parts[0][1].shape[0]
    inv = _scale(sum(w * float(s.trace()) for w, s in parts) + tokens * (shared + own),
                 tokens)
    if inv is None:
        return None
    w, s = parts[0]
    out = np.multiply(s, w * inv)  # fresh, whatever s's flags
    total = torch.from_numpy(out)
    for w, s in parts[1:]:
        if viewable(s):  # torch's view: w s added in one pass
            total.add_(torch.from_numpy(s), alpha=w * inv)
        else:  # a read-only shape (tokens alike): no copy for torch
            out += s * (w * inv)
    if shared:
        out += shared * inv
    if own:
        out.flat[::tokens + 1] += own * inv  # the diagonal
    return out


def lerp(a: np.ndarray, b: np.ndarray, w: float) -> np.ndarray:
    """(1 - w) a + w b in one pass (a fresh array)."""
    return torch.lerp(torch_view(a), torch_view(b), w).numpy()


def product(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """normalized(a ⊙ b)."""
    inv = _scale(float(np.dot(np.diag(a), np.diag(b))), a.shape[0])
    if inv is None:
        return None
    out = np.multiply(a, b)
    out *= inv
    return out


def outer_scaled(s: np.ndarray, v: np.ndarray, shared: float = 0.0) -> np.ndarray | None:
    """normalized(S_ij v_i v_j + shared): a norm's rescaling of each token (forward and
    backward), v the per-token factor."""
    tokens = v.size
    inv = _scale(float(np.dot(np.diag(s), v * v)) + tokens * shared, tokens)
    if inv is None:
        return None
    u = torch.from_numpy(np.array(v, dtype=np.float64))  # a writeable, contiguous copy
    u *= math.sqrt(inv)
    out = torch.outer(u, u)
    out *= torch_view(s)
    if shared:
        out += shared * inv
    return out.numpy()


class Cells(NamedTuple):
    """Where each pair's correlation rho in [0, 1] falls on the kernels' uniform grid
    k/n: its cell k = floor(n rho) and its place in the cell, n rho - k (rho = 1: cell n,
    0), shared by every kernel read at the same pairs (an activation's forward map and
    its derivative's in the backward)."""
    cell: np.ndarray
    frac: np.ndarray


def cells(rho: np.ndarray, n: int) -> Cells:
    """``rho``'s cells (rho is spent: it becomes the places)."""
    rho *= float(n)
    with np.errstate(invalid="ignore"):  # NaN: any cell, the NaN carried by frac
        cell = rho.astype(np.intp)  # rho ≥ 0: the floor
    rho -= cell
    return Cells(cell, rho)


def kernel_map(at: Cells, table: np.ndarray, factor: np.ndarray) -> np.ndarray | None:
    """normalized(interp(rho) ⊙ factor): ``table`` on the uniform grid k/n of [0, 1]
    (n + 1 points) read at the pairs' cells by the line through the cell's ends, as
    np.interp reads it, with no search of the grid."""
    slope = np.append(np.diff(table), 0.0)  # cell n: the last point itself
    base = table
    inv = _scale(float(np.dot(_line(np.diag(at.cell), np.diag(at.frac), slope, base),
                              np.diag(factor))), factor.shape[0])
    if inv is None:
        return None
    out = _line(at.cell, at.frac, slope * inv, base * inv)
    out *= factor
    return out


def _line(cell: np.ndarray, frac: np.ndarray, slope: np.ndarray, base: np.ndarray
          ) -> np.ndarray:
    out = np.take(slope, cell, mode="clip")  # clip: a NaN's cell (frac carries the NaN)
    out *= frac
    out += np.take(base, cell, mode="clip")
    return out
