"""[tool.varprobe] in pyproject.toml: found by walking up, checked key by key, and
ranked defaults < pyproject < command line."""

from __future__ import annotations

import json

import pytest

from tests.cli_helpers import run
from tests.model_files import MODELS
from varprobe import config
from varprobe.diagnose import Thresholds
from varprobe.errors import VarprobeError

PYPROJECT = """
[project]
name = "demo"

[tool.varprobe]
seed = 3
batch_size = 32
fail_on = "warning"
ignore = ["head*"]

[tool.varprobe.thresholds]
forward = [1e-3, 1e3]
dead_units = 0.8
"""

# He everywhere but two Xavier layers in the middle: two shrinks warnings, no error
MODEL = MODELS["warn.py"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    (tmp_path / "model.py").write_text(MODEL)
    inner = tmp_path / "src" / "deep"
    inner.mkdir(parents=True)
    monkeypatch.chdir(inner)  # found by walking up two folders
    return tmp_path


def test_defaults_without_a_pyproject(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = config.resolve({})
    assert settings == config.Settings()
    assert (settings.seed, settings.batch_size, settings.fail_on) == (0, 256, "error")
    assert settings.thresholds == Thresholds()


def test_pyproject_beats_defaults(project):
    settings = config.resolve({})
    assert (settings.seed, settings.batch_size, settings.fail_on) == (3, 32, "warning")
    assert settings.ignore == ("head*",)
    assert settings.thresholds.forward == (1e-3, 1e3)
    assert settings.thresholds.dead_units == 0.8
    assert settings.thresholds.backward == Thresholds().backward  # untouched key
    assert settings.source == str(project / "pyproject.toml")


def test_command_line_beats_pyproject(project):
    settings = config.resolve({"seed": 5, "batch_size": None, "fail_on": "error",
                               "ignore": ("x",), "threshold": ["forward=0.1,10"]})
    assert (settings.seed, settings.batch_size, settings.fail_on) == (5, 32, "error")
    assert settings.ignore == ("x",)
    assert settings.thresholds.forward == (0.1, 10.0)
    assert settings.thresholds.dead_units == 0.8


def test_precedence_through_the_cli(project, capsys):
    out = project / "r.json"
    # pyproject says fail_on = "warning": the two shrinks warnings fail the check
    result = run(capsys, "check", project / "model.py", "--output", out)
    assert result.code == 1, result.out
    data = json.loads(out.read_text())
    assert data["settings"]["seed"] == 3 and data["settings"]["batch_size"] == 32
    assert data["settings"]["thresholds"]["forward"] == [1e-3, 1e3]
    assert data["settings"]["config"] == str(project / "pyproject.toml")
    # the command line wins
    result = run(capsys, "check", project / "model.py", "--fail-on", "error", "--seed", "1",
                 "--output", out)
    assert result.code == 0, result.out
    assert json.loads(out.read_text())["settings"]["seed"] == 1


@pytest.mark.parametrize("section, named", [
    ("[tool.varprobe]\nseeds = 1\n", "'seeds'"),
    ("[tool.varprobe.thresholds]\nforwrd = [1, 2]\n", "'forwrd'"),
    ("[tool.varprobe]\nfail_on = \"sometimes\"\n", "'fail_on'"),
    ("[tool.varprobe]\nbatch_size = 0\n", "'batch_size'"),
    ("[tool.varprobe]\nignore = 3\n", "'ignore'"),
    ("[tool.varprobe.thresholds]\nforward = [10, 1]\n", "'forward'"),
    ("[tool.varprobe]\nthresholds = 1\n", "'thresholds'"),
    ("[tool.varprobe\nseed = 1\n", "not valid TOML"),
])
def test_bad_configuration_exits_2_naming_the_key(tmp_path, monkeypatch, capsys, section,
                                                  named):
    (tmp_path / "pyproject.toml").write_text(section)
    (tmp_path / "model.py").write_text(MODEL)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VarprobeError, match=named):
        config.resolve({})
    result = run(capsys, "check", "model.py")
    assert result.code == 2 and named in result.err and result.out == ""


def test_bad_threshold_option(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.py").write_text(MODEL)
    for value, named in (("forward", "KEY=VALUE"), ("fwd=1,2", "'fwd'"),
                         ("dead_units=2", "'dead_units'")):
        result = run(capsys, "check", "model.py", "--threshold", value)
        assert result.code == 2 and named in result.err
