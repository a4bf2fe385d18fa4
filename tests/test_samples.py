"""Every sample model runs through the CLI with no flag and tells its story."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.cli_helpers import run
from tests.schema import check_report

SAMPLES = sorted(Path(__file__).parent.parent.glob("sample_models/*.py"))
# Each sample's story ends in a verdict (the transformer's: its tied head explodes).
HEALTHY = {"xavier_mlp": False, "he_mlp": True, "prelu_convnet": True,
           "default_init_mlp": False, "exploding_mlp": False, "resnet_bn": True,
           "transformer_block": False, "fp16_overflow_mlp": False,
           "fp16_underflow_sigmoid": False}


def analyze(path: Path, tmp_path: Path, capsys) -> dict:
    out = tmp_path / f"{path.stem}.json"
    result = run(capsys, "analyze", path, "--output", out)
    assert result.code in (0, 1), result.err
    assert "HEALTHY" in result.out  # the verdict line closes the table
    return json.loads(out.read_text())


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.stem)
def test_sample_runs_and_writes_a_schema_valid_report(path, tmp_path, capsys):
    data = analyze(path, tmp_path, capsys)
    check_report(data)
    assert any(layer["kind"] == "weight" for layer in data["layers"])
    assert data["summary"]["healthy"] is HEALTHY[path.stem]


def _end_to_end(data: dict) -> float:
    weights = [layer for layer in data["layers"] if layer["kind"] == "weight"]
    return weights[-1]["forward"]["second_moment"] / weights[0]["forward"]["second_moment"]


def test_the_stories(tmp_path, capsys):
    names = ("xavier_mlp", "he_mlp", "exploding_mlp", "default_init_mlp")
    reports = {name: analyze(SAMPLES[0].parent / f"{name}.py", tmp_path, capsys)
               for name in names}
    # 30 layers, n = 512: single-draw log error at depth 30 has sd <= sqrt(5*30/512) = 0.54
    # (docs/theory-review.md §10); 3 sd is a factor of 5.
    assert _end_to_end(reports["xavier_mlp"]) == pytest.approx(2.0**-29, rel=4.0)
    assert abs(math.log(_end_to_end(reports["he_mlp"]))) < 3 * math.sqrt(5 * 30 / 512)
    assert _end_to_end(reports["exploding_mlp"]) > 1e15  # ~ (256 / 2)^9
    # (1/6) per layer until the default bias, E[b²] = 1/(3n), sets a floor of about
    # E[b²]·6/5 = 1.6e-3 against E[y_1²] ≈ 1/3 + 1/(3n).
    assert _end_to_end(reports["default_init_mlp"]) < 1e-2
