"""The weight a convolution's own forward computes from its parameter.

Weight standardization (timm's ``StdConv2d`` and ``ScaledStdConv2d``: BiT ResNetV2s,
NF-ResNets and NFNets) convolves with a standardized copy of ``self.weight``, times a
gain: its scale is the gain's, whatever the parameter's init. Such a layer is a torch
convolution whose class brings a forward of its own; the weight it convolved with is
the one its output's autograd node saved, read after the call, so nothing is run or
intercepted inside the model's forward. Where the output is not that node's (the
forward does more after the convolution), the parameter stands.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from varprobe.transfer import Pending

_OWN_FORWARDS = frozenset(cls.forward for cls in (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d))


def computes_weight(module: nn.Module) -> bool:
    """A torch convolution whose class overrides the forward (and whose weight is no
    parametrization, which the recorder reads as computed already)."""
    return (isinstance(module, nn.modules.conv._ConvNd)
            and type(module).forward not in _OWN_FORWARDS
            and not parametrize.is_parametrized(module, "weight"))


def convolved(output: object, module: nn.Module) -> torch.Tensor | None:
    """The weight tensor the convolution that made ``output`` saved, where it is not the
    module's parameter itself; None otherwise."""
    node = getattr(output, "grad_fn", None)
    if node is None or type(node).__name__ != "ConvolutionBackward0":
        return None
    try:
        w = node._saved_weight
    except (RuntimeError, AttributeError):  # freed (a backward ran), or not saved
        return None
    param = module.weight
    if not isinstance(w, torch.Tensor) or w.shape != param.shape or w is param \
            or (w.data_ptr() == param.data_ptr() and w.dtype == param.dtype):
        return None
    return w


def row_share(w: torch.Tensor) -> Pending:
    """[sum over output units of (the sum of their weights)^2 / sum w^2] of a
    convolution's weight (out, in / groups, *kernel), in float64: the share of a mean
    every input shares that reaches the output (1 for independent zero-mean weights
    in expectation, 0 where each unit's weights sum to zero)."""
    rows = w.detach().reshape(w.shape[0], -1).double()
    sums = torch.stack([rows.sum(1).square().sum(), rows.square().sum()])
    return Pending(sums, lambda r: [r[0] / r[1] if r[1] > 0 else None])
