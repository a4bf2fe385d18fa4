"""The network's two ends, its input and its output: their moments and indicator test
in the pass's one transfer, and the report's TensorInfo made from them."""

from __future__ import annotations

from typing import Any

import torch

from varprobe import stats
from varprobe.recorder import Recorder, tensor_leaves
from varprobe.report import TensorInfo


def first_tensor(value: Any) -> torch.Tensor | None:
    tensors = tensor_leaves(value)
    return next((t for t in tensors if t.is_floating_point()), tensors[0] if tensors else None)


def measured_copy(rec: Recorder, x: Any, fed: Any) -> Any:
    """``fed`` where a call measured its first tensor as cloned from ``x`` (not written in
    place, the same layout): the same moments, not read again; else ``x``."""
    a, b = first_tensor(x), first_tensor(fed)
    same = a is not None and b is not None and b._version == 0 and id(b) in rec._seen \
        and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    return fed if same else x


def moments_slot(rec: Recorder, value: Any) -> int | None:
    """A slot for the moments of the network's input or output: measured on the device
    (the output usually already is, as the last call's) and copied with everything else
    in the pass's one transfer."""
    first = first_tensor(value)
    if first is None or not first.is_floating_point():
        return None
    return rec._activation_slot(first)


def indicator_slot(rec: Recorder, value: Any) -> int | None:
    """A slot for whether every element of the network input is 0 or 1, on the device."""
    first = first_tensor(value)
    if first is None or not first.is_floating_point() or not first.numel():
        return None
    with torch.no_grad():
        flag = first.eq(0).logical_or_(first.eq(1)).all().to(torch.float64).reshape(1)
    return rec._new_slot(stats.Pending(flag, list))


def tensor_info(value: Any, host: list, slot: int | None,
                 indicator: int | None = None) -> TensorInfo:
    first = first_tensor(value)
    if first is None:
        return TensorInfo(shape=None, dtype=None, mean=None, var=None, second_moment=None)
    shape: Any = list(first.shape)
    if isinstance(value, dict):  # a value holding several tensors lists each one's shape
        shape = {k: list(v.shape) if isinstance(v, torch.Tensor) else
                 [list(t.shape) for t in leaves]
                 for k, v in value.items() if (leaves := tensor_leaves(v))}
    row = host[slot] if slot is not None else [None] * stats.WIDTH
    return TensorInfo(shape=shape, dtype=str(first.dtype).removeprefix("torch."),
                      mean=row[stats.MEAN], var=row[stats.VAR],
                      second_moment=row[stats.SECOND_MOMENT],
                      indicator=None if indicator is None else  # all zeros: no ones
                      host[indicator][0] == 1 and bool(row[stats.SECOND_MOMENT]))
