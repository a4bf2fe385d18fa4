"""Values of the index and mask tensors a shape pass on the meta device computes.

Meta tensors have shapes but no values, so code that branches on a tensor's value
(``if (mask == 0).all():``, ``.item()``, ``.tolist()``) cannot run on them. Such
tensors are mostly bookkeeping that does not depend on the weights: position ids made
by ``torch.arange``, a causal mask built from them, a packed-sequence check over the
position ids (transformers' masking utilities). ``MetaValues`` computes those on the CPU
beside the meta pass: an op gets a value when it is a deterministic factory (``arange``,
``ones``, ``full``, ..., and ``ones_like``-style ones, which read only a shape) or when
every meta tensor it reads has a value. A read of a
tensor with a value (``bool``, ``item``, ``tolist``) answers from it; one without a
value raises as before, so a branch on the activations still sends predict to the CPU.
The pass itself, and what the recording sees, stay on meta.

The values are the model's own: the same ops on the same constants the CPU pass would
run. Random factories and ``empty`` get no value, and an op on values runs under a
forked generator state, so the pass neither consumes the global RNG nor reads garbage.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils.weak import WeakTensorKeyDictionary

from varprobe.theory.nodes import READS, in_place

MAX_NUMEL = 1 << 22  # a (8, 1, 512, 512) mask: a few MB; larger ones are left on meta
# Factories whose values do not depend on chance or on uninitialized memory; the
# ``like`` ones read only the shape of the tensor they are given.
FACTORIES = {"arange", "range", "zeros", "ones", "full", "tensor", "as_tensor", "linspace",
             "logspace", "eye", "tril_indices", "triu_indices", "scalar_tensor"}
LIKE = {"zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full",
        "new_tensor"}
MADE = FACTORIES | LIKE


def _is_meta(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "meta"


def _on_meta_device(x: Any) -> bool:
    return (isinstance(x, torch.device) and x.type == "meta") or (
        isinstance(x, str) and x == "meta")


class MetaValues(TorchFunctionMode):
    """While active, meta tensors made from constants carry their CPU values."""

    def __init__(self) -> None:
        super().__init__()
        self.values: WeakTensorKeyDictionary = WeakTensorKeyDictionary()

    def value(self, t: torch.Tensor) -> torch.Tensor | None:
        return self.values.get(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        metas = [t for t in _tensors(args, kwargs) if t.device.type == "meta"]
        if getattr(func, "__name__", "") not in MADE and \
                not any(t in self.values for t in metas):
            # nothing of this op has a value (the activations): the meta op alone,
            # less a value its target's base may lose to a write through a view
            if self.values and metas and args and args[0] is metas[0] \
                    and in_place(func, kwargs):
                self._forget(args[0])
            return func(*args, **kwargs)
        if func in READS:
            computed = self._compute(func, args, kwargs, metas)
            # a read (bool, item, tolist) of a value answers from it; else meta raises
            return computed[0] if computed is not None else func(*args, **kwargs)
        out = func(*args, **kwargs)
        target = args[0] if metas and args and args[0] is metas[0] and in_place(func, kwargs) \
            else None
        if target is None and not any(_is_meta(t) for t in pytree.tree_leaves(out)):
            return out  # a getter (shape, device, is_meta): nothing to keep
        computed = self._compute(func, args, kwargs, metas)
        if computed is None:
            if target is not None:
                self._forget(target)  # written with something unknown
        elif target is None or _is_meta(out):
            self._keep(out, computed[0])  # in place: the value was written as well
        return out

    def _compute(self, func, args: tuple, kwargs: dict, metas: list) -> tuple[Any] | None:
        """(what ``func`` gives on the values,) where every meta input has one."""
        name = getattr(func, "__name__", "")
        if name in LIKE:
            stand_in = lambda t: torch.empty(t.shape, dtype=t.dtype)  # noqa: E731 - shape only
        elif metas or name in FACTORIES:
            stand_in = None
        else:
            return None
        if stand_in is None and any(t not in self.values for t in metas):
            return None
        swap = lambda x: (  # noqa: E731
            (self.values.get(x) if x in self.values else stand_in(x)) if _is_meta(x)
            else "cpu" if _on_meta_device(x) else x)
        try:
            args, kwargs = pytree.tree_map(swap, args), pytree.tree_map(swap, kwargs)
            if name in FACTORIES:  # made on meta (a device argument or a device context)
                kwargs["device"] = "cpu"
            with torch.random.fork_rng(devices=[]):
                return (func(*args, **kwargs),)
        except Exception:  # noqa: BLE001 - no value: the meta op decides what happens
            return None

    def _keep(self, out: Any, value: Any) -> None:
        outs, values = pytree.tree_leaves(out), pytree.tree_leaves(value)
        if len(outs) != len(values):
            return
        for o, v in zip(outs, values):
            if (_is_meta(o) and isinstance(v, torch.Tensor) and v.shape == o.shape
                    and v.dtype == o.dtype and v.numel() <= MAX_NUMEL):
                self.values[o] = v
            elif _is_meta(o):
                self._forget(o)

    def _forget(self, t: torch.Tensor) -> None:
        self.values.pop(t, None)
        if t._base is not None:  # a write through a view changes its base too
            self.values.pop(t._base, None)


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors among an op's arguments, one list level deep (torch.cat's list): a
    tensor nested deeper goes unseen, and the op then gets no value (its CPU run fails)."""
    found = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(t for t in a if isinstance(t, torch.Tensor))
    return found
