"""The probe's one device-to-host transfer: raw values, still on their devices, and how
they come back.

A measurement is a ``Pending``: raw values and a function that makes the host row the
report reads from them. Raw values are host floats, a vector on a device, or ``Parts``
of both, where a reduction's 0-d results go in as they are; ``Folded`` values are
combined on the host into fewer (a long tensor's per-chunk moments). ``collect`` copies
every value still on a device in one transfer per device: each dtype's 0-d values by one
stack (a stack that casts costs a kernel per cast value), the vectors as they are, all
of them by one ``torch.cat``, then ``.cpu()``; on an accelerator each operation is a
launch, so none is spent per value.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


class Parts(list):
    """Raw values of which some are still on a device: host floats and 0-d or 1-D
    float64 device tensors, in order. A reduction's 0-d results go in as they are:
    ``collect`` stacks all of them at once, where a stack per tensor would cost a
    launch each."""


class Folded:
    """Device values that the host folds into fewer (``fold`` of their values): a long
    tensor's per-chunk moments, combined on the host, where combining them on the
    device would cost a launch per step."""

    def __init__(self, items: list, fold: Callable[[list[float]], list[float]]):
        self.items, self.fold = items, fold


# a vector on a device, host floats, or Parts of both (and of Folded values)
Raw = torch.Tensor | list[float] | Parts | Folded


@dataclass
class Pending:
    """Raw float64 sums; ``finish`` makes the host row from them."""

    raw: Raw
    finish: Callable[[list[float]], list[float | None]]
    moments: Raw | None = None  # a weight's own [mean, var], which ``grad_ratio`` reads


def collect(pending: list[Pending]) -> list[list[float | None]]:
    """The one device-to-host transfer: every value still on a device, copied together
    (one copy per device: a model on a GPU can still hold a CPU constant, whose sums
    are read where they are); then every row finished on the host."""
    # 0-d values by (device, dtype): a stack of one dtype (a stack that casts costs a
    # kernel per cast value); vectors by device
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in pending:
        for item in device_items(p.raw):
            key = (item.device, None if item.dim() else item.dtype)
            groups.setdefault(key, []).append(item)
    copied = {}  # per group: an iterator over its values
    for device in dict.fromkeys(key[0] for key in groups):  # a loop, not a
        keys = [key for key in groups if key[0] == device]  # comprehension: the reads'
        host = _joined([groups[key] for key in keys]).cpu().tolist()  # caller is collect
        at = 0  # (test_fastpath)
        for key in keys:
            n = sum(t.numel() for t in groups[key]) if key[1] is None else len(groups[key])
            copied[key], at = iter(host[at:at + n]), at + n

    def take(t: torch.Tensor) -> Iterable[float]:
        if t.dim():
            return itertools.islice(copied[t.device, None], t.numel())
        return [next(copied[t.device, t.dtype])]

    return [p.finish(values(p.raw, take)) for p in pending]


def device_items(raw: Raw) -> list[torch.Tensor]:
    if isinstance(raw, torch.Tensor):
        return [raw]
    if isinstance(raw, Folded):
        return device_items(Parts(raw.items))
    if isinstance(raw, Parts):
        return [t for item in raw for t in device_items(item)]
    return []


def _joined(groups: list[list[torch.Tensor]]) -> torch.Tensor:
    """One device's groups in one vector (float64 by type promotion): each group of 0-d
    values stacked, the vectors as they are."""
    joined = [v for g in groups for v in ([_flat(t) for t in g] if g[0].dim()
                                          else [torch.stack(g)])]
    return torch.cat(joined) if len(joined) > 1 else joined[0]


def values(raw: Raw, take: Callable[[torch.Tensor], Iterable[float]]) -> list[float]:
    """``raw``'s host values in order, a tensor's by ``take``."""
    if not isinstance(raw, (Parts, torch.Tensor, Folded)):
        return raw
    out: list[float] = []
    for item in raw if isinstance(raw, Parts) else [raw]:
        if isinstance(item, Folded):
            out.extend(item.fold(values(Parts(item.items), take)))
        elif isinstance(item, torch.Tensor):
            out.extend(take(item))
        else:
            out.append(item)
    return out


def read_free(t: torch.Tensor) -> list[float]:
    """A tensor's values where reading them is free (``reads_are_free``)."""
    return t.view(-1).tolist()


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a vector; without a view (an operation, on an accelerator a few
    microseconds) where it is one."""
    return t if t.dim() == 1 else t.view(-1)
