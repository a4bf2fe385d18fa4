"""What a command loads lives to its end: kept out of the garbage collector's way.

torch's import makes some 150,000 objects that live as long as the process, and every
full pass of Python's cyclic collector walks them all (40-60 ms each, and the last one,
at interpreter exit, 0.25 s after a ResNet-50's pass, on the 2-core EPYC of
bench/RESULTS.md). A command neither makes cyclic
garbage worth those passes while it loads nor needs that last pass: ``loading`` turns
the collector off while torch, varprobe and the model file load and then freezes what
they made (gc.freeze: out of every later pass); ``command`` undoes the freeze when the
command returns, for a caller in the same process, and freezes again at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import gc
from collections.abc import Iterator

# whether ``loading`` may freeze: inside ``command``, where nothing else froze objects
_OWNED: contextvars.ContextVar[bool] = contextvars.ContextVar("varprobe_gc", default=False)


@contextlib.contextmanager
def command() -> Iterator[None]:
    """Around a command run from the console entry point."""
    atexit.unregister(gc.freeze)  # once, however often a process runs commands
    atexit.register(gc.freeze)  # the exit's pass: over what is made after this only
    token = _OWNED.set(gc.get_freeze_count() == 0)  # another's freeze: left as it is
    try:
        yield
    finally:
        if _OWNED.get():
            gc.unfreeze()
        _OWNED.reset(token)


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """Around the imports and the model's load: no collection, then frozen."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if _OWNED.get():
            gc.freeze()
        if was:
            gc.enable()
