"""The tokens' shapes a walk reads: measured, or in closed form.

Two walks see a model's tokens differently. The actual init's walk over a measured pass
takes their shapes from the measurement: each LayerNorm's and RMSNorm's kappa (each
token's own scale against its gradient, theory.tokennorm) and each concatenation's
pieces' shares of its gradient (theory.catshare). The walks with nothing measured about
the tokens (a scheme's, which re-draws the weights that set those shapes, and
``varprobe predict`` on meta) carry them in closed form instead: a class token's own
value next to the mean (theory.positions), the directions the tokens span
(theory.widths), and a learned position table's part that no two tokens share. A walk
uses one of the two, never both (``closed_tokens``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from torch import nn

from varprobe.theory import (
    attend,
    attention,
    catshare,
    gradient_stats,
    norms,
    positions,
    rules,
    tokennorm,
    tokens,
    widths,
)
from varprobe.theory.nodes import Node
from varprobe.theory.signal import Signal, Value


class TokenShapes:
    """Mixed into theory.walk.Walk (its graph, constants, calls and modes)."""

    def token_gain(self, node: Node, s: Signal | None = None, mu: float = 0.0
                   ) -> float | None:
        """A feature norm's kappa (theory.tokennorm), for the actual init's walk (a
        scheme re-draws the weights that set the tokens' scales and gradients), times
        the rule's variance over the tokens' own at the walk's input ``s``; None on
        meta, or where no gradient reached the norm's output."""
        index = getattr(self.graph, "token_norms", {}).get(node.index)
        if index is None or not self.measured or self.actual is not None:
            return None
        slot, module = self.constants[index], self.modules[node.index]
        kappa = tokennorm.gain(slot)
        share = tokennorm.own_means(slot, module, self.report.layers[node.index].input)
        if kappa is None or s is None or share >= 1:
            return kappa
        whole, eps = norms._variance(module, s, mu), norms.eps_of(module)
        return kappa * (whole + eps) / (whole * share + eps)

    @property
    def closed_tokens(self) -> bool:
        """Whether the walk models the tokens' shapes in closed form (a class token's
        own value, the tokens' width: theory.positions, theory.widths): every walk but
        the actual init's over a measured pass, which measures them (theory.tokennorm's
        kappa, theory.catshare's shares)."""
        return not (self.measured and self.actual is None)

    def cat_shares(self, k: int, node: Node) -> list[float] | None:
        """Concatenation ``k``'s pieces' shares of its gradient (theory.catshare), for
        the actual init's walk (as tokennorm's kappa); None elsewhere."""
        index = getattr(self.graph, "cat_shares", {}).get(k) \
            if node.cat and self.measured and self.actual is None else None
        return catshare.shares(self.constants, index, len(node.inputs))

    def _own(self, node: Node) -> float:
        """The constants with their own value at each position (learned positions):
        no part that tokens share, they add to E[x²], not to the token correlation r
        (nor to the mean of a unit over the positions a norm averages); none where
        the tokens' shapes are measured (closed_tokens)."""
        if not self.closed_tokens:
            return 0.0
        return sum(f * self.constants[c][0] for (f, c, _), mine in zip(node.const, node.own)
                   if mine)

    def token_shapes(self, node: Node, ins: list[Value], signal: Signal) -> Signal:
        """A linear node's output with the class token's own value and the tokens'
        width, in the walks that model them in closed form."""
        if not self.closed_tokens:
            return signal
        scale = 1.0 if node.scale is None else self.constants[node.scale][0]
        signal = positions.through_linear(node, [v.signal for v in ins], signal,
                                          self.constants, scale)
        return widths.mix([(f, v.signal) for f, v in zip(node.forward, ins)],
                          self._own(node), signal)

    def own_correlations(self, node: Node, measured: tuple) -> tuple:
        """The (r_v, r_k, u_v, u_k) a probe measured at an attention call, as the walks
        that take them read it; in a scheme's walk far past saturation, moved by what
        the scheme changes in the walk's own r (its r less the actual init's walk's at
        the call). The measured r is what the actual init's attention left, and a
        saturated softmax averages far less (T5 under He, its decoder's last block: the
        values at r 0.51 under the actual init, 0.20 under He); what the walk's own r
        does not see, both walks share (tokens correlated at the input, BERT's
        token-type embedding), and the measurement keeps it."""
        if self.actual is None or not self._far_saturated(node):
            return measured
        facts = self.facts(node)
        mine, theirs = ([max(x.r, x.mean_share) for x in (walk.values[i].signal
                                                            for i in node.inputs[1:3])]
                        for walk in (self, self.actual))
        r_k, r_v = (attend.correlation(facts, None, measured, side) + a - b
                    for side, a, b in ((1, mine[0], theirs[0]), (0, mine[1], theirs[1])))
        return attend.shifted(facts, measured, min(max(r_v, 0.0), attend.CEILING),
                              min(max(r_k, 0.0), attend.CEILING))

    def _far_saturated(self, node: Node) -> bool:
        """(1 - r) s² past tokens.SATURATED at the walk's own r: where the walk carries
        no Gram (theory.tokenshape.TokenGrams)."""
        q, k, v = (self.values[i].signal for i in node.inputs[:3])
        facts = self.facts(node)
        s2 = attend.logit_variance(facts, q, k)
        return (1 - attend.correlation(facts, v, None)) * s2 > tokens.SATURATED

    def width(self, node: Node) -> int | None:
        """The fan-in of the layer that made the queries: the width n of attention's
        finite-width terms; None where there is none."""
        k = self._made_by(node.inputs[0])
        layer = self.report.layers[self.nodes[k].index] if k is not None else None
        if layer is None or layer.kind != "weight":
            return None
        source = self.calls.get(layer.index)
        return widths.effective(layer.fan_in, source.input.signal if source is not None
                                and source.input is not None else None)


class TokenGrams:
    """The tokens' Gram matrices (theory.tokens) in the closed-form walks: forward at
    every node (``Value.gram``), backward beside each gradient (``Grad.gram``). Mixed
    into theory.walk.Walk."""

    def grams_on(self) -> bool:
        return self.closed_tokens

    @property
    def gram_sources(self) -> bool:
        """Whether the graph has a node a Gram starts at (a rotary table, an attention
        call's output): without one every node's is None, and no node need ask."""
        return any(node.op in ("table", "attention") for node in self.nodes)

    def token_gram(self, k: int, node: Node, value: Value) -> None:
        """Set ``value.gram`` from the node's inputs' (None: tokens alike, or unknown)."""
        if not self.grams_on() or value.signal is None or value.gram is not None \
                or not self.gram_sources:
            return
        try:
            value.gram = self._gram_of(k, node, value)
        except Exception:  # noqa: BLE001 -- a Gram rule's failure: the scalar rules
            value.gram = None
        gram = value.gram
        if gram is None:
            return
        # an input's Gram passed on (a view, an identity) was checked where it was made
        checked = self.__dict__.setdefault("_finite_grams", {})
        if checked.get(id(gram)) is gram:
            return
        # the sum is finite where every entry is (an inf or NaN carries into it): one
        # pass, no T x T mask; a shape's entries are far from overflowing the sum
        if gram.shape[0] > tokens.CAP or not math.isfinite(float(gram.sum())):
            value.gram = None
        else:
            checked[id(gram)] = gram

    def pair_correlations(self, s: np.ndarray) -> tuple:
        """tokens.correlations(s), kept for the activation's backward on the same Gram."""
        memo = self.__dict__.setdefault("_pair_memo", {})
        held = memo.get(id(s))
        if held is None or held[0] is not s:
            held = memo[id(s)] = (s, tokens.correlations(s))
        return held[1]

    def spent_correlations(self, s: np.ndarray) -> tuple:
        """tokens.correlations(s) at its last use (the backward): the kept copy dropped."""
        held = self.__dict__.setdefault("_pair_memo", {}).pop(id(s), None)
        return held[1] if held is not None and held[0] is s else tokens.correlations(s)

    def _in(self, i: int) -> Value | None:
        return self.values[i] if i >= 0 else None

    def _gram_of(self, k: int, node: Node, value: Value):
        ins = [self._in(i) for i in node.inputs]
        if node.op == "table":
            return self._table_gram(k, node)
        if node.op in ("input", "lookup", "unknown", "pool", "attention"):
            return None
        if any(v is None or v.signal is None for v in ins):
            return None
        if node.op == "exit":
            return ins[0].gram
        if node.op == "act":
            return tokens.activation(node.module, ins[0].gram, ins[0].signal.m2, ins[0].mu,
                                     self.pair_correlations)
        if node.op == "dropout":
            return tokens.dropout(ins[0].gram, node.p)
        if node.op == "product":
            a, b = ins
            if self.nodes[node.inputs[1]].op == "table" or self.nodes[node.inputs[0]].op == "table":
                if a.gram is None or b.gram is None or a.gram.shape != b.gram.shape:
                    return None
                return a.gram * b.gram  # the table's own scale: the add after sums them
            return tokens.product(a.gram, a.signal.r, b.gram, b.signal.r)
        if node.op == "call":
            return self._call_gram(node, ins[0] if ins else None, value)
        if node.op == "linear":
            if node.pick is not None or node.lead is not None:
                return None
            if all(v.gram is None for v in ins):
                return None
            fixed = sum(f * self.constants[c][0] for f, c, _ in node.const)
            own = self._own(node)
            if len(ins) == 1 and not fixed and not own:
                return ins[0].gram  # a view, a slice of features, a constant factor
            parts = [(f * v.signal.m2, v.gram, v.signal.r) for f, v in zip(node.forward, ins)]
            return tokens.combine(parts, fixed - own, own)
        return None

    def _call_gram(self, node: Node, src: Value | None, value: Value):
        if src is None or src.gram is None or node.attn is not None:
            return None
        layer, module = self.report.layers[node.index], self.modules[node.index]
        s = src.gram
        if layer.kind == "weight":
            if isinstance(module, nn.Embedding):
                return None
            w = self.weights[node.index]
            b2 = w.b2 if w is not None else 0.0
            return tokens.weight(s, max(value.signal.m2 - b2, 0.0), b2)
        if layer.kind == "activation" or node.index in getattr(self, "_act_calls", ()):
            return tokens.activation(module, s, src.signal.m2, src.mu, self.pair_correlations)
        if isinstance(module, rules.DROPOUTS):
            return tokens.dropout(s, module.p) if module.training else s
        if isinstance(module, rules.IDENTITY_LIKE):
            return s
        if norms.is_norm(module) and not isinstance(module, (nn.GroupNorm,
                                                              *norms.BATCH_NORMS)) \
                and "GroupNorm" not in type(module).__name__:
            m2 = src.signal.m2 if norms._is_rms(module) else max(
                src.signal.m2 - src.mu * src.mu, 0.0)
            g2, n, b2 = norms.affine_sums(module, self.host)
            return tokens.norm(s, m2, norms.eps_of(module), g2 / n, b2)
        return None

    def _table_gram(self, k: int, node: Node):
        """A rotary embedding's cos (the first table of its call) or sin, per unit of its
        E[x²] = 1/2: C_ij / (1/2), C_ij = mean_f cos(iθ_f) cos(jθ_f) (or sin sin)."""
        layer = self.report.layers[node.index]
        shape = layer.shape if isinstance(layer.shape, list) else None
        if not shape or len(shape) < 2 or shape[-2] > tokens.CAP:
            return None
        first = next(j for j, n in enumerate(self.nodes) if n.op == "table"
                     and n.index == node.index)
        theta = tokens._frequencies(self.modules[node.index], shape[-1])
        if theta is None:
            return None
        pos = np.arange(shape[-2], dtype=np.float64)
        angle = pos[:, None] * theta[None, :]
        f = np.cos(angle) if k == first else np.sin(angle)
        return f @ f.T / theta.size / 0.5

    # --- what attention reads --------------------------------------------------------
    def gram_correlations(self, node: Node, facts) -> tuple | None:
        """(r_v, r_k, u_v, u_k) of the values and keys from their Grams, as a probe
        measures them (theory.attention_stats), for the closed-form walks (the forward's,
        kept for the backward)."""
        if not self.grams_on():
            return None
        memo = self.__dict__.setdefault("_gram_memo", {})
        if ("corr", id(node)) not in memo:
            memo[("corr", id(node))] = self._gram_correlations(node, facts)
        return memo[("corr", id(node))]

    def _gram_correlations(self, node: Node, facts) -> tuple | None:
        k, v = (self.values[i] for i in node.inputs[1:3])
        if facts.keys > tokens.CAP or facts.queries > tokens.CAP:
            return None
        if (facts.causal and facts.queries != facts.keys) or facts.window is not None:
            return None  # the Grams' windows are nested
        # as the probe measures them: over the keys' own windows (its flat p has as
        # many queries as keys)
        counts = attention.key_counts(facts.keys, facts.causal)
        sv, sk = self.attended_grams(node, facts)
        if sv.shape[0] != facts.keys or sk.shape[0] != facts.keys:
            return None
        sums = self._window_diags(node, (sv, sk), counts)
        uv = tokens.prefix_shares(sv, counts, sums[0])
        uk = tokens.prefix_shares(sk, counts, sums[1])
        r_v = tokens.off_diagonal(sv)
        out = (r_v, r_v if sk is sv else tokens.off_diagonal(sk), uv[0], uk[1])
        # far past saturation every query goes to a few keys, and the overlap the
        # output's pairs rest on (e^{r(1-r)s²}) is past what the closed forms hold: the
        # scalar rules there, as theory.attend drops r_g. T5: (1 - r)s² ~ 5 under
        # torch-default (the Gram puts its scheme column's backward median at 0.05,
        # 0.69 without), ~57 under LeCun/Xavier and ~230 under He (0.7-2.1 with the
        # Gram, 0.56-0.89 without)
        q = self.values[node.inputs[0]].signal
        s2 = attend.logit_variance(facts, q, k.signal)
        if (1 - attend.correlation(facts, v.signal, out)) * s2 > tokens.SATURATED:
            return None
        return out

    def _window_diags(self, node: Node, grams: tuple, counts: np.ndarray) -> tuple:
        """tokens.gram_window_diag of the values' and keys' Grams at a call: once for the
        forward's prefix shares and the backward's query factor where both read the
        same arrays."""
        memo = self.__dict__.setdefault("_gram_memo", {})
        held = memo.get(("diags", id(node)))
        if held is None or any(a is not b for a, b in zip(held[0], grams)):
            first = tokens.gram_window_diag(grams[0], counts)  # the values' and keys' often one
            held = memo[("diags", id(node))] = (grams, (first, *(
                first if s is grams[0] else tokens.gram_window_diag(s, counts) for s in grams[1:])))
        return held[1]

    def attended_grams(self, node: Node, facts) -> tuple:
        """The values' and keys' Grams at an attention call; where the walk carries none
        (tokens alike up to there), alike with the walk's own r. Not the r a probe
        measured at the call: that is the actual init's, and a scheme changes it where
        it re-draws what sets the tokens' shared part. An LM head tied to the word
        embedding re-draws the embedding with it: BERT's token-type row, a third of the
        embeddings' sum at init (r 0.29 measured at the first attention), is 5% of it
        under He (r 0.04, which the walk's own r from theory.tokenids gives)."""
        k, v = (self.values[i] for i in node.inputs[1:3])
        return tuple(x.gram if x.gram is not None else
                     tokens.implied(max(x.signal.r, x.signal.mean_share), facts.keys)
                     for x in (v, k))

    def attention_gram(self, node: Node, ins: list[Value], signal, correlations, grams):
        """(signal, Gram, why not): the attention output's E[z²], r and Gram shape from
        the values' Gram (theory.tokens.attend) where ``grams`` (the call's correlations
        from the Grams) were found; else the scalar signal, and where a closed-form walk
        found none because the call has too many positions, what to say."""
        if grams is None:
            size = max(node.attn.keys, node.attn.queries)
            return signal, None, (f"{size} positions at the attention"
                                  if self.grams_on() and size > tokens.CAP else None)
        return (*self._attention_gram(node, ins, signal, correlations), None)

    def _attention_gram(self, node: Node, ins: list[Value], signal, correlations):
        facts = self.facts(node)
        q, k, v = (x.signal for x in ins)
        causal = facts.causal and facts.queries == facts.keys
        counts = attention.key_counts(attend.keys(facts), causal)
        r = attend.correlation(facts, v, correlations)
        s2 = attend.logit_variance(facts, q, k)
        n = self.width(node)
        p2i, _ = attention._moments(s2, r, counts, "gaussian", facts.d_k, n)
        coupling = (1 - r) ** 2 * s2 * (1 - p2i) ** 2 / n if n else None
        keep = 1 / (1 - facts.dropout)
        out = tokens.attend(self.attended_grams(node, facts)[0], 0.0, counts, p2i, s2, r,
                            coupling, keep,
                            self._pair_weights(node, (counts, p2i, s2, r, keep), False))
        if out is None or not out[1] > 0:
            return signal, None
        shape, z2 = out
        m2 = v.m2 * z2
        share = min(1.0, v.m2 * v.mean_share / m2) if m2 > 0 else 0.0
        r_out = tokens.off_diagonal(shape)
        return dataclasses.replace(signal, m2=m2, mean_share=share,
                                   r=min(1.0, max(share, r_out))), shape

    # --- backward --------------------------------------------------------------------
    def gram_gain(self, node: Node, src: Value | None, g) -> float | None:
        """kappa of a LayerNorm or RMSNorm from the forward Gram of its input and the
        gradient's at its output (theory.tokens.norm_backward); None where the walk
        carries no Gram there."""
        if not self.grams_on() or src is None or src.gram is None or src.signal is None:
            return None
        module = self.modules[node.index]
        if not self._feature_norm(module):
            return None
        return self._norm_backward(node, module, src, g)[1]

    def _norm_backward(self, node: Node, module: nn.Module, src: Value, g):
        """tokens.norm_backward at a norm call, once per gradient (gram_gain, then
        call_grad_gram)."""
        memo = self.__dict__.setdefault("_gram_memo", {})
        key = ("norm", id(node))
        if key not in memo or memo[key][0] is not g:
            memo[key] = (g, tokens.norm_backward(src.gram, self._norm_scale(module, src),
                                                 norms.eps_of(module), g.gram))
        return memo[key][1]

    @staticmethod
    def _feature_norm(module: nn.Module) -> bool:
        return norms.is_norm(module) and not isinstance(
            module, (nn.GroupNorm, *norms.BATCH_NORMS)) and "GroupNorm" not in type(
            module).__name__

    @staticmethod
    def _norm_scale(module: nn.Module, src: Value) -> float:
        return src.signal.m2 if norms._is_rms(module) else max(
            src.signal.m2 - src.mu * src.mu, 0.0)

    def call_grad_gram(self, node: Node, src: Value | None, g):
        """The gradient's Gram at a call's input."""
        if not self.grams_on() or g.gram is None and (src is None or src.gram is None):
            return None
        layer, module = self.report.layers[node.index], self.modules[node.index]
        if node.attn is not None:
            return None
        if layer.kind == "weight":
            return None if isinstance(module, nn.Embedding) else g.gram
        if src is None or src.signal is None:
            return None
        if layer.kind == "activation":
            return tokens.activation_backward(module, src.gram, src.signal.m2, g.gram,
                                              self.spent_correlations)
        if isinstance(module, rules.DROPOUTS):
            return tokens.dropout(g.gram, module.p) if module.training else g.gram
        if isinstance(module, rules.IDENTITY_LIKE):
            return g.gram
        if self._feature_norm(module):
            return self._norm_backward(node, module, src, g)[0]
        return None

    def closed_paths(self, node: Node, g, measured, correlations) -> tuple:
        """(correlations, the paths' Grams or None, r_g, the query path's factor) for
        an attention call's backward: from the Grams where a closed-form walk has them,
        else the probe's measurements."""
        grams = self.gram_correlations(node, self.facts(node))
        correlations = grams if grams is not None else correlations
        closed = self.attention_grams(node, g, correlations) if grams is not None else None
        r_g = self.gradient_correlation(node) if closed is None or closed[0] is None \
            else closed[0]
        factor = measured[2] if measured is not None else \
            closed[4] if closed is not None else None
        return correlations, closed, r_g, factor

    def attention_grams(self, node: Node, g, correlations) -> tuple | None:
        """(r_g, the query, key and value paths' gradient Grams) at an attention call,
        from the gradient's Gram at its output, for the closed-form walks."""
        if not self.grams_on():
            return None
        facts = self.facts(node)
        if facts.keys > tokens.CAP or facts.queries > tokens.CAP or facts.window is not None:
            return None
        q, k, v = (self.values[i].signal for i in node.inputs[:3])
        causal = facts.causal and facts.queries == facts.keys
        counts = attention.key_counts(attend.keys(facts), causal)
        h = g.gram
        if h is not None and h.shape[0] != counts.size:
            return None
        r = attend.correlation(facts, v, correlations)
        s2 = attend.logit_variance(facts, q, k)
        p2i, mi = attention._moments(s2, r, counts, "gaussian", facts.d_k, self.width(node))
        square = facts.queries == facts.keys
        r_g = None
        if square:
            u = tokens.gradient_u(h if h is not None else np.eye(counts.size), counts, causal)
            p2, c = gradient_stats.flat_moments(counts)
            r_g = float((u - p2) / (c - p2)) if c > p2 else 0.0
        keep = 1 / (1 - facts.dropout)
        n = self.width(node)
        coherent = (1 - r) * float(attention.mean((1 - p2i) ** 2)) / n if n else 0.0
        sv, sk = self.attended_grams(node, facts)
        factor = tokens.query_factor(sv, 0.0, sk, 0.0, counts, mi, r, keep - r, coherent,
                                     self._window_diags(node, (sv, sk), counts)
                                     ) if square else None
        return (r_g, tokens.query_backward(h, counts, mi), tokens.key_backward(h, counts, mi),
                tokens.value_backward(h, counts, p2i, s2, r, keep, self._pair_weights(
                    node, (counts, p2i, s2, r, keep), True)), factor)

    def _pair_weights(self, node: Node, args: tuple, last: bool) -> tuple:
        """tokens.pair_weights(*args) at an attention call, once for its forward and its
        backward where the two agree on the arguments (the T x T weights kept in between;
        dropped at their ``last`` use)."""
        memo = self.__dict__.setdefault("_gram_memo", {})
        key = ("pairs", id(node))
        held = memo.pop(key, None) if last else memo.get(key)
        if held is not None and all(np.array_equal(x, y) for x, y in zip(held[0], args)):
            return held[1]
        weights = tokens.pair_weights(*args)
        if not last:
            memo[key] = (args, weights)
        return weights
