"""The probe's rows of range statistics made together after the pass (``range_rows``)
are exactly the rows ``exponents.measure`` makes of each tensor alone, and both agree
with torch's casts.

``measure`` is the reference here (tests/test_precision.py holds it to casting); the
rows made in a batch must equal its rows field by field, no tolerance: the same sample,
the same counts, the same float divisions. Against the cast truth, the sampled
fractions are held within ``SIGMAS`` binomial standard errors as in test_precision.
"""

from __future__ import annotations

import copy
import dataclasses
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

import varprobe
from tests.test_precision import check_against_cast
from varprobe import exponents, kernel_choice, range_rows, stats
from varprobe.precision import FORMATS, Ranges, Settings

N = exponents.SAMPLE * 4 + 3  # sampled: past SAMPLE elements


def tensors(n: int = N) -> dict[str, torch.Tensor]:
    """Kinds a pass meets: plain, after a ReLU (zeros), all zero, wide spread, large
    enough for some scale's overflow cuts, and below float32's normal range."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g)
    spread = torch.exp2(torch.randint(-60, 4, (n,), generator=g).float())
    return {"randn": x, "relu": x.clamp(min=0), "zeros": torch.zeros(n),
            "spread": x * spread, "large": x * 200, "subnormal": x * 1e-40}


def via_probe_path(m: exponents.Measure, x: torch.Tensor, gradient: bool, moment_read: bool):
    """The row the recorder's path gives: the moment kernel's read handing over its
    extremes and sample (``moment_read``), or the Measure reading the tensor itself."""
    seen = None
    if moment_read:
        with stats.extremes_read(m.sample, m.rows) as found:
            stats._moment_read(x.numpy())
        seen = found[0] if found else None
    pending = (m.gradient if gradient else m.values)(x, seen)
    return stats.collect([pending])[0]


@pytest.mark.parametrize("loss_scale", [1.0, 1024.0, 0.25, 2.0 ** -20])
@pytest.mark.parametrize("moment_read", [True, False])
def test_batch_rows_are_measures_rows(loss_scale, moment_read):
    noted = 0
    for kind, x in tensors().items():
        m = exponents.Measure(loss_scale)
        for gradient in (False, True):
            scale = loss_scale if gradient else 1.0
            got = via_probe_path(m, x, gradient, moment_read)
            want = stats.collect([exponents.measure(x, scale)])[0]
            noted += isinstance(got, range_rows.Noted)
            row = got.row()
            assert dict(row) == want.to_dict(), (kind, gradient)
            r = Ranges.from_dict(row)  # what the flags read
            assert fields(r) == fields(want) and r.to_dict() == want.to_dict()
            assert r.row() is row
            same_answers(r, want)
            check_against_cast(x, r, scale)  # exact overflow counts: under its own scale
    assert noted >= 4  # the batch's path was taken: randn, relu, zeros, spread unscaled


def same_answers(r: Ranges, want: Ranges) -> None:
    """What the flags ask a row (fits under the scales they use and others, the loss
    scale a gradient needs), the same from the batch's arrays as from ``want``."""
    for fmt in FORMATS.values():
        for s in {1.0, want.scale, want.amax_scale(fmt) or 1.0, 2.0 ** -30, 2.0 ** 12}:
            assert r.fits(fmt, s) == want.fits(fmt, s), (fmt.name, s)
            assert r.survives(fmt, s) == want.survives(fmt, s), (fmt.name, s)
        for limit in (0.0, 0.01, 0.5, 1.0):
            assert r.smallest_scale(fmt, limit) == want.smallest_scale(fmt, limit)


def test_batch_rows_with_torch_kernels():
    """Without numba (the torch versions of the range kernels fill one histogram row)."""
    with mock.patch.object(kernel_choice, "numba_kernels", lambda: None):
        m = exponents.Measure(1024.0)
        for kind, x in tensors().items():
            for gradient in (False, True):
                got = via_probe_path(m, x, gradient, moment_read=False).row()
                want = stats.collect([exponents.measure(x, 1024.0 if gradient else 1.0)])[0]
                assert dict(got) == want.to_dict(), (kind, gradient)


def test_subnormal_and_overflowing_tensors_are_measured_alone():
    """Where the one read cannot give the row (an element at or below 2^-126, or at an
    overflow cut) the tensor is measured at once, as before, not noted."""
    m = exponents.Measure()
    for kind in ("subnormal", "large"):
        got = via_probe_path(m, tensors()[kind], False, True)
        assert isinstance(got, Ranges), kind


def test_rows_noted_after_a_read_get_built_too():
    m = exponents.Measure()
    x, y = tensors()["randn"], tensors()["relu"]
    first = via_probe_path(m, x, False, True)
    first.row()
    second = via_probe_path(m, y, False, True)
    assert dict(second.row()) == measure_row(y) and dict(first.row()) == measure_row(x)


def test_rows_from_outside_the_pool(numba_kernels):
    """Histogram rows the Measure did not hand out (a read given a shape) sum the same."""
    m = exponents.Measure()
    x = tensors()["relu"]
    with stats.extremes_read(m.sample, exponents.Measure.rows) as found:
        stats._moment_read(x.numpy())
    got = m.values(x, found[0])
    assert isinstance(stats.collect([got])[0], range_rows.Noted)
    assert dict(stats.collect([got])[0].row()) == measure_row(x)


def fields(r: Ranges) -> list:
    return [getattr(r, f.name) for f in dataclasses.fields(Ranges) if f.compare]


def measure_row(x: torch.Tensor) -> dict:
    return stats.collect([exponents.measure(x)])[0].to_dict()


def test_report_rows_copy_and_convert_as_plain_rows():
    """A report's rows survive ``copy.deepcopy`` (trials) and ``dataclasses.asdict``
    (``Report.to_dict``) as the same numbers; a copy still reads back to its Ranges."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    x, g = torch.randn(128, 256), torch.randn(128, 256)
    report = varprobe.probe(model, x, grad_output=g, precision=Settings("fp16"))
    rows = report.layers[0].ranges
    assert any(isinstance(r, range_rows.BatchRow) for r in rows.values())
    copied = copy.deepcopy(report).layers[0].ranges
    converted = dataclasses.asdict(report.layers[0])["ranges"]
    for key, row in rows.items():
        assert copied[key] == row == converted[key], key
        if not key.startswith("predicted_"):
            want = Ranges.from_dict(row).to_dict()
            assert Ranges.from_dict(copied[key]).to_dict() == want, key
            assert Ranges.from_dict(converted[key]).to_dict() == want, key


@pytest.mark.parametrize("shape, channel_dim", [((64, 1000), -1), ((16, 12, 40), 1),
                                                ((6, 7, 9, 11), 1), ((3, 50), -1)])
def test_unit_kernels_take_the_range_reads_in_their_read(shape, channel_dim, numba_kernels):
    """The units' moment kernels (zeros and dead units, after a ReLU) take the range
    reads in their read too: the same sums, zero and live-unit counts as without them,
    and the extremes of every element and the sample's histogram as the range
    kernels' own reads of the tensor give them."""
    from varprobe import exponent_kernel

    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).clamp(min=0) * 3
    x[0] = 0  # a dead unit along the first dim where units run along another
    m = exponents.Measure()
    with stats.extremes_read(m.sample, m.rows) as found:
        got = stats._sums_and_units(x, channel_dim)
    assert got == stats._sums_and_units(x, channel_dim)  # outside: no range reads
    (n, top, low, rows), = found
    bits = x.numpy().reshape(-1).view("int32")
    assert n == x.numel() and (top, low) == exponent_kernel.extremes(bits)
    idx = m.sample(n)
    if idx is None:
        assert rows is None
        return
    want = np.zeros((exponent_kernel.ROWS, 257), dtype=np.int64)
    exponent_kernel.sample_bins(bits, idx, want)
    assert np.array_equal(rows.sum(0), want.sum(0))
