"""Which CPU kernels read a tensor's sums: torch's (``varprobe.torch_kernels``) by
default, numba's (``varprobe.kernels``, the optional ``fast`` extra) where
``VARPROBE_NUMBA=1`` asks for them; chosen once per recording."""

from __future__ import annotations

import contextvars
import functools
import os

# Between ``fix_kernels`` and ``release_kernels`` (a recording): the CPU sums chosen at
# their first use, then reused, so that the environment is read once per recording and
# not at every tensor read (a few microseconds each, hundreds of reads per pass).
_CHOSEN: contextvars.ContextVar[list | None] = contextvars.ContextVar("kernels",
                                                                      default=None)


def fix_kernels() -> contextvars.Token:
    """Choose the CPU sums once from here on (lazily: a meta recording loads nothing)."""
    return _CHOSEN.set([])


def release_kernels(token: contextvars.Token) -> None:
    _CHOSEN.reset(token)


def cpu_kernels():
    """The CPU sums: numba's (``numba_kernels``) where used, else ``torch_kernels``."""
    chosen = _CHOSEN.get()
    if chosen:
        return chosen[0]
    found = numba_kernels()
    if found is None:
        from varprobe import torch_kernels as found
    if chosen is not None:
        chosen.append(found)
    return found


def numba_kernels():
    """``varprobe.kernels`` where ``VARPROBE_NUMBA=1`` and numba imports (the ``fast``
    extra), else None: loading numba costs a process ~0.8 s, which a one-shot run does
    not earn back (docs/speed.md). Imported at the first CPU measurement."""
    return _load_numba(os.environ.get("VARPROBE_NUMBA") == "1")


@functools.cache
def _load_numba(wanted: bool):
    if not wanted:
        return None
    try:
        from varprobe import kernels
    except ImportError:  # numba is not installed: an optional speed-up
        return None
    return kernels
