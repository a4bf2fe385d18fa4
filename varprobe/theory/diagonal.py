"""Token Grams known to be diagonal, for the sums that meet them.

The query and key paths of an attention call's backward (theory.tokens.query_backward,
key_backward) give the gradient a diagonal Gram; the gradients that meet at the call's
input add it to a full one (theory.tokens.blend). Adding the diagonal's zeros changes
nothing, so the sum touches only the diagonal when it knows: such Grams are made here,
read-only (the mark stays true), and marked while they live (a weak map keyed by the
array's id and checked against the array itself, so a freed array's id reused by
another is never taken for it).
"""

from __future__ import annotations

import math
import weakref

import numpy as np

_MARKED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def normalized(x: np.ndarray) -> np.ndarray | None:
    """theory.tokens.normalized(np.diag(x))[0] to the bit (the off-diagonal zeros not
    divided), marked diagonal."""
    out = np.diag(x)
    m = float(out.trace()) / x.size
    if not m > 0 or not math.isfinite(m):
        return None
    out.flat[::x.size + 1] = x / m
    out.setflags(write=False)
    _MARKED[id(out)] = out
    return out


def marked(x: np.ndarray | None) -> bool:
    return x is not None and _MARKED.get(id(x)) is x
