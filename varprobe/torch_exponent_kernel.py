"""``exponent_kernel``'s float32 kernels without numba: the CPU path's default.

The same functions, arguments and results as ``varprobe.exponent_kernel``'s
``exponent_bins``, ``sampled``, ``sample_bins``, ``extremes``, ``cut_counts`` and
``small_bins`` (see there), on the same int32 views of float32 arrays, so
``exponents`` assembles one row from either. A histogram is a ``bincount`` of the
exponent field: numpy's on a small array or a sample (a few µs per call, where each
torch op costs ~10), torch's on a large tensor's chunks. The extremes of a large
tensor are two vector reads and one write per chunk (``extremes``) where numba's loop
rides along the moment read; the general chunked path (``frexp`` and ``index_add_``)
that accelerators take is ~30x numba's time per element.
"""

from __future__ import annotations

import functools
import struct

import numpy as np
import torch

INF_BITS = 0x7F800000
CHUNK = 1 << 18  # elements per piece: 1 MB int32 scratch, reused
SMALL = 1 << 15  # up to this many elements numpy's ops cost less than torch's
ROWS = 1  # histogram rows exponent_bins fills (numba's kernel takes several in turn)
TOP = 0x7FFFFFFF  # int32 max: the key of zero (``extremes``)
_KEY_OFFSET = torch.tensor(TOP, dtype=torch.int32)
_AS_BITS = struct.Struct("<f")


def exponent_bins(a: np.ndarray, rows: np.ndarray) -> tuple[int, int]:
    if a.shape[0] <= SMALL:
        return _array_bins(a, rows)
    whole = torch.from_numpy(a)
    finite, nonzero = 0, INF_BITS
    for start in range(0, whole.numel(), CHUNK):
        piece = whole[start:start + CHUNK]
        got = _piece_bins(piece, rows)
        if got is None:  # a NaN: counted again whole by numpy's path, rare
            rows[:] = 0
            return _array_bins(a, rows)
        finite, nonzero = max(finite, got[0]), min(nonzero, got[1])
    return finite, nonzero


def _array_bins(a: np.ndarray, rows: np.ndarray) -> tuple[int, int]:
    """``exponent_bins`` in numpy: a small array, or one holding a NaN (field 256)."""
    bits = a & 0x7FFFFFFF
    top = int(bits.max())
    finite = top if top < INF_BITS else int(np.where(bits < INF_BITS, bits, 0).max())
    bits -= 1  # zero -> -1, which as the low 31 bits is the largest
    nonzero = min(int((bits & 0x7FFFFFFF).min()) + 1, INF_BITS)
    _count_fields(bits, rows)
    return finite, nonzero


def _count_fields(below: np.ndarray, rows: np.ndarray) -> None:
    """Adds to ``rows[0]`` the count of each exponent field of ``below`` (|x|'s bits
    minus one, an owned int32 array, overwritten): zero's -1 goes to bin 0."""
    below >>= 23
    below += 1
    rows[0] += np.bincount(below, minlength=257)


def _piece_bins(piece: torch.Tensor, rows: np.ndarray) -> tuple[int, int] | None:
    """One chunk into reused scratch (fresh temporaries of a large tensor cost more in
    page faults than the arithmetic); None when it holds a NaN."""
    n = piece.numel()
    bits, shifted, field = (b[:n] for b in _scratch(n))
    torch.bitwise_and(piece, 0x7FFFFFFF, out=bits)
    top = int(bits.amax())
    if top > INF_BITS:
        return None
    finite = top if top < INF_BITS else int(torch.where(bits < INF_BITS, bits, 0).amax())
    bits -= 1  # zero -> -1: its field is -1, and as unsigned it is the largest
    # bincount is 5x faster on uint8; without NaN the fields (-1..254, plus one) fit,
    # -1 wrapping to 255 and back to 0 on the add
    torch.bitwise_right_shift(bits, 23, out=shifted)
    field.copy_(shifted)
    field += 1
    rows[0, :256] += torch.bincount(field, minlength=256).numpy()
    bits &= 0x7FFFFFFF  # zero became 2^31 - 1
    return finite, min(int(bits.amin()) + 1, INF_BITS)


@functools.cache
def _scratch(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two int32 and one uint8 buffer of ``CHUNK`` elements (fewer for a small tensor)."""
    size = min(CHUNK, 1 << max(n - 1, 1).bit_length())
    return (torch.empty(size, dtype=torch.int32), torch.empty(size, dtype=torch.int32),
            torch.empty(size, dtype=torch.uint8))


def sample_bins(a: np.ndarray, idx: np.ndarray, rows: np.ndarray) -> None:
    below = a[idx]
    below &= 0x7FFFFFFF
    below -= 1
    _count_fields(below, rows)


def sampled(a: np.ndarray, idx: np.ndarray, rows: np.ndarray) -> tuple[int, int]:
    sample_bins(a, idx, rows)
    return extremes(a)


def extremes(a: np.ndarray) -> tuple[int, int]:
    """One pass writes each chunk's key into scratch, 2b + 2^31 - 1 of its bits b
    wrapped to int32, that is 2|b| - 1 - 2^31 (|b| the bits of |x|: the sign is
    shifted out), so that signed order is the order of |x| with zero (-1 unsigned)
    past every other value; ``aminmax`` reads it. Its min is the smallest non-zero
    |x|, its max the largest |x| unless the chunk holds a zero: then ``aminmax`` of
    the floats gives that."""
    whole = torch.from_numpy(a)
    top, low = 0, TOP
    for start in range(0, whole.numel(), CHUNK):
        piece = whole[start:start + CHUNK]
        key = _scratch(piece.numel())[0][:piece.numel()]
        torch.add(_KEY_OFFSET, piece, alpha=2, out=key)
        least, most = (int(v) for v in torch.aminmax(key))
        low = min(low, (least + TOP) >> 1)
        top = max(top, (most + TOP + 2) >> 1 if most < TOP else _largest(piece))
    return top, low


def _largest(piece: torch.Tensor) -> int:
    """The bits of the largest |x| of a chunk of float32 bits (NaN: past inf)."""
    least, most = torch.aminmax(piece.view(torch.float32))
    value = torch.maximum(most, -least).item()
    return int.from_bytes(_AS_BITS.pack(value), "little") & 0x7FFFFFFF


def cut_counts(a: np.ndarray, *cuts: int) -> tuple[int, ...]:
    bits = torch.from_numpy(a) & 0x7FFFFFFF
    finite = torch.where(bits < INF_BITS, bits, 0)
    counts = [(bits == INF_BITS).sum()] + [(finite >= c).sum() for c in cuts]
    return tuple(int(c) for c in counts)


def small_bins(a: np.ndarray, hist: np.ndarray) -> None:
    bits = torch.from_numpy(a) & 0x7FFFFFFF
    small = bits[(bits > 0) & (bits <= 0x800000)] - 1  # whole 2^-149 steps below |x|
    # bit length of n (0 for n = 0), frexp's exponent: the exponent of |x| from 2^-149
    length = torch.frexp(small.double()).exponent
    np.add.at(hist, length.long().numpy(), 1)
