"""Graph-aware predictions: the recorded dataflow of the forward pass, propagated.

Recording. During the probe's own eager forward a TorchFunctionMode (``Recording``)
follows activations by identity (``id`` checked with a weakref, and ``_version`` so
that in-place writes and reused ids are caught) from the network input through the
recorded module calls (the Recorder tells it where each call starts and ends) and the
operations between them: residual adds, concatenations, multiplications by constants,
views and slices, functional activations and dropout. Any other operation on an
activation becomes an "unknown" node; so does the output of a custom
``autograd.Function`` (its backward is its own) and a tensor written in place by
something the mode did not see. Inside a module varprobe has a closed form for, or
one without children, the module is a single node and its own operations are not
followed. Only ids and small per-node facts are kept: no statistics, no activations.

Propagation (basis "graph", docs/theory-review.md §9). In execution order, the predicted second
moment of every node: the network input as measured; a module call by the same step
as the chain (propagate: n_eff E[w^2] E[x^2] + mean(b^2), activation gains at the
predicted q, the norm reset, dropout's 1/(1-p)); a sum of independent zero-mean
branches Var[x + a F] = Var[x] + a^2 Var[F]; a constant tensor c added like a bias,
+ mean(c^2); a concatenation the size-weighted average; a multiplication by c,
mean(c^2) times; views and slices unchanged. A module without a closed form (max
pooling, attention, softmax, a custom leaf module) carries its *measured* output. An
unknown node breaks the graph: the module call that consumes it carries its measured
input instead, and that call keeps its chain/local prediction, with a report note
naming the operation.

Backward runs over the same nodes in reverse: a node's gradient variance is the sum
over its consumers (independent contributions); an add passes the gradient to both
branches, a slice passes its share numel(out)/numel(in), a concatenation each piece
its slice, a module call propagate's backward step (n^ E[w^2] Var[dy], gains, norms).
Where that cannot be followed the measured gradient at the next module output
upstream is carried, and the layers in between keep the chain's backward value.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from varprobe import propagate, theory
from varprobe.propagate import Signal, _join
from varprobe.recorder import float_leaves
from varprobe.report import Layer, Prediction, Report

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
         T.to, T.float, T.double, T.half, T.bfloat16, T.type_as}
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
}
# The control flow reads an activation: the graph is the branch this input took.
READS = {T.__bool__, T.item, T.tolist, T.__int__, T.__float__, T.__index__}
IN_PLACE_WRITES = {T.__setitem__}
CUSTOM = "custom autograd Function"
CENTRED = 1e-6  # mu^2/q below this: the input of an activation counts as zero-mean
# One fixed slope: closed-form moments for any input mean (theory.rectified_moments).
RECTIFIERS = (nn.ReLU, nn.LeakyReLU)
IN_PLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                    "__ifloordiv__", "__ipow__", "__iand__", "__ior__", "__ixor__"}
TRUSTED_FUNCTIONS = {"CheckpointFunctionBackward"}  # replays the forward: same gradients


def _arg(args: tuple, kwargs: dict, pos: int, name: str, default: Any) -> Any:
    return args[pos] if len(args) > pos else kwargs.get(name, default)


@dataclass
class Node:
    """One value of the recorded graph.

    op: "input" (a network input; ``index`` says which), "call" (a module with a
    closed form or a measured output; ``index`` its layer), "exit" (the output of a
    module whose insides were followed: inputs[0] the inner value, inputs[1] its
    input), "linear" (sum_i f_i E[x_i^2] + const, gradient b_i per input), "act",
    "dropout", "unknown". ``where``: ("in" | "after", layer index) for messages.
    """

    op: str
    inputs: tuple[int, ...] = ()
    index: int | None = None
    forward: tuple[float, ...] = ()   # linear: f_i, on E[x_i^2]
    means: tuple[float, ...] = ()     # linear: m_i, on the common mean of x_i
    backward: tuple[float, ...] = ()  # linear: b_i
    const: tuple[tuple[float, int, float], ...] = ()  # linear: (f_j, constant index, m_j)
    scale: int | None = None          # linear: constant index of a factor on the whole
    cat: bool = False                 # linear: a concatenation (pieces side by side)
    sparse: bool = False              # linear: a slice that leaves other positions out
    module: nn.Module | None = None   # act
    p: float = 0.0                    # dropout
    reason: str | None = None         # unknown: what could not be followed
    stops: bool = False               # unknown: its output needs no gradient
    where: tuple[str, int] | None = None


@dataclass
class _Frame:
    index: int
    opaque: bool
    inputs: tuple[int, ...]


class Recording(TorchFunctionMode):
    """Active around the forward pass only; the Recorder calls ``enter``/``exit``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.nodes: list[Node] = []
        self.outputs: list[int | None] = []
        self.cotangent_var: float | None = None
        self.failed: str | None = None
        self.reads: list[tuple[str, int] | None] = []
        self.unseen_function: str | None = None
        self._ids: dict[int, tuple[weakref.ref, int, int]] = {}
        self._frames: list[_Frame] = []
        self._off: TorchFunctionMode | None = None  # this mode, while a module taken whole runs
        self._last: int | None = None  # the last recorded call that finished
        self._constants: list[torch.Tensor | tuple[float, float]] = []
        self.compiled = next((name for name, m in model.named_modules()
                              if type(m).__name__ == "OptimizedModule"), None)

    # --- the network's inputs and outputs ------------------------------------------
    def start(self, inputs: list[torch.Tensor]) -> None:
        """The float tensors the model is called with, the measured one first."""
        for k, t in enumerate(inputs):
            self._bind(t, self._add(Node("input", index=k)))

    def finish(self, outputs: list[torch.Tensor], cotangent_var: float | None) -> None:
        """The float outputs that are backpropagated, and the measured Var of the first
        cotangent (None when a loss function made it)."""
        with torch._C.DisableTorchFunction():
            self.outputs = [self._lookup(t) for t in outputs]
        self.cotangent_var = cotangent_var
        self._ids.clear()

    def constants(self) -> list[tuple[float, float] | None]:
        """(mean(c^2), mean(c)) of every constant operand: one host transfer, after the pass.
        None for a tensor on the meta device (``varprobe predict``): it has no values."""
        on_device = [c for c in self._constants if isinstance(c, T) and not c.is_meta]
        host = iter(torch.stack([c.cpu() for c in on_device]).tolist() if on_device else [])
        return [None if isinstance(c, T) and c.is_meta else
                tuple(next(host)) if isinstance(c, T) else c for c in self._constants]

    def on_device(self) -> list[torch.Tensor]:
        """The constants' (mean(c^2), mean(c)) still on their device: the probe copies
        them with its statistics, in the pass's one transfer, and hands them back to
        ``fetched``, so that ``constants`` has nothing left to copy."""
        return [c for c in self._constants if isinstance(c, T) and not c.is_meta]

    def fetched(self, values: list[list[float]]) -> None:
        host = iter(values)
        self._constants = [tuple(next(host)) if isinstance(c, T) and not c.is_meta else c
                           for c in self._constants]

    # --- module calls (from the Recorder's hooks) ----------------------------------
    def enter(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.failed is not None:
            return
        if self._frames and self._frames[-1].opaque:
            self._frames.append(_Frame(index, True, ()))  # inside a module taken whole
            return
        with torch._C.DisableTorchFunction():
            tensors = _tensor_leaves(args, kwargs)
            primary = next((t for t in tensors if t.is_floating_point()), None)
            inputs = [self._lookup(primary)] if primary is not None else []
            inputs += [self._lookup(t) for t in tensors if t is not primary]
        ids = tuple(dict.fromkeys(n for n in inputs if n is not None))
        if primary is not None and inputs[0] is None:
            ids = (self._add(Node("unknown", reason="a tensor made outside the recorded "
                                  "operations", where=self._where())), *ids)
        self._frames.append(_Frame(index, _opaque(module), ids))
        if self._frames[-1].opaque and self._on_top():
            self._off = torch._C._pop_torch_function_stack()  # nothing inside is recorded

    def alias(self, source: torch.Tensor, alias: torch.Tensor) -> None:
        """The Recorder's alias of a module's input holds the input's values."""
        node = self._lookup(source) if self.failed is None else None
        if node is not None:
            self._bind(alias, node)

    def exit(self, output: Any) -> None:
        if self.failed is not None:
            return
        frame = self._frames.pop()
        if self._frames and self._frames[-1].opaque:
            return
        self._back_on()
        self._last = frame.index
        with torch._C.DisableTorchFunction():
            outputs = float_leaves(output)
            if not outputs:
                return
            if frame.opaque:
                node = self._add(Node("call", frame.inputs, index=frame.index))
                self._bind(outputs[0], node)
                for k, t in enumerate(outputs[1:], 1):
                    self._bind(t, self._add(Node(
                        "unknown", (node,), reason=f"output {k}, which is not measured",
                        where=("of", frame.index))))
            else:
                inner = self._lookup(outputs[0])
                inputs = (inner if inner is not None else -1, *frame.inputs[:1])
                self._bind(outputs[0], self._add(Node("exit", inputs, index=frame.index)))

    def _on_top(self) -> bool:
        """Whether this mode is the innermost one (a model may push its own)."""
        depth = torch._C._len_torch_function_stack()
        return depth > 0 and torch._C._get_function_stack_at(depth - 1) is self

    def _back_on(self) -> None:
        if self._off is not None:
            torch._C._push_on_torch_function_stack(self._off)
            self._off = None

    def __exit__(self, *exc):
        self._back_on()  # a module taken whole raised: its exit never came
        return super().__exit__(*exc)

    # --- operations ----------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.failed is not None or (self._frames and self._frames[-1].opaque):
            return func(*args, **kwargs)
        # An in-place op bumps its target's version: read the target's node before.
        target = args[0] if args and isinstance(args[0], T) and _in_place(func, kwargs) else None
        before = self._lookup(target) if target is not None else None
        out = func(*args, **kwargs)
        try:
            if before is not None:
                self._bind(target, before)
            self._record(func, args, kwargs, out)
        except Exception as exc:  # noqa: BLE001 -- bookkeeping must never break a model
            self.failed = f"{type(exc).__name__}: {exc}"
        return out

    def _record(self, func, args: tuple, kwargs: dict, out: Any) -> None:
        if func in IN_PLACE_WRITES:
            out = args[0]
        outs = _outputs(out)
        if not outs:
            if func in READS and self._lookup(args[0]) is not None:
                self.reads.append(self._where())
            return
        if func in ADD:
            node = self._add_node(args, kwargs, outs[0])
        elif func in MUL or func in DIV:
            node = self._scale_node(func in DIV, args, kwargs)
        elif func in CAT:
            node = self._cat_node(args, kwargs, outs[0], func is torch.stack)
        elif func in VIEWS:
            node = self._chain_node(args, 1.0)
        elif func in SLICES:
            node = self._slice_nodes(args, outs)
        elif func in ACTIVATIONS:
            node = self._activation_node(func, args, kwargs)
        elif func is F.dropout:
            node = self._dropout_node(args, kwargs)
        else:
            node = None
        if node == -1:
            return  # no activation among the inputs: a constant
        if isinstance(node, list):
            for t, n in zip(outs, node):
                self._bind(t, n)
            return
        if node is None:
            inputs = tuple(n for n in map(self._lookup, _tensor_leaves(args, kwargs))
                           if n is not None)
            if not inputs:
                return
            stops = torch.is_grad_enabled() and not any(t.requires_grad for t in outs)
            product = " of activations" if func in MUL or func in DIV else ""
            node = self._add(Node("unknown", inputs, reason=_name(func) + product, stops=stops,
                                  where=self._where()))
        for t in outs:
            self._bind(t, node)

    def _add_node(self, args, kwargs, out: torch.Tensor) -> int | None:
        other = _arg(args, kwargs, 1, "other", None)
        if not isinstance(args[0], T) or not isinstance(other, T):
            return None  # x + a number: its second moment needs E[x], which is not carried
        alpha = float(_arg(args, kwargs, 2, "alpha", 1))
        return self._linear([(args[0], 1.0, 1.0), (other, alpha * alpha, alpha)], out,
                            sum_backward=True)

    def _scale_node(self, divide: bool, args, kwargs) -> int | None:
        if divide and kwargs.get("rounding_mode") is not None:
            return None
        a, b = args[0], _arg(args, kwargs, 1, "other", None)
        na = self._lookup(a) if isinstance(a, T) else None
        nb = self._lookup(b) if isinstance(b, T) else None
        if na is None and nb is None:
            return -1
        if (na is not None and nb is not None) or (divide and na is None):
            return None  # a product of activations, or a constant over an activation
        node, c = (na, b) if na is not None else (nb, a)
        k = self._moments(c, invert=divide)
        if k is None:
            return None
        return self._add(Node("linear", (node,), forward=(1.0,), means=(1.0,), backward=(1.0,),
                              scale=k, where=self._where()))

    def _cat_node(self, args, kwargs, out: torch.Tensor, stack: bool) -> int | None:
        pieces = _arg(args, kwargs, 0, "tensors", ())
        total = out.numel()
        fractions = [t.numel() / total if not stack else 1 / len(pieces) for t in pieces]
        terms = [(t, f, f) for t, f in zip(pieces, fractions)]
        return self._linear(terms, out, sum_backward=False)

    def _linear(self, terms, out: torch.Tensor, sum_backward: bool) -> int | None:
        """sum_i f_i E[x_i^2] over activations plus f_j mean(c_j^2) over constants; the
        common means likewise with m_i. ``sum_backward``: an add (a broadcast input
        gets the sum of numel(out)/numel(in) gradients), else a concatenation."""
        inputs, fwd, means, bwd, const = [], [], [], [], []
        for t, f, m in terms:
            node = self._lookup(t) if isinstance(t, T) else None
            if node is not None:
                inputs.append(node)
                fwd.append(f)
                means.append(m)
                bwd.append(f * out.numel() / t.numel() if sum_backward else 1.0)
            else:
                c = self._moments(t) if isinstance(t, T) else None
                if c is None:
                    return None
                const.append((f, c, m))
        if not inputs:
            return -1
        return self._add(Node("linear", tuple(inputs), forward=tuple(fwd), means=tuple(means),
                              backward=tuple(bwd), const=tuple(const), cat=not sum_backward,
                              where=self._where()))

    def _chain_node(self, args, factor: float) -> int | None:
        node = self._lookup(args[0]) if isinstance(args[0], T) else None
        if node is None:
            return -1
        return self._add(Node("linear", (node,), forward=(1.0,), means=(1.0,),
                              backward=(factor,)))

    def _slice_nodes(self, args, outs: list[torch.Tensor]) -> list[int] | int | None:
        """One node per piece; its gradient reaches numel(piece)/numel(input) of the input."""
        if any(isinstance(i, T) for i in pytree.tree_leaves(list(args[1:]))):
            return None  # indexing by a tensor: a gather, which may repeat elements
        whole = max(args[0].numel(), 1)
        nodes = [self._chain_node(args, t.numel() / whole) for t in outs]
        if nodes[0] == -1:
            return -1
        if len(outs) == 1 and outs[0].numel() < whole:  # chunks and splits cover the whole
            self.nodes[nodes[0]].sparse = True
        return nodes

    def _activation_node(self, func, args, kwargs) -> int | None:
        node = self._lookup(args[0]) if isinstance(args[0], T) else None
        if node is None:
            return -1
        return self._add(Node("act", (node,), module=ACTIVATIONS[func](args, kwargs)))

    def _dropout_node(self, args, kwargs) -> int | None:
        node = self._lookup(args[0]) if isinstance(args[0], T) else None
        if node is None:
            return -1
        p = float(_arg(args, kwargs, 1, "p", 0.5))
        training = bool(_arg(args, kwargs, 2, "training", True))
        return self._add(Node("dropout", (node,), p=p if training else 0.0))

    def _moments(self, c: Any, invert: bool = False) -> int | None:
        """The index in ``constants()`` of (mean(c^2), mean(c)) (of 1/c with ``invert``)
        of a constant operand: a Python number, or a tensor that is not an activation (a
        parameter, a buffer, or one made from them), reduced on its device."""
        if isinstance(c, T) and not c.is_complex():
            with torch.no_grad():
                v = c.detach().to(torch.float64)
                v = v.reciprocal() if invert else v
                self._constants.append(torch.stack([v.square().mean(), v.mean()]))
        elif isinstance(c, (int, float)) and not isinstance(c, bool):
            v = (1 / c if c else math.inf) if invert else float(c)
            self._constants.append((v * v, v))
        else:
            return None
        return len(self._constants) - 1

    # --- identity of tensors -------------------------------------------------------
    def _add(self, node: Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def _bind(self, t: torch.Tensor, node: int) -> None:
        self._ids[id(t)] = (weakref.ref(t), t._version, node)

    def _lookup(self, t: torch.Tensor) -> int | None:
        """The node holding ``t``'s current value; None for a constant."""
        fn = t.grad_fn
        if (isinstance(fn, torch.autograd.function.BackwardCFunction)
                and type(fn).__name__ not in TRUSTED_FUNCTIONS):
            return self._custom_function(t, type(fn).__name__.removesuffix("Backward"))
        entry = self._ids.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        if entry[1] != t._version:
            node = self._add(Node("unknown", (entry[2],), reason="an in-place write the "
                                  "recording did not see", where=self._where()))
            self._bind(t, node)
            return node
        return entry[2]

    def _custom_function(self, t: torch.Tensor, name: str) -> int:
        entry = self._ids.get(id(t))
        known = entry is not None and entry[0]() is t and entry[1] == t._version
        if known and self.nodes[entry[2]].reason == f"{CUSTOM} {name}":
            return entry[2]
        if not known:  # its forward ran where the mode could not see which inputs it read
            self.unseen_function = self.unseen_function or name
        node = self._add(Node("unknown", (entry[2],) if known else (),
                              reason=f"{CUSTOM} {name}", where=self._where()))
        self._bind(t, node)
        return node

    def _where(self) -> tuple[str, int] | None:
        open_frames = [f for f in self._frames if not f.opaque]
        if open_frames:
            return "in", open_frames[-1].index
        return None if self._last is None else ("after", self._last)


def _in_place(func, kwargs: dict) -> bool:
    name = getattr(func, "__name__", "")
    return ((name.endswith("_") and not name.endswith("__")) or name in IN_PLACE_DUNDERS
            or kwargs.get("inplace") is True)


def _opaque(module: nn.Module) -> bool:
    """Taken whole: torch.nn's own modules and leaves. A user's container that owns a
    parameter (a SkipInit alpha, a position embedding) is followed inside."""
    return (next(module.children(), None) is None
            or type(module).__module__.startswith("torch.nn."))


def _tensor_leaves(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    if not kwargs and len(args) == 1 and isinstance(args[0], T):
        return [args[0]]
    return [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, T)]


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, T):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for t in out if isinstance(t, T)]
    return []


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


# =====================================================================================
# Propagation
# =====================================================================================

@dataclass
class _Value:
    """A node's predicted second moment, or why there is none (``broken``)."""

    signal: Signal | None
    broken: str | None = None
    note: str | None = None
    at: int = -1  # the node where ``note`` was made: the latest carry names the value
    mu: float = 0.0  # the mean every element shares (after a rectifier), not a unit's own


@dataclass
class _Grad:
    var: float = 0.0
    broken: str | None = None
    note: str | None = None
    sparse: bool = False  # it reaches only a slice of the positions (a class token)


@dataclass
class _LayerGraph:
    """What the graph says about one recorded call."""

    input: _Value | None = None
    forward: float | None = None
    forward_break: str | None = None
    forward_note: str | None = None
    grad: float | None = None
    grad_input: float | None = None
    backward_break: str | None = None
    backward_note: str | None = None


def annotate(report: Report, modules: list[nn.Module], recording: Recording | None,
             measured: bool = True, values: theory.Values | None = None) -> Report:
    """Replace the chain prediction by the graph one where the graph was followed.

    ``measured``: False for the closed-form ``predict``, where the chain carries nothing
    past what it cannot see (a residual add): a layer the graph cannot follow gets no
    prediction, with the reason, instead of the chain's. ``values``: as for
    propagate.annotate.
    """
    if recording is None or not report.layers:
        return report
    reason = _unusable(recording)
    if reason is not None:
        report.notes.append(f"graph: not used ({reason}); predictions follow the chain")
        return report
    walk = _Walk(report, modules, recording, measured, values)
    walk.forward()
    walk.backward()
    walk.assign()
    report.summary.forward_ratio, report.summary.backward_ratio = propagate.end_to_end(report)
    return report


def _unusable(recording: Recording) -> str | None:
    if recording.compiled is not None:
        return f"{recording.compiled} is a torch.compile'd submodule, which the recording " \
               "cannot look into"
    if recording.failed is not None:
        return f"the recording failed: {recording.failed}"
    if not recording.nodes:
        return "nothing was recorded"
    return None


class _Walk:
    def __init__(self, report: Report, modules: list[nn.Module], recording: Recording,
                 measured: bool = True, values: theory.Values | None = None):
        self.report, self.modules, self.rec = report, modules, recording
        self.measured, self.host = measured, values
        self.nodes = recording.nodes
        self.constants = recording.constants()
        self.values: list[_Value] = []
        self.layers: dict[int, _LayerGraph] = {}
        self.backward_gains: dict[int, float | None] = {}  # node -> E[f'(y)^2]

    # --- forward -------------------------------------------------------------------
    def forward(self) -> None:
        for k, node in enumerate(self.nodes):
            value = self._forward(node)
            if value.note is not None and value.at < 0:
                value.at = k
            self.values.append(value)

    def _forward(self, node: Node) -> _Value:
        ins = [self.values[i] if i >= 0 else _Value(None, "an output made outside the "
                                                       "recorded operations")
               for i in node.inputs]
        broken = next((v.broken for v in ins if v.broken), None)
        latest = max(ins, key=lambda v: v.at if v.note else -2, default=None)
        note, at = (latest.note, latest.at) if latest is not None else (None, -1)
        if node.op == "input":
            return self._input(node)
        if node.op == "call":
            return self._call(node, ins)
        if node.op == "exit":
            return self._exit(node, ins)
        if node.op == "unknown":  # a custom Function names itself, not its inner ops
            own = self._reason(node)
            return _Value(None, own if node.reason.startswith(CUSTOM) else broken or own)
        if broken:
            return _Value(None, broken)
        if node.op == "linear" and (valueless := self._no_value(node)):
            return _Value(None, valueless)
        s, mu = ins[0].signal, ins[0].mu
        if node.op == "act":
            out = self._activate(node.module, s, mu, len(self.values))
            if out is None:
                return _Value(None, f"F.{type(node.module).__name__} at q={s.m2:.3g}")
            return _Value(out[0], None, note, at, out[1])
        if node.op == "dropout":
            if node.p >= 1:
                return _Value(None, "dropout with p = 1")
            signal = Signal(s.m2 / (1 - node.p), s.mean_share * (1 - node.p))
            return _Value(signal, None, note, at, mu)
        signal, mu = self._linear(node, ins)
        return _Value(signal, None, note, at, mu)

    def _linear(self, node: Node, ins: list[_Value]) -> tuple[Signal, float]:
        m2_scale, mean_scale = (1.0, 1.0) if node.scale is None else self.constants[node.scale]
        fixed = sum(f * self.constants[c][0] for f, c, _ in node.const)
        mu = sum(m * self.constants[c][1] for _, c, m in node.const)
        spread = shared = 0.0
        for f, m, v in zip(node.forward, node.means, ins):
            spread += f * v.signal.m2
            shared += f * v.signal.m2 * v.signal.mean_share
            mu += m * v.mu
        share = (shared + fixed) / (spread + fixed) if spread + fixed > 0 else 0.0
        return Signal(m2_scale * (spread + fixed), min(1.0, share)), mean_scale * mu

    def _activate(self, module: nn.Module, s: Signal, mu: float,
                  k: int) -> tuple[Signal, float] | None:
        """An elementwise activation of y with E[y^2] = q and common mean mu (every unit
        shifted alike, as after a rectifier passed on by a residual add): E[f(y)^2] and
        E[f(y)] by quadrature over y = mu + N(0, q - mu^2); the closed forms of theory
        when mu is 0. The backward gain E[f'(y)^2] is kept for the backward pass."""
        if mu * mu <= CENTRED * s.m2:
            g = theory.forward_gain(module, s.m2, self.host)
            if g is None:
                return None
            self.backward_gains[k] = theory.backward_gain(module, s.m2, self.host)
            share = propagate._activation_share(module, s.m2, g, self.host)
            return Signal(g * s.m2, share), _activation_mean(module, s.m2, 0.0)
        var = s.m2 - mu * mu
        if var <= 0:
            return None
        if isinstance(module, RECTIFIERS):
            mean, m2, self.backward_gains[k] = theory.rectified_moments(
                theory.prelu_slope(module), mu, var)
            return Signal(m2, min(1.0, mean * mean / m2) if m2 > 0 else 0.0), mean
        try:
            kinks = tuple(b - mu for b in (0.0, *theory._breakpoints(module)))
            m2 = theory.expectation(lambda y: _apply(module, y + mu) ** 2, var, kinks)
            mean = _activation_mean(module, var, mu)
            self.backward_gains[k] = theory.expectation(
                lambda y: _slope(module, y + mu) ** 2, var, kinks)
        except Exception:  # noqa: BLE001 -- a module that cannot run on a vector of points
            return None
        return Signal(m2, min(1.0, mean * mean / m2) if m2 > 0 else 0.0), mean

    def _input(self, node: Node) -> _Value:
        if node.index != 0:
            return _Value(None, "a network input after the first, which is not measured")
        start, note = propagate._start(self.report)
        if start is None:
            return _Value(None, "the network input is not a float tensor")
        return _Value(start, None, note, -1, self.report.input.mean or 0.0)

    def _call(self, node: Node, ins: list[_Value]) -> _Value:
        k, i = len(self.values), node.index
        layer, module = self.report.layers[i], self.modules[i]
        info = self.layers.setdefault(i, _LayerGraph())
        src = ins[0] if ins else None
        note = src.note if src else None
        if src is not None and src.broken:
            m_in = propagate._measured_m2(layer.input)
            reset = propagate.reset(module, self.host) if m_in is None else None
            if reset is not None:  # a norm sets the scale whatever its input was
                info.input, info.forward = _Value(None, src.broken), reset.m2
                info.forward_note = (f"{layer.type} at {layer.label} resets an unknown input "
                                     f"({src.broken}), its E[x²] taken to be ≫ eps")
                return _Value(reset, None, info.forward_note, k,
                              _mean_after(module, 0.0, self.host))
            info.forward_break = src.broken
            src = _Value(Signal(m_in, propagate._share(layer.input)) if m_in is not None
                         else None, None, f"carried the measured input of {layer.label}",
                         -1, (layer.input.mean if layer.input else None) or 0.0)
            note = src.note
        info.input = src
        w = propagate._actual(layer, module) if layer.kind == "weight" else None
        s_in = src.signal if src is not None else None
        mu = src.mu if src is not None else 0.0
        if layer.kind == "activation" and s_in is not None:
            out = self._activate(module, s_in, mu, k)
            out, mu = out if out is not None else (None, 0.0)
        else:
            out = (propagate._step_forward(layer, module, s_in, w, self.host)
                   if s_in is not None or isinstance(module, nn.Embedding) else None)
            mu = _mean_after(module, mu, self.host)
        if out is not None:
            info.forward = out.m2
            info.forward_note = _join(note, w.note if w else None)
            return _Value(out, None, note, src.at if src is not None else -1, mu)
        return self._carry_output(layer, info, "no closed form" if s_in is not None
                                  else "its input is unknown", info.forward_break)

    def _exit(self, node: Node, ins: list[_Value]) -> _Value:
        layer = self.report.layers[node.index]
        info = self.layers.setdefault(node.index, _LayerGraph())
        info.input = ins[1] if len(ins) > 1 else None
        inner = ins[0]
        if inner.broken:
            info.forward_break = inner.broken
            return self._carry_output(layer, info, None)
        info.forward = inner.signal.m2
        info.forward_note = inner.note
        return inner

    def _carry_output(self, layer: Layer, info: _LayerGraph, why: str | None,
                      root: str | None = None) -> _Value:
        """Continue from the measured output of a call the graph cannot step through;
        with nothing measured, the value stays broken by ``root`` (what broke its input)
        or by this call."""
        m_out = propagate._measured_m2(layer.forward)
        what = f"{layer.type} at {layer.label}"
        if m_out is None:
            return _Value(None, root or f"{what} ({why or 'not followed'}; nothing measured)")
        info.forward_note = f"{why} for {what}" if why else None
        return _Value(Signal(m_out, propagate._share(layer.forward)), None,
                      f"carried the measured output of {what}", -1, layer.forward.mean or 0.0)

    # --- backward ------------------------------------------------------------------
    def backward(self) -> None:
        if self.rec.unseen_function is not None:
            reason = f"custom autograd Function {self.rec.unseen_function}, whose inputs " \
                     "the recording did not see"
            for info in self.layers.values():
                info.backward_break = reason
            return
        grads: list[_Grad | None] = [None] * len(self.nodes)
        self._seed(grads)
        for k in reversed(range(len(self.nodes))):
            if grads[k] is not None:
                self._backward(k, self.nodes[k], grads[k], grads)

    def _seed(self, grads: list[_Grad | None]) -> None:
        for position, k in enumerate(self.rec.outputs):
            if k is None:
                continue
            node = self.nodes[k]
            layer = self.report.layers[node.index] if node.op in ("call", "exit") else None
            if layer is not None and layer.backward is not None and layer.backward.var is not None:
                _flow(grads, k, _Grad(layer.backward.var))
            elif position == 0 and self.rec.cotangent_var is not None:
                _flow(grads, k, _Grad(self.rec.cotangent_var))
            else:
                _flow(grads, k, _Grad(0.0, "the gradient at the model's output (not measured)"))

    def _backward(self, k: int, node: Node, g: _Grad, grads: list[_Grad | None]) -> None:
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
                    _flow(grads, i, _Grad(0.0, g.broken or self._reason(node)))
        elif node.op == "act":
            gain = self.backward_gains.get(k)
            _flow(grads, node.inputs[0], _Grad(g.var * gain, g.broken, g.note, g.sparse) if gain
                  is not None else _Grad(0.0, g.broken or f"F.{type(node.module).__name__}"))
        elif node.op == "dropout":
            _flow(grads, node.inputs[0], _Grad(g.var / (1 - node.p), g.broken, g.note,
                                               g.sparse))
        elif node.op == "linear":
            if valueless := self._no_value(node, backward=True):
                for i in node.inputs:
                    _flow(grads, i, _Grad(0.0, g.broken or valueless))
                return
            scale = 1.0 if node.scale is None else self.constants[node.scale][0]
            for i, b in zip(node.inputs, node.backward):
                broken = g.broken or (f"a concatenation{self._place(node.where)} whose "
                                      "gradient reaches only a slice" if node.cat and g.sparse
                                      else None)
                _flow(grads, i, _Grad(g.var * b * scale, broken, g.note,
                                      g.sparse or node.sparse))

    def _at_output(self, node: Node, g: _Grad) -> _Grad:
        """Record the call's gradient; where the graph broke, carry the measured one."""
        layer = self.report.layers[node.index]
        info = self.layers.setdefault(node.index, _LayerGraph())
        if g.broken is None:
            info.grad, info.backward_note = g.var, g.note
            return g
        info.backward_break = g.broken
        measured = layer.backward.var if layer.backward is not None else None
        if measured is None:
            return g
        return _Grad(measured, None, f"carried the measured gradient at {layer.label}",
                     g.sparse)

    def _call_backward(self, k: int, node: Node, g: _Grad, grads: list[_Grad | None]) -> None:
        i = node.index
        layer, module = self.report.layers[i], self.modules[i]
        info = self.layers[i]
        if not node.inputs:
            return
        w = propagate._actual(layer, module) if layer.kind == "weight" else None
        s_in = info.input.signal if info.input is not None else None
        if g.broken is not None:
            dx = None
        elif k in self.backward_gains:  # an activation, at its own (shifted) input
            gain = self.backward_gains[k]
            dx = None if gain is None else g.var * gain
        elif self._pieces_normalized(node, module, g, grads):
            return
        elif g.sparse and isinstance(module, propagate.FEATURE_NORMS):
            dx = None  # each position has its own scale: the average one does not apply
        else:
            dx = propagate._step_backward(layer, module, g.var, s_in, w, self.host)
        if dx is not None:
            info.grad_input = dx
            out = _Grad(dx, None, g.note, g.sparse)
        elif layer.backward_input is not None and layer.backward_input.var is not None:
            out = _Grad(layer.backward_input.var, None,
                        f"carried the measured input gradient of {layer.type} at {layer.label}",
                        g.sparse and layer.kind != "weight")
        else:
            why = "its input is unknown" if s_in is None else "no closed form"
            out = _Grad(0.0, g.broken or f"the backward of {layer.type} at {layer.label} "
                        f"({why}, nothing measured)")
        _flow(grads, node.inputs[0], out)
        for k in node.inputs[1:]:
            _flow(grads, k, _Grad(0.0, f"the gradient into another input of {layer.label} "
                                  "(not measured)"))

    def _pieces_normalized(self, node: Node, module: nn.Module, g: _Grad,
                           grads: list[_Grad | None]) -> bool:
        """BatchNorm (train) of a concatenation: each channel's gradient is scaled by
        gamma^2 over its own variance, so each piece gets mean(gamma^2)/(Var_j + eps)
        of the output gradient rather than one factor for the whole (DenseNet)."""
        source = self.nodes[node.inputs[0]]
        while source.op == "linear" and not source.cat and _is_view(source):
            source = self.nodes[source.inputs[0]]
        if (source.op != "linear" or not source.cat or len(node.inputs) > 1
                or not isinstance(module, propagate.BATCH_NORMS)
                or propagate._uses_running_stats(module)
                or any(self.values[piece].signal is None for piece in source.inputs)):
            return False  # a piece the walk has no value for: the whole-tensor rule
        gamma, _ = propagate._affine(module, self.host)
        g2 = sum(c * c for c in gamma) / len(gamma)
        eps = propagate._norm_eps(module)
        total = 0.0
        for piece, fraction in zip(source.inputs, source.forward):
            s = self.values[piece].signal
            dx = g.var * g2 / (s.m2 * (1 - s.mean_share) + eps)
            total += fraction * dx
            _flow(grads, piece, _Grad(dx, None, g.note))
        self.layers[node.index].grad_input = total
        return True

    # --- predictions ---------------------------------------------------------------
    def assign(self) -> None:
        fell_back: dict[str, list[Layer]] = {}
        backward_from_chain: dict[str, list[Layer]] = {}
        for i, info in sorted(self.layers.items()):
            layer = self.report.layers[i]
            if info.forward_break is not None:
                if layer.kind == "weight":
                    fell_back.setdefault(info.forward_break, []).append(layer)
                if self.measured:
                    continue
            if info.grad is None and info.backward_break is not None and layer.kind == "weight":
                backward_from_chain.setdefault(info.backward_break, []).append(layer)
            layer.predicted = self._prediction(layer, info)
        if not self.measured:
            self._unfollowed()
            self._stops("forward", fell_back)
            self._stops("backward", backward_from_chain)
        for reason, layers in fell_back.items() if self.measured else ():
            basis = layers[0].predicted.basis if layers[0].predicted else "chain"
            self.report.notes.append(f"graph: fell back to {basis} at {_labels(layers)}: "
                                     f"it could not follow {reason}")
        for reason, layers in backward_from_chain.items() if self.measured else ():
            self.report.notes.append(f"graph: backward from the chain at {_labels(layers)}: "
                                     f"it could not follow {reason}")
        if self.rec.reads:
            where = self._place(self.rec.reads[0])
            self.report.notes.append(f"graph: the control flow read an activation{where}; "
                                     "the graph is the branch this input took")

    def _unfollowed(self) -> None:
        """Closed form only: a call the graph never saw (inside a module it takes whole)
        has no prediction; the chain would walk past the structure around it."""
        for i, layer in enumerate(self.report.layers):
            if i not in self.layers:
                layer.predicted = Prediction(None, None, basis="graph", note=(
                    "not on the recorded graph (inside a module taken whole)"))

    def _stops(self, what: str, by_reason: dict[str, list[Layer]]) -> None:
        """Closed form only: where the prediction stops, and the first reason why."""
        if not by_reason:
            return
        reason = next(iter(by_reason))
        layers = sorted((x for xs in by_reason.values() for x in xs), key=lambda x: x.index)
        more = "; other layers name their own reason" if len(by_reason) > 1 else ""
        self.report.notes.append(
            f"graph: no {what} prediction at {_labels(layers)}: the graph could not follow "
            f"{reason}, and nothing is measured in a closed-form prediction{more}")

    def _prediction(self, layer: Layer, info: _LayerGraph) -> Prediction:
        chain = layer.predicted if self.measured else None
        notes = [f"forward: {info.forward_note}" if info.forward_note else None]
        if info.forward_break is not None:  # closed form only: nothing to carry
            notes = [f"forward: none; the graph could not follow {info.forward_break}"]
        backward, backward_input = info.grad, info.grad_input
        if backward is None and info.backward_break is not None:
            backward = chain.backward_var if chain else None
            backward_input = chain.backward_input_var if chain else None
            basis = "from the chain" if self.measured else "none"
            notes.append(f"backward: {basis}; the graph could not follow "
                         f"{info.backward_break}")
        elif info.backward_note:
            notes.append(f"backward: {info.backward_note}")
        source = info.input.signal if info.input is not None else None
        return Prediction(forward_var=info.forward, backward_var=backward, basis="graph",
                          note=_join(*notes), backward_input_var=backward_input,
                          input_var=None if source is None else source.m2)

    # --- messages ------------------------------------------------------------------
    def _no_value(self, node: Node, backward: bool = False) -> str | None:
        """Why a linear node's constant factor (or, forward, added constant) is unknown:
        a tensor on the meta device has no values."""
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


def _is_view(node: Node) -> bool:
    return (len(node.inputs) == 1 and node.forward == (1.0,) and node.backward == (1.0,)
            and not node.const and node.scale is None)


def _apply(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module.forward(y.clone()).to(torch.float64)


def _slope(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        leaf = y.clone().requires_grad_(True)
        (dy,) = torch.autograd.grad(module.forward(leaf * 1.0).sum(), leaf)
    return dy.to(torch.float64)


def _activation_mean(module: nn.Module, var: float, mu: float) -> float:
    """E[f(mu + N(0, var))]: the mean an activation gives every unit."""
    if var <= 0:
        return 0.0
    if isinstance(module, RECTIFIERS):
        return theory.rectified_moments(theory.prelu_slope(module), mu, var)[0]
    try:
        kinks = tuple(b - mu for b in (0.0, *theory._breakpoints(module)))
        return theory.expectation(lambda y: _apply(module, y + mu), var, kinks)
    except Exception:  # noqa: BLE001 -- no mean known: treat the output as centred
        return 0.0


def _mean_after(module: nn.Module, mu: float, values: theory.Values | None = None) -> float:
    """The common mean after a module other than an activation: kept by dropout and
    identities, mean(beta) after a norm, lost (random signs per unit) elsewhere."""
    if isinstance(module, (*propagate.DROPOUTS, *propagate.IDENTITY_LIKE)):
        return mu
    if isinstance(module, (*propagate.BATCH_NORMS, *propagate.FEATURE_NORMS)):
        beta = propagate._affine(module, values)[1]
        return sum(beta) / len(beta)
    return 0.0


def _flow(grads: list[_Grad | None], k: int, g: _Grad) -> None:
    """Add one consumer's contribution: independent gradients add their variances."""
    if k < 0:
        return
    have = grads[k]
    if have is None:
        grads[k] = dataclasses.replace(g)
        return
    have.var += g.var
    have.broken = have.broken or g.broken
    have.sparse = have.sparse or g.sparse
    have.note = have.note or g.note


def _labels(layers: list[Layer]) -> str:
    more = f" and {len(layers) - 1} later weight layer(s)" if len(layers) > 1 else ""
    return layers[0].label + more
