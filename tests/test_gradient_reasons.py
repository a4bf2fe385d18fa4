"""A layer without a gradient says why, truly; where the gradient is measurable, it is
measured. The cases: a module that passes its input through unchanged (Identity,
Dropout at p=0, one returning its input) whose output is then overwritten in place, a
module whose output is a view overwritten in place, an in-place activation right after
a weight layer, an output nobody uses, and transformers' dropout at p=0.

Expected gradients come from plain autograd on the same network written without the
in-place ops (the same function, so the same gradient), in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import varprobe
from tests.reference import RTOL, capture

BATCH, WIDTH = 32, 8


class Returns(nn.Module):
    """A module that returns its input as is."""

    def forward(self, x):
        return x


class Reshapes(nn.Module):
    def forward(self, x):
        return x.view(x.shape[0], -1)


class ThroughThenInPlace(nn.Module):
    """``a`` -> a pass-through module -> an in-place op -> ``b``."""

    def __init__(self, through: nn.Module, in_place: str):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.through, self.b = nn.Linear(WIDTH, WIDTH), through, nn.Linear(WIDTH, 4)
        self.relu = nn.ReLU(inplace=True) if in_place == "module" else None

    def forward(self, x):
        h = self.through(self.a(x))
        h = self.relu(h) if self.relu is not None else h.mul_(2.0)
        return self.b(h)

    def plain(self, x):
        """The same function without in-place ops, and the tensor after ``a``."""
        h = self.a(x)
        return self.b(F.relu(h) if self.relu is not None else h * 2.0), h


def var(t: torch.Tensor) -> float:
    return t.double().var(unbiased=False).item()


def layer(report, name: str):
    return next(item for item in report.layers if item.name == name)


def gradient_after_a(model: ThroughThenInPlace, x, g) -> torch.Tensor:
    out, h = model.plain(x)
    return torch.autograd.grad(out, h, g)[0]


PASS_THROUGH = {
    "identity": lambda: nn.Identity(),
    "dropout-p0": lambda: nn.Dropout(0.0),
    "returns-input": lambda: Returns(),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("in_place", ["module", "functional"])
@pytest.mark.parametrize("kind", sorted(PASS_THROUGH))
def test_a_passed_through_tensor_overwritten_in_place_has_its_gradient_measured(
        kind, in_place, mode):
    model = ThroughThenInPlace(PASS_THROUGH[kind](), in_place).train(mode == "train")
    x, g = torch.randn(BATCH, WIDTH), torch.randn(BATCH, 4)
    expected = var(gradient_after_a(model, x, g))
    report = varprobe.probe(model, x, grad_output=g, mode=mode)
    through = layer(report, "through")
    # Its output is the very tensor ``a`` returned, unchanged until the in-place op:
    # the gradient w.r.t. it is the gradient after ``a``. float32 reductions of the same
    # values: tests/reference.py's RTOL.
    assert through.backward is not None and through.backward_input is not None, \
        through.unavailable
    assert through.backward.var == pytest.approx(expected, rel=RTOL)
    assert through.backward_input.var == pytest.approx(expected, rel=RTOL)
    assert layer(report, "a").backward.var == pytest.approx(expected, rel=RTOL)


def test_an_in_place_activation_after_a_weight_layer_leaves_its_gradient_measured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(inplace=True), nn.Linear(WIDTH, 4))
    x, g = torch.randn(BATCH, WIDTH), torch.randn(BATCH, 4)
    h = model[0](x)
    expected = var(torch.autograd.grad(model[2](F.relu(h)), h, g)[0])
    report = varprobe.probe(model, x, grad_output=g)
    assert report.layers[0].backward.var == pytest.approx(expected, rel=RTOL)
    assert "in place" in report.layers[1].unavailable["backward_input"]


class ViewThenInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.view, self.b = nn.Linear(WIDTH, WIDTH), Reshapes(), nn.Linear(WIDTH, 4)

    def forward(self, x):
        h = self.view(self.a(x))
        h.relu_()
        return self.b(h)


def test_a_view_output_overwritten_in_place_says_so():
    report = varprobe.probe(ViewThenInPlace(), torch.randn(BATCH, WIDTH))
    view = layer(report, "view")
    assert view.backward is None and view.backward_input is None
    assert "view that was modified in place" in view.unavailable["backward"]
    assert "a view of its input, was modified in place" in view.unavailable["backward_input"]
    assert layer(report, "a").backward is not None  # the gradient still flows on


def test_passing_the_network_input_through_then_overwriting_it_says_so():
    model = nn.Sequential(nn.Identity(), nn.ReLU(inplace=True), nn.Linear(WIDTH, 4))
    report = varprobe.probe(model, torch.randn(BATCH, WIDTH))
    identity = report.layers[0]
    assert identity.backward is None
    for key in ("backward", "backward_input"):
        assert "passed its input through unchanged" in identity.unavailable[key]


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(WIDTH, 4), nn.Linear(WIDTH, 4)

    def forward(self, x):
        self.unused(x)
        return self.used(x)


def test_an_unused_output_says_no_gradient_reached_it():
    report = varprobe.probe(Unused(), torch.randn(BATCH, WIDTH))
    assert layer(report, "unused").unavailable["backward"] == "no gradient reached this tensor"
    assert layer(report, "used").backward is not None


def test_transformers_dropout_at_p0_is_measured_like_plain_autograd():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tf.BertModel(tf.BertConfig(
        num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
        vocab_size=50, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)).train()
    ids = torch.randint(3, 50, (2, 8))
    with torch.no_grad():
        shapes = [t.shape for t in model(input_ids=ids).to_tuple()]
    cotangents = [torch.randn(shape) for shape in shapes]
    report = varprobe.probe(model, {"input_ids": ids}, grad_output=cotangents, mode="train")
    dropouts = [item.name for item in report.layers if item.type == "Dropout"]
    assert dropouts
    reference = capture(model, {"input_ids": ids}, cotangents, dropouts)
    for name in dropouts:
        [(_, grad)] = reference[name]
        assert layer(report, name).backward.var == pytest.approx(var(grad), rel=RTOL), name


@pytest.mark.parametrize("frozen", ["first", "head", "all"])
def test_frozen_weights_add_no_flag(frozen):
    """Fine-tuning freezes weights (requires_grad=False): they say so, and the backward
    rule that weighs whether the weights along a chain learn at one rate leaves them
    out, so freezing adds no error. A 30-layer Xavier ReLU MLP: vanishing forward, its
    trainable layers' ‖∇W‖/‖W‖ balanced, so no vanishing_backward with or without."""
    import corpus
    from varprobe.report import FROZEN

    def errors(model):
        e = corpus.entry("mlp30_xavier_relu")
        report = varprobe.probe(model, e.example(), batch_size=e.batch_size)
        return report, sorted((f.code, layer.name) for layer in report.layers
                              for f in layer.flags if f.severity == "error")

    entry = corpus.entry("mlp30_xavier_relu")
    _, plain = errors(entry.build())
    model = entry.build()
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    for w in {"first": weights[:1], "head": weights[-1:], "all": weights}[frozen]:
        w.requires_grad_(False)
    report, flags = errors(model)
    assert flags == plain == [("vanishing_forward", "58")]
    layers = {layer.name: layer for layer in report.layers}
    name = {"first": "0", "head": "58", "all": "0"}[frozen]
    assert layers[name].unavailable["weight_grad_ratio"] == FROZEN
