"""A ResNet-50-style model (bottleneck blocks 3-4-6-3, as He et al. 2016) for the end-to-end
bench: ``varprobe analyze bench/resnet50.py`` against ``python bench/resnet50.py``, which
builds the same model and runs one forward + backward, nothing else."""

from __future__ import annotations

import sys

import torch
from torch import nn

BATCH, SIZE = 16, 224


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int = 1):
        super().__init__()
        c_out = 4 * width
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(y)))
        return self.relu3(self.bn3(self.conv3(y)) + self.shortcut(x))


class ResNet50(nn.Module):
    def __init__(self, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        blocks, c = [], 64
        for i, (width, count) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            for j in range(count):
                blocks.append(Bottleneck(c, width, 2 if j == 0 and i > 0 else 1))
                c = 4 * width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return ResNet50()


def example_input(batch_size: int = BATCH) -> torch.Tensor:
    return torch.randn(batch_size, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


if __name__ == "__main__":  # the plain script: build, one forward + backward
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    model = build_model().train().to(device)
    out = model(example_input().to(device))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    # from a scalar, as a training script's loss.backward(): the same gradients as
    # out.backward(g), without the ~0.6 s import (sympy) that a tensor given to
    # backward() costs (varprobe's probe avoids it too: varprobe.cotangent)
    (out * g).sum().backward()
    if device != "cpu":
        torch.cuda.synchronize()  # the pass is done when its kernels are
