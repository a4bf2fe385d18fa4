"""A conv of ones over a profile, axis by axis: what theory.profile counts at every conv.

A kernel of ones is the product of one 1-D kernel of ones per spatial axis, so the
conv of a map e is e summed along each axis over the k taps' strided slices (output o
reads input o s - p + t d for tap t), and the transposed conv (the backward's count)
adds each output back onto the same slices. That is a few numpy slice additions per
axis in place of a torch conv and an autograd pass (a tenth of the time), which matters
because profiles differ from walk to walk and node to node, so a one-shot probe counts
nearly every conv afresh. Counts of ones are integers (exact in float64); a profile's
weighted sums round as any other summation order does (within a few ulps of torch's).
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
from torch import nn

Axis = tuple[int, int, int, tuple[tuple[int, int, int], ...]]  # (in, out, stride, spans)


def axes(module: nn.Module, spatial: tuple) -> tuple[Axis, ...] | None:
    """Per spatial axis of a non-transposed conv: its input and output lengths, its
    stride and, per tap, the outputs it lands in bounds for (first output, count, first
    input); None
    where torch's path counts (a transposed conv, an input too small for one output)."""
    if module.transposed:
        return None
    return along(spatial, module.kernel_size, module.stride, module.padding, module.dilation)


@functools.lru_cache(maxsize=1024)
def along(spatial: tuple, kernel: tuple, stride: tuple, padding, dilation: tuple
          ) -> tuple[Axis, ...] | None:
    """``axes`` of the conv geometry (padding a tuple of ints, one per axis)."""
    if not isinstance(padding, tuple) or not len(spatial) == len(kernel) == len(padding):
        return None
    found = tuple(_axis(*one) for one in zip(spatial, kernel, stride, padding, dilation))
    return None if any(a is None for a in found) else found


@functools.lru_cache(maxsize=1024)
def _axis(n: int, k: int, s: int, p: int, d: int) -> Axis | None:
    out = (n + 2 * p - d * (k - 1) - 1) // s + 1
    if out < 1:
        return None  # torch's conv raises here: the caller's torch path says so
    spans = []
    for t in range(k):
        shift = t * d - p  # output o reads input o s + shift
        first = max(0, -(shift // s) if shift < 0 else 0)
        last = min(out - 1, (n - 1 - shift) // s)
        spans.append((first, max(0, last - first + 1), first * s + shift))
    return n, out, s, tuple(spans)


def convolve(x: np.ndarray, found: tuple[Axis, ...]) -> np.ndarray:
    """The conv of ``x`` (the spatial shape) with a kernel of ones (``x`` itself where
    every axis is a 1-wide tap at stride 1: a 1x1 conv, most of a bottleneck's)."""
    if all(_alike(axis) for axis in found):
        return x
    for axis in found:
        n, out, step, spans = axis
        if not _alike(axis):
            y = np.zeros((out,) + x.shape[1:])
            for first, count, start in spans:
                if count:
                    y[first:first + count] += x[start:start + step * (count - 1) + 1:step]
            x = y
        x = _roll(x)
    return x


def transposed(y: np.ndarray, found: tuple[Axis, ...]) -> np.ndarray:
    """The transposed conv of ``y`` (the output's spatial shape): each input position
    receives the sum over the outputs whose taps land on it."""
    if all(_alike(axis) for axis in found):
        return y
    for axis in found:
        n, out, step, spans = axis
        if not _alike(axis):
            x = np.zeros((n,) + y.shape[1:])
            for first, count, start in spans:
                if count:
                    x[start:start + step * (count - 1) + 1:step] += y[first:first + count]
            y = x
        y = _roll(y)
    return y


def mean(x: np.ndarray) -> np.float64:
    """``x.mean()`` to the bit (its sum over the count, as numpy's mean takes it),
    without numpy's Python-level wrapper, which costs more than the sum on these maps."""
    return np.add.reduce(x, axis=None) / x.size


def _alike(axis: Axis) -> bool:
    """Whether the axis maps each position onto itself (one tap, stride 1, no padding)."""
    return axis[0] == axis[1] and axis[3] == ((0, axis[0], 0),)


def _roll(x: np.ndarray) -> np.ndarray:
    """The first axis moved last, in a contiguous copy: each axis is summed as the first
    one, whose slices are whole rows (a slice of the last axis costs 3-4x as much),
    and after one roll per axis the order is the original one again."""
    return np.ascontiguousarray(x.transpose(*range(1, x.ndim), 0))


def taps(found: tuple[Axis, ...]) -> tuple[float, float]:
    """(sum_t f_t, sum_t f_t^2), f_t the share of the outputs where tap t lands in
    bounds: a tap's count of outputs is the product of its axes' counts (integers)."""
    outputs = math.prod(out for _, out, _, _ in found)
    f = np.array([math.prod(c) / outputs for c in itertools.product(
        *[[count for _, count, _ in spans] for *_, spans in found])])
    return float(f.sum()), float((f * f).sum())


def total(found: tuple[Axis, ...]) -> float:
    """The conv of ones' sum: in-bounds (output, tap) pairs, an integer."""
    return float(math.prod(sum(count for _, count, _ in spans) for *_, spans in found))
