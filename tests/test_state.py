"""The user's model is left exactly as found, also when it raises half-way."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import varprobe
from varprobe.errors import VarprobeError


def net() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Dropout(0.3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    model[0].weight.requires_grad_(False)  # a frozen layer
    model.eval()
    model[1].train()  # mixed modes must survive
    model[5].weight.grad = torch.full_like(model[5].weight, 7.0)
    return model


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "grads": [p.grad for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "rng": torch.get_rng_state(),
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                   m._is_full_backward_hook) for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert after["modes"] == before["modes"]
    assert all(a is b for a, b in zip(after["grads"], before["grads"]))
    assert after["requires_grad"] == before["requires_grad"]
    assert torch.equal(after["rng"], before["rng"])
    assert after["hooks"] == before["hooks"]


def test_probe_in_train_mode_leaves_everything_as_found():
    model, x = net(), torch.randn(16, 3, 6, 6)
    before = snapshot(model)
    report = varprobe.probe(model, x, mode="train")
    assert_unchanged(model, before)
    # The probe really ran in train mode: BatchNorm used batch statistics.
    bn = report.layers[1].forward
    assert bn.mean == pytest.approx(0.0, abs=1e-5)
    assert bn.var == pytest.approx(1.0, abs=1e-3)


class Explodes(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.second = nn.Linear(4, 4)

    def forward(self, x):
        x = self.bn(self.first(x))
        raise RuntimeError("boom")


def test_a_model_that_raises_is_restored_and_named():
    model, x = Explodes(), torch.randn(8, 4)
    before = snapshot(model)
    with pytest.raises(VarprobeError, match="boom"):
        varprobe.probe(model, x, mode="train")
    assert_unchanged(model, before)


def test_the_failing_layer_is_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(VarprobeError, match=r"layer 2 \(Linear\)"):
        varprobe.probe(model, torch.randn(8, 4))


def test_seeded_runs_repeat_and_do_not_touch_the_global_rng():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    state = torch.get_rng_state()
    a = varprobe.probe(model, seed=3, mode="train")
    b = varprobe.probe(model, seed=3, mode="train")
    assert torch.equal(torch.get_rng_state(), state)
    assert a.to_dict()["layers"] == b.to_dict()["layers"]
    c = varprobe.probe(model, seed=4, mode="train")
    assert c.layers[0].forward.var != a.layers[0].forward.var


def test_a_module_compiled_in_place_is_probed_eagerly_and_stays_compiled():
    """Module.compile() routes every call through dynamo, which would trace the probe's
    hooks (tens of times slower): the probe runs the eager calls (no frame reaches
    dynamo), measures what the uncompiled twin gives, and the compiled call is back
    afterwards."""
    import torch._dynamo

    model, twin = net(), net()
    twin.load_state_dict(model.state_dict())
    model.compile(backend="eager")
    compiled = model._compiled_call_impl
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    x = torch.randn(16, 3, 6, 6)
    report = varprobe.probe(model, x)
    assert sum(torch._dynamo.utils.counters["frames"].values()) == 0
    assert model._compiled_call_impl is compiled
    expected = varprobe.probe(twin, x)
    assert [(layer.forward.var, layer.backward.var) for layer in report.layers] == \
        [(layer.forward.var, layer.backward.var) for layer in expected.layers]
