"""A model that draws from numpy's and Python's global generators in its forward (as
transformers' wav2vec2 draws its time masks): a probe with a seed gives the same report
in every run, and the caller's generators are left as they were."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

import varprobe
from varprobe.predict import predict


class Drawing(nn.Module):
    """Masks a random half of the features with numpy, scales by Python's random, and
    skips its second layer when torch.rand says so (a layer drop)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        keep = torch.from_numpy(np.random.rand(32) < 0.5).to(x.dtype)
        h = torch.relu(self.a(x * keep)) * (1 + random.random())
        return h if torch.rand([]) < 0.5 else self.b(h)


def _streams():
    return np.random.rand(3).tolist(), random.random()


def test_a_seeded_probe_is_reproducible_and_leaves_the_streams():
    torch.manual_seed(0)
    model = Drawing()
    x = torch.randn(16, 32)
    np.random.seed(123)
    random.seed(123)
    expected = _streams()  # what the caller's streams give next, undisturbed
    np.random.seed(123)
    random.seed(123)
    first = varprobe.probe(model, x, seed=5).to_dict()
    assert _streams() == expected
    np.random.seed(999)  # other states of the caller's streams: the same report
    random.seed(999)
    again = varprobe.probe(model, x, seed=5).to_dict()
    for key in ("forward", "backward"):
        assert [layer[key] for layer in first["layers"]] == \
            [layer[key] for layer in again["layers"]]


def test_predict_on_a_real_model_draws_the_same_structure_and_leaves_torch():
    torch.manual_seed(0)
    model = Drawing()
    x = torch.randn(16, 32)
    calls = set()
    for state in (1, 2, 3, 4):
        torch.manual_seed(state)
        before = torch.random.get_rng_state()
        report = predict(model, x)
        assert torch.equal(torch.random.get_rng_state(), before)
        calls.add(len(report.layers))
    assert len(calls) == 1
