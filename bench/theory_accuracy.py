"""Regenerate docs/theory-accuracy.md: per-rule Monte Carlo accuracy of the predictions.

    python -m bench.theory_accuracy [--seeds N] [--out docs/theory-accuracy.md]
                                    [--only FAMILY ...] [--json rows.json]

Imports every module in bench/accuracy (one rule family each, see its docstring), runs
its ``cases(seeds)`` and writes, per rule, the 50/90/99th percentile of the relative
forward and backward error |measured/predicted - 1| with the case count; the rules
without a prediction (or whose prediction is a measured value passed on); the cases
whose error is beyond noise; the full case list; and the machine it ran on.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pkgutil
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import bench.accuracy
from bench.accuracy._harness import beyond_noise

ROOT = Path(__file__).resolve().parent.parent


def families() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench.accuracy.__path__)
                  if not m.name.startswith("_"))


def machine() -> dict[str, str]:
    import torch

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                      if line.startswith("Model name")), platform.processor())
    except (OSError, subprocess.CalledProcessError):
        model = platform.processor() or platform.machine()
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "varprobe"],
                               capture_output=True, text=True, check=True).stdout.strip()
        source = f"git {head}" + (" with varprobe/ modified" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        source = "not a git checkout"
    import varprobe

    where = Path(varprobe.__file__).resolve().parent
    where = "this checkout" if where.parent == ROOT else str(where)
    return {"varprobe": f"{varprobe.__version__} from {where} ({source})",
            "CPU": f"{model}, {os.cpu_count()} logical cores",
            "threads": f"torch {torch.get_num_threads()} intra-op thread(s) "
                       f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})",
            "torch": torch.__version__, "Python": platform.python_version()}


def _pct(values: list[float], q: float) -> float | None:
    """The q-th percentile, linear between order statistics (numpy's default)."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:.3g}"


def _ratio(row: dict, side: str) -> str:
    r, se = row.get(f"{side}_ratio"), row.get(f"{side}_se")
    if r is None:  # a family that reports errors only
        err = row.get(f"{side}_error")
        return "–" if err is None else f"error {100 * err:.1f}%"
    return f"{r:.3f} ± {se:.3f}" if se is not None else f"{r:.3f}"


def predicted(row: dict, side: str) -> bool:
    status = row.get("status") or "ok"
    return row.get(f"{side}_error") is not None and f"{side}: carried" not in status


def systematic(row: dict, side: str) -> bool:
    """Beyond the seeds' own scatter: more than 4 standard errors and more than 2%."""
    err, se = row.get(f"{side}_error"), row.get(f"{side}_se")
    return err is not None and se is not None and err > max(4 * se, 0.02)


def summarize(rows: list[dict]) -> list[dict]:
    out: dict[tuple[str, str], dict] = {}
    for row in rows:
        key = (row["family"], row["rule"])
        s = out.setdefault(key, {"family": key[0], "rule": key[1], "cases": 0, "missing": 0,
                                 "carried": 0, "forward": [], "backward": [],
                                 "beyond": 0, "systematic": 0})
        s["cases"] += 1
        status = row.get("status") or "ok"
        s["missing"] += "no prediction" in status
        s["carried"] += "carried" in status
        flagged = sys_flagged = False
        for side in ("forward", "backward"):
            if predicted(row, side):
                s[side].append(row[f"{side}_error"])
                flagged |= beyond_noise(row, side)
                sys_flagged |= systematic(row, side)
        s["beyond"] += flagged
        s["systematic"] += sys_flagged
    return list(out.values())


def render(rows: list[dict], seeds: int, seconds: dict[str, float], command: str,
           facts: dict[str, str]) -> str:
    total = sum(seconds.values())
    lines = [
        "# How accurate is each rule? Monte Carlo grids, per-rule error percentiles",
        "",
        "Generated by `bench/theory_accuracy.py`; do not edit by hand. Regenerate with",
        "",
        f"    {command}",
        "",
        "Each case is a tiny model with the op between two weight layers (Linear → op →",
        "Linear, Conv → op → Conv), probed with `varprobe.probe` for "
        f"{seeds} seeds (the seed draws",
        "the weights, the input and the N(0, 1) cotangent). **Forward**: E[y²] of the weight",
        "layer after the op against its `predicted.forward_var`; **backward**: Var[dL/dx] at",
        "the input of the weight layer before the op against its "
        "`predicted.backward_input_var`",
        "(for a weight-layer op, linear or conv: both at the op itself). Error = |mean over",
        "seeds of measured/predicted − 1|. The grid axes: input scale (0.1, 1, 10 times",
        "N(0, 1)), the op input's mean (0 or 1 std, a constant bias on the layer before),",
        "width (64, 256, 1024; convs 64 and 256), init (he N(0, 2/fan_in), xavier",
        "N(0, 2/(fan_in+fan_out)), torch's default, std 0.02), placement (after the weight",
        "layer or after a ReLU), position correlation r and sequence length T where the",
        "op reads positions. Each family's module in `bench/accuracy/` states its rule.",
        "A family may measure otherwise and say so in its docstring: attention",
        "(`bench/accuracy/attention.py`, where causal masks and sequence length matter)",
        "holds float64 simulations of the op against varprobe's attention formulas and",
        "reports errors only (no ratio, standard error or bound).",
        "",
        "**Noise.** `bound` is 3 standard deviations of the seed mean from "
        "docs/theory-review.md §10:",
        "forward, the chi-square of the measuring layer's W along a collinear input,",
        "sqrt(2/n_out) per seed (n_out = 1024 for the layer after the op: 4.7% at 8 seeds;",
        "the op's own width for linear and conv ops); backward, the backward factor",
        "sqrt(0.75/n) per seed at width n (5.7% at n = 256, 8 seeds). These are worst cases:",
        "zero-mean inputs spread over many directions scatter far less, and the measured",
        "standard error over the seeds (`± se` in the case list) is usually under 1%.",
        "A case is **beyond bound** when its error exceeds `bound` and 3 se, and",
        "**systematic** when it exceeds 4 se and 2% (a bias larger than the seeds' scatter,",
        "though inside the worst-case bound).",
        "",
        "Errors are in percent. A rule's percentiles count only the directions varprobe",
        "predicted by a rule: **no prediction** (the layer's prediction is None) and",
        "**carried** (a measured value passed on: the graph could not follow the op, or the",
        "module has no closed form) are counted apart (cases with either side so) and",
        "listed under Gaps; the other side of such a case still counts if predicted.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in facts.items()],
        f"- run time: {total:.0f} s in all ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ")",
        f"- cases: {len(rows)}, seeds per case: {seeds}",
        "",
        "## Per rule",
        "",
        "| family | rule | cases | no prediction | carried | fwd p50 | fwd p90 | fwd p99 "
        "| bwd p50 | bwd p90 | bwd p99 | beyond bound | systematic |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for s in summarize(rows):
        f, b = s["forward"], s["backward"]
        lines.append(
            f"| {s['family']} | {s['rule']} | {s['cases']} | {s['missing'] or ''} | "
            f"{s['carried'] or ''} | {_fmt(_pct(f, 50))} | {_fmt(_pct(f, 90))} | "
            f"{_fmt(_pct(f, 99))} | {_fmt(_pct(b, 50))} | {_fmt(_pct(b, 90))} | "
            f"{_fmt(_pct(b, 99))} | {s['beyond'] or ''} | {s['systematic'] or ''} |")
    lines += ["", "## Gaps: no prediction, or a measured value carried past the op", ""]
    gaps: dict[tuple[str, str], dict] = {}
    for row in rows:
        status = row.get("status") or "ok"
        if status == "ok":
            continue
        g = gaps.setdefault((row["family"], row["rule"]), {"cases": 0, "status": {},
                                                          "note": row.get("note") or ""})
        g["cases"] += 1
        g["status"][status] = g["status"].get(status, 0) + 1
    if not gaps:
        lines.append("None.")
    else:
        lines += ["One line per rule; the note is the first case's (the others differ in "
                  "layer names and numbers at most).", "",
                  "| family | rule | cases | status | what varprobe says |",
                  "|---|---|--:|---|---|"]
        for (fam, rule), g in gaps.items():
            status = "; ".join(f"{k} ({v})" for k, v in g["status"].items())
            note = g["note"].replace("|", "/")
            lines.append(f"| {fam} | {rule} | {g['cases']} | {status} | {note[:500]} |")
    lines += ["", "## Beyond noise", "",
              "Predicted directions whose error exceeds the bound (**B**) or is systematic "
              "(**S**), grouped by rule and direction; every case is in the list below.", "",
              "| family | rule | side | B | S | of | measured/predicted | worst case |",
              "|---|---|---|--:|--:|--:|--:|---|"]
    groups: dict[tuple[str, str, str], dict] = {}
    for row in rows:
        for side in ("forward", "backward"):
            if not predicted(row, side):
                continue
            g = groups.setdefault((row["family"], row["rule"], side),
                                  {"B": 0, "S": 0, "of": 0, "ratios": [], "worst": None})
            g["of"] += 1
            b, sy = beyond_noise(row, side), systematic(row, side)
            if not (b or sy):
                continue
            g["B" if b else "S"] += 1
            g["ratios"].append(row[f"{side}_ratio"])
            if g["worst"] is None or row[f"{side}_error"] > g["worst"][f"{side}_error"]:
                g["worst"] = row
    flagged = [(k, g) for k, g in groups.items() if g["ratios"]]
    for (fam, rule, side), g in flagged:
        lo, hi = min(g["ratios"]), max(g["ratios"])
        span = f"{lo:.3f}" if math.isclose(lo, hi, abs_tol=5e-4) else f"{lo:.3f} – {hi:.3f}"
        w = g["worst"]
        lines.append(f"| {fam} | {rule} | {side} | {g['B'] or ''} | {g['S'] or ''} | "
                     f"{g['of']} | {span} | {w['case']}: {_ratio(w, side)} |")
    if not flagged:
        lines.append("| none | | | | | | | |")
    lines += ["", "## All cases", ""]
    for fam in dict.fromkeys(r["family"] for r in rows):
        lines += [f"### {fam}", "",
                  "| rule | case | forward meas/pred | fwd bound (%) | backward meas/pred "
                  "| bwd bound (%) | status |", "|---|---|--:|--:|--:|--:|---|"]
        for row in rows:
            if row["family"] != fam:
                continue
            lines.append(f"| {row['rule']} | {row['case']} | {_ratio(row, 'forward')} | "
                         f"{_fmt(row.get('forward_bound'))} | {_ratio(row, 'backward')} | "
                         f"{_fmt(row.get('backward_bound'))} | {row.get('status') or 'ok'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--out", default="docs/theory-accuracy.md")
    parser.add_argument("--only", nargs="*", help="families to run (default: all)")
    parser.add_argument("--json", help="also write the rows (and timings) here")
    parser.add_argument("--render", metavar="JSON",
                        help="only rewrite the page from rows a --json run saved")
    args = parser.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        Path(args.out).write_text(render(saved["rows"], saved["seeds"], saved["seconds"],
                                         saved["command"], saved["machine"]) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
        return 0
    names = families()
    if args.only:
        unknown = set(args.only) - set(names)
        if unknown:
            parser.error(f"unknown families {sorted(unknown)}; known: {names}")
        names = [n for n in names if n in args.only]
    facts = machine()  # the run's, before anything changes the thread count
    rows: list[dict] = []
    seconds: dict[str, float] = {}
    for name in names:
        module = importlib.import_module(f"bench.accuracy.{name}")
        start = time.perf_counter()
        got = module.cases(args.seeds)
        seconds[name] = time.perf_counter() - start
        for row in got:
            row.setdefault("family", name)
        rows += got
        print(f"{name}: {len(got)} cases in {seconds[name]:.0f} s", file=sys.stderr, flush=True)
    shown = ["--seeds", str(args.seeds), "--out", args.out] + \
        (["--only", *args.only] if args.only else [])
    command = "python -m bench.theory_accuracy " + shlex.join(shown)
    if hasattr(os, "getloadavg"):
        facts["load average at the end (1/5/15 min)"] = " / ".join(
            f"{x:.2f}" for x in os.getloadavg())
    text = render(rows, args.seeds, seconds, command.strip(), facts)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"seeds": args.seeds, "seconds": seconds, "command": command.strip(),
             "machine": facts, "rows": rows}, indent=1, default=str))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
