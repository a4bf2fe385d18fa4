"""The random streams a model's own code draws from during a pass, seeded for it.

A model may draw from numpy's or Python's global generator in its forward (transformers'
wav2vec2 draws its time masks with ``np.random``), which ``torch.manual_seed`` does not
reach: a probe with a seed would differ from process to process. Inside ``seeded``
both are seeded, and afterwards they are as they were, so the caller's streams go on
as if nothing had drawn from them. ``predict`` also seeds torch's own generator there
(its pass on a real model in train mode may skip layers by ``torch.rand``), restored
the same way.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def seeded(seed: int, with_torch: bool = False) -> Iterator[None]:
    """numpy's and Python's global generators (and torch's CPU one when ``with_torch``)
    seeded with ``seed`` inside; their states restored after, also when it raises."""
    np_state, py_state = np.random.get_state(), random.getstate()
    forked = torch.random.fork_rng(devices=[]) if with_torch else contextlib.nullcontext()
    try:
        with forked:
            if with_torch:
                torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
