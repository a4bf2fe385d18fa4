"""The exit-code contract CI relies on: 0 healthy, 1 flagged, 2 the input or model could
not be run, 3 a bug in varprobe. A bug is one stderr line naming the stage (the
traceback only with --debug); a bug in an isolated stage (predict, render, plot) is
written into the report, and the rest of the command runs with the exit code its
verdict gives. Failures are injected by replacing each stage's function with one that
raises."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import varprobe
from tests.cli_helpers import run
from tests.pristine import assert_untouched, give_grads, snapshot
from varprobe import diagnose, inputs, target, theory
from varprobe.recorder import Recorder
from varprobe.render import ci, formats, plots, terminal
from varprobe.stages import InternalError

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
HEALTHY, FLAGGED = SAMPLES / "he_mlp.py", SAMPLES / "exploding_mlp.py"
BATCH = ("-b", "32")


class Injected(RuntimeError):
    pass


def boom(*args, **kwargs):
    raise Injected("injected failure\nsecond line of the message")


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# --- stages a report cannot do without: exit 3 -----------------------------------------

FATAL = [  # (stage, object, attribute, extra arguments)
    ("load", target, "load", ()),
    ("input", inputs, "synthesize", ()),
    ("record", Recorder, "collect", ()),
    ("diagnose", diagnose, "annotate", ()),
    ("write", formats, "write", ("-o", "{tmp}/report.json")),
]


@pytest.mark.parametrize(("stage", "owner", "name", "extra"), FATAL, ids=[f[0] for f in FATAL])
def test_a_bug_is_exit_3_with_one_line_naming_the_stage(capsys, monkeypatch, tmp_path,
                                                        stage, owner, name, extra):
    monkeypatch.setattr(owner, name, boom)
    result = run(capsys, "check", HEALTHY, *BATCH, *(a.format(tmp=tmp_path) for a in extra))
    assert result.code == 3
    [line] = lines(result.err)
    assert line.startswith(f"varprobe: internal error in the {stage} stage: Injected: "
                           "injected failure:")
    assert "bug in varprobe" in line and "issue tracker" in line and "--debug" in line
    assert "Traceback" not in result.err and "second line" not in result.err


@pytest.mark.parametrize(("stage", "owner", "name", "extra"), FATAL[:2], ids=["load", "input"])
def test_debug_adds_the_traceback_and_keeps_exit_3(capsys, monkeypatch, stage, owner, name,
                                                   extra):
    monkeypatch.setattr(owner, name, boom)
    result = run(capsys, "analyze", HEALTHY, *BATCH, "--debug")
    assert result.code == 3
    assert "Traceback" in result.err and "Injected" in result.err
    assert lines(result.err)[-1].startswith(f"varprobe: internal error in the {stage} stage")


def test_a_bug_in_varprobe_predict_is_exit_3_too(capsys, monkeypatch):
    monkeypatch.setattr(diagnose, "annotate", boom)
    result = run(capsys, "predict", HEALTHY)
    assert result.code == 3
    assert lines(result.err)[0].startswith("varprobe: internal error in the diagnose stage")


# --- isolated stages: recorded, the rest runs, the verdict decides ---------------------

@pytest.mark.parametrize(("model", "verdict"), [(HEALTHY, 0), (FLAGGED, 1)])
def test_a_failed_prediction_leaves_the_report_and_the_verdict(capsys, monkeypatch, tmp_path,
                                                               model, verdict):
    monkeypatch.setattr(theory, "annotate", boom)
    out = tmp_path / "report.json"
    result = run(capsys, "check", model, *BATCH, "-o", out)
    assert result.code == verdict
    [line] = [x for x in lines(result.err) if x.startswith("varprobe:")]
    assert line.startswith("varprobe: internal error in the predict stage: Injected")
    assert "Traceback" not in result.err
    assert "✓ varprobe" in result.out if verdict == 0 else "✗ varprobe" in result.out
    data = json.loads(out.read_text())
    assert data["stages"] == [{"stage": "predict", "error": "Injected",
                               "message": "injected failure"}]
    # Measurements are all there; predictions are null, each with the reason.
    assert all(layer["forward"] is not None for layer in data["layers"])
    assert all(layer["predicted"] is None and layer["schemes"] == {}
               and "predict stage failed" in layer["unavailable"]["predicted"]
               for layer in data["layers"])


def test_a_failed_plot_leaves_the_json_report(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(plots, "save", boom)
    result = run(capsys, "analyze", HEALTHY, *BATCH, "-f", "json", "--png", tmp_path / "f.png",
                 "--fail-on", "error")
    assert result.code == 0
    assert lines(result.err) == [x for x in lines(result.err) if "plot stage" in x]
    assert len(lines(result.err)) == 1
    data = json.loads(result.out)
    assert [s["stage"] for s in data["stages"]] == ["plot"]
    assert data["layers"] and data["layers"][0]["predicted"] is not None
    assert not (tmp_path / "f.png").exists()


def test_a_failed_table_still_writes_the_report_file(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(terminal, "render", boom)
    out = tmp_path / "report.json"
    result = run(capsys, "analyze", FLAGGED, *BATCH, "-o", out, "--fail-on", "error")
    assert result.code == 1  # the verdict's
    [line] = lines(result.err)
    assert line.startswith("varprobe: internal error in the render stage: Injected")
    assert json.loads(out.read_text())["summary"]["healthy"] is False


def test_failed_check_lines_keep_the_verdict(capsys, monkeypatch):
    monkeypatch.setattr(ci, "check_lines", boom)
    result = run(capsys, "check", FLAGGED, *BATCH)
    assert result.code == 1
    assert "render stage" in result.err and "Traceback" not in result.err


def test_debug_shows_the_traceback_of_an_isolated_stage(capsys, monkeypatch):
    monkeypatch.setattr(theory, "annotate", boom)
    result = run(capsys, "check", HEALTHY, *BATCH, "--debug")
    assert result.code == 0
    assert "Traceback" in result.err and "second line" in result.err
    after = run(capsys, "check", HEALTHY, *BATCH)  # the next command, without --debug
    assert "Traceback" not in after.err


# --- the user's own code stays exit 2 ---------------------------------------------------

USERS = {
    "loss.py": "from torch import nn\nmodel = nn.Linear(4, 4)\n"
               "def loss(output):\n    raise ValueError('my loss is broken')\n",
    "example.py": "from torch import nn\nmodel = nn.Linear(4, 4)\n"
                  "def example_input(batch_size):\n    raise ValueError('no data here')\n",
}


@pytest.mark.parametrize("name", sorted(USERS))
def test_the_model_files_own_code_raising_is_exit_2(capsys, tmp_path, name):
    path = tmp_path / name
    path.write_text(USERS[name])
    result = run(capsys, "check", path)
    assert result.code == 2
    [line] = lines(result.err)
    assert line.startswith("varprobe: error:") and "ValueError" in line
    assert "internal" not in line


def test_an_unwritable_report_is_exit_2(capsys, tmp_path):
    result = run(capsys, "check", HEALTHY, *BATCH, "-o", tmp_path / "missing" / "r.json")
    assert result.code == 2
    assert lines(result.err)[0].startswith("varprobe: error: cannot write")


# --- the library ----------------------------------------------------------------------

def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def test_probe_reports_a_failed_prediction_and_measures_the_rest(monkeypatch):
    model = mlp()
    expected = varprobe.probe(model, batch_size=16)
    monkeypatch.setattr(theory, "annotate", boom)
    report = varprobe.probe(model, batch_size=16)
    assert [s["stage"] for s in report.stages] == ["predict"]
    assert [layer.forward for layer in report.layers] == [
        layer.forward for layer in expected.layers]
    assert all(layer.predicted is None for layer in report.layers)


def test_probe_raises_internal_error_naming_the_stage(monkeypatch):
    monkeypatch.setattr(diagnose, "annotate", boom)
    with pytest.raises(InternalError) as info:
        varprobe.probe(mlp(), batch_size=16)
    assert info.value.stage == "diagnose" and isinstance(info.value.__cause__, Injected)


@pytest.mark.parametrize(("owner", "name"), [(Recorder, "collect"), (diagnose, "annotate"),
                                             (theory, "annotate")])
def test_the_model_is_left_as_found_when_varprobe_fails(monkeypatch, owner, name):
    model = mlp()
    give_grads(model)
    before = snapshot(model)
    monkeypatch.setattr(owner, name, boom)
    with contextlib.suppress(InternalError):
        varprobe.probe(model, batch_size=16, mode="eval")
    assert_untouched(model, before)
