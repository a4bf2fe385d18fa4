"""``python -m bench``: probe overhead and memory, and the 175B predict; writes RESULTS.md."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import os
import platform
from pathlib import Path

import torch

from bench import overhead, scale
from bench import precision as precision_bench

RESULTS = Path(__file__).with_name("RESULTS.md")
TARGET_TIME, TARGET_MEMORY = 1.10, 1.05


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"CPU": f"{cpu}, {os.cpu_count()} logical cores",
            "torch": f"{torch.__version__} ({torch.get_num_threads()} intra-op threads)",
            "Python": platform.python_version(), "OS": platform.platform()}
    if torch.cuda.is_available():
        info["GPU"] = torch.cuda.get_device_name()
    if hasattr(os, "getloadavg"):
        info["load average at start"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


def keep_freed_memory() -> str:
    """Keep memory that torch frees inside the process (glibc's malloc).

    By default glibc hands large freed blocks back to the OS and the next pass faults
    them in again, page by page: tens of thousands of faults per pass, a number that
    varies from pass to pass and moves a pass's time by up to 10%, for the bare pass
    and the probe alike. With trimming off and a fixed mmap threshold both sides reuse
    their memory, as a long training run's process does, and the ratio is steady.
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    mallopt = getattr(libc, "mallopt", None)
    m_trim_threshold, m_mmap_threshold = -1, -3
    if mallopt is None or not (mallopt(m_trim_threshold, 1 << 30)
                               and mallopt(m_mmap_threshold, 1 << 25)):
        return "as is (no glibc mallopt here)"
    return "freed memory kept in the process (glibc mallopt: no trimming, mmap above 32 MiB)"


def verdict(value: float, target: float) -> str:
    return "meets" if value <= target else "**misses**"


def overhead_table(rows: list[dict]) -> list[str]:
    lines = ["| device | model | calls | bare (ms) | probe (ms) | wall ratio | pair ratios "
             "q1-q3 [min-max] | CPU-time ratio | peak bare (MiB) | peak probe (MiB) | "
             "memory ratio | D2H transfers |", "|" + "---|" * 12]
    for r in rows:
        w, c = r["wall"], r["cpu"]
        cpu = f"{c['ratio']:.3f}" if c else "-"
        transfers = "-" if r["transfers"] is None else str(r["transfers"])
        lines.append(
            f"| {r['device']} | {r['model']} | {r['layers']} | {w['bare_ms']:.1f} | "
            f"{w['probe_ms']:.1f} | {w['ratio']:.3f} | {w['pair_q1']:.3f}-{w['pair_q3']:.3f} "
            f"[{w['pair_min']:.3f}-{w['pair_max']:.3f}] | {cpu} | {r['mem_bare_mb']:.1f} | "
            f"{r['mem_probe_mb']:.1f} | {r['mem_ratio']:.3f} | {transfers} |")
    return lines


def write(path: Path, info: dict, rows: list[dict], big: dict | None, args,
          ranges: dict | None = None) -> None:
    lines = ["# varprobe benchmark results", "",
             f"Written by `python -m bench` on {datetime.date.today().isoformat()}.", "",
             "## Machine", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += ["", "## Probe overhead and memory", "",
              f"`varprobe.probe(model, x, grad_output=g)` against a bare forward + "
              f"`torch.autograd.grad` on the same model, input and cotangent (w.r.t. every "
              f"parameter and the float input, as the probe does), interleaved, "
              f"{args.warmup} warm-up then {args.repeats} timed runs each. The probe's time "
              f"includes everything it does: hooks, statistics, the one transfer, the "
              f"report and the closed-form predictions and diagnosis.", "",
              "- wall ratio: median probe time / median bare time (wall clock).",
              "- pair ratios: the spread of probe/bare over the interleaved pairs.",
              "- CPU-time ratio: the same with process CPU time, which a neighbour on a "
              "shared machine does not inflate.",
              "- peak: the most bytes torch held at once during the call, above what was "
              "live before it (CPU: the profiler's allocation events replayed in order; "
              "CUDA: `torch.cuda.max_memory_allocated`).",
              "- D2H transfers: on CUDA, the probe runs under "
              "`torch.cuda.set_sync_debug_mode(\"error\")`, lifted only inside "
              "`Recorder.collect`; the count is the collects (any other sync would raise).",
              ""]
    lines += overhead_table(rows)
    lines += ["", "Models:", ""]
    lines += sorted({f"- {r['model']}: {r['describe']}" for r in rows})
    lines += ["", f"Targets: time <= {TARGET_TIME:.2f}x, memory <= {TARGET_MEMORY:.2f}x "
              "the bare pass (time judged on the CPU-time ratio where there is one).", ""]
    for r in rows:
        c = r["cpu"] or r["wall"]
        lines.append(f"- {r['device']} {r['model']}: time {verdict(c['ratio'], TARGET_TIME)} "
                     f"({c['ratio']:.3f}x), memory {verdict(r['mem_ratio'], TARGET_MEMORY)} "
                     f"({r['mem_ratio']:.3f}x)")
    if not torch.cuda.is_available():
        lines += ["", "No GPU on this machine: the CUDA rows and the sync check did not run."]
    if big is not None:
        lines += ["", "## Closed-form predict at 175B", "",
                  f"`{big['command']}` in a fresh process (meta device: no weights "
                  "allocated), timed from launch to exit; peak RSS is the process's own "
                  "VmHWM.", "",
                  "| parameters | recorded calls | seconds | peak RSS (MiB) |",
                  "|---|---|---|---|",
                  f"| {big['parameters']:,} | {big['layers']} | {big['seconds']:.1f} | "
                  f"{big['peak_rss_mb']:.0f} |", "",
                  f"Targets: under 30 s ({verdict(big['seconds'], 30)}) and under 2 GB "
                  f"({verdict(big['peak_rss_mb'], 2048)})."]
    if ranges is not None:
        lines += ["", *precision_bench.section(ranges)]
    path.write_text("\n".join(lines) + "\n" + _history(path))


def _history(path: Path) -> str:
    """The hand-written "## History" section of the previous file, kept as it is."""
    old = path.read_text() if path.exists() else ""
    start = old.find("\n## History")
    return old[start:] if start >= 0 else ""


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: steadier on a shared machine)")
    parser.add_argument("--skip-scale", action="store_true", help="skip the 175B predict")
    parser.add_argument("--skip-precision", action="store_true",
                        help="skip the cost of --precision's range statistics")
    parser.add_argument("--malloc-as-is", action="store_true",
                        help="leave glibc's malloc returning freed memory to the OS "
                             "(page faults make both sides noisier)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = machine()
    info["malloc"] = "as is" if args.malloc_as_is else keep_freed_memory()
    rows = []
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available()
                                       else [])
    for device in devices:
        rows += overhead.run(device, args.repeats, args.warmup)
    big = None if args.skip_scale else scale.run()
    ranges = None if args.skip_precision else precision_bench.run(args.repeats, args.warmup)
    if hasattr(os, "getloadavg"):
        info["load average at end"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    write(args.output, info, rows, big, args, ranges)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
