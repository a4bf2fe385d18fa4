"""Under pytest-xdist each worker is its own process: one torch intra-op thread each,
since the workers already fill the cores (two threads per worker on two shared cores
wait on each other at every parallel region). ``numba_kernels``: for the tests of what
only numba's one-read kernels do; ``walks``: every graph walk the predictions run."""

from __future__ import annotations

import os

import pytest

# numba's kernels where installed (the dev extra), so that the suite checks both CPU
# paths against each other; VARPROBE_NUMBA=0 runs all of it on torch's sums, the default.
os.environ.setdefault("VARPROBE_NUMBA", "1")

if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def numba_kernels():
    """varprobe.kernels; the test skipped where the CPU sums are torch's (numba not
    installed, or VARPROBE_NUMBA not 1), whose reads take no range statistics."""
    from varprobe import kernel_choice

    found = kernel_choice.numba_kernels()
    if found is None:
        pytest.skip("numba's kernels are not in use")
    return found


@pytest.fixture
def walks(monkeypatch):
    """The theory.walk.Walk objects the predictions run, in order."""
    import sys

    annotate = sys.modules["varprobe.theory.annotate"]  # the package re-exports a function
    runs = []

    class Recorded(annotate.Walk):
        def run(self):
            runs.append(self)
            return super().run()

    monkeypatch.setattr(annotate, "Walk", Recorded)
    return runs
