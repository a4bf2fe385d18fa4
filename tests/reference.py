"""An independent ground truth for recorded stats: plain hooks, retain_grad, float64.

The reference runs on a deep copy of the model with the same input, seed and
cotangent. Each chosen module's output is kept as is (``retain_grad`` on it) and the
rest of the network gets a clone, so later in-place ops (``x += y``, ReLU(inplace))
change neither the kept value nor its gradient.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

# Recorded moments are float32 reductions of the same tensors the reference reduces in
# float64: pairwise summation keeps the relative error near eps32 * log2(n) ~ 2e-6 for
# the sizes used here; 1e-5 leaves a margin, never more.
RTOL = 1e-5


def capture(model: nn.Module, inputs: Any, cotangent: torch.Tensor | list[torch.Tensor],
            names: list[str], seed: int = 0) -> dict[str, list[tuple]]:
    """{name: [(output, d<outputs, cotangents>/d output) per call]}, both in float64.

    ``cotangent``: one tensor, or a list aligned with the output's floating leaves.
    """
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    kept: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def keep(name: str):
        def hook(module, args, output):
            leaves, spec = pytree.tree_flatten(output)
            i = next(i for i, t in enumerate(leaves)
                     if isinstance(t, torch.Tensor) and t.is_floating_point())
            if leaves[i].requires_grad:
                leaves[i].retain_grad()
            kept[name].append(leaves[i])
            leaves[i] = leaves[i].clone()
            return pytree.tree_unflatten(leaves, spec)
        return hook

    handles = [modules[name].register_forward_hook(keep(name)) for name in names]
    fed = pytree.tree_map(lambda t: t.clone().requires_grad_()
                          if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                          inputs)
    args, kwargs = ((), fed) if isinstance(fed, dict) else ((fed,), {})
    torch.manual_seed(seed)
    outs = [t for t in pytree.tree_leaves(model(*args, **kwargs))
            if isinstance(t, torch.Tensor) and t.is_floating_point()]
    cotangents = [cotangent] if isinstance(cotangent, torch.Tensor) else list(cotangent)
    assert len(cotangents) == len(outs), "one cotangent per floating output"
    torch.autograd.backward(outs, cotangents)
    for h in handles:
        h.remove()
    return {name: [(t.detach().double(), None if t.grad is None else t.grad.double())
                   for t in ts] for name, ts in kept.items()}


def moments(t: torch.Tensor) -> tuple[float, float]:
    """(population variance, second moment) in float64."""
    return float(t.var(correction=0)), float(t.square().mean())


def assert_matches(report, truth: dict, rtol: float = RTOL) -> int:
    """Every captured call equals its recorded layer; returns how many were compared."""
    compared = 0
    for name, calls in truth.items():
        layers = [layer for layer in report.layers if layer.name == name]
        assert len(layers) == len(calls), f"{name}: {len(layers)} records, {len(calls)} calls"
        for layer, (y, g) in zip(layers, calls):
            var, m2 = moments(y)
            assert layer.forward.var == pytest.approx(var, rel=rtol), layer.label
            assert layer.forward.second_moment == pytest.approx(m2, rel=rtol), layer.label
            assert g is not None, f"{layer.label}: no reference gradient"
            gvar, gm2 = moments(g)
            assert layer.backward.var == pytest.approx(gvar, rel=rtol), layer.label
            assert layer.backward.second_moment == pytest.approx(gm2, rel=rtol), layer.label
            compared += 1
    return compared
