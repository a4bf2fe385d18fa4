"""The report's predictions, all from one walk over the recorded dataflow.

Per weight layer: its effective fans and multipliers, the ``local`` one-step check from
its own measured input and output gradient, the actual init's end-to-end prediction
(basis "graph": theory.walk, measured values carried only where the graph cannot be
followed), and the counterfactual schemes' asked for (the same walk over the same
graph with the scheme's weights; ``Counterfactuals`` walks each when first asked).
Without a usable recording the calls in execution order stand in for the graph
(theory.nodes.chain). Closed-form ``predict`` runs the same walk with
nothing measured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from torch import nn

from varprobe.report import Layer, Prediction, Report
from varprobe.theory import norms, threads
from varprobe.theory.gains import (
    Values,
    backward_gain,
    forward_gain,
    gain_unavailable_reason,
    live_at_zero,
)
from varprobe.theory.layer_fans import SCHEMES, effective_fans, is_linear_map
from varprobe.theory.nodes import chain
from varprobe.theory.signal import Call, measured_m2, start_signal
from varprobe.theory.walk import Walk, _join
from varprobe.theory.weights import (
    Weights,
    actual_weights,
    drawables,
    prelu_slopes,
    scheme_weights,
)


def annotate(report: Report, modules: list[nn.Module], recording=None,
             values: Values | None = None, measured: bool = True,
             schemes: Iterable[str] = SCHEMES) -> Counterfactuals:
    """Fill fans, gains, multipliers and the local and graph predictions, and the
    predictions of ``schemes``; the walker it returns adds other schemes' later.

    ``recording``: the theory.recording.Recording of the pass (None: the chain of
    calls). ``values``: host copies of the tensors ``norms.host_tensors`` names (the
    probe's one transfer). ``measured``: False for the closed-form ``predict``.
    """
    with threads.one_thread():  # the walks' torch work is on small arrays
        walker = _annotate(report, modules, recording, values, measured)
    walker.add(schemes)  # on one thread too
    return walker


def _annotate(report: Report, modules: list[nn.Module], recording, values, measured: bool
              ) -> Counterfactuals:
    layers = report.layers
    values = norms.Memo(values)
    if not layers:
        return Counterfactuals(report, modules, None, None, measured, values)
    for layer, module in zip(layers, modules):
        _effective_fans(layer, module)
        _dead_or_live(layer, module, values)
    weights = actual_weights(layers, modules)
    graph = _graph(report, recording, measured)
    actual = Walk(report, modules, graph, weights, measured, None, values).run()
    _gains(layers, modules, actual, values)
    for i, (layer, module) in enumerate(zip(layers, modules)):
        if layer.kind == "weight":
            layer.local = _local(layer, module, weights[i])
            if (is_linear_map(module) or isinstance(module, nn.Embedding)):
                _multipliers(layer, weights[i])
        layer.predicted = _prediction(layer, actual.calls.get(i), measured)
    _notes(report, actual, measured)
    report.attention = actual.attention
    report.summary.forward_ratio, report.summary.backward_ratio = end_to_end(report)
    return Counterfactuals(report, modules, graph, actual, measured, values)


class Counterfactuals:
    """The init schemes' walks over the probe's graph (the actual init's weights
    replaced by each scheme's), each run when first asked for: they are most of the
    predictions' time, and a report needs only the schemes its reader compares and
    those a fix weighs. Must be asked while the modules are in the probe's modes."""

    def __init__(self, report: Report, modules: list[nn.Module], graph, actual: Walk | None,
                 measured: bool, values: norms.Memo) -> None:
        self.report, self.modules, self.graph = report, modules, graph
        self.actual, self.measured, self.values = actual, measured, values
        self.walked: list[tuple[list[Weights | None], Walk]] = []
        self.done: set[str] = set()
        self._drawn: tuple | None = None

    def add(self, schemes: Iterable[str]) -> None:
        """Fill ``layer.schemes[name]`` of every weight layer for each of ``schemes``."""
        todo = [s for s in schemes if s not in self.done]
        if self.actual is None or not todo:
            return
        layers, modules = self.report.layers, self.modules
        if self._drawn is None:
            self._drawn = (prelu_slopes(modules, self.values), drawables(layers, modules))
        slopes, drawn_from = self._drawn
        with threads.one_thread():
            for scheme in todo:
                self.done.add(scheme)
                weights = scheme_weights(scheme, layers, modules, slopes, drawn_from)
                walk = self._walk(weights)
                for i, layer in enumerate(layers):
                    if layer.kind == "weight":
                        layer.schemes[scheme] = _prediction(layer, walk.calls.get(i),
                                                            self.measured)

    def _walk(self, weights: list[Weights | None]) -> Walk:
        # schemes that draw the same weights walk alike (he-prelu is he without a PReLU)
        walk = next((done for drawn, done in self.walked if drawn == weights), None)
        if walk is None:
            walk = Walk(self.report, self.modules, self.graph, weights, self.measured,
                        self.actual if self.measured else None, self.values).run()
            self.walked.append((weights, walk))
        return walk


def end_to_end(report: Report, scheme: str | None = None) -> tuple[float | None, float | None]:
    """Predicted (forward, backward) end-to-end ratios for the actual init or a scheme.

    forward: the last weight layer's E[y^2] over the network input's E[x^2] (over the
    first weight layer's E[y^2] when the input is not a float tensor, e.g. token ids);
    backward: the first weight layer's Var[dL/dy] over the output cotangent's Var.
    """
    weights = report.weight_layers
    if not weights:
        return None, None

    def get(layer: Layer) -> Prediction | None:
        return layer.predicted if scheme is None else layer.schemes.get(scheme)

    first, last = get(weights[0]), get(weights[-1])
    start = start_signal(report)[0]
    fwd_ref = start.m2 if start is not None else (first.forward_var if first else None)
    fwd = _ratio(last.forward_var if last else None, fwd_ref)
    bwd = _ratio(first.backward_var if first else None, _cotangent(report))
    return fwd, bwd


def _graph(report: Report, recording, measured: bool):
    reason = _unusable(recording)
    if reason is None:
        return recording
    report.notes.append(f"graph: the calls in execution order stand in for the dataflow "
                        f"({reason})")
    return chain(report.layers, report.input if measured else None)


def _unusable(recording) -> str | None:
    if recording is None:
        return "no recording was made"
    if recording.compiled is not None:
        return f"{recording.compiled} is a torch.compile'd submodule, which the recording " \
               "cannot look into"
    if recording.failed is not None:
        return f"the recording failed: {recording.failed}"
    if not recording.nodes:
        return "nothing was recorded"
    return None


def _cotangent(report: Report) -> float:
    """The measured Var of the gradient at the last call's output (else the one
    ``predict`` assumed, 1 by default)."""
    last = report.layers[-1] if report.layers else None
    if last is not None and last.backward is not None and last.backward.var is not None:
        return last.backward.var
    return report.settings.get("cotangent_var") or 1.0


# --- per-layer facts ----------------------------------------------------------------

def _effective_fans(layer: Layer, module: nn.Module) -> None:
    if layer.kind != "weight":
        return
    shape = layer.input_shape
    eff = effective_fans(module, shape, layer.shape) if shape is not None and isinstance(
        module, nn.modules.conv._ConvNd) else None
    if eff is not None:
        layer.effective_fan_in, layer.effective_fan_out = eff
    else:  # no borders or stride, or a conv that pads on its own: the nominal fans
        layer.effective_fan_in = None if layer.fan_in is None else float(layer.fan_in)
        layer.effective_fan_out = None if layer.fan_out is None else float(layer.fan_out)


def _gains(layers: list[Layer], modules: list[nn.Module], walk: Walk,
           values: Values | None = None) -> None:
    """Name the activation after (and before) each weight layer and give its gains.

    The gain is taken at the activation's measured input second moment, else at the
    predicted one (it depends on it only for non-rectifiers). An activation module
    after the layer, else a functional one on its output (F.relu(fc(x)), read off the
    recorded dataflow)."""
    nodes = getattr(walk.graph, "nodes", [])
    functional = _functional_activations(nodes, layers)
    before: tuple[str, float | None] | None = None
    owner: Layer | None = None
    # activation layer (or "act" node) -> its (name, gain)
    pairs: dict[int | tuple[str, int], tuple[str, float | None]] = {}
    for i, (layer, module) in enumerate(zip(layers, modules)):
        if layer.kind == "weight":
            before = _functional_gain(owner, functional, walk, values, pairs) or before
            if before is not None:
                layer.input_activation, layer.input_gain = before
            before, owner = None, layer
        elif layer.kind == "activation" and owner is not None and owner.activation is None:
            q = measured_m2(layer.input)
            call = walk.calls.get(i)
            if q is None and call is not None and call.input is not None \
                    and call.input.signal is not None:
                q = call.input.signal.m2
            _set_gains(owner, layer.type, module, q, values)
            before = pairs[i] = (layer.type, owner.gain)
    _functional_gain(owner, functional, walk, values, pairs)
    _shared_inputs(layers, nodes, pairs)


def _shared_inputs(layers: list[Layer], nodes: list, pairs: dict) -> None:
    """A weight layer that reads an activation another weight layer read first (a
    pre-activation block's shortcut conv beside its first conv) takes its gain too."""
    for node in nodes:
        if node.op != "call" or node.index is None or not node.inputs \
                or layers[node.index].kind != "weight" \
                or layers[node.index].input_activation is not None:
            continue
        k = _through_views(nodes, node.inputs[0])
        key = None if k is None else ("act", k) if nodes[k].op == "act" else \
            nodes[k].index if nodes[k].op == "call" else None
        if key in pairs:
            layers[node.index].input_activation, layers[node.index].input_gain = pairs[key]


def _set_gains(owner: Layer, name: str, module: nn.Module, q: float | None,
               values: Values | None) -> None:
    owner.activation = name
    if q is None:
        owner.unavailable["gain"] = "the activation's input is unknown"
        return
    owner.gain = forward_gain(module, q, values)
    owner.backward_gain = backward_gain(module, q, values)
    if owner.gain is None:
        owner.unavailable["gain"] = gain_unavailable_reason(module, q, values)


def _functional_gain(owner: Layer | None, functional: dict[int, tuple[int, nn.Module]],
                     walk: Walk, values: Values | None,
                     pairs: dict) -> tuple[str, float | None] | None:
    """The gains of the functional activation on ``owner``'s output (at its measured,
    else predicted, scale), where no module activation followed it; the pair the next
    weight layer takes as its input's."""
    if owner is None or owner.activation is not None or owner.index not in functional:
        return None
    node, module = functional[owner.index]
    call = walk.calls.get(owner.index)
    q = measured_m2(owner.forward) or (call.forward if call is not None else None)
    name = type(module).__name__  # as a module activation is named: the same rules apply
    _set_gains(owner, name, module, q, values)
    pairs["act", node] = name, owner.gain
    return pairs["act", node]


def _through_views(nodes: list, k: int | None) -> int | None:
    """The node behind ``k`` through views, scales and bias adds (one-input linear
    nodes); None for no node."""
    while k is not None and k >= 0 and nodes[k].op == "linear" \
            and len(nodes[k].inputs) == 1 and not nodes[k].cat:
        k = nodes[k].inputs[0]
    return k if k is not None and k >= 0 else None


def _functional_activations(nodes: list, layers: list[Layer]
                            ) -> dict[int, tuple[int, nn.Module]]:
    """Weight layer index -> the functional activation its output goes into (through
    views and bias adds), where the recording saw one: its node, its stand-in module."""
    found: dict[int, tuple[int, nn.Module]] = {}
    for j, node in enumerate(nodes):
        if node.op != "act" or node.module is None or not node.inputs:
            continue
        k = _through_views(nodes, node.inputs[0])
        if k is not None and nodes[k].op == "call" and nodes[k].index is not None \
                and layers[nodes[k].index].kind == "weight":
            found.setdefault(nodes[k].index, (j, node.module))
    return found


def _dead_or_live(layer: Layer, module: nn.Module, values: Values) -> None:
    """Units zero for every sample are dead only where the activation's slope is zero
    there too (live_at_zero): elsewhere their fraction says nothing of death."""
    if layer.kind != "activation" or not (layer.forward and layer.forward.dead_fraction):
        return
    zero_input = layer.input is not None and layer.input.second_moment == 0
    why = live_at_zero(module, zero_input, values)
    if why is not None:
        layer.forward.dead_fraction = None
        layer.unavailable["dead_fraction"] = why


def _multipliers(layer: Layer, w: Weights | None) -> None:
    """n E[w^2] g_prev and n^ E[w^2] g'_next: the layer's own factors (1 holds)."""
    if w is None:
        return
    if layer.effective_fan_in is not None:
        g = layer.input_gain if layer.input_activation is not None else 1.0
        layer.forward_multiplier = None if g is None else layer.effective_fan_in * w.w2 * g
    if layer.effective_fan_out is not None:
        g = layer.backward_gain if layer.activation is not None else 1.0
        layer.backward_multiplier = None if g is None else layer.effective_fan_out * w.w2 * g


def _local(layer: Layer, module: nn.Module, w: Weights | None) -> Prediction:
    """One step from the layer's own measured input and output gradient."""
    if w is None or not (is_linear_map(module) or isinstance(module, nn.Embedding)):
        return Prediction(None, None, basis="local", note=f"no closed form for {layer.type}")
    if isinstance(module, nn.Embedding):
        return Prediction(w.w2, None, basis="local", note=w.note)
    x2 = measured_m2(layer.input)
    dy = layer.backward.var if layer.backward else None
    fwd = None if x2 is None else layer.effective_fan_in * w.w2 * x2 + w.b2
    dx = None if dy is None else layer.effective_fan_out * w.w2 * dy
    return Prediction(fwd, None, basis="local", note=w.note, backward_input_var=dx)


# --- predictions --------------------------------------------------------------------

def _prediction(layer: Layer, call: Call | None, measured: bool) -> Prediction:
    if call is None:  # inside a module the recording takes whole
        note = "not on the recorded graph (inside a module taken whole)"
        if measured and layer.local is not None and layer.local.forward_var is not None:
            return dataclasses.replace(layer.local, note=_join(
                note, "one step from its measured input", layer.local.note))
        return Prediction(None, None, basis="graph", note=note)
    notes = [f"forward: {call.forward_note}" if call.forward_note else None]
    if call.forward is None and call.forward_break is not None:
        notes = [f"forward: none; the graph could not follow {call.forward_break}"]
    if call.grad is None and call.backward_break is not None:
        notes.append(f"backward: none; the graph could not follow {call.backward_break}")
    elif call.backward_note:
        notes.append(f"backward: {call.backward_note}")
    source = call.input.signal if call.input is not None else None
    return Prediction(forward_var=call.forward, backward_var=call.grad, basis="graph",
                      note=_join(*notes), backward_input_var=call.grad_input,
                      input_var=None if source is None else source.m2)


def _notes(report: Report, walk: Walk, measured: bool) -> None:
    """Where the walk could not follow the graph, once per reason."""
    broke: dict[str, list[Layer]] = {}
    backward: dict[str, list[Layer]] = {}
    for i, call in sorted(walk.calls.items()):
        layer = report.layers[i]
        if layer.kind == "weight" and call.forward_break is not None:
            broke.setdefault(call.forward_break, []).append(layer)
        if call.backward_break is not None:
            backward.setdefault(call.backward_break, []).append(layer)
    how = "carried measured gradients" if measured else "stopped"
    for reason, layers in backward.items():
        report.notes.append(f"graph: the backward {how} at {_labels(layers)}: it could not "
                            f"follow {reason}")
    for reason, layers in broke.items():
        report.notes.append(
            f"graph: carried measured values at {_labels(layers)}: it could not follow "
            f"{reason}" if measured else
            f"graph: no forward prediction at {_labels(layers)}: the graph could not follow "
            f"{reason}, and nothing is measured in a closed-form prediction")
    if walk.graph.reads:
        where = walk._place(walk.graph.reads[0])
        report.notes.append(f"graph: the control flow read an activation{where}; "
                            "the graph is the branch this input took")


def _labels(layers: list[Layer]) -> str:
    more = f" and {len(layers) - 1} later weight layer(s)" if len(layers) > 1 else ""
    return layers[0].label + more


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None
