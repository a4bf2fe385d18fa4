"""A conv net with PReLU (a = 0.25) and PReLU-aware He init: the signal holds.

For PReLU each layer multiplies the second moment by n·Var[w]·(1+a²)/2, so the init
is Var[w] = 2/((1+a²)·n) (He et al. 2015, Eq. 15) — what kaiming_normal_ gives with
nonlinearity="leaky_relu" and a = 0.25.
"""

import torch
from torch import nn

A = 0.25
CHANNELS = (3, 32, 32, 64, 64, 64, 64)


def build_model() -> nn.Module:
    layers: list[nn.Module] = []
    for c_in, c_out in zip(CHANNELS, CHANNELS[1:]):
        conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        nn.init.kaiming_normal_(conv.weight, a=A, nonlinearity="leaky_relu")
        layers += [conv, nn.PReLU(init=A)]
    head = nn.Linear(CHANNELS[-1], 10)
    nn.init.kaiming_normal_(head.weight, a=A, nonlinearity="leaky_relu")
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def example_input(batch_size: int) -> torch.Tensor:
    return torch.randn(min(batch_size, 64), 3, 16, 16)
