"""The cost of ``--precision``: the range statistics (exponent histogram, abs max,
smallest non-zero, overflow counts) on top of the probe, on the same models as the
overhead benchmark.

``python -m bench.precision`` measures and writes its section of RESULTS.md (``python
-m bench`` writes it too). The probe with and without ``precision=Settings("fp16")``,
interleaved, process CPU time (single-threaded: what the work costs, whatever the
neighbours do); and the range read against the moment kernel on one large tensor,
which bounds what fusing the two would save: at most the time of one read.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import varprobe
from bench import machine, overhead
from varprobe.precision import Settings

HEADER = "## Number-format statistics (--precision)"


def timings(case: overhead.Case, repeats: int, warmup: int) -> dict[str, float]:
    g = overhead.cotangent(case.model, case.inputs)
    settings = Settings("fp16")
    cpu: dict[str, list[float]] = {"probe": [], "precision": []}
    for i in range(warmup + repeats):
        for name, extra in (("probe", {}), ("precision", {"precision": settings})):
            start = time.process_time()
            varprobe.probe(case.model, case.inputs, grad_output=g, mode=None, **extra)
            if i >= warmup:
                cpu[name].append(time.process_time() - start)
    ratios = sorted(p / b for p, b in zip(cpu["precision"], cpu["probe"]))
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    probe, precision = (statistics.median(cpu[k]) for k in ("probe", "precision"))
    return {"probe_ms": 1e3 * probe, "precision_ms": 1e3 * precision,
            "ratio": precision / probe, "q1": q1, "q3": q3}


def kernels(n: int = 1 << 24, repeats: int = 5) -> dict[str, float]:
    """ns per element: the range read, the moment kernel (one read of the tensor)."""
    from varprobe import exponents
    from varprobe import kernels as moments

    x = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    limits = exponents.cuts(1.0)
    runs = {"ranges": lambda: exponents._cpu32(x.view(np.int32), limits),
            "moments": lambda: moments.sums(x, np.float32(0), np.float32(0))}
    out = {}
    for name, fn in runs.items():
        fn()  # compile
        best = min(_cpu_seconds(fn) for _ in range(repeats))
        out[name] = 1e9 * best / n
    return out


def _cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def run(repeats: int, warmup: int, log=print) -> dict:
    rows = []
    for case in overhead.cases(torch.device("cpu")):
        t = timings(case, repeats, warmup)
        log(f"{case.name:7} probe {t['probe_ms']:8.1f} ms  with --precision "
            f"{t['precision_ms']:8.1f} ms  cpu-time ratio {t['ratio']:.3f} "
            f"(pairs {t['q1']:.3f}-{t['q3']:.3f})")
        rows.append({"model": case.name, **t})
    k = kernels()
    log(f"kernels: ranges {k['ranges']:.2f} ns/element, moments {k['moments']:.2f}")
    return {"rows": rows, "kernels": k, "repeats": repeats, "warmup": warmup}


def section(result: dict) -> list[str]:
    k = result["kernels"]
    lines = [HEADER, "",
             "`varprobe.probe(model, x, grad_output=g, precision=Settings(\"fp16\"))` against "
             f"the same call without it, interleaved, {result['warmup']} warm-up then "
             f"{result['repeats']} timed runs each, process CPU time (1 intra-op thread). "
             "The extra work: one more read of every recorded tensor (outputs, gradients, "
             "weights, weight gradients) by the range kernel, its rows in the same one "
             "transfer, and the report's histograms.", "",
             "| model | probe (ms) | with --precision (ms) | CPU-time ratio | pair ratios q1-q3 |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['probe_ms']:.1f} | {r['precision_ms']:.1f} | "
                     f"{r['ratio']:.3f} | {r['q1']:.3f}-{r['q3']:.3f} |")
    worst = max(r["ratio"] for r in result["rows"])
    lines += ["", f"Target: at most 1.02x the probe: "
              f"{'meets' if worst <= 1.02 else '**misses**'} (worst {worst:.3f}x).", "",
              "Kernels, one float32 tensor of 2^24 elements (best of 5, CPU time): the "
              f"range read (histogram, abs max, smallest non-zero) {k['ranges']:.2f} "
              "ns/element, the moment kernel (one read: sum and sum of squares) "
              f"{k['moments']:.2f} ns/element. The range read is one read per tensor (the "
              "overflow cuts take a second only for a tensor that reaches one); what it "
              "costs beyond the read is the histogram's per-element increment, which cannot "
              "run in vector lanes. Fusing it into the moment kernel would save at most one "
              "read, bounded by the moment kernel's whole time, and would take that kernel "
              "out of its vector lanes. The probe without --precision pays nothing: the "
              "statistics are opt-in."]
    return lines


def splice(path: Path, lines: list[str]) -> None:
    """Replace (or insert before ## History) this section of RESULTS.md."""
    text = path.read_text() if path.exists() else ""
    block = "\n".join(lines) + "\n"
    start = text.find(HEADER)
    if start >= 0:
        end = text.find("\n## ", start + len(HEADER))
        text = text[:start] + block + ("\n" + text[end + 1:] if end >= 0 else "")
    else:
        at = text.find("\n## History")
        text = (text[:at + 1] + block + "\n" + text[at + 1:] if at >= 0
                else text + "\n" + block)
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    machine.keep_freed_memory()
    splice(args.output, section(run(args.repeats, args.warmup)))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
