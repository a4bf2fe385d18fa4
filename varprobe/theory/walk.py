"""The walk: predicted second moments over the recorded dataflow, forward then backward.

Forward, in execution order, the predicted second moment of every node: the network
input as measured; a module call by its rule (theory.rules); a sum of independent
zero-mean branches Var[x + a F] = Var[x] + a^2 Var[F], plus the cross term of their
common means; a constant added like a bias, + mean(c^2); a concatenation the
size-weighted average; a multiplication by c, mean(c^2) times; views and slices
unchanged. Backward over the same nodes in reverse: a node's gradient variance is the
sum over its consumers (independent contributions); an add passes the gradient to both
branches, a slice its share numel(out)/numel(in), a concatenation each piece its slice,
a call its rule's backward step.

One walk serves three uses, told apart by ``mode``:

- ``measured`` (the probe's actual init): where the graph cannot be followed (an
  unknown op, a call with no closed form) the *measured* value is carried past it and
  the prediction's note names the place.
- ``closed`` (``varprobe predict``): nothing is measured, so the walk stops there and
  what depends on it gets no value, with the reason.
- a counterfactual scheme over a measured pass (``actual`` given: the measured walk
  of the same graph): where the actual walk carries a measured value, this one carries
  the measured value times its own ratio to the actual walk just before the place
  (exact for positively homogeneous ops such as pooling; the note says so), since the
  model's absolute scale there says nothing about another init's.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cached_property
from typing import Any

from torch import nn

from varprobe.report import Layer, Report
from varprobe.theory import (
    attend,
    attention,
    gradient_stats,
    mha,
    norms,
    normshape,
    pools,
    positions,
    profile,
    residual,
    rules,
    tokenids,
    tokens,
    widths,
)
from varprobe.theory.backflow import Backward
from varprobe.theory.gains import Values
from varprobe.theory.nodes import CUSTOM, Attention, Node
from varprobe.theory.signal import (
    Call,
    Grad,
    Signal,
    Value,
    measured_m2,
    measured_share,
    start_signal,
)
from varprobe.theory.tokenshape import TokenGrams, TokenShapes
from varprobe.theory.weights import Weights


class Walk(Backward, TokenShapes, TokenGrams):
    """``graph``: a theory.recording.Recording, or the chain standing in for one;
    ``weights``: per layer (theory.weights); ``values``: the parameters' host copies."""

    # set by the walk's modes, which do not change: read once (it is asked at every node)
    closed_tokens = cached_property(TokenShapes.closed_tokens.fget)
    gram_sources = cached_property(TokenGrams.gram_sources.fget)

    def __init__(self, report: Report, modules: list[nn.Module], graph: Any,
                 weights: list[Weights | None], measured: bool = True,
                 actual: Walk | None = None, values: Values | None = None):
        self.report, self.modules, self.graph = report, modules, graph
        self.weights, self.measured, self.actual, self.host = weights, measured, actual, values
        self.nodes: list[Node] = graph.nodes
        self.constants = values.constants_of(graph) if isinstance(values, norms.Memo) \
            else graph.constants()
        self.values: list[Value] = []
        self.grads: list[Grad | None] = []
        self.calls: dict[int, Call] = {}
        self.backward_gains: dict[int, float | None] = {}  # node -> E[f'(y)^2]
        self.attention: list[dict] = []  # per attention call: s², r, Σp², saturation

    def run(self) -> Walk:
        self.forward()
        self.backward()
        return self

    # --- forward -------------------------------------------------------------------
    def forward(self) -> None:
        for k, node in enumerate(self.nodes):
            try:
                value = self._forward(node)
            except Exception as exc:  # noqa: BLE001 -- one rule's failure costs its node
                value = Value(None, f"{self.failure(node, exc)}{self._place(node.where)}")
            if value.note is not None and value.at < 0:
                value.at = k
            if value.signal is not None:
                value.rel = self._rel(k, value.signal)
            self.token_gram(k, node, value)
            self.values.append(value)

    def failure(self, node: Node, exc: Exception) -> str:
        """What a rule that raised is called in the report: the op, and the error."""
        what = node.reason or (self.report.layers[node.index].type
                               if node.index is not None and node.op in ("call", "exit")
                               else node.op)
        return f"the rule for {what} (it raised {type(exc).__name__}: {exc})"

    def _rel(self, k: int, mine: Signal) -> float | None:
        """This walk's value over the actual walk's at node ``k`` (1 for the actual)."""
        if self.actual is None:
            return 1.0
        theirs = self.actual.values[k].signal
        return mine.m2 / theirs.m2 if theirs is not None and theirs.m2 > 0 else None

    def _forward(self, node: Node) -> Value:
        ins = [self.values[i] if i >= 0 else Value(None, "an output made outside the "
                                                      "recorded operations")
               for i in node.inputs]
        if node.op == "call":
            return self._call(node, ins)
        if node.op == "input":
            return self._input(node)
        if node.op == "table":  # cos or sin of rotary embeddings: half of cos² + sin²
            return Value(Signal(0.5, 0.0, 1.0))
        if node.op == "lookup":  # F.embedding on a table: its rows' mean(w²)
            valueless = self._no_value(node)
            return Value(None, valueless) if valueless else \
                Value(Signal(self.constants[node.scale][0]))
        if node.op == "exit":
            return self._exit(node, ins)
        # what the ops below carry on from their inputs (not needed above)
        broken = next((v.broken for v in ins if v.broken), None)
        rel = next((v.rel for v in ins if v.rel is not None), None)
        latest = max(ins, key=lambda v: v.at if v.note else -2, default=None)
        note, at = (latest.note, latest.at) if latest is not None else (None, -1)
        if node.op == "unknown":  # a custom Function names itself, not its inner ops
            own = self._reason(node)
            return Value(None, own if node.reason.startswith(CUSTOM) else broken or own,
                         rel=rel)
        if broken:
            return Value(None, broken, rel=rel)
        if node.op == "linear" and (valueless := self._no_value(node)):
            return Value(None, valueless)
        s, mu = ins[0].signal, ins[0].mu
        if node.op == "act":
            out = self._activate(node.module, ins[0])
            if out is None:
                return Value(None, f"F.{type(node.module).__name__} at q={s.m2:.3g}")
            self.backward_gains[len(self.values)] = out[2]
            own = positions.through_call(node.module, None, s, out[0], lambda x: (
                rules.activate(node.module, x, mu, self.host) or (None,))[0])
            return Value(widths.keep(own, s), None, note, at, out[1], profile=ins[0].profile,
                         pre=residual.pre(node.module, mu, s, ins[0].mix))
        if node.op == "pool":
            return self._pool(node, ins[0], note, at)
        if node.op == "attention":
            return self._attention(node, ins, note, at)
        if node.op == "product":
            a, b = ins[0].signal, ins[1].signal
            return Value(Signal(a.m2 * b.m2, a.mean_share * b.mean_share, a.r * b.r), None,
                         note, at, ins[0].mu * ins[1].mu, profile=profile.blend(
                             [(v.profile, 1.0) for v in ins if v.profile is not None]))
        if node.op == "dropout":
            if node.p >= 1:
                return Value(None, "dropout with p = 1")
            signal = Signal(s.m2 / (1 - node.p), s.mean_share * (1 - node.p),
                            s.r * (1 - node.p), positions.scaled(s.lead, 1 / (1 - node.p)),
                            s.width)
            return Value(signal, None, note, at, mu, profile=ins[0].profile)
        signal, mu = self._linear(node, ins)
        signal = self.token_shapes(node, ins, signal)
        mix = None if node.cat or node.const or node.scale is not None else residual.mix(
            [(f, m, v.pre, v.signal, v.mu, v.mix)
             for f, m, v in zip(node.forward, node.means, ins)])
        return Value(signal, None, note, at, mu, mix=mix, profile=profile.blend(
            [(v.profile, f * v.signal.m2) for f, v in zip(node.forward, ins)]),
            pre=residual.joined(node.forward, [v.pre for v in ins]) if node.cat else None)

    def _activate(self, module: nn.Module, v: Value) -> tuple | None:
        """An activation's moments; of a residual sum with a rectified stream, the
        mixture's (theory.residual), else at a Gaussian input (theory.rules)."""
        out = residual.activate(module, v.mix) if v.mix is not None else None
        return out if out is not None else rules.activate(module, v.signal, v.mu, self.host)

    def _linear(self, node: Node, ins: list[Value]) -> tuple[Signal, float]:
        """sum_i f_i E[x_i^2] + constants, and for an add (several inputs summed, not
        pieces side by side) the cross terms 2 m_i m_j mu_i mu_j of the means the
        inputs share: two branches that both end in a ReLU are not zero-mean."""
        m2_scale, mean_scale = (1.0, 1.0) if node.scale is None else self.constants[node.scale]
        fixed = sum(f * self.constants[c][0] for f, c, _ in node.const)
        own = self._own(node)
        mu = sum(m * self.constants[c][1] for _, c, m in node.const)
        spread = shared = cross = tokens = 0.0
        terms = [m * v.mu for m, v in zip(node.means, ins)]
        terms += [m * self.constants[c][1] for _, c, m in node.const]
        if not node.cat:
            total = sum(terms)
            cross = total * total - sum(t * t for t in terms)
        for f, m, v in zip(node.forward, node.means, ins):
            spread += f * v.signal.m2
            shared += f * v.signal.m2 * v.signal.mean_share
            tokens += f * v.signal.m2 * v.signal.r
            mu += m * v.mu
        spread += cross
        shared += max(cross, 0.0)
        tokens += max(cross, 0.0)
        total = spread + fixed
        share = (shared + fixed - own) / total if total > 0 else 0.0
        r = (tokens + fixed - own) / total if total > 0 else 0.0
        return Signal(m2_scale * total, min(1.0, share), min(1.0, r)), mean_scale * mu

    def _pool(self, node: Node, v: Value, note: str | None, at: int) -> Value:
        """Exact for zero padding and nearest upsampling; otherwise a probe carries the
        measured value past the op, and a closed-form prediction takes the positions
        as independent (theory.pools)."""
        out = pools.exact(node.pool, v.signal, v.mu)
        if out is not None:
            return Value(out[0], None, note, at, out[1])
        if self.measured:
            return Value(None, f"{self._reason(node)}, whose output depends on how "
                         "positions correlate", rel=v.rel)
        signal, mu = pools.approximate(node.pool, v.signal, v.mu, v.pre)
        return Value(signal, None, _join(note, f"{self._reason(node)} taken over "
                                         "independent positions"), len(self.values), mu)

    def _attention(self, node: Node, ins: list[Value], note: str | None, at: int) -> Value:
        measured, correlations = self.measurements(node)
        q, k, v = (x.signal for x in ins)
        grams = self.gram_correlations(node, self.facts(node))
        correlations = grams if grams is not None else correlations
        signal, facts = attend.forward(self.facts(node), q, k, v, measured, correlations,
                                       self.width(node))
        signal, gram, uncapped = self.attention_gram(node, ins, signal, correlations, grams)
        if uncapped:
            note, at = _join(note, f"{uncapped}{self._place(node.where)}: past {tokens.CAP} "
                             "the tokens taken alike (no Gram)"), len(self.values)
        signal = widths.keep(signal, v)
        where = self._place(node.where).strip(" ()")
        self.attention.append({"where": where, "layer": self.producer(node.inputs[0]),
                               "key_layer": self.producer(node.inputs[1]), **facts})
        if (capped := attend.past_cap(self.facts(node), q, k)) is not None and measured is None:
            return Value(None, f"{capped}{self._place(node.where)}")
        return Value(signal, None, note, at, ins[2].mu, gram=gram)

    def facts(self, node: Node) -> Attention:
        """The mask as the probe measured it (causal, a sliding window, or none at all)
        over what the recording took it to be: an eager attention's mask, or an SDPA
        call's attn_mask (T5's decoder's causal one carries its position bias)."""
        facts = node.attn
        if facts.measured is None or not self.measured:
            return facts
        causal, full, window = self.constants[facts.measured + 2]
        if 0.5 < window < facts.keys and causal < 0.5:  # a sliding window
            return replace(facts, causal=False, masked=True, window=round(window))
        return replace(facts, causal=causal > 0.5 and full < 0.5,
                       masked=facts.masked and full < 0.5)

    def producer(self, k: int) -> str | None:
        """The label of the weight layer that made node ``k``, through views, slices and
        constant factors (RoPE's cos and sin); None where that is not one layer."""
        k = self._made_by(k)
        layer = self.report.layers[self.nodes[k].index] if k is not None else None
        return layer.label if layer is not None and layer.kind == "weight" else None

    def _made_by(self, k: int) -> int | None:
        while k >= 0 and self.nodes[k].op == "linear" and self.nodes[k].inputs:
            k = self.nodes[k].inputs[0]
        return k if k >= 0 and self.nodes[k].op in ("call", "exit") else None

    def _mha(self, node: Node, layer: Layer, module: nn.Module, x: Signal) -> Signal:
        """Self-attention by nn.MultiheadAttention (theory.mha)."""
        weights = self.mha_weights(node, layer, module)
        out, facts = mha.forward(module, node.attn, x, weights)
        self.attention.append({"where": layer.label, "layer": layer.label,
                               "key_layer": layer.label, **facts})
        return out

    def mha_weights(self, node: Node, layer: Layer, module: nn.Module) -> tuple[float, ...]:
        """Measured in the pass, else its init's (theory.mha.weights). Schemes re-draw
        Linear and Conv layers only: the in-projection is the actual one in every
        walk, the out-projection (a Linear) the scheme's (theory.weights)."""
        w = mha.weights(module, self.constants, node.attn, layer.weight_second_moment)
        drawn = self.weights[layer.index].out if self.weights[layer.index] else None
        return w if drawn is None else (*w[:3], drawn.w2, *w[4:7], drawn.b2)

    def measurements(self, node: Node) -> tuple[tuple | None, tuple | None]:
        """The probe's (Σp², mean logit², query path's factor or None) at an attention
        call, for the actual init only (they depend on the logit variance a scheme
        changes), and the (r_v, r_k, u_v, u_k) it measured, for every walk over a
        measured pass (a scheme's own far past saturation: own_correlations)."""
        index = node.attn.measured
        if index is None or not self.measured:
            return None, None
        factor, filled = self.constants[index + 4]
        return ((*self.constants[index], factor if filled > 0.5 else None)
                if self.actual is None else None, self.own_correlations(
                    node, (*self.constants[index + 1], *self.constants[index + 3])))

    def gradient_correlation(self, node: Node) -> float | None:
        """r_g, the gradient's token correlation at an attention call's output as the
        value path sees it, as the probe measured it in the backward (gradient_stats),
        for every walk over a measured pass; None where there is none (predict)."""
        index, facts = node.attn.gradient, self.facts(node)
        square = facts.queries == facts.keys  # the flat p the probe summed with
        if index is None or not self.measured or (facts.causal and not square):
            return None
        # a cross-attention takes the plain r_g over its queries, which its value path's
        # pair term weighs (T5's encoder: the sum over the decoder's queries)
        counts = attention.key_counts(attend.keys(facts), facts.causal)
        trailing = facts.causal or facts.window is not None  # a window up to each query
        return gradient_stats.effective(
            self.constants[index:index + 2], trailing,
            (facts.masked and facts.window is None) or not square, counts, facts.window)

    def norm_shape(self, node: Node) -> list[tuple[float, float]] | None:
        """What the probe measured of a BatchNorm call's channels (theory.normshape),
        for every walk over a measured pass; None on meta or where nothing was. Once
        per node where ``host`` is a norms.Memo: the same in every walk of a graph."""
        index = getattr(self.graph, "norm_shapes", {}).get(node.index)
        if index is None or not self.measured:
            return None
        memo = self.host.shapes if isinstance(self.host, norms.Memo) else {}
        if id(node) not in memo:
            shape = None if self._per_channel_producer(node) and not self.is_actual() \
                else self.constants[index:index + normshape.PAIRS]
            memo[id(node)] = None if shape is None or None in shape else shape
        return memo[id(node)]

    def is_actual(self) -> bool:  # the actual init's walk over a measured pass
        return self.measured and self.actual is None

    def _per_channel_producer(self, node: Node) -> bool:
        """The norm reads a depthwise conv, whose filter c makes channel c's variance and
        takes its gradient back: the actual walk pairs them (theory.normshape's F); a
        scheme's keeps the per-tensor rule, whose errors cancel one step back."""
        source = self.nodes[node.inputs[0]] if node.inputs else None
        producer = self.modules[source.index] if source is not None and \
            source.op == "call" and source.index is not None else None
        return isinstance(producer, nn.modules.conv._ConvNd) and \
            producer.in_channels == producer.groups > 1

    def _input(self, node: Node) -> Value:
        if node.index != 0:
            return Value(None, "a network input after the first, which is not measured")
        start, note = start_signal(self.report)
        if start is None:
            return Value(None, "the network input is not a float tensor")
        return Value(start, None, note, -1, self.report.input.mean or 0.0)

    def _call(self, node: Node, ins: list[Value]) -> Value:
        k, i = len(self.values), node.index
        layer, module = self.report.layers[i], self.modules[i]
        info = self.calls.get(i) or self.calls.setdefault(i, Call())
        src = ins[0] if ins else None
        note = src.note if src else None
        if src is not None and src.broken:
            if (reset := self._reset(layer, module, info, src)) is not None:
                return reset
            src = self._carry_input(layer, info, src)
            note = src.note
        info.input, pre = src, None
        s_in = src.signal if src is not None else None
        mu = src.mu if src is not None else 0.0
        if node.attn is not None and s_in is not None and len(node.inputs) == 1:
            out, mu = positions.alike(self._mha(node, layer, module, s_in), s_in), 0.0
        elif layer.kind == "activation" and s_in is not None:
            act = self._activate(module, src)
            self.backward_gains[k] = act[2] if act is not None else None
            pre = residual.pre(module, mu, s_in, src.mix)
            out = positions.through_call(module, layer, s_in, act and act[0], lambda x: (
                rules.activate(module, x, src.mu, self.host) or (None,))[0])
            mu = act[1] if act is not None else 0.0
        elif (shape := self.norm_shape(node)) is not None and s_in is not None \
                and norms.uses_running_stats(module):
            out = normshape.running_forward(module, shape, s_in, self.actual is not None)
            mu = rules.mean_after(module, mu, self.host, None)
        else:
            w = self.weights[i]
            out = (rules.forward(layer, module, s_in, w, self.host, mu)
                   if s_in is not None or isinstance(module, nn.Embedding) else None)
            out = tokenids.correlate(out, module, self.constants, self.graph, i)
            out = positions.through_call(module, layer, s_in, out, lambda x: rules.forward(
                layer, module, x, w, self.host, src.mu))
            mu = rules.mean_after(module, mu, self.host, w)
        if out is None and not self.measured and s_in is not None:
            out, mu, note = self._approximate(layer, module, src, note, node.inputs[0])
        if self.closed_tokens:
            out = widths.after_call(module, layer.kind, s_in, out)
        if out is not None:
            w = self.weights[i]
            out, shape, centred = profile.after_call(module, layer, src, out, w)
            info.forward = out.m2
            info.forward_note = _join(note, w.note if w else None)
            return Value(out, None, note, src.at if src is not None else -1, mu, pre=pre,
                         profile=shape, mix=residual.normalized(module, src, self.host),
                         centred=centred)
        return self._carry_output(layer, info, "no closed form" if s_in is not None
                                  else "its input is unknown", info.forward_break, src)

    def _reset(self, layer: Layer, module: nn.Module, info: Call, src: Value) -> Value | None:
        """A norm whose input the walk lost, with nothing measured: it sets the scale
        whatever its input was."""
        if self.measured and measured_m2(layer.input) is not None:
            return None
        reset = norms.reset(module, self.host)
        if reset is None:
            return None
        info.input, info.forward = Value(None, src.broken), reset.m2
        info.forward_note = (f"{layer.type} at {layer.label} resets an unknown input "
                             f"({src.broken}), its E[x²] taken to be ≫ eps")
        return Value(reset, None, info.forward_note, len(self.values),
                     rules.mean_after(module, 0.0, self.host))

    def _approximate(self, layer: Layer, module: nn.Module, src: Value, note: str | None,
                     k: int) -> tuple[Signal | None, float, str | None]:
        """A pooling module (input: node k) where nothing is measured (theory.pools)."""
        pool = pools.of_module(module, layer.input_shape, layer.shape)
        if pool is None:
            return None, 0.0, note
        at = self._geometry(k, (module, tuple(layer.input_shape[2:]))) if src.pre else None
        out, mu = pools.approximate(pool, src.signal, src.mu, src.pre, at)
        return out, mu, _join(note, f"{layer.type} at {layer.label} taken over independent "
                              "positions")

    def _carry_input(self, layer: Layer, info: Call, src: Value) -> Value:
        """A call whose input the walk lost: the measured input is carried (times the
        scheme's ratio), or, with nothing measured, the call's input stays broken."""
        m_in = measured_m2(layer.input) if self.measured else None
        info.forward_break = src.broken
        if m_in is None or src.rel is None:
            return Value(None, src.broken)
        what = ("carried the measured input" if self.actual is None
                else "scaled the measured input by the scheme's ratio before it")
        share = measured_share(layer.input)
        return Value(Signal(m_in * src.rel, share, share), None,
                     f"{what} of {layer.label}, past {src.broken}", -1,
                     (layer.input.mean if layer.input else None) or 0.0)

    def _exit(self, node: Node, ins: list[Value]) -> Value:
        layer = self.report.layers[node.index]
        info = self.calls.setdefault(node.index, Call())
        info.input = ins[1] if len(ins) > 1 else None
        inner = ins[0]
        if inner.broken:
            info.forward_break = inner.broken
            return self._carry_output(layer, info, None, None, inner)
        info.forward = inner.signal.m2
        info.forward_note = inner.note
        return inner

    def _carry_output(self, layer: Layer, info: Call, why: str | None,
                      root: str | None, src: Value | None) -> Value:
        """Continue from the measured output of a call the walk cannot step through; a
        scheme applies the call's measured ratio out/in to its own input instead. With
        nothing measured, the value stays broken by ``root`` (what broke its input) or
        by this call."""
        m_out = measured_m2(layer.forward) if self.measured else None
        m_in = measured_m2(layer.input) if self.measured else None
        what = f"{layer.type} at {layer.label}"
        if self.actual is None:
            out, how = m_out, "carried the measured output of"
        elif src is not None and src.signal is not None and m_out is not None and m_in:
            out, how = src.signal.m2 * m_out / m_in, "scaled by the measured ratio across"
        else:
            rel = src.rel if src is not None else None
            out = m_out * rel if m_out is not None and rel is not None else None
            how = "scaled the measured output by the scheme's ratio before"
        if out is None:
            return Value(None, root or f"{what} ({why or 'not followed'}; nothing measured)")
        info.forward_note = f"{why} for {what}" if why else None
        share = measured_share(layer.forward)
        return Value(Signal(out, share, share), None, f"{how} {what}", -1,
                     layer.forward.mean or 0.0)

    # --- messages ------------------------------------------------------------------
    def _no_value(self, node: Node, backward: bool = False) -> str | None:
        """Why a linear node's factor (or, forward, added constant) is unknown: meta."""
        used = [node.scale] if backward else [node.scale, *(c for _, c, _ in node.const)]
        if all(c is None or self.constants[c] is not None for c in used):
            return None
        return ("a parameter or buffer with no values on the meta device (its init is not "
                f"known){self._place(node.where)}")

    def _reason(self, node: Node) -> str:
        return f"{node.reason}{self._place(node.where)}"

    def _place(self, where: tuple[str, int] | None) -> str:
        if where is None:
            return " (at the start of the forward)"
        kind, i = where
        return f" ({kind} {self.report.layers[i].label})"


def _join(*parts: str | None) -> str | None:
    return "; ".join([p for p in parts if p]) or None
