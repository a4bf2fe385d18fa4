"""torch's meta kernels without torch's compiler.

On the meta device many ops (linear's addmm, layer_norm, gelu, normal_, ...) run
torch's Python reference kernels. Each is wrapped so that torch.compile will not trace
it, and that wrapper imports ``torch._dynamo`` the first time it runs: 2-3 s on a CPU,
more than the whole shape pass of a 96-layer decoder, for a compiler varprobe never
starts. Outside a compiled region the wrapper only calls the kernel, so while varprobe
builds and runs a model on meta it tells each wrapper that the kernel is its own
compiler-disabled form (the cache the wrapper fills on first use), and clears what it
set on the way out. Where torch has already imported its compiler, or where the
wrapper's shape differs in another torch version, nothing is touched.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import sys
from collections.abc import Iterator
from types import FunctionType

import torch

_CACHE = "__dynamo_disable"  # the attribute torch._compile._disable_dynamo caches in
_depth = 0  # contexts open: the outermost one sets and clears the marks


@functools.cache
def _wrapped_kernels() -> tuple[FunctionType, ...]:
    """The functions torch._compile._disable_dynamo had wrapped by the first call (torch
    wraps its reference kernels as it is imported; a scan of the heap, ~0.2 s, once)."""
    code = torch._compile._disable_dynamo(lambda: None).__code__
    if "fn" not in code.co_freevars:
        return ()
    at = code.co_freevars.index("fn")
    return tuple(f.__closure__[at].cell_contents for f in gc.get_objects()
                 if type(f) is FunctionType and f.__code__ is code)


@contextlib.contextmanager
def without_compiler() -> Iterator[None]:
    """Run torch's Python meta kernels without importing torch._dynamo (nested: the
    outer one holds the marks)."""
    global _depth
    if "torch._dynamo" in sys.modules or _depth:
        yield
        return
    marked = [fn for fn in _wrapped_kernels() if getattr(fn, _CACHE, None) is None]
    for fn in marked:
        setattr(fn, _CACHE, fn)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        for fn in marked:
            if getattr(fn, _CACHE, None) is fn:
                delattr(fn, _CACHE)
