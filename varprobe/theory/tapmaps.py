"""A conv of ones over a profile, axis by axis: what theory.profile counts at every conv.

A kernel of ones is the product of one 1-D kernel of ones per spatial axis, so the
conv of a map e is e summed along each axis over the k taps' strided slices (output o
reads input o s - p + t d for tap t), and the transposed conv (the backward's count)
adds each output back onto the same slices. That is a few numpy slice additions per
axis in place of a torch conv and an autograd pass, which matters because profiles
differ from walk to walk and node to node, so a one-shot probe counts nearly every
conv afresh. Counts of ones are integers (exact in float64); a profile's sums add the
taps in their order, as torch's one-channel conv does (the bench's reports came out
the same to the bit).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
from torch import nn

Span = tuple[slice, slice]  # (the outputs a tap lands in bounds for, the inputs they read)


@dataclass(frozen=True)
class Axis:
    inputs: int
    outputs: int
    spans: tuple[Span, ...]  # one per tap that lands somewhere
    counts: tuple[int, ...]  # per tap, the outputs it lands in bounds for

    @property
    def alike(self) -> bool:
        """Each position onto itself: one tap, stride 1, no padding."""
        return self.inputs == self.outputs and self.counts == (self.inputs,) and \
            self.spans[0][1] == slice(0, self.inputs, 1)


@dataclass(frozen=True)
class Taps:
    """A non-transposed conv's geometry on one spatial shape."""

    axes: tuple[Axis, ...]
    alike: bool  # every axis ``alike``: the conv of ones is the map itself
    total: float  # in-bounds (output, tap) pairs: the conv of ones' sum, an integer
    outputs: tuple[int, ...]

    @property
    def per_output(self) -> float:
        return self.total / math.prod(self.outputs)

    @property
    def per_input(self) -> float:
        return self.total / math.prod(a.inputs for a in self.axes)


def of(module: nn.Module, spatial: tuple) -> Taps | None:
    """``Taps`` of a conv on ``spatial``; None where torch's path counts (a transposed
    conv, a padding given by name, an input too small for one output)."""
    if module.transposed:
        return None
    return along(spatial, module.kernel_size, module.stride, module.padding, module.dilation)


@functools.lru_cache(maxsize=1024)
def along(spatial: tuple, kernel: tuple, stride: tuple, padding, dilation: tuple
          ) -> Taps | None:
    """``Taps`` of the conv geometry (padding a tuple of ints, one per axis)."""
    if not isinstance(padding, tuple) or not len(spatial) == len(kernel) == len(padding):
        return None
    found = tuple(_axis(*one) for one in zip(spatial, kernel, stride, padding, dilation))
    if any(a is None for a in found):
        return None
    return Taps(found, all(a.alike for a in found),
                float(math.prod(sum(a.counts) for a in found)), tuple(a.outputs for a in found))


def _axis(n: int, k: int, s: int, p: int, d: int) -> Axis | None:
    out = (n + 2 * p - d * (k - 1) - 1) // s + 1
    if out < 1:
        return None  # torch's conv raises here: the caller's torch path says so
    spans, counts = [], []
    for t in range(k):
        shift = t * d - p  # output o reads input o s + shift
        first = -(shift // s) if shift < 0 else 0
        count = max(0, min(out - 1, (n - 1 - shift) // s) - first + 1)
        counts.append(count)
        if count:
            start = first * s + shift
            spans.append((slice(first, first + count),
                          slice(start, start + s * (count - 1) + 1, s)))
    return Axis(n, out, tuple(spans), tuple(counts))


def convolve(x: np.ndarray, taps: Taps) -> np.ndarray:
    """The conv of ``x`` (the spatial shape) with a kernel of ones."""
    if taps.alike:
        return x  # a 1x1 conv at stride 1, most of a bottleneck's
    for axis in taps.axes:
        if not axis.alike:
            y = np.zeros((axis.outputs,) + x.shape[1:])
            for out, read in axis.spans:
                y[out] += x[read]
            x = y
        x = _roll(x)
    return x


def transposed(y: np.ndarray, taps: Taps) -> np.ndarray:
    """The transposed conv of ``y`` (the output's spatial shape): each input position
    receives the sum over the outputs whose taps land on it."""
    if taps.alike:
        return y
    for axis in taps.axes:
        if not axis.alike:
            x = np.zeros((axis.inputs,) + y.shape[1:])
            for out, read in axis.spans:
                x[read] += y[out]
            y = x
        y = _roll(y)
    return y


def _roll(x: np.ndarray) -> np.ndarray:
    """The first axis moved last, in a contiguous copy: each axis is summed as the first
    one, whose slices are whole rows (a slice of the last axis costs 3-4x as much),
    and after one roll per axis the order is the original one again."""
    return np.ascontiguousarray(x.T if x.ndim == 2 else x.transpose(*range(1, x.ndim), 0))


def mean(x: np.ndarray) -> np.float64:
    """``x.mean()`` to the bit (its sum over the count, as numpy's mean takes it),
    without numpy's Python-level wrapper, which costs more than the sum on these maps."""
    return np.add.reduce(x, axis=None) / x.size


def shares(taps: Taps) -> tuple[float, float]:
    """(sum_t f_t, sum_t f_t^2), f_t the share of the outputs where tap t lands in
    bounds: a tap's count of outputs is the product of its axes' counts (integers)."""
    outputs = math.prod(taps.outputs)
    f = np.array([math.prod(c) / outputs
                  for c in itertools.product(*[a.counts for a in taps.axes])])
    return float(f.sum()), float((f * f).sum())
