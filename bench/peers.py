"""The simple ways of getting per-layer numbers, timed beside varprobe in the same run.

Each runs the same forward and the same ``torch.autograd.grad`` call as the bare pass
(``overhead.bare``), with its own logging on top:

- ``fastai``: a forward hook on every leaf module that copies the output to the CPU and
  reads its mean, standard deviation and near-zero fraction with ``.item()`` each, as
  fastai's ``ActivationStats`` does (forward only).
- ``backward-hook``: ``register_full_backward_hook`` on every leaf module reading the
  output gradient's mean and standard deviation with ``.item()`` (backward only).
- ``torchlens``: ``torchlens.trace`` (every operation logged, every activation saved),
  a forward pass only, when torchlens is importable; it does no backward pass.
- ``reads``: no logger a user would write, but the floor under any that records what
  varprobe records: torch's sum and norm (a mean and a variance need both) of every
  leaf module's output and output gradient, every parameter and every parameter
  gradient, kept on the device until one transfer at the end; no statistics, no
  bookkeeping. Its hooks run under ``varprobe.timing`` as varprobe's do, so the bench
  gives the time spent reading beside the pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bench import results
from varprobe import timing


def leaves(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if next(m.children(), None) is None]


def _hooked(model: nn.Module, register: Callable, fn: Callable, run: Callable) -> Any:
    handles = [register(m, fn) for m in leaves(model)]
    try:
        return run()
    finally:
        for h in handles:
            h.remove()


def fastai(model: nn.Module, x: torch.Tensor, g: torch.Tensor, bare: Callable) -> list:
    logged: list = []

    def hook(module, args, output):
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            o = output.detach().cpu()
            logged.append((o.mean().item(), o.std().item(),
                           (o <= 0.05).float().mean().item()))

    _hooked(model, nn.Module.register_forward_hook, hook, lambda: bare(model, x, g))
    return logged


def backward_hook(model: nn.Module, x: torch.Tensor, g: torch.Tensor,
                  bare: Callable) -> list:
    logged: list = []

    def hook(module, grad_input, grad_output):
        d = grad_output[0]
        if d is not None:
            logged.append((d.mean().item(), d.std().item()))

    _hooked(model, nn.Module.register_full_backward_hook, hook, lambda: bare(model, x, g))
    return logged


def reads(model: nn.Module, x: torch.Tensor, g: torch.Tensor, bare: Callable) -> list:
    kept: list[torch.Tensor] = []

    def read(t: torch.Tensor) -> None:
        d = t.detach().reshape(-1)
        kept.extend((d.sum(), torch.linalg.vector_norm(d)))

    def grad_hook(d: torch.Tensor) -> None:
        read(d)

    def hook(module, args, output):
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            read(output)
            if output.requires_grad:
                output.register_hook(timing.timed("recording", grad_hook))
        for p in module.parameters(recurse=False):
            read(p)

    with timing.phase("pass"):
        grads = _hooked(model, nn.Module.register_forward_hook,
                        timing.timed("recording", hook), lambda: bare(model, x, g))
        params = sum(1 for p in model.parameters() if p.requires_grad)  # then the input's
        timing.timed("recording", lambda: [read(d) for d in grads[:params] if d is not None])()
    return torch.stack(kept).tolist()


def torchlens_trace() -> Callable | None:
    """``torchlens.trace`` as a logger, or None where torchlens is not installed."""
    try:
        import torchlens
    except ImportError:
        return None

    def trace(model: nn.Module, x: torch.Tensor, g: torch.Tensor, bare: Callable) -> Any:
        return torchlens.trace(model, x)
    return trace


def loggers() -> dict[str, Callable]:
    out = {"fastai forward hooks": fastai, "full backward hooks": backward_hook,
           results.FLOOR: reads}
    trace = torchlens_trace()
    if trace is not None:
        out["torchlens trace (forward only)"] = trace
    return out
