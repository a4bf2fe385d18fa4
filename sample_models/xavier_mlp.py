"""30 Linear+ReLU layers, Xavier init: every ReLU halves the signal, so it vanishes.

Glorot & Bengio's derivation assumes linear units. With ReLU each layer multiplies the
second moment by n·Var[w]·½ = ½, and after 30 layers the signal is 2^-29 of the first
layer's: the 30-layer model of He et al. 2015 (Fig. 3) that "completely stalls".
"""

from torch import nn

DEPTH, WIDTH = 30, 512


def build_model() -> nn.Module:
    layers = []
    for i in range(DEPTH):
        linear = nn.Linear(WIDTH, WIDTH)
        nn.init.xavier_normal_(linear.weight)
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()] if i < DEPTH - 1 else [linear]
    return nn.Sequential(*layers)
