"""The recording's attention nodes: scaled_dot_product_attention calls, and eager
attention followed op by op.

Eager attention (transformers' ``eager``, hand-written attention) spells softmax
attention out: ``scores = q @ k^T [* c] [+ mask | masked_fill]``, ``p = softmax(scores,
-1)``, ``[dropout(p)]``, ``out = p @ v``. The recording follows that chain: a matmul of
two activations becomes a pending logits node that remembers its query and key nodes;
scalings by a number, additive masks, masked_fill, dtype casts and the softmax over the
keys carry the pending state; dropout on the probabilities sets the attention dropout;
a soft cap c·tanh(s/c) on the logits (Gemma 2) sets ``softcap`` (the scale at the tanh,
and the factor after it, give c);
the matmul of the probabilities with a third activation becomes one "attention" node
(inputs q, k, v) that the walk predicts with the same closed forms as an SDPA call. The
intermediate nodes stay unknown ops: a chain that is only partly there (a matmul of two
activations that is not attention, a softmax over another axis) is named where it is
used, never given a number. Under eager attention p is materialized, so the probe
measures Σp² over every row and the logit second moment at the softmax (on the device,
fetched with the pass's other statistics), plus whether the mask is causal.

A matmul of an activation with a parameter (``x @ W``) is a linear map
(theory.functional).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from varprobe import stats
from varprobe.theory import (
    attention,
    attention_paths,
    attention_stats,
    functional,
    gradient_stats,
)
from varprobe.theory.nodes import (
    ADD,
    DIV,
    MUL,
    VIEWS,
    Attention,
    Node,
    T,
    _arg,
    _name,
    is_view,
)

MATMULS = {torch.matmul, T.matmul, T.__matmul__, torch.bmm, T.bmm, torch.einsum}
# views that keep the elements' order: with the last two axes kept, the heads are only
# regrouped (Bloom's (batch·heads, q, k) logits viewed as (batch, heads, q, k))
RESHAPES = {T.view, T.reshape, torch.reshape, T.flatten, torch.flatten, T.unflatten,
            torch.unflatten, T.squeeze, torch.squeeze, T.unsqueeze, torch.unsqueeze}
BADDBMMS = {torch.baddbmm, T.baddbmm}  # beta·bias + alpha·(q @ kᵀ): Bloom's ALiBi logits
NUMBERS = {torch.scalar_tensor, torch.tensor}  # a tensor made from one Python number
SOFTMAXES = {F.softmax, torch.softmax, T.softmax}
MASK_FILLS = {T.masked_fill, T.masked_fill_, torch.masked_fill}
TANHS = {torch.tanh, T.tanh, F.tanh}
PAIR = " of two activations"  # what an unfollowed matmul of two activations is called


@dataclass
class Pending:
    """An eager attention under way: its query and key nodes, its facts so far, whether
    the softmax has been taken, and what the probe measured on the device so far
    (r_k, the queries and the keys at the logits; Σp², the mean logit², the mask's
    shape, p itself and a subsample of its rows at the softmax; the keys' prefix share
    at the values, once the mask's window is known). The tensors are held
    by reference, as autograd holds them."""

    q: int
    k: int
    facts: Attention
    probs: bool = False
    stats: dict[str, T] = field(default_factory=dict)
    capped_at: float | None = None  # the logits' scale where a tanh capped them


class AttentionGraph:
    """Held by a theory.recording.Recording; adds its nodes through it."""

    def __init__(self, rec: Any, model: nn.Module):
        self.rec = rec
        self.pending: dict[int, Pending] = {}
        self.modules: dict[int, nn.Module] = {}  # call index -> module (the Recorder's)
        self._softmax_inputs: dict[int, T] = {}  # an nn.Softmax call's input, until it ends
        self.selected: dict[int, tuple[int, int]] = {}  # where(c, x, m): (x's node, numel)
        self._numbers: dict[int, tuple[Any, float]] = {}  # id -> (weakref, its one value)
        self._parents = {id(c): m for m in model.modules() for c in m.children()}

    # --- scaled_dot_product_attention --------------------------------------------------
    def sdpa(self, args: tuple, kwargs: dict, out: T) -> int | None:
        q, k, v = (_arg(args, kwargs, i, name, None)
                   for i, name in enumerate(("query", "key", "value")))
        if not all(isinstance(t, T) and t.dim() >= 2 for t in (q, k, v)):
            return None
        nodes = [self.rec._lookup(t) for t in (q, k, v)]
        if all(n is None for n in nodes):
            return -1
        if any(n is None for n in nodes):
            return None  # a constant query, key or value: not self-attention at init
        facts, mask = attention_stats.sdpa_facts(q, k, args, kwargs)
        if isinstance(mask, T) and mask.is_floating_point() and mask.numel():
            self._bias(facts, mask, q.shape[:-1].numel() * facts.keys)
        if not q.is_meta:
            self.rec._constants.extend(attention_stats.sdpa(q, k, v, mask, facts))
            facts.measured = len(self.rec._constants) - 5
        self._watch(facts, out, q, k, v, mask)
        return self.rec._add(Node("attention", tuple(nodes), attn=facts,
                                  where=self.rec._where()))

    def _bias(self, facts: Attention, mask: T, logits: int) -> None:
        """An activation in a float attn_mask (T5's relative position bias) gets the
        logits' gradient dS, each element the sum over the logits it is added to. The
        mask torch.where(causal, bias, min) makes passes all of dS to the bias: dS is 0
        where the mask hides a key."""
        node = k = self.rec._lookup(mask)
        nodes = self.rec.nodes
        while k is not None and k not in self.selected and nodes[k].op == "linear" \
                and len(nodes[k].inputs) == 1 and is_view(nodes[k]):
            k = nodes[k].inputs[0]  # .contiguous() and the like
        node, size = self.selected.get(k, (node, mask.numel()))
        if node is not None:
            facts.bias, facts.bias_fold = node, logits / size

    def selection(self, func, args: tuple, kwargs: dict, node: int) -> None:
        """Remember torch.where(cond, x, other) of one activation x and constants."""
        if func is not torch.where or len(args) != 3 or self.rec._lookup(args[0]) is not None:
            return
        found = [(self.rec._lookup(t), t.numel()) for t in args[1:] if isinstance(t, T)]
        found = [f for f in found if f[0] is not None]
        if len(found) == 1:
            self.selected[node] = found[0]

    def multihead(self, module: nn.MultiheadAttention, args: tuple, kwargs: dict,
                  ) -> Attention:
        facts, moments = attention_stats.multihead(module, args, kwargs)
        if moments:
            self.rec._constants.extend(moments)
            facts.params = len(self.rec._constants) - len(moments)
        return facts

    # --- matmuls ----------------------------------------------------------------------
    def matmul(self, func, args: tuple, kwargs: dict, out: T) -> int | None:
        operands = _operands(func, args, kwargs)
        if operands is None:
            return None
        a, b, transposed = operands
        na, nb = (self.rec._lookup(t) if isinstance(t, T) else None for t in (a, b))
        if na is None and nb is None:
            return -1
        if nb is None:
            return None if transposed else functional.weight(self.rec, a, b, None)
        if na is None:
            return None  # a constant times an activation from the left: not followed
        state = self.pending.get(na)
        if state is not None and state.probs and not transposed and nb not in self.pending:
            return self._attention(state, b, nb, out)
        node = self.rec._add(Node("unknown", (na, nb), reason=_name(func) + PAIR,
                                  where=self.rec._where()))
        if a.dim() >= 2 and b.dim() >= 2 and a.is_floating_point():
            self.pending[node] = self._logits(a, b, na, nb, transposed)
        return node

    def baddbmm(self, args: tuple, kwargs: dict, out: T) -> int | None:
        """beta·c + alpha·(a @ b) with c a constant (a position bias: ALiBi): the logits
        of a @ b scaled by alpha, c taken as a mask is (the closed forms see every key;
        a probe's measured Σp² includes it)."""
        c, a, b = (_arg(args, kwargs, i, name, None)
                   for i, name in enumerate(("input", "batch1", "batch2")))
        if not all(isinstance(t, T) for t in (c, a, b)):
            return None
        if self.rec._lookup(c) is not None:
            return None  # an activation added to the logits: not followed
        alpha, beta = (kwargs.get(name, 1) for name in ("alpha", "beta"))
        node = self.matmul(torch.bmm, (a, b), {}, out)
        state = self.pending.get(node) if isinstance(node, int) and node >= 0 else None
        if state is not None:
            if not isinstance(alpha, (int, float)) or not isinstance(beta, (int, float)):
                del self.pending[node]
                return node
            state.facts.scale, state.facts.masked = float(alpha), bool(beta)
            self.rec.nodes[node].reason = "Tensor.baddbmm" + PAIR
        return node

    def _logits(self, q: T, b: T, nq: int, nk: int, transposed: bool) -> Pending:
        k = b if transposed else b.transpose(-1, -2)  # keys as (..., T_k, d)
        facts = Attention(queries=q.shape[-2], keys=k.shape[-2], d_k=q.shape[-1],
                          heads=q.shape[-3] if q.dim() > 2 else 1,
                          kv_heads=q.shape[-3] if q.dim() > 2 else 1, scale=1.0)
        state = Pending(nq, nk, facts)
        state.facts.causal = self._causal_hint(nq)
        if not q.is_meta:
            with torch.no_grad():
                state.stats["r_k"] = attention_stats._correlation(k)
                state.stats["k"] = k.detach()
                state.stats["q"] = q.detach()
        return state

    def _causal_hint(self, nq: int) -> bool:
        """Whether the module around the query projection says it is causal (the
        ``is_causal`` of transformers' attention modules): what a mask on the meta
        device, which has no values, is taken to be. A probe measures the mask."""
        nodes, k = self.rec.nodes, nq
        while nodes[k].op in ("linear", "product") and nodes[k].inputs:
            k = nodes[k].inputs[0]
        module = self.modules.get(nodes[k].index) if nodes[k].op == "call" else None
        parent = self._parents.get(id(module)) if module is not None else None
        return bool(getattr(parent, "is_causal", False))

    def _attention(self, state: Pending, v: T, nv: int, out: T) -> int:
        facts = replace(state.facts, causal=state.facts.causal and state.facts.masked)
        if "p2" in state.stats and not v.is_meta:
            with torch.no_grad():
                s, z = state.stats, torch.zeros((), dtype=torch.float64, device=v.device)
                self.rec._constants.extend([
                    torch.stack([s["p2"], s["s2"]]),
                    torch.stack([attention_stats._correlation(v), s.get("r_k", z)]),
                    s["mask"],
                    torch.stack([attention_stats.prefix_share(v, window=s["mask"][2]),
                                 attention_stats.prefix_share(s["k"], True, window=s["mask"][2])
                                 if "k" in s else z]),
                    attention_stats.query_path(_like(s["rows"], v), v.detach(), s["k"])
                    if "k" in s else torch.stack([z, z])])
            facts.measured = len(self.rec._constants) - 5
        s = state.stats
        p = s.get("p")
        self._watch(facts, out, s.get("q"), s.get("k"), v, None,
                    _like(p, v) if p is not None else None)
        return self.rec._add(Node("attention", (state.q, state.k, nv), attn=facts,
                                  where=self.rec._where()))

    def _watch(self, facts: Attention, out: T, q: T | None, k: T | None, v: T, mask: Any,
               probs: T | None = None) -> None:
        """The gradient's token correlation at the output and the paths' factors at the
        realized tensors, measured in the backward (theory.gradient_stats,
        theory.attention_paths) into slots among the constants."""
        shape = self.rec._constants[facts.measured + 2] if facts.measured is not None \
            else None
        slots = gradient_stats.watch(out, shape[2] if isinstance(shape, T) else None)
        if slots:
            self.rec._constants.extend(slots)
            facts.gradient = len(self.rec._constants) - len(slots)
        if q is None or k is None or (probs is None and facts.measured is None):
            return  # an eager chain whose p the probe did not keep
        if self._unsaturated(facts) or facts.softcap is not None:
            return  # the paths' factors have no tanh' in their chain rule
        slots = attention_paths.watch(q, k, v, mask, facts, out, probs)
        if slots:
            self.rec._constants.extend(slots)
            facts.paths = len(self.rec._constants) - len(slots)

    def _unsaturated(self, facts: Attention) -> bool:
        """Whether the walk cannot want the paths' factors, told without a device sync:
        on the CPU, where reading a result is free, a measured mean squared logit below
        half the saturated spread ((1 - r) s^2 <= s^2) and values' r below
        attention_paths.CORRELATED. The factors are read only past one of them, and
        forming them costs about twice the call itself at the bench's sizes, so such a
        call skips them (an accelerator forms them, as it cannot look)."""
        if facts.measured is None:
            return False
        s2 = self.rec._constants[facts.measured][1]
        r_v = self.rec._constants[facts.measured + 1][0]
        return stats.reads_are_free(s2.device) and float(s2) < attention.SATURATED_SPREAD / 2 \
            and float(r_v) < attention_paths.CORRELATED

    # --- what carries a pending attention ------------------------------------------------
    def softmax(self, func, args: tuple, kwargs: dict, out: T) -> int | None:
        x = args[0] if args and isinstance(args[0], T) else kwargs.get("input")
        nx = self.rec._lookup(x) if isinstance(x, T) else None
        if nx is None:
            return -1
        node = self.rec._add(Node("unknown", (nx,), reason=_name(func),
                                  where=self.rec._where()))
        self._softmaxed(self.pending.get(nx), _arg(args, kwargs, 1, "dim", None), x, node, out)
        return node

    def _softmaxed(self, state: Pending | None, dim: Any, x: T, node: int, out: T) -> None:
        if state is not None and not state.probs and dim in (-1, x.dim() - 1):
            if state.capped_at is not None:
                state = replace(state, facts=replace(
                    state.facts, softcap=abs(state.facts.scale / state.capped_at)))
            self.pending[node] = replace(state, probs=True, stats={
                **state.stats, **(_softmax_stats(x, out) if not x.is_meta else {})})

    def enter(self, index: int, module: nn.Module, args: tuple) -> None:
        """A module call starts: an nn.Softmax's input (the logits) is kept until it
        ends, for the statistics taken at the softmax."""
        self.modules[index] = module
        if isinstance(module, nn.Softmax) and args and isinstance(args[0], T):
            self._softmax_inputs[index] = args[0]

    def module_step(self, index: int, inputs: tuple[int, ...], node: int, out: T) -> None:
        """An ``nn.Softmax`` or ``nn.Dropout`` module on the chain (an
        ``nn.Softmax(dim=-1)``, timm's ``attn_drop``), followed as its function is."""
        module, x = self.modules.get(index), self._softmax_inputs.pop(index, None)
        state = self.pending.get(inputs[0]) if len(inputs) == 1 else None
        if isinstance(module, nn.Softmax) and isinstance(x, T):
            self._softmaxed(state, module.dim, x, node, out)
        elif type(module) is nn.Dropout and state is not None and state.probs:
            self.pending[node] = replace(state, facts=replace(
                state.facts, dropout=module.p if module.training else 0.0))

    def carry(self, func, args: tuple, kwargs: dict, node: int, out: T) -> None:
        """Pass a pending attention on to ``node``, made by ``func`` from it, where
        ``func`` is one of the steps between the logits and the product with v."""
        inputs = self.rec.nodes[node].inputs
        state = self.pending.get(inputs[0]) if inputs else None
        if state is None and func in ADD and len(inputs) == 2:
            state = self.pending.get(inputs[1])  # bias + logits
        if state is None or node in self.pending or not isinstance(args[0], T):
            return
        if func in ADD and len(inputs) == 2:
            self._added(state, node, args, kwargs, out)
            return
        if out.shape != args[0].shape and not (
                func in RESHAPES and out.shape[-2:] == args[0].shape[-2:]):
            return  # a view that moves the axes: the softmax's axis is lost
        if func in TANHS and not state.probs and state.capped_at is None \
                and len(inputs) == 1 and state.facts.scale:
            # c·tanh(s/c): the scale here is s's over c; the factors after it make s's
            self.pending[node] = replace(state, capped_at=state.facts.scale)
            return
        fill = _arg(args, kwargs, 2, "value", None) if func in MASK_FILLS else None
        fill = self.number(fill) if isinstance(fill, T) else fill
        zero_fill = isinstance(fill, (int, float)) and fill == 0  # a number: no sync
        facts = self._step(func, self.rec.nodes[node], state, zero_fill)
        if facts is not None:
            self.pending[node] = replace(state, facts=facts)

    def made(self, func, args: tuple, out: Any) -> None:
        """Remember the value of a tensor made from one Python number
        (``torch.scalar_tensor(0)``, ``torch.tensor(0.0)``: CPM-Ant's mask fill), so
        that reading it later needs no device sync."""
        if func in NUMBERS and args and isinstance(args[0], (int, float)) \
                and isinstance(out, T) and out.dim() == 0:
            self._numbers[id(out)] = (weakref.ref(out), float(args[0]))

    def number(self, t: T) -> float | None:
        seen = self._numbers.get(id(t))
        return seen[1] if seen is not None and seen[0]() is t and t._version == 0 else None

    def _added(self, state: Pending, node: int, args: tuple, kwargs: dict, out: T) -> None:
        """logits + an activation made apart from them (MPNet's and CPM-Ant's relative
        position bias, computed from a table each call): the bias of an SDPA call's float
        mask (``_bias``); its variance is left out of the closed forms' logit variance, as
        there."""
        n = self.rec.nodes[node]
        logits = n.inputs[0] if n.inputs[0] in self.pending else n.inputs[1]
        bias = n.inputs[1] if logits == n.inputs[0] else n.inputs[0]
        other = next((t for t in (args[0], _arg(args, kwargs, 1, "other", None))
                      if isinstance(t, T) and self.rec._lookup(t) == bias), None)
        if state.probs or state.facts.bias is not None or other is None \
                or n.forward != (1.0, 1.0) or out.shape[-2:] != (
                    state.facts.queries, state.facts.keys) or bias in self.pending \
                or self.rec._root(bias) in (self.rec._root(state.q), self.rec._root(state.k)):
            return
        self.pending[node] = replace(state, facts=replace(
            state.facts, bias=bias, bias_fold=out.numel() / max(other.numel(), 1)))

    def _step(self, func, node: Node, state: Pending, zero_fill: bool = False) -> Attention | None:
        facts = state.facts
        if func in VIEWS or func is F.dropout:
            if func is F.dropout:
                return replace(facts, dropout=node.p) if state.probs else None
            return facts if len(node.inputs) == 1 else None
        if state.probs and zero_fill and len(node.inputs) == 1:
            # p's masked entries set to 0 again after the softmax: taken to be
            # the ones the logits' mask already sent to 0, so p @ v is unchanged
            return facts
        if state.probs or len(node.inputs) != 1:
            return None  # p scaled, masked or added to: not attention's p @ v
        if (func in MUL or func in DIV) and node.scale is not None:
            c = self.rec._constants[node.scale]
            return replace(facts, scale=facts.scale * c[1]) if isinstance(c, tuple) else None
        if func in ADD and node.const or func in MASK_FILLS or func is torch.where:
            return replace(facts, masked=True)
        return None


def _like(p: T, v: T) -> T:
    """p (or rows of it) with v's leading axes where the chain regrouped them (Bloom's
    (batch, heads, q, k) probabilities against (batch·heads, k, d) values)."""
    lead = v.shape[:-2]
    if p.shape[:-2] == lead or p.shape[:-2].numel() != lead.numel():
        return p
    return p.reshape(*lead, *p.shape[-2:])


def _operands(func, args: tuple, kwargs: dict) -> tuple[Any, Any, bool] | None:
    """(a, b, transposed): the product is a @ b, or a @ b^T where ``transposed`` (an
    einsum over the last axis of both). None: an einsum of another shape."""
    if func is not torch.einsum:
        return args[0] if args else kwargs.get("input"), \
            _arg(args, kwargs, 1, "other", kwargs.get("mat2")), False
    ops = args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else args[1]
    if len(ops) != 2 or "->" not in args[0]:
        return None
    (left, right), out = args[0].replace(" ", "").split("->")[0].split(","), \
        args[0].replace(" ", "").split("->")[1]
    if (len(left) < 2 or len(right) < 2 or left[:-2] != right[:-2] or out[:-2] != left[:-2]
            or "." in left):
        return None
    i, j = left[-2:]
    if right[-2:] == j + right[-1] and out[-2:] == i + right[-1] and right[-1] not in (i, j):
        return ops[0], ops[1], False   # ...ij,...jk->...ik
    if right[-1] == j and out[-2:] == i + right[-2] and right[-2] not in (i, j):
        return ops[0], ops[1], True    # ...ij,...kj->...ik
    return None


def _softmax_stats(x: T, p: T) -> dict[str, T]:
    """Σp² over every row, the mean squared logit over the keys each query sees, and the
    mask's shape (attention_stats.mask_shape's causal, full and window), on the device;
    a subsample of p's rows for the query path's factor (attention_stats.query_path),
    and p (by reference) for the paths' factors of a saturated call
    (theory.attention_paths). The sums of squares
    accumulated in float64 without a float64 copy of a (B, H, T, T) tensor
    (attention_stats._square_sum), as at an SDPA call."""
    with torch.no_grad():
        x, p = x.detach(), p.detach()
        allowed = torch.isfinite(x) & (x > attention_stats.MASKED)
        count = allowed.sum().clamp(min=1)
        rows = torch.linspace(0, p.shape[-2] - 1, min(attention_stats.SUBSAMPLE, p.shape[-2]),
                              device=p.device).round().long()
        per_row = max(p.numel() // max(p.shape[-1], 1), 1)
        return {"p2": attention_stats._square_sum(p, torch.float64) / per_row, "p": p,
                "rows": p.index_select(-2, rows),
                "s2": attention_stats._square_sum(x.masked_fill(~allowed, 0.0), torch.float64)
                / count,
                "mask": attention_stats.allowed_shape(allowed, *x.shape[-2:])}
