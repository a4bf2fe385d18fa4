"""Concatenation, stacking, chunk/split and views: Linear -> op -> Linear.

Rule (docs/graph.md): a concatenation's second moment is the size-weighted average of
its pieces' and each piece gets its slice of the gradient; a chunk or split passes the
second moment unchanged and sends the gradient to numel(out)/numel(in) of the input;
views, reshapes and transposes change nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.accuracy._harness import (
    AFTER_RELU_MEANS,
    BATCH,
    MEANS,
    Knobs,
    Spec,
    gaussian,
    grid,
    linear_sandwich,
    run,
)


def _chunk_swap(self, h):
    a, b = h.chunk(2, -1)
    return torch.cat([b, a], -1)


def _split_swap(self, h):
    n = h.shape[-1]
    a, b = h.split([n // 4, n - n // 4], -1)
    return torch.cat([b, a], -1)


def _view(self, h):
    b, n = h.shape
    return h.view(b, -1, 16).transpose(1, 2).reshape(b, n)


SHAPES = {  # name: (fn, post_in as a multiple of the width)
    "cat([x, relu(x)])": (lambda self, h: torch.cat([h, F.relu(h)], -1), 2.0),
    "cat([x, 3 x])": (lambda self, h: torch.cat([h, 3 * h], -1), 2.0),
    "stack([x, relu(x)]).flatten": (lambda self, h: torch.stack([h, F.relu(h)], 1).flatten(1),
                                    2.0),
    "chunk(2), swapped, cat": (_chunk_swap, 1.0),
    "chunk(2), first half only": (lambda self, h: h.chunk(2, -1)[0], 0.5),
    "split([n/4, 3n/4]), swapped, cat": (_split_swap, 1.0),
    "split, first quarter only": (lambda self, h: h.split(h.shape[-1] // 4, -1)[0], 0.25),
    "x[:, ::2] (strided slice)": (lambda self, h: h[:, ::2], 0.5),
    "view/transpose/reshape": (_view, 1.0),
    "relu then view/transpose/reshape": (lambda self, h: _view(self, F.relu(h)), 1.0),
}


def spec(name: str, knobs: Knobs, batch: int = BATCH) -> Spec:
    fn, share = SHAPES[name]
    n = knobs.width
    build = linear_sandwich(knobs, fn, post_in=int(n * share))
    return Spec(rule=name, case=knobs.label(), build=build,
                inputs=gaussian((batch, n), knobs.scale), width=n, tags=dict(knobs.__dict__))


def specs() -> list[Spec]:
    return [spec(name, k) for name in SHAPES
            for k in grid(means=AFTER_RELU_MEANS if "relu" in name else MEANS)]


def cases(seeds: int = 8) -> list[dict]:
    return run(specs(), seeds)
