"""The recorded graph's vocabulary: the nodes, the ops they stand for, and the chain of
calls that stands in for a graph where none could be recorded."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from varprobe.theory.pools import Pool

T = torch.Tensor
ADD = {torch.add, T.add, T.add_, T.__add__, T.__radd__, T.__iadd__}
MUL = {torch.mul, torch.multiply, T.mul, T.mul_, T.multiply, T.__mul__, T.__rmul__, T.__imul__}
DIV = {torch.div, torch.divide, torch.true_divide, T.div, T.div_, T.divide, T.true_divide,
       T.__truediv__, T.__itruediv__}
CAT = {torch.cat, torch.concat, torch.concatenate, torch.stack}
# Same elements (or a broadcast or a copy of them): the second moment and the gradient
# pass unchanged. contiguous/clone/to copy, they do not mix.
VIEWS = {T.view, T.view_as, T.reshape, T.reshape_as, torch.reshape, T.flatten, torch.flatten,
         T.unflatten, torch.unflatten, T.transpose, torch.transpose, T.swapaxes, T.swapdims,
         T.permute, torch.permute, T.movedim, torch.movedim, T.t, torch.t, T.squeeze,
         torch.squeeze, T.unsqueeze, torch.unsqueeze, T.contiguous, T.clone, torch.clone,
         T.to, T.float, T.double, T.half, T.bfloat16, T.type_as, T.type}
# Copies of the elements (a broadcast made real, repeated heads): the second moment
# passes, each element's gradient gathers numel(out)/numel(in) copies' (independent).
EXPANDS = {T.expand, T.expand_as, T.repeat, T.repeat_interleave, torch.repeat_interleave,
           torch.broadcast_to}
# Minus the elements: the second moment and the gradient's pass unchanged, the mean flips.
NEGATIONS = {torch.neg, T.neg, T.__neg__, torch.negative, T.negative}
# A part of the elements: the second moment of positions and channels taken alike,
# the gradient reaching numel(out)/numel(in) of the input.
SLICES = {T.__getitem__, T.chunk, torch.chunk, T.split, torch.split, T.narrow, torch.narrow,
          T.select, torch.select, T.unbind, torch.unbind}
ACTIVATIONS = {
    F.relu: lambda a, k: nn.ReLU(), torch.relu: lambda a, k: nn.ReLU(),
    T.relu: lambda a, k: nn.ReLU(), T.relu_: lambda a, k: nn.ReLU(),
    torch.relu_: lambda a, k: nn.ReLU(), F.relu_: lambda a, k: nn.ReLU(),
    F.leaky_relu: lambda a, k: nn.LeakyReLU(_arg(a, k, 1, "negative_slope", 0.01)),
    F.gelu: lambda a, k: nn.GELU(approximate=_arg(a, k, 1, "approximate", "none")),
    F.silu: lambda a, k: nn.SiLU(), torch.tanh: lambda a, k: nn.Tanh(),
    T.tanh: lambda a, k: nn.Tanh(), torch.sigmoid: lambda a, k: nn.Sigmoid(),
    T.sigmoid: lambda a, k: nn.Sigmoid(),
    F.elu: lambda a, k: nn.ELU(_arg(a, k, 1, "alpha", 1.0)), F.selu: lambda a, k: nn.SELU(),
    F.celu: lambda a, k: nn.CELU(_arg(a, k, 1, "alpha", 1.0)),
    F.softplus: lambda a, k: nn.Softplus(_arg(a, k, 1, "beta", 1.0),
                                         _arg(a, k, 2, "threshold", 20.0)),
    F.mish: lambda a, k: nn.Mish(), F.hardswish: lambda a, k: nn.Hardswish(),
    F.hardsigmoid: lambda a, k: nn.Hardsigmoid(), F.relu6: lambda a, k: nn.ReLU6(),
    F.hardtanh: lambda a, k: nn.Hardtanh(_arg(a, k, 1, "min_val", -1.0),
                                         _arg(a, k, 2, "max_val", 1.0)),
    F.glu: lambda a, k: nn.GLU(_arg(a, k, 1, "dim", -1)),  # halves, not elementwise: rules.glu
}
# Means and pools over positions (theory.pools): kind by function.
POOLS = {torch.mean: "mean", T.mean: "mean", torch.sum: "sum", T.sum: "sum",
         F.avg_pool1d: "mean", F.avg_pool2d: "mean", F.avg_pool3d: "mean",
         F.adaptive_avg_pool1d: "mean", F.adaptive_avg_pool2d: "mean",
         F.adaptive_avg_pool3d: "mean", F.max_pool1d: "max", F.max_pool2d: "max",
         F.max_pool3d: "max", F.adaptive_max_pool1d: "max", F.adaptive_max_pool2d: "max",
         F.adaptive_max_pool3d: "max", F.pad: "pad", F.interpolate: "nearest"}
KERNELS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d}
# The control flow reads an activation: the graph is the branch this input took.
READS = {T.__bool__, T.item, T.tolist, T.__int__, T.__float__, T.__index__}
IN_PLACE_WRITES = {T.__setitem__}
CUSTOM = "custom autograd Function"
IN_PLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                    "__ifloordiv__", "__ipow__", "__iand__", "__ior__", "__ixor__"}
TRUSTED_FUNCTIONS = {"CheckpointFunctionBackward"}  # replays the forward: same gradients


def _arg(args: tuple, kwargs: dict, pos: int, name: str, default: Any) -> Any:
    return args[pos] if len(args) > pos else kwargs.get(name, default)


@dataclass
class Attention:
    """What a scaled_dot_product_attention call was: its shapes and options, and where
    the probe's own measurements at the call sit among the recording's constants
    (``measured``: (Σp², mean logit²) of a subsample of queries, then (r_v, r_k), the
    token correlations of the values and keys, then the mask's shape (causal, full, window),
    then (u_v, w_k), their prefix shares (theory.attention_stats.prefix_share; the
    keys' weighted by 1/i), then
    the query path's factor (query_path); None on meta)."""

    queries: int
    keys: int
    d_k: int
    heads: int
    kv_heads: int = 1
    causal: bool = False
    masked: bool = False
    scale: float | None = None
    dropout: float = 0.0
    measured: int | None = None
    params: int | None = None  # nn.MultiheadAttention: its weights' moments (theory.mha)
    gradient: int | None = None  # the constant the backward fills with r_g (gradient_stats)
    paths: int | None = None  # the constants it fills with the paths' factors (attention_paths)
    bias: int | None = None  # the node of an activation added to the logits (a float mask)
    bias_fold: float = 1.0   # logits per element of it (the batch it is broadcast over)
    softcap: float | None = None  # the logits are c·tanh(s/c) (Gemma 2's soft-capping)
    window: int | None = None  # query i sees keys i - W + 1..i (a measured sliding window)


@dataclass
class Node:
    """One value of the recorded graph.

    op: "input" (a network input; ``index`` says which), "call" (a module with a
    closed form or a measured output; ``index`` its layer), "exit" (the output of a
    module whose insides were followed: inputs[0] the inner value, inputs[1] its
    input), "linear" (sum_i f_i E[x_i^2] + const, gradient b_i per input), "act",
    "dropout", "pool" (theory.pools; ``reason`` names the op), "product" (of two
    activations from different branches), "table" (a rotary embedding's cos or sin),
    "lookup" (F.embedding on a parameter table: ``scale`` its moments),
    "attention" (inputs q,
    k, v), "unknown". ``where``:
    ("in" | "after", layer index) for messages.
    """

    op: str
    inputs: tuple[int, ...] = ()
    index: int | None = None
    forward: tuple[float, ...] = ()   # linear: f_i, on E[x_i^2]
    means: tuple[float, ...] = ()     # linear: m_i, on the common mean of x_i
    backward: tuple[float, ...] = ()  # linear: b_i
    positions: tuple[bool, ...] = ()  # product: each factor broadcast over positions only
    const: tuple[tuple[float, int, float], ...] = ()  # linear: (f_j, constant index, m_j)
    scale: int | None = None          # linear: constant index of a factor on the whole
    learned: bool = False             # linear: that factor requires grad (a gate, learned)
    cat: bool = False                 # linear: a concatenation (pieces side by side)
    sparse: bool = False              # linear: a slice that leaves other positions out
    module: nn.Module | None = None   # act
    p: float = 0.0                    # dropout
    reason: str | None = None         # unknown: what could not be followed
    stops: bool = False               # unknown: its output needs no gradient
    where: tuple[str, int] | None = None
    pool: Pool | None = None          # pool: what it averages, sums or takes the max of
    attn: Attention | None = None     # attention: the call's facts (theory.attention)
    # theory.positions: a concatenation's one-position piece ((axis, position,
    # positions), "input" | "const", its index), the one position a slice picks, and
    # per input the trailing dimensions it shares with the output
    lead: tuple | None = None
    pick: tuple[int, int, int] | None = None
    tails: tuple[int, ...] = ()
    own: tuple[bool, ...] = ()  # linear: per constant, whether each position has its own


def _name(func) -> str:
    name = getattr(func, "__qualname__", None) or ""
    if not name or "<locals>" in name:  # e.g. F.max_pool2d, made by boolean_dispatch
        name = getattr(func, "__name__", None) or repr(func)
    module = getattr(func, "__module__", None)
    if name.startswith(("TensorBase.", "Tensor.")):
        return "Tensor." + name.split(".", 1)[1]
    if name.startswith("_VariableFunctionsClass."):
        return "torch." + name.split(".", 1)[1]
    if module == "torch.nn.functional" or module == "torch._C._nn":
        return "F." + name
    return name


@dataclass
class Chain:
    """The calls in execution order, each fed by the one before: what stands in for a
    recording that could not be made (a torch.compile'd submodule, a failure). Where a
    call's measured input differs from the measured output of the call before it, an
    operation the recorder did not see (a residual add, a functional op) sits between
    them, as an unknown node."""

    nodes: list[Node]
    outputs: list[int | None]
    cotangent_var: float | None = None
    unseen_function: str | None = None
    reads: tuple = ()

    def constants(self) -> list:
        return []


def chain(layers: list, network_input: Any) -> Chain:
    """``layers``: the report's, with their measured statistics (None on meta)."""
    nodes = [Node("input", index=0)]
    before = _m2(network_input)
    for i, layer in enumerate(layers):
        m_in = _m2(layer.input)
        if m_in is not None and before is not None and abs(m_in - before) > SAME * max(
                abs(m_in), abs(before)):
            nodes.append(Node("unknown", (len(nodes) - 1,), reason="an unrecorded operation",
                              where=("before", i)))
        nodes.append(Node("call", (len(nodes) - 1,), index=i))
        before = _m2(layer.forward)
    return Chain(nodes, [len(nodes) - 1], cotangent_var=1.0)  # unless measured


SAME = 1e-9  # relative: the same tensor measured twice gives bit-identical moments


def _m2(stats: Any) -> float | None:
    value = getattr(stats, "second_moment", None) if stats is not None else None
    return value if value is not None and math.isfinite(value) else None


def is_view(node: Node) -> bool:
    return (len(node.inputs) == 1 and node.forward == (1.0,) and node.backward == (1.0,)
            and not node.const and node.scale is None)


def in_place(func, kwargs: dict) -> bool:
    name = getattr(func, "__name__", "")
    return ((name.endswith("_") and not name.endswith("__")) or name in IN_PLACE_DUNDERS
            or kwargs.get("inplace") is True)


def tensor_leaves(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    if not kwargs and len(args) == 1 and isinstance(args[0], T):
        return [args[0]]
    return [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, T)]


def output_tensors(out: Any) -> list[torch.Tensor]:
    pieces = (out,) if isinstance(out, T) else out if isinstance(out, (tuple, list)) else ()
    return [t for t in pieces if isinstance(t, T)]
