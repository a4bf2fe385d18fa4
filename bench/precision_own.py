"""The ``--precision`` code's own CPU time inside the probe, per tensor: less sensitive to
the neighbours than the with/without ratio of ``bench.precision``, since it times only
that code (``time.thread_time`` around it) and not the pass it rides on.

Timed, on the bench models (``bench.overhead.cases``): the range measurement each hook
asks for (``exponents.Measure.values`` / ``gradient``) and the host row its Pending
gives after the transfer (``finish``), the layers' range rows (``exponents.layer_ranges``)
and the number-format flags (``range_flags.annotate``). Not timed: the extra work the
moment kernels do for it (their range reads), which ``bench.precision``'s kernel figures
give per element. Only entry points every version of ``--precision`` has are wrapped,
so that this file, copied into an older checkout's bench/, measures it the same way.

``python -m bench.precision_own --repeats 11 --threads 1,2`` prints, per model, the
medians over the timed probes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import varprobe
from bench import machine, overhead
from bench.__main__ import thread_counts
from varprobe import exponents, range_flags, stats
from varprobe.precision import Settings

_spent: dict[str, float] = {}


def _add(key: str, start: float) -> None:
    _spent[key] = _spent.get(key, 0.0) + time.thread_time() - start


def _measure(fn):
    def timed(self, *args, **kwargs):
        start = time.thread_time()
        pending = fn(self, *args, **kwargs)
        _add("hooks", start)
        return stats.Pending(pending.raw, _finish(pending.finish))
    return timed


def _finish(fn):
    def timed(raw):
        start = time.thread_time()
        out = fn(raw)
        _add("finish", start)
        return out
    return timed


def _timed(key: str, fn):
    def timed(*args, **kwargs):
        start = time.thread_time()
        out = fn(*args, **kwargs)
        _add(key, start)
        return out
    return timed


def wrap() -> None:
    exponents.Measure.values = _measure(exponents.Measure.values)
    exponents.Measure.gradient = _measure(exponents.Measure.gradient)
    exponents.layer_ranges = _timed("rows", exponents.layer_ranges)
    range_flags.annotate = _timed("flags", range_flags.annotate)


def one(case: overhead.Case, repeats: int) -> dict:
    g = overhead.cotangent(case.model, case.inputs)
    spent, probe, tensors = {}, [], 0
    for i in range(repeats + 1):  # the first: compiles and warms up
        _spent.clear()
        start = time.thread_time()
        report = varprobe.probe(case.model, case.inputs, grad_output=g, mode=None,
                                precision=Settings("fp16"))
        if i:
            probe.append(time.thread_time() - start)
            for key, value in {**_spent, "total": sum(_spent.values())}.items():
                spent.setdefault(key, []).append(value)
        tensors = len({id(r) for layer in report.layers for k, r in layer.ranges.items()
                    if not k.startswith("predicted_")})
    return {"probe": statistics.median(probe), "tensors": tensors,
            **{k: statistics.median(v) for k, v in spent.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.precision_own",
                                     description=__doc__)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=thread_counts, default=[1, 2])
    args = parser.parse_args()
    machine.keep_freed_memory()
    wrap()
    print(f"{varprobe.__file__}\n{machine.key()}")
    for count in args.threads:
        torch.set_num_threads(count)
        print(f"{count} thread(s), load average {machine.load()}")
        for case in overhead.cases(torch.device("cpu")):
            r = one(case, args.repeats)
            parts = ", ".join(f"{k} {1e3 * r[k]:.2f}" for k in ("hooks", "finish", "rows",
                                                                 "flags") if k in r)
            print(f"  {case.name:7} probe {1e3 * r['probe']:7.1f} ms; {r['tensors']} range rows; "
                  f"{parts} ms; total {1e3 * r['total']:.2f} ms = "
                  f"{100 * r['total'] / r['probe']:.2f}% of the probe, "
                  f"{1e6 * r['total'] / r['tensors']:.1f} us per tensor")


if __name__ == "__main__":
    main()
