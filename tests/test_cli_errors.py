"""Bad input: one clear line on stderr naming file/layer and what to do, exit code 2."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.cli_helpers import run

MODELS = {
    "syntax.py": "def broken(:\n",
    "missing_import.py": "import not_a_real_package_xyz\n",
    "empty.py": "x = 1\n",
    "two.py": """
        from torch import nn
        a = nn.Linear(2, 2)
        b = nn.Linear(2, 2)
        """,
    "needs_args.py": """
        from torch import nn
        class Net(nn.Module):
            def __init__(self, width):
                super().__init__()
                self.lin = nn.Linear(width, width)
        """,
    "not_module.py": "model = 42\n",
    "shape.py": """
        from torch import nn
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(16, 2))
        """,
    "raises.py": """
        from torch import nn
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(4, 4)
            def forward(self, x):
                raise ValueError("forward is broken")
        """,
    "scripted.py": """
        import torch
        from torch import nn
        model = torch.jit.script(nn.Linear(4, 4))
        """,
    "no_input.py": """
        from torch import nn
        model = nn.Sequential(nn.ReLU())
        """,
    "raises_on_import.py": "raise RuntimeError('config missing')\n",
    "exits_on_import.py": "import sys\nsys.exit(5)\n",
    # a training script's own flags: run alone it sees none, so this parses
    "own_flags.py": """
        import argparse
        from torch import nn
        parser = argparse.ArgumentParser()
        parser.add_argument("--lr", type=float, default=0.1)
        args = parser.parse_args()
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        """,
}


@pytest.fixture
def models(tmp_path: Path) -> Path:
    for name, text in MODELS.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    (tmp_path / "notes.txt").write_text("hello")
    return tmp_path


CASES = [
    ("nope.py", "no such file"),
    ("notes.txt", "not a Python file"),
    ("syntax.py", "syntax error"),
    ("missing_import.py", "'not_a_real_package_xyz', which is not installed"),
    ("empty.py", "no model found; define `model` or `build_model()`"),
    ("two.py", "several models found (a, b)"),
    ("two.py:c", "no 'c' in it (models found: a, b)"),
    ("needs_args.py", "Net needs constructor arguments"),
    ("not_module.py", "is a int, not an nn.Module"),
    ("shape.py", "layer 2 (Linear)"),
    ("raises.py", "ValueError: forward is broken"),
    ("scripted.py", "TorchScript"),
    ("no_input.py", "--input-shape"),
    ("raises_on_import.py", "RuntimeError: config missing"),
    ("exits_on_import.py", "exited while importing (SystemExit 5)"),
]


@pytest.mark.parametrize(("target", "message"), CASES)
def test_bad_target_is_one_line_and_exit_2(models, capsys, target, message):
    result = run(capsys, "analyze", models / target, "--batch-size", "4")
    assert result.code == 2
    assert result.out == ""
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("varprobe: error: ")
    assert message in lines[0]
    assert "Traceback" not in result.err


def test_shape_error_names_the_file_layer_and_the_fix(models, capsys):
    result = run(capsys, "analyze", models / "shape.py", "-b", "4")
    assert "layer 2 (Linear)" in result.err and "--input-shape" in result.err


def test_debug_shows_the_traceback(models, capsys):
    result = run(capsys, "analyze", models / "raises.py", "--debug", "-b", "4")
    assert result.code == 2
    assert "Traceback" in result.err and "forward is broken" in result.err


@pytest.mark.parametrize("args", [
    ("--mode", "sideways"), ("--format", "yaml"), ("--batch-size", "0"),
    ("--input-shape", "3,x"), ("--device", "tpu9"), ("--bogus",),
])
def test_bad_option_values_exit_2(models, capsys, args):
    result = run(capsys, "analyze", models / "shape.py", *args)
    assert result.code == 2
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert "Traceback" not in result.err


def test_unwritable_output_writes_nothing(models, capsys, tmp_path):
    target = tmp_path / "missing_dir" / "report.json"
    model = tmp_path / "ok.py"
    model.write_text("from torch import nn\nmodel = nn.Linear(4, 4)\n")
    result = run(capsys, "analyze", model, "-b", "4", "-o", target)
    assert result.code == 2 and "cannot write" in result.err
    assert not target.parent.exists()


def test_input_file_errors(models, capsys, tmp_path):
    model = tmp_path / "ok.py"
    model.write_text("from torch import nn\nmodel = nn.Linear(4, 4)\n")
    result = run(capsys, "analyze", model, "--input", tmp_path / "absent.pt")
    assert result.code == 2 and "no such file" in result.err
    (tmp_path / "bad.pt").write_text("not a tensor")
    result = run(capsys, "analyze", model, "--input", tmp_path / "bad.pt")
    assert result.code == 2 and "cannot load" in result.err


def test_a_model_file_parsing_its_own_flags_sees_none(models, capsys):
    """Loaded as if run alone (argv is the file), a script that parses its own flags at
    import does not see varprobe's."""
    result = run(capsys, "analyze", models / "own_flags.py", "--input-shape", "4",
                 "--batch-size", "4")
    assert result.code == 0, result.err


def test_an_error_during_trials_is_still_one_line(models, capsys):
    """With --trials, a progress bar runs; on a stderr that is no terminal (a CI log) it
    is not drawn, so an error is still its one line, without the bar's newline before."""
    result = run(capsys, "analyze", models / "shape.py", "--batch-size", "4", "--trials", "2")
    assert result.code == 2
    assert result.err.splitlines() == [result.err.strip()]
    assert result.err.startswith("varprobe: error: ")
