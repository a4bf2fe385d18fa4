"""Under pytest-xdist each worker is its own process: one torch intra-op thread each,
since the workers already fill the cores (two threads per worker on two shared cores
wait on each other at every parallel region)."""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    import torch

    torch.set_num_threads(1)
