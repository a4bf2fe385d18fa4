"""Range statistics of one tensor, as a ``stats.Pending``: abs max, smallest non-zero
|x|, zeros, non-finite elements, the exponent histogram (``precision``) and, per
format, the elements at or past its overflow cut.

Opt-in (``Recorder(ranges=...)``): the default probe never reads a tensor for them.
Dense float32/float64 CPU tensors are read by ``exponent_kernel`` where numba is used
(``kernel_choice.numba_kernels``), else by its torch versions (``torch_exponent_kernel``). Past
``SAMPLE`` elements (float32, no inf or NaN) the histogram and zeros are those of a
uniform random sample, and the extremes come from every element, from the moment
kernel's read where it made one (``stats.extremes_read``); see ``sample_index``.
Everything else (accelerators, fp16/bf16, strided memory) is read whole in chunks with
torch ops that issue no sync (``index_add_`` into the histogram, no boolean
indexing), copied with the pass's other statistics in its one transfer.
In the probe (``Measure``) a float32 CPU tensor whose one read gave its whole row (no
element at an overflow cut or below float32's normal range) is only noted during the
pass; ``range_rows`` makes all their rows together after it, the same numbers.
"""

from __future__ import annotations

import contextlib
import functools
import math
import struct
from typing import Any

import numpy as np
import torch

from varprobe import kernel_choice, precision, range_rows, stats
from varprobe.precision import BINS, FORMATS, LOW, Ranges
from varprobe.range_rows import SAMPLE  # a larger float32 CPU tensor's histogram's elements

HEAD = 4  # amax, min non-zero, zeros, non-finite; then one count per format, then bins,
# then the elements the bins and zeros counted (``SAMPLE``, or all of them)
SEED = 0x5EED
INF_BITS = 0x7F800000
_AS_BITS, _AS_FLOATS = struct.Struct("<2i"), struct.Struct("<2f")  # float32 from its bits


class Measure:
    """Makes each tensor's Pending; ``loss_scale`` (a power of two) divides the
    overflow cuts of gradients, which training multiplies by it."""

    def __init__(self, loss_scale: float = 1.0):
        self.loss_scale = loss_scale
        self.rows = range_rows.Pool(self.rows)  # the histogram rows the reads fill
        self.batch = range_rows.Batch(self.rows)  # the tensors whose one read gave all
        self._tops = {s: min(_cut_bits(cuts(s))) for s in {1.0, loss_scale}}

    rows = (8, 257)  # the histogram rows a read fills (any count sums the same); an
    # instance hands out zeroed ones of this shape (``range_rows.Pool``)

    @staticmethod
    def sample(n: int) -> np.ndarray | None:
        """The sample a tensor of ``n`` elements is counted on, None for all of them."""
        return sample_index(n) if n > SAMPLE else None

    @classmethod
    def of(cls, settings: precision.Settings | None) -> Measure | None:
        """The measurement a precision.Settings asks for; None without one."""
        return None if settings is None else cls(settings.loss_scale or 1.0)

    def values(self, t: torch.Tensor, seen: tuple | None = None) -> stats.Pending:
        """An activation or a weight: no scale. ``seen``: its extremes from the moment
        kernel's read (``stats.extremes_read``), or None."""
        return self._pending(t, 1.0, seen)

    def gradient(self, t: torch.Tensor, seen: tuple | None = None) -> stats.Pending:
        return self._pending(t, self.loss_scale, seen)

    def _pending(self, t: torch.Tensor, scale: float, seen: tuple | None) -> stats.Pending:
        """Noted in ``batch`` where one read (the moment kernel's, else one here) gave
        the whole row: no element at an overflow cut, none at or below 2^-126 (the
        common case); the same row as ``measure``'s, which takes every other tensor."""
        n = t.numel()
        if seen is None and n > SAMPLE:
            seen = _sampled_read(t, self.rows())
        if seen is not None and seen[0] == n and seen[3] is not None \
                and seen[1] < self._tops[scale] and seen[2] >= range_rows.SUBNORMAL_BITS:
            return self.batch.add(n, seen[1], seen[2], seen[3], scale)
        return measure(t, scale, seen)


def _sampled_read(t: torch.Tensor, rows: np.ndarray) -> tuple | None:
    """What the moment kernel's read gives (``stats.extremes_read``), from one read of
    a dense float32 CPU tensor's own (past ``SAMPLE`` elements), the sample's histogram
    into ``rows`` (zeroed, ``Measure.rows``); None for any other tensor."""
    flat = _readable(t.detach())
    if flat is None or flat.dtype != np.float32:
        return None
    top, low = _kernels().sampled(flat.view(np.int32), sample_index(flat.shape[0]), rows)
    return flat.shape[0], int(top), int(low), rows


def cuts(scale: float) -> tuple[float, ...]:
    return _cuts(scale)


@functools.lru_cache(maxsize=16)
def _cuts(scale: float) -> tuple[float, ...]:
    return tuple(f.overflow_cut / scale for f in FORMATS.values())


def _strict() -> list[bool]:
    """Per cut: whether only |x| past it overflows (see NumberFormat.cut_inclusive)."""
    return [not f.cut_inclusive for f in FORMATS.values()]


def measure(t: torch.Tensor, scale: float = 1.0, seen: tuple | None = None
            ) -> stats.Pending:
    """The Pending of ``t``'s range row; overflow cuts divided by ``scale``; ``seen``:
    (elements, ``exponent_kernel.extremes``) of ``t`` from an earlier read, or None."""
    x = t.detach()
    n = x.numel()
    known = seen[1:] if seen is not None and seen[0] == n else None
    raw = _from_read(known, cuts(scale), n) if known is not None else None
    if raw is None:
        flat = _readable(x)
        raw = _cpu(flat, cuts(scale), known) if flat is not None else _chunked(x, cuts(scale))

    def finish(r: list[float]) -> Ranges:
        amax = r[0] if r[0] >= 0 else None
        k = len(FORMATS)
        drawn = int(r[-1])
        return Ranges(numel=n, amax=amax, min_nonzero=r[1] if amax is not None else None,
                      zeros=int(r[2]), nonfinite=int(r[3]),
                      overflow=dict(zip(FORMATS, map(int, r[HEAD: HEAD + k]))),
                      histogram=_whole(r[HEAD + k: -1]), scale=scale,
                      sample=None if drawn == n else drawn)

    return stats.Pending(raw, finish)


def _whole(counts: list) -> list[int]:
    """Counts as ints: a CPU row's are already (``_row``), a device row's are floats."""
    return counts if not counts or type(counts[0]) is int else list(map(int, counts))


def _readable(x: torch.Tensor) -> np.ndarray | None:
    """``x``'s memory as a flat numpy array where the CPU kernels read it, else None;
    the common case (contiguous float32) without the general checks, which cost more
    than a sampled tensor's whole kernel time."""
    if x.dtype == torch.float32 and stats.reads_are_free(x.device) and x.is_contiguous() \
            and x.numel() > 0 and not x.is_neg():
        return x.view(-1).numpy()
    return stats._dense(x).numpy() if _kernel_readable(x) else None


def _kernel_readable(x: torch.Tensor) -> bool:
    """A dense float32 CPU tensor (or float64, where numba is used)."""
    wide = (torch.float32, torch.float64) if kernel_choice.numba_kernels() else (torch.float32,)
    return (stats.reads_are_free(x.device) and x.dtype in wide and x.numel() > 0
            and not x.is_neg() and stats._dense(x) is not None)


def _kernels():
    """numba's range kernels where numba is used, else their torch versions."""
    return _range_kernels(kernel_choice.numba_kernels() is not None)


@functools.cache
def _range_kernels(numba: bool):
    if not numba:
        from varprobe import torch_exponent_kernel

        return torch_exponent_kernel
    from varprobe import exponent_kernel

    return exponent_kernel


def _from_read(known: tuple, limits: tuple[float, ...], n: int) -> list[float] | None:
    """The row from the moment kernel's read alone, without looking at the tensor
    again: where that read took the sample's histogram, no element reaches a cut and
    no sampled one is below float32's normal range (the common case, and the cheap one:
    a tensor's own Python work costs more than its sample). None otherwise."""
    top, low, rows = known
    if rows is None or top >= min(_cut_bits(limits)):
        return None
    raw = rows.sum(0)
    if raw[1]:
        return None
    return _row(top, min(low + 1, INF_BITS), raw, 0, (0,) * len(limits), None, SAMPLE)


def _cpu(flat: np.ndarray, limits: tuple[float, ...], known: tuple | None = None
         ) -> list[float]:
    if flat.dtype == np.float32:
        return _cpu32(flat.view(np.int32), limits, known)
    from varprobe import exponent_kernel as k

    hist = np.zeros(BINS, dtype=np.int64)
    over = np.zeros(len(limits), dtype=np.int64)
    cut = np.array(limits)
    cut = np.where(_strict(), np.nextafter(cut, np.inf), cut)
    amax, amin, zeros, nonfinite = k.ranges64(flat, cut, hist, over)
    return [float(amax), float(amin), float(zeros), float(nonfinite)] + over.tolist() \
        + hist.tolist() + [float(flat.size)]


def _cpu32(ints: np.ndarray, limits: tuple[float, ...], known: tuple | None = None
           ) -> list[float]:
    """The row of a float32 array (its int32 view). Past ``SAMPLE`` elements without
    inf or NaN: amax, the smallest non-zero |x| and the overflow counts from every
    element, the histogram and zeros from ``SAMPLE`` of them (``sample_index``), since
    its per-element increment is what costs; otherwise all of it from every element.
    ``known``: ``extremes`` of ``ints`` from the moment kernel's read, and the
    sample's histogram rows from it too (or None: the sample is read here)."""
    k = _kernels()
    bits = _cut_bits(tuple(limits))
    if ints.shape[0] > SAMPLE:
        idx = sample_index(ints.shape[0])
        rows = np.zeros((k.ROWS, 257), dtype=np.int64)
        if known is None:
            top, low = k.sampled(ints, idx, rows)
        else:
            top, low, taken = known
            if taken is None:
                k.sample_bins(ints, idx, rows)
            else:
                rows = taken
        if top < INF_BITS:
            over = k.cut_counts(ints, *bits)[1:] if top >= min(bits) else (0,) * len(bits)
            raw = rows.sum(0)
            return _row(top, min(low + 1, INF_BITS), raw, 0, over,
                        ints[idx] if raw[1] else None, idx.shape[0])
    rows = np.zeros((k.ROWS, 257), dtype=np.int64)
    amax, amin = k.exponent_bins(ints, rows)
    raw = rows.sum(0)
    infs, over = 0, (0,) * len(bits)
    if amax >= min(bits) or raw[255]:
        infs, *over = k.cut_counts(ints, *bits)
    return _row(amax, amin, raw, infs, over, ints, ints.shape[0])


def _row(amax: int, amin: int, raw: np.ndarray, infs: int, over,
         counted: np.ndarray | None, drawn: int) -> list[float]:
    """The row from extremes as bits, ``exponent_bins``' counts over the ``drawn``
    elements counted (``counted``, their int32 bits, read again only where some are
    below float32's normal range: None where none is) and the infinities and overflow
    counts of every element."""
    raw[255] -= infs
    hist = np.zeros(BINS, dtype=np.int64)
    hist[24:278] = raw[2:256]  # field f of (bits - 1): ceil(log2|x|) = f - 126
    if raw[1]:
        _kernels().small_bins(counted, hist)
    top, low = _AS_FLOATS.unpack(_AS_BITS.pack(amax, amin))
    head = [top if amax > 0 else -1.0, low, float(raw[0]), float(infs + raw[256])]
    return head + [float(o) for o in over] + hist.tolist() + [float(drawn)]


@functools.lru_cache(maxsize=8)
def _cut_bits(limits: tuple[float, ...]) -> tuple[int, ...]:
    """The cuts as float32 bits, compared as integers (the next float up where only
    past the cut overflows; past float32's range, the bits of inf, which no finite
    element reaches)."""
    cut = np.array(limits)
    past = cut > float(np.finfo(np.float32).max)
    bits = np.where(past, 1.0, cut).astype(np.float32).view(np.int32).astype(np.int64)
    return tuple(int(b) for b in np.where(past, INF_BITS, bits + np.array(_strict())))


@functools.lru_cache(maxsize=32)
def sample_index(n: int) -> np.ndarray:
    """``SAMPLE`` indices into ``n`` elements, uniform and independent (drawn with
    replacement, so each sampled fraction is a binomial estimate: standard error
    sqrt(p (1 - p) / SAMPLE)), sorted so that the gather walks memory forward. Seeded:
    the same tensor gives the same row, run after run."""
    return np.sort(np.random.default_rng(SEED).integers(0, n, SAMPLE))


def _chunked(x: torch.Tensor, limits: list[float]) -> torch.Tensor:
    """The same row from torch ops, chunk by chunk, on the tensor's device."""
    dev = x.device
    hist = torch.zeros(BINS + 1, dtype=torch.int64, device=dev)  # last bin: not counted
    head = torch.tensor([-1.0, math.inf], dtype=torch.float64, device=dev)
    counts = torch.zeros(2 + len(limits), dtype=torch.int64, device=dev)
    for c in (c.float().reshape(-1) for c in stats._chunks(x)):
        a = c.abs()
        finite = torch.isfinite(a)
        live = finite & (a > 0)
        m, e = torch.frexp(a)
        k = (e - (m == 0.5).int()).clamp_(LOW, precision.HIGH) - LOW
        hist.index_add_(0, torch.where(live, k, BINS).long(), torch.ones_like(k, dtype=torch.int64))
        kept = torch.where(finite, a, 0)
        top = torch.where(live.any(), kept.amax(), -1.0).double()
        low = torch.where(live, a, math.inf).amin().double()
        head = torch.stack([torch.maximum(head[0], top), torch.minimum(head[1], low)])
        counts += torch.stack([(a == 0).sum(), (~finite).sum()]
                              + [(kept > cut if strict else kept >= cut).sum()
                                 for cut, strict in zip(limits, _strict())])
    if x.numel() == 0:
        head = torch.tensor([-1.0, math.inf], dtype=torch.float64, device=dev)
    drawn = torch.full((1,), float(x.numel()), dtype=torch.float64, device=dev)
    return torch.cat([head, counts.double(), hist[:BINS].double(), drawn])


def layer_ranges(slots: dict[str, int], weight_slots: tuple[int | None, int | None],
                 range_slots: dict[int, int], host: list) -> dict[str, dict]:
    """A layer's range rows by tensor (input, forward, backward, backward_input,
    weight, weight_grad), JSON-ready; tensors without a range slot are left out. A
    tensor two layers see (one's output, the next one's input) gives both the same
    row, made once: read-only."""
    named = dict(slots)
    named.update(zip(("weight", "weight_grad"), weight_slots))
    out = {}
    for key, slot in named.items():
        found = range_slots.get(slot) if slot is not None else None
        if found is not None and host[found] is not None:
            out[key] = host[found].row()
    return out


def autocast(settings: precision.Settings | None, inputs: Any):
    """torch.autocast in the settings' dtype on the inputs' device (the forward only:
    backward runs in the dtypes the forward chose), or nothing."""
    if settings is None or settings.autocast is None:
        return contextlib.nullcontext()
    from varprobe.recorder import tensor_leaves

    leaves = tensor_leaves(inputs)
    device = leaves[0].device.type if leaves else "cpu"
    dtype = getattr(torch, precision.FORMATS[settings.autocast].torch_dtype)
    return torch.autocast(device_type=device, dtype=dtype)
