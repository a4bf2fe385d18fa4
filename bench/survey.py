"""``python -m bench.survey``: what varprobe's default check says about every corpus entry.

For each entry: build it (seeded), probe it with ``varprobe.probe`` at its own batch and
input, and record the error and warning flags (code and layer), the verdict, a crash
inside varprobe (exception type and first line) and the probe's wall time. Writes
``bench/survey.json`` (one row per entry, sorted by name, so runs diff cleanly as the
verdict rules change) and a Markdown table next to it.

    python -m bench.survey                       # the whole corpus
    python -m bench.survey --only 'hf_*' nanogpt    # re-run some entries, keep the rest
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import statistics
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch

import corpus
import varprobe

HERE = Path(__file__).parent
SEVERITIES = ("error", "warning")


def flags_of(report: varprobe.Report) -> dict[str, list[dict[str, Any]]]:
    """{"error": [{code, layer, value, culprits}], "warning": [...]}, in the report's
    layer order; value is the number the flag's threshold was held against (4 significant
    digits), culprits the layers the flag names as behind it."""
    found: dict[str, list[dict[str, Any]]] = {s: [] for s in SEVERITIES}
    for layer in report.layers:
        for flag in layer.flags:
            if flag.severity in found:
                value = None if flag.value is None else float(f"{flag.value:.4g}")
                found[flag.severity].append({"code": flag.code, "layer": layer.label,
                                             "value": value, "culprits": flag.culprits})
    return found


def crash(exc: BaseException) -> dict[str, str]:
    text = str(exc).strip()
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return {"type": type(exc).__name__, "message": text.splitlines()[0] if text else "",
            "where": where}


def survey_one(e: corpus.Entry) -> dict[str, Any]:
    row: dict[str, Any] = {"name": e.name, "family": e.family, "task": e.task,
                           "broken": e.broken, "culprits": list(e.culprits)}
    try:
        model, x = e.build(), e.example()
    except Exception as exc:  # the entry itself is broken: not varprobe's fault
        row["build_error"] = crash(exc)
        return row
    row["parameters"] = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    try:
        report = varprobe.probe(model, x, batch_size=e.batch_size)
    except Exception as exc:
        row["seconds"] = round(time.perf_counter() - start, 2)
        row["internal_error"] = crash(exc)
        return row
    row["seconds"] = round(time.perf_counter() - start, 2)
    s = report.summary
    row.update(flags_of(report), verdict=s.verdict, cause=s.cause, flagged_culprits=s.culprits,
               layers=len(report.layers),
               forward_ratio=s.forward_ratio, backward_ratio=s.backward_ratio,
               prediction_error=prediction_error(report))
    return row


def prediction_error(report: varprobe.Report) -> dict[str, Any]:
    """The actual init's predictions against the same pass's measurement, per weight
    layer: the median |log(measured / predicted)| of the forward E[y^2] and of the
    backward Var[dL/dy], and the layer where the backward is furthest off (with
    measured / predicted, 3 significant digits); None where no layer has both."""
    forward, backward = [], []
    for layer in report.layers:
        p = layer.predicted
        if layer.kind != "weight" or p is None:
            continue
        if layer.forward and p.forward_var and layer.forward.second_moment:
            forward.append(abs(math.log(layer.forward.second_moment / p.forward_var)))
        if layer.backward and p.backward_var and layer.backward.var:
            ratio = layer.backward.var / p.backward_var
            backward.append((abs(math.log(ratio)), layer.label, float(f"{ratio:.3g}")))
    worst = max(backward, default=None)
    return {"forward": _median(forward), "backward": _median([b[0] for b in backward]),
            "worst": None if worst is None else {"layer": worst[1], "ratio": worst[2]}}


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def tally(flags: list[dict[str, str]], most: int = 3) -> str:
    """"exploding_forward ×2 (lm_head, …)": each code, its count and its first layers."""
    by_code: dict[str, list[str]] = {}
    for f in flags:
        by_code.setdefault(f["code"], []).append(f["layer"])
    parts = []
    for code, layers in by_code.items():
        shown = ", ".join(f"`{name}`" for name in layers[:most])
        more = ", …" if len(layers) > most else ""
        parts.append(f"{code} ×{len(layers)} ({shown}{more})")
    return "<br>".join(parts)


def trained(row: dict[str, Any]) -> str:
    t = row.get("trains")
    return "" if not t else "/".join("yes" if t[o] else "no" for o in ("sgd", "adamw"))


def names(layer: str, culprit: str) -> bool:
    """Whether a flagged layer label is the culprit module or inside it."""
    return layer == culprit or layer.startswith((culprit + ".", culprit + "#"))


def outcome(row: dict[str, Any]) -> str:
    """What the default check did with the entry, as the corpus judges it: a healthy
    entry should raise no error, a broken one an error on one of its culprits or naming
    one of them as behind it."""
    if "internal_error" in row or "build_error" in row:
        return "crash"
    errors = row.get("error", [])
    if not row["broken"]:
        return "false alarm" if errors else "quiet"
    if not errors:
        return "missed"
    hit = any(names(named, c) for f in errors for c in row["culprits"]
              for named in [f["layer"], *f.get("culprits", [])])
    return "caught" if hit or not row["culprits"] else "wrong culprit"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["# varprobe over the calibration corpus", "",
             "Written by `python -m bench.survey` (default `varprobe.probe` settings, each "
             "entry at its own batch and input; seconds on the machine that ran it).", "",
             "Outcomes: " + ", ".join(f"{k} {n}" for k, n in
                                      sorted(Counter(map(outcome, rows)).items())), "",
             "trains: the training labels (corpus/labels, bench/labels.py), SGD/AdamW.", "",
             "| entry | family | broken | trains | outcome | s | errors | warnings | crash |",
             "|---|---|---|---|---|---:|---|---|---|"]
    for r in rows:
        bad = r.get("internal_error") or r.get("build_error")
        crashed = f"{bad['type']}: {bad['message'][:120]} ({bad['where']})" if bad else ""
        if r.get("build_error"):
            crashed = "build failed: " + crashed
        lines.append(f"| {r['name']} | {r['family']} | {r['broken'] or ''} | {trained(r)} | "
                     f"{outcome(r)} | "
                     f"{r.get('seconds', '')} | {tally(r.get('error', []))} | "
                     f"{tally(r.get('warning', []))} | {crashed} |")
    lines += ["", *confusion(rows), "", *accuracy(rows)]
    n_healthy = sum(not r["broken"] for r in rows)
    lines += ["", "## Flags by code", "", "| code | severity | entries (healthy) | "
              "share of healthy | entries (broken) |", "|---|---|---:|---:|---:|"]
    for (code, severity), (healthy, broken) in sorted(code_counts(rows).items()):
        lines.append(f"| {code} | {severity} | {healthy} | {healthy / max(n_healthy, 1):.0%} "
                     f"| {broken} |")
    return "\n".join(lines) + "\n"


def accuracy(rows: list[dict[str, Any]]) -> list[str]:
    """The healthy entries' predictions against their own pass, worst backward first."""
    kept = [r for r in rows if not r["broken"] and r.get("prediction_error")
            and r["prediction_error"]["backward"] is not None]
    kept.sort(key=lambda r: -r["prediction_error"]["backward"])
    lines = ["## Predictions against the measurement", "",
             "Healthy entries, the probe's `predicted` (the actual init's walk) against the "
             "same pass's measurement, per weight layer: median |log(measured / predicted)| "
             "of the forward E[y²] and the backward Var[dL/dy] (0.1: 10% off), and the "
             "layer furthest off backward.", "",
             "| entry | forward | backward | furthest off (measured / predicted) |",
             "|---|---:|---:|---|"]
    for r in kept:
        e = r["prediction_error"]
        worst = f"`{e['worst']['layer']}` {e['worst']['ratio']}" if e["worst"] else ""
        lines.append(f"| {r['name']} | {e['forward']} | {e['backward']} | {worst} |")
    return lines


def confusion(rows: list[dict[str, Any]]) -> list[str]:
    """The verdict against training: outcome by what SGD (and AdamW) did with the entry."""
    def label(r: dict[str, Any]) -> str:
        t = r.get("trains")
        if not t:
            return "not trained"
        if t["sgd"]:
            return "trains (SGD)"
        return "fails (SGD), trains (AdamW)" if t["adamw"] else "fails (SGD and AdamW)"

    columns = ["trains (SGD)", "fails (SGD), trains (AdamW)", "fails (SGD and AdamW)",
               "not trained"]
    table = Counter((outcome(r), label(r)) for r in rows)
    found = [o for o in ("quiet", "false alarm", "caught", "wrong culprit", "missed", "crash")
             if any(table[o, c] for c in columns)]
    lines = ["## The verdict against training", "",
             "Rows: what the default check said (healthy entries: quiet or false alarm; "
             "broken ones: caught, wrong culprit or missed). Columns: what a short training "
             "run did (bench/labels.py: best of a small learning-rate grid, trains = the "
             "last 5 losses average at most half the chance loss within its fixed budget; "
             "the protocol is in docs/flags.md). A broken entry that trains is right to "
             "be missed and wrong to be caught.", "",
             "| outcome | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for o in found:
        lines.append(f"| {o} | " + " | ".join(str(table[o, c]) for c in columns) + " |")
    return lines


def code_counts(rows: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[int, int]]:
    """(code, severity) -> how many healthy and how many broken entries carry it."""
    healthy: Counter = Counter()
    broken: Counter = Counter()
    for r in rows:
        for severity in SEVERITIES:
            for code in {f["code"] for f in r.get(severity, [])}:
                (broken if r["broken"] else healthy)[code, severity] += 1
    return {key: (healthy[key], broken[key]) for key in healthy.keys() | broken.keys()}


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.survey", description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help="entry names or glob patterns; the other rows of the JSON are kept")
    ap.add_argument("--out", type=Path, default=HERE / "SURVEY.md",
                    help="the Markdown table (the JSON goes to bench/survey.json)")
    ap.add_argument("--json", type=Path, default=HERE / "survey.json")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: on a shared machine more threads only "
                         "oversubscribe the cores and the timings lose meaning)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    chosen = [e for e in corpus.entries()
              if not args.only or any(fnmatch.fnmatchcase(e.name, p) for p in args.only)]
    if not chosen:
        ap.error(f"no corpus entry matches {' '.join(args.only)}")
    kept: dict[str, dict[str, Any]] = {}
    if args.only and args.json.exists():
        names = {e.name for e in corpus.entries()}
        kept = {r["name"]: r for r in json.loads(args.json.read_text())["entries"]
                if r["name"] in names}
    # the first probe in a process pays for imports and kernel warm-up: keep it off the clock
    varprobe.probe(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), batch_size=4)
    for e in chosen:
        row = survey_one(e)
        row["outcome"] = outcome(row)
        kept[e.name] = row
        print(f"{e.name:28s} {row.get('seconds', '-'):>6}s  errors {len(row.get('error', []))}"
              f"  warnings {len(row.get('warning', []))}"
              + (f"  CRASH {row.get('internal_error') or row.get('build_error')}"
                 if "internal_error" in row or "build_error" in row else ""), flush=True)
    rows = [{**kept[name], "trains": corpus.trains(name)} for name in sorted(kept)]
    write_atomic(args.json, json.dumps({"varprobe_version": varprobe.__version__,
                                        "torch_version": torch.__version__,
                                        "threads": args.threads,
                                        "entries": rows}, indent=1) + "\n")
    write_atomic(args.out, markdown(rows))


if __name__ == "__main__":
    main()
