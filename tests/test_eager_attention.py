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

    def __init__(self, kind: str = "attention", causal: bool = True, qk_std: float | None = None,
                 dropout: float = 0.0, modules: bool = False, refill: bool = False):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(N, N, bias=False) for _ in range(3))
        self.out = nn.Linear(N, N, bias=False)
        self.kind, self.causal, self.p, self.dropout = kind, causal, None, dropout
        self.refill = refill  # zero p's masked entries again after the softmax
        if qk_std is not None:
            for m in (self.q, self.k):
                nn.init.normal_(m.weight, 0, qk_std)
        # the same steps as modules: nn.Softmax(dim=-1) and an attn_drop, as timm spells it
        self.steps = nn.ModuleList([nn.Softmax(dim=-1), nn.Dropout(dropout)]) \
            if modules else None

    def forward(self, x):
        B = x.shape[0]
        q, k, v = (f(x).view(B, T, H, N // H).transpose(1, 2) for f in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(N // H)
        if self.kind == "gram":  # a matmul of two activations that is not attention
            return self.out((scores @ scores).transpose(1, 2).reshape(B, T, -1)[..., :N])
        upper = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        if self.causal:
            scores = scores.masked_fill(upper, -math.inf)
        if self.steps is not None:
            p = self.steps[0](scores)
            self.p = p.detach()
            p = self.steps[1](p)
        else:
            p = F.softmax(scores, dim=-2 if self.kind == "wrong axis" else -1)
            self.p = p.detach()
            p = F.dropout(p, self.dropout, self.training)
        if self.refill:
            p = torch.masked_fill(p, upper, 0)
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


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_softmax_and_dropout_modules_are_followed_as_their_functions(dropout):
    """nn.Softmax(dim=-1) and an nn.Dropout on p (timm's attn_drop) are the same steps
    as F.softmax and F.dropout: the same draws (one seed) give the same report."""
    def run(modules: bool):
        torch.manual_seed(0)
        model = Block(dropout=dropout, modules=modules)
        return model, probe(model, torch.randn(8, T, N), seed=0, mode="train")

    (model, spelled), (_, functions) = run(True), run(False)
    assert len(spelled.attention) == len(functions.attention) == 1
    (call,), (same,) = spelled.attention, functions.attention
    assert call["participation"] == pytest.approx(
        model.p.double().square().sum(-1).mean().item(), rel=1e-9)
    # 'where' names the module or op the chain was last seen at; every number agrees
    assert {**call, "where": None} == {**same, "where": None}
    out = {r: next(layer for layer in rep.layers if layer.name == "out")
           for r, rep in (("modules", spelled), ("functions", functions))}
    assert out["modules"].predicted == out["functions"].predicted
    assert out["modules"].predicted.basis == "graph" and not (
        out["modules"].predicted.note or "")


def test_probabilities_zeroed_again_where_the_mask_was_keep_the_attention():
    def run(refill: bool):
        torch.manual_seed(0)
        return probe(Block(refill=refill), torch.randn(8, T, N), seed=0)

    (call,), (same,) = run(True).attention, run(False).attention
    assert {**call, "where": None} == {**same, "where": None}


def test_a_collapsed_attention_behind_a_softmax_module_is_flagged():
    torch.manual_seed(0)
    report = probe(Block(qk_std=1.0, modules=True), torch.randn(8, T, N), seed=0)
    (call,) = report.attention
    assert call["saturated"]
    assert "attention_collapsed" in {f.code for layer in report.layers for f in layer.flags}


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


class Cross(nn.Module):
    """Queries from the tokens, keys and values from ``keys`` context tokens (a
    conditioning embedding), through scaled_dot_product_attention."""

    def __init__(self, keys: int):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(N, N, bias=False) for _ in range(4))
        self.context = nn.Parameter(torch.randn(keys, N))

    def forward(self, x):
        B = x.shape[0]
        q = self.q(x).view(B, T, H, N // H).transpose(1, 2)
        k, v = (f(self.context).view(1, -1, H, N // H).transpose(1, 2).expand(B, -1, -1, -1)
                for f in (self.k, self.v))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, N))


@pytest.mark.parametrize("keys", [1, 2])
def test_one_or_two_keys_at_uniform_weights_are_not_collapsed(keys):
    """One key: Σp² = 1 whatever the logits; two keys at small logits: Σp² ≈ 1/2. Both
    sit at their floor, and SGD trains them (SVD's cross-attention to one token)."""
    torch.manual_seed(0)
    report = probe(Cross(keys), torch.randn(8, T, N), seed=0)
    (call,) = report.attention
    assert call["keys"] == keys and call["participation"] >= 0.49
    assert not {f.code for layer in report.layers for f in layer.flags} & {
        "attention_collapsed", "attention_saturated"}


class Causal(nn.Module):
    """Self-attention over ``tokens`` positions under a causal mask (SDPA, is_causal)."""

    def __init__(self, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.q, self.k, self.v, self.out = (nn.Linear(N, N, bias=False) for _ in range(4))

    def forward(self, x):
        B = x.shape[0]
        q, k, v = (f(x).view(B, self.tokens, H, N // H).transpose(1, 2)
                   for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, self.tokens, N))


def test_a_causal_mask_over_two_tokens_at_uniform_weights_is_not_collapsed():
    """Query 1 sees one key, query 2 two: Σp² = (1 + 1/2) / 2 = 3/4 at uniform weights."""
    torch.manual_seed(0)
    report = probe(Causal(2), torch.randn(8, 2, N), seed=0)
    (call,) = report.attention
    assert call["causal"] and call["participation"] >= 0.74
    assert "attention_collapsed" not in {f.code for layer in report.layers
                                         for f in layer.flags}


def test_predict_follows_the_softmax_and_dropout_modules_on_meta():
    reports = [predict(Block(causal=False, modules=modules, dropout=0.1).to("meta"),
                       input_shape=(T, N), batch_size=8) for modules in (True, False)]
    (call,), (same,) = (r.attention for r in reports)
    assert {**call, "where": None} == {**same, "where": None}
    assert reports[0].layers[-1].predicted == reports[1].layers[-1].predicted
