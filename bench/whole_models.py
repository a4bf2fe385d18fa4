"""Whole models, measured against predicted, per weight layer, averaged over seeds.

    python -m bench.whole_models [--seeds 8] [--out docs/whole-model-accuracy.md]
                                 [--models mlp,cnn,...] [--schemes he,xavier,lecun,torch-default]

For every model of bench/whole_zoo.py, with S seeds (each seed: new weights, new input,
new cotangent, and for a scheme new re-initialized weights):

(a) actual init: per weight layer, the seed mean of the measured E[y²]
    (``forward.second_moment``) and Var[dL/dy] (``backward.var``) against the seed mean
    of ``predicted.forward_var`` / ``predicted.backward_var``; the median and max over
    layers of |log(measured/predicted)|, the share of weight layers predicted on the
    graph basis, the share whose prediction is closed form all the way (no measured
    value carried past anything, forward resp. backward), and the layers without a
    graph prediction with their notes.
(b) counterfactuals: ``schemes[s]`` of the probe of the model as built, against the
    measurement of ``probe(model, init=s)`` (a re-initialized copy), same statistics;
    beside it the copy's own ``predicted`` (what the walk says once it sees the new
    weights), which tells a wrong scheme walk from a wrong op rule.
(c) predict on meta (nanoGPT-style and HF models, and the ViT): the closed-form report of
    ``varprobe predict`` (built on meta, the model's own init recorded) against the seed
    mean of the measured-mode ``predicted``; coverage = weight layers with a prediction.

Only varprobe's public entry points and Report fields are used.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import varprobe
from bench import whole_zoo
from bench.whole_zoo import Case

BOUND = 0.1  # median |log(measured/predicted)| the issue asks for, forward and backward
SCHEMES = ("he", "xavier", "lecun", "torch-default")
INPUT_STREAM, CALIBRATION_STREAM = 10_000, 20_000
OUT = Path(__file__).resolve().parent.parent / "docs" / "whole-model-accuracy.md"


# -- one seed -----------------------------------------------------------------------------


def calibrate(model: nn.Module, case: Case, seed: int) -> None:
    """Running statistics of every BatchNorm from ``case.calibrate`` batches: a
    cumulative average (momentum None) of train-mode passes, as after a short
    calibration run; the momentum is put back."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    gen = torch.Generator().manual_seed(CALIBRATION_STREAM + seed)
    was = model.training
    model.train()
    with torch.no_grad():
        for _ in range(case.calibrate):
            model(case.inputs(case.batch, gen))
    model.train(was)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum


def build(case: Case, seed: int) -> nn.Module:
    """The model at its own init for ``seed`` (the global RNG is left alone)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = case.build()
    if case.calibrate:
        calibrate(model, case, seed)
    return model


def inputs(case: Case, seed: int) -> Any:
    return case.inputs(case.batch, torch.Generator().manual_seed(INPUT_STREAM + seed))


def probe(case: Case, seed: int, init: str | None = None,
          model: nn.Module | None = None) -> varprobe.Report:
    model = build(case, seed) if model is None else model
    return varprobe.probe(model, inputs(case, seed), seed=seed, mode=case.mode, init=init,
                         compare=None if init else "all")


# -- per-layer numbers over seeds ----------------------------------------------------------


@dataclass
class LayerSeries:
    """One weight layer's numbers, one entry per seed (None where missing)."""

    name: str
    type: str
    meas_f: list[float | None] = field(default_factory=list)
    meas_b: list[float | None] = field(default_factory=list)
    pred_f: list[float | None] = field(default_factory=list)
    pred_b: list[float | None] = field(default_factory=list)
    basis: list[str | None] = field(default_factory=list)
    note: str | None = None


def weight_layers(report: varprobe.Report) -> list:
    return [layer for layer in report.layers if layer.kind == "weight"]


def key(layer: Any) -> str:
    return layer.name if layer.call in (0, 1, None) and layer.calls == 1 \
        else f"{layer.name}#{layer.call}"


def gather(series: dict[str, LayerSeries], report: varprobe.Report,
           prediction: str | None = None, measured: varprobe.Report | None = None) -> None:
    """Append one seed: measured numbers from ``measured`` (default ``report``), the
    prediction ``predicted`` (``prediction`` None) or ``schemes[prediction]`` from
    ``report``."""
    measured = report if measured is None else measured
    meas = {key(layer): layer for layer in weight_layers(measured)}
    for layer in weight_layers(report):
        k = key(layer)
        s = series.setdefault(k, LayerSeries(k, layer.type))
        pred = layer.predicted if prediction is None else layer.schemes.get(prediction)
        m = meas.get(k)
        s.meas_f.append(m.forward.second_moment if m is not None and m.forward else None)
        s.meas_b.append(m.backward.var if m is not None and m.backward else None)
        s.pred_f.append(pred.forward_var if pred is not None else None)
        s.pred_b.append(pred.backward_var if pred is not None else None)
        s.basis.append(pred.basis if pred is not None else None)
        if pred is not None and pred.note and s.note is None:
            s.note = pred.note
        elif pred is None and s.note is None:
            s.note = layer.unavailable.get("predicted") or "no prediction"


def _mean(values: Sequence[float | None]) -> float | None:
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return None
    return sum(values) / len(values)


@dataclass
class Compared:
    """|log(mean measured / mean predicted)| of one layer and one direction, and the
    standard error of that log from the seeds' scatter (None with one seed)."""

    name: str
    direction: str  # "forward" | "backward"
    measured: float
    predicted: float
    log: float
    se: float | None

    @property
    def z(self) -> float | None:
        return None if not self.se else abs(self.log) / self.se


def compare_series(series: Iterable[LayerSeries]) -> tuple[list[Compared], list[str]]:
    """Per layer and direction, the comparison; and the names of layers with a missing
    or non-positive number in some seed (not compared)."""
    out, missing = [], []
    for s in series:
        for direction, meas, pred in (("forward", s.meas_f, s.pred_f),
                                      ("backward", s.meas_b, s.pred_b)):
            mm, pm = _mean(meas), _mean(pred)
            if mm is None or pm is None or mm <= 0 or pm <= 0:
                if not (direction == "backward" and _mean(s.meas_b) is None):
                    missing.append(f"{s.name} ({direction})")
                continue
            out.append(Compared(s.name, direction, mm, pm, math.log(mm / pm),
                                _log_se(meas, pred)))
    return out, missing


def _log_se(meas: Sequence[float], pred: Sequence[float]) -> float | None:
    """The standard error of log(mean m / mean p) by the delta method over seeds."""
    n = len(meas)
    if n < 2:
        return None
    mm, pm = sum(meas) / n, sum(pred) / n
    resid = [m / mm - p / pm for m, p in zip(meas, pred)]
    return statistics.stdev(resid) / math.sqrt(n)


@dataclass
class Stats:
    median_f: float | None
    max_f: float | None
    median_b: float | None
    max_b: float | None
    worst: list[Compared]
    missing: list[str]

    def passes(self, bound: float = BOUND) -> bool:
        return (self.median_f is not None and self.median_b is not None
                and self.median_f <= bound and self.median_b <= bound and not self.missing)


def stats(series: Iterable[LayerSeries]) -> Stats:
    compared, missing = compare_series(series)

    def med(direction: str) -> tuple[float | None, float | None]:
        logs = [abs(c.log) for c in compared if c.direction == direction]
        return (statistics.median(logs), max(logs)) if logs else (None, None)

    (mf, xf), (mb, xb) = med("forward"), med("backward")
    worst = sorted(compared, key=lambda c: -abs(c.log))
    return Stats(mf, xf, mb, xb, worst, missing)


def seed_series(case: Case, seeds: int | Iterable[int], scheme: str | None = None
                ) -> dict[str, LayerSeries]:
    """Per weight layer over ``seeds``: the actual init's measured and predicted
    numbers (``scheme`` None), or ``schemes[scheme]`` of the model as built against the
    measurement of its copy re-initialized with ``scheme``."""
    series: dict[str, LayerSeries] = {}
    for seed in range(seeds) if isinstance(seeds, int) else seeds:
        model = build(case, seed)
        report = probe(case, seed, model=model)
        if scheme is None:
            gather(series, report)
        else:
            gather(series, report, scheme, measured=probe(case, seed, init=scheme, model=model))
    return series


# -- coverage -------------------------------------------------------------------------------

_CAUSE = re.compile(r"(no closed form for [\w.]+"
                    r"|carried the measured (?:output|input gradient|value|gradient) "
                    r"(?:of|past) (?:an unrecorded operation|[\w.]+)"
                    r"|could not follow [^;()]+|from the chain)")


def direction_notes(note: str | None) -> dict[str, str]:
    """{"forward": ..., "backward": ...}: the parts of a prediction's note."""
    out: dict[str, str] = {}
    for part in (note or "").split("; "):
        head, sep, rest = part.partition(": ")
        if sep and head in ("forward", "backward"):
            out[head] = rest
    return out


@dataclass
class Coverage:
    weights: int
    graph: int             # basis "graph" in every seed
    closed_f: int          # graph, and nothing measured carried into the forward
    closed_b: int          # ... into the backward
    fallbacks: list[tuple[str, str | None]]  # (layer, note) without a graph prediction
    causes: dict[str, int]  # what graph-basis predictions carried, counted over layers


def coverage(series: dict[str, LayerSeries]) -> Coverage:
    graph = closed_f = closed_b = 0
    fallbacks: list[tuple[str, str | None]] = []
    causes: dict[str, int] = {}
    for s in series.values():
        if all(b == "graph" for b in s.basis):
            graph += 1
            parts = direction_notes(s.note)
            closed_f += "forward" not in parts
            closed_b += "backward" not in parts
            for text in parts.values():
                for cause in set(_CAUSE.findall(text)):
                    causes[_generic(cause)] = causes.get(_generic(cause), 0) + 1
        else:
            fallbacks.append((s.name, s.note))
    return Coverage(len(series), graph, closed_f, closed_b, fallbacks, causes)


def _generic(cause: str) -> str:
    return cause.strip()


# -- one model ------------------------------------------------------------------------------


@dataclass
class ModelResult:
    case: Case
    seeds: int
    seconds: float
    actual: Stats
    cover: Coverage
    actual_series: dict[str, LayerSeries]
    schemes: dict[str, Stats] = field(default_factory=dict)
    copies: dict[str, Stats] = field(default_factory=dict)  # the copy's own prediction
    scheme_basis: dict[str, str] = field(default_factory=dict)
    meta: Stats | None = None
    meta_cover: tuple[int, int, int] | None = None  # (weights, forward, backward) predicted
    meta_notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def run_case(case: Case, seeds: int, schemes: Sequence[str] = SCHEMES,
             meta: bool = True, log=print) -> ModelResult:
    start = time.perf_counter()
    actual: dict[str, LayerSeries] = {}
    scheme_series: dict[str, dict[str, LayerSeries]] = {s: {} for s in schemes}
    copy_series: dict[str, dict[str, LayerSeries]] = {s: {} for s in schemes}
    basis: dict[str, set[str | None]] = {s: set() for s in schemes}
    for seed in range(seeds):
        model = build(case, seed)
        report = probe(case, seed, model=model)
        gather(actual, report)
        if case.counterfactual:
            for scheme in schemes:
                copy = probe(case, seed, init=scheme, model=model)
                gather(scheme_series[scheme], report, scheme, measured=copy)
                gather(copy_series[scheme], copy)
                basis[scheme].update(layer.schemes[scheme].basis
                                     for layer in weight_layers(report)
                                     if layer.schemes.get(scheme) is not None)
        log(f"  {case.name}: seed {seed} done ({time.perf_counter() - start:.0f} s)")
    result = ModelResult(case, seeds, 0.0, stats(actual.values()), coverage(actual), actual)
    for scheme in schemes if case.counterfactual else ():
        result.schemes[scheme] = stats(scheme_series[scheme].values())
        result.copies[scheme] = stats(copy_series[scheme].values())
        result.scheme_basis[scheme] = "/".join(sorted(b or "none" for b in basis[scheme]))
    if meta and case.meta_shape is not None:
        try:
            run_meta(result)
        except Exception as exc:  # noqa: BLE001 - a bench row, not a crash
            result.errors.append(f"predict on meta: {type(exc).__name__}: {exc}")
    result.seconds = time.perf_counter() - start
    return result


def predict_meta(case: Case) -> varprobe.Report:
    """``varprobe predict bench.whole_zoo:<builder> --input-shape ...``: built on the meta
    device with its own init recorded, closed form only."""
    from varprobe.predict import predict_target

    return predict_target(case.spec, input_shape=case.meta_shape, batch_size=case.batch,
                          mode=case.mode)


def run_meta(result: ModelResult) -> None:
    report = predict_meta(result.case)
    closed = {key(layer): layer.predicted for layer in weight_layers(report)}
    series: dict[str, LayerSeries] = {}
    n = nf = nb = 0
    for k, s in result.actual_series.items():
        pred = closed.get(k)
        n += 1
        nf += pred is not None and pred.forward_var is not None
        nb += pred is not None and pred.backward_var is not None
        # the meta prediction plays "measured", the measured-mode prediction "predicted"
        series[k] = LayerSeries(k, s.type, meas_f=[getattr(pred, "forward_var", None)],
                                meas_b=[getattr(pred, "backward_var", None)],
                                pred_f=[_mean(s.pred_f)], pred_b=[_mean(s.pred_b)])
    result.meta = stats(series.values())
    result.meta_cover = (n, nf, nb)
    result.meta_notes = list(report.notes)


# -- the document -----------------------------------------------------------------------------


def fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def verdict(s: Stats | None, extra_ok: bool = True) -> str:
    if s is None:
        return "–"
    return "pass" if s.passes() and extra_ok else "**FAIL**"


def worst_text(s: Stats, k: int = 2) -> str:
    items = []
    for c in s.worst[:k]:
        z = "" if c.z is None else f", {c.z:.0f}σ"
        way = "fwd" if c.direction == "forward" else "bwd"
        items.append(f"{c.name} {way} {num(c.measured)}/{num(c.predicted)}{z}")
    return "; ".join(items)


def machine_facts() -> list[str]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        lscpu = ""
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    get = lambda name: fields.get(name, "?").strip()  # noqa: E731
    cpu = (f"{get('Model name')} (family {get('CPU family')}, model {get('Model')}), "
           f"{get('CPU(s)')} logical CPUs, {get('Thread(s) per core')} thread(s) per core"
           + (f", {get('Hypervisor vendor')} guest" if "Hypervisor vendor" in fields else "")
           if fields else f"{platform.processor()}, {os.cpu_count()} logical CPUs")
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return [f"CPU (lscpu): {cpu}",
            f"torch {torch.__version__}, intra-op threads {torch.get_num_threads()} "
            f"(OMP_NUM_THREADS={threads}); varprobe {varprobe.__version__}; "
            f"Python {platform.python_version()}",
            "load average at the end (a machine shared with other jobs): "
            + " / ".join(f"{x:.2f}" for x in os.getloadavg())]


def document(results: list[ModelResult], seeds: int, schemes: Sequence[str], command: str,
             seconds: float) -> str:
    lines = [
        "# Whole-model accuracy: measured against predicted",
        "",
        "Generated by `bench/whole_models.py`; do not edit by hand.",
        "",
        f"    {command}",
        "",
        *[f"- {fact}" for fact in machine_facts()],
        f"- {seeds} seeds per model (seed s: weights drawn under `torch.manual_seed(s)`, "
        f"input from its own stream, cotangent N(0,1) from `probe(seed=s)`; a scheme's "
        f"copy drawn by `probe(init=...)` from s); total {seconds / 60:.1f} min",
        "",
        "Per weight layer, |log(mean over seeds of the measured / mean of the predicted)|: "
        "forward E[y²] (`forward.second_moment` against `predicted.forward_var`) and "
        "backward Var[dL/dy] (`backward.var` against `predicted.backward_var`). `med`/`max` "
        f"over the model's weight layers. The bound is median ≤ {BOUND} both ways with every "
        "weight layer on the graph basis. `graph` = weight layers whose `predicted.basis` is "
        "`graph` in every seed; `closed f/b` = those of them whose note says nothing "
        "measured was carried into the forward / backward prediction (attention, pooling "
        "and the like carry their measured value on the graph basis too). `worst`: layer, "
        "direction, measured/predicted, and |log| in units of its standard error over the "
        "seeds (the delta method; large = not seed noise).",
        "",
        "## (a) Actual init",
        "",
        "| model | what | weights | graph | closed f/b | no pred | med f | max f | med b | "
        "max b | bound | worst |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c, a = r.cover, r.actual
        ok = c.graph == c.weights
        lines.append(
            f"| {r.case.name} | {r.case.what} | {c.weights} | {c.graph}/{c.weights} | "
            f"{c.closed_f}/{c.closed_b} | {len(a.missing)} | {fmt(a.median_f)} | {fmt(a.max_f)} | "
            f"{fmt(a.median_b)} | {fmt(a.max_b)} | {verdict(a, ok)} | {worst_text(a)} |")
    lines += ["", "Layers without a prediction (`no pred`: forward or backward is null in some "
              "seed) or without a graph one, and what graph-basis predictions carried "
              "(layers counted per cause):", ""]
    for r in results:
        c = r.cover
        if not c.fallbacks and not c.causes and not r.actual.missing:
            continue
        lines.append(f"- **{r.case.name}**")
        for missing in r.actual.missing:
            name = missing.split(" (")[0]
            lines.append(f"  - `{missing}`: no prediction; "
                         f"{r.actual_series[name].note or 'no note'}")
        for name, note in c.fallbacks:
            lines.append(f"  - `{name}` (not graph): {note}")
        for cause, count in sorted(c.causes.items(), key=lambda kv: -kv[1]):
            lines.append(f"  - graph basis, {count} layer(s): {cause}")
    if any(r.schemes for r in results):
        lines += [
            "", "## (b) Counterfactuals", "",
            "`schemes[s]` from the probe of the model as built, against the measurement of "
            "the re-initialized copy `probe(model, init=s)`, seed means. `copy's own`: the "
            "copy's `predicted` against the same measurement, i.e. the walk once it sees "
            "the new weights; where it passes and the scheme column fails, the scheme "
            "walk is at fault, not an op rule. `basis`: what `schemes[s].basis` says. "
            "The eval-mode copies keep the running statistics calibrated for the "
            "original weights (`probe(init=...)` re-draws only Linear/Conv weights), "
            "and so do the scheme predictions.",
            "",
            "| model | scheme | basis | med f | max f | med b | max b | bound | worst | "
            "copy's own med f / med b |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results:
            for scheme, s in r.schemes.items():
                own = r.copies[scheme]
                lines.append(
                    f"| {r.case.name} | {scheme} | {r.scheme_basis[scheme]} | "
                    f"{fmt(s.median_f)} | {fmt(s.max_f)} | {fmt(s.median_b)} | "
                    f"{fmt(s.max_b)} | {verdict(s)} | {worst_text(s)} | "
                    f"{fmt(own.median_f)} / {fmt(own.median_b)} |")
    metas = [r for r in results if r.meta is not None or r.errors]
    if metas:
        lines += [
            "", "## (c) predict on meta against the measured-mode prediction", "",
            "`varprobe predict` (the builder run on the meta device, its init recorded, "
            "input E[x²] = 1 and a unit cotangent) against the seed mean of the "
            "measured-mode `predicted` of (a). Coverage: weight layers with a forward / "
            "backward prediction on meta.",
            "",
            "| model | weights | coverage f | coverage b | med f | max f | med b | max b | "
            "worst |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in metas:
            if r.meta is None:
                lines.append(f"| {r.case.name} | – | – | – | – | – | – | – | "
                             f"{'; '.join(r.errors)} |")
                continue
            n, nf, nb = r.meta_cover
            m = r.meta
            lines.append(f"| {r.case.name} | {n} | {nf}/{n} | {nb}/{n} | {fmt(m.median_f)} | "
                         f"{fmt(m.max_f)} | {fmt(m.median_b)} | {fmt(m.max_b)} | "
                         f"{worst_text(m)} |")
        lines += ["", "Notes of the meta reports:", ""]
        for r in metas:
            notes = [n for n in r.meta_notes if not n.startswith("input E[x²]")]
            if notes:
                lines.append(f"- **{r.case.name}**: " + " · ".join(notes[:4])
                             + (f" · (+{len(notes) - 4} more)" if len(notes) > 4 else ""))
    lines += ["", "## Runtime", "", "| model | seconds |", "|---|---|"]
    lines += [f"| {r.case.name} | {r.seconds:.0f} |" for r in results]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.whole_models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--models", default=",".join(c.name for c in whole_zoo.CASES))
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--no-meta", action="store_true")
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    schemes = [s for s in args.schemes.split(",") if s]
    command = "python -m bench.whole_models " + " ".join(argv if argv is not None
                                                         else sys.argv[1:])
    start = time.perf_counter()
    results = []
    for name in names:
        case = whole_zoo.case(name)
        print(f"{name}: {case.what}", flush=True)
        results.append(run_case(case, args.seeds, schemes, meta=not args.no_meta,
                                log=lambda s: print(s, flush=True)))
        r = results[-1]
        print(f"  actual med f {fmt(r.actual.median_f)} b {fmt(r.actual.median_b)}, graph "
              f"{r.cover.graph}/{r.cover.weights}, {r.seconds:.0f} s", flush=True)
    text = document(results, args.seeds, schemes, command.strip(),
                    time.perf_counter() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
