"""Snapshot everything a probe could disturb, and assert it is exactly as it was.

Bitwise comparisons (NaN weights compare equal to themselves), object identity for
parameters and ``.grad`` tensors, every hook dictionary torch keeps on a module or a
tensor, training flags, ``requires_grad`` and the global RNG.
"""

from __future__ import annotations

import torch
from torch import nn

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
              "_backward_pre_hooks", "_forward_hooks_with_kwargs",
              "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
              "_state_dict_hooks", "_load_state_dict_pre_hooks")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor: equal bits, not equal values (NaN == NaN here)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone()


def snapshot(model: nn.Module) -> dict:
    params = dict(model.named_parameters(remove_duplicate=False))
    return {
        "state": {k: bits(v) for k, v in model.state_dict(keep_vars=True).items()},
        "params": {k: id(p) for k, p in params.items()},
        "grads": {k: (id(p.grad), bits(p.grad)) if p.grad is not None else None
                  for k, p in params.items()},
        "requires_grad": {k: p.requires_grad for k, p in params.items()},
        "tensor_hooks": {k: p._backward_hooks for k, p in params.items()},
        "training": {k: m.training for k, m in model.named_modules(remove_duplicate=False)},
        "hooks": {k: {d: len(getattr(m, d, {})) for d in HOOK_DICTS}
                  for k, m in model.named_modules(remove_duplicate=False)},
        "full_backward": {k: m._is_full_backward_hook
                          for k, m in model.named_modules(remove_duplicate=False)},
        "global_hooks": _global_hooks(),
        "rng": torch.get_rng_state().clone(),
    }


def _global_hooks() -> tuple[int, ...]:
    mod = torch.nn.modules.module
    return tuple(len(getattr(mod, name)) for name in dir(mod) if name.startswith("_global_")
                 and isinstance(getattr(mod, name), dict))


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), f"{key} changed"
    for part in ("params", "requires_grad", "tensor_hooks", "training", "hooks",
                 "full_backward", "global_hooks"):
        assert after[part] == before[part], f"{part} changed"
    for key, grad in before["grads"].items():
        now = after["grads"][key]
        assert (now is None) == (grad is None), f"{key}.grad appeared or vanished"
        if grad is not None:
            assert now[0] == grad[0], f"{key}.grad was replaced"
            assert torch.equal(now[1], grad[1]), f"{key}.grad was written"
    assert torch.equal(after["rng"], before["rng"]), "the global RNG moved"


def give_grads(model: nn.Module, seed: int = 123) -> None:
    """Pre-existing .grad tensors, as a training loop would leave them."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
