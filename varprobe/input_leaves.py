"""The probe's own gradient leaves for the network's float inputs.

The gradient w.r.t. the network's input is measured through leaves the probe owns; the
model is fed a clone of each, so that in-place writes to its input stay legal. Those
clones require grad where the user's own call would not, so a model that sets
``requires_grad = True`` on a tensor computed from its input (Wav2Vec2's feature
encoder does it to a view of ``input_values``, for gradient checkpointing) would meet
PyTorch's "only leaf variables" error, which the plain call, where that tensor is a
leaf, never raises. While the forward runs, a TorchFunctionMode grants such a set: the
tensor already requires grad, as asked, and its gradient is the one the model would
see. A set on a tensor that requires grad through anything else (a parameter) raises
as it always would. Likewise a reduction to an integer dtype of a tensor that requires
grad only through our leaves (HunyuanVideo's ``mask.sum(dim=1, dtype=torch.int)`` on a
float mask) runs without grad, as the plain call's does: autograd refuses integer
results.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

_REQUIRES_GRAD = torch._C.TensorBase.__dict__["requires_grad"]


class InputLeaves(TorchFunctionMode):
    """``fed``: ``inputs`` with each float tensor replaced by a clone of a leaf of our
    own (``leaves``). Enter it around the forward, outside any other mode."""

    def __init__(self, inputs: Any):
        super().__init__()
        self.leaves: list[torch.Tensor] = []
        self.fed = pytree.tree_map(self._own, inputs)

    def _own(self, t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            leaf = t.detach().requires_grad_()
            self.leaves.append(leaf)
            return leaf.clone()
        return t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (getattr(func, "__self__", None) is _REQUIRES_GRAD and func.__name__ == "__set__"
                and len(args) == 2 and args[1] is True and self._only_ours(args[0])):
            return None
        dtype = kwargs.get("dtype")
        if (isinstance(dtype, torch.dtype) and not dtype.is_floating_point
                and not dtype.is_complex and args and self._only_ours(args[0])):
            with torch.no_grad():
                return func(*args, **kwargs)
        return func(*args, **kwargs)

    def _only_ours(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is a non-leaf only because of our leaves: every leaf its
        autograd graph reaches is one of them (the walk runs only on such a set)."""
        if not isinstance(t, torch.Tensor) or t.grad_fn is None:
            return False
        ours = {id(leaf) for leaf in self.leaves}
        seen, stack = set(), [t.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
            if variable is not None:
                if id(variable) not in ours:
                    return False
                continue
            stack.extend(next_node for next_node, _ in node.next_functions)
        return True
