"""Where a node's gradient comes from: the sum of its consumers' contributions, and the
parts each hands on beside its variance (theory.shared's, a max pool's window, the
positions' profile and lead)."""

from __future__ import annotations

from typing import Any

from varprobe.theory import positions, profile, shared, tokens
from varprobe.theory.nodes import Node
from varprobe.theory.signal import Grad, Signal, fork


def keeps_window(node: Node, g: Grad) -> float | None:
    """A max pool's window past a concatenation's piece or a view (the same elements,
    so its largest is still the one a rectifier before them passed); None past
    anything else (a negation makes it the smallest, a sum mixes it with others)."""
    if g.window is None:
        return None
    same = node.cat or (len(node.inputs) == 1 and node.forward == (1.0,) and not node.const
                        and node.scale is None and node.means in ((), (1.0,)))
    return g.window if same else None


def with_parts(g: Grad, parts: shared.Parts, shape: Any = None) -> Grad:
    g.shared, g.curv, g.cross, g.shared0, g.cross0, g.centred = parts
    g.profile = shape
    return g


def rest(s: Signal | None, g: Grad) -> Signal | None:
    """The forward value of the positions other than the lead (all, where none)."""
    return positions.rest(s) if s is not None and s.lead is not None and \
        g.lead is not None else s


def flow(grads: list[Grad | None], k: int, g: Grad, fresh: bool = False) -> None:
    """Add one consumer's contribution (variances add); a ``fresh`` g is kept, not copied."""
    if k < 0:
        return
    have = grads[k]
    if have is None:
        grads[k] = g if fresh else fork(g)
        return
    positions.merge(have, g)
    have.gram = tokens.blend(have.gram, have.var, g.gram, g.var)
    have.profile = profile.blend([(have.profile, have.var), (g.profile, g.var)])
    have.var += g.var
    have.rectified += g.rectified
    have.deferred += g.deferred
    have.centred += g.centred
    have.shared += g.shared
    have.curv += g.curv
    have.cross += g.cross
    have.shared0 += g.shared0
    have.cross0 += g.cross0
    have.broken = have.broken or g.broken
    if have.sparse and g.sparse:  # slices that together cover it (RoPE's two halves)
        have.cover += g.cover
        have.sparse = have.cover < 1 - 1e-9
    else:
        have.sparse = have.sparse or g.sparse
    have.note = have.note or g.note
    have.rel = have.rel if have.rel is not None else g.rel
    # a max pool's share beside others' (GoogLeNet's pool branch beside its convs) is
    # kept apart; two different pools' are not
    if have.window is None or g.window is None or have.window == g.window:
        have.window, have.maxed = have.window or g.window, have.maxed + g.maxed
        have.pool = g.pool if have.pool is None else \
            have.pool if g.pool is None or g.pool == have.pool else None
    else:
        have.window, have.maxed, have.pool = None, 0.0, None
