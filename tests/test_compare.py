"""The counterfactual schemes' predictions are walked when asked for (``compare``, or a
fix the diagnosis weighs), and what is walked is the same whenever it is asked."""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap

import pytest
from torch import nn
from zoo import mlp

from tests.cli_helpers import run
from varprobe import VarprobeError, probe, theory
from varprobe.diagnose.fix import SCHEME_PREFERENCE

N, DEPTH, BATCH = 64, 10, 32


def healthy() -> nn.Sequential:
    return mlp([N] * (DEPTH + 1), nn.init.kaiming_normal_)


def exploding() -> nn.Sequential:
    return mlp([N] * (DEPTH + 1), lambda w: nn.init.normal_(w, std=1.0))


def _schemes(report) -> list[set[str]]:
    return [set(layer.schemes) for layer in report.weight_layers]


def test_a_healthy_probe_walks_only_the_actual_init(walks):
    report = probe(healthy(), batch_size=BATCH)
    assert report.summary.healthy and report.summary.fix is None
    assert len(walks) == 1
    assert _schemes(report) == [set()] * DEPTH
    assert all(layer.predicted.forward_var is not None for layer in report.weight_layers)


def test_compare_walks_each_asked_scheme_once(walks):
    report = probe(healthy(), batch_size=BATCH, compare=["xavier", "he", "xavier"])
    assert len(walks) == 3
    assert _schemes(report) == [{"xavier", "he"}] * DEPTH
    walks.clear()
    every = probe(healthy(), batch_size=BATCH, compare="all")
    # square layers without PReLU: lecun draws xavier's 1/n, he-fan-out and he-prelu
    # he's 2/n; one walk serves the schemes that draw alike
    assert len(walks) == 1 + len({"xavier", "he", "torch-default"})
    assert _schemes(every) == [set(theory.SCHEMES)] * DEPTH
    for some, all_ in zip(report.weight_layers, every.weight_layers):
        for name in ("xavier", "he"):
            assert some.schemes[name] == all_.schemes[name]  # the same walk, bit for bit


def test_a_fix_walks_the_schemes_it_weighs_and_finds_what_all_of_them_find():
    asked = probe(exploding(), batch_size=BATCH)
    assert not asked.summary.healthy and asked.summary.fix is not None
    assert _schemes(asked) == [set(SCHEME_PREFERENCE)] * DEPTH
    every = probe(exploding(), batch_size=BATCH, compare="all")
    assert dataclasses.asdict(asked.summary.fix) == dataclasses.asdict(every.summary.fix)
    for a, b in zip(asked.weight_layers, every.weight_layers):
        assert a.schemes == b.schemes


def test_an_unknown_scheme_is_a_usage_error():
    with pytest.raises(VarprobeError, match=r"'kaiming'.*valid: xavier, he"):
        probe(healthy(), batch_size=BATCH, compare=["he", "kaiming"])


MODEL = """
    import torch
    from torch import nn

    def build_model():
        torch.manual_seed(0)
        layers = [m for _ in range(4) for m in (nn.Linear(32, 32), nn.ReLU())]
        model = nn.Sequential(*layers)
        for layer in model[::2]:
            nn.init.kaiming_normal_(layer.weight)
        return model

    input_shape = (32,)
"""


def test_cli_reports_carry_the_schemes_their_reader_sees(tmp_path, capsys):
    path = tmp_path / "net.py"
    path.write_text(textwrap.dedent(MODEL))
    plain = json.loads(run(capsys, "analyze", path, "-b", "16", "-f", "json").out)
    assert [layer["schemes"] for layer in plain["layers"]] == [{}] * 8
    every = json.loads(run(capsys, "analyze", path, "-b", "16", "-f", "json", "--compare",
                           "all").out)
    weights = [layer for layer in every["layers"] if layer["kind"] == "weight"]
    assert all(set(layer["schemes"]) == set(theory.SCHEMES) for layer in weights)
    markdown = run(capsys, "analyze", path, "-b", "16", "-f", "markdown").out
    header = next(line for line in markdown.splitlines() if "meas/pred" in line)
    assert "| xavier |" in header and "| he |" in header  # the columns it draws


def test_predict_walks_the_schemes_asked_for(tmp_path, capsys):
    path = tmp_path / "net.py"
    path.write_text(textwrap.dedent(MODEL))
    plain = json.loads(run(capsys, "predict", path, "-f", "json").out)
    assert plain["summary"]["healthy"]
    assert [layer["schemes"] for layer in plain["layers"]] == [{}] * 8
    asked = run(capsys, "predict", path, "-f", "json", "--compare", "lecun")
    weights = [layer for layer in json.loads(asked.out)["layers"] if layer["kind"] == "weight"]
    # lecun's 1/n: each ReLU layer halves the forward second moment of the one before
    ratios = [b["schemes"]["lecun"]["forward_var"] / a["schemes"]["lecun"]["forward_var"]
              for a, b in zip(weights, weights[1:])]
    assert ratios == pytest.approx([0.5] * 3, rel=1e-12)
    table = run(capsys, "predict", path, "--compare", "lecun").out
    assert "lecun" in table


def test_a_failing_scheme_walk_is_an_isolated_predict_failure(monkeypatch):
    annotate = sys.modules["varprobe.theory.annotate"]  # the package re-exports a function

    def broken(self, weights):
        raise ZeroDivisionError("a scheme's walk")

    monkeypatch.setattr(annotate.Counterfactuals, "_walk", broken)
    report = probe(exploding(), batch_size=BATCH)  # flagged: the fix asks for the schemes
    assert [s["stage"] for s in report.stages] == ["predict"]
    assert report.summary.fix is None and not report.summary.healthy
    assert all(layer.predicted is None and layer.schemes == {} for layer in report.layers)


def test_the_walks_share_the_graphs_downstream_facts(walks, monkeypatch):
    """What lies after each node (theory.downstream: the BatchNorms behind it, the
    masks between them, the norms with a fresh gradient) is the graph's, not a walk's:
    found once for all the walks of a probe, and each walk reads what it would find on
    its own."""
    import varprobe.theory.downstream as downstream

    found = []
    fresh = downstream.fresh_norms
    monkeypatch.setattr(downstream, "fresh_norms", lambda *a: found.append(a) or fresh(*a))
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    probe(model, input_shape=(3, 6, 6), batch_size=BATCH, compare="all")
    assert len(walks) >= 3 and len(found) == 1
    kinds = [layer.kind for layer in walks[0].report.layers]
    own = (downstream.batch_normed_after(walks[0].nodes, walks[0].modules),
           downstream.masks_after(walks[0].nodes, walks[0].modules, kinds),
           fresh(walks[0].nodes, walks[0].modules, kinds))
    assert own[0] and own[1]  # a graph where the facts say something
    for walk in walks:
        assert (walk.batch_normed_after, walk.masks_after, walk.fresh_norms) == own
