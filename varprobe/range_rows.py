"""The range rows of a pass's tensors, made together after the pass.

In the common case a float32 CPU tensor's range statistics are fully known from one
read (``exponents``): the bits of its largest and smallest non-zero |x| and the
exponent histogram rows of its sample, with no element at an overflow cut and none
below float32's normal range. Such a tensor is only noted during the pass (``Batch.add``:
a few Python operations, since per-tensor work in the hooks runs with cold caches and
costs several times its warm time); after the transfer the rows of all of them come
from one set of array operations over a [tensors x bins] matrix (``_Built``), and each
row's dict (``precision.Ranges.to_dict``'s, the same numbers) only when it is read.
"""

from __future__ import annotations

import bisect
import copy
import math

import numpy as np

from varprobe import stats
from varprobe.precision import BINS, FORMATS, LOW, SCALED, Ranges, Row

SAMPLE = 1 << 13  # elements a larger float32 CPU tensor's histogram counts (exponents)
SUBNORMAL_BITS = 0x800000  # |x| bits at or below which exponents refines the bins
_NONE: list = []  # a noted tensor's raw sums: nothing to transfer


class Batch:
    """The tensors of one pass noted for their rows (``add``), built together at the
    first read of one (those noted after it, at the first read of one of them)."""

    def __init__(self):
        self._entries: list[tuple] = []  # (numel, top bits, low bits, rows, scale)
        self._parts: list[_Built] = []  # built, in order, each over the next entries
        self._starts: list[int] = []

    def add(self, n: int, top: int, low: int, rows: np.ndarray, scale: float) -> stats.Pending:
        """The Pending of a tensor of ``n`` elements whose sample's histogram rows are
        ``rows`` (more than ``SAMPLE`` elements, ``top`` below every overflow cut and
        the smallest non-zero |x|, ``low`` + 1 as bits, above float32's subnormals)."""
        noted = Noted(self, len(self._entries))
        self._entries.append((n, top, low, rows, scale))
        return stats.Pending(_NONE, noted.finish)

    def row(self, index: int) -> dict:
        done = self._starts[-1] + len(self._parts[-1].numel) if self._parts else 0
        if index >= done:
            self._parts.append(_Built(self._entries[done:]))
            self._starts.append(done)
            self._entries[done:] = [None] * (len(self._entries) - done)  # rows freed
        part = bisect.bisect_right(self._starts, index) - 1
        return self._parts[part].row(index - self._starts[part])


class Noted:
    """The host row of a noted tensor: its dict made on first ``row()``, as a Ranges'."""

    __slots__ = ("batch", "index")

    def __init__(self, batch: Batch, index: int):
        self.batch, self.index = batch, index

    def finish(self, _raw: list) -> Noted:
        return self

    def row(self) -> dict:
        return self.batch.row(self.index)


class BatchRow(Row):
    """A noted tensor's row; its Ranges (``source``, what the flags read) made only
    when asked for. A copy (``dataclasses.asdict``'s) has none, as a plain Row."""

    @property
    def source(self) -> Ranges | None:
        built = self.__dict__.get("_built")
        return built.ranges(self.__dict__["_index"]) if built is not None else None

    def __deepcopy__(self, memo: dict) -> Row:
        out = Row(copy.deepcopy(dict(self), memo))
        out.source = self.source
        return out


class _Built:
    """Every noted tensor's counts as arrays; rows and Ranges made per tensor on demand."""

    def __init__(self, entries: list[tuple]):
        n = len(entries)
        self.numel = [e[0] for e in entries]
        self.scale = [e[4] for e in entries]
        bits = np.array([(e[1], min(e[2] + 1, 0x7F800000)) for e in entries],
                        dtype=np.int64).reshape(n, 2)
        floats = bits.astype(np.int32).view(np.float32).astype(np.float64).tolist()
        self.amax = [f[0] if b > 0 else None for f, b in zip(floats, bits[:, 0].tolist())]
        self.min_nonzero = [f[1] if a is not None else None
                            for f, a in zip(floats, self.amax)]
        self.top = np.array([-1.0 if a is None else a for a in self.amax])  # for compares
        self.own = np.array(self.scale)
        raw = np.stack([e[3] for e in entries]).sum(1) if n else np.zeros((0, 257), np.int64)
        self.hist = np.zeros((n, BINS), dtype=np.int64)
        self.hist[:, 24:278] = raw[:, 2:256]  # as exponents._row: no bin-1 element here
        self.below = self.hist.cumsum(1)
        self.zeros = raw[:, 0].tolist()
        self.trim = _trims(self.hist)
        self._rows: list[BatchRow | None] = [None] * n
        self._ranges: list[Ranges | None] = [None] * n
        self.fits = self._fits()

    def _fits(self) -> list[tuple]:
        """Per format: its name, then per tensor its fits unscaled, under its own scale,
        under its amax scale (None without one) and that scale, as ``Ranges.fits`` and
        ``Ranges.amax_scale`` give them, from array gathers."""
        out = []
        own = np.array(self.scale)
        shifts = np.array([round(math.log2(s)) for s in self.scale], dtype=np.int64)
        ones = np.ones_like(own)
        for name, fmt in FORMATS.items():
            unscaled = self._fractions(fmt, shifts * 0, ones)
            scaled = self._fractions(fmt, shifts, own) if shifts.any() else unscaled
            amax = amax_scale = [None] * len(self.numel)
            if name in SCALED:
                amax_scale = [2.0 ** math.floor(math.log2(fmt.max / a)) if a else None
                              for a in self.amax]
                by = np.array([round(math.log2(s)) if s else 0 for s in amax_scale],
                              dtype=np.int64)
                amax = [f if s else None for f, s in zip(
                    self._fractions(fmt, by, np.array([s or 1.0 for s in amax_scale])),
                    amax_scale)]
            out.append((name, unscaled, scaled, amax, amax_scale))
        return out

    def _fractions(self, fmt, shifts: np.ndarray, scales: np.ndarray) -> list[dict]:
        """``Ranges.fits(fmt, scale)`` of every tensor, under ``scales`` (per tensor,
        powers of two, ``shifts`` their log2)."""
        flushed = _at_most(self.below, fmt.flush_exponent - shifts)
        normal = _at_most(self.below, fmt.normal_exponent - shifts)
        under = (flushed / SAMPLE).tolist()
        sub = ((normal - flushed) / SAMPLE).tolist()
        over = [0.0] * len(under)
        # none of a noted tensor's elements reaches its own cuts; under another scale,
        # past the cut, the Ranges' own (rare) answer
        top = self.top * scales
        reach = (top > fmt.overflow_cut) | ((top == fmt.overflow_cut) & fmt.cut_inclusive)
        for i in np.flatnonzero(reach & (scales != self.own)).tolist():
            over[i] = self.ranges(i).overflow_fraction(fmt, float(scales[i]))
        return [{"underflow": u, "subnormal": s, "overflow": o}
                for u, s, o in zip(under, sub, over)]

    def row(self, i: int) -> BatchRow:
        if self._rows[i] is None:
            self._rows[i] = self._row(i)
        return self._rows[i]

    def _row(self, i: int) -> BatchRow:
        a, low, scale = self.amax[i], self.min_nonzero[i], self.scale[i]
        first, last = self.trim[i]
        formats = {}
        for name, unscaled, scaled, amax, amax_scale in self.fits:
            row = {"unscaled": unscaled[i]}
            if scale != 1.0:
                row["loss_scaled"] = scaled[i]
            if name in SCALED:
                row["amax_scaled"] = amax[i]
                row["amax_scale"] = amax_scale[i]
            formats[name] = row
        out = BatchRow({
            "numel": self.numel[i], "amax": a, "min_nonzero": low,
            "log2_amax": math.log2(a) if a else None,
            "log2_min_nonzero": math.log2(low) if low else None,
            "zeros": self.zeros[i], "nonfinite": 0, "scale": scale, "sample": SAMPLE,
            "overflow": dict.fromkeys(FORMATS, 0), "formats": formats,
            "histogram": {"first": None, "counts": []} if first < 0 else
            {"first": LOW + first, "counts": self.hist[i, first:last + 1].tolist()}})
        out.__dict__.update(_built=self, _index=i)
        return out

    def ranges(self, i: int) -> NotedRanges:
        """The Ranges of tensor ``i`` (the flags read it), whose ``row()`` is this row."""
        if self._ranges[i] is None:
            self._ranges[i] = NotedRanges(self, i)
        return self._ranges[i]


class NotedRanges(Ranges):
    """A noted tensor's Ranges over the batch's arrays, made without the histogram as
    a list and its running sums (most of a Ranges' making), which only a rare reader
    (a scale past a cut, ``to_dict``) takes."""

    def __init__(self, built: _Built, i: int):  # not the dataclass's: no list to copy
        self.numel, self.amax = built.numel[i], built.amax[i]
        self.min_nonzero, self.zeros, self.nonfinite = built.min_nonzero[i], built.zeros[i], 0
        self.overflow = dict.fromkeys(FORMATS, 0)
        self.scale, self.sample = built.scale[i], SAMPLE
        self._at = (built, i)

    @property
    def histogram(self) -> list[int]:
        return self._at[0].hist[self._at[1]].tolist()

    @property
    def _below(self) -> list[int]:
        return self._at[0].below[self._at[1]].tolist()

    def count_at_most(self, exponent: int) -> int:
        top = min(exponent - LOW, BINS - 1)
        return int(self._at[0].below[self._at[1], top]) if top >= 0 else 0

    def row(self) -> dict:
        return self._at[0].row(self._at[1])


def _at_most(below: np.ndarray, exponents: np.ndarray) -> np.ndarray:
    """``Ranges.count_at_most`` of every row, row i at ``exponents[i]``."""
    col = np.minimum(exponents - LOW, BINS - 1)
    found = below[np.arange(below.shape[0]), np.maximum(col, 0)]
    return np.where(col >= 0, found, 0)


def _trims(hist: np.ndarray) -> list[tuple[int, int]]:
    """Per row, its first and last non-empty bin; (-1, -1) for an empty histogram."""
    live = hist != 0
    first = live.argmax(1)
    last = BINS - 1 - live[:, ::-1].argmax(1)
    empty = ~live.any(1)
    return [(-1, -1) if e else (f, la) for f, la, e in
            zip(first.tolist(), last.tolist(), empty.tolist())]
