"""``python -m bench.ops``: the aten ops one probe dispatches, by the varprobe function that
dispatched them, on the bench's models.

On an accelerator each op is a Python call and mostly a kernel launch, so their number
is what a GPU probe's extra time follows. A ``TorchDispatchMode`` sees every op (the
C++ decompositions of a composite op too: a matmul counts its views), and each is put
to the innermost varprobe frame on the stack, else to the model: the model's forward
runs under varprobe's hooks and recording (``input_leaves``), its backward under
``cotangent.gradients``, so those lines are mostly the model's own ops.
``--device cpu --accelerator-path`` counts on the CPU what an accelerator would run:
``stats.reads_are_free`` False and the accelerators' chunk size (the attention
statistics' CPU-only shortcuts, which ask the device type, still run as on a CPU).
"""

from __future__ import annotations

import argparse
import collections
import sys
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench import overhead
from varprobe import stats


class Count(TorchDispatchMode):
    """Dispatched ops, in all and by the innermost varprobe function on the stack."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.where: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        self.total += 1
        self.where[_caller(sys._getframe(1))] += 1
        return func(*args, **(kwargs or {}))


def _caller(frame) -> str:
    while frame is not None:
        name = frame.f_code.co_filename
        if "/varprobe/" in name:
            return f"{name.split('/varprobe/')[1]}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "the model (forward and backward)"


def count(device: torch.device, top: int) -> None:
    for case in overhead.cases(device):
        model, x = case.model.to(device), case.inputs.to(device)
        g = overhead.cotangent(model, x)
        overhead.probed(model, x, g)  # first calls (lazy imports, caches) left out
        with Count() as bare:
            overhead.bare(model, x, g)
        with Count() as probe:
            overhead.probed(model, x, g)
        print(f"{case.name}: bare pass {bare.total} ops, probe {probe.total}")
        for where, n in probe.where.most_common(top):
            print(f"  {n:6d}  {where}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ops", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--accelerator-path", action="store_true",
                        help="on the CPU, take the code path an accelerator takes")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    if args.accelerator_path:
        accelerators = stats.chunk_size(torch.device("meta"))  # any device but the CPU
        stats.reads_are_free = lambda device: False
        stats.chunk_size = lambda device: accelerators
    count(torch.device(args.device), args.top)


if __name__ == "__main__":
    main()
