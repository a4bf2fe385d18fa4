"""The network's structure, read off the recorded dataflow: where each signal's scale is set.

He et al.'s recursion is about an un-normalized stretch of weight layers: the scale of
a signal is set where the stretch starts and compounds through the layers after it.
Real networks restart that scale all the time, and a verdict that holds every layer
against the network's input mistakes those restarts for explosions or collapses:

- a normalization (BatchNorm, LayerNorm, GroupNorm, RMSNorm, a custom ``*Norm``
  module, ``F.layer_norm``...) sets its output's scale from its own affine parameters,
  as long as what it divides by is above its eps: a norm whose measured output is far
  below that scale hands on its input's scale times gamma^2/eps (BatchNorm gammas
  drawn N(0, 0.02) collapse a network this way, norm after norm) and is no anchor;
- a lookup (an embedding) sets it from its table: token ids have no scale to keep, nor
  has an indicator input (one-hot or multi-hot, every element 0 or 1), whose ones select
  the rows of the weight layer that reads it;
- a mixing operation (attention, softmax, a product of two activations like q @ k^T or
  SwiGLU's silu(g) * u) sets it from the geometry of what it mixes (attention at init
  averages its values over the sequence; that is not signal loss).

An average over positions is an anchor too: it keeps the square of the mean and only a
correlation-dependent part of the variance, so a zero-mean map averaged over 56x56
positions is 3000x smaller by geometry alone (the input of a squeeze-excitation gate).
A maximum over positions is not: it carries the scale of what it pools, and an
exploding trunk stays exploding after it. A gate, x * sigmoid(s), carries x's scale.

Each such operation is a *scale anchor*. Every tensor is traced back through the
operations that only carry a scale forward (weight layers, activations, views,
dropout, residual adds and concatenations) to the anchor it inherits its scale from,
and every weight layer's input is judged against that anchor. Where two signals meet
(a residual add, a concatenation, a gate), the older one, the trunk the other was
branched off, carries the anchor. An anchor that is not measured (a functional op
between modules) hands over to the first measured tensor after it: a weight layer's
input, or a weightless module's output (a sinusoidal embedding sets the scale of what it
makes of a raw timestep, whose own scale is none a signal keeps).

The result goes into each layer: ``reference`` (the label of the measured tensor it is
held against), ``reference_second_moment`` (its E[x^2]), ``stretch`` (weight layers
sharing an anchor form one un-normalized stretch), ``depth`` (weight layers in series
since the anchor, itself included: how far a per-layer factor has compounded) and
``forks`` (the layer's output is read by more than one operation: a gradient product
along a chain cannot see what flows around it) and ``rejoins`` (its output is added back
onto the tensor its branch forked off: a residual branch's end).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from varprobe.diagnose.common import places
from varprobe.report import NETWORK_INPUT, Layer, Report
from varprobe.theory import norms
from varprobe.theory.nodes import Node
from varprobe.theory.recording import Recording

# Module classes whose output scale is their own (by class name: the families are
# spread over torch.nn, transformers, timm and hand-written code).
ANCHOR_TYPES = ("Embedding", "EmbeddingBag", "MultiheadAttention", "Softmax", "LogSoftmax",
                "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d",
                "AdaptiveAvgPool3d")
ANCHOR_WORDS = ("Norm", "Attention", "Embedding")
# A bounded gate: a product with one of these carries the other factor's scale.
GATES = ("Sigmoid", "Hardsigmoid", "Softmax", "Tanh", "Hardtanh")
# Functional operations (as theory.recording names them) that set their output's scale.
ANCHOR_FUNCS = ("F.layer_norm", "F.group_norm", "F.batch_norm", "F.instance_norm",
                "F.rms_norm", "F.normalize", "torch.layer_norm", "torch.group_norm",
                "torch.batch_norm", "torch.rms_norm", "F.scaled_dot_product_attention",
                "F.softmax", "Tensor.softmax", "torch.softmax", "F.log_softmax",
                "Tensor.log_softmax", "Tensor.mean", "torch.mean", "F.avg_pool",
                "F.adaptive_avg_pool", "F.embedding", "torch.embedding", "torch.matmul",
                "Tensor.matmul", "Tensor.__matmul__", "Tensor.__rmatmul__", "torch.bmm",
                "Tensor.bmm",
                "torch.einsum", "torch.baddbmm", "Tensor.rsqrt", "torch.rsqrt")

PRODUCT = " of activations"  # theory.recording's suffix for a product of two activations


@dataclass(frozen=True)
class Anchor:
    """A measured tensor a signal's scale is held against: the network's input
    (layer None), a layer's output, or a layer's own input (``own_input``)."""

    layer: int | None
    own_input: bool = False


# The network input when it is an indicator (TensorInfo.indicator: one-hot or multi-hot):
# like token ids it selects weights and has no scale to keep, so each weight layer that
# reads it sets a scale of its own, as an embedding does.
IDS = Anchor(-1)


def annotate(report: Report, recording: Recording | None,
             modules: list[nn.Module] | None = None,
             values: dict[int, list[float]] | None = None) -> Report:
    """Fill reference, reference_second_moment, stretch and forks on every layer.

    Without a usable recording, every layer is held against the network input (or,
    for token ids or an indicator, the first weight layer's output); no forks known.
    ``modules`` (aligned with the layers) and ``values`` (the host copies of their
    norms' parameters): tell the norms that did not set their output's scale
    (``_carried``)."""
    layers = report.layers
    if recording is None or recording.failed is not None or recording.compiled is not None \
            or not recording.nodes:
        _fallback(report)
        return report
    trunks = _trunks(recording.nodes)
    carrying = _carried(layers, modules, values)
    if carrying:
        report.notes.append(_carried_note([layers[i].label for i in sorted(carrying)]))
    anchors = _node_anchors(recording.nodes, layers, trunks, bool(report.input.indicator),
                            carrying)
    depths = _depths(recording.nodes, layers, anchors)
    consumers = _consumer_counts(recording.nodes)
    rejoining = _rejoining(recording.nodes, layers, trunks)
    gated = _gated(recording.nodes, layers, recording.constants())
    stretches: dict[Anchor, int] = {}
    for node_id, node in enumerate(recording.nodes):
        if node.op not in ("call", "exit") or node.index is None:
            continue
        layer = layers[node.index]
        source = node.inputs[1] if node.op == "exit" and len(node.inputs) > 1 else (
            node.inputs[0] if node.op == "call" and node.inputs else None)
        anchor = anchors.get(source) if source is not None and source >= 0 else None
        if anchor is IDS:
            anchor = Anchor(node.index, own_input=True) if layer.kind == "weight" \
                else Anchor(None)
        if anchor is None:
            anchor = Anchor(node.index, own_input=True)
        _set_reference(report, layer, anchor)
        layer.forks = consumers.get(node_id, 0) > 1
        layer.rejoins = node.index in rejoining
        layer.revives = node.index in gated
        layer.depth = depths[node_id] if anchor.layer != node.index else 1
        if layer.kind == "weight":
            layer.stretch = stretches.setdefault(anchor, len(stretches))
    output = recording.outputs[0] if recording.outputs else None
    if output is not None and anchors.get(output) is not None:  # None: an unmeasured op
        report.summary.output_reference = _label(report, anchors[output])
    return report


def _set_reference(report: Report, layer: Layer, anchor: Anchor) -> None:
    layer.reference = _label(report, anchor)
    layer.reference_second_moment = second_moment(report, anchor)


def second_moment(report: Report, anchor: Anchor) -> float | None:
    if anchor.layer is None:
        return report.input.second_moment
    layer = report.layers[anchor.layer]
    stats = layer.input if anchor.own_input else layer.forward
    return stats.second_moment if stats is not None else None


def _label(report: Report, anchor: Anchor) -> str:
    if anchor.layer is None:
        return NETWORK_INPUT
    label = report.layers[anchor.layer].label
    return f"{label} (input)" if anchor.own_input else label


def _carried(layers: list[Layer], modules: list[nn.Module] | None,
            values: dict[int, list[float]] | None = None) -> set[int]:
    """The norm layers that did not set their output's scale (``norms.normalizes``):
    they carry their input's on. Not one whose input is exactly zero: the signal died
    before it, which the zero rules judge (diagnose.forward)."""
    if modules is None:
        return set()
    return {i for i, (layer, module) in enumerate(zip(layers, modules))
            if layer.kind == "norm" and (m := _moments(layer)) is not None and m[0]
            and not norms.normalizes(module, m[1], values)}


def _moments(layer: Layer) -> tuple[float, float] | None:
    """A norm layer's input and output E[x²]: measured, or predicted where nothing was
    measured (``varprobe predict``)."""
    if layer.forward is not None and layer.input is not None:
        return layer.input.second_moment, layer.forward.second_moment
    p = layer.predicted
    if layer.forward is None and p is not None and None not in (p.input_var, p.forward_var):
        return p.input_var, p.forward_var
    return None


def _carried_note(labels: list[str]) -> str:
    return (f"structure: {len(labels)} norm(s) did not set their output's scale "
            f"({places(labels)}): each output's E[y²] is below a tenth of its "
            "mean(γ²) + mean(β²), so what it divides by is under eps/9 and it multiplies "
            "its input by ~γ²/eps; the layers after it are held against the last norm that "
            "did (γ drawn small, e.g. N(0, 0.02), does this)")


def is_anchor_layer(layer: Layer) -> bool:
    return (layer.kind == "norm" or layer.type in ANCHOR_TYPES
            or any(word in layer.type for word in ANCHOR_WORDS))


def is_anchor_function(reason: str | None) -> bool:
    """A functional op that sets its output's scale, products of activations included
    (gates are told apart by ``_gate``)."""
    return bool(reason) and (reason.startswith(ANCHOR_FUNCS) or reason.endswith(PRODUCT))


def _gate(node: Node, nodes: list[Node], layers: list[Layer]) -> int | None:
    """For a product of two activations of which one is a bounded gate (a sigmoid,
    hard sigmoid, softmax or tanh output), the other factor's node."""
    if len(node.inputs) != 2:
        return None
    for k, other in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        if k is None or k < 0:
            continue
        source = nodes[k]
        name = (type(source.module).__name__ if source.op == "act" and source.module is not None
                else layers[source.index].type if source.op == "call"
                and source.index is not None else "")
        if name in GATES:
            return other
    return None


def _node_anchors(nodes: list[Node], layers: list[Layer], trunks: dict[int, int],
                  indicator: bool = False,
                  carrying: set[int] = frozenset()) -> dict[int, Anchor | None]:
    """Each node's anchor, in execution order (a node's inputs come before it).
    None: the scale was set by an unmeasured operation; the next measured tensor
    takes over. ``trunks``: ``_trunks``; ``indicator``: the network input is one
    (``IDS``); ``carrying``: norm layers that are no anchor (``_carried``)."""
    anchors: dict[int, Anchor | None] = {}
    for k, node in enumerate(nodes):
        gated = _gate(node, nodes, layers) if (node.reason or "").endswith(PRODUCT) else None
        anchors[k] = (anchors.get(gated) if gated is not None and gated >= 0
                      else _anchor(node, anchors, layers, indicator, trunks.get(k), carrying))
    return anchors


def _anchor(node: Node, anchors: dict[int, Anchor | None], layers: list[Layer],
            indicator: bool, trunk: int | None, carrying: set[int]) -> Anchor | None:
    if node.op == "input":
        return (IDS if indicator else Anchor(None)) if node.index == 0 else None
    if node.op in ("call", "exit") and node.index is not None:
        if is_anchor_layer(layers[node.index]) and node.index not in carrying:
            return Anchor(node.index)
        inner = node.inputs[0] if node.inputs else None
        upstream = anchors.get(inner) if inner is not None and inner >= 0 else None
        if upstream is IDS and node.op == "call" and layers[node.index].kind == "weight":
            return Anchor(node.index)  # a lookup by the indicator's ones
        if node.op == "call" and upstream is None:
            # its input is the first measured tensor; a module without weights sets the
            # scale of what it outputs from an input of no scale of its own (a sinusoidal
            # embedding of a raw timestep t in [0, 1000), a network's second input)
            return Anchor(node.index, own_input=layers[node.index].kind == "weight")
        return upstream
    if node.op == "unknown" and is_anchor_function(node.reason):
        return None
    if node.op == "product" or node.op == "attention" or (
            node.op == "pool" and node.pool.kind in ("mean", "sum")):
        return None  # attention and averages set a scale of their own (max pools carry)
    # where branches meet (an add, a concatenation, a gate x * s): the trunk's anchor,
    # the tensor the others branched off; else the oldest input's that has one
    if trunk is not None and anchors.get(trunk) is not None:
        return anchors[trunk]
    ins = sorted({i for i in node.inputs if i is not None and i >= 0})
    return next((anchors[k] for k in ins if anchors.get(k) is not None), None)


def _trunks(nodes: list[Node]) -> dict[int, int]:
    """Each sum's (a linear node, not a concatenation) trunk input, where it has one."""
    found = {}
    for k, node in enumerate(nodes):
        if node.op == "linear" and not node.cat:
            trunk = _trunk_input(nodes, sorted({i for i in node.inputs
                                                if i is not None and i >= 0}))
            if trunk is not None:
                found[k] = trunk
    return found


def _trunk_input(nodes: list[Node], ins: list[int]) -> int | None:
    """The input of a sum that every other one branched off: the fork itself or a short
    shortcut from it (``_shortcut``), None where there is no such input."""
    if len(ins) < 2:
        return None
    for j in ins:
        forks = _shortcut(nodes, j)
        if all(k == j or (not _descends(nodes, j, k) and any(_descends(nodes, k, f)
                                                            for f in forks)) for k in ins):
            return j
    return None


def _depths(nodes: list[Node], layers: list[Layer],
            anchors: dict[int, Anchor | None]) -> list[int]:
    """Weight layers in series since each node's anchor (the longest path): how far a
    per-layer factor can have compounded. Parallel layers (q, k and v) count once."""
    depths: list[int] = []
    for k, node in enumerate(nodes):
        if anchors.get(k) is None or (node.op in ("call", "exit") and node.index is not None
                                      and anchors[k] == Anchor(node.index)):
            depths.append(0)
            continue
        before = max((depths[i] for i in node.inputs if i is not None and 0 <= i < k
                      and anchors.get(i) == anchors[k]), default=0)
        own = node.op == "call" and node.index is not None \
            and layers[node.index].kind == "weight"
        depths.append(before + own)
    return depths


def _rejoining(nodes: list[Node], layers: list[Layer], trunks: dict[int, int]) -> set[int]:
    """The layers of a residual branch's end: from its last weight layer to the add that
    puts its output back onto the tensor the branch forked off (through views, scales,
    dropout and other weightless modules). The gradient reaches everything before the
    branch around it, along the trunk."""
    found: set[int] = set()
    for at, trunk in trunks.items():
        for k in {i for i in nodes[at].inputs if i is not None and i >= 0} - {trunk}:
            found.update(_branch_end(nodes, layers, k))
    return found


def _gated(nodes: list[Node], layers: list[Layer], constants: list) -> set[int]:
    """The weight layers whose exact-zero input a learned factor at 0 made between
    modules (``x * self.scale``, the scale a zero-initialized parameter), reached through
    views and scalings, from an input not known to be zero, where the gradient at the
    layer's input is non-zero: then the gate's gradient, its input times that one, is
    non-zero too, and it moves at the first step (a module that made the zero is
    judged by its own gradient, diagnose.forward.revives)."""
    found = set()
    for node in nodes:
        i = node.index
        if node.op != "call" or i is None or layers[i].kind != "weight" \
                or layers[i].input is None or layers[i].input.second_moment != 0:
            continue
        gate = _zero_factor(nodes, node.inputs[0] if node.inputs else None, constants)
        grad = layers[i].backward_input
        if gate is not None and nodes[gate].learned and not _zero_source(
                nodes, layers, nodes[gate].inputs[0]) and grad is not None \
                and grad.var is not None and 0 < grad.var < math.inf:
            found.add(i)
    return found


def _zero_factor(nodes: list[Node], k: int | None, constants: list) -> int | None:
    """The nearest node before ``k``, through nodes of one input, that scales by a factor
    whose mean square is 0."""
    while k is not None and k >= 0 and nodes[k].op == "linear" and not nodes[k].cat \
            and len(nodes[k].inputs) == 1:
        scale = nodes[k].scale
        if scale is not None and constants[scale] is not None and constants[scale][0] == 0:
            return k
        k = nodes[k].inputs[0]
    return None


def _zero_source(nodes: list[Node], layers: list[Layer], k: int | None) -> bool:
    """Whether the value at node ``k`` is known to be zero: the measured output of the
    module it comes from through nodes of one input."""
    while k is not None and k >= 0:
        node = nodes[k]
        if node.op == "call" and node.index is not None:
            out = layers[node.index].forward
            return out is not None and out.second_moment == 0
        if len(node.inputs) != 1:
            return False
        k = node.inputs[0]
    return False


SHORTCUT = 3  # module calls a shortcut may pass through: avg pool, 1x1 conv, norm


def _shortcut(nodes: list[Node], j: int) -> list[int]:
    """Node ``j`` and the nodes it was made from through up to ``SHORTCUT`` calls of one
    input each: where a shortcut module (``self.shortcut(x)``, an identity or a
    projection, called after the branch) forked off the trunk. Where ``j`` is itself a
    view or a slice, the tensors it was taken from through views alone (``x[1:] +=
    f(x[0])``: streams stacked in one tensor, the branch reading one of them), not on
    through calls: a view of a value made far back (a time embedding added in every
    block) is no trunk."""
    path = [j]
    while _view(nodes[path[-1]]) and len(path) <= SHORTCUT:
        path.append(nodes[path[-1]].inputs[0])
    if len(path) > 1:
        return path
    for _ in range(SHORTCUT):
        node = nodes[path[-1]]
        if node.op != "call" or len(node.inputs) != 1 or node.inputs[0] is None \
                or node.inputs[0] < 0:
            break
        path.append(node.inputs[0])
    return path


def _view(node: Node) -> bool:
    """A node of one input that only views, slices or copies it (a slice too, whose
    gradient reaches part of its input: unlike nodes.is_view, which keeps the whole)."""
    return node.op == "linear" and not node.cat and node.scale is None and not node.const \
        and len(node.inputs) == 1 and node.inputs[0] is not None and node.inputs[0] >= 0


def _branch_end(nodes: list[Node], layers: list[Layer], k: int) -> list[int]:
    """The layers from node ``k`` back to the first weight layer (included), through
    nodes of one input (a module's own input, an exit's inner value)."""
    end = []
    while k >= 0:
        node = nodes[k]
        if node.op in ("call", "exit") and node.index is not None:
            end.append(node.index)
            if layers[node.index].kind == "weight":
                break
        elif node.op not in ("linear", "dropout", "act") or len(node.inputs) != 1:
            break
        if not node.inputs or node.inputs[0] is None:
            break
        k = node.inputs[0]
    return end


def _descends(nodes: list[Node], start: int, trunk: int) -> bool:
    """Whether node ``trunk`` is an ancestor of node ``start`` (an input's index is
    always below its node's: only the nodes between the two are walked)."""
    stack, seen = [start], set()
    while stack:
        k = stack.pop()
        if k == trunk:
            return True
        if k < trunk or k in seen:
            continue
        seen.add(k)
        stack.extend(i for i in nodes[k].inputs if i is not None and i >= 0)
    return False


def _consumer_counts(nodes: list[Node]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for node in nodes:
        # an exit node's second input is the container's input, not a read of it
        reads = node.inputs[:1] if node.op == "exit" else node.inputs
        for k in set(reads):
            if k is not None and k >= 0:
                counts[k] = counts.get(k, 0) + 1
    return counts


def _fallback(report: Report) -> None:
    weights = [i for i, layer in enumerate(report.layers) if layer.kind == "weight"]
    if report.input.second_moment and not report.input.indicator:
        anchor = Anchor(None)
    elif weights:
        anchor = Anchor(weights[0])
    else:
        return
    depth = 0
    for layer in report.layers:
        _set_reference(report, layer, anchor)
        if layer.kind == "weight":
            depth += 1
            layer.stretch, layer.depth = 0, depth
