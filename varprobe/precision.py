"""Number formats and what a tensor's exponent histogram says about fitting in them.

Pure host arithmetic, no torch: the measured side (``exponents``) records for each
tensor its abs max, smallest non-zero |x|, a histogram of binary exponents and, per
format, the count of elements at or past the overflow cut; this module turns those
into fractions that flush to zero, turn subnormal or overflow, in fp16, bf16 and fp8,
unscaled, under a loss scale, or with per-tensor amax scaling.

Histogram bins: bin ``k`` counts finite x with 2^(k-1) < |x| <= 2^k, i.e. k =
ceil(log2|x|), for k = ``LOW``..``HIGH`` (the float32 range, subnormals included).
A large tensor's histogram (and zero count) may come from a uniform random sample of
``sample`` of its elements, drawn with replacement (``exponents.SAMPLE``): its fractions
are then binomial estimates, standard error sqrt(p (1 - p) / sample), while amax, the
smallest non-zero |x| and the overflow counts stay exact over every element.
Rounding to nearest-even sends |x| <= (smallest subnormal)/2 to zero (the tie goes to
the even neighbour, 0), so with power-of-two scales the flush count is exact. The
overflow cut (max plus half an ulp; at or past it a cast gives inf, or saturates for
fp8 e4m3fn) is not a power of two: it is counted directly, in the same read.
"Subnormal" counts (flush cut, smallest normal]: elements within half a subnormal step
below the smallest normal round up to it, a band of relative width 2^-(p+1).

Scales are powers of two, as GradScaler's and Transformer Engine's power-of-two amax
scales are: multiplying by one changes no mantissa bit, so scaling shifts the
histogram by whole bins and the counts stay exact.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from dataclasses import dataclass, field

LOW, HIGH = -149, 128  # ceil(log2|x|) over float32's finite non-zero values
BINS = HIGH - LOW + 1


@dataclass(frozen=True)
class NumberFormat:
    name: str
    torch_dtype: str  # attribute of torch
    mantissa_bits: int
    min_subnormal: float
    min_normal: float
    max: float
    saturates: bool = False  # torch casts past max to max (e4m3fn has no inf)

    @functools.cached_property
    def overflow_cut(self) -> float:
        """Where a cast stops keeping |x| finite and within half an ulp: max plus half
        the ulp at max (itself included or not: ``cut_inclusive``)."""
        ulp = 2.0 ** (math.floor(math.log2(self.max)) - self.mantissa_bits)
        return self.max + ulp / 2

    @functools.cached_property
    def cut_inclusive(self) -> bool:
        """Whether the cut itself overflows: a tie rounds to the even neighbour, which is
        the step past max when max's mantissa is odd (all ones: fp16, bf16, e5m2), and
        max itself when it is even (e4m3fn, whose all-ones pattern is NaN)."""
        top = 2.0 ** math.floor(math.log2(self.max))
        return round((self.max / top - 1) * 2 ** self.mantissa_bits) % 2 == 1

    @functools.cached_property
    def flush_exponent(self) -> int:
        """log2 of the largest |x| that rounds to zero: half the smallest subnormal."""
        return round(math.log2(self.min_subnormal)) - 1

    @functools.cached_property
    def normal_exponent(self) -> int:
        return round(math.log2(self.min_normal))

    @functools.cached_property
    def range_binades(self) -> float:
        """log2(max / smallest subnormal): the spread a tensor can have and keep every
        non-zero element."""
        return math.log2(self.max / self.min_subnormal)


FORMATS = {
    "fp16": NumberFormat("fp16", "float16", 10, 2.0 ** -24, 2.0 ** -14, 65504.0),
    "bf16": NumberFormat("bf16", "bfloat16", 7, 2.0 ** -133, 2.0 ** -126,
                         (2 - 2.0 ** -7) * 2.0 ** 127),
    "fp8-e4m3": NumberFormat("fp8-e4m3", "float8_e4m3fn", 3, 2.0 ** -9, 2.0 ** -6, 448.0,
                             saturates=True),
    "fp8-e5m2": NumberFormat("fp8-e5m2", "float8_e5m2", 2, 2.0 ** -16, 2.0 ** -14,
                             57344.0),
}
SCALED = ("fp8-e4m3", "fp8-e5m2")  # formats used with per-tensor amax scaling


def get(name: str) -> NumberFormat:
    """The format called ``name``; a ValueError listing the valid names otherwise."""
    if name not in FORMATS:
        raise ValueError(f"unknown number format {name!r}; valid: {', '.join(FORMATS)}")
    return FORMATS[name]


def is_power_of_two(value: float) -> bool:
    return value > 0 and math.isfinite(value) and math.frexp(value)[0] == 0.5


class Row(dict):
    """``Ranges.to_dict()``, which knows the Ranges it was made from (``source``):
    reading a report's rows back (the flags) then costs nothing."""

    source: Ranges | None = None


@dataclass
class Ranges:
    """The host row of one tensor's range statistics (``exponents`` measures it)."""

    numel: int
    amax: float | None          # over finite elements; None when there are none
    min_nonzero: float | None
    zeros: int
    nonfinite: int
    overflow: dict[str, int]     # format -> count at or past its cut (under ``scale``)
    histogram: list[int]         # BINS counts, bin i is exponent LOW + i
    scale: float = 1.0           # the power of two the overflow cuts were divided by
    sample: int | None = None    # elements the histogram and zeros count; None: all
    _below: list = field(init=False, repr=False, compare=False)  # running sums
    _row: dict | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self._below = list(itertools.accumulate(self.histogram))

    @property
    def drawn(self) -> int:
        """The elements the histogram counts: the sample's size, or every element."""
        return self.numel if self.sample is None else self.sample

    def count_at_most(self, exponent: int) -> int:
        """Counted elements (``drawn``) with 0 < |x| <= 2^exponent."""
        top = min(exponent - LOW, BINS - 1)
        return self._below[top] if top >= 0 else 0

    def fits(self, fmt: NumberFormat, scale: float = 1.0) -> dict[str, float | None]:
        """Fractions of all elements that flush to zero, turn subnormal (lose precision)
        and overflow when cast to ``fmt`` after multiplying by ``scale``."""
        if not self.numel:
            return {"underflow": None, "subnormal": None, "overflow": None}
        shift = round(math.log2(scale))
        flushed = self.count_at_most(fmt.flush_exponent - shift)
        below_normal = self.count_at_most(fmt.normal_exponent - shift)
        return {"underflow": flushed / self.drawn,
                "subnormal": (below_normal - flushed) / self.drawn,
                "overflow": self.overflow_fraction(fmt, scale)}

    def overflow_fraction(self, fmt: NumberFormat, scale: float) -> float:
        if self.amax is None or self.amax * scale < fmt.overflow_cut or (
                self.amax * scale == fmt.overflow_cut and not fmt.cut_inclusive):
            return 0.0
        if scale == self.scale:
            return self.overflow[fmt.name] / self.numel
        # Whole bins past the cut: exact when the cut falls on a bin edge, a lower
        # bound otherwise (scales that overflow are never recommended); at least one
        # element, which the exact amax says is there.
        first = math.ceil(math.log2(fmt.overflow_cut / scale)) + 1 - LOW
        above = self._below[-1] - (self._below[first - 1] if first > 0 else 0)
        return max(1 / self.numel, above / self.drawn)

    def survives(self, fmt: NumberFormat, scale: float) -> bool:
        """Whether some non-zero element stays non-zero in ``fmt`` under ``scale``: from
        the exact amax where the histogram is a sample, else from the counts (expected
        ones for a predicted row: at least half an element left)."""
        if self.sample is not None:
            return self.amax is not None and self.amax * scale > 2.0 ** fmt.flush_exponent
        flushed = self.count_at_most(fmt.flush_exponent - round(math.log2(scale)))
        return self.nonzero_finite() - flushed >= 0.5

    def amax_scale(self, fmt: NumberFormat) -> float | None:
        """Transformer Engine's per-tensor scale max/amax, rounded down to a power of two
        (its power-of-two mode): amax lands in the top binade and nothing overflows."""
        if not self.amax:
            return None
        return 2.0 ** math.floor(math.log2(fmt.max / self.amax))

    def _trimmed(self) -> dict[str, object]:
        """The histogram without its empty ends: bin i of "counts" is exponent first + i.
        Whole counts: the ends from the running sums (a bisection each), since a
        Python loop over every bin costs more than the rest of the row."""
        below = self._below
        if not isinstance(below[-1], int):  # expected counts: a tiny one can vanish
            return _trim(self.histogram)  # in a running sum
        if not below[-1]:
            return {"first": None, "counts": []}
        first, last = bisect.bisect_right(below, 0), bisect.bisect_left(below, below[-1])
        return {"first": LOW + first, "counts": self.histogram[first: last + 1]}

    def nonzero_finite(self) -> int:
        """Of the counted elements (``drawn``)."""
        return self.drawn - self.zeros - self.nonfinite

    def smallest_scale(self, fmt: NumberFormat, max_underflow: float) -> float | None:
        """The smallest 2^e, e in -64..64, under which at most ``max_underflow`` of the
        tensor flushes in ``fmt`` and some element is left (``loss_scale_range``)."""
        return _smallest_scale(self, fmt, max_underflow)

    @classmethod
    def from_dict(cls, d: dict) -> Ranges:
        """Back from ``to_dict`` (a report read from JSON); a row this process made
        (``row``) gives back the Ranges it was made from."""
        made = getattr(d, "source", None)
        if made is not None:
            return made
        counts = [0] * BINS
        first, kept = d["histogram"]["first"], d["histogram"]["counts"]
        if kept:
            counts[first - LOW: first - LOW + len(kept)] = kept
        return cls(numel=d["numel"], amax=d["amax"], min_nonzero=d["min_nonzero"],
                   zeros=d["zeros"], nonfinite=d["nonfinite"], overflow=dict(d["overflow"]),
                   histogram=counts, scale=d["scale"], sample=_sampled(d))

    def row(self) -> dict:
        """``to_dict()``, made once: the same dict for every layer that shows this row."""
        if self._row is None:
            self._row = Row(self.to_dict())
            self._row.source = self
        return self._row

    def to_dict(self, formats: list[str] = tuple(FORMATS)) -> dict:
        out: dict = {"numel": self.numel, "amax": self.amax, "min_nonzero": self.min_nonzero,
                     "log2_amax": _log2(self.amax), "log2_min_nonzero": _log2(self.min_nonzero),
                     "zeros": self.zeros, "nonfinite": self.nonfinite, "scale": self.scale,
                     "sample": self.drawn,
                     "overflow": dict(self.overflow), "formats": {},
                     "histogram": self._trimmed()}
        for name in formats:
            fmt = FORMATS[name]
            row = {"unscaled": self.fits(fmt)}
            if self.scale != 1.0:
                row["loss_scaled"] = self.fits(fmt, self.scale)
            if name in SCALED:
                s = self.amax_scale(fmt)
                row["amax_scaled"] = self.fits(fmt, s) if s else None
                row["amax_scale"] = s
            out["formats"][name] = row
        return out


def _sampled(d: dict) -> int | None:
    """A JSON row's sample size, None where it counted every element."""
    drawn = d.get("sample", d["numel"])
    return None if drawn == d["numel"] else drawn


def _log2(value: float | None) -> float | None:
    return math.log2(value) if value else None


def _trim(counts: list[int]) -> dict[str, object]:
    """The histogram without its empty ends: bin i of "counts" is exponent first + i."""
    nz = [i for i, c in enumerate(counts) if c]
    if not nz:
        return {"first": None, "counts": []}
    return {"first": LOW + nz[0], "counts": counts[nz[0]: nz[-1] + 1]}


def merged(rows: list[dict]) -> dict:
    """The range row of several tensors' elements together (``to_dict`` rows, e.g. one
    per trial): counts added, the extremes of the extremes. Predicted rows (no
    histogram) are kept from the first. Sampled rows pool their samples, which weighs
    each tensor by its sample: by its size for trials, whose tensors have one shape."""
    if "histogram" not in rows[0]:
        return rows[0]
    parts = [Ranges.from_dict(r) for r in rows]
    amaxes = [p.amax for p in parts if p.amax is not None]
    mins = [p.min_nonzero for p in parts if p.min_nonzero is not None]
    return Ranges(numel=sum(p.numel for p in parts), amax=max(amaxes, default=None),
                  min_nonzero=min(mins, default=None), zeros=sum(p.zeros for p in parts),
                  nonfinite=sum(p.nonfinite for p in parts),
                  overflow={k: sum(p.overflow[k] for p in parts) for k in parts[0].overflow},
                  histogram=[sum(c) for c in zip(*(p.histogram for p in parts))],
                  scale=parts[0].scale,
                  sample=None if all(p.sample is None for p in parts)
                  else sum(p.drawn for p in parts)).to_dict()


# --- loss scales ------------------------------------------------------------------------

@dataclass
class LossScaleRange:
    """Powers of two S under which every gradient fits: low from underflow, high from
    overflow; ``low > high`` means no single loss scale fits."""

    low: float | None
    high: float | None
    low_set_by: str | None   # the tensor that needs the scale at least ``low``
    high_set_by: str | None  # the tensor that allows at most ``high``

    @property
    def fits(self) -> bool:
        return self.low is None or self.high is None or self.low <= self.high

    @property
    def recommended(self) -> float | None:
        """The geometric middle of the range, a power of two: the most headroom both
        ways (a dynamic GradScaler settles somewhere inside it)."""
        if not self.fits or self.low is None or self.high is None:
            return self.low if self.high is None else (self.high if self.low is None
                                                       else None)
        return 2.0 ** ((round(math.log2(self.low)) + round(math.log2(self.high))) // 2)

    def to_dict(self) -> dict:
        return {"low": self.low, "high": self.high, "recommended": self.recommended,
                "fits": self.fits, "low_set_by": self.low_set_by,
                "high_set_by": self.high_set_by}


def loss_scale_range(grads: dict[str, Ranges], fmt: NumberFormat,
                     max_underflow: float) -> LossScaleRange:
    """Over powers of two 2^-64..2^64: the smallest that keeps every gradient's
    flushed fraction at most ``max_underflow`` (and some element of each non-zero
    gradient alive), and the largest under which none overflows."""
    low = high = None
    low_by = high_by = None
    for label, r in grads.items():
        if r.amax is None or not r.nonzero_finite():
            continue
        hi = 2.0 ** (math.ceil(math.log2(fmt.overflow_cut / r.amax)) - 1)
        if high is None or hi < high:
            high, high_by = hi, label
        lo = r.smallest_scale(fmt, max_underflow)
        if lo is not None and (low is None or lo > low):
            low, low_by = lo, label
    return LossScaleRange(low, high, low_by, high_by)


def _smallest_scale(r: Ranges, fmt: NumberFormat, max_underflow: float) -> float | None:
    """The smallest 2^e, e in -64..64, under which at most ``max_underflow`` of the
    tensor flushes and some element is left. Both only get truer as e grows (fewer
    elements at or below the flush cut / scale), so a bisection finds it."""
    exponents = range(-64, 65)
    first = bisect.bisect_left(exponents, True, key=lambda e: _scale_keeps(r, fmt, e,
                                                                           max_underflow))
    return 2.0 ** exponents[first] if first < len(exponents) else None


def _scale_keeps(r: Ranges, fmt: NumberFormat, e: int, max_underflow: float) -> bool:
    flushed = r.count_at_most(fmt.flush_exponent - e)
    # some element left: exactly from amax for a sampled row; any expected count
    # left for a predicted one
    alive = r.survives(fmt, 2.0 ** e) if r.sample is not None \
        else flushed < r.nonzero_finite()
    return flushed / r.drawn <= max_underflow and alive


# --- settings -----------------------------------------------------------------------------

AUTOCAST = ("fp16", "bf16")


@dataclass(frozen=True)
class Settings:
    """What the probe checks: ``format`` (a FORMATS name or None: statistics only),
    ``loss_scale`` (a power of two, or None: recommend one), ``autocast`` (run the
    forward under torch.autocast in this dtype)."""

    format: str | None = None
    loss_scale: float | None = None
    autocast: str | None = None

    def __post_init__(self):
        if self.format is not None:
            get(self.format)
        if self.loss_scale is not None and not is_power_of_two(self.loss_scale):
            raise ValueError(f"loss scale {self.loss_scale:g} is not a power of two "
                             "(GradScaler's scales are: 2^k)")
        if self.autocast is not None and self.autocast not in AUTOCAST:
            raise ValueError(f"autocast {self.autocast!r}: valid: {', '.join(AUTOCAST)}")

    def to_dict(self) -> dict:
        return {"format": self.format, "loss_scale": self.loss_scale,
                "autocast": self.autocast}
