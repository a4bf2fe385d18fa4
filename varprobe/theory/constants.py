"""The recording's constants: one (mean(c^2), mean(c)) pair per constant operand or
measured quantity, referred to by index in the graph, and still on their device until
the pass's one transfer.

An entry is a host pair, a (2,) device tensor, a meta tensor (``varprobe predict``: no
values), or a deferred measurement: a ``transfer.Pending`` whose host rows are several
pairs (a BatchNorm's per-channel shape, the attention paths' factors), followed by
FOLLOWS in the places of the rest, so that every index holds.
"""

from __future__ import annotations

from typing import Any

import torch

from varprobe import transfer

FOLLOWS = "follows"  # a constant's place that the deferred measurement before it fills


def deferred(pending: transfer.Pending, pairs: int) -> list:
    """The entries of a measurement whose ``pairs`` the host makes from one Pending."""
    return [pending, *[FOLLOWS] * (pairs - 1)]


def awaiting(pairs: int) -> transfer.Pending:
    """A Pending that a backward hook fills (its ``raw`` and ``finish``), ``pairs``
    (0, 0) pairs where the hook never runs."""
    return transfer.Pending([], lambda r: [(0.0, 0.0)] * pairs)


def _on_device(c: Any) -> bool:
    return isinstance(c, transfer.Pending) or (isinstance(c, torch.Tensor) and not c.is_meta)


class Constants(list):
    """The entries, in the graph's order."""

    def on_device(self) -> list[transfer.Pending]:
        """The entries still on their device, as Pendings: the probe copies them with
        its statistics, in the pass's one transfer, and hands their rows to ``fetched``."""
        return [c if isinstance(c, transfer.Pending) else transfer.Pending(c, list)
                for c in self if _on_device(c)]

    def fetched(self, rows: list[list]) -> None:
        """Every device entry replaced by its host pair(s), from ``on_device``'s rows."""
        host, out = iter(rows), []
        for c in self:
            if isinstance(c, transfer.Pending):
                out.extend(next(host))  # its pairs, in place of it and its FOLLOWS
            elif _on_device(c):
                out.append(tuple(next(host)))
            elif not (isinstance(c, str) and c == FOLLOWS):
                out.append(c)
        self[:] = out

    def host(self) -> list[tuple[float, float] | None]:
        """Every entry as a host pair, copying what is left on a device (one transfer);
        None for a meta tensor."""
        pending = self.on_device()
        if pending:
            self.fetched(transfer.collect(pending))
        return [None if isinstance(c, torch.Tensor) and c.is_meta else c for c in self]
