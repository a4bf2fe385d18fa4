"""Small plain-torch versions of the model families people point varprobe at.

No torchvision: each block follows the published architecture (ResNet, VGG-BN,
DenseNet, MobileNetV2, GoogLeNet, ViT) at toy width so that a probe takes milliseconds.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def mlp(widths, init=None, act=nn.ReLU, bias: bool = False, seed: int = 0) -> nn.Sequential:
    """Linear layers widths[0] -> ... -> widths[-1], ``act()`` between them (none after
    the last); ``init(weight)`` on each weight when given, PyTorch's default otherwise.
    Seeded: the same widths and seed give the same weights."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        linear = nn.Linear(a, b, bias=bias)
        if init is not None:
            init(linear.weight)
        layers += [linear, act()] if i < len(widths) - 2 else [linear]
    return nn.Sequential(*layers)


def gauss(var_of):
    """An init drawing N(0, var_of(fan_in, fan_out)) from the global RNG."""
    def init(w):
        nn.init.normal_(w, std=math.sqrt(var_of(w.shape[1], w.shape[0])))
    return init


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
            act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs, identity or 1x1 projection shortcut, x += y."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, stride=stride), conv_bn(cout, cout, act=None))
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout
                         else conv_bn(cin, cout, k=1, stride=stride, act=None))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.body(x)
        out += self.shortcut(x)
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, width)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def vgg_bn(widths: tuple = (8, "M", 16, "M", 16), classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for w in widths:
        if w == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            cin = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(cin * 4, 32), nn.ReLU(True), nn.Dropout(0.5),
                         nn.Linear(32, classes))


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1-BN-ReLU-Conv3x3, output concatenated onto the input."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                                  nn.Conv2d(cin, 2 * growth, 1, bias=False),
                                  nn.BatchNorm2d(2 * growth), nn.ReLU(inplace=True),
                                  nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


class DenseNet(nn.Module):
    def __init__(self, growth: int = 4, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.block = nn.Sequential(*(DenseLayer(8 + i * growth, growth) for i in range(3)))
        width = 8 + 3 * growth
        self.transition = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                                        nn.Conv2d(width, width // 2, 1, bias=False),
                                        nn.AvgPool2d(2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(width // 2, classes))

    def forward(self, x):
        return self.head(self.transition(self.block(self.stem(x))))


class InvertedResidual(nn.Module):
    """MobileNetV2: 1x1 expand, 3x3 depthwise, 1x1 linear projection, skip if shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        hidden = cin * expand
        self.skip = stride == 1 and cin == cout
        self.conv = nn.Sequential(conv_bn(cin, hidden, k=1, act=nn.ReLU6),
                                  conv_bn(hidden, hidden, stride=stride, groups=hidden,
                                          act=nn.ReLU6),
                                  conv_bn(hidden, cout, k=1, act=None))

    def forward(self, x):
        return x + self.conv(x) if self.skip else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8, stride=2, act=nn.ReLU6),
                                      InvertedResidual(8, 8, 1), InvertedResidual(8, 16, 2),
                                      InvertedResidual(16, 16, 1))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


class Inception(nn.Module):
    """GoogLeNet module: 1x1, 1x1->3x3, 1x1->5x5 and pool->1x1 branches, concatenated."""

    def __init__(self, cin: int, c1: int, c3: tuple, c5: tuple, cp: int):
        super().__init__()
        self.b1 = conv_bn(cin, c1, k=1)
        self.b2 = nn.Sequential(conv_bn(cin, c3[0], k=1), conv_bn(c3[0], c3[1]))
        self.b3 = nn.Sequential(conv_bn(cin, c5[0], k=1), conv_bn(c5[0], c5[1], k=5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, cp, k=1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class GoogLeNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.inc1 = Inception(16, 8, (8, 8), (4, 4), 4)
        self.inc2 = Inception(24, 8, (8, 12), (4, 6), 6)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.inc2(nn.functional.max_pool2d(self.inc1(self.stem(x)), 2))
        return self.fc(x.mean((2, 3)))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """Patch embedding (strided conv), class token, learned positions, pre-LN blocks."""

    def __init__(self, image: int = 16, patch: int = 4, dim: int = 32, depth: int = 2,
                 heads: int = 2, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        tokens = (image // patch) ** 2 + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class RecurrentClassifier(nn.Module):
    """nn.LSTM / nn.GRU over a sequence, last step to a linear head."""

    def __init__(self, cell: str = "LSTM", features: int = 8, hidden: int = 32):
        super().__init__()
        self.rnn = getattr(nn, cell)(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, 4)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class CellLoop(nn.Module):
    """An LSTMCell or GRUCell stepped in a Python loop: one record per step."""

    def __init__(self, cell: str = "LSTMCell", features: int = 8, hidden: int = 32):
        super().__init__()
        self.embed = nn.Linear(features, features)
        self.cell = getattr(nn, cell)(features, hidden)
        self.head = nn.Linear(hidden, 4)

    def forward(self, x):  # x: (batch, steps, features)
        state = None
        for t in range(x.shape[1]):
            state = self.cell(self.embed(x[:, t]), state)
        h = state[0] if isinstance(state, tuple) else state
        return self.head(h)
