"""What only an attention call's key counts set, once per mask.

Every attention call of a deep stack, in every walk (the actual init's and each
scheme's), has the same per-query key counts T_i (1..T when causal): the index arrays
and pair counts the Gram rules (theory.tokens) read are computed once per distinct
counts and kept read-only, not rebuilt at each call.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np


class Index(NamedTuple):
    at: np.ndarray        # T_i - 1: each query's last key
    grid: tuple           # np.ix_(at, at)
    shared_at: np.ndarray  # min(T_i, T_k) - 1: the last key two queries share
    causal: bool          # the counts are 1, 2, ..., T
    order: tuple          # np.ix_ of the queries sorted by their window
    first: np.ndarray     # per key j, the first sorted query whose window exceeds j...
    seen: np.ndarray      # ...where there is one...
    pick: np.ndarray      # ...and that query's index, kept in range where there is none


def index(counts: np.ndarray) -> Index:
    return _index(np.asarray(counts, dtype=np.float64).tobytes())


@functools.lru_cache(maxsize=64)
def _index(key: bytes) -> Index:
    counts = np.frombuffer(key, dtype=np.float64)
    at = counts.astype(int) - 1
    causal = bool(counts.size and counts[0] == 1 and np.all(np.diff(counts) == 1))
    order = np.argsort(counts)
    c = counts[order]
    first = np.searchsorted(c, np.arange(int(counts.max())), side="right")
    out = Index(at, np.ix_(at, at), np.minimum(counts[:, None], counts[None, :]).astype(int)
                - 1, causal, np.ix_(order, order), first, first < c.size,
                np.minimum(first, c.size - 1))
    for x in (out.at, *out.grid, out.shared_at, *out.order, out.first, out.seen, out.pick):
        x.setflags(write=False)
    return out


def pairs(counts: np.ndarray) -> tuple[np.ndarray, ...]:
    """theory.tokens.pair_weights' parts: 1 / the shared keys min(T_i, T_k), 1 / the
    other pairs' count (1 where there are none) and where there are none (flat indices:
    a handful, not a T x T mask). Reciprocals: the weights multiply by them, twice the
    speed of a division."""
    return _pairs(np.asarray(counts, dtype=np.float64).tobytes())


@functools.lru_cache(maxsize=64)
def _pairs(key: bytes) -> tuple[np.ndarray, ...]:
    counts = np.frombuffer(key, dtype=np.float64)
    ti, tk = counts[:, None], counts[None, :]
    shared = np.minimum(ti, tk)
    rest = ti * tk - shared
    out = 1 / shared, 1 / np.where(rest > 0, rest, 1.0), np.flatnonzero(rest <= 0)
    for x in out:
        x.setflags(write=False)
    return out


def gradient_weights(counts: np.ndarray) -> np.ndarray:
    """The strict upper triangle of 1/(T_i T_k): theory.tokens.gradient_u's weights of
    the pairs i < k (each pair twice: the Gram is symmetric)."""
    return _gradient_weights(np.asarray(counts, dtype=np.float64).tobytes())


@functools.lru_cache(maxsize=64)
def _gradient_weights(key: bytes) -> np.ndarray:
    counts = np.frombuffer(key, dtype=np.float64)
    out = np.triu(2 / np.outer(counts, counts), 1)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=64)
def window_pairs(n: int, w: int) -> tuple[np.ndarray, ...]:
    """``nested_pairs``' parts under a sliding window of w over n queries: for each
    query k, T_k = min(k + 1, w), and over the earlier queries i (T_i <= T_k) the shared
    fractions s_ik/T_i and those times (1 - 1/T_i); once per (n, w), by distance."""
    t = np.minimum(np.arange(1, n + 1), w).astype(float)
    below, spread = np.zeros(n), np.zeros(n)
    k = np.arange(n)
    for d in range(1, min(w, n)):  # queries w or more apart share no key
        i = k[d:] - d
        shared = i - np.maximum(0, k[d:] - w + 1) + 1
        frac = shared / t[i]
        below[d:] += frac
        spread[d:] += frac * (1 - 1 / t[i])
    for x in (t, below, spread):
        x.setflags(write=False)
    return t, below, spread


@functools.lru_cache(maxsize=64)
def nested_pairs(dtype: str, data: bytes) -> tuple[np.ndarray, ...]:
    """attention._pairs' parts (nested key sets) that only the key counts set: once per
    mask, not per call."""
    t = np.sort(np.frombuffer(data, dtype))
    below = np.arange(t.size)                        # partners with T_k <= T_i
    inv_below = np.concatenate(([0.0], np.cumsum(1 / t)[:-1]))
    out = t, below, below - inv_below
    for x in out:
        x.setflags(write=False)
    return out
