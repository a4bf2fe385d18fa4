"""Eager attention as real models spell it, held against a spelling varprobe already
follows: logits made by ``baddbmm`` (beta·bias + alpha·q kᵀ, Bloom's ALiBi) and regrouped
by a view that keeps the last two axes ((batch·heads, q, k) as (batch, heads, q, k)),
against plain matmul; a relative position bias looked up each call and added to the
logits, with CPM-Ant's masks filled from ``torch.scalar_tensor`` (before and after the
softmax), against the same bias in an SDPA call's float mask."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
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


def same_records(cls: type, spellings: tuple[str, str], std: float | None, mask: str) -> tuple:
    """Probe both spellings with one draw of weights on one input; their one attention
    record agrees (the closed forms' logit variance, the measured Σp², the mask, the
    keys)."""
    torch.manual_seed(0)
    a, b = cls(spellings[0], std), cls(spellings[1], std)
    b.load_state_dict(a.state_dict())
    x = torch.randn(B, T, D)
    ra, rb = probe(a, x, batch_size=B), probe(b, x, batch_size=B)
    assert len(ra.attention) == len(rb.attention) == 1
    for key in ("logit_variance", "participation", mask, "keys"):
        va, vb = ra.attention[0][key], rb.attention[0][key]
        assert va == vb or math.isclose(va, vb, rel_tol=1e-5), key
    return ra, rb


@pytest.mark.parametrize("std", [None, 1.0])
def test_baddbmm_logits_are_followed_as_their_matmul_spelling(std):
    """The same weights in both spellings give the same attention record and the same
    predictions (the recording, not the numbers, differs); at q, k ~ N(0, 1) the call is
    collapsed and flagged in both, the paths' factors measured through the regrouped p."""
    ra, rb = same_records(Alibi, ("baddbmm", "matmul"), std, "masked")
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


class Relative(nn.Module):
    """A causal attention whose logits get a learned bias per (head, distance), looked up
    each call (MPNet, CPM-Ant). ``spelling`` "eager": CPM-Ant's steps, the masks filled
    from torch.scalar_tensor(-inf) before the softmax and (0) after it; "sdpa": the bias
    and the causal mask in one float attn_mask. ``after``: the fill after the softmax."""

    def __init__(self, spelling: str, std: float | None = None, after: float = 0.0):
        super().__init__()
        self.spelling, self.after = spelling, after
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias=False) for _ in range(4))
        for m in (self.q, self.k) if std is not None else ():
            nn.init.normal_(m.weight, std=std)
        self.table = nn.Embedding(2 * T, H)
        nn.init.normal_(self.table.weight, std=0.5)
        self.register_buffer("distance", torch.arange(T)[:, None] - torch.arange(T) + T)
        self.register_buffer("hidden", torch.ones(T, T, dtype=torch.bool).triu(1))

    def forward(self, x):
        def split(t):
            return t.view(B, T, H, D // H).transpose(1, 2)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        bias = self.table(self.distance).permute(2, 0, 1)  # (H, T, T), an activation
        if self.spelling == "sdpa":
            mask = torch.where(self.hidden, -math.inf, bias)  # T5's spelling
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D // H)
            s = s + bias
            s = torch.masked_fill(s, self.hidden, torch.scalar_tensor(-math.inf))
            p = torch.softmax(s, dim=-1)
            p = torch.masked_fill(p, self.hidden, torch.scalar_tensor(self.after))
            z = torch.matmul(p, v)
        return self.o(z.transpose(1, 2).reshape(B, T, D))


@pytest.mark.parametrize("std", [None, 1.0])
def test_an_added_position_bias_is_followed_as_an_sdpa_float_mask(std):
    """The eager chain with the bias added to the logits gives the SDPA call's record and
    predictions, the bias table's predicted gradient (the logits' gradient per entry,
    times the logits it is added to) included; q, k ~ N(0, 1) collapse both."""
    re, rs = same_records(Relative, ("eager", "sdpa"), std, "causal")
    table = [next(la for la in r.layers if la.label == "table") for r in (re, rs)]
    assert math.isclose(table[0].predicted.backward_var, table[1].predicted.backward_var,
                        rel_tol=1e-4)
    collapsed = [{f.code for la in r.layers for f in la.flags} for r in (re, rs)]
    assert [("attention_collapsed" in c) for c in collapsed] == [std is not None] * 2


def test_a_fill_after_the_softmax_is_read_from_the_number_it_was_made_from():
    """torch.scalar_tensor(0) after the softmax zeroes what the mask already zeroed: the
    chain stands; (0.5) would change p @ v: the call is not taken as attention."""
    torch.manual_seed(0)
    x = torch.randn(B, T, D)
    assert len(probe(Relative("eager"), x, batch_size=B).attention) == 1
    assert len(probe(Relative("eager", after=0.5), x, batch_size=B).attention) == 0
