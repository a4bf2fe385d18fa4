"""Zero and dead-unit counts without numba (``stats._units`` by ``unit_counts``),
against numpy's counts, in every layout a unit comes in: channels first (a conv's
channels), innermost (a Linear's features, channels-last), strided, with whole units
zero and chunks that split the rows."""

from __future__ import annotations

from unittest import mock

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from varprobe import stats, unit_counts

SHAPES = st.sampled_from([(40, 300, 5, 5), (3, 2000, 17), (9000, 5), (70, 300), (2, 9, 3, 4, 40)])


def want(x: torch.Tensor, channel_dim: int) -> tuple[float, float]:
    a = x.double().numpy()
    unit = np.moveaxis(a, channel_dim, 0).reshape(a.shape[channel_dim], -1)
    return float((a == 0).sum()), float((unit != 0).any(1).sum())


@settings(max_examples=40, deadline=None)
@given(shape=SHAPES, channel_dim=st.sampled_from([1, -1]), dead=st.floats(0, 1),
       zeros=st.floats(0, 1), layout=st.sampled_from(["contiguous", "permuted"]),
       chunk=st.sampled_from([64, 4096, unit_counts.CHUNK]), seed=st.integers(0, 2 ** 31))
def test_counts_equal_numpy(shape, channel_dim, dead, zeros, layout, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[torch.rand(shape, generator=g) < zeros] = 0.0  # scattered zeros
    units = x.shape[channel_dim]
    gone = torch.rand(units, generator=g) < dead  # whole units zero
    x.index_fill_(channel_dim % x.dim(), torch.nonzero(gone).view(-1), 0.0)
    if layout == "permuted":  # dense, not contiguous: dims in another order in memory
        x = x.movedim(0, -1).contiguous().movedim(-1, 0)
    with mock.patch.object(unit_counts, "CHUNK", chunk), mock.patch.object(stats, "FEW", 0):
        got = stats._units(x, channel_dim)
    assert [float(v) for v in got] == list(want(x, channel_dim))
