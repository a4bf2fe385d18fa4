"""Python's cyclic garbage collector held off while the walks run (theory.annotate).

The walks allocate many small objects (a Value, a Signal, a Grad per node and walk),
nearly all freed by their reference counts alone. Left on, the collector starts a
young collection every 700 net allocations and an older one every 10 of those, and
the objects each older one finds alive count towards the next full collection, which
traverses every object of the process (~300k with torch loaded: ~150 ms on the bench's
machine). Held off for the walks, the objects still alive when they end are examined
once by the next young collection, and fewer reach the full one: over 24 warm probes
of bench/resnet50.py at batch 2 the full collections fell from 6 to 4 (twice), over 40
from 9 to 6, over 15 not at all (docs/engine.md, Cost). The walks make no
cyclic garbage (a full collection right after them found nothing unreachable on the
bench's four models), so holding the collector off for them keeps no memory. Where it
was already off (the caller's choice) it stays off.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Automatic collection off inside the block, back on after it if it was on."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
