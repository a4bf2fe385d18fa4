"""bench/survey.py: the rows it records for an entry and how it judges them."""

from __future__ import annotations

import torch
from torch import nn

import corpus
import varprobe
from bench import survey


def row(broken=None, culprits=(), errors=(), crash=False):
    r = {"name": "x", "family": "f", "task": "regress", "broken": broken,
         "culprits": list(culprits), "error": [{"code": "c", "layer": name, "value": 1.0}
                                               for name in errors], "warning": []}
    if crash:
        r["internal_error"] = {"type": "E", "message": "m", "where": "w.py:1"}
    return r


def test_outcomes_follow_the_corpus_rules():
    assert survey.outcome(row()) == "quiet"
    assert survey.outcome(row(errors=["fc"])) == "false alarm"
    assert survey.outcome(row(broken="init", culprits=["body.2"])) == "missed"
    assert survey.outcome(row(broken="init", culprits=["body.2"], errors=["body.2.conv"])) \
        == "caught"
    assert survey.outcome(row(broken="init", culprits=["body.2"], errors=["body.2#1"])) \
        == "caught"
    assert survey.outcome(row(broken="init", culprits=["body.2"], errors=["body.20"])) \
        == "wrong culprit"
    assert survey.outcome(row(crash=True)) == "crash"


def test_training_labels_show_per_optimizer():
    assert survey.trained({"trains": {"sgd": False, "adamw": True, "steps": 40}}) == "no/yes"
    assert survey.trained({"trains": None}) == ""
    for e in corpus.entries():
        t = corpus.trains(e.name)
        assert set(t) == {"sgd", "adamw"} and isinstance(t["sgd"], bool), e.name


class Raises(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        raise ValueError("no forward here\nsecond line")


def test_a_crash_is_recorded_with_its_type_and_first_line():
    e = corpus.Entry(name="raises", family="test", make=Raises,
                     inputs=lambda b: torch.randn(b, 4), task="regress")
    r = survey.survey_one(e)
    assert r["internal_error"]["type"] == "VarprobeError"
    assert "no forward here" in r["internal_error"]["message"]
    assert "second line" not in r["internal_error"]["message"]
    assert survey.outcome(r) == "crash"


def test_flags_are_recorded_by_code_and_layer():
    # Xavier-normal weights in 24 ReLU layers halve the signal at every layer: 2^-23
    # (1e-7) after the last one, below the forward band's 1e-6.
    def make():
        layers = []
        for _ in range(24):
            lin = nn.Linear(64, 64, bias=False)
            nn.init.xavier_normal_(lin.weight)
            layers += [lin, nn.ReLU()]
        return nn.Sequential(*layers)

    e = corpus.Entry(name="xavier_relu", family="test", make=make,
                     inputs=lambda b: torch.randn(b, 64), batch_size=256, task="regress")
    r = survey.survey_one(e)
    assert r["parameters"] == 24 * 64 * 64
    report = varprobe.probe(e.build(), e.example(), batch_size=256)
    for severity in ("error", "warning"):
        expected = [(f.code, layer.label) for layer in report.layers for f in layer.flags
                    if f.severity == severity]
        assert [(f["code"], f["layer"]) for f in r[severity]] == expected
    assert any(f["code"].startswith("vanishing") for f in r["error"])
    assert survey.outcome(r) == "false alarm"
    md = survey.markdown([r])
    assert "| xavier_relu | test |" in md and "false alarm" in md
