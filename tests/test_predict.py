"""``varprobe predict``: the closed form from a shape-only pass, on meta or on the CPU.

Predictions are functions of shapes, fans, gains and weight variances only, so with the
weight variances fixed (an ``--init`` scheme) a meta build and a CPU build must give the
very same numbers; the counterfactual schemes never depend on the realized weights.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from typer.testing import CliRunner

import varprobe
from varprobe.cli import app
from varprobe.predict import predict_target

MODEL = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.act2 = nn.Tanh()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = self.act1(self.bn(self.conv1(x)))
        return self.fc(self.flat(self.pool(self.act2(self.conv2(h)))))


model = Net
example_input = lambda batch: torch.randn(batch, 3, 16, 16)
"""

NEEDS_VALUES = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        depth = int(torch.tensor(2.0).item())  # data-dependent: fails on meta
        self.layers = nn.Sequential(*(nn.Linear(12, 12) for _ in range(depth)))

    def forward(self, x):
        return self.layers(x)


model = Net
"""


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(MODEL)
    return str(path)


def structure(report):
    return [(layer.name, layer.call, layer.type, layer.kind, layer.shape, layer.input_shape,
             layer.fan_in, layer.fan_out) for layer in report.layers]


def predictions(report):
    out = {}
    for layer in report.layers:
        p = layer.predicted
        out[layer.label] = None if p is None else (p.forward_var, p.backward_var)
        for name, s in layer.schemes.items():
            out[f"{layer.label}/{name}"] = (s.forward_var, s.backward_var)
    return out


def same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if a[key] is None or b[key] is None:
            assert a[key] == b[key], key
            continue
        for x, y in zip(a[key], b[key]):
            assert (x is None and y is None) or math.isclose(x, y, rel_tol=1e-12), key


def test_meta_and_cpu_give_the_same_predictions(model_file):
    meta = predict_target(model_file, batch_size=4, init="he")
    cpu = predict_target(model_file, batch_size=4, init="he", device="cpu")
    assert meta.settings["device"] == "meta" and cpu.settings["device"] == "cpu"
    assert structure(meta) == structure(cpu)
    same(predictions(meta), predictions(cpu))
    ends = lambda r: (r.summary.forward_ratio, r.summary.backward_ratio)  # noqa: E731
    assert ends(meta) == ends(cpu)


def test_counterfactual_schemes_do_not_depend_on_the_weights(model_file):
    meta = predict_target(model_file, batch_size=4)
    cpu = predict_target(model_file, batch_size=4, device="cpu")
    keep = lambda p: {k: v for k, v in p.items() if "/" in k}  # noqa: E731
    same(keep(predictions(meta)), keep(predictions(cpu)))
    # Meta has no weight values (PyTorch's default assumed, said in a note); the CPU
    # build reads them.
    fc_meta, fc_cpu = meta.layers[-1], cpu.layers[-1]
    assert fc_meta.weight_var is None and "meta" in fc_meta.unavailable["weight_var"]
    assert fc_cpu.weight_var == pytest.approx(1 / (3 * 16), rel=0.25)  # 170 draws
    assert any("PyTorch default init" in note for note in meta.notes)


def test_structure_matches_a_measured_probe(model_file):
    from varprobe import target

    predicted = predict_target(model_file, batch_size=4, device="cpu")
    loaded = target.load(model_file)
    measured = varprobe.probe(loaded.model, loaded.example_input, batch_size=4, mode="train")
    assert structure(predicted) == structure(measured)


def test_measured_fields_are_null_with_a_reason(model_file):
    report = predict_target(model_file, batch_size=4)
    data = report.to_dict()
    assert data["input"]["var"] is None and data["input"]["shape"] == [4, 3, 16, 16]
    for layer in data["layers"]:
        for key in ("input", "forward", "backward", "backward_input"):
            assert layer[key] is None
            assert "not measured" in layer["unavailable"][key]
    assert data["settings"]["source"] == "closed-form"
    assert any(layer["predicted"] for layer in data["layers"])


def test_a_model_too_big_to_allocate_is_predicted_on_meta(tmp_path):
    path = tmp_path / "big.py"
    path.write_text("from torch import nn\n"
                    "model = lambda: nn.Sequential(nn.Linear(100_000, 100_000), nn.ReLU(),\n"
                    "                              nn.Linear(100_000, 100_000))\n")
    start = time.perf_counter()
    report = predict_target(str(path), batch_size=2)
    assert time.perf_counter() - start < 20
    assert report.model.parameters == 2 * (100_000 * 100_000 + 100_000)  # 80 GB in fp32
    assert report.layers[-1].predicted.forward_var is not None


def test_falls_back_to_the_cpu_with_a_note(tmp_path):
    path = tmp_path / "needs_values.py"
    path.write_text(NEEDS_VALUES)
    report = predict_target(str(path), batch_size=4)
    assert "could not be built or run on the meta device" in report.notes[0]
    assert report.settings["device"] == "cpu"
    assert report.layers[0].weight_var is not None  # read from the real weights


def test_cli_predict_writes_the_report_schema(model_file, tmp_path):
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["predict", model_file, "-b", "4", "-f", "json",
                                      "-o", str(out), "--init", "xavier"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["schema"] == "varprobe.report/1"
    assert data["settings"]["init"] == "xavier"
    assert data["layers"][0]["weight_var"] == pytest.approx(2 / (27 + 72))  # 2/(n_in+n_out)


def test_cli_unavailable_device_is_one_line_exit_2(model_file):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = CliRunner().invoke(app, ["predict", model_file, "--device", "cuda"])
    assert result.exit_code == 2
    assert "--device cuda" in result.output
