"""Index and mask tensors made from constants carry values on meta (varprobe.metavalues)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from varprobe.metavalues import MetaValues
from varprobe.predict import predict


def test_a_branch_on_positions_made_by_arange_runs_on_meta():
    with MetaValues():
        pos = torch.arange(6, device="meta").unsqueeze(0).expand(3, -1)
        diff = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1)
        packed = (diff != 1).cumsum(-1)
        assert pos.is_meta and packed.is_meta
        assert bool((packed[:, -1] == 0).all())
        assert pos[0].tolist() == list(range(6))
        assert int(pos[1, 4].item()) == 4


def test_a_branch_on_an_activation_still_raises():
    x = torch.empty(4, 8, device="meta")
    with MetaValues(), pytest.raises(RuntimeError, match="meta"):
        bool((x > 0).any())


def test_like_factories_read_only_the_shape_and_writes_keep_the_value():
    ids = torch.empty(2, 5, dtype=torch.long, device="meta")  # no values
    with MetaValues():
        mask = torch.ones_like(ids)
        mask[:, 3:] = 0
        assert mask.sum().item() == 6
        mask[:, :1] = ids[:, :1]  # written with something unknown: no value any more
        with pytest.raises(RuntimeError, match="meta"):
            mask.sum().item()


def test_random_and_empty_factories_get_no_value_and_leave_the_generator_alone():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with MetaValues():
        for made in (torch.randint(0, 9, (4,), device="meta"),
                     torch.empty(4, dtype=torch.long, device="meta")):
            with pytest.raises(RuntimeError, match="meta"):
                made.sum().item()
        pos = torch.arange(4, device="meta").float()
        dropped = torch.nn.functional.dropout(pos, 0.5)  # an op on values: forked generator
        assert dropped.is_meta
    assert torch.equal(torch.get_rng_state(), state)


class PackedCheck(nn.Module):
    """A model whose forward branches on its own position ids, as transformers' masks do."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        pos = torch.arange(x.shape[1], device=x.device)
        if (pos[1:] - pos[:-1] == 1).all():  # one sequence per row
            return self.fc(x)
        raise AssertionError("not reached")


def test_predict_runs_such_a_model_on_meta():
    with torch.device("meta"):
        model = PackedCheck()
    report = predict(model, torch.empty(4, 8, 16, device="meta"), init="he")
    assert report.settings["device"] == "meta"
    assert report.layers[0].predicted.forward_var == pytest.approx(2.0)
