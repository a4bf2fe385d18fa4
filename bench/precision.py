"""The cost of ``--precision``: the range statistics (abs max, smallest non-zero,
exponent histogram, overflow counts; ``varprobe.exponents``) and the report's range rows,
flags and loss scale, on top of the probe, on the same models as the overhead benchmark.

``python -m bench.precision`` measures at each thread count and writes its subsection of
RESULTS.md under this machine's heading. The probe with and without
``precision=Settings("fp16")``, interleaved, process CPU time (what the work costs,
whatever the neighbours do), with torch's CPU sums and with numba's where installed;
and the range kernels per element on one large tensor, beside the moment kernel, which
reads every tensor once already.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import varprobe
from bench import machine, overhead, results
from bench.__main__ import thread_counts
from varprobe.precision import Settings

HEADER = results.PRECISION


def timings(case: overhead.Case, repeats: int, warmup: int, numba: bool) -> dict[str, float]:
    """The probe with and without ``--precision``, with numba's CPU sums and range
    kernels or torch's (``bench.overhead.sums``)."""
    with overhead.sums(numba):
        return _timings(case, repeats, warmup)


def _timings(case: overhead.Case, repeats: int, warmup: int) -> dict[str, float]:
    g = overhead.cotangent(case.model, case.inputs)
    settings = Settings("fp16")
    cpu: dict[str, list[float]] = {"probe": [], "precision": []}
    sides = [("probe", {}), ("precision", {"precision": settings})]
    for i in range(warmup + repeats):
        for name, extra in sides if i % 2 else sides[::-1]:  # neither always goes first
            start = time.process_time()
            varprobe.probe(case.model, case.inputs, grad_output=g, mode=None, **extra)
            if i >= warmup:
                cpu[name].append(time.process_time() - start)
    ratios = sorted(p / b for p, b in zip(cpu["precision"], cpu["probe"]))
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    probe, precision = (statistics.median(cpu[k]) for k in ("probe", "precision"))
    return {"probe_ms": 1e3 * probe, "precision_ms": 1e3 * precision,
            "ratio": precision / probe, "q1": q1, "q3": q3}


def kernels(n: int = 1 << 20, repeats: int = 20) -> dict[str, dict[str, float]]:
    """ns per element of an n-element float32 tensor (in cache, as a recorded tensor
    usually is when it is read), per kind of range kernels (numba's where installed,
    torch's): the whole range row as the probe takes it, its one read (``sampled``:
    extremes of every element, the histogram of ``exponents.SAMPLE``), the extremes
    alone, the histogram of every element (the exact kernel), and the moment kernel
    (``sums``), alone and, with numba, with those reads in it (what the probe runs
    where it can)."""
    from varprobe import torch_exponent_kernel, torch_kernels

    x = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    found = {"torch": (torch_exponent_kernel, torch_kernels)}
    if overhead.numba_installed():
        from varprobe import exponent_kernel
        from varprobe import kernels as moments

        found = {"numba": (exponent_kernel, moments), **found}
    return {name: {run: _best(fn, repeats) / n for run, fn in _runs(name, *mods, x).items()}
            for name, mods in found.items()}


def _runs(name: str, k, moments, x: np.ndarray) -> dict:
    """What ``kernels`` times with one kind of range kernels ``k`` and sums ``moments``."""
    from varprobe import exponents

    ints, idx = x.view(np.int32), exponents.sample_index(x.shape[0])
    rows = np.zeros((k.ROWS, 257), dtype=np.int64)
    runs = {"row": lambda: _row(name, ints),
            "sampled": lambda: k.sampled(ints, idx, rows),
            "extremes": lambda: k.extremes(ints),
            "histogram": lambda: k.exponent_bins(ints, rows),
            "moments": lambda: moments.sums(x, np.float32(0), np.float32(0))}
    if name == "numba":
        runs["moments_ranges"] = lambda: moments.sums_extremes(
            x, ints, np.float32(0), np.float32(0), idx, rows)
    return runs


def _row(sums: str, ints: np.ndarray) -> list[float]:
    from varprobe import exponents

    with overhead.sums(sums == "numba"):
        return exponents._cpu32(ints, exponents.cuts(1.0))


def _best(fn, repeats: int) -> float:
    """Nanoseconds: the least CPU time of ``repeats`` calls, after one (a compile)."""
    fn()
    return 1e9 * min(_cpu_seconds(fn) for _ in range(repeats))


def _cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def run(repeats: int, warmup: int, threads: list[int], log=print) -> dict:
    sums = [False] + ([True] if overhead.numba_installed() else [])
    blocks = []
    for count in threads:
        torch.set_num_threads(count)
        block = {"threads": count, "load_before": machine.load(), "rows": []}
        for case in overhead.cases(torch.device("cpu")):
            for numba in sums:
                t = timings(case, repeats, warmup, numba)
                name = SUMS[numba]
                log(f"{count} thread(s) {case.name:7} {name:6} probe {t['probe_ms']:8.1f} ms"
                    f"  with --precision {t['precision_ms']:8.1f} ms  cpu-time ratio "
                    f"{t['ratio']:.3f} (pairs {t['q1']:.3f}-{t['q3']:.3f})")
                block["rows"].append({"model": case.name, "sums": name, **t})
        block["load_after"] = machine.load()
        blocks.append(block)
    torch.set_num_threads(1)
    k = kernels()
    for name, got in k.items():
        log(f"{name} kernels (ns/element): "
            + ", ".join(f"{run} {v:.3f}" for run, v in got.items()))
    return {"blocks": blocks, "kernels": k, "repeats": repeats, "warmup": warmup,
            "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python -m bench.precision " + " ".join(sys.argv[1:])}


SUMS = {False: "torch", True: "numba"}  # the kind of CPU sums and range kernels


def section(result: dict) -> list[str]:
    from varprobe.exponents import SAMPLE

    lines = [HEADER, "",
             f"Run of {result['when']}: `{result['command'].strip()}`. "
             "`varprobe.probe(model, x, grad_output=g, precision=Settings(\"fp16\"))` "
             f"against the same call without it, interleaved, {result['warmup']} warm-up "
             f"then {result['repeats']} timed runs each, process CPU time, with each kind "
             "of CPU sums: torch's (the default) and numba's (the `fast` extra, where "
             "installed). The extra work: the largest and smallest non-zero |x| of every "
             "float32 tensor read (outputs, gradients, weights, weight gradients) and the "
             f"exponent histogram of {SAMPLE} of its elements drawn at random. numba's "
             "moment kernel takes them in the read it makes anyway (a tensor it reads per "
             "unit, group by group while the group is in cache); torch's sums cannot, so "
             "the extremes are a read, a write and a read of the tensor more, and the "
             "sample a gather of its own. In the hooks such a tensor is only noted, and "
             "after the pass the rows of all of them are made together (array operations "
             "over a [tensors x bins] matrix, `varprobe.range_rows`), then the report's "
             "range rows, flags and loss scale range.", ""]
    for block in result["blocks"]:
        lines += [f"{block['threads']} intra-op thread(s) (load average "
                  f"{block['load_before']} before, {block['load_after']} after):", "",
                  "| model | sums | probe (ms) | with --precision (ms) | CPU-time ratio | "
                  "pair ratios q1-q3 |", "|---|---|---|---|---|---|"]
        for r in block["rows"]:
            lines.append(f"| {r['model']} | {r['sums']} | {r['probe_ms']:.1f} | "
                         f"{r['precision_ms']:.1f} | {r['ratio']:.3f} | "
                         f"{r['q1']:.3f}-{r['q3']:.3f} |")
        lines.append("")
    for name in SUMS.values():
        ratios = [r["ratio"] for b in result["blocks"] for r in b["rows"]
                  if r["sums"] == name]
        if ratios:
            lines.append(f"Target, at most 1.02x the probe, with {name}'s sums: "
                         f"{'meets' if max(ratios) <= 1.02 else '**misses**'} "
                         f"(worst {max(ratios):.3f}x).")
    lines += ["", "Kernels, one float32 tensor of 2^20 elements in cache (best of 20, CPU "
              "time, ns per element):", ""]
    for name, k in result["kernels"].items():
        fused = (f", and with the range reads in it {k['moments_ranges']:.3f}"
                 if "moments_ranges" in k else "")
        lines.append(
            f"- {name}'s: the range row as the probe takes it {k['row']:.3f}, of which its "
            f"read (extremes of every element, histogram of the sample) {k['sampled']:.3f}; "
            f"the extremes alone {k['extremes']:.3f}; a histogram of every element (the "
            f"exact kernel) {k['histogram']:.3f}; the moment kernel (sum and sum of "
            f"squares, which the probe runs on every tensor anyway) {k['moments']:.3f}"
            f"{fused}.")
    return lines


def splice(path: Path, key: str, lines: list[str]) -> None:
    """Put this subsection under ``## Machine: key`` of RESULTS.md (replacing an earlier
    one there, or first under the heading; a new heading before the other machines')."""
    text = path.read_text() if path.exists() else ""
    block = "\n".join(lines) + "\n"
    heading = f"## Machine: {key}\n"
    at = text.find(heading)
    if at < 0:
        first = text.find("\n## ")
        at = first + 1 if first >= 0 else len(text)
        text = text[:at] + heading + "\n" + text[at:]
    body = at + len(heading)
    end = text.find("\n## ", body)
    end = len(text) if end < 0 else end + 1
    own = text.find(HEADER, body, end)
    if own >= 0:
        stop = text.find("\n### ", own + len(HEADER))
        stop = end if stop < 0 or stop >= end else stop + 1
        text = text[:own] + block + "\n" + text[stop:]
    else:
        start = body + (1 if text[body:body + 1] == "\n" else 0)
        text = text[:start] + block + "\n" + text[start:]
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=thread_counts, default=[1, 2],
                        help="torch intra-op thread counts, comma-separated (default 1,2)")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    machine.keep_freed_memory()
    print(f"{machine.key()}\nload average {machine.load()}")
    splice(args.output, machine.key(), section(run(args.repeats, args.warmup, args.threads)))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
