"""Logits made by ``baddbmm`` (beta·bias + alpha·q kᵀ, Bloom's ALiBi) and regrouped by a
view that keeps the last two axes ((batch·heads, q, k) as (batch, heads, q, k)): the
eager chain is followed as its matmul spelling is, the bias taken as a mask."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from torch import nn

from varprobe import probe

D, H, T, B = 64, 4, 32, 8


class Alibi(nn.Module):
    """Bloom's attention on its own: heads folded into the batch, logits by baddbmm with
    a linear position bias per head, viewed back to (batch, heads, q, k) for the
    softmax and folded again for p @ v. ``spelling`` "matmul": the same numbers as
    alpha·(q @ kᵀ) + bias with no regrouping."""

    def __init__(self, spelling: str, std: float | None = None):
        super().__init__()
        self.spelling = spelling
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias=False) for _ in range(4))
        for m in (self.q, self.k) if std is not None else ():
            nn.init.normal_(m.weight, std=std)
        slopes = 2.0 ** -torch.arange(1, H + 1, dtype=torch.float32)
        self.register_buffer("bias", (slopes[:, None, None] * torch.arange(T)).repeat(B, 1, 1))

    def forward(self, x):
        def fold(t):
            return t.view(B, T, H, D // H).transpose(1, 2).reshape(B * H, T, D // H)
        q, k, v = fold(self.q(x)), fold(self.k(x)), fold(self.v(x))
        alpha = (D // H) ** -0.5
        if self.spelling == "baddbmm":
            s = self.bias.baddbmm(batch1=q, batch2=k.transpose(-1, -2), beta=1.0, alpha=alpha)
            p = torch.softmax(s.view(B, H, T, T), dim=-1).view(B * H, T, T)
        else:
            p = torch.softmax(alpha * (q @ k.transpose(-1, -2)) + self.bias, dim=-1)
        z = torch.bmm(p, v).view(B, H, T, D // H).transpose(1, 2).reshape(B, T, D)
        return self.o(z)


@pytest.mark.parametrize("std", [None, 1.0])
def test_baddbmm_logits_are_followed_as_their_matmul_spelling(std):
    """The same weights in both spellings give the same attention record and the same
    predictions (the recording, not the numbers, differs); at q, k ~ N(0, 1) the call is
    collapsed and flagged in both, the paths' factors measured through the regrouped p."""
    torch.manual_seed(0)
    a = Alibi("baddbmm", std)
    b = Alibi("matmul", std)
    b.load_state_dict(a.state_dict())
    x = torch.randn(B, T, D)
    ra, rb = probe(a, x, batch_size=B), probe(b, x, batch_size=B)
    assert len(ra.attention) == len(rb.attention) == 1
    for key in ("logit_variance", "participation", "masked", "keys"):
        va, vb = ra.attention[0][key], rb.attention[0][key]
        assert va == vb or math.isclose(va, vb, rel_tol=1e-5), key
    for la, lb in zip(ra.layers, rb.layers):
        assert math.isclose(la.predicted.backward_var, lb.predicted.backward_var, rel_tol=1e-4)
    collapsed = {f.code for la in ra.layers for f in la.flags}
    assert ("attention_collapsed" in collapsed) == (std is not None)


def test_bloom_attention_is_followed():
    """transformers' Bloom: every layer's baddbmm attention is in the report, quiet at
    its default init."""
    torch.manual_seed(0)
    model = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=500, hidden_size=128, n_layer=2,
                                               n_head=4, use_cache=False))
    report = probe(model, {"input_ids": torch.randint(4, 500, (2, 32))})
    assert len(report.attention) == 2
    assert report.summary.errors == 0
