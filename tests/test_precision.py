"""Range statistics against the truth computed by casting.

The truth is torch's own cast (``x.to(torch.float16)``, ``torch.float8_e4m3fn``, ...)
and counting zeros and infinities; nothing on the expected side comes from varprobe.
Flush-to-zero and overflow counts must match exactly (scales are powers of two, so
scaling moves no mantissa bit). "Subnormal" is defined as (flush cut, smallest normal],
which differs from what the cast gives only for elements within half a subnormal step
below the smallest normal (they round up to it): the test allows exactly the count of
elements in that band, computed here in float64.

A float32 CPU tensor of more than ``exponents.SAMPLE`` elements without inf or NaN gets
its histogram from a uniform sample drawn with replacement: each fraction is then a
binomial estimate, held here within ``SIGMAS`` standard errors sqrt(p (1 - p) / sample)
of the cast truth p (a correct estimate falls outside 5 with probability below 6e-7
per comparison), and exactly equal where p is 0 or 1; amax, the smallest non-zero |x|
and the overflow counts stay exact.
"""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from varprobe import exponents, kernel_choice, stats
from varprobe.precision import FORMATS, Ranges, loss_scale_range

SIGMAS = 5
TORCH_DTYPES = {name: getattr(torch, f.torch_dtype) for name, f in FORMATS.items()
                if hasattr(torch, f.torch_dtype)}


def spanning(seed: int = 0, n: int = 4000) -> torch.Tensor:
    """float32 values across the whole range: log-uniform magnitudes from 2^-150 to
    2^128 (float32 subnormals too), both signs, every format's edges exactly (powers of
    two, half the smallest subnormal, max, max plus half an ulp and its neighbours),
    zeros, NaN and infinities."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.exp2(torch.rand(n, generator=g, dtype=torch.float64) * 278 - 150)
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    edges = [0.0, math.nan, math.inf, -math.inf] + [2.0 ** k for k in range(-149, 128)]
    for f in FORMATS.values():
        for v in (f.min_subnormal / 2, f.min_subnormal, f.min_normal, f.max, f.overflow_cut,
                  f.min_normal * (1 - 2.0 ** -(f.mantissa_bits + 2))):
            v32 = torch.tensor(v, dtype=torch.float32)
            edges += [v, -v, torch.nextafter(v32, torch.tensor(0.0)).item(),
                      torch.nextafter(v32, torch.tensor(math.inf)).item()]
    return torch.cat([(mags * signs).float(), torch.tensor(edges, dtype=torch.float32)])


def truth(x: torch.Tensor, name: str, scale: float = 1.0) -> dict[str, float]:
    """Fractions of all elements by casting x * scale (exact in float64) to the format."""
    f = FORMATS[name]
    xs = x.double() * scale
    y = xs.to(TORCH_DTYPES[name]).double()
    finite = torch.isfinite(xs)
    top_ulp = 2.0 ** (math.floor(math.log2(f.max)) - f.mantissa_bits)
    # Overflow: the cast kept it neither finite nor within half the top ulp (a cast to
    # e4m3fn saturates at 448 instead of giving inf).
    lost = ~torch.isfinite(y) | ((y - xs).abs() > top_ulp / 2)
    n = x.numel()
    return {"underflow": ((y == 0) & (xs != 0) & finite).sum().item() / n,
            "subnormal": ((y != 0) & (y.abs() < f.min_normal) & finite).sum().item() / n,
            "overflow": (lost & finite).sum().item() / n}


def band(x: torch.Tensor, name: str, scale: float = 1.0) -> float:
    """The fraction within half a subnormal step below the smallest normal."""
    f = FORMATS[name]
    a = x.double().abs() * scale
    step = f.min_normal * 2.0 ** -f.mantissa_bits
    return ((a >= f.min_normal - step / 2) & (a <= f.min_normal)).sum().item() / x.numel()


PATHS = ("numba", "torch", "chunked")  # the CPU kernels with numba, without it, and the
# accelerators' path (forced on the CPU)


def measured(x: torch.Tensor, scale: float = 1.0, path: str = "numba") -> Ranges:
    if path == "chunked":
        pending = exponents.measure(x, scale)
        pending = stats.Pending(exponents._chunked(x, exponents.cuts(scale)), pending.finish)
    elif path == "torch":
        with mock.patch.object(kernel_choice, "numba_kernels", lambda: None):
            pending = exponents.measure(x, scale)
    else:
        pending = exponents.measure(x, scale)
    return stats.collect([pending])[0]


def check_against_cast(x: torch.Tensor, r: Ranges, scale: float) -> None:
    for name in TORCH_DTYPES:
        got, want = r.fits(FORMATS[name], scale), truth(x, name, scale)
        assert got["overflow"] == want["overflow"], name  # counted over every element
        if r.sample is not None:
            assert within(got["underflow"], want["underflow"], r.sample), name
            assert within(got["subnormal"], want["subnormal"], r.sample,
                          band(x, name, scale)), name
            continue
        assert got["underflow"] == want["underflow"], name
        n = x.numel()  # compared as counts: fractions of counts do not subtract exactly
        assert abs(round(got["subnormal"] * n) - round(want["subnormal"] * n)) \
            <= round(band(x, name, scale) * n), name


def within(got: float, want: float, sample: int, allowed: float = 0.0) -> bool:
    """A sampled fraction within SIGMAS binomial standard errors of the truth (plus
    ``allowed``, the subnormal band)."""
    return abs(got - want) <= SIGMAS * math.sqrt(want * (1 - want) / sample) + allowed


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scale", [1.0, 2.0 ** 12, 2.0 ** -7])
def test_fractions_equal_casting(path, scale):
    x = spanning()
    check_against_cast(x, measured(x, scale, path), scale)


def test_without_numba_the_torch_kernels_give_numbas_rows():
    """numba is optional: without it float32 CPU tensors go through the torch versions
    of its kernels (a float64 one through the chunked path), to the same counts."""
    from varprobe.torch_exponent_kernel import CHUNK

    x = spanning()
    assert measured(x, path="torch").to_dict() == measured(x, path="numba").to_dict()
    long = spanning(4, n=5 * CHUNK // 2)  # pieces; then a NaN in the last one only
    for y in (long, torch.cat([long, torch.tensor([math.nan])]), finite_spanning(5, 10 ** 6)):
        assert measured(y, path="torch").to_dict() == measured(y, path="numba").to_dict()
    with mock.patch.object(kernel_choice, "numba_kernels", lambda: None):
        assert exponents._kernels().__name__ == "varprobe.torch_exponent_kernel"
        assert not exponents._kernel_readable(x.double())


def finite_spanning(seed: int, n: int) -> torch.Tensor:
    x = spanning(seed, n)
    return x[torch.isfinite(x)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scale", [1.0, 2.0 ** 12, 2.0 ** -7])
def test_large_tensor_sampled_against_casting(path, scale):
    """Past SAMPLE elements (no inf or NaN) the CPU kernels draw the histogram from a
    sample: fractions within SIGMAS standard errors of the cast, overflow counts, amax
    and the smallest non-zero |x| exact; the chunked path still counts every element."""
    x = finite_spanning(6, 300_000)
    x[::5] = 0
    r = measured(x, scale, path)
    assert r.sample == (None if path == "chunked" else exponents.SAMPLE)
    check_against_cast(x, r, scale)
    a = x.abs()
    assert r.amax == a.max().item() and r.min_nonzero == a[a > 0].min().item()
    assert r.nonfinite == 0 and sum(r.histogram) + r.zeros == r.drawn
    assert within(r.zeros / r.drawn, 0.2, r.drawn)


@pytest.mark.parametrize("path", ("numba", "torch"))
def test_the_sample_is_not_strided(path):
    """One element in 64 is tiny (it flushes in fp16), in rows of 64: a strided sample
    whose step is a multiple of 64 would see none or only those."""
    x = torch.ones(1 << 20)
    x[::64] = 1e-9
    r = measured(x, 1.0, path)
    assert r.sample == exponents.SAMPLE
    assert within(r.fits(FORMATS["fp16"])["underflow"], 1 / 64, r.sample)
    assert r.fits(FORMATS["fp16"])["underflow"] > 0


@pytest.mark.parametrize("n", [exponents.SAMPLE + 1, 300_001])
def test_the_moment_read_takes_the_same_row(n, numba_kernels):
    """Where the probe's moment kernel reads a float32 tensor it also takes the range
    statistics' extremes and sample (``stats.extremes_read``): the same row as the
    range kernels' own read, and the same sums as without."""
    from varprobe import kernels

    x = finite_spanning(8, n)[:n]
    m = exponents.Measure()
    with stats.extremes_read(m.sample, m.rows) as found:
        sums = stats._moment_read(x.numpy())
    want = kernels.sums(x.numpy(), *[x.numpy().dtype.type(0)] * 2)  # inf: x spans float32
    assert np.array_equal(sums, want, equal_nan=True)
    size, *known = found[0]
    assert size == x.numel()
    got = stats.Pending(exponents._cpu32(x.numpy().view("int32"), exponents.cuts(1.0),
                                         tuple(known)), exponents.measure(x).finish)
    assert stats.collect([got])[0].to_dict() == measured(x).to_dict()


def test_a_large_tensor_with_inf_or_nan_is_counted_whole():
    x = finite_spanning(7, 100_000)
    for bad in (math.inf, math.nan):
        y = torch.cat([x, torch.tensor([bad])])
        r = measured(y)
        assert r.sample is None and r.nonfinite == 1
        check_against_cast(y, r, 1.0)


@pytest.mark.parametrize("path", PATHS)
def test_amax_scaled_fp8_equals_casting(path):
    """Per-tensor amax scaling: the scale 2^floor(log2(max / amax)), computed here."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20000, generator=g) * torch.exp2(torch.randn(20000, generator=g) * 4)
    r = measured(x, path=path)
    amax = x.abs().max().item()
    for name in ("fp8-e4m3", "fp8-e5m2"):
        s = 2.0 ** math.floor(math.log2(FORMATS[name].max / amax))
        assert r.amax_scale(FORMATS[name]) == s
        want = truth(x, name, s)
        got = r.fits(FORMATS[name], s)
        assert want["overflow"] == 0 == got["overflow"]
        assert r.sample == (None if path == "chunked" else exponents.SAMPLE)
        if r.sample is None:
            assert got["underflow"] == want["underflow"] > 0
        else:
            assert want["underflow"] > 0 and within(got["underflow"], want["underflow"],
                                                     r.sample)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(width=32), min_size=1, max_size=300), st.sampled_from(PATHS),
       st.integers(-20, 20))
def test_any_float32_values(values, path, log2_scale):
    x = torch.tensor(values, dtype=torch.float32)
    scale = 2.0 ** log2_scale
    r = measured(x, scale, path)
    check_against_cast(x, r, scale)
    a = x.double().abs()
    finite = torch.isfinite(a)
    live = finite & (a > 0)
    assert r.zeros == (a == 0).sum().item()
    assert r.nonfinite == (~finite).sum().item()
    assert r.amax == (a[live].max().item() if live.any() else None)
    assert r.min_nonzero == (a[live].min().item() if live.any() else None)
    ceil = [math.frexp(v)[1] - (math.frexp(v)[0] == 0.5) for v in a[live].tolist()]
    assert sum(r.histogram) == len(ceil)
    for k in set(ceil):
        assert r.histogram[k + 149] == ceil.count(k)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes(dtype):
    """float64 (its own kernel), fp16/bf16 (chunked, upcast) and a strided view."""
    x = spanning(2).to(dtype)
    x = x[torch.isfinite(x) | torch.isnan(x)] if dtype != torch.float64 else x
    r = measured(x)
    for name in TORCH_DTYPES:
        assert r.fits(FORMATS[name])["underflow"] == truth(x, name)["underflow"], name
        assert r.fits(FORMATS[name])["overflow"] == truth(x, name)["overflow"], name
    strided = spanning(3)[::2]  # not dense: read row by row
    check_against_cast(strided, measured(strided), 1.0)


def test_round_trip_through_json():
    x = spanning(4)
    r = measured(x, 2.0 ** 5)
    back = Ranges.from_dict(r.to_dict())
    assert back.histogram == r.histogram and back.overflow == r.overflow
    for name in FORMATS:
        assert back.fits(FORMATS[name], 2.0 ** 5) == r.fits(FORMATS[name], 2.0 ** 5)


def test_loss_scale_range_by_casting():
    """The range's ends, checked by casting: at ``high`` no gradient overflows and at
    twice it one does; at ``low`` every gradient flushes at most the threshold and at
    half of it one flushes more."""
    g = torch.Generator().manual_seed(5)
    grads = {"small": torch.randn(50000, generator=g) * 1e-9,
             "large": torch.randn(50000, generator=g) * 3.0}
    rows = {k: measured(v) for k, v in grads.items()}
    span = loss_scale_range(rows, FORMATS["fp16"], 0.01)
    assert span.fits and span.low_set_by == "small" and span.high_set_by == "large"

    def worst(scale, what):
        return max(truth(v, "fp16", scale)[what] for v in grads.values())

    assert worst(span.high, "overflow") == 0 < worst(2 * span.high, "overflow")
    assert worst(span.low, "underflow") <= 0.01 < worst(span.low / 2, "underflow")
    assert span.low <= span.recommended <= span.high


def test_trials_merge_ranges_of_all_elements():
    """With --trials K a layer's range row is that of the K tensors' elements together:
    the same as measuring their concatenation."""
    import varprobe

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU())
    from varprobe.precision import Settings

    inputs = [torch.randn(16, 32, generator=torch.Generator().manual_seed(k)) * 1e-5
              for k in range(3)]
    calls = iter(inputs)
    report = varprobe.probe(model, lambda batch: next(calls), trials=3,
                            precision=Settings("fp16"))
    with torch.no_grad():
        outs = torch.cat([model[0](x) for x in inputs])
    got = report.layers[0].ranges["forward"]
    want = measured(outs)
    assert got["numel"] == outs.numel() and got["amax"] == want.amax
    assert got["formats"]["fp16"]["unscaled"] == want.fits(FORMATS["fp16"])
