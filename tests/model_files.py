"""Small model files the CLI tests write to a temporary folder."""

MODELS = {
    "he.py": """
import torch
from torch import nn
def build_model():
    torch.manual_seed(0)  # the same weights on every load, so that a baseline compares
    layers = []
    for i in range(6):
        linear = nn.Linear(64, 64, bias=False)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        layers += [linear, nn.ReLU()] if i < 5 else [linear]
    return nn.Sequential(*layers)
""",
    "xavier.py": """
import torch
from torch import nn
def build_model():
    torch.manual_seed(0)  # the same weights on every load, so that a baseline compares
    layers = []
    for i in range(20):
        linear = nn.Linear(64, 64, bias=False)
        nn.init.xavier_normal_(linear.weight)
        layers += [linear, nn.ReLU()] if i < 19 else [linear]
    return nn.Sequential(*layers)
""",
    # He everywhere, but Xavier in two middle layers: two shrinks warnings, no trend
    "warn.py": """
import torch
from torch import nn
def build_model():
    torch.manual_seed(0)  # the same weights on every load, so that a baseline compares
    layers = []
    for i in range(6):
        linear = nn.Linear(64, 64, bias=False)
        if i in (2, 3):
            nn.init.xavier_normal_(linear.weight)
        else:
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        layers += [linear, nn.ReLU()] if i < 5 else [linear]
    return nn.Sequential(*layers)
""",
    # healthy, except for a deliberately tiny output layer
    "small_head.py": """
import torch
from torch import nn
def build_model():
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.ReLU(),
                          nn.Linear(64, 64, bias=False), nn.ReLU(),
                          nn.Linear(64, 10, bias=False))
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    with torch.no_grad():
        model[4].weight.mul_(1e-3)
    return model
""",
}
