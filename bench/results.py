"""bench/RESULTS.md: one section per machine, the latest runs on it, and the history.

A run replaces nothing but its own machine's section, where it goes first and the runs
before it stay up to ``keep`` in all; other machines' sections and the hand-written
"## History" stay as they are. A machine is its CPU model, core count and torch build.
"""

from __future__ import annotations

import re
from pathlib import Path

PRECISION = "### Number-format statistics (--precision)"  # bench.precision's subsection
PRECISION_OWN = "### --precision's own CPU time (bench.precision_own)"
KEPT = (PRECISION, PRECISION_OWN)  # subsections of a machine's section that other benches write
FLOOR = "reads alone (sum + norm)"  # bench.peers.reads' side
TARGETS = {"probe": 1.05, "pass": 1.03, "analysis": 10.0, "memory": 1.00, "e2e": 1.10}
INTRO = """# varprobe benchmark results

Written by `python -m bench`: one section per machine it was run on (CPU model, cores
and torch build in the heading), the latest runs first. Each machine's figures are that
machine's, measured on it; none of them is the project's figure for every CPU.

In one process, per model, every side runs the same forward and the same
`torch.autograd.grad` (w.r.t. every parameter and the float input) on the same input
and cotangent, interleaved round by round after a warm-up: the bare pass, varprobe's
`probe()` (with each kind of CPU sums it can use: torch's, and numba's where installed)
the peer loggers (`bench/peers.py`) and, as the floor under any recorder of the same
tensors, their reads alone (torch's sum and norm of every leaf module's output and
output gradient, every parameter and every parameter gradient). Medians; ratios are
to the bare pass's median, wall clock and process CPU time (which a neighbour on a
shared machine inflates less).

- q1-q3: the spread of the per-round wall ratios.
- pass: varprobe's forward + backward under its hooks (the recording), over the bare
  pass; hooks: the wall time spent inside its hooks and weight-gradient statistics;
  analysis: the collect, predictions and diagnosis after the pass, per 100 layer calls
  (`varprobe.timing`, the same split as `varprobe analyze --timings`).
- peak: the most bytes torch held at once during the call above what was live before
  it (CPU: the profiler's allocation events replayed in order).
- end to end: fresh processes, launch to exit, `OMP_NUM_THREADS` set; CPU time is the
  child's user + system time.
"""


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def verdict(ok: bool) -> str:
    return "meets" if ok else "**misses**"


def where(r: dict) -> str:
    """A row's model, with the device where it is not the CPU."""
    return r["model"] if r.get("device", "cpu") == "cpu" else f"{r['model']} ({r['device']})"


def overhead_table(rows: list[dict]) -> list[str]:
    lines = ["| model | calls | side | wall (ms) | wall ratio | q1-q3 | CPU (ms) | CPU ratio | "
             "pass wall / CPU | hooks (ms) | analysis wall / CPU (ms / 100 calls) |",
             "|" + "---|" * 11]
    for r in rows:
        for name, s in r["sides"].items():
            if "failed" in s:
                lines.append(f"| {where(r)} | {r['layers']} | {name} | failed: "
                             f"{s['failed']} |" + " |" * 7)
                continue
            split = (f"{s['pass_wall']:.3f} / {s['pass_cpu']:.3f} | {s['hooks_ms']:.1f} | "
                     f"{s['analysis_ms_per_100']:.2f} / {s['analysis_cpu_ms_per_100']:.2f}"
                     if "pass_wall" in s else "- | - | -")
            lines.append(f"| {where(r)} | {r['layers']} | {name} | {s['wall_ms']:.1f} | "
                         f"{s['wall']:.3f} | {s['q1']:.3f}-{s['q3']:.3f} | {s['cpu_ms']:.1f} | "
                         f"{s['cpu']:.3f} | {split} |")
    return lines


def memory_table(rows: list[dict]) -> list[str]:
    lines = ["| model | peak bare (MiB) | peak probe (MiB) | ratio | D2H transfers |",
             "|---|---|---|---|---|"]
    for r in rows:
        transfers = "-" if r["transfers"] is None else str(r["transfers"])
        lines.append(f"| {r['device']} {r['model']} | {r['mem_bare_mb']:.1f} | "
                     f"{r['mem_probe_mb']:.1f} | {r['mem_ratio']:.3f} | {transfers} |")
    return lines


def e2e_table(e2e: dict) -> list[str]:
    lines = ["| command | wall (s) | wall ratio | CPU (s) | CPU ratio |", "|---|---|---|---|---|"]
    for name, r in e2e["rows"].items():
        lines.append(f"| {name} | {r['wall_s']:.2f} | {r['wall']:.3f} | {r['cpu_s']:.2f} | "
                     f"{r['cpu']:.3f} |")
    return lines


def targets(rows: list[dict], e2e: dict | None) -> list[str]:
    """The issue's targets, per model and varprobe side, wall and CPU."""
    t = TARGETS
    out = []
    for r in rows:
        logger = r["sides"].get("full backward hooks", {})
        for name, s in r["sides"].items():
            if not name.startswith("varprobe") or "failed" in s:
                continue
            analysis = max(s["analysis_ms_per_100"], s["analysis_cpu_ms_per_100"])
            beats = ("-" if "wall" not in logger else
                     verdict(s["wall"] <= logger["wall"] and s["cpu"] <= logger["cpu"]))
            out.append(
                f"- {where(r)}, {name}: probe <= {t['probe']}x "
                f"{verdict(max(s['wall'], s['cpu']) <= t['probe'])} ({s['wall']:.3f} / "
                f"{s['cpu']:.3f}); <= the backward-hook logger {beats}; pass <= {t['pass']}x "
                f"{verdict(max(s['pass_wall'], s['pass_cpu']) <= t['pass'])} "
                f"({s['pass_wall']:.3f} / {s['pass_cpu']:.3f}); analysis <= {t['analysis']:.0f} "
                f"ms/100 calls {verdict(analysis <= t['analysis'])} "
                f"({s['analysis_ms_per_100']:.2f} / {s['analysis_cpu_ms_per_100']:.2f})")
        floor, bare = r["sides"].get(FLOOR, {}), r["sides"]["bare"]
        if "hooks_ms" in floor:
            out.append(f"- {where(r)}: the reads alone (torch's sum and norm of every tensor, "
                       f"no statistics) took {floor['hooks_ms']:.1f} ms, "
                       f"{floor['hooks_ms'] / bare['wall_ms']:.1%} of the bare pass")
        out.append(f"- {where(r)}: peak memory {verdict(r['mem_ratio'] <= t['memory'] + 5e-4)}"
                   f" ({r['mem_ratio']:.3f}x)")
    if e2e is not None:
        for name, r in e2e["rows"].items():
            if name.startswith("varprobe"):
                out.append(f"- end to end, {name}: <= {t['e2e']}x "
                           f"{verdict(max(r['wall'], r['cpu']) <= t['e2e'])} "
                           f"({r['wall']:.3f} wall / {r['cpu']:.3f} CPU)")
    return out


def run_section(run: dict) -> list[str]:
    lines = [f"### Run of {run['when']}", "", f"`{run['command']}`", ""]
    lines += [f"- {k}: {v}" for k, v in run["info"].items()]
    for block in run["threads"]:
        lines += ["", f"#### {block['threads']} intra-op thread(s) (load average "
                  f"{block['load_before']} before, {block['load_after']} after)", ""]
        lines += overhead_table(block["rows"]) + [""] + memory_table(block["rows"])
        if block.get("e2e") is not None:
            lines += ["", f"End to end ({block['e2e'].get('device', 'cpu')}), ResNet-50-style, "
                      f"224x224, batch 16, median of "
                      f"{block['e2e']['rounds']} interleaved rounds:", ""]
            lines += e2e_table(block["e2e"])
        lines += ["", "Targets (wall / CPU):", ""] + targets(block["rows"], block.get("e2e"))
    if run.get("big") is not None:
        big = run["big"]
        lines += ["", f"`{big['command']}` in a fresh process: {big['parameters']:,} "
                  f"parameters, {big['layers']} calls, {big['seconds']:.1f} s, peak RSS "
                  f"{big['peak_rss_mb']:.0f} MiB (targets 30 s, 2 GB)."]
    lines += ["", "Models:", ""] + sorted({f"- {r['model']}: {r['describe']}"
                                           for b in run["threads"] for r in b["rows"]})
    return lines


def _subsections(section: str, headers: tuple[str, ...]) -> list[str]:
    """The blocks of ``section`` that start with one of ``headers``, each up to the next
    ### heading (another bench's figures for this machine, which this run keeps)."""
    out = []
    for header in headers:
        at = section.find(header)
        if at >= 0:
            end = section.find("\n### ", at + len(header))
            out.append(section[at: end + 1 if end >= 0 else len(section)].rstrip("\n") + "\n")
    return out


def write(path: Path, key: str, run: dict, keep: int = 2) -> None:
    old = path.read_text() if path.exists() else ""
    history = old[old.find("\n## History"):] if "\n## History" in old else ""
    body = old[:len(old) - len(history)]
    sections = re.split(r"\n(?=## Machine: )", body)[1:]
    heading = f"## Machine: {key}"
    mine = next((s for s in sections if s.startswith(heading + "\n")), "")
    others = [s.rstrip("\n") for s in sections if s is not mine]
    previous = re.split(r"\n(?=### Run of )", mine)[1:keep]  # the latest keep-1 runs
    kept = _subsections(mine, KEPT)
    section = "\n".join([heading, "", *kept, *run_section(run)] + [""] +
                        [p.rstrip("\n") + "\n" for p in previous])
    text = "\n\n".join([INTRO.rstrip("\n"), section.rstrip("\n"), *others])
    path.write_text(text + "\n" + history)
