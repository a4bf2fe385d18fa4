"""The same 30-layer ReLU MLP with He (Kaiming) init: the signal holds.

n·Var[w]·½ = 1 for every layer (He et al. 2015, Eq. 10), so E[y²] stays at 2·E[x²]
from the first layer to the last, and the gradient holds on the way back.
"""

from torch import nn

DEPTH, WIDTH = 30, 512


def build_model() -> nn.Module:
    layers = []
    for i in range(DEPTH):
        linear = nn.Linear(WIDTH, WIDTH)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()] if i < DEPTH - 1 else [linear]
    return nn.Sequential(*layers)
