"""Zero elements and live units of a dense CPU tensor, without numba, in one read.

A unit (a conv's channel, a Linear's feature) is dead when it is zero for every sample
and position. The tensor is read as its (before, units, after) layout in memory, a
chunk of whole rows at a time: the compare ``x != 0`` goes into a chunk of float
scratch (in cache) and is summed per row there. Those counts give both the zeros and,
per unit, whether anything was non-zero, where the per-unit max and min took two more
reads of the tensor. Counts of 0/1 in float32 are exact up to 2^24 per sum; a chunk
holds at most 2^18 elements, so every sum here is.
"""

from __future__ import annotations

import torch

CHUNK = 1 << 18  # elements of scratch: 1 MiB of float32


def counts(v: torch.Tensor) -> tuple[float, float] | None:
    """(zero elements, live units) of a contiguous (before, units, after) CPU tensor;
    None where a row is longer than a chunk (the caller reads it otherwise)."""
    before, units, after = v.shape
    row = after if after > 1 else units  # the elements a row of the chunks holds
    if v.numel() == 0 or row > CHUNK:
        return None
    scratch = torch.empty(min(v.numel(), CHUNK), dtype=v.dtype)
    if after > 1:  # units along rows of ``after`` contiguous elements
        rows = v.view(before * units, after)
        found = torch.empty(before * units, dtype=torch.float64)
        step = CHUNK // after
        for start in range(0, rows.shape[0], step):
            c = rows[start:start + step]
            found[start:start + c.shape[0]] = _nonzero(c, scratch).sum(1)
        per_unit = found.view(before, units).sum(0)
        total = found.sum()
    else:  # units innermost: a Linear's features, summed down each column
        rows = v.view(before, units)
        per_unit = torch.zeros(units, dtype=torch.float64)
        step = CHUNK // units
        for start in range(0, before, step):
            per_unit += _nonzero(rows[start:start + step], scratch).sum(0)
        total = per_unit.sum()
    return float(v.numel() - total), float(per_unit.count_nonzero())


def _nonzero(c: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """1.0 where ``c`` is non-zero, in scratch shaped as ``c``."""
    return torch.ne(c, 0, out=scratch[:c.numel()].view(c.shape))
