"""A module given one tensor in several argument positions (self-attention,
``attn(h, h, h)``): the gradient w.r.t. its input sums every path, as autograd's
gradient of that tensor does. Reference: plain autograd in float64."""

from __future__ import annotations

import pytest
import torch
from reference import RTOL
from torch import nn

import varprobe


class SelfAttention(nn.Module):
    def __init__(self, by_keyword: bool = False):
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.by_keyword = by_keyword

    def forward(self, x):
        h = self.proj(x)
        if self.by_keyword:
            return self.attn(query=h, key=h, value=h, need_weights=False)[0]
        return self.attn(h, h, h, need_weights=False)[0]


def pvar(t: torch.Tensor) -> float:
    return t.double().var(unbiased=False).item()


@pytest.mark.parametrize("by_keyword", [False, True])
def test_self_attention_backward_input_sums_all_paths(by_keyword):
    torch.manual_seed(0)
    model = SelfAttention(by_keyword).double()
    x, g = torch.randn(8, 16, 32, dtype=torch.float64), torch.randn(8, 16, 32,
                                                                   dtype=torch.float64)
    report = varprobe.probe(model, x, grad_output=g)
    attn = next(layer for layer in report.layers if layer.name == "attn")

    h = model.proj(x)
    h.retain_grad()
    model.attn(h, h, h, need_weights=False)[0].backward(g)
    assert attn.backward_input.var == pytest.approx(pvar(h.grad), rel=RTOL)
    # The query path alone is a fraction of it: what recording one position gives.
    q = h.detach().requires_grad_()
    model.attn(q, h.detach(), h.detach(), need_weights=False)[0].backward(g)
    assert pvar(q.grad) < 0.5 * pvar(h.grad)
