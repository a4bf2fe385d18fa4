"""`varprobe analyze`: formats, report files, the model-file contract, `python -m`."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.cli_helpers import run
from tests.schema import check_report

MODEL = """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

        def forward(self, x, *, scale=1.0):
            return self.body(x) * scale

    model = Net()
    """


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "net.py"
    path.write_text(textwrap.dedent(MODEL))
    return path


def test_json_to_stdout(model_file, capsys):
    result = run(capsys, "analyze", model_file, "--format", "json", "-b", "8")
    assert result.code == 0
    data = json.loads(result.out)
    check_report(data)
    assert data["settings"]["batch_size"] == 8
    assert [layer["name"] for layer in data["layers"]] == ["body.0", "body.1", "body.2"]


def test_csv_has_one_row_per_layer_call(model_file, capsys, tmp_path):
    out = tmp_path / "r.csv"
    result = run(capsys, "analyze", model_file, "-f", "csv", "-o", out)
    frame = pd.read_csv(io.StringIO(result.out))
    assert list(frame["name"]) == ["body.0", "body.1", "body.2"]
    assert "forward.var" in frame.columns and "backward.var" in frame.columns
    assert pd.read_csv(out).shape == frame.shape


def test_table_shows_weight_layers_and_all_layers_adds_the_rest(model_file, capsys):
    plain = run(capsys, "analyze", model_file).out
    every = run(capsys, "analyze", model_file, "--all-layers").out
    assert "body.0" in plain and "body.2" in plain and "body.1" not in plain
    assert "body.1" in every


def test_markdown_output_file(model_file, capsys, tmp_path):
    out = tmp_path / "r.md"
    assert run(capsys, "analyze", model_file, "-o", out).code == 0
    text = out.read_text()
    assert "body.0" in text and "|" in text


def test_example_input_and_loss_from_the_model_file(tmp_path, capsys):
    path = tmp_path / "custom.py"
    path.write_text(textwrap.dedent("""
        import torch
        from torch import nn
        model = nn.Linear(5, 2)

        def example_input(batch_size):
            return torch.full((batch_size, 5), 2.0)

        def loss(output):
            return output.sum()
        """))
    data = json.loads(run(capsys, "analyze", path, "-f", "json", "-b", "3").out)
    assert data["input"]["shape"] == [3, 5]
    assert data["input"]["second_moment"] == pytest.approx(4.0)
    assert data["settings"]["grad"] == "loss"
    assert data["layers"][0]["backward"]["second_moment"] == pytest.approx(1.0)


def test_named_targets_and_module_targets(tmp_path, capsys, monkeypatch):
    (tmp_path / "cli_target_zoo.py").write_text(textwrap.dedent("""
        from torch import nn
        small = nn.Linear(3, 3)
        def build_wide():
            return nn.Linear(3, 30)
        """))
    by_path = json.loads(run(capsys, "analyze", f"{tmp_path}/cli_target_zoo.py:build_wide", "-f",
                             "json").out)
    assert by_path["layers"][0]["fan_out"] == 30
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = json.loads(run(capsys, "analyze", "cli_target_zoo:small", "-f", "json").out)
    assert by_module["layers"][0]["fan_out"] == 3


@pytest.mark.parametrize("suffix", [".pt", ".npy"])
def test_real_data_from_a_file(model_file, capsys, tmp_path, suffix):
    data = torch.full((7, 6), 3.0)
    path = tmp_path / f"batch{suffix}"
    if suffix == ".pt":
        torch.save(data, path)
    else:
        np.save(path, data.numpy())
    report = json.loads(run(capsys, "analyze", model_file, "--input", path, "-f", "json").out)
    assert report["input"]["shape"] == [7, 6]
    assert report["input"]["second_moment"] == pytest.approx(9.0)


def test_input_shape_option(tmp_path, capsys):
    path = tmp_path / "conv.py"
    path.write_text("from torch import nn\nmodel = nn.Conv2d(3, 4, 3)\n")
    report = json.loads(run(capsys, "analyze", path, "--input-shape", "3,9,9", "-b", "2",
                            "-f", "json").out)
    assert report["input"]["shape"] == [2, 3, 9, 9]
    assert report["layers"][0]["shape"] == [2, 4, 7, 7]


def test_python_dash_m_and_console_script_agree(model_file):
    script = Path(sys.executable).with_name("varprobe")  # installed beside the interpreter
    args = ["analyze", str(model_file), "-f", "json"]
    as_module = subprocess.run([sys.executable, "-m", "varprobe", *args], capture_output=True,
                               text=True, check=True).stdout
    as_script = subprocess.run([str(script), *args], capture_output=True, text=True,
                               check=True).stdout
    check_report(json.loads(as_module))
    assert json.loads(as_module)["layers"] == json.loads(as_script)["layers"]


def test_seed_makes_the_model_files_own_init_repeat(model_file, capsys):
    # `model = Net()` draws its weights when the file is imported: --seed fixes them.
    def weight_var(*args):
        data = json.loads(run(capsys, "analyze", model_file, "-f", "json", *args).out)
        return data["layers"][0]["weight_var"]

    state = torch.get_rng_state()
    assert weight_var() == weight_var("--seed", "0")
    assert weight_var("--seed", "1") != weight_var("--seed", "0")
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
