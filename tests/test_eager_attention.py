"""Eager attention in the recorded dataflow (theory.attention_graph): what the probe
measures at the softmax, the flags it feeds, what is not attention, and predict on meta.
Accuracy against Monte Carlo is in tests/test_theory_accuracy.py (bench/accuracy/eager)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from varprobe import probe
from varprobe.predict import predict

N, T, H = 64, 16, 4


class Block(nn.Module):
    """Linear q, k, v; scores = q k^T / sqrt(d) (+ causal -inf); softmax; p @ v; Linear.
    ``kind``: "attention", or a chain that is only partly attention."""

    def __init__(self, kind: str = "attention", causal: bool = True, qk_std: float | None = None):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(N, N, bias=False) for _ in range(3))
        self.out = nn.Linear(N, N, bias=False)
        self.kind, self.causal, self.p = kind, causal, None
        if qk_std is not None:
            for m in (self.q, self.k):
                nn.init.normal_(m.weight, 0, qk_std)

    def forward(self, x):
        B = x.shape[0]
        q, k, v = (f(x).view(B, T, H, N // H).transpose(1, 2) for f in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(N // H)
        if self.kind == "gram":  # a matmul of two activations that is not attention
            return self.out((scores @ scores).transpose(1, 2).reshape(B, T, -1)[..., :N])
        if self.causal:
            upper = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(upper, -math.inf)
        p = F.softmax(scores, dim=-2 if self.kind == "wrong axis" else -1)
        self.p = p.detach()
        return self.out((p @ v).transpose(1, 2).reshape(B, T, N))


def test_the_softmax_is_measured_and_listed():
    torch.manual_seed(0)
    model = Block()
    report = probe(model, torch.randn(8, T, N), seed=0)
    (call,) = report.attention
    assert call["participation_basis"] == "measured" and call["causal"]
    # every row of the materialized p, not a subsample: exact to rounding
    assert call["participation"] == pytest.approx(
        model.p.double().square().sum(-1).mean().item(), rel=1e-9)
    assert call["layer"] == "q" and call["key_layer"] == "k"
    out = next(layer for layer in report.layers if layer.name == "out")
    assert out.predicted.basis == "graph" and not (out.predicted.note or "")


def test_saturated_eager_attention_is_flagged():
    torch.manual_seed(0)
    report = probe(Block(qk_std=0.5), torch.randn(8, T, N), seed=0)
    (call,) = report.attention
    assert call["saturated"]
    flags = {f.code for layer in report.layers for f in layer.flags}
    assert flags & {"attention_saturated", "attention_collapsed"}


@pytest.mark.parametrize("kind, named", [("gram", "of two activations"),
                                         ("wrong axis", "of two activations")])
def test_what_is_only_partly_attention_is_named(kind, named):
    torch.manual_seed(0)
    report = probe(Block(kind), torch.randn(8, T, N), seed=0)
    assert report.attention == []
    out = next(layer for layer in report.layers if layer.name == "out")
    assert named in out.predicted.note and "carried" in out.predicted.note
    closed = predict(Block(kind).to("meta"), input_shape=(T, N), batch_size=8)
    out = next(layer for layer in closed.layers if layer.name == "out")
    assert out.predicted is None or out.predicted.forward_var is None
    assert named in str(out.unavailable.get("predicted", "")) + str(
        out.predicted.note if out.predicted else "")


def test_predict_on_meta_follows_eager_attention():
    report = predict(Block(causal=False).to("meta"), input_shape=(T, N), batch_size=8)
    (call,) = report.attention
    assert call["participation_basis"] == "closed form" and not call["causal"]
    for layer in report.layers:
        assert layer.predicted.forward_var is not None, layer.name
        assert layer.predicted.backward_var is not None, layer.name
