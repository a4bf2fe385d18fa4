"""Leave the user's model exactly as found: snapshot what a probe can touch, restore it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def preserved(model: nn.Module, devices: list[torch.device] | None = None) -> Iterator[None]:
    """Restore modes, buffers, grads, requires_grad flags and RNG state on exit.

    Runs also when the model raises half-way. Parameters are never written by a probe;
    buffers (BatchNorm running stats, ``num_batches_tracked``) are, so they are cloned.
    """
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    params = list(model.parameters())
    grads = [(p, p.grad) for p in params]
    flags = [(p, p.requires_grad) for p in params]
    backward_flags = [(m, m._is_full_backward_hook) for m in model.modules()]
    # A module compiled in place (Module.compile) runs its calls through dynamo, which
    # would trace the probe's hooks at every call (36-110x slower): inside, its eager
    # calls run, the same computation, and the compiled ones come back on exit.
    compiled = [(m, m._compiled_call_impl) for m in model.modules()
                if getattr(m, "_compiled_call_impl", None) is not None]
    for m, _ in compiled:
        m._compiled_call_impl = None
    cuda = [d.index or 0 for d in devices or [] if d.type == "cuda"]
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        for m, call in compiled:
            m._compiled_call_impl = call
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)
        for m, training in modes:
            m.training = training
        for p, g in grads:
            p.grad = g
        for p, rg in flags:
            p.requires_grad_(rg)
        for m, flag in backward_flags:
            m._is_full_backward_hook = flag
