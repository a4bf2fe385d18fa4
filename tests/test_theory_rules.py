"""Rules added to the walk, each against measurements over seeds: products of two
branches, rotary tables, name-told norms, and coverage of real decoders.

Tolerances: theory-review.md §10, a layer's measured E[y²] scatters around the closed
form with relative sd sqrt(2/n) per seed at fan-in n (the chi-square of its weights);
seed means over S seeds divide that by sqrt(S). Each bound below is 4 sd of the mean
over every factor the prediction multiplies, stated where it is used.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import varprobe
from varprobe.predict import predict


class SwiGLU(nn.Module):
    def __init__(self, n: int = 512):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(n, 2 * n), nn.Linear(n, 2 * n), nn.Linear(2 * n, n)

    def forward(self, x):
        return self.c(F.silu(self.a(x)) * self.b(x))


def test_a_gated_product_multiplies_its_factors_moments():
    """silu(a(x)) * b(x): independent weights make the factors independent, so
    E[(f(a) b)²] = E[f(a)²] E[b²]; the layer after the product and the gradient into
    both branches follow."""
    n, seeds = 512, 4
    ratios_f, ratios_b = [], []
    for seed in range(seeds):
        torch.manual_seed(seed)
        report = varprobe.probe(SwiGLU(n), input_shape=(n,), batch_size=256, seed=seed)
        a, b, c = report.weight_layers
        assert c.predicted.basis == "graph" and "carried" not in (c.predicted.note or "")
        ratios_f.append(c.forward.second_moment / c.predicted.forward_var)
        ratios_b.append(a.backward.var / a.predicted.backward_var)
    # three weight layers of fan-in n, n and 2n: sd sqrt(2/n + 2/n + 1/n) per seed
    bound = 4 * math.sqrt(5 / n) / math.sqrt(seeds)
    assert abs(math.log(sum(ratios_f) / seeds)) <= bound
    assert abs(math.log(sum(ratios_b) / seeds)) <= bound


class RotaryBlock(nn.Module):
    """q and k rotated as Llama does (x cos + rotate_half(x) sin), then attention."""

    def __init__(self, d: int = 256, heads: int = 4, t: int = 32):
        super().__init__()
        self.heads, self.q, self.k, self.v = heads, nn.Linear(d, d), nn.Linear(d, d), \
            nn.Linear(d, d)
        self.rotary, self.o = Rotary(d // heads, t), nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.heads, -1).transpose(1, 2)
                   for f in (self.q, self.k, self.v))
        cos, sin = self.rotary(x)
        q, k = (z * cos + torch.cat((-z[..., z.shape[-1] // 2:], z[..., :z.shape[-1] // 2]),
                                    -1) * sin for z in (q, k))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class Rotary(nn.Module):
    def __init__(self, dim: int, t: int):
        super().__init__()
        inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, x):
        angles = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * self.inv_freq
        emb = torch.cat((angles, angles), -1)
        return emb.cos(), emb.sin()


def test_rotary_tables_keep_the_scale_of_what_they_rotate():
    """cos² + sin² = 1: the rotated q and k keep E[q²], so the attention after them is
    predicted from the graph, within the closed form's accuracy and seed noise."""
    seeds, ratios = 4, []
    for seed in range(seeds):
        torch.manual_seed(seed)
        report = varprobe.probe(RotaryBlock(), torch.randn(8, 32, 256), seed=seed)
        o = report.weight_layers[-1]
        assert "carried" not in (o.predicted.note or ""), o.predicted.note
        ratios.append(o.forward.second_moment / o.predicted.forward_var)
    # the value and output projections (fan-in 256 each), 4 sd of the 4-seed mean, and
    # attention.md §3.4's 5% for the participation's closed form
    bound = 4 * math.sqrt(4 / 256) / 2 + 0.05
    assert abs(math.log(sum(ratios) / seeds)) <= bound


class NanoLayerNorm(nn.Module):
    """nanoGPT's LayerNorm: F.layer_norm in a module of its own."""

    def __init__(self, n: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(n)), nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def test_a_norm_module_of_its_own_is_a_norm():
    model = nn.Sequential(nn.Linear(64, 64), NanoLayerNorm(64), nn.Linear(64, 64))
    with torch.no_grad():
        model[1].weight.fill_(3.0)
    report = predict(model, input_shape=(64,))
    norm, last = report.layers[1], report.layers[2]
    assert norm.kind == "norm"
    assert norm.predicted.forward_var == pytest.approx(9.0, rel=1e-4)  # gamma², eps aside
    assert last.predicted.forward_var is not None and last.predicted.backward_var is not None


def test_every_weight_layer_of_a_tiny_llama_is_predicted():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=32, vocab_size=100))
    ids = torch.randint(0, 100, (4, 16))
    for report in (varprobe.probe(model, {"input_ids": ids}),
                   predict(model, {"input_ids": ids})):
        for layer in report.weight_layers:
            p = layer.predicted
            assert p.forward_var is not None and p.backward_var is not None, layer.label
            assert "carried" not in (p.note or ""), (layer.label, p.note)
        assert len(report.attention) == 2


def test_the_activation_means_memo_stays_bounded_and_exact(monkeypatch):
    """A long-lived process meets a new (var, mu) at every activation input: the memo
    of quadrature means is cleared at its bound, and what it hands back after that is
    the quadrature itself (GELU's mean at var 1, mu 0.5 against 200,000 float64 draws,
    5 standard errors)."""
    from varprobe.theory import rules

    full = {("filler", i): 0.0 for i in range(65536)}
    monkeypatch.setattr(rules, "_MEANS", full)
    mean = rules.activation_mean(nn.GELU(), 1.0, 0.5)
    assert len(rules._MEANS) == 1
    y = 0.5 + torch.randn(200_000, generator=torch.Generator().manual_seed(0),
                          dtype=torch.float64)
    sample = F.gelu(y)
    assert abs(mean - float(sample.mean())) < 5 * float(sample.std()) / math.sqrt(y.numel())
