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

from varprobe.precision import BINS, FORMATS, LOW, SCALED, Ranges, Row

SAMPLE = 1 << 13  # elements a larger float32 CPU tensor's histogram counts (exponents)
SUBNORMAL_BITS = 0x800000  # |x| bits at or below which exponents refines the bins
_NONE: list = []  # a noted tensor's raw sums: nothing to transfer
_NO_OVERFLOW = dict.fromkeys(FORMATS, 0)  # a noted tensor's overflow counts (copied)


class Pool:
    """Zeroed histogram rows of ``shape`` for the moment reads (``rows()``), taken from
    blocks of them: no allocation per tensor, and a batch sums its tensors' rows a
    block at a time, without copying them together first."""

    BLOCK = 64

    def __init__(self, shape: tuple[int, int]):
        self.shape = shape
        self._blocks: list[np.ndarray] = []
        self._views: list[np.ndarray] = []  # the blocks' rows, made a block at a time:
        # handing one out is an index (kept, so that no other array takes their ids)
        self._next = 0
        self._at: dict[int, int] = {}  # id of a view -> its place in the blocks

    def __call__(self) -> np.ndarray:
        i = self._next
        if i == len(self._views):
            self._grow()
        self._next = i + 1
        return self._views[i]

    def _grow(self) -> None:
        block = np.zeros((self.BLOCK, *self.shape), dtype=np.int64)
        self._blocks.append(block)
        views, start = list(block), len(self._views)
        self._views.extend(views)
        self._at.update(zip(map(id, views), range(start, start + self.BLOCK)))

    def summed(self, rows: list[np.ndarray]) -> np.ndarray:
        """Each of ``rows`` summed over its histogram rows: [len(rows), bins]; where
        all are views this pool handed out, from the blocks' sums."""
        at = [self._at.get(id(r), -1) for r in rows]
        if not rows or min(at) < 0:
            return np.stack([r.sum(0) for r in rows]) if rows else np.zeros((0, 257), np.int64)
        last = max(at) // self.BLOCK + 1
        whole = np.concatenate([b.sum(1) for b in self._blocks[:last]])
        return whole[at]


class Batch:
    """The tensors of one pass noted for their rows (``add``), built together at the
    first read of one (those noted after it, at the first read of one of them)."""

    def __init__(self, pool: Pool | None = None):
        self.pool = pool or Pool((8, 257))  # where the entries' histogram rows come from
        self._entries: list[tuple] = []  # (numel, top bits, low bits, rows, scale)
        self._parts: list[_Built] = []  # built, in order, each over the next entries
        self._starts: list[int] = []
        self._done = 0  # entries built

    def add(self, n: int, top: int, low: int, rows: np.ndarray, scale: float) -> Noted:
        """The Pending (a ``Noted``) of a tensor of ``n`` elements whose sample's
        histogram rows are ``rows`` (more than ``SAMPLE`` elements, ``top`` below every
        overflow cut and the smallest non-zero |x|, ``low`` + 1 as bits, above
        float32's subnormals)."""
        noted = Noted(self, len(self._entries))
        self._entries.append((n, top, low, rows, scale))
        return noted

    def row(self, index: int) -> dict:
        if index >= self._done:
            self._parts.append(_Built(self._entries[self._done:], self.pool))
            self._starts.append(self._done)
            self._done = len(self._entries)
        if len(self._parts) == 1:  # the probe's case: every row read after the pass
            return self._parts[0].row(index)
        part = bisect.bisect_right(self._starts, index) - 1
        return self._parts[part].row(index - self._starts[part])


class Noted:
    """A noted tensor's ``stats.Pending`` (nothing to transfer; ``finish`` gives
    itself) and its host row: its dict made on first ``row()``, as a Ranges'. One
    object per tensor, not a Pending around it: the hooks make one per tensor."""

    __slots__ = ("batch", "index", "made")
    raw = _NONE

    def __init__(self, batch: Batch, index: int):
        self.batch, self.index, self.made = batch, index, None

    def finish(self, _raw: list) -> Noted:
        return self

    def row(self) -> dict:
        """The row, kept here once made: a layer's input is the layer before's output."""
        if self.made is None:
            self.made = self.batch.row(self.index)
        return self.made


class BatchRow(Row):
    """A noted tensor's row; its Ranges (``source``, what the flags read) made only
    when asked for. A copy (``dataclasses.asdict``'s) has none, as a plain Row."""

    @property
    def source(self) -> Ranges | None:
        at = self.__dict__.get("_at")  # (the batch's arrays, this row's index)
        return at[0].ranges(at[1]) if at is not None else None

    def __deepcopy__(self, memo: dict) -> Row:
        out = Row(copy.deepcopy(dict(self), memo))
        out.source = self.source
        return out


class _Built:
    """Every noted tensor's counts as arrays; rows and Ranges made per tensor on demand."""

    def __init__(self, entries: list[tuple], pool: Pool):
        n = len(entries)
        self.numel = [e[0] for e in entries]
        self.scale = [e[4] for e in entries]
        top = np.array([e[1] for e in entries], dtype=np.int32)
        low = np.minimum(np.array([e[2] for e in entries], dtype=np.int64) + 1, 0x7F800000)
        self.amax = [a if b > 0 else None for a, b in zip(_floats(top), top.tolist())]
        self.min_nonzero = [m if a is not None else None
                            for m, a in zip(_floats(low.astype(np.int32)), self.amax)]
        raw = pool.summed([e[3] for e in entries])
        self.hist = np.zeros((n, BINS), dtype=np.int64)
        self.hist[:, 24:278] = raw[:, 2:256]  # as exponents._row: no bin-1 element here
        self.below = self.hist.cumsum(1)
        self.zeros = raw[:, 0].tolist()
        self.trim, self.kept = _trims(self.hist)
        self._rows: list[BatchRow | None] = [None] * n
        self._ranges: list[Ranges | None] = [None] * n
        self._fits()

    def _fits(self) -> None:
        """``Ranges.fits`` of every tensor in every format, under each scale a row
        shows (none, its own where not 1, its amax scale in the fp8 formats): the
        counts at or below the flush and normal cuts gathered as one [tensors x
        (format, scale)] matrix, overflow 0 but where a rare tensor reaches a cut
        under another scale than its own (then the Ranges' own answer)."""
        n = len(self.numel)
        log2, floor = math.log2, math.floor
        steps = {name: [floor(log2(FORMATS[name].max / a)) if a else None for a in self.amax]
                 for name in SCALED}  # log2 of each amax scale (as Ranges.amax_scale)
        self.amax_scales = {name: [None if k is None else 2.0 ** k for k in ks]
                            for name, ks in steps.items()}
        own = np.array(self.scale)
        logs = {s: round(log2(s)) for s in set(self.scale)}
        shifts = {"unscaled": np.zeros(n, dtype=np.int64),
                  "loss_scaled": np.array([logs[s] for s in self.scale], dtype=np.int64)}
        self.top = np.array([-1.0 if a is None else a for a in self.amax])  # -1: none
        self.columns, flush, normal, self.over = [], [], [], {}
        for name, fmt in FORMATS.items():
            scales = {"unscaled": np.ones(n), "loss_scaled": own}
            if name in SCALED:
                scales["amax_scaled"] = np.array([s or 1.0 for s in self.amax_scales[name]])
                shifts["amax_scaled"] = np.array([k or 0 for k in steps[name]], dtype=np.int64)
            for kind, by in scales.items():
                self.columns.append((name, kind))
                flush.append(fmt.flush_exponent - shifts[kind])
                normal.append(fmt.normal_exponent - shifts[kind])
                self._overflows(len(self.columns) - 1, fmt, by, own)
        at = {c: k for k, c in enumerate(self.columns)}
        self.layout = {name: (at[name, "unscaled"], at[name, "loss_scaled"],
                              at.get((name, "amax_scaled"))) for name in FORMATS}
        self._smallest: dict[tuple, list] = {}
        self._scaled: dict[tuple, tuple] = {}  # (format, scale) -> ``_under`` columns
        flushed = _at_most(self.below, np.array(flush).T)
        below_normal = _at_most(self.below, np.array(normal).T)
        self.under = (flushed / SAMPLE).tolist()
        self.sub = ((below_normal - flushed) / SAMPLE).tolist()

    def _overflows(self, column: int, fmt, scales: np.ndarray, own: np.ndarray) -> None:
        """``Ranges.overflow_fraction`` where it is not 0: none of a noted tensor's
        elements reaches its own cuts; past a cut under another scale, the Ranges'."""
        for i in np.flatnonzero(self._reach(fmt, scales) & (scales != own)).tolist():
            self.over[i, column] = self.ranges(i).overflow_fraction(fmt, float(scales[i]))

    def column(self, name: str, scale: float, i: int) -> int | None:
        """The column of tensor ``i``'s fits in format ``name`` under ``scale``, where
        one was gathered (no scale, its own, its amax scale); else None."""
        unscaled, own, amax = self.layout[name]
        if scale == 1.0:
            return unscaled
        if scale == self.scale[i]:
            return own
        return amax if amax is not None and scale == self.amax_scales[name][i] else None

    def fits(self, i: int, k: int) -> dict:
        return {"underflow": self.under[i][k], "subnormal": self.sub[i][k],
                "overflow": self.over.get((i, k), 0.0) if self.over else 0.0}

    def fits_under(self, i: int, fmt, scale: float) -> dict:
        """``Ranges.fits`` of tensor ``i`` under a scale no column holds (the flags'
        loss scale, on every gradient), made for every tensor at once."""
        key = fmt.name, scale
        if key not in self._scaled:
            self._scaled[key] = self._under(fmt, scale)
        under, sub, reach = self._scaled[key]
        return {"underflow": under[i], "subnormal": sub[i],
                "overflow": self.ranges(i).overflow_fraction(fmt, scale) if reach[i] else 0.0}

    def _under(self, fmt, scale: float) -> tuple[list, list, list]:
        """The fractions flushed and subnormal under ``scale`` of every tensor, and
        which reach the overflow cut (their fraction is then the Ranges')."""
        shift = round(math.log2(scale))
        flushed = _at_most(self.below, np.full(len(self.numel), fmt.flush_exponent - shift))
        below_normal = _at_most(self.below,
                                np.full(len(self.numel), fmt.normal_exponent - shift))
        return ((flushed / SAMPLE).tolist(), ((below_normal - flushed) / SAMPLE).tolist(),
                self._reach(fmt, scale).tolist())

    def _reach(self, fmt, scales) -> np.ndarray:
        """Which tensors' amax, times ``scales``, is at or past the format's cut."""
        top = self.top * scales
        return (top > fmt.overflow_cut) | ((top == fmt.overflow_cut) & fmt.cut_inclusive)

    def smallest_scale(self, i: int, fmt, max_underflow: float) -> float | None:
        """``Ranges.smallest_scale`` of tensor ``i``, made for every tensor at once."""
        key = fmt.name, max_underflow
        if key not in self._smallest:
            self._smallest[key] = self._smallest_scales(fmt, max_underflow)
        return self._smallest[key][i]

    def _smallest_scales(self, fmt, max_underflow: float) -> list[float | None]:
        """For each tensor the first e of -64..64 under which at most ``max_underflow``
        flushes and (a sampled row: from the exact amax) some element is left; both
        only get truer as e grows, so the first is what a bisection finds."""
        exps = np.arange(-64, 65)
        flushed = _at_most(self.below, np.broadcast_to(fmt.flush_exponent - exps,
                                                       (len(self.numel), exps.size)))
        alive = self.top[:, None] * np.array([2.0 ** e for e in exps.tolist()]) \
            > 2.0 ** fmt.flush_exponent
        keep = (flushed / SAMPLE <= max_underflow) & alive
        return [2.0 ** (f - 64) if found else None
                for f, found in zip(keep.argmax(1).tolist(), keep.any(1).tolist())]

    def row(self, i: int) -> BatchRow:
        if self._rows[i] is None:
            self._rows[i] = self._row(i)
        return self._rows[i]

    def _row(self, i: int) -> BatchRow:
        a, low, scale = self.amax[i], self.min_nonzero[i], self.scale[i]
        formats: dict[str, dict] = {}
        for name, (unscaled, own, amax) in self.layout.items():
            row = formats[name] = {"unscaled": self.fits(i, unscaled)}
            if scale != 1.0:
                row["loss_scaled"] = self.fits(i, own)
            if amax is not None:
                s = self.amax_scales[name][i]
                row["amax_scaled"] = self.fits(i, amax) if s else None
                row["amax_scale"] = s
        first, start, end = self.trim[i]
        out = BatchRow({
            "numel": self.numel[i], "amax": a, "min_nonzero": low,
            "log2_amax": math.log2(a) if a else None,
            "log2_min_nonzero": math.log2(low) if low else None,
            "zeros": self.zeros[i], "nonfinite": 0, "scale": scale, "sample": SAMPLE,
            "overflow": _NO_OVERFLOW.copy(), "formats": formats,
            "histogram": {"first": None if first is None else LOW + first,
                          "counts": self.kept[start:end]}})
        out._at = (self, i)
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

    def fits(self, fmt, scale: float = 1.0) -> dict[str, float | None]:
        """As a Ranges', from the columns gathered for the rows (or, under another
        scale, from those made for it, ``_Built.fits_under``)."""
        built, i = self._at
        k = built.column(fmt.name, scale, i)
        return built.fits_under(i, fmt, scale) if k is None else built.fits(i, k)

    def smallest_scale(self, fmt, max_underflow: float) -> float | None:
        return self._at[0].smallest_scale(self._at[1], fmt, max_underflow)

    def row(self) -> dict:
        return self._at[0].row(self._at[1])


def _at_most(below: np.ndarray, exponents: np.ndarray) -> np.ndarray:
    """``Ranges.count_at_most`` of every row of ``below``, row i at ``exponents[i]``
    (one exponent, or a row of them)."""
    col = np.minimum(exponents - LOW, BINS - 1)
    rows = np.arange(below.shape[0]).reshape(-1, *[1] * (col.ndim - 1))
    return np.where(col >= 0, below[rows, np.maximum(col, 0)], 0)


def _floats(bits: np.ndarray) -> list[float]:
    """float32 values from their bits, as Python floats."""
    return bits.view(np.float32).astype(np.float64).tolist()


def _trims(hist: np.ndarray) -> tuple[list[tuple], list[int]]:
    """The histograms without their empty ends, all in one list: per row its first
    non-empty bin (None for an empty histogram) and where its counts start and end
    in that list."""
    live = hist != 0
    first = live.argmax(1)
    last = np.where(live.any(1), BINS - 1 - live[:, ::-1].argmax(1), first - 1)
    bins = np.arange(BINS)
    kept = hist[(bins >= first[:, None]) & (bins <= last[:, None])].tolist()
    ends = np.cumsum(last - first + 1).tolist()
    return [(f if e > s else None, s, e) for f, s, e in
            zip(first.tolist(), [0] + ends[:-1], ends)], kept
