"""Soft-capped attention logits, c·tanh(s/c) (Gemma 2's attn_logit_softcapping): the
eager chain is followed through the cap, the closed forms take the capped logits'
variance inside the cap's linear range (s² <= c²/100), and past it the backward has
no closed form. The expected numbers come from the realized logits in plain torch."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from torch import nn

from varprobe import probe
from varprobe.predict import predict

D, H, T = 64, 4, 64


class Capped(nn.Module):
    """q, k, v, o Linear at N(0, std²); logits q k^T / sqrt(d) capped at ``cap`` as
    Gemma 2 spells it (divide, tanh, multiply); softmax; p @ v."""

    def __init__(self, cap: float | None, std: float):
        super().__init__()
        self.cap = cap
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias=False) for _ in range(4))
        for m in (self.q, self.k, self.v, self.o):
            nn.init.normal_(m.weight, std=std)

    def split(self, t):
        return t.view(t.shape[0], T, H, D // H).transpose(1, 2)

    def logits(self, x):
        q, k = self.split(self.q(x)), self.split(self.k(x))
        return torch.matmul(q, k.transpose(-1, -2)) * (D // H) ** -0.5

    def forward(self, x):
        a = self.logits(x)
        if self.cap is not None:
            a = a / self.cap
            a = torch.tanh(a)
            a = a * self.cap
        p = torch.softmax(a, dim=-1)
        return self.o(torch.matmul(p, self.split(self.v(x))).transpose(1, 2).reshape(-1, T, D))


def pair(cap: float, std: float, seed: int = 0):
    """The capped model, the same weights uncapped, and an input (its own seed: the
    probe's cotangent is drawn from ``seed``)."""
    torch.manual_seed(seed)
    capped = Capped(cap, std)
    plain = Capped(None, std)
    plain.load_state_dict(capped.state_dict())
    x = torch.randn(16, T, D, generator=torch.Generator().manual_seed(1000 + seed))
    return capped, plain, x


@pytest.mark.parametrize(("cap", "std", "tol"), [(12.0, 0.125, None), (3.0, 0.35, 0.2)])
def test_the_cap_is_followed_and_the_capped_logit_variance_predicted(cap, std, tol):
    """The predicted logit variance moves by the cap as the realized logits' mean square
    does: E[(c tanh(s/c))²]/E[s²] on the logits themselves (float64). The weights are
    the same with and without the cap, so their draw cancels in the ratio. The closed
    form takes the logits as Gaussian; the realized ones have heavier tails (a bilinear
    form of one weight draw), which the cap trims more. Inside the linear range (s² ~ 1,
    c = 12) the cap moves E[logit²] by ~2%, and the prediction must land nearer the
    truth than ignoring the cap would (``tol`` None: the cap's whole effect); far past
    it (s² ~ 60, c = 3: a tenth is left) within 20%."""
    capped, plain, x = pair(cap, std)
    with torch.no_grad():
        s = plain.logits(x).double()
    truth = float(((cap * torch.tanh(s / cap)) ** 2).mean() / (s ** 2).mean())
    with_cap, without = probe(capped, x), probe(plain, x)
    assert len(with_cap.attention) == 1 and with_cap.attention[0]["participation_basis"] \
        == "measured"
    ratio = with_cap.attention[0]["logit_variance"] / without.attention[0]["logit_variance"]
    assert abs(math.log(ratio / truth)) < (tol or -math.log(truth))


def test_inside_the_caps_linear_range_the_gradients_follow_the_closed_form():
    """At s² ~ 1 under c = 12 (s²/c² = 0.007) the cap moves E[logit²] by ~2%:
    the closed forms' q, k and v gradients stay within 10% of the measured ones, the
    closed forms' own accuracy at 64 keys (the uncapped call's key path is ~0.9x here),
    mean over 4 seeds (their spread is ~2%)."""
    ratios = []
    for seed in range(4):
        capped, _, x = pair(12.0, 0.125, seed)
        report = probe(capped, x, seed=seed)
        assert "soft-capped" not in " ".join(report.notes) and len(report.attention) == 1
        layers = {layer.label: layer for layer in report.layers}
        assert "carried" not in (layers["q"].predicted.note or "")  # the closed form's
        ratios.append([layers[n].predicted.backward_var / layers[n].backward.var
                       for n in ("q", "k", "v")])
    for path in zip(*ratios):
        assert abs(math.log(sum(path) / len(path))) < math.log(1.10)


def test_past_the_caps_linear_range_the_backward_has_no_closed_form():
    """s² ~ 60 under c = 3: there the closed forms put the query projection's gradient
    ~4x the measured one, so the walk stops at the call: the probe carries the measured
    gradient and says why; predict, with nothing measured, has no value after the call
    and no gradient before it."""
    capped, _, x = pair(3.0, 0.35)
    report = probe(capped, x)
    assert any("soft-capped at c = 3" in note for note in report.notes)
    q = next(layer for layer in report.layers if layer.label == "q")
    assert "carried the measured gradient" in q.predicted.note
    ahead = predict(capped, x)
    layers = {layer.label: layer for layer in ahead.layers}
    assert layers["q"].predicted.backward_var is None
    assert layers["o"].predicted.forward_var is None


def test_gemma2_attention_is_followed():
    """transformers' Gemma 2 runs eager attention with attn_logit_softcapping = 50: every
    layer's call is in the report, at its default init far inside the linear range."""
    torch.manual_seed(0)
    model = tf.Gemma2ForCausalLM(tf.Gemma2Config(
        num_hidden_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, intermediate_size=256, vocab_size=500, max_position_embeddings=64,
        use_cache=False))
    report = probe(model, {"input_ids": torch.randint(4, 500, (2, 32))})
    assert len(report.attention) == 2
    assert not any("soft-capped" in note for note in report.notes)
    assert report.summary.errors == 0
