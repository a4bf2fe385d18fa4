"""Eval-mode BatchNorm with calibrated running statistics (theory.norms, varprobe.runningnorm).

Running statistics are averages of the inputs the layer has seen, so they subtract
the channel means a ReLU leaves (a 1/pi share of E[x^2]): calibrated, the output's
second moment is about gamma^2 + beta^2 = 1, not the 1.93 an input mean independent of
the running one gives. Monte Carlo over seeds: each model is calibrated by train-mode
passes (fully: a cumulative average over 10 passes; partly: 5 passes at momentum 0.1,
which move the running statistics 41% of the way), then probed in eval mode.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import varprobe

WIDTH, SEEDS = 256, range(8)
# Bounds (relative): per-channel variances spread (chi-square over WIDTH weights,
# relative sd sqrt(2/WIDTH)), so the mean of gamma^2/var_c exceeds gamma^2/mean(var_c)
# by 2/WIDTH (Jensen), which the prediction does not resolve; and, per seed, the
# channel means' energy fluctuates by a relative sqrt(2/WIDTH) (one chi-square per
# channel) within the 1/pi share the running mean acts on. 6 sd of the mean of 8 seeds.
TOL = 2 / WIDTH + 6 * math.sqrt(2 / WIDTH) / math.pi / math.sqrt(len(SEEDS))


def calibrated(seed: int, passes: int, momentum: float | None) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH),
                          nn.BatchNorm1d(WIDTH, momentum=momentum), nn.ReLU(),
                          nn.Linear(WIDTH, WIDTH))
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(torch.randn(WIDTH, WIDTH))
    return model


@pytest.mark.parametrize("passes, momentum", [(10, None), (5, 0.1), (0, 0.1)])
def test_eval_batchnorm_with_running_statistics(passes, momentum):
    measured, predicted = [], []
    for s in SEEDS:
        report = varprobe.probe(calibrated(s, passes, momentum), batch_size=WIDTH,
                                seed=100 + s, mode="eval")
        for i in (3, 5):  # the BatchNorm and the Linear after it
            layer = report.layers[i]
            measured.append((i, layer.forward.second_moment))
            predicted.append((i, layer.predicted.forward_var))
    for i in (3, 5):
        m = sum(v for j, v in measured if j == i) / len(SEEDS)
        p = sum(v for j, v in predicted if j == i) / len(SEEDS)
        assert p == pytest.approx(m, rel=TOL), (i, m, p)
