"""A deep sigmoid MLP trained on a mean-reduced loss: the usual way fp16 gradients
vanish. The loss averages over 65536 outputs, so each output's gradient is about
2^-15; sigmoid's slope is at most 1/4, so each layer below shrinks the gradient about
4-fold more, and at the first layers it is about 1e-9, below fp16's smallest subnormal
(6e-8): without loss scaling it flushes to zero. `varprobe analyze ... --precision
fp16` prints the loss scale range that keeps every gradient in range."""

import math

import torch
from torch import nn

DEPTH, WIDTH, BATCH = 8, 256, 256


def build_model() -> nn.Module:
    layers = []
    for _ in range(DEPTH):
        linear = nn.Linear(WIDTH, WIDTH, bias=False)
        nn.init.normal_(linear.weight, std=math.sqrt(1 / WIDTH))
        layers += [linear, nn.Sigmoid()]
    return nn.Sequential(*layers[:-1])


def example_input(batch_size: int = BATCH) -> torch.Tensor:
    return torch.randn(batch_size, WIDTH)


def loss(output: torch.Tensor) -> torch.Tensor:
    return output.pow(2).mean() / 2  # a regression loss towards 0: gradient output / N
