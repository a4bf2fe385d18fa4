"""Weight ops called as functions on a parameter (no module around them), in the
recording: ``F.linear(x, W, b)``, ``torch.addmm(b, x, W)``, ``x @ W`` and
``F.embedding(ids, table)``.

The parameter's moments are reduced on the device like any constant operand's (one
host transfer after the pass), so these are the steps their module versions are:

    x @ W (+ b)      E[y²] = n_in E[w²] E[x²] (+ mean(b²)),  Var[dx] = n_out E[w²] Var[dy]
    F.embedding      E[y²] = E[w²] of the table (rows drawn alike), no gradient to ids

On the meta device a parameter has no values: the walk says so where it needs them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from varprobe.theory.nodes import Node, T, _arg

LINEARS = {F.linear, torch.addmm, T.addmm}


def linear(rec: Any, func, args: tuple, kwargs: dict) -> int | None:
    """F.linear(x, W, b) and addmm(b, x, W) with W (and b) not activations."""
    if func is F.linear:
        x, w, b = (args[0] if args else kwargs.get("input"),
                   _arg(args, kwargs, 1, "weight", None), _arg(args, kwargs, 2, "bias", None))
        return weight(rec, x, w, b, transposed=True)  # W of shape (n_out, n_in)
    else:
        if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
            return None
        b, x, w = (args[0] if args else kwargs.get("input"),
                   _arg(args, kwargs, 1, "mat1", None), _arg(args, kwargs, 2, "mat2", None))
    return weight(rec, x, w, b)


def weight(rec: Any, x: Any, w: Any, b: Any, transposed: bool = False) -> int | None:
    """x @ W (+ b), W of shape (n_in, n_out) ((n_out, n_in) where ``transposed``). The
    common mean becomes n_in mean(w) mu (W's own mean times the input's, over the fan-in)."""
    nx = rec._lookup(x) if isinstance(x, T) else None
    tracked = [t for t in (w, b) if isinstance(t, T) and rec._lookup(t) is not None]
    if nx is None:
        return None if tracked else -1
    if tracked or not isinstance(w, T) or w.dim() != 2:
        return None  # an activation as the weight, or not a matrix: not followed
    n_in, n_out = w.shape[::-1] if transposed else w.shape
    if x.shape[-1] != n_in:
        return None
    node = rec._add(Node("linear", (nx,), forward=(float(n_in),), means=(float(n_in),),
                         backward=(float(n_out),), scale=rec._moments(w), where=rec._where()))
    bias = rec._moments(b) if isinstance(b, T) else None
    if bias is None:
        return node if b is None else None
    return rec._add(Node("linear", (node,), forward=(1.0,), means=(1.0,), backward=(1.0,),
                         const=((1.0, bias, 1.0),), where=rec._where()))


def embedding(rec: Any, args: tuple, kwargs: dict) -> int | None:
    """F.embedding(ids, table) with the table a parameter: a lookup node (theory.walk)
    whose E[y²] is the table's mean(w²). ``max_norm`` rescales rows: not followed."""
    ids, table = args[0] if args else kwargs.get("input"), _arg(args, kwargs, 1, "weight", None)
    if not isinstance(table, T) or (isinstance(ids, T) and ids.is_floating_point()):
        return None
    if rec._lookup(table) is not None or _arg(args, kwargs, 3, "max_norm", None) is not None:
        return None
    return rec._add(Node("lookup", (), scale=rec._moments(table), where=rec._where()))
