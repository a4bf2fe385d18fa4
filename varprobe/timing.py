"""Where a probe's time goes: a stopwatch over named phases, free when nobody asks.

``analyze --timings`` and the bench open a ``Stopwatch``; the pipeline marks its
phases with ``phase(name)`` and the recorder wraps its hooks with ``timed``. With no
stopwatch open, ``phase`` hands back one shared null context and ``timed`` the hook
itself, so a plain ``probe()`` pays a context-variable lookup per phase and nothing
per hook call.

Phases (each also divided by the layer calls recorded):

- ``pass``: the forward and backward pass under the hooks, the model's own work
  included; ``recording`` inside it is the time spent in varprobe's hooks and the
  weight-gradient statistics (statistics, bookkeeping, dataflow notes), wall clock
  only (a CPU clock read per hook call would cost more than it tells).
- ``collect``: the one device-to-host transfer and the host rows made from it.
- ``predictions``: the closed-form predictions: one walk per init over the graph.
- ``diagnosis``: the flags.
- ``load`` and ``report`` (the CLI): importing the model file, rendering and writing.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable
from typing import Any

_ACTIVE: contextvars.ContextVar[Stopwatch | None] = contextvars.ContextVar(
    "varprobe_stopwatch", default=None)
_OFF = contextlib.nullcontext()
ORDER = ("load", "pass", "recording", "collect", "predictions", "diagnosis", "report")
ANALYSIS = ("collect", "predictions", "diagnosis")


class Stopwatch:
    """Seconds per phase, wall and (except ``recording``) process CPU time."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._token: Any = None

    def __enter__(self) -> Stopwatch:
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)

    def add(self, name: str, wall: float, cpu: float | None = None) -> None:
        self.wall[name] = self.wall.get(name, 0.0) + wall
        if cpu is not None:
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu

    def analysis(self) -> float:
        """Wall seconds after the pass: collect, predictions and diagnosis."""
        return sum(self.wall.get(name, 0.0) for name in ANALYSIS)

    def lines(self, calls: int) -> list[str]:
        """One line per phase: wall and CPU milliseconds, and wall per 100 layer calls."""
        per = 100 / calls if calls else float("nan")
        out = [f"{'phase':<12} {'wall ms':>9} {'cpu ms':>9} {'wall ms/100 calls':>18}"]
        for name in [n for n in ORDER if n in self.wall] + sorted(set(self.wall) - set(ORDER)):
            cpu = self.cpu.get(name)
            out.append(f"{name:<12} {1e3 * self.wall[name]:>9.1f} "
                       f"{'-' if cpu is None else f'{1e3 * cpu:.1f}':>9} "
                       f"{1e3 * self.wall[name] * per:>18.2f}")
        out.append(f"{calls} layer calls; recording is the hooks' share of the pass; "
                   f"analysis (collect + predictions + diagnosis) "
                   f"{1e3 * self.analysis() * per:.2f} ms per 100 calls")
        return out


class _Phase:
    def __init__(self, watch: Stopwatch, name: str) -> None:
        self.watch, self.name = watch, name

    def __enter__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def __exit__(self, *exc) -> None:
        self.watch.add(self.name, time.perf_counter() - self.wall,
                       time.process_time() - self.cpu)


def phase(name: str) -> contextlib.AbstractContextManager:
    """Time the block as ``name`` when a stopwatch is open."""
    watch = _ACTIVE.get()
    return _OFF if watch is None else _Phase(watch, name)


def timed(name: str, fn: Callable) -> Callable:
    """``fn`` itself when no stopwatch is open; else ``fn`` adding its wall time to
    ``name`` at each call (a hook: called often, so wall clock only)."""
    watch = _ACTIVE.get()
    if watch is None:
        return fn

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            watch.add(name, time.perf_counter() - start)
    wrapper.__wrapped__ = fn  # only this of wraps(): two wrappers per module, each probe
    return wrapper
