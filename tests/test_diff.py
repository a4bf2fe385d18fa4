"""`varprobe diff BASE NEW`: layers matched by (name, call) whose forward E[y²] or
backward Var moved by more than a factor; added/removed layers; bad files."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from zoo import mlp

from tests.cli_helpers import run
from varprobe import probe
from varprobe.baseline import diff


def he_mlp(depth: int = 4) -> nn.Sequential:
    return mlp([32] * (depth + 1), lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"))


@pytest.fixture(scope="module")
def base() -> dict:
    return probe(he_mlp(), batch_size=64).to_dict()


def write(path, data: dict):
    path.write_text(json.dumps(data))
    return path


def test_identical_reports_do_not_differ(base, tmp_path, capsys):
    a, b = write(tmp_path / "a.json", base), write(tmp_path / "b.json", base)
    result = run(capsys, "diff", a, b)
    assert result.code == 0 and result.out.startswith("✓ varprobe: no layer moved")


def test_a_moved_layer_is_a_regression(base, tmp_path, capsys):
    model = he_mlp()
    with torch.no_grad():
        model[4].weight.mul_(3)  # x9 in E[y^2] from layer 4 on, x9 backward before it
    new = probe(model, batch_size=64).to_dict()
    result = run(capsys, "diff", write(tmp_path / "a.json", base),
                 write(tmp_path / "b.json", new))
    assert result.code == 1
    moved = [line for line in result.out.splitlines() if line.startswith("moved")]
    # the scale is exact: E[y^2] and Var[dL/dy] are quadratic in the weights
    assert any(line.startswith("moved  4: forward E[y²]") and line.endswith("(×9)")
               for line in moved)
    assert any(line.startswith("moved  0: backward Var") and line.endswith("(×9)")
               for line in moved)
    assert not any(line.startswith("moved  2: forward") for line in moved)  # before it
    assert result.out.splitlines()[-1].startswith("✗ varprobe:")


def test_factor_option(base, tmp_path, capsys):
    new = copy.deepcopy(base)
    new["layers"][2]["forward"]["second_moment"] *= 1.5
    a, b = write(tmp_path / "a.json", base), write(tmp_path / "b.json", new)
    assert run(capsys, "diff", a, b).code == 0
    tight = run(capsys, "diff", a, b, "--factor", "1.2")
    assert tight.code == 1 and "moved  2: forward E[y²]" in tight.out and "×1.5" in tight.out
    assert run(capsys, "diff", a, b, "--factor", "1").code == 2


def test_added_and_removed_layers_are_listed(base, tmp_path, capsys):
    new = copy.deepcopy(base)
    gone = new["layers"].pop(5)
    extra = copy.deepcopy(new["layers"][-1])
    extra["name"] = "extra"
    new["layers"].append(extra)
    result = run(capsys, "diff", write(tmp_path / "a.json", base),
                 write(tmp_path / "b.json", new))
    assert result.code == 0  # an architecture change is listed, not failed
    assert f"removed {gone['name']}" in result.out and "added  extra" in result.out


def test_a_value_that_became_null_is_a_regression(base):
    from varprobe.report import Report

    new = copy.deepcopy(base)
    new["layers"][3]["backward"]["var"] = None  # e.g. NaN, written as null
    changes = diff(Report.from_dict(base), Report.from_dict(new))
    assert changes.regression and "became unmeasurable" in changes.moved[0].describe()


def test_settings_that_differ_are_noted(base):
    from varprobe.report import Report

    new = copy.deepcopy(base)
    new["settings"]["seed"] = 7
    assert "settings differ: seed 0 → 7" in diff(Report.from_dict(base),
                                                 Report.from_dict(new)).notes


@pytest.mark.parametrize("content, reason", [
    ("{not json", "not valid JSON"),
    (json.dumps({"schema": "varprobe.report/0", "layers": []}), "schema is 'varprobe.report/0'"),
    (json.dumps({"schema": "varprobe.report/1"}), "missing field"),
])
def test_unreadable_reports_exit_2(base, tmp_path, capsys, content, reason):
    good = write(tmp_path / "a.json", base)
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    for args in ((bad, good), (good, bad)):
        result = run(capsys, "diff", *args)
        assert result.code == 2 and reason in result.err and result.out == ""
    missing = run(capsys, "diff", good, tmp_path / "none.json")
    assert missing.code == 2 and "none.json" in missing.err
