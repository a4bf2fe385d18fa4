"""Recorded statistics equal an independent float64 computation on the same input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import varprobe

# float32 moments over ~1e4 elements agree with float64 to ~1e-6 relative.
RTOL = 1e-5


def moments(t: torch.Tensor) -> dict[str, float]:
    a = t.detach().double().numpy()
    return {"mean": a.mean(), "var": a.var(), "second_moment": (a * a).mean()}


def pvar(t: torch.Tensor) -> float:
    """Population variance, as varprobe reports it."""
    return float(t.detach().double().numpy().var())


def assert_moments(measured, reference: torch.Tensor) -> None:
    ref = moments(reference)
    for key, value in ref.items():
        assert getattr(measured, key) == pytest.approx(value, rel=RTOL, abs=1e-12), key


def mlp() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.Tanh(),
                         nn.Linear(48, 8))


def reference_pass(model: nn.Sequential, x: torch.Tensor, g: torch.Tensor):
    """Plain autograd with retain_grad on every intermediate: the ground truth."""
    x = x.clone().requires_grad_()
    acts, h = [], x
    for m in model:
        h = m(h)
        h.retain_grad()
        acts.append(h)
    acts[-1].backward(g)
    return x, acts


def test_forward_backward_and_weight_stats_match_autograd():
    model = mlp()
    x, g = torch.randn(128, 32), torch.randn(128, 8)
    report = varprobe.probe(model, x, grad_output=g)
    xin, acts = reference_pass(model, x, g)
    assert [layer.name for layer in report.layers] == ["0", "1", "2", "3", "4"]
    for layer, act in zip(report.layers, acts):
        assert_moments(layer.forward, act)
        assert layer.backward.var == pytest.approx(pvar(act.grad), rel=RTOL)
    # Gradient w.r.t. each layer's own input: the previous activation's gradient.
    inputs = [xin] + acts[:-1]
    for layer, inp in zip(report.layers, inputs):
        assert_moments(layer.input, inp)
        assert layer.backward_input.var == pytest.approx(pvar(inp.grad),
                                                         rel=RTOL)
    relu = report.layers[1].forward
    a = acts[1].detach().numpy()
    assert relu.zero_fraction == pytest.approx((a == 0).mean(), abs=1e-9)
    assert relu.dead_fraction == pytest.approx((a == 0).all(axis=0).mean(), abs=1e-9)
    for layer, m in zip(report.layers[::2], model[::2]):
        w = m.weight.detach().double().numpy()
        assert layer.weight_var == pytest.approx(w.var(), rel=RTOL)
        assert layer.bias_second_moment == pytest.approx(
            (m.bias.detach().double().numpy() ** 2).mean(), rel=RTOL)
        assert layer.weight_grad_ratio == pytest.approx(
            np.linalg.norm(m.weight.grad.double().numpy()) / np.linalg.norm(w), rel=RTOL)


def test_dead_units_are_channels_for_convs():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight[1].zero_()
        conv.bias[1] = -1.0  # channel 1 is -1 everywhere, so ReLU kills it
    model = nn.Sequential(conv, nn.ReLU())
    report = varprobe.probe(model, torch.randn(8, 3, 6, 6))
    assert report.layers[1].forward.dead_fraction == pytest.approx(0.25)


class InPlace(nn.Module):
    """A hooked Linear whose output is then modified in place twice."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.lin(x)
        y += x
        return self.act(y)


def test_inplace_ops_after_a_hooked_module():
    torch.manual_seed(0)
    model = InPlace()
    x, g = torch.randn(64, 16), torch.randn(64, 16)
    report = varprobe.probe(model, x, grad_output=g)
    lin, act = report.layers
    xr = x.clone().requires_grad_()
    y = model.lin(xr)
    y.retain_grad()
    s = y + xr
    s.retain_grad()
    torch.relu(s).backward(g)
    assert_moments(lin.forward, y)  # measured before `y += x` overwrote it
    assert lin.backward.var == pytest.approx(pvar(y.grad), rel=RTOL)
    assert_moments(act.input, s)
    assert act.backward_input is None
    assert "in place" in act.unavailable["backward_input"]


class Reuse(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(8, 8)

    def forward(self, x):
        return self.shared(torch.relu(self.shared(x)))


def test_a_reused_module_gets_one_record_per_call():
    torch.manual_seed(0)
    model = Reuse()
    x, g = torch.randn(32, 8), torch.randn(32, 8)
    report = varprobe.probe(model, x, grad_output=g)
    assert [(layer.name, layer.call) for layer in report.layers] == [("shared", 0),
                                                                      ("shared", 1)]
    xr = x.clone().requires_grad_()
    h1 = model.shared(xr)
    h1.retain_grad()
    h2 = model.shared(torch.relu(h1))
    h2.retain_grad()
    h2.backward(g)
    for layer, ref in zip(report.layers, (h1, h2)):
        assert_moments(layer.forward, ref)
        assert layer.backward.var == pytest.approx(pvar(ref.grad), rel=RTOL)


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(5, 6)

    def forward(self, *, left, right, scale=1.0):
        return {"sum": self.a(left) + self.b(right) * scale, "aux": (self.a(left), left)}


def test_dict_input_passed_as_keywords_and_dict_tuple_output():
    torch.manual_seed(0)
    model = DictModel()
    inputs = {"left": torch.randn(16, 4), "right": torch.randn(16, 5)}
    report = varprobe.probe(model, inputs)
    assert [(layer.name, layer.call) for layer in report.layers] == [
        ("a", 0), ("b", 0), ("a", 1)]
    assert report.input.shape == {"left": [16, 4], "right": [16, 5]}
    ref = model.a(inputs["left"])
    assert_moments(report.layers[0].forward, ref)
    # The default cotangent sits on the first output leaf ("sum"); the second call of
    # `a` feeds only "aux", so no gradient reaches it.
    assert report.layers[0].backward is not None and report.layers[1].backward is not None
    assert report.layers[2].backward is None
    assert "no gradient" in report.layers[2].unavailable["backward"]


def test_grad_output_pytree_is_used_exactly():
    torch.manual_seed(0)
    model = DictModel()
    inputs = {"left": torch.randn(16, 4), "right": torch.randn(16, 5)}
    zeros = torch.zeros(16, 6)
    cot = {"sum": torch.randn(16, 6), "aux": (zeros, torch.zeros(16, 4))}
    report = varprobe.probe(model, inputs, grad_output=cot)
    # Only "sum" carries gradient; the second call of `a` feeds only "aux".
    assert report.layers[2].backward.var == 0.0
    assert report.layers[1].backward.var == pytest.approx(
        pvar(cot["sum"]), rel=RTOL)


def test_embedding_input_is_integer_ids_in_range():
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 3))
    report = varprobe.probe(model, batch_size=4)
    assert report.input.dtype == "int64"
    assert report.input.shape == [4, 32]
    emb = report.layers[0]
    assert emb.input is None and "floating" in emb.unavailable["input"]
    assert emb.weight_grad_ratio > 0
    assert report.layers[1].backward.var > 0


def test_loss_replaces_the_cotangent():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x = torch.randn(10, 4)
    report = varprobe.probe(model, x, loss=lambda out: out.sum())
    assert report.settings["grad"] == "loss"
    assert report.layers[0].backward.var == 0.0  # d(sum)/dy is all ones
    assert report.layers[0].backward.second_moment == pytest.approx(1.0)


def test_nonfinite_values_are_counted_not_crashed_on():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with torch.no_grad():
        model[0].weight.fill_(float("inf"))
    report = varprobe.probe(model, torch.randn(8, 4))
    layer = report.layers[0]
    assert layer.forward.nonfinite > 0
    data = report.to_dict()
    assert data["layers"][0]["forward"]["var"] is None  # NaN is not JSON: null


def reparametrized(style: str) -> nn.Sequential:
    """mlp() with each Linear's weight computed from other tensors: torch's
    parametrizations (weight_norm, spectral_norm) or the old weight_norm hook."""
    from torch.nn.utils import parametrizations, weight_norm
    model = mlp()
    for i in (0, 2, 4):
        if style == "weight_norm":
            parametrizations.weight_norm(model[i])
        elif style == "spectral_norm":
            parametrizations.spectral_norm(model[i])
        else:
            weight_norm(model[i])
    return model


@pytest.mark.filterwarnings("ignore:.*weight_norm.* is deprecated:FutureWarning")
@pytest.mark.parametrize("style", ["weight_norm", "spectral_norm", "old_weight_norm"])
def test_a_computed_weight_is_the_layers_with_its_gradient(style):
    """The computed weight is the layer's: a Linear (not the modules that compute it),
    its moments and ||dL/dW|| / ||W|| those of the tensor it multiplies by, against
    plain autograd under the same cotangent (the probe's N(0, 1) of seed 0)."""
    model = reparametrized(style).eval()  # eval: spectral_norm's power iteration stays
    x = torch.randn(256, 32)
    report = varprobe.probe(model, x)
    assert [la.name for la in report.layers] == [str(i) for i in range(5)]
    layers = [la for la in report.layers if la.kind == "weight"]
    assert [la.type for la in layers] == ["Linear"] * 3
    weights = []  # the tensors each layer multiplied by, read as it ran
    handles = [model[i].register_forward_hook(lambda m, args, out: weights.append(m.weight))
               for i in (0, 2, 4)]
    with torch.nn.utils.parametrize.cached():
        out = model(x)
    for h in handles:
        h.remove()
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(out, weights, cotangent)
    for layer, w, g in zip(layers, weights, grads):
        assert layer.weight_var == pytest.approx(pvar(w), rel=RTOL)
        expected = float(g.double().norm() / w.detach().double().norm())
        assert layer.weight_grad_ratio == pytest.approx(expected, rel=RTOL)
