"""Random architectures: probe either raises VarprobeError or returns a schema-valid,
strict-JSON report, and the model is always left exactly as found.

Stacks and branches of Linear/Conv/norm/activation/dropout/residual/pooling layers at
random widths, with random inits that include zeros, 1e-30, 1e30 (overflows to inf a
few layers on), inf and NaN weights, frozen layers, train/eval mode and batch size 1.
"""

from __future__ import annotations

import json

import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from pristine import assert_untouched, give_grads, snapshot
from schema import check_report
from torch import nn

import varprobe
from varprobe.errors import VarprobeError
from varprobe.report import Report

ACTIVATIONS = {"relu": lambda: nn.ReLU(), "relu_": lambda: nn.ReLU(inplace=True),
               "tanh": nn.Tanh, "gelu": nn.GELU, "leaky": lambda: nn.LeakyReLU(0.1),
               "prelu": nn.PReLU, "sigmoid": nn.Sigmoid, "elu": nn.ELU,
               "hardswish": nn.Hardswish}
INITS = ("default", "default", "default", "zero", "tiny", "huge", "inf", "nan")
widths = st.integers(1, 12)


def layer(image: bool):
    return st.one_of(
        st.tuples(st.just("weight"), widths, st.sampled_from([1, 3]), st.booleans()),
        st.tuples(st.just("norm"), st.sampled_from(["batch", "layer", "group"])),
        st.tuples(st.just("act"), st.sampled_from(sorted(ACTIVATIONS))),
        st.tuples(st.just("dropout"), st.sampled_from([0.0, 0.5, 1.0])),
        st.tuples(st.just("pool"), st.sampled_from(["max", "avg"])) if image
        else st.tuples(st.just("act"), st.just("tanh")),
    )


def block(image: bool):
    inner = st.lists(layer(image), min_size=1, max_size=3)
    return st.one_of(
        layer(image),
        st.tuples(st.just("residual"), inner),
        st.tuples(st.just("branch"), st.lists(inner, min_size=2, max_size=3),
                  st.sampled_from(["cat", "add"])),
    )


@st.composite
def architectures(draw):
    image = draw(st.booleans())
    return {
        "image": image,
        "width": draw(widths),
        "blocks": draw(st.lists(block(image), min_size=2, max_size=6)),
        "head": draw(st.booleans()),
        "inits": draw(st.lists(st.sampled_from(INITS), min_size=12, max_size=12)),
        "frozen": draw(st.lists(st.booleans(), min_size=12, max_size=12)),
        "dtype": draw(st.sampled_from([torch.float32, torch.float32, torch.float64])),
        "mode": draw(st.sampled_from([None, "train", "eval"])),
        "batch": draw(st.integers(1, 4)),
    }


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Branches(nn.Module):
    def __init__(self, branches: list[nn.Module], combine: str):
        super().__init__()
        self.branches, self.combine = nn.ModuleList(branches), combine

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        return torch.cat(outs, 1) if self.combine == "cat" else torch.stack(outs).sum(0)


class Builder:
    """Turns a spec into modules, tracking channels and spatial size as it goes."""

    def __init__(self, image: bool, width: int):
        self.image, self.channels, self.size = image, width, 8

    def make(self, spec, keep_width: bool = False, nested: bool = False) -> nn.Module:
        kind = spec[0]
        if kind == "residual":
            start = (self.channels, self.size)
            body = nn.Sequential(*(self.make(s, True, True) for s in spec[1]))
            assert (self.channels, self.size) == start
            return Residual(body)
        if kind == "branch":
            start, branches, widths_out = (self.channels, self.size), [], []
            for inner in spec[1]:
                self.channels, self.size = start
                keep = spec[2] == "add"
                branches.append(nn.Sequential(*(self.make(s, keep, True) for s in inner)))
                widths_out.append(self.channels)
            self.channels = sum(widths_out) if spec[2] == "cat" else start[0]
            self.size = start[1]
            return Branches(branches, spec[2])
        return self.leaf(spec, keep_width, nested)

    def leaf(self, spec, keep_width: bool, nested: bool) -> nn.Module:
        kind, c = spec[0], self.channels
        if kind == "weight":
            out = c if keep_width else spec[1]
            self.channels = out
            if self.image:
                return nn.Conv2d(c, out, spec[2], padding=spec[2] // 2, bias=spec[3])
            return nn.Linear(c, out, bias=spec[3])
        if kind == "norm":
            if spec[1] == "layer" or not self.image and spec[1] == "group":
                return nn.LayerNorm(c) if not self.image else nn.GroupNorm(1, c)
            if spec[1] == "group":
                return nn.GroupNorm(1, c)
            return nn.BatchNorm2d(c) if self.image else nn.BatchNorm1d(c)
        if kind == "act":
            return ACTIVATIONS[spec[1]]()
        if kind == "dropout":
            return nn.Dropout(spec[1])
        if kind == "pool" and not nested and self.size >= 2:  # branches keep their size
            self.size //= 2
            return nn.MaxPool2d(2) if spec[1] == "max" else nn.AvgPool2d(2)
        return nn.Identity()


def build(arch: dict) -> tuple[nn.Module, tuple[int, ...]]:
    builder = Builder(arch["image"], arch["width"])
    layers = [builder.make(spec) for spec in arch["blocks"]]
    if arch["head"]:
        if arch["image"]:
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        layers.append(nn.Linear(builder.channels, 3))
    model = nn.Sequential(*layers).to(arch["dtype"])
    weights = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for m, init, frozen in zip(weights, arch["inits"], arch["frozen"]):
            reinit(m.weight, init)
            m.requires_grad_(not frozen)
    shape = (arch["width"], 8, 8) if arch["image"] else (arch["width"],)
    return model, shape


def reinit(w: torch.Tensor, init: str) -> None:
    if init == "zero":
        w.zero_()
    elif init == "tiny":
        w.mul_(1e-30)
    elif init == "huge":
        w.mul_(1e30)  # float32 overflows to inf within a layer or two
    elif init in ("inf", "nan"):
        w.fill_(float(init))


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(architectures())
# Always covered: train-mode BatchNorm on a batch of one (the model raises), a deep
# stack whose 1e30 weights overflow to inf and then NaN, a model whose own backward
# fails (ReLU(inplace) overwrites a tensor that Linear saved), and a zero weight matrix
# between two others (n·Var[w] = 0 for the diagnosis).
@example({"image": False, "width": 4, "blocks": [("weight", 4, 1, True), ("norm", "batch")],
          "head": True, "inits": ["default"] * 12, "frozen": [False] * 12,
          "dtype": torch.float32, "mode": "train", "batch": 1})
@example({"image": True, "width": 3, "blocks": [("weight", 6, 3, True), ("act", "relu_")] * 3,
          "head": True, "inits": ["huge"] * 12, "frozen": [False] * 12,
          "dtype": torch.float32, "mode": None, "batch": 2})
@example({"image": False, "width": 1, "blocks": [
          ("weight", 1, 1, False), ("branch", [[("weight", 1, 1, False)], [("act", "relu_")]],
                                    "cat")],
          "head": False, "inits": ["default"] * 12, "frozen": [False] * 12,
          "dtype": torch.float32, "mode": None, "batch": 1})
@example({"image": False, "width": 1, "blocks": [("weight", 1, 1, False)] * 2, "head": True,
          "inits": ["default", "zero"] + ["default"] * 10, "frozen": [False] * 12,
          "dtype": torch.float32, "mode": None, "batch": 1})
def test_random_architectures_never_crash_and_are_left_untouched(arch):
    torch.manual_seed(0)
    model, shape = build(arch)
    give_grads(model)
    before = snapshot(model)
    try:
        report = varprobe.probe(model, batch_size=arch["batch"], input_shape=shape,
                                mode=arch["mode"])
    except VarprobeError as exc:
        message = str(exc)
        event(f"VarprobeError: {message[:60]}")
        assert message and "\n" not in message  # one clear line
        assert_untouched(model, before)
        return
    assert_untouched(model, before)
    nonfinite = any(layer.forward and layer.forward.nonfinite for layer in report.layers)
    event(f"report ({'non-finite' if nonfinite else 'finite'}, notes: {len(report.notes)})")
    data = report.to_dict()
    check_report(data)
    text = json.dumps(data, allow_nan=False)
    assert Report.from_dict(json.loads(text)).to_dict() == data
    assert len(report.layers) >= 1
    for layer in report.layers:  # a reason for every missing measurement
        if layer.forward is None:
            assert "forward" in layer.unavailable, layer.label
        if layer.backward is None and not any("backward unavailable" in n for n in report.notes):
            assert "backward" in layer.unavailable, layer.label
