"""An input that is exactly zero: on the trunk, on a residual branch, and whether it
comes back after one step.

What is expected follows from autograd, not from varprobe: each test takes one plain
SGD step (torch only) and checks whether the parameters that made the zero move, which
is what decides whether the zero is permanent. Training outcomes (SGD, bench.labels'
protocol) are quoted where a rule was placed by them.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from varprobe import probe

D = 64


def codes(report, severity="error"):
    return {f.code for layer in report.layers for f in layer.flags if f.severity == severity}


def flagged(report, code):
    return [layer.label for layer in report.layers for f in layer.flags if f.code == code]


def step_moves(model, x, params) -> list[bool]:
    """Whether one SGD step on a random loss changes each of ``params``."""
    model.zero_grad()
    out = model(x)
    (out * torch.randn_like(out)).sum().backward()
    return [bool(p.grad is not None and p.grad.abs().max() > 0) for p in params]


class Block(nn.Module):
    """pytorch-cifar's BasicBlock on vectors: the shortcut a module called after the
    branch (``out += self.shortcut(x)``), an identity or a projection."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out)
        self.fc2, self.bn2 = nn.Linear(d_out, d_out), nn.BatchNorm1d(d_out)
        self.shortcut = nn.Sequential() if d_in == d_out else nn.Sequential(
            nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.fc1(x)))
        out = self.bn2(self.fc2(out))
        out += self.shortcut(x)
        return F.relu(out)


def resnet(gamma1: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, D), Block(D, D), Block(D, 2 * D), Block(2 * D, 2 * D),
                          nn.Linear(2 * D, 10))
    for block in model[1:4]:
        nn.init.constant_(block.bn1.weight, gamma1)
    return model


def test_a_shortcut_module_called_after_the_branch_is_the_trunk():
    """The branch ends (fc2, bn2) rejoin, through an identity and a projection shortcut
    alike; the branch's first layer and the shortcut's own layers do not."""
    report = probe(resnet(1.0), torch.randn(64, 32))
    rejoins = {layer.label for layer in report.layers if layer.rejoins}
    for b in ("1", "2", "3"):
        assert {f"{b}.fc2", f"{b}.bn2"} <= rejoins
        assert f"{b}.fc1" not in rejoins
    assert "2.shortcut.0" not in rejoins and "2.shortcut.1" not in rejoins


def test_a_dead_residual_branch_is_a_warning_the_trunk_carries_the_signal():
    """γ = 0 in the BatchNorm before a branch's ReLU: the branch's second layer reads an
    exact zero and no gradient reaches γ (relu'(0) = 0), so the branch stays dead; the
    shortcut carries the signal, and the layers after the block learn (bench: the
    CIFAR ResNet-18 with every bn1 at γ = 0 trains under SGD)."""
    model, x = resnet(0.0), torch.randn(64, 32)
    moves = step_moves(model, x, [model[1].bn1.weight, model[1].fc2.weight,
                                  model[0].weight, model[2].shortcut[0].weight])
    assert moves == [False, False, True, True]
    report = probe(model, x)
    assert codes(report) == set()
    assert flagged(report, "dead_branch") == ["1.fc2", "2.fc2", "3.fc2"]
    dead = next(f for f in report.layers[3].flags if f.code == "dead_branch")
    assert dead.culprits == ["1.bn1"] and dead.severity == "warning"


class PreLN(nn.Module):
    """Pre-LN residual MLP blocks x + W2 gelu(W1 LN(x)), then a final LN and a head."""

    def __init__(self, depth=4, gamma=1.0, final_gamma=1.0):
        super().__init__()
        torch.manual_seed(0)
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(depth))
        self.up = nn.ModuleList(nn.Linear(D, 4 * D) for _ in range(depth))
        self.down = nn.ModuleList(nn.Linear(4 * D, D) for _ in range(depth))
        self.ln_f, self.head = nn.LayerNorm(D), nn.Linear(D, 10)
        for norm in self.norms:
            nn.init.constant_(norm.weight, gamma)
        nn.init.constant_(self.ln_f.weight, final_gamma)

    def forward(self, x):
        for norm, up, down in zip(self.norms, self.up, self.down):
            x = x + down(F.gelu(up(norm(x))))
        return self.head(self.ln_f(x))


def test_a_zero_that_comes_back_after_one_step_is_not_judged():
    """LayerNorm γ = 0 at every branch's start: the branches read exact zeros, but the
    gradient reaches γ, which moves at the first step (bench: a 12-block pre-LN
    transformer with every block's γ = 0 trains under SGD)."""
    model, x = PreLN(gamma=0.0), torch.randn(64, D)
    assert step_moves(model, x, [model.norms[0].weight]) == [True]
    report = probe(model, x)
    assert codes(report) == set() and not flagged(report, "dead_branch")


def test_a_zero_on_the_trunk_stays_an_error_even_where_it_comes_back():
    """γ = 0 in the final LayerNorm: only γ and the head's bias move at the first step,
    everything below waits for γ to grow (bench: that 12-block transformer does not
    train under SGD at any rate of the protocol, AdamW does); and a zero-initialized
    layer before a ReLU never comes back."""
    model, x = PreLN(final_gamma=0.0), torch.randn(64, D)
    assert step_moves(model, x, [model.ln_f.weight, model.down[0].weight]) == [True, False]
    assert "vanishing_forward" in codes(probe(model, x))
    torch.manual_seed(0)
    mlp = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(D, D, bias=False), nn.ReLU())])
    for m in mlp[::2]:
        nn.init.normal_(m.weight, std=math.sqrt(2 / D))
    nn.init.zeros_(mlp[4].weight)
    assert step_moves(mlp, x, [mlp[4].weight]) == [False]
    report = probe(mlp, x)
    assert "vanishing_forward" in codes(report) and not flagged(report, "dead_branch")


class Gated(nn.Module):
    """Residual MLP blocks whose branch starts at a scale that is 0 at init, applied
    between modules (``x * self.scale``); ``learned``: a parameter (a gate that learns,
    as Gemma 3n's AltUp scales its corrected stream), else a buffer. ``streams``: the
    blocks carry two streams stacked in one tensor, the branch reads stream 0 and its
    output is added in place into stream 1 (``x[1:] += ...``, AltUp's layout)."""

    def __init__(self, learned: bool, streams: bool, depth: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.streams = streams
        self.up = nn.ModuleList(nn.Linear(D, 4 * D) for _ in range(depth))
        self.down = nn.ModuleList(nn.Linear(4 * D, D) for _ in range(depth))
        for k in range(depth):
            zero = torch.zeros(D)
            if learned:
                self.register_parameter(f"scale{k}", nn.Parameter(zero))
            else:
                self.register_buffer(f"scale{k}", zero)
        self.head = nn.Linear(D, 10)

    def forward(self, x):
        if self.streams:
            x = torch.stack([x, x])
        for k, (up, down) in enumerate(zip(self.up, self.down)):
            scale = getattr(self, f"scale{k}")
            if self.streams:
                x = x.clone()
                x[1:] += down(F.gelu(up(x[0].clone() * scale)))
            else:
                x = x + down(F.gelu(up(x * scale)))
        return self.head(x.mean(0) if self.streams else x)


def test_a_learned_gate_at_zero_between_modules_comes_back():
    """The gate's gradient is its input times the gradient at the branch's first layer,
    which is not zero (gelu'(b) and the layers after it are not): the gate moves at the
    first step and the zero is gone, in both layouts; a zero buffer never moves, and the
    branch's layers never learn (dead_branch, a warning: the trunk carries on). In the
    stacked layout the in-place add into a slice is the branch's rejoin."""
    x = torch.randn(64, D)
    for streams in (False, True):
        model = Gated(learned=True, streams=streams)
        assert step_moves(model, x, [model.scale0, model.up[0].weight]) == [True, False]
        report = probe(model, x)
        assert codes(report) == set() and not flagged(report, "dead_branch")
        frozen = Gated(learned=False, streams=streams)
        assert step_moves(frozen, x, [frozen.up[0].weight, frozen.down[0].weight]) == \
            [False, True]
        report = probe(frozen, x)
        assert codes(report) == set()
        assert flagged(report, "dead_branch") == ["up.0", "up.1", "up.2"]
        assert [la.label for la in report.layers if la.rejoins] == ["down.0", "down.1",
                                                                    "down.2"]
