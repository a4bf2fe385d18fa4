"""He init times 4: each Linear multiplies the signal's rms by 4, so after seven of
them the activations reach about 1e5, past fp16's largest value (65504), while bf16
(max 3.4e38) holds them. `varprobe analyze sample_models/fp16_overflow_mlp.py
--precision fp16` flags the overflow at the Linear where it starts."""

import math

from torch import nn

DEPTH, WIDTH, GAIN = 7, 256, 4.0


def build_model() -> nn.Module:
    layers = []
    for _ in range(DEPTH):
        linear = nn.Linear(WIDTH, WIDTH, bias=False)
        nn.init.normal_(linear.weight, std=GAIN * math.sqrt(2 / WIDTH))
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1])
