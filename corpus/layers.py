"""Building blocks and default inits the hand-written vision families share.

Each init function re-types its library's own init code (torchvision, timm, the
pytorch-cifar repository), so an entry starts where a user of that library starts.
Registers nothing (it is not in ``corpus.FAMILIES``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def images(channels: int, size: int) -> Callable[[int], torch.Tensor]:
    """Unit-Gaussian images, as a normalized (mean 0, std 1 per channel) dataset gives."""
    return lambda batch: torch.randn(batch, channels, size, size)


def conv_bn_act(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
                act: Callable[[], nn.Module] | None = nn.ReLU, eps: float = 1e-5) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: conv (no bias), BatchNorm, activation."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout, eps=eps)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: x * gate(fc2(act(fc1(avgpool(x)))))."""

    def __init__(self, channels: int, squeeze: int, act: Callable[[], nn.Module] = nn.ReLU,
                 gate: Callable[[], nn.Module] = nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = act()
        self.scale_activation = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * scale


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth, mode "row": drop a residual branch per sample
    with probability p in training, scaling survivors by 1/(1-p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        noise = torch.empty([x.shape[0]] + [1] * (x.dim() - 1), dtype=x.dtype, device=x.device)
        return x * noise.bernoulli_(keep).div_(keep)


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's _make_divisible: round channels to a multiple of ``divisor``."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _norm_ones(m: nn.Module) -> bool:
    if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
        return True
    return False


def init_torchvision_resnet(model: nn.Module) -> nn.Module:
    """torchvision ResNet/VGG-convs/RegNet: kaiming_normal_(fan_out, relu) on convs,
    norms weight 1 bias 0, Linear left at PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        else:
            _norm_ones(m)
    return model


def init_torchvision_mobile(model: nn.Module, linear_std: float | None = 0.01) -> nn.Module:
    """torchvision MobileNetV2/V3, VGG, RegNet: convs kaiming_normal_(fan_out), norms 1/0,
    Linear N(0, 0.01) bias 0 (``linear_std=None``: EfficientNet's U(+-1/sqrt(out)))."""
    init_torchvision_resnet(model)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            if linear_std is None:
                r = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -r, r)
            else:
                nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)
    return model


def init_trunc_normal(model: nn.Module, std: float = 0.02, types=(nn.Linear, nn.Conv2d)) -> nn.Module:
    """timm / ConvNeXt / Swin: trunc_normal_(std) on weights of ``types``, bias 0;
    norms weight 1 bias 0."""
    for m in model.modules():
        if isinstance(m, types):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        else:
            _norm_ones(m)
    return model
