"""The backward half of the walk: gradient variances over the recorded graph in reverse.

A node's gradient variance is the sum over its consumers (independent contributions):
an add passes the gradient to both branches, a slice its share numel(out)/numel(in), a
concatenation each piece its slice, a pool what theory.pools says, an activation its
E[f'(y)^2] at its own input (a rectifier under a max pool only what the window maxima
pass), a call its rule's backward step. Where a gradient cannot be followed, a probe
carries the measured one (a scheme scales it by its own ratio), a closed-form
prediction stops.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from torch import nn

from varprobe.report import Layer
from varprobe.theory import (
    attend,
    attention_paths,
    chanspread,
    downstream,
    gradsum,
    maxgate,
    mha,
    norms,
    normshape,
    pools,
    positions,
    profile,
    residual,
    rules,
    shared,
    tokens,
)
from varprobe.theory.nodes import Node, is_view
from varprobe.theory.signal import Call, Grad, Signal, Value

_flow, _with, _rest, _keeps_window = (gradsum.flow, gradsum.with_parts, gradsum.rest,
                                      gradsum.keeps_window)


class Backward:
    """Mixed into theory.walk.Walk: reads its forward values, fills ``grads``."""

    # --- backward ------------------------------------------------------------------
    def backward(self) -> None:
        self.grads = [None] * len(self.nodes)
        if self.graph.unseen_function is not None:
            reason = f"custom autograd Function {self.graph.unseen_function}, whose " \
                     "inputs the recording did not see"
            for info in self.calls.values():
                info.backward_break = reason
            return
        self._seed(self.grads)
        self.batch_normed_after, self.masks_after, self.fresh_norms = downstream.facts(
            self.graph, self.modules, self.report.layers, self.host)
        for k in reversed(range(len(self.nodes))):
            g = self.grads[k]
            if g is None:
                continue
            if g.broken is None and self.actual is not None:
                theirs = self.actual.grads[k] if self.actual.grads else None
                g.rel = (g.var / theirs.var if theirs is not None and theirs.broken is None
                         and theirs.var > 0 else None)
            try:
                self._backward(k, self.nodes[k], g, self.grads)
            except Exception as exc:  # noqa: BLE001 -- one rule's failure costs its inputs
                for i in self.nodes[k].inputs:
                    _flow(self.grads, i, Grad(0.0, self.failure(self.nodes[k], exc)))

    def _seed(self, grads: list[Grad | None]) -> None:
        """The gradient at the outputs. A side output that the graph also reads
        (T5's encoder_last_hidden_state, which its decoder attends to) gets the
        cotangent only the first output receives (none): its measured gradient is the
        sum of what flows back into it from inside, which the walk adds up itself."""
        read = {i for node in self.nodes for i in node.inputs}
        for position, k in enumerate(self.graph.outputs):
            if k is None or (position > 0 and k in read):
                continue
            node = self.nodes[k]
            layer = self.report.layers[node.index] if node.op in ("call", "exit") else None
            if layer is not None and layer.backward is not None and layer.backward.var is not None:
                var = layer.backward.var
                _flow(grads, k, _with(Grad(var), shared.seed(var, layer.shape)))
            elif position == 0 and self.graph.cotangent_var is not None:
                var = self.graph.cotangent_var
                _flow(grads, k, _with(Grad(var), shared.seed(var, layer.shape)
                                      if layer is not None else shared.NONE))
            else:
                _flow(grads, k, Grad(0.0, "the gradient at the model's output (not measured)"))

    def _backward(self, k: int, node: Node, g: Grad, grads: list[Grad | None]) -> None:
        if node.op in ("call", "exit"):
            g = self._at_output(node, g)
        if node.op == "call":
            self._call_backward(k, node, g, grads)
        elif node.op == "exit":
            if node.inputs[0] >= 0:
                _flow(grads, node.inputs[0], g)
        elif node.op == "unknown":
            if not node.stops:
                for i in node.inputs:
                    _flow(grads, i, Grad(0.0, g.broken or self._reason(node), rel=g.rel))
        elif node.op == "act":
            self._act_backward(k, node, g, grads)
        elif node.op == "dropout":
            keep = 1 - node.p  # the mask's mean over positions is 1: the shared part stays
            _flow(grads, node.inputs[0], _with(Grad(g.var / keep, g.broken, g.note, g.sparse,
                                                    g.rel, lead=g.lead and g.lead / keep,
                                                    pairs=g.pairs,
                                                    gram=tokens.dropout(g.gram, node.p)),
                                               shared.dropped(g, keep), g.profile))
        elif node.op == "product":
            self._product_backward(node, g, grads)
        elif node.op == "attention":
            self._attention_backward(node, g, grads)
        elif node.op == "pool":
            window = node.pool.window if node.pool.kind == "max" else None
            dx = g.var * pools.backward(node.pool)
            _flow(grads, node.inputs[0], _with(Grad(
                dx, g.broken, g.note, g.sparse, g.rel, window, dx if window else 0.0),
                shared.pooled(g, node.pool)))
        elif node.op == "linear":
            self._linear_backward(node, g, grads, k)

    def _act_backward(self, k: int, node: Node, g: Grad, grads: list[Grad | None]) -> None:
        x = self.values[node.inputs[0]]
        gain = self._gate(k, node.module, x, g, self.backward_gains.get(k))
        if gain is None:
            _flow(grads, node.inputs[0], Grad(0.0, g.broken or
                                              f"F.{type(node.module).__name__}", rel=g.rel))
            return
        dx = residual.rectified(_with(Grad((g.var + g.deferred) * gain, g.broken, g.note,
                                           g.sparse, g.rel),
                                      shared.activation(g, node.module, x), g.profile), x)
        if g.gram is not None or x.gram is not None:
            dx.gram = None if x.signal is None else tokens.activation_backward(
                node.module, x.gram, x.signal.m2, g.gram, self.spent_correlations)
        if g.pairs and g.window is None:
            slope = rules.mean_slope(node.module, _rest(x.signal, g).m2 - x.mu ** 2, x.mu)
            dx.pairs = g.pairs * slope * slope if slope is not None else 0.0
        if g.window is None and g.broken is None:  # each population at its own input
            both = positions.call_backward(node.module, None, x.signal, g,
                                           self._activation_step(node.module, x.mu))
            if both is not None:
                dx.var, dx.lead = both
        _flow(grads, node.inputs[0], dx, fresh=True)

    def _activation_step(self, module: nn.Module, mu: float):
        """grad, signal -> E[f'(y)²] grad at that signal (None: no closed form)."""
        def step(grad: float, s: Signal) -> float | None:
            out = rules.activate(module, s, mu, self.host)
            return None if out is None or out[2] is None else out[2] * grad
        return step

    def _linear_backward(self, node: Node, g: Grad, grads: list[Grad | None],
                         k: int) -> None:
        if valueless := self._no_value(node, backward=True):
            for i in node.inputs:
                _flow(grads, i, Grad(0.0, g.broken or valueless, rel=g.rel))
            return
        scale = 1.0 if node.scale is None else self.constants[node.scale][0]
        mix = self.values[k].mix if self.values[k] is not None else None
        out = self.values[k].signal if self.values[k] is not None else None
        shares = self.cat_shares(k, node)  # the pieces' measured shares (theory.catshare)
        for j, (i, b) in enumerate(zip(node.inputs, shares or node.backward)):
            # a class token's own gradient (theory.positions; none where shares apply)
            own = positions.linear_backward(node, j, self.values[i].signal if i >= 0 and
                                            self.values[i] is not None else None, out, g,
                                            b * scale)
            broken = g.broken or (f"a concatenation{self._place(node.where)} whose "
                                  "gradient reaches only a slice" if node.cat and g.sparse
                                  and (node.lead is None or g.lead is None) else None)
            stream = mix if self.values[i] is not None and self.values[i].pre else None
            window = _keeps_window(node, g)
            dx = _with(Grad(own.var, broken, g.note, g.sparse or node.sparse, g.rel, window,
                            own.var * g.maxed / g.var if window else 0.0,
                            cover=b if node.sparse else g.cover),
                       shared.into_stream(g, stream, b * scale), g.profile)
            dx = residual.deferred(dx, g, self.values[i] if i >= 0 else None, b * scale)
            dx.lead, dx.pairs = own.lead, own.pairs
            dx.gram = g.gram if node.pick is None and node.lead is None else None
            _flow(grads, i, dx, fresh=True)

    def _product_backward(self, node: Node, g: Grad, grads: list[Grad | None]) -> None:
        """d(ab)/da = b: Var[da] = Var[g] E[b²], times the positions a broadcast factor
        collects; a factor broadcast over positions (a gate) also collects what the
        gradient shares across them and its curvature (theory.shared). The other factor
        is the gate's per-channel map: what is shared stays shared."""
        values = [self.values[i] for i in node.inputs]
        positions = node.positions or (False, False)
        for j, (i, spread) in enumerate(zip(node.inputs, node.backward)):
            x, mine = values[1 - j], values[j].signal
            if x.signal is None:
                _flow(grads, i, Grad(0.0, g.broken or "a factor the walk has no value for",
                                     rel=g.rel))
                continue
            var, parts = g.var * x.signal.m2 * spread, shared.NONE
            if positions[j] and mine is not None:
                var += shared.gate_gradient(g, spread, x, mine.m2)
                parts = shared.seed(var, None)  # one value per sample and channel
            elif positions[1 - j]:
                parts = shared.scaled(g, x.signal.m2)
            grad = _with(Grad(var, g.broken, g.note, g.sparse, g.rel), parts,
                         g.profile if spread == 1 else None)
            grad.gram = self._product_gram(node, j, g)
            _flow(grads, i, grad)

    def _attention_backward(self, node: Node, g: Grad, grads: list[Grad | None]) -> None:
        """The query, key and value paths (theory.attention.backward); a self-attention
        whose q, k and v are one tensor gets their sum, as independent paths add."""
        values = [self.values[i].signal for i in node.inputs]
        capped = attend.past_cap(self.facts(node), values[0], values[1])
        if g.broken is not None or any(v is None for v in values) or capped is not None:
            for i in (*node.inputs, *(() if node.attn.bias is None else (node.attn.bias,))):
                _flow(grads, i, Grad(0.0, g.broken or capped or "an attention input the walk "
                                     "has no value for", rel=g.rel))
            return
        measured, correlations = self.measurements(node)
        correlations, closed, r_g, factor = self.closed_paths(node, g, measured, correlations)
        paths = attention_paths.measured_paths(self.facts(node), g.var, *values, correlations,
                                          self.path_factors(node)) \
            or attend.backward(self.facts(node), g.var, *values, correlations,
                               self.width(node), r_g, factor)
        for j, (i, var) in enumerate(zip(node.inputs, paths)):
            _flow(grads, i, Grad(var, None, g.note, g.sparse, g.rel,
                                 gram=closed[1 + j] if closed is not None else None))
        bias = node.attn.bias
        if bias is not None:  # each element of it collects the logits it is added to
            _flow(grads, bias, Grad(paths[3] * node.attn.bias_fold, None, g.note, rel=g.rel))

    def path_factors(self, node: Node) -> list | None:
        """What the probe measured of the attention call's paths in the backward
        (theory.attention_paths), for the actual init's walk over a measured pass: the
        realized p a scheme's weights would change."""
        index = node.attn.paths
        if index is None or not self.measured or self.actual is not None:
            return None
        return self.constants[index:index + attention_paths.PAIRS]

    def _at_output(self, node: Node, g: Grad) -> Grad:
        """Record the call's gradient; where the graph broke, carry the measured one."""
        layer = self.report.layers[node.index]
        info = self.calls.get(node.index) or self.calls.setdefault(node.index, Call())
        if g.broken is None:
            info.grad, info.backward_note = g.var, g.note
            return g
        info.backward_break = g.broken
        measured = layer.backward.var if layer.backward is not None and self.measured else None
        if measured is None or g.rel is None:
            return g
        how = ("carried the measured gradient" if self.actual is None
               else "scaled the measured gradient by the scheme's ratio")
        info.grad, info.backward_note = measured * g.rel, f"{how} at {layer.label}"
        return Grad(measured * g.rel, None, info.backward_note, g.sparse, g.rel)

    def _call_backward(self, k: int, node: Node, g: Grad, grads: list[Grad | None]) -> None:
        i = node.index
        layer, module = self.report.layers[i], self.modules[i]
        info = self.calls[i]
        if not node.inputs:
            return
        s_in = info.input.signal if info.input is not None else None
        mu = info.input.mu if info.input is not None else 0.0
        lead, pairs = None, 0.0
        if g.broken is not None:
            dx = None
        elif node.attn is not None and s_in is not None and len(node.inputs) == 1:
            dx, lead, pairs = self._mha_backward(node, layer, module, s_in, g)
            if lead is not None:  # past self-attention the gradient reaches every position
                g = dataclasses.replace(g, sparse=False)
        elif (both := self._lead_backward(layer, module, s_in, g, mu)) is not None:
            dx, lead = both
        elif k in self.backward_gains:  # an activation, at its own (shifted) input
            gain = self._gate(k, module, info.input, g, self.backward_gains[k])
            dx = None if gain is None else (g.var + g.deferred) * gain
        elif self._pieces_normalized(node, module, g, grads):
            return
        elif (gain := self._channel_gain(node, module, s_in)) is not None:
            dx = g.var * gain
        elif g.sparse and isinstance(module, norms.FEATURE_NORMS):
            dx = None  # each position has its own scale: the average one does not apply
        else:
            dx = rules.backward(layer, module, g.var, s_in, self.weights[i], self.host, mu)
            if dx is not None and g.shared > 0:  # overlapping max-pool windows
                dx += pools.overlap(module, layer.input_shape) * g.shared
            if dx is not None and layer.kind == "weight":
                dx *= self._pairing(k)  # the train-mode BatchNorm it feeds (normshape)
            if dx is not None and (kappa := self.token_gain(node, s_in, mu)) is not None:
                dx *= kappa  # the tokens' own scales against their gradients
            elif dx is not None and (kappa := self.gram_gain(node, info.input, g)) is not None:
                dx *= kappa  # the same from the tokens' Grams (theory.tokens)
        corr, shape = profile.before_call(module, layer, g.profile) if dx is not None \
            else (1.0, None)
        # every token's projection, with the tokens' own variance measured (tokennorm)
        keep = norms.centring(module) if k in self.fresh_norms and self.measured and \
            self.actual is None else 1.0
        if dx is not None:  # what a norm's centring removes of a shared gradient
            corr *= (1.0 - shared.norm_loss(module, g, layer.shape)) * keep
            corr *= shared.batch_centring(module, layer.shape, self._behind(k))
        grad = self._input_grad(layer, info, g, None if dx is None else dx * corr, s_in)
        if dx is not None and g.var > 0:
            grad = _with(grad, self._shared_call(k, layer, module, info, g, dx / g.var), shape)
            if k in self.backward_gains:
                grad = residual.rectified(grad, info.input)
            elif (out := self.values[k]) is not None and out.mix is not None:
                grad = residual.deferred(grad, g, info.input, grad.var / g.var)  # normalized
        grad.lead = lead if lead is None else lead * keep
        if dx is not None:
            grad.gram = self.call_grad_gram(node, info.input, g)
        grad.pairs = pairs if node.attn is not None or grad.broken else \
            g.pairs * self._pairs_gain(layer, module, s_in, g, mu)
        _flow(grads, node.inputs[0], grad, fresh=True)
        for k2 in node.inputs[1:]:
            _flow(grads, k2, Grad(0.0, f"the gradient into another input of {layer.label} "
                                  "(not measured)"))

    def _behind(self, k: int) -> float | None:
        """shared.behind_loss at the BatchNorm call ``k`` where another is after it."""
        act, x, per_channel = self.masks_after.get(k, (None, None, False))
        return None if k not in self.batch_normed_after else shared.behind_loss(
            act, None if x is None else self.values[x], per_channel)

    def _pairing(self, k: int) -> float:
        """theory.normshape's F where the call at ``k`` feeds one measured train-mode
        BatchNorm alone (actual walk); 1 elsewhere."""
        if not self.is_actual():
            return 1.0
        readers = self.__dict__.get("_readers")
        if readers is None:
            readers = self._readers = {}
            for j, other in enumerate(self.nodes):
                for i in set(other.inputs):
                    readers.setdefault(i, []).append(j)
        mine = readers.get(k, [])
        if len(mine) != 1 or self.nodes[mine[0]].op != "call":
            return 1.0
        reader = self.nodes[mine[0]]
        module = self.modules[reader.index]
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or \
                norms.uses_running_stats(module):
            return 1.0
        return normshape.pairing(self.norm_shape(reader)) or 1.0

    def _channel_gain(self, node: Node, module: nn.Module,
                      s_in: Signal | None) -> float | None:
        """A train-mode BatchNorm's gain from its channels: in closed form for a
        scheme's and predict's walk (theory.chanspread), measured for the actual
        init's (theory.normshape)."""
        gain = chanspread.walk_gain(self, node, module, s_in)
        if gain is None and s_in is not None and (shape := self.norm_shape(node)) is not None:
            gain = normshape.backward_gain(module, shape, s_in)
        return gain

    def _shared_call(self, k: int, layer: Layer, module: nn.Module, info: Call, g: Grad,
                     gain: float) -> shared.Parts:
        """What the gradient shares across positions past a call (theory.shared)."""
        if k in self.backward_gains:
            return shared.activation(g, module, info.input)
        pool = pools.of_module(module, layer.input_shape, layer.shape)
        if pool is not None:
            return shared.pooled(g, pool)
        if layer.kind == "weight":
            return shared.scaled(g, gain * shared.stride_share(layer), mixes=True)
        if (parts := shared.normed(module, g, gain, layer.shape)) is not None:
            return parts
        if isinstance(module, (*norms.BATCH_NORMS, *rules.IDENTITY_LIKE)):
            return shared.scaled(g, gain)
        if isinstance(module, rules.DROPOUTS) and gain > 0:  # gain: 1/keep, 1 in eval
            return shared.dropped(g, 1 / gain, not isinstance(layer.shape, list)
                                  or shared.positions_of(layer.shape))
        return shared.NONE

    def _lead_backward(self, layer: Layer, module: nn.Module, s_in: Signal | None,
                       g: Grad, mu: float) -> tuple[float, float] | None:
        """(mean, lead) of the input gradient where the gradient and the input have a
        lead position (theory.positions): a call acting position by position steps
        each population at its own forward value."""
        if g.lead is None or s_in is None or s_in.lead is None or g.window is not None:
            return None
        return positions.call_backward(module, layer, s_in, g, lambda grad, s: rules.backward(
            layer, module, grad, s, self.weights[layer.index], self.host, mu))

    def _mha_backward(self, node: Node, layer: Layer, module: nn.Module, s: Signal,
                      g: Grad) -> tuple[float, float | None, float]:
        """nn.MultiheadAttention (theory.mha): the input gradient's mean, its value at a
        lead position (the query path stays at the lead query, the value and key paths
        reach every key alike) and the part the keys share (the value path's; every key
        seen: the other positions' shared part enters as r_g). The shared part is a
        closed form of the walks without measured token shapes (closed_tokens)."""
        facts, w = node.attn, self.mha_weights(node, layer, module)
        tokens = facts.queries if self.closed_tokens and not facts.causal and \
            facts.queries == facts.keys else 0
        r_g, pairs = positions.attention_shared(g.var, g.pairs, tokens)
        total, query = mha.paths(module, facts, s, g.var, w, r_g)
        e = module.embed_dim  # pairs: per unit of g; through W_o, then W_v (H d_k = E)
        lead = positions.attention_backward(total, query, g, s) if g.window is None else None
        return total, lead, e * w[3] * e * w[2] * pairs

    def _pairs_gain(self, layer: Layer, module: nn.Module, s: Signal | None, g: Grad,
                    mu: float) -> float:
        """What a call acting position by position keeps of the gradient the tokens
        share in pairs: its step at their forward value (linear in the gradient), an
        activation's E[f']² (E[f'(y_i) f'(y_j)] for weakly correlated y_i, y_j)."""
        if not g.pairs or s is None or not positions.per_position(module, layer, s.lead):
            return 0.0
        rest = _rest(s, g)
        if layer.kind == "activation":
            slope = rules.mean_slope(module, rest.m2 - mu * mu, mu)
            return 0.0 if slope is None else slope * slope
        gain = rules.backward(layer, module, 1.0, rest, self.weights[layer.index], self.host,
                              mu)
        return gain or 0.0

    def _product_gram(self, node: Node, j: int, g: Grad):
        """d(ab)/da = b: the gradient's Gram times the other factor's (a rotary table's
        at its own scale, theory.tokens)."""
        other = self.values[node.inputs[1 - j]]
        if other is None or (g.gram is None and other.gram is None):
            return None
        if self.nodes[node.inputs[1 - j]].op == "table":
            if other.gram is None:
                return None
            h = g.gram if g.gram is not None else np.eye(other.gram.shape[0])
            return h * other.gram if h.shape == other.gram.shape else None
        r = other.signal.r if other.signal is not None else 0.0
        return tokens.product(g.gram, 0.0, other.gram, r)

    def _gate(self, k: int, module: nn.Module, x: Value | None, g: Grad,
              gain: float | None) -> float | None:
        """E[f'(y)^2] where (a share of) the gradient reaches only each max-pool window's
        largest element, which a rectifier passes unless all are negative (maxgate)."""
        if g.window is None or x is None or x.signal is None:
            return gain
        gate = maxgate.gate(module, x.signal, x.mu, g.window, self._geometry(k, g.pool))
        share = min(g.maxed / g.var, 1.0) if g.var > 0 else 1.0
        if gate is None or (share < 1 and gain is None):
            return gain
        return gate if share >= 1 else share * gate + (1 - share) * gain

    def _geometry(self, k: int, pool: tuple | None) -> maxgate.Geometry | None:
        """The conv whose output node k rectifies, and the pool (module, input shape)."""
        i = self.nodes[k].inputs[0] if pool is not None and k >= 0 else -1
        j = self.nodes[i].index if i >= 0 and self.nodes[i].op == "call" else None
        shape = self.report.layers[j].input_shape if j is not None else None
        return None if not shape or self.weights[j] is None else maxgate.Geometry(
            self.modules[j], tuple(shape[2:]), *pool, self.weights[j].b2)

    def _input_grad(self, layer: Layer, info: Call, g: Grad, dx: float | None,
                    s_in: Signal | None) -> Grad:
        if dx is not None:
            info.grad_input = dx
            pool = pools.of_module(self.modules[layer.index], layer.input_shape, layer.shape)
            window = pool.window if pool is not None and pool.kind == "max" else None
            return Grad(dx, None, g.note, g.sparse, g.rel, window, dx if window else 0.0,
                        pool=(self.modules[layer.index], tuple(layer.input_shape[2:]))
                        if window else None)
        measured = (layer.backward_input.var if self.measured and layer.backward_input
                    is not None else None)
        at_out = layer.backward.var if self.measured and layer.backward is not None else None
        if measured is not None and g.broken is None:
            sparse = g.sparse and layer.kind != "weight"
            if self.actual is None:
                return Grad(measured, None, f"carried the measured input gradient of "
                            f"{layer.type} at {layer.label}", sparse)
            if at_out:
                return Grad(g.var * measured / at_out, None, "scaled by the measured ratio "
                            f"across {layer.type} at {layer.label}", sparse, g.rel)
        why = "its input is unknown" if s_in is None else "no closed form"
        return Grad(0.0, g.broken or f"the backward of {layer.type} at {layer.label} "
                    f"({why}, nothing measured)", rel=g.rel)

    def _pieces_normalized(self, node: Node, module: nn.Module, g: Grad,
                           grads: list[Grad | None]) -> bool:
        """BatchNorm (train) of a concatenation: each channel's gradient is scaled by
        gamma^2 over its own variance, so each piece gets mean(gamma^2)/(Var_j + eps)
        of the output gradient rather than one factor for the whole (DenseNet)."""
        source = self.nodes[node.inputs[0]]
        while source.op == "linear" and not source.cat and is_view(source):
            source = self.nodes[source.inputs[0]]
        if (source.op != "linear" or not source.cat or len(node.inputs) > 1
                or not isinstance(module, norms.BATCH_NORMS)
                or norms.uses_running_stats(module)
                or any(self.values[piece].signal is None for piece in source.inputs)):
            return False  # a piece the walk has no value for: the whole-tensor rule
        gamma, _ = norms.affine(module, self.host)
        g2 = sum(c * c for c in gamma) / len(gamma)
        eps = norms.eps_of(module)
        total = 0.0
        for piece, fraction in zip(source.inputs, source.forward):
            s = self.values[piece].signal
            dx = g.var * g2 / (s.m2 * (1 - s.mean_share) + eps)
            total += fraction * dx
            _flow(grads, piece, Grad(dx, None, g.note, rel=g.rel))
        self.calls[node.index].grad_input = total
        return True
