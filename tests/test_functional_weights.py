"""Weight ops called as functions on parameters (theory.functional) in ``predict``: on the
meta device their moments come from the init the model's own code applied (initlog);
accuracy against Monte Carlo is in tests/test_theory_accuracy.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from varprobe import initlog
from varprobe.predict import predict

N, VOCAB, T = 256, 500, 16


class Functional(nn.Module):
    """F.embedding -> Linear -> F.linear -> relu -> addmm -> x @ W -> GLU -> Linear,
    every parameter drawn by torch.nn.init (so a meta build records it)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.empty(VOCAB, N))
        self.w1, self.w2 = nn.Parameter(torch.empty(N, N)), nn.Parameter(torch.empty(N, N))
        self.w3 = nn.Parameter(torch.empty(N, 2 * N))
        self.b1, self.b2 = nn.Parameter(torch.empty(N)), nn.Parameter(torch.empty(N))
        self.first, self.head = nn.Linear(N, N), nn.Linear(N, N)
        nn.init.normal_(self.table, 0, 1.0)
        for w in (self.w1, self.w2, self.w3):
            nn.init.normal_(w, 0, math.sqrt(2 / N))
        nn.init.constant_(self.b1, 0.1)
        nn.init.zeros_(self.b2)

    def forward(self, ids):
        h = F.embedding(ids, self.table)
        h = F.relu(F.linear(self.first(h), self.w1, self.b1))
        h = torch.addmm(self.b2, h.view(-1, N), self.w2).view(*ids.shape, N)
        return self.head(F.glu(h @ self.w3, -1))


def test_meta_prediction_is_the_real_weights_prediction():
    """On meta the walk reads the recorded init's moments; on the CPU the drawn weights'.
    They differ by E[w²]'s sampling error only: relative sd sqrt(2/(n m)) per matrix,
    under 0.6% for these (n m >= 65536), three matrices deep: within 3%."""
    with torch.device("meta"), initlog.recording() as log:
        meta = Functional()
    torch.manual_seed(0)
    real = Functional()
    ids = torch.randint(0, VOCAB, (8, T))
    closed = predict(meta, ids.to("meta"), init_log=log)
    drawn = predict(real, ids)
    assert [layer.name for layer in closed.layers] == ["first", "head"]
    for a, b in zip(closed.layers, drawn.layers):
        for side in ("forward_var", "backward_var"):  # first's gradient: back through all
            mine = getattr(a.predicted, side)
            assert mine is not None, (a.name, side, a.predicted.note)
            assert mine == pytest.approx(getattr(b.predicted, side), rel=0.03), (a.name, side)


def test_meta_without_a_recorded_init_says_so():
    with torch.device("meta"):
        model = Functional()
    report = predict(model, torch.randint(0, VOCAB, (8, T)).to("meta"))
    head = report.layers[-1]
    assert head.predicted is None or head.predicted.forward_var is None
    assert "meta device" in str(head.unavailable) + str(head.predicted and head.predicted.note)
