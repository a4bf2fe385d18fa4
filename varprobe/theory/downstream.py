"""What lies after a node of the recorded graph, for the rules whose answer depends on
where a norm's gradient comes from.

A norm's backward projects the gradient off what it removed in the forward (the mean
over the values it normalizes, and x̂), which costs a gradient that does not know the
norm 2/M of its variance (M the values of one normalizing group). Behind another norm
of the same kind the gradient has had that done already (a BatchNorm after it took
each channel's mean over the batch; a post-LN block's next LayerNorm, reached through
the residual add, projected it off nearly the same direction), so the cost applies only
where nothing of the kind lies in between: a BatchNorm with no train-mode BatchNorm
after it, a LayerNorm whose output goes only into weight layers (a pre-LN block's q,
k, v and its MLP's first layer: their backward W^T g has neither mean nor x̂ removed).
Behind another BatchNorm the cost is what the activation between them gives back
(theory.shared.behind_loss): ``masks_after`` finds it.
"""

from __future__ import annotations

from torch import nn

from varprobe.theory import norms
from varprobe.theory.nodes import Node, is_view


def facts(graph, modules: list[nn.Module], layers: list, values: object) -> tuple:
    """(``batch_normed_after``, ``masks_after``, ``fresh_norms``) of the graph: once
    for every walk over it where ``values`` is a norms.Memo (a probe's walks share one)."""
    held = getattr(values, "downstream", None)
    if held is not None and id(graph) in held:
        return held[id(graph)]
    nodes, kinds = graph.nodes, [layer.kind for layer in layers]
    found = (batch_normed_after(nodes, modules), masks_after(nodes, modules, kinds),
             fresh_norms(nodes, modules, kinds))
    if held is not None:
        held[id(graph)] = found
    return found


def batch_normed_after(nodes: list[Node], modules: list[nn.Module]) -> set[int]:
    """The nodes with a train-mode BatchNorm after them on some path to an output."""
    after: set[int] = set()
    for k in reversed(range(len(nodes))):
        node = nodes[k]
        if k in after or node.op == "call" and node.index is not None and \
                norms.centres_batch(modules[node.index]):
            after.update(i for i in node.inputs if i >= 0)
    return after


def _readers(nodes: list[Node]) -> dict[int, list[int]]:
    readers: dict[int, list[int]] = {}
    for k, node in enumerate(nodes):
        for i in node.inputs:
            readers.setdefault(i, []).append(k)
    return readers


def masks_after(nodes: list[Node], modules: list[nn.Module], kinds: list[str]
                ) -> dict[int, tuple[nn.Module, int, bool]]:
    """Per train-mode BatchNorm call, the activation its output alone reaches through
    adds, views and module exits (a bottleneck's last BatchNorm: the ReLU of the
    residual sum), as (its module, the node of its input, whether its output goes
    through a depthwise conv alone into the next BatchNorm); absent where there is none."""
    readers, found = _readers(nodes), {}

    def only(j: int) -> int | None:
        after = readers.get(j, [])
        return after[0] if len(after) == 1 else None

    def module_of(j: int | None) -> nn.Module | None:
        node = nodes[j] if j is not None else None
        return modules[node.index] if node is not None and node.op == "call" \
            and node.index is not None else None

    for k, node in enumerate(nodes):
        if node.op != "call" or node.index is None or not norms.centres_batch(modules[node.index]):
            continue
        j = k
        for _ in range(4):
            if (j := only(j)) is None:
                break
            reader = nodes[j]
            act = reader.module if reader.op == "act" else module_of(j) \
                if reader.op == "call" and kinds[reader.index] == "activation" else None
            if act is not None:
                conv = only(j)
                found[k] = (act, reader.inputs[0], _depthwise(module_of(conv)) and
                            norms.centres_batch(module_of(only(conv))))
            elif reader.op == "exit" or reader.op == "linear" and not (reader.cat or reader.sparse):
                continue
            break
    return found


def _depthwise(module: nn.Module | None) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed \
        and module.groups == module.in_channels == module.out_channels > 1


def fresh_norms(nodes: list[Node], modules: list[nn.Module], kinds: list[str]) -> set[int]:
    """The feature-norm calls (LayerNorm, RMSNorm; not GroupNorm) whose output reaches
    only weight layers, through views (``kinds``: each layer's kind)."""
    readers = _readers(nodes)

    def weights_only(k: int, depth: int = 0) -> bool:
        found = readers.get(k, [])
        return bool(found) and depth < 4 and all(
            nodes[r].op == "call" and nodes[r].index is not None
            and kinds[nodes[r].index] == "weight"
            or is_view(nodes[r]) and nodes[r].op == "linear" and weights_only(r, depth + 1)
            for r in found)

    return {k for k, node in enumerate(nodes)
            if node.op == "call" and node.index is not None
            and norms.is_norm(modules[node.index])
            and not isinstance(modules[node.index], (nn.GroupNorm, *norms.BATCH_NORMS))
            and weights_only(k)}
