"""Closed-form pieces of the theory: fans, init variances, activation gains.

Pure functions of modules, shapes and numbers. No hooks.
"""

from __future__ import annotations

import math

from torch import nn


def fans(module: nn.Module) -> tuple[int | None, int | None]:
    """(fan_in, fan_out) as the forward and backward passes see them.

    Grouped convs: each output sees (in/groups)*k inputs and each input feeds
    (out/groups)*k outputs (torch's helper over-counts the latter, pytorch#23854).
    Transposed convs swap the roles of the weight's two leading dims.
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        k = math.prod(module.kernel_size)
        g = module.groups
        if module.transposed:
            return module.in_channels // g * k, module.out_channels // g * k
        return module.in_channels // g * k, module.out_channels // g * k
    w = getattr(module, "weight", None)
    if w is not None and w.dim() >= 2:
        rf = math.prod(w.shape[2:]) if w.dim() > 2 else 1
        return w.shape[1] * rf, w.shape[0] * rf
    return None, None


NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
         *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
NOT_ELEMENTWISE = (nn.Softmax, nn.Softmax2d, nn.LogSoftmax, nn.Softmin, nn.MultiheadAttention,
                   nn.GLU, nn.AdaptiveLogSoftmaxWithLoss)


def is_activation(module: nn.Module) -> bool:
    """An elementwise nonlinearity from torch.nn (ReLU, PReLU, GELU, Tanh, ...)."""
    return (type(module).__module__ == "torch.nn.modules.activation"
            and not isinstance(module, NOT_ELEMENTWISE))


def kind(module: nn.Module) -> str:
    """"weight", "activation", "norm" or "other"."""
    if isinstance(module, NORMS):
        return "norm"
    if is_activation(module):
        return "activation"
    if any(p.dim() >= 2 for p in module.parameters(recurse=False)):
        return "weight"
    return "other"
