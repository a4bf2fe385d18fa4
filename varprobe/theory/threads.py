"""torch on one intra-op thread while the walks run.

The walks' torch work is on small arrays (a token Gram's cumulative sums at T <= 256,
theory.overlap's draws): intra-op threads save little there and cost much where the
cores are shared. With the other core busy every parallel region waits for its turn:
a 32-key overlap table took ~250 ms on two threads against 8 ms on one, and the
96-layer decoder's walks 10-34 s against 2 s.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def one_thread():
    """One intra-op thread inside; the thread count it had is restored."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
