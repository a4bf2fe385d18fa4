"""The dataflow of the forward pass, recorded while it runs.

During the probe's own eager forward a TorchFunctionMode (``Recording``) follows
activations by identity (``id`` checked with a weakref, and ``_version`` so that in-place
writes and reused ids are caught) from the network input through the recorded module
calls (the Recorder tells it where each call starts and ends) and the operations between
them: residual adds, concatenations, multiplications by constants, views and slices,
functional activations and dropout. Any other operation on an activation becomes an
"unknown" node; so does the output of a custom ``autograd.Function`` (its backward is
its own) and a tensor written in place by something the mode did not see. Inside a
module varprobe has a closed form for, or one without children, the module is a single
node and its own operations are not followed. Nodes keep ids and small facts; what they
mean is the walk's business (theory.walk).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from varprobe import transfer
from varprobe.recorder import float_leaves
from varprobe.theory import catshare, functional, normshape, positions, tokenids, tokennorm
from varprobe.theory.attention_graph import BADDBMMS, MATMULS, SOFTMAXES, AttentionGraph
from varprobe.theory.constants import Constants
from varprobe.theory.nodes import (
    ACTIVATIONS,
    ADD,
    CAT,
    CUSTOM,
    DIV,
    EXPANDS,
    IN_PLACE_WRITES,
    KERNELS,
    MUL,
    NEGATIONS,
    POOLS,
    READS,
    SLICES,
    TRUSTED_FUNCTIONS,
    VIEWS,
    Attention,
    Node,
    T,
    _arg,
    _name,
    in_place,
    output_tensors,
    tensor_leaves,
)
from varprobe.theory.pools import Pool
from varprobe.theory.shared import over_positions

PRODUCT = " of activations"  # the name of a product of two activations ends so


@dataclass
class _Frame:
    index: int
    opaque: bool
    inputs: tuple[int, ...]
    attn: Attention | None = None
    rotary: bool = False


class Recording(TorchFunctionMode):
    """Active around the forward pass only; the Recorder calls ``enter``/``exit``."""

    def __init__(self, model: nn.Module, init_log: Any = None):
        super().__init__()
        self.init_log = init_log  # varprobe.initlog.Log: a meta parameter's recorded init
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
        self._constants = Constants()
        self.norm_shapes: dict[int, int] = {}  # BatchNorm call -> its theory.normshape pairs
        self.token_norms, self.token_scales = {}, {}  # theory.tokennorm: slots, scales
        self.cat_shares: dict[int, int] = {}  # torch.cat node -> theory.catshare slots
        self.same_ids: dict[int, int] = {}  # embedding call -> theory.tokenids slot
        self.value_of = None  # a meta tensor's value, where one is known (metavalues)
        self.compiled = next((name for name, m in model.named_modules()
                              if type(m).__name__ == "OptimizedModule"), None)
        self._graph = AttentionGraph(self, model)  # SDPA, eager attention, x @ W

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
        self._graph.pending.clear()  # eager chains hold their q, k and p by reference

    def constants(self) -> list[tuple[float, float] | None]:
        """(mean(c^2), mean(c)) of every constant operand: one host transfer, after the pass.
        None for a tensor on the meta device (``varprobe predict``): it has no values."""
        return self._constants.host()

    def on_device(self) -> list[transfer.Pending]:
        """The constants still on their device, as Pendings (``Constants.on_device``)."""
        return self._constants.on_device()

    def fetched(self, rows: list[list]) -> None:
        self._constants.fetched(rows)

    # --- module calls (from the Recorder's hooks) ----------------------------------
    def enter(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.failed is not None:
            return
        self._graph.enter(index, module, args)
        if self._frames and self._frames[-1].opaque:
            self._frames.append(_Frame(index, True, ()))  # inside a module taken whole
            return
        try:
            with torch._C.DisableTorchFunction():
                tensors = tensor_leaves(args, kwargs)
                primary = next((t for t in tensors if t.is_floating_point()), None)
                inputs = [self._lookup(primary)] if primary is not None else []
                inputs += [self._lookup(t) for t in tensors if t is not primary]
                if normshape.wanted(module, primary):
                    self.norm_shapes[index] = len(self._constants)
                    self._constants.extend(normshape.measure(module, primary))
                tokennorm.enter(self, index, module, primary)
                tokenids.enter(self, index, module, tensors, self.value_of)
        except Exception as exc:  # noqa: BLE001 -- bookkeeping must never break a model
            self.failed = f"{type(exc).__name__}: {exc}"
            return
        ids = tuple(dict.fromkeys(n for n in inputs if n is not None))
        if primary is not None and inputs[0] is None:
            ids = (self._add(Node("unknown", reason="a tensor made outside the recorded "
                                  "operations", where=self._where())), *ids)
        attn = self._graph.multihead(module, args, kwargs) \
            if isinstance(module, nn.MultiheadAttention) else None
        self._frames.append(_Frame(index, _opaque(module), ids, attn,
                                   "Rotary" in type(module).__name__))
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
            tokennorm.leave(self, frame.index, outputs[0])
            if frame.opaque and frame.rotary and len(outputs) == 2:
                # a rotary embedding's (cos, sin) tables: what they multiply keeps its
                # second moment whatever the angles, as cos² + sin² = 1 (theory.walk)
                for t in outputs:
                    self._bind(t, self._add(Node("table", (), index=frame.index)))
            elif frame.opaque:
                node = self._add(Node("call", frame.inputs, index=frame.index,
                                      attn=frame.attn))
                self._bind(outputs[0], node)
                self._graph.module_step(frame.index, frame.inputs, node, outputs[0])
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
        target = args[0] if args and isinstance(args[0], T) and in_place(func, kwargs) else None
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
        outs = output_tensors(out)
        self._graph.made(func, args, out)
        if not outs:
            if func in READS and self._lookup(args[0]) is not None:
                self.reads.append(self._where())
            return
        if func in ADD:
            node = self._add_node(args, kwargs, outs[0])
        elif func in MUL or func in DIV:
            node = self._scale_node(func, args, kwargs, outs[0])
        elif func in CAT:
            node = self._cat_node(args, kwargs, outs[0], func is torch.stack)
        elif func in VIEWS:
            node = self._chain_node(args, 1.0, outs[0])
        elif func in EXPANDS:  # copies: each gathers its copies' gradients
            node = self._chain_node(args, outs[0].numel() / max(args[0].numel(), 1), outs[0])
        elif func in NEGATIONS:
            node = self._chain_node(args, 1.0, outs[0], mean=-1.0)
        elif func in SLICES:
            node = self._slice_nodes(func, args, outs)
        elif func in ACTIVATIONS:
            node = self._activation_node(func, args, kwargs)
        elif func is F.dropout:
            node = self._dropout_node(args, kwargs)
        elif func in POOLS:
            node = self._pool_node(func, args, kwargs, outs[0])
        elif func is F.scaled_dot_product_attention:
            node = self._graph.sdpa(args, kwargs, outs[0])
        elif func in BADDBMMS:
            node = self._graph.baddbmm(args, kwargs, outs[0])
        elif func in MATMULS:
            node = self._graph.matmul(func, args, kwargs, outs[0])
        elif func in functional.LINEARS:
            node = functional.linear(self, func, args, kwargs)
        elif func is F.embedding:
            node = functional.embedding(self, args, kwargs)
        elif func in SOFTMAXES:
            node = self._graph.softmax(func, args, kwargs, outs[0])
        else:
            node = None
        if node == -1:
            return  # no activation among the inputs: a constant
        if isinstance(node, list):
            for t, n in zip(outs, node):
                self._bind(t, n)
            return
        if node is None:
            inputs = tuple(n for n in map(self._lookup, tensor_leaves(args, kwargs))
                           if n is not None)
            if not inputs:
                return
            stops = torch.is_grad_enabled() and not any(t.requires_grad for t in outs)
            product = PRODUCT if func in MUL or func in DIV else ""
            node = self._add(Node("unknown", inputs, reason=_name(func) + product, stops=stops,
                                  where=self._where()))
        self._graph.carry(func, args, kwargs, node, outs[0])  # eager attention's steps
        self._graph.selection(func, args, kwargs, node)  # a position bias put in a mask
        for t in outs:
            self._bind(t, node)

    def _add_node(self, args, kwargs, out: torch.Tensor) -> int | None:
        other = _arg(args, kwargs, 1, "other", None)
        if not isinstance(args[0], T) or not isinstance(other, T):
            return None  # x + a number: its second moment needs E[x], which is not carried
        alpha = float(_arg(args, kwargs, 2, "alpha", 1))
        node = self._lookup(args[0])
        if node is not None and node == self._lookup(other) and args[0].shape == other.shape:
            c = 1.0 + alpha  # x + x: one tensor twice, (1 + alpha)^2 its second moment
            return self._add(Node("linear", (node,), forward=(c * c,), means=(c,),
                                  backward=(c * c,), where=self._where()))
        return self._linear([(args[0], 1.0, 1.0), (other, alpha * alpha, alpha)], out,
                            sum_backward=True)

    def _scale_node(self, func, args, kwargs, out: torch.Tensor) -> int | None:
        divide = func in DIV
        if divide and kwargs.get("rounding_mode") is not None:
            return None
        a, b = args[0], _arg(args, kwargs, 1, "other", None)
        na = self._lookup(a) if isinstance(a, T) else None
        nb = self._lookup(b) if isinstance(b, T) else None
        if na is None and nb is None:
            return -1
        if (na is not None and nb is not None and not divide
                and self._root(na) != self._root(nb)):
            # a gate or a GLU: two factors from different branches (theory.walk: their
            # moments multiply); a broadcast factor collects its positions' gradients
            return self._add(Node("product", (na, nb), reason=_name(func) + PRODUCT,
                                  backward=(out.numel() / max(a.numel(), 1),
                                            out.numel() / max(b.numel(), 1)),
                                  positions=(over_positions(a, out), over_positions(b, out)),
                                  where=self._where()))
        if (na is not None and nb is not None) or (divide and na is None):
            return None  # a tensor times itself, or a constant over an activation
        node, c = (na, b) if na is not None else (nb, a)
        k = self._moments(c, invert=divide)
        if k is None:
            return None
        return self._add(Node("linear", (node,), forward=(1.0,), means=(1.0,), backward=(1.0,),
                              scale=k, learned=isinstance(c, T) and c.requires_grad,
                              where=self._where()))

    def _root(self, k: int) -> int:
        """The node ``k`` was made from by elementwise ops of one input (activations,
        views, scalings): two factors with one root are not independent (x·sigmoid(x))."""
        while self.nodes[k].op in ("act", "linear", "dropout") and len(self.nodes[k].inputs) == 1:
            k = self.nodes[k].inputs[0]
        return k

    def _cat_node(self, args, kwargs, out: torch.Tensor, stack: bool) -> int | None:
        pieces = _arg(args, kwargs, 0, "tensors", ())
        total = out.numel()
        fractions = [t.numel() / total if not stack else 1 / len(pieces) for t in pieces]
        node = self._linear([(t, f, f) for t, f in zip(pieces, fractions)], out, False)
        if not stack:
            catshare.watch(self, node, pieces, dim := _arg(args, kwargs, 1, "dim", 0), out)
            if node is not None and node >= 0:
                self.nodes[node].lead = positions.cat_lead(pieces, dim, out, self._lookup)
        return node

    def _linear(self, terms, out: torch.Tensor, sum_backward: bool) -> int | None:
        """sum_i f_i E[x_i^2] over activations plus f_j mean(c_j^2) over constants; the
        common means likewise with m_i. ``sum_backward``: an add (a broadcast input
        gets the sum of numel(out)/numel(in) gradients), else a concatenation."""
        inputs, fwd, means, bwd, const, tails, own = [], [], [], [], [], [], []
        for t, f, m in terms:
            if isinstance(t, T) and t.numel() == 0:
                continue  # an empty piece (a key cache before its first entry) adds nothing
            node = self._lookup(t) if isinstance(t, T) else None
            if node is not None:
                inputs.append(node)
                fwd.append(f)
                means.append(m)
                bwd.append(f * out.numel() / t.numel() if sum_backward else 1.0)
                tails.append(positions.tails(t, out))
            else:
                c = self._moments(t) if isinstance(t, T) else None
                if c is None:
                    return None
                const.append((f, c, m))
                own.append(positions.varies(t, out))
        if not inputs:
            return -1
        return self._add(Node("linear", tuple(inputs), forward=tuple(fwd), means=tuple(means),
                              backward=tuple(bwd), const=tuple(const), cat=not sum_backward,
                              where=self._where(), tails=tuple(tails), own=tuple(own)))

    def _chain_node(self, args, factor: float, out: T, mean: float = 1.0) -> int | None:
        node = self._lookup(args[0]) if isinstance(args[0], T) else None
        if node is None:
            return -1
        return self._add(Node("linear", (node,), forward=(1.0,), means=(mean,),
                              backward=(factor,), tails=(positions.tails(args[0], out),)))

    def _slice_nodes(self, func, args, outs: list[torch.Tensor]) -> list[int] | int | None:
        """One node per piece; its gradient reaches numel(piece)/numel(input) of the input."""
        if any(isinstance(i, T) for i in pytree.tree_leaves(list(args[1:]))):
            return None  # indexing by a tensor: a gather, which may repeat elements
        whole = max(args[0].numel(), 1)
        nodes = [self._chain_node(args, t.numel() / whole, t) for t in outs]
        if nodes[0] == -1:
            return -1
        if len(outs) == 1 and outs[0].numel() < whole:  # chunks and splits cover the whole
            self.nodes[nodes[0]].sparse = True
            self.nodes[nodes[0]].pick = positions.picked(func, args, outs[0])
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

    def _pool_node(self, func, args, kwargs, out: torch.Tensor) -> int | None:
        x = args[0] if args and isinstance(args[0], T) else None
        node = self._lookup(x) if x is not None else None
        if node is None:
            return -1
        kind = POOLS[func]
        if kind == "pad" and (_arg(args, kwargs, 2, "mode", "constant") != "constant"
                              or _arg(args, kwargs, 3, "value", None)):
            return None  # reflected or replicated borders, or a non-zero fill
        if kind == "nearest" and _arg(args, kwargs, 3, "mode", "nearest") != "nearest":
            return None
        fraction = out.numel() / max(x.numel(), 1)
        window = 1 / fraction if fraction else 1.0
        if func in KERNELS:
            kernel = _arg(args, kwargs, 1, "kernel_size", 1)
            window = float(math.prod(kernel) if isinstance(kernel, (tuple, list))
                           else kernel ** max(x.dim() - 2, 1))
        return self._add(Node("pool", (node,), reason=_name(func), where=self._where(),
                              pool=Pool(kind, window, fraction)))

    def _moments(self, c: Any, invert: bool = False) -> int | None:
        """The index in ``constants()`` of (mean(c^2), mean(c)) (of 1/c with ``invert``)
        of a constant operand: a Python number, or a tensor that is not an activation (a
        parameter, a buffer, or one made from them), reduced on its device."""
        known = self.init_log.moments(c) if isinstance(c, T) and c.is_meta and not invert \
            and self.init_log is not None else None
        if known is not None and known.known:
            self._constants.append((known.m2, known.mean))  # what its init code left there
        elif isinstance(c, T) and not c.is_complex():
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


def _opaque(module: nn.Module) -> bool:
    """Taken whole: torch.nn's own modules and leaves. A user's container that owns a
    parameter (a SkipInit alpha, a position embedding) is followed inside."""
    return (next(module.children(), None) is None
            or type(module).__module__.startswith("torch.nn."))
