"""One position apart from the others: a class token.

A ViT concatenates a learned class token to the patch tokens and its head reads only
that position. Both halves of the walk then see two populations of positions, which one
number per tensor composes wrongly through the per-position rules:

* forward: the class token starts from its own parameter (zero at init), so its part
  of the residual stream is far smaller than the patch tokens' (E[x²] 0.0004 against
  0.34 at the first block of the bench's ViT, 0.23 against 0.57 at the last);
* backward: the head's gradient reaches only that position, so a LayerNorm divides it
  by the class token's own variance, not the average one (1/0.0004 at the first block:
  the class token's stream gradient grows 60x over the 4 blocks while the average
  token's rule says 1.4x).

The walk carries, beside a tensor's mean second moment, its value at that one position
(``Lead``: where it is, and its E[x²] there; the gradient's ``Grad.lead``), and maps
both populations through every rule that acts position by position (weight layers on
the last dimension, LayerNorm and RMSNorm, activations, dropout, adds and views that
keep the positions' axis). Attention mixes the positions (theory.mha): at init every
query's output is a p-weighted mean over all the values, so its forward is the same at
every position; in the backward the value and key paths give every key the gradient
averaged over the queries (dv_j = Σ_i p_ij g_i: E[dv_j²] = Σ_i E[p_ij²] g_i², and
E[p_ij²] = P₂,i/T alike for every key), while the query path stays at the query's own
position, in proportion to its own E[g²]. At flat attention the value path hands every
key the same vector, Σ_i g_i/T: below the last block the other positions' gradients
share a part (``Grad.pairs``, E[g_i g_j] over their pairs; 0.6-0.75 of their E[g²]
measured on the ViT), which the next attention's value path sums coherently (its r_g).

The lead is born at a concatenation along an axis where exactly one piece is one
position wide, and a slice that picks one position along that axis (``x[:, 0]``) reads
it. An op the walk does not know to keep the axis drops it: from there on the
positions are taken alike, as before.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from varprobe.theory.signal import Grad, Lead, Signal

T = torch.Tensor
CEILING = 0.999  # r_g -> 1: every position's gradient the same; kept below, as attend's r


# --- the recording --------------------------------------------------------------------
def cat_lead(pieces: Any, dim: int, out: T, lookup) -> tuple | None:
    """((axis from the end, position, positions), "input" | "const", its index among
    the node's inputs or constants) of the one piece that is a single position wide
    along ``dim``; None where there is not exactly one (or only two positions).
    ``lookup``: the recording's tensor -> node (None for a constant)."""
    if not isinstance(dim, int) or out.dim() < 2:
        return None
    dim = dim % out.dim()
    tokens = out.shape[dim]
    pieces = [t for t in pieces if isinstance(t, T) and t.numel()]
    single = [k for k, t in enumerate(pieces) if t.dim() == out.dim() and t.shape[dim] == 1]
    if len(single) != 1 or tokens < 3:
        return None
    k = single[0]
    seen = [lookup(t) is not None for t in pieces]
    index = sum(1 for s in seen[:k] if s == seen[k])  # the recording's order of each kind
    position = sum(t.shape[dim] for t in pieces[:k])
    return (dim - out.dim(), position, tokens), "input" if seen[k] else "const", index


def picked(func, args: tuple, out: T) -> tuple[int, int, int] | None:
    """(axis from the end, position, positions) of a slice that takes one position
    along one axis and everything along the others: ``x[:, 0]``, ``x.select(1, 0)``."""
    x = args[0] if args else None
    if not isinstance(x, T) or x.dim() < 2:
        return None
    if getattr(func, "__name__", "") == "select" and len(args) >= 3:
        dim, index = args[1], args[2]
    elif getattr(func, "__name__", "") == "__getitem__" and len(args) == 2:
        items = args[1] if isinstance(args[1], tuple) else (args[1],)
        ints = [k for k, i in enumerate(items) if isinstance(i, int) and not isinstance(i, bool)]
        whole = all(i == slice(None) for k, i in enumerate(items) if k not in ints)
        if len(ints) != 1 or not whole or len(items) > x.dim():
            return None
        dim, index = ints[0], items[ints[0]]
    else:
        return None
    if not isinstance(dim, int) or not isinstance(index, int):
        return None
    dim = dim % x.dim()
    return dim - x.dim(), index % x.shape[dim], x.shape[dim]


def tails(a: T, out: T) -> int:
    """How many trailing dimensions ``a`` and ``out`` share: a lead on an axis within
    them keeps its place across the op (a broadcast or a reshape of the leading
    dimensions leaves it where it was)."""
    k = 0
    while k < min(a.dim(), out.dim()) and a.shape[-1 - k] == out.shape[-1 - k]:
        k += 1
    return k


def varies(c: T, out: T) -> bool:
    """Whether a constant added to ``out`` (B, T, d) has its own value at each position
    (learned positions, (1, T, d)): tokens do not share it, so it adds nothing to their
    correlation, unlike a bias every position gets (walk._linear)."""
    return out.dim() >= 3 and c.dim() >= 2 and c.shape[-2] == out.shape[-2] > 1


# --- the forward ------------------------------------------------------------------------
def rest(s: Signal) -> Signal:
    """The other positions: E[x²] = (T mean − lead)/(T − 1)."""
    tokens = s.lead.at[2]
    m2 = max((tokens * s.m2 - s.lead.m2) / (tokens - 1), 0.0)
    return dataclasses.replace(s, m2=m2, lead=None)


def scaled(lead: Lead | None, factor: float) -> Lead | None:
    return None if lead is None else Lead(lead.at, lead.m2 * factor)


def at_lead(s: Signal) -> Signal:
    return dataclasses.replace(s, m2=s.lead.m2, lead=None)


def through_linear(node, ins: list[Signal], out: Signal, constants: list,
                   scale: float) -> Signal:
    """A linear node (add, constant factor, view, concatenation, slice): the lead of a
    concatenation's one-position piece; a picked position's own E[x²]; through an add
    or a view, the inputs' leads where they keep their axis (an input without one
    adds the same at every position: out differs from the mean by Σ f_i (lead_i − m2_i))."""
    if node.lead is not None:
        at, kind, k = node.lead
        m2 = ins[k].m2 if kind == "input" else constants[node.const[k][1]][0]
        return dataclasses.replace(out, lead=Lead(at, scale * m2))
    if node.pick is not None:
        s = ins[0]
        if s.lead is None or s.lead.at[0] != node.pick[0] or s.lead.at[2] != node.pick[2]:
            return out
        own = at_lead(s) if s.lead.at[1] == node.pick[1] else rest(s)
        return dataclasses.replace(out, m2=scale * own.m2)
    if node.cat:
        return out
    leads = [s.lead for s in ins if s.lead is not None]
    if not leads or any(lead.at != leads[0].at for lead in leads):
        return out
    axis = leads[0].at[0]
    extra = 0.0
    for s, f, keep in zip(ins, node.forward, node.tails):
        if s.lead is None:
            continue
        if keep < -axis:
            return out
        extra += f * (s.lead.m2 - s.m2)
    return dataclasses.replace(out, lead=Lead(leads[0].at, max(out.m2 + scale * extra, 0.0)))


def alike(out: Signal, s_in: Signal) -> Signal:
    """Self-attention's output: every query's is a p-weighted mean over all the values,
    alike at every position, the lead's included (its place kept for the backward)."""
    if s_in.lead is None:
        return out
    return dataclasses.replace(out, lead=Lead(s_in.lead.at, out.m2))


def per_position(module: nn.Module, layer, lead: Lead | None) -> bool:
    """Whether the call maps each position by the same function of that position's own
    features, keeping the lead's axis (the tokens' -2 where there is no lead): a weight
    layer or a norm on the last dimension (Linear, LayerNorm, RMSNorm), an activation,
    dropout, an identity."""
    from varprobe.theory import norms, rules  # noqa: PLC0415 -- they import signal too

    axis = lead.at[0] if lead is not None else -2
    if layer is None:  # an activation of the recording (F.gelu): elementwise
        return True
    shape, before = layer.shape, layer.input_shape
    if not isinstance(shape, list) or not isinstance(before, list) or \
            len(shape) != len(before) or -axis > len(shape):
        return False
    if isinstance(module, nn.Linear) or (norms.is_norm(module) and not isinstance(
            module, (nn.GroupNorm, *norms.BATCH_NORMS))):
        trailing = len(getattr(module, "normalized_shape", (1,)) or (1,))
        return -axis > trailing and shape[:-trailing] == before[:-trailing]
    elementwise = layer.kind == "activation" or isinstance(module, (*rules.DROPOUTS,
                                                                   *rules.IDENTITY_LIKE))
    return elementwise and shape == before


def through_call(module: nn.Module, layer, s_in: Signal | None, out: Signal | None,
                 rule) -> Signal | None:
    """The call's output lead: its rule applied to the lead position's input (``rule``:
    Signal -> Signal or None), where the call acts position by position."""
    if out is None or s_in is None or s_in.lead is None or \
            not per_position(module, layer, s_in.lead):
        return out
    own = rule(at_lead(s_in))
    return out if own is None else dataclasses.replace(out, lead=Lead(s_in.lead.at, own.m2))


# --- the backward ---------------------------------------------------------------------
def split(g: Grad, s: Signal | None) -> tuple[float, float, int] | None:
    """(E[g²] at the lead position, at each other one, positions), where the gradient
    carries a lead and the forward value it belongs to has one."""
    if g.lead is None or s is None or s.lead is None:
        return None
    tokens = s.lead.at[2]
    return g.lead, max((tokens * g.var - g.lead) / (tokens - 1), 0.0), tokens


def call_backward(module: nn.Module, layer, s_in: Signal | None, g: Grad,
                  step) -> tuple[float, float] | None:
    """(mean, lead) of the input gradient of a call that acts position by position:
    ``step(grad, signal)`` (its backward rule) on each population with its own forward
    value; None where the gradient or the input has no lead."""
    parts = split(g, s_in)
    if parts is None or not per_position(module, layer, s_in.lead):
        return None
    lead, other, tokens = parts
    d_lead = step(lead, at_lead(s_in))
    d_other = step(other, rest(s_in)) if other > 0 else 0.0
    if d_lead is None or d_other is None:
        return None
    return (d_lead + (tokens - 1) * d_other) / tokens, d_lead


def linear_backward(node, k: int, s_in: Signal | None, s_out: Signal | None, g: Grad,
                    factor: float) -> Grad:
    """The gradient of input ``k`` of a linear node (``factor``: its step, times the
    node's constant factor), with the lead where the node keeps it: a picked position
    gets all the output's gradient; a concatenation's one-position piece the lead's,
    the other pieces the rest; an add or a view passes it on."""
    out = Grad(g.var * factor, g.broken, g.note, g.sparse or node.sparse, g.rel,
               pairs=g.pairs * factor)
    lead = s_in.lead if s_in is not None else None
    if node.pick is not None:
        out.pairs = 0.0  # one position's gradient: no pair shares anything
        axis, position, tokens = node.pick
        if lead is not None and lead.at[0] == axis and lead.at[2] == tokens:
            out.lead = g.var * factor * tokens if lead.at[1] == position else 0.0
        return out
    if node.lead is not None:
        parts = split(g, s_out)
        if parts is not None:
            mine = node.lead[1] == "input" and node.lead[2] == k
            out.var = (parts[0] if mine else parts[1]) * factor
            out.pairs = 0.0 if mine else out.pairs
        return out
    if g.lead is not None and lead is not None and not node.cat and \
            node.tails and node.tails[k] >= -lead.at[0]:
        out.lead = g.lead * factor
    return out


def attention_backward(total: float, query: float, g: Grad, s_in: Signal | None
                       ) -> float | None:
    """The lead position's input gradient of a self-attention: the value and key paths
    (``total`` − ``query``) alike at every key, the query path in proportion to the
    lead query's own gradient (see the module's docstring)."""
    parts = split(g, s_in)
    if parts is None or g.var <= 0:
        return None
    return total - query + query * parts[0] / g.var


def attention_shared(total_var: float, shared: float, tokens: int) -> tuple[float, float]:
    """(r_g, the value path's shared part) of self-attention's output gradient at init
    (every key seen): r_g = Σ_{i≠i'} E[g_i g_i'] / (T (T-1) E[g²]) over all pairs, the
    other positions' shared part ``shared`` taken as the only correlation; at flat
    attention dv_j = Σ_i g_i / T for every key, so the keys share
    E[|Σ_i g_i|²]/T² = E[g²] (1 + (T-1) r_g)/T."""
    if tokens < 3 or total_var <= 0:
        return 0.0, 0.0
    r_g = min((tokens - 2) * shared / (tokens * total_var), CEILING)
    return r_g, total_var * (1 + (tokens - 1) * r_g) / tokens


def merge(have: Grad, g: Grad) -> None:
    """Two consumers' gradients add, at the lead position as on average (one without a
    lead is the same at every position); call before adding the variances."""
    have.pairs += g.pairs  # independent contributions: their pairs' parts add
    if have.lead is None and g.lead is None:
        return
    have.lead = (have.lead if have.lead is not None else have.var) + \
        (g.lead if g.lead is not None else g.var)
