"""Gemma's parts: norms that scale by (1 + weight), the weight starting at zero (Gemma's
RMSNorm and the families built on it: T5Gemma, RecurrentGemma, VaultGemma, Qwen3-Next),
whose gain is mean((1 + w)^2), not mean(w^2) (read as a plain RMSNorm they would look
like gamma = 0, read as something else they would stop the predictions); and word
embeddings that scale their rows (Gemma's sqrt(d), BART's with scale_embedding).

The truth here is the module's own output in float64: an RMSNorm gives each token
y = (1 + w) x / rms(x), so E[y^2] = mean_c (1 + w_c)^2 E[x_c^2 / rms(x)^2], and for
tokens of i.i.d. features the last factor is 1 for every channel up to its sampling
error (64 x 16 tokens here: a few percent of the spread of (1 + w_c)^2 across channels).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import varprobe
import varprobe.predict
from varprobe import stats
from varprobe.theory import layer_fans, norms


class OnePlusRMSNorm(nn.Module):
    """As transformers' GemmaRMSNorm writes it."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return output * (1.0 + self.weight.float())


class PlainRMSNorm(OnePlusRMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return output * self.weight


def stack(norm: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 64), norm(64), nn.Linear(64, 64), norm(64),
                         nn.Linear(64, 16))


def test_the_offset_is_told_by_the_forward():
    assert layer_fans.gamma_offset(OnePlusRMSNorm(8)) == 1.0
    assert layer_fans.gamma_offset(PlainRMSNorm(8)) == 0.0
    assert layer_fans.gamma_offset(nn.LayerNorm(8)) == 0.0
    assert norms.is_norm(OnePlusRMSNorm(8))


@pytest.mark.parametrize("spread", [0.0, 0.6])
def test_a_one_plus_norm_is_predicted_from_one_plus_its_weight(spread):
    torch.manual_seed(0)
    model, x = stack(OnePlusRMSNorm), torch.randn(64, 64)
    with torch.no_grad():
        for m in model:
            if isinstance(m, OnePlusRMSNorm):
                m.weight.uniform_(-spread, spread)
    report = varprobe.probe(model, x)
    with torch.no_grad():
        truth = model[1](model[0](x)).double().square().mean().item()
    norm = report.layers[1]
    assert norm.kind == "norm"
    # the measured output, and the prediction against the module's own float64 output
    assert norm.forward.second_moment == pytest.approx(truth, rel=1e-5)
    assert norm.predicted.forward_var == pytest.approx(truth, rel=0.03)
    assert all(layer.predicted.forward_var is not None for layer in report.layers)


def test_on_meta_the_zero_weight_gives_a_gain_of_one():
    """``varprobe predict`` on meta has no weight values: the norm's initial weight
    (zeros) stands, so its gain is (1 + 0)^2, as the same model on the CPU gives."""
    with torch.device("meta"):
        model = stack(OnePlusRMSNorm)
    closed = varprobe.predict.predict(model, input_shape=(64,), batch_size=64)
    cpu = varprobe.predict.predict(stack(OnePlusRMSNorm), input_shape=(64,), batch_size=64)
    for meta_layer, cpu_layer in zip(closed.layers, cpu.layers, strict=True):
        if meta_layer.kind == "norm":
            assert meta_layer.predicted.forward_var == pytest.approx(1.0, rel=1e-3)
            assert cpu_layer.predicted.forward_var == pytest.approx(1.0, rel=1e-3)


class ScaledEmbedding(nn.Embedding):
    """As transformers' BartScaledWordEmbedding ("number"), Gemma's ("both": a float
    copy beside the buffer the forward reads) or a buffer alone ("buffer")."""

    def __init__(self, n: int, d: int, scale: float, kind: str = "number"):
        super().__init__(n, d)
        if kind == "both":
            self.scalar_embed_scale = scale
        if kind == "number":
            self.embed_scale = scale
        else:
            self.embed_scale = nn.Buffer(torch.tensor(scale), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale


class Positions(nn.Embedding):
    """As OPT's learned positional embedding: its rows looked up at shifted ids."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids % (self.num_embeddings - 2) + 2)


class Lm(nn.Module):
    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.embed = embedding
        self.norm = OnePlusRMSNorm(32)
        self.head = nn.Linear(32, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(ids)))


@pytest.mark.parametrize("kind", ["number", "both", "buffer", "buffer, accelerator path"])
def test_a_scaled_embedding_is_predicted_with_its_scale(kind, monkeypatch):
    """A word embedding that multiplies its rows by sqrt(d) (Gemma's, BART's with
    scale_embedding): E[y^2] = E[w^2] d, which the stream's norm hides in the forward and
    its backward gain 1/E[x^2] shows. Truth: the lookup's own output and the autograd
    gradient at it, float64, within the sampling error of 64 x 16 tokens' rows (5%). A
    buffer's value comes through the pass's one transfer on an accelerator."""
    if kind.endswith("accelerator path"):
        monkeypatch.setattr(stats, "reads_are_free", lambda device: False)
    torch.manual_seed(0)
    model = Lm(ScaledEmbedding(50, 32, 32 ** 0.5, kind.split(",")[0]))
    ids = torch.randint(0, 50, (64, 16))
    report = varprobe.probe(model, ids)
    layers = {layer.name: layer for layer in report.layers}
    with torch.no_grad():
        truth = model.embed(ids).double().square().mean().item()
    assert layers["embed"].predicted.forward_var == pytest.approx(truth, rel=0.05)
    # the norm's backward gain from the stream's predicted scale
    assert layers["embed"].predicted.backward_var == pytest.approx(
        layers["embed"].backward.var, rel=0.05)


def test_a_positional_embedding_is_a_lookup():
    """An override that looks its rows up at other ids keeps the lookup's E[w^2]."""
    torch.manual_seed(0)
    model = Lm(Positions(50, 32))
    ids = torch.randint(0, 50, (64, 16))
    report = varprobe.probe(model, ids)
    with torch.no_grad():
        truth = model.embed(ids).double().square().mean().item()
    assert report.layers[0].predicted.forward_var == pytest.approx(truth, rel=0.05)
