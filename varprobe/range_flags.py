"""Number-format flags: which tensors overflow or flush to zero in the format the user
trains in, and the loss scale that keeps every gradient in range.

Pure, like diagnose (which calls ``annotate``): it reads the range rows the probe
measured (``Layer.ranges``) or, where nothing was measured (``varprobe predict``), the
rows ``headroom`` predicts from each layer's predicted second moment. Checked, once
each: every layer's output and output gradient, and the weight and weight gradient of
weight layers (a layer's input is the previous layer's output).

Gradients are checked under a loss scale: the one given, else the middle of the range
of powers of two under which no gradient overflows and none flushes more than the
``underflow`` threshold (a dynamic GradScaler has to find a scale in that range). fp8
tensors are checked with Transformer Engine's per-tensor amax scaling (power-of-two
scales), under which nothing overflows and a tensor underflows when its spread is
wider than the format's range.
"""

from __future__ import annotations

import math
from typing import Any

from varprobe import headroom
from varprobe.precision import FORMATS, SCALED, NumberFormat, Ranges, loss_scale_range
from varprobe.report import Flag, Layer, Report

TENSORS = {"forward": "output", "backward": "output gradient", "weight": "weight",
           "weight_grad": "weight gradient"}
GRADIENTS = ("backward", "weight_grad")
PREDICTED = {"forward": "forward_var", "backward": "backward_var"}


def annotate(report: Report, underflow: float, skip: set[int]) -> None:
    """Flags on the layers and ``report.precision``, when a format was asked for."""
    options = report.settings.get("precision") or {}
    if not options:
        return
    _predictions(report)
    if not options.get("format"):
        return
    fmt = FORMATS[options["format"]]
    measured = any(layer.ranges.get(k) for layer in report.layers for k in TENSORS)
    rows = [(i, key, r) for i, layer in enumerate(report.layers) if i not in skip
            for key, r in _rows(layer, measured).items()]
    summary: dict[str, Any] = {"format": fmt.name, "basis": "measured" if measured else
                               f"predicted ({headroom.MODEL} tail model)",
                               "tensors": len(rows), "loss_scale": None}
    if not measured:  # outputs and output gradients without a predicted second moment
        summary["not_predicted"] = 2 * (len(report.layers) - len(skip)) - len(rows)
    report.precision = {**(report.precision or {}), **summary}
    missing = _unrepresentable(fmt)
    if missing and missing not in report.notes:
        report.notes.append(missing)
    if fmt.name in SCALED:
        report.precision["scaling"] = "per-tensor amax (power-of-two scales)"
        for i, key, r in rows:
            _check(report.layers[i], key, r, fmt, r.amax_scale(fmt) or 1.0, underflow, measured)
    else:
        scale, hint = _loss_scale(report, rows, fmt, underflow, options.get("loss_scale"))
        for i, key, r in rows:
            _check(report.layers[i], key, r, fmt, scale if key in GRADIENTS else 1.0,
                   underflow, measured, hint)
    for i in sorted({i for i, _, _ in rows}):
        _one_per_code(report.layers[i])


def _one_per_code(layer: Layer) -> None:
    """A layer's output and weight gradients flagged for the same code become one flag
    (the worst severity, the messages joined), so that the layer is named once."""
    for code in ("overflow", "underflow"):
        group = [f for f in layer.flags if f.code == code]
        if len(group) < 2:
            continue
        worst = min((f.severity for f in group), key=("error", "warning", "info").index)
        joined = Flag(code, worst, "; ".join(f.message for f in group),
                      max(f.value for f in group))
        layer.flags = [f for f in layer.flags if f.code != code] + [joined]


def fits(report: Report, layer: Layer, key: str) -> dict[str, float | None] | None:
    """The fractions one tensor was checked with (the format, the scale it was checked
    under), measured or predicted; None when the report has no format or no row."""
    p = report.precision or {}
    if not p.get("format"):
        return None
    fmt = FORMATS[p["format"]]
    row = _rows(layer, p.get("basis") == "measured").get(key)
    if row is None:
        return None
    if fmt.name in SCALED:
        return row.fits(fmt, row.amax_scale(fmt) or 1.0)
    return row.fits(fmt, p["loss_scale"]["used"] if key in GRADIENTS else 1.0)


def _unrepresentable(fmt: NumberFormat) -> str | None:
    """A note when the installed torch has no dtype for ``fmt``: the fractions are
    arithmetic on the format's definition and need none, but nothing can be cast to it."""
    import torch

    if hasattr(torch, fmt.torch_dtype):
        return None
    return (f"torch {torch.__version__} has no torch.{fmt.torch_dtype}: {fmt.name} ranges "
            "are computed from the format's definition; casting to it is not possible here")


def _predictions(report: Report) -> None:
    """Each layer's predicted amax and smallest non-zero |x| (``headroom``), beside the
    measured rows; a field of its own so that the measured ones stay measured."""
    for layer in report.layers:
        numel = math.prod(layer.shape) if layer.shape else None
        for key in PREDICTED:
            found = headroom.extremes(_moment(layer, key), numel)
            if found is not None:
                layer.ranges[f"predicted_{key}"] = {
                    "model": headroom.MODEL, "second_moment": _moment(layer, key),
                    "numel": numel, "amax": found[0], "min_nonzero": found[1],
                    "log2_amax": math.log2(found[0]) if found[0] else None}


def _moment(layer: Layer, key: str) -> float | None:
    return getattr(layer.predicted, PREDICTED[key], None) if layer.predicted else None


def _rows(layer: Layer, measured: bool) -> dict[str, Ranges]:
    if measured:
        return {k: Ranges.from_dict(layer.ranges[k]) for k in TENSORS if layer.ranges.get(k)}
    numel = math.prod(layer.shape) if layer.shape else None
    out = {}
    for key in PREDICTED:
        row = headroom.predicted(_moment(layer, key), numel)
        if row is not None:
            out[key] = row
    return out


def _label(layer: Layer, key: str) -> str:
    return f"{layer.label} {TENSORS[key]}"


def _loss_scale(report: Report, rows: list[tuple[int, str, Ranges]], fmt: NumberFormat,
                underflow: float, given: float | None) -> tuple[float, str]:
    """The scale gradients are checked under, and what to tell a flagged gradient; the
    range goes into report.precision and a conflict becomes an error on the two layers
    that disagree."""
    grads = {(i, key): r for i, key, r in rows if key in GRADIENTS}
    span = loss_scale_range({_label(report.layers[i], k): r for (i, k), r in grads.items()},
                            fmt, underflow)
    used = given or (span.recommended if span.fits else span.high) or 1.0
    report.precision["loss_scale"] = {"given": given, "used": used, **span.to_dict()}
    if span.fits:
        return used, (f"use a loss scale in {_pow(span.low)}..{_pow(span.high)} "
                      f"(recommended {_pow(span.recommended)})")
    text = (f"no single {fmt.name} loss scale fits every gradient: "
            f"{span.low_set_by} needs at least {_pow(span.low)} (or it flushes more than "
            f"{underflow:.0%}), {span.high_set_by} overflows above {_pow(span.high)}; "
            "train in bf16, or rescale the layers between them (a norm, a smaller init)")
    if given is None:
        owners = {_label(report.layers[i], k): report.layers[i] for i, k in grads}
        for label in dict.fromkeys((span.low_set_by, span.high_set_by)):
            owners[label].flags.append(Flag("loss_scale_conflict", "error", text))
    return used, ("no single loss scale fits every gradient"
                  + ("" if given else " (see loss_scale_conflict)"))


def _check(layer: Layer, key: str, r: Ranges, fmt: NumberFormat, scale: float,
           underflow: float, measured: bool, hint: str = "") -> None:
    """``hint``: what to do about a gradient's loss scale (the range, or a conflict)."""
    fits = r.fits(fmt, scale)
    what = f"{'' if measured else 'predicted: '}{TENSORS[key]}"
    under = f" under {'amax scale' if fmt.name in SCALED else 'loss scale'} {_pow(scale)}" \
        if scale != 1.0 else ""
    if fits["overflow"]:
        layer.flags.append(Flag("overflow", "error", (
            f"{what} overflows {fmt.name}{under}: {fits['overflow']:.3g} of its elements "
            f"reach {fmt.overflow_cut / scale:.4g} (|x| max {r.amax:.3g}); "
            f"{hint if key in GRADIENTS and hint else _overflow_advice(key, r, fmt)}"),
            fits["overflow"]))
    if not fits["underflow"]:
        return
    whole = not r.survives(fmt, scale)
    if whole or fits["underflow"] > underflow:
        layer.flags.append(Flag("underflow", "error" if whole else "warning", (
            f"{what}: {'every non-zero element' if whole else format(fits['underflow'], '.3g')}"
            f"{'' if whole else ' of its elements'} flush{'es' if whole else ''} to zero in "
            f"{fmt.name}{under} (|x| <= {2.0 ** fmt.flush_exponent / scale:.3g}; "
            f"|x| max {r.amax:.3g}); {_underflow_advice(key, r, fmt, hint)}"), fits["underflow"]))


def _overflow_advice(key: str, r: Ranges, fmt: NumberFormat) -> str:
    if key in GRADIENTS:  # fp8 gradients are amax-scaled and never overflow
        return "train in bf16"
    return ("keep this layer in float32 or bf16, or bring its scale down (a norm before "
            "it, a smaller init)")


def _underflow_advice(key: str, r: Ranges, fmt: NumberFormat, hint: str) -> str:
    if fmt.name in SCALED:
        spread = math.log2(r.amax / r.min_nonzero) if r.amax and r.min_nonzero else math.nan
        return (f"its spread (2^{spread:.0f}) is wider than {fmt.name}'s range "
                f"(2^{fmt.range_binades:.0f}); keep it in bf16, or use e5m2 for gradients")
    if key in GRADIENTS:
        return f"{hint}, or train in bf16"
    return "keep this layer in float32 or bf16, or raise its scale (init, a norm)"


def _pow(value: float | None) -> str:
    if value is None:
        return "-"
    return f"2^{round(math.log2(value))}"
