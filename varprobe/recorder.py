"""Hooks that record per-call activation and gradient statistics.

The only module that touches hooks. Forward pre-hooks measure a module's input (before
an in-place module can overwrite it) and swap in an alias whose gradient hook gives the
gradient w.r.t. the input; forward hooks measure the output and register tensor hooks
for the gradient w.r.t. the output. No module backward hooks (pytorch#61519), no
reference to an activation after its hook returns, no host sync until ``collect``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

from varprobe import channel_sums, computed_weights, kernel_choice, mean_gain, stats, theory, timing

CHANNELS_FIRST = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Upsample, nn.PixelShuffle, nn.LocalResponseNorm,
)
# Zero and dead-unit fractions are measured on the outputs of these kinds of module
# (theory.kind): where a unit can die. A weight or norm layer's output is rarely
# exactly zero, and off the CPU measuring it costs more passes over the tensor.
UNITS_AFTER = ("activation", "other")
NO_UNITS = ("measured only on the outputs of activations and other modules without "
            "weights (where units die), not of weight or norm layers")
# A gradient hook on a view lives on the view's autograd node; an in-place write to the
# view (or to its base) replaces that node, so the hook never fires.
OVERWRITTEN = ("its output is a view that was modified in place after the module returned "
               "(by a later in-place op); a gradient hook on a view does not survive that")
INPUT_OVERWRITTEN = ("its output, a view of its input, was modified in place after the module "
                     "returned, and that input with it; a gradient hook on a view does not "
                     "survive that")
PASSED_OVERWRITTEN = ("the module passed its input through unchanged and the tensor was then "
                      "modified in place; the gradient w.r.t. its value before that is not "
                      "observable (it was not the output of a recorded module)")
CHANNELS_LAST = (nn.Linear, nn.Bilinear, nn.Embedding, nn.LayerNorm, nn.MultiheadAttention,
                 nn.RNNBase, nn.Flatten)


@dataclass
class Call:
    """Host-side bookkeeping for one module call; stats live in device slots."""

    name: str
    call: int
    module: nn.Module
    shape: list[int] | None = None
    dtype: str | None = None
    input_shape: list[int] | None = None
    slots: dict[str, int] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    alias: Any = None  # weakref to the input alias, to spot in-place writes
    alias_version: int | None = None
    source: Any = None  # weakref to the input the alias stands for


def tensor_leaves(value: Any) -> list[torch.Tensor]:
    """Every tensor in a (possibly nested) structure, dataclasses included."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = [getattr(value, f.name) for f in dataclasses.fields(value)]
    leaves, _ = pytree.tree_flatten(value)
    out = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            out.append(leaf)
        elif dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            out.extend(tensor_leaves(leaf))
    return out


def float_leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):  # the common case, without flattening
        return [value] if value.is_floating_point() else []
    return [t for t in tensor_leaves(value) if t.is_floating_point()]


def _roots(model: nn.Module) -> set[str]:
    """The model and the modules it merely wraps: a module with nothing of its own and
    one child (``nn.Sequential(model)``, a forward that calls ``self.inner``) hands the
    root's place to that child, whose own parameters (a ViT's class token) make it no
    layer, as the model's would not."""
    roots, name, module = {""}, "", model
    while not theory.own_parameters(module) and not list(module.buffers(recurse=False)):
        children = list(module.named_children())
        if len(children) != 1:
            break
        name, module = f"{name}.{children[0][0]}" if name else children[0][0], children[0][1]
        roots.add(name)
    return roots


def probed_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules, plus any module that owns parameters directly (e.g. attention),
    except the model itself (``_roots``). Not the modules that compute a parametrized
    weight (``module.parametrizations``): they run whenever the weight is read, and the
    weight is the layer's."""
    out, inside, roots = [], (), _roots(model)
    for name, module in model.named_modules(remove_duplicate=True):
        if inside and name.startswith(inside):
            continue
        if isinstance(module, parametrize.ParametrizationList):
            inside = (*inside, name + ".")
            continue
        is_leaf = next(module.children(), None) is None
        owns = bool(theory.own_parameters(module))
        if (is_leaf or owns) and (name not in roots or is_leaf):
            out.append((name or type(model).__name__, module))
    return out


def main_weight(module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The weight matrix a layer multiplies by, and its bias, if it has them."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        w = next((p for p in theory.own_parameters(module) if p.dim() >= 2), None)
    b = getattr(module, "bias", None)
    return w, b if isinstance(b, torch.Tensor) else None


class Recorder:
    """Attach with ``with Recorder(model) as rec:``; every handle goes on exit.

    ``measure=False`` records calls, shapes and weights only, no activation statistics:
    the shape pass of the closed-form ``predict`` (on the meta device, too).
    """

    def __init__(self, model: nn.Module, measure: bool = True, ranges: Any = None):
        self.model = model
        self.measure = measure
        # exponents.Measure: range statistics too (opt-in); slot -> its range slot
        self.ranges = ranges
        self.range_slots: dict[int, int] = {}
        self._range_by_pending: dict[int, int] = {}
        self.calls: list[Call] = []
        self.slots: list[stats.Pending | None] = []
        self.in_backward = False
        self._handles: list[Any] = []
        self._open: dict[int, list[Call]] = {}
        self._counts: dict[str, int] = {}
        self._seen: dict[int, tuple[weakref.ref, int, int, bool]] = {}
        self._grads: dict[tuple, tuple[weakref.ref, int, stats.Pending]] = {}
        self._units: dict[int, bool] = {}  # id(module) -> measure zeros and dead units
        self._per_channel: dict[int, bool] = {}  # id(module) -> read per channel (BatchNorm)
        self._unweighed: set[int] = set()  # id(module): has a weight, not measured yet
        self._computes: set[int] = set()  # id(module): its forward computes its weight
        self.row_shares: dict[int, int] = {}  # id(module) -> slot, where it does
        self.mean_gains: dict[int, int] = {}  # id(module) -> slot of its mean_gain
        # id(module) -> what its type and settings say, looked up once per recording
        # rather than at each call (a missing attribute costs nn.Module an exception):
        # the layout it sets (True: channels first, False: last, None: keeps it), and
        # whether it says it works in place.
        self._layout: dict[int, bool | None] = {}
        self._inplace: dict[int, bool] = {}
        self._channels_first = False
        # Outputs that are views, watched for in-place writes: (call, weakref, version,
        # {slot key: reason}, the call whose output the module passed through or None).
        self._views: list[tuple[Call, weakref.ref, int, dict[str, str], Call | None]] = []
        self._outputs: dict[int, tuple[weakref.ref, int, Call]] = {}  # id(output) -> call
        self.weights: dict[int, tuple[int, torch.Tensor]] = {}  # id(module) -> (slot, w)
        # Told where each call starts (the args its forward gets) and ends (its output):
        # theory.recording.Recording, a TorchFunctionMode that must not see the statistics.
        self.observer: Any = None
        self._on_grad_timed = self._on_grad
        self._kernels_token: Any = None
        self._channels_token: Any = None

    # --- lifecycle -----------------------------------------------------------------
    def __enter__(self) -> Recorder:
        # One timed wrapper for every gradient hook, not one per tensor: a gradient
        # hook is this bound to its slot.
        self._on_grad_timed = timing.timed("recording", self._on_grad)
        probed = probed_modules(self.model)
        norms = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for _, m in probed)
        for name, module in probed:
            kind = theory.kind(module)
            self._units[id(module)] = kind in UNITS_AFTER
            # a weight layer's output in a net with BatchNorms most likely feeds one
            self._per_channel[id(module)] = norms and kind == "weight"
            # not read here: a parametrized weight would be computed out of the pass (a
            # spectral norm's power iteration would take a step the pass then sees)
            if parametrize.is_parametrized(module, "weight") \
                    or main_weight(module)[0] is not None:
                self._unweighed.add(id(module))
                if computed_weights.computes_weight(module):
                    self._computes.add(id(module))
            self._layout[id(module)] = (True if isinstance(module, CHANNELS_FIRST) else
                                        False if isinstance(module, CHANNELS_LAST) else None)
            self._inplace[id(module)] = bool(getattr(module, "inplace", False))
            self._handles.append(module.register_forward_pre_hook(
                timing.timed("recording", self._pre_hook(name)), with_kwargs=True))
            self._handles.append(module.register_forward_hook(
                timing.timed("recording", self._post_hook()), with_kwargs=True))
        self._kernels_token = kernel_choice.fix_kernels()
        self._channels_token = channel_sums.keep() if norms else None
        return self

    def __exit__(self, *exc) -> None:
        kernel_choice.release_kernels(self._kernels_token)
        if self._channels_token is not None:
            channel_sums.release(self._channels_token)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()
        self._grads.clear()
        self._views.clear()
        self._outputs.clear()

    # --- slots ---------------------------------------------------------------------
    def _new_slot(self, value: stats.Pending | None = None) -> int:
        self.slots.append(value)
        return len(self.slots) - 1

    def _activation_slot(self, t: torch.Tensor, units: bool = False,
                         per_channel: bool = False) -> int | None:
        """Measure ``t`` once: the output of one module is usually the next one's input.
        ``units``: with the zero and dead-unit fractions (see ``UNITS_AFTER``);
        ``per_channel``: read per channel, the sums kept for a BatchNorm (channel_sums)."""
        if not self.measure:
            return None
        seen = self._seen.get(id(t))
        if (seen is not None and seen[0]() is t and seen[1] == t._version
                and (seen[3] or not units)):
            return seen[2]
        channel_dim = 1 if self._channels_first and t.dim() >= 3 else -1
        read = channel_sums.kept_read(t) if per_channel and channel_dim == 1 \
            and self.ranges is None else None
        value, seen = self._with_extremes(stats.activation, t, channel_dim, units, read)
        slot = self._new_slot(value)
        self._seen[id(t)] = (weakref.ref(t), t._version, slot, units)
        if self.ranges is not None:
            self.range_slots[slot] = self._new_slot(self.ranges.values(t, seen))
        return slot

    def _with_extremes(self, make, *args) -> tuple[Any, tuple | None]:
        """``make(*args)`` (the moment statistics of a tensor) and, when ranges are
        measured, the extremes its kernel read found on the way (``stats.extremes_read``)."""
        if self.ranges is None:
            return make(*args), None
        found: list = []  # ``stats.extremes_read``, without a context manager's calls
        token = stats.EXTREMES.set((found, self.ranges.sample, self.ranges.rows))
        try:
            value = make(*args)
        finally:
            stats.EXTREMES.reset(token)
        return value, found[0] if found else None

    def _grad_hook(self, slot: int):
        return functools.partial(self._on_grad_timed, slot)

    def _on_grad(self, slot: int, grad: torch.Tensor) -> None:
        self.slots[slot], seen = self._with_extremes(self._gradient_stats, grad)
        if self.ranges is not None:
            self._range_of(slot, grad, seen)

    def _range_of(self, slot: int, grad: torch.Tensor, seen: tuple | None) -> None:
        """The range slot of a gradient, shared by every slot holding the same Pending
        (the same buffer, see ``_gradient_stats``)."""
        key = id(self.slots[slot])  # the Pending lives in self.slots: its id is stable
        if key not in self._range_by_pending:
            if torch.is_grad_enabled():  # a backward with create_graph=True
                with torch.no_grad():
                    value = self.ranges.gradient(grad, seen)
            else:  # the usual backward: no context to enter (as ``_gradient_stats``)
                value = self.ranges.gradient(grad, seen)
            self._range_by_pending[key] = self._new_slot(value)
        self.range_slots[slot] = self._range_by_pending[key]

    def gradient_slot(self, g: torch.Tensor) -> int:
        """A slot for a gradient the caller holds through the backward (the cotangent)."""
        return self._new_slot(self._gradient_stats(g))

    def _gradient_stats(self, g: torch.Tensor) -> torch.Tensor:
        """Measure each gradient buffer once: the gradient w.r.t. a module's input alias
        is usually the very tensor of the one w.r.t. the previous module's output. The
        same memory, while a tensor measured there is alive (so the memory was not
        reused) and unwritten (the version counter is shared by views), holds the same
        values. A weak reference to the tensor, not to its storage: autograd cannot
        accumulate into a buffer whose storage is weakly referenced."""
        key = (g.data_ptr(), g.shape, g.stride(), g.dtype, g.device)
        seen = self._grads.get(key)
        if seen is not None and seen[0]() is not None and seen[1] == g._version:
            return seen[2]
        if torch.is_grad_enabled():  # a backward with create_graph=True
            with torch.no_grad():
                value = stats.gradient(g)
        else:  # the usual backward, already without grad: no context to enter
            value = stats.gradient(g)
        self._grads[key] = (weakref.ref(g), g._version, value)
        return value

    # --- hooks ---------------------------------------------------------------------
    def _pre_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if self.in_backward:  # checkpoint recomputation: already recorded
                return None
            self.check_views()
            index = self._counts.get(name, 0)
            self._counts[name] = index + 1
            call = Call(name=name, call=index, module=module)
            self.calls.append(call)
            self._open.setdefault(id(module), []).append(call)
            with self._quiet():  # the hooks' own tensor calls are no dataflow to record
                self._record_weight(module, args[0] if args else None)
                new = self._record_input(call, module, args, kwargs)
                if self.observer is not None:
                    self.observer.enter(len(self.calls) - 1, module, *(new or (args, kwargs)))
            return new
        return hook

    def _post_hook(self):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any):
            if self.in_backward:
                return None
            call = self._open[id(module)].pop()
            self._update_layout(module)
            with self._quiet():
                if id(module) in self._computes:  # the weight it convolved with
                    self._record_weight(module, args[0] if args else None, True,
                                        computed_weights.convolved(output, module))
                self._record_output(call, output)
            if self.observer is not None:
                self.observer.exit(output)
            return None
        return hook

    def _update_layout(self, module: nn.Module) -> None:
        layout = self._layout.get(id(module))
        if layout is not None:
            self._channels_first = layout

    def _record_weight(self, module: nn.Module, x: Any, after: bool = False,
                       computed: torch.Tensor | None = None) -> None:
        """At the module's first call (on ``x``): its weight then (a parametrization
        computes it just before), or ``after`` it where its forward does
        (``computed_weights``); and the mean's gain through it (``mean_gain``)."""
        if id(module) not in self._unweighed or after != (id(module) in self._computes):
            return
        self._unweighed.discard(id(module))
        w, b = main_weight(module)
        if computed is not None:
            w = computed
            self.row_shares[id(module)] = self._new_slot(computed_weights.row_share(w))
        # meta tensors have no values; a complex one's real part alone is no moment of it
        if w is not None and not w.is_meta and not w.is_complex():
            taps = mean_gain.tap_sums(module, w, x)  # whose total is w's sum: no read of it
            value, seen = self._with_extremes(stats.weight, w, b, mean_gain.total(taps))
            self.weights[id(module)] = (self._new_slot(value), w)
            if taps is not None and (gain := mean_gain.measure(module, w, b, x, taps)) is not None:
                self.mean_gains[id(module)] = self._new_slot(gain)
            if self.ranges is not None:
                self.range_slots[self.weights[id(module)][0]] = self._new_slot(
                    self.ranges.values(w, seen))

    def _quiet(self):
        return (torch._C.DisableTorchFunction() if self.observer is not None
                else contextlib.nullcontext())

    def _record_input(self, call: Call, module: nn.Module, args: tuple, kwargs: dict):
        if not kwargs and args and isinstance(args[0], torch.Tensor) \
                and args[0].is_floating_point():  # the common case, without flattening
            leaves, spec, pos = list(args), None, 0
        else:
            leaves, spec = pytree.tree_flatten((args, kwargs))
            pos = next((i for i, t in enumerate(leaves)
                        if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
        if pos is None:
            call.unavailable["input"] = "no floating-point input tensor"
            call.unavailable["backward_input"] = "no floating-point input tensor"
            return None
        x = leaves[pos]
        call.input_shape = list(x.shape)
        call.slots["input"] = self._activation_slot(x)
        if not x.requires_grad:
            call.unavailable["backward_input"] = "the input does not require grad"
            return None
        if self._inplace.get(id(module), False):
            call.unavailable["backward_input"] = "the module modifies its input in place"
            return None
        # aten.alias, not view_as: its backward hands the gradient on as it is, where a
        # view's hands on a view of it, which autograd cannot accumulate into in place
        # (an extra allocation, and fresh pages, per branching tensor).
        alias = torch.ops.aten.alias.default(x)
        if self.observer is not None:
            self.observer.alias(x, alias)
        call.slots["backward_input"] = self._new_slot()
        call.alias_version = alias._version
        alias.register_hook(self._grad_hook(call.slots["backward_input"]))
        # Every position that passes this tensor (attn(h, h, h)) gets the alias: its
        # gradient is then the sum over all paths, as the input's own would be.
        leaves = [alias if t is x else t for t in leaves]
        call.alias, call.source = weakref.ref(alias), weakref.ref(x)
        if spec is None:
            return tuple(leaves), kwargs
        new_args, new_kwargs = pytree.tree_unflatten(leaves, spec)
        return tuple(new_args), new_kwargs

    def _record_output(self, call: Call, output: Any) -> None:
        outs = float_leaves(output)
        if call.alias is not None:
            alias = call.alias()
            if alias is not None and alias._version != call.alias_version:
                call.slots.pop("backward_input")
                call.unavailable["backward_input"] = "the module modifies its input in place"
        if not outs:
            call.unavailable["forward"] = "the module returned no floating-point tensor"
            call.unavailable["backward"] = "the module returned no floating-point tensor"
            return
        y = outs[0]
        call.shape, call.dtype = list(y.shape), str(y.dtype).removeprefix("torch.")
        units = self._units.get(id(call.module), True)
        call.slots["forward"] = self._activation_slot(
            y, units, self._per_channel.get(id(call.module), False))
        if self.measure and not self._seen[id(y)][3]:
            call.unavailable["zero_fraction"] = call.unavailable["dead_fraction"] = NO_UNITS
        if y.requires_grad:
            call.slots["backward"] = self._new_slot()
            y.register_hook(self._grad_hook(call.slots["backward"]))
            self._watch(call, y)
        elif not torch.is_grad_enabled():
            # Under no_grad, e.g. the first pass of a use_reentrant=True checkpoint: its
            # gradient flows through a recomputation during backward, which is not recorded.
            call.unavailable["backward"] = (
                "the module ran without grad (torch.no_grad or a use_reentrant=True "
                "checkpoint, whose recomputation is not recorded; use_reentrant=False is)")
        else:
            call.unavailable["backward"] = "the output does not require grad"

    # --- outputs overwritten in place ----------------------------------------------
    def _watch(self, call: Call, y: torch.Tensor) -> None:
        """Remember ``y`` as ``call``'s output; watch it if it is a view (a module that
        passes its input through returns our alias of it, a view)."""
        if y._base is None:
            self._outputs[id(y)] = (weakref.ref(y), y._version, call)
            return
        x = call.source() if call.source is not None else None
        lost, through = {"backward": OVERWRITTEN}, None
        if x is not None and call.alias() is y:
            lost = dict.fromkeys(("backward", "backward_input"), PASSED_OVERWRITTEN)
            known = self._outputs.get(id(x))
            if known is not None and known[0]() is x and known[1] == x._version:
                through = known[2]
        elif x is not None and (x._base if x._base is not None else x) is y._base:
            lost["backward_input"] = INPUT_OVERWRITTEN  # one version counter for both
        self._views.append((call, weakref.ref(y), y._version, lost, through))

    def check_views(self) -> None:
        """Mark the calls whose output view was written in place since it was returned:
        their gradient hooks will not fire. Run before each call and after the forward.
        A module that passed its input through takes the gradient of that tensor, which
        is measured at the module that returned it (the same tensor, the same values)."""
        kept = []
        for entry in self._views:
            call, ref, version, lost, through = entry
            y = ref()
            if y is None:
                continue
            if y._version == version:
                kept.append(entry)
                continue
            for key, reason in lost.items():
                if call.slots.pop(key, None) is None:
                    continue  # never measured there: its reason stands
                if through is not None and "backward" in through.slots:
                    call.slots[key] = through.slots["backward"]
                else:
                    call.unavailable[key] = reason
        self._views = kept

    # --- after backward ------------------------------------------------------------
    def add_weight_grads(self, grads: dict[int, torch.Tensor | None]) -> dict[int, int]:
        """Slots for ||dL/dW|| / ||W||, keyed by id(module)."""
        out = {}
        with torch.no_grad():
            present = [(key, slot, w, g) for key, (slot, w) in self.weights.items()
                       if (g := grads.get(key)) is not None]
            norms = stats.weight_grad_norms([g for *_, g in present])
            for (key, slot, w, g), norm in zip(present, norms):
                value, seen = self._with_extremes(stats.grad_ratio, g, w, self.slots[slot],
                                                  norm)
                out[key] = self._new_slot(value)
                if self.ranges is not None:
                    self.range_slots[out[key]] = self._new_slot(self.ranges.gradient(g, seen))
        return out

    def collect(self) -> list:
        """The one device-to-host transfer: every slot as a list of floats (or None)."""
        filled = [i for i, s in enumerate(self.slots) if s is not None]
        host = stats.collect([self.slots[i] for i in filled])
        out: list = [None] * len(self.slots)
        for i, row in zip(filled, host):
            out[i] = row
        return out
