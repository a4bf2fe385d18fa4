"""A concatenation's pieces, measured in the backward: each piece's share of the
gradient.

The walk carries one gradient variance per tensor and gives every piece of a torch.cat
the per-element variance of the whole. Where the tokens' gradients differ that is the
average over pieces that do not share it: a ViT's head reads only its class token,
whose residual stream starts at zeros plus a position, so its LayerNorms divide it by
a scale ~1e-3 of the patches' and its gradient is most of the stream's (theory.tokennorm
makes the average right); the patch piece gets a small part of it. So a probe measures,
for each piece that is an activation, s_i = E[dy^2 over the piece] / E[dy^2] at the
concatenation's output (a hook on its gradient, filled into a slot among the recording's
constants), and the walk gives that piece s_i times its gradient instead of 1
(``varprobe predict``: 1).
"""

from __future__ import annotations

import torch

T = torch.Tensor


def watch(rec, node: int | None, pieces, dim: int, out: object) -> None:
    """Slots (s_i, 1) for the activation pieces of a torch.cat along ``dim`` into
    ``out``, kept in ``rec.cat_shares[node]`` (their first index among the constants)."""
    if node is None or node < 0 or not isinstance(out, T) or out.is_meta \
            or not out.requires_grad \
            or not all(isinstance(t, T) and t.dim() == out.dim() for t in pieces):
        return  # (an empty 1-D piece, which torch.cat skips, is a key cache's start)
    sizes = [t.shape[dim] for t in pieces]
    active = [i for i, t in enumerate(pieces) if t.numel() and rec._lookup(t) is not None]
    if sum(sizes) != out.shape[dim] or len(active) != len(rec.nodes[node].inputs):
        return
    slots = [torch.zeros(2, dtype=torch.float64, device=out.device) for _ in active]

    def fill(grad: T) -> None:
        with torch.no_grad():
            g = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
            whole = torch.linalg.vector_norm(g).double().square() / g.numel()
            parts = g.split(sizes, dim)
            for slot, i in zip(slots, active):
                part = torch.linalg.vector_norm(parts[i]).double().square() / parts[i].numel()
                share = torch.where(whole > 0, part / whole.clamp(min=1e-300),
                                    torch.ones_like(whole))
                slot.copy_(torch.stack([share, torch.ones_like(share)]))

    out.register_hook(fill)
    rec.cat_shares[node] = len(rec._constants)
    rec._constants.extend(slots)


def shares(constants: list, index: int | None, count: int) -> list[float] | None:
    """The measured s_i of a concatenation's ``count`` activation pieces, or None where
    nothing was measured or the backward never filled them."""
    if index is None:
        return None
    slots = constants[index:index + count]
    if len(slots) != count or any(s is None or s[1] < 0.5 for s in slots):
        return None
    return [float(s[0]) for s in slots]
