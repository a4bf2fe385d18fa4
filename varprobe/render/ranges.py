"""Number ranges in the terminal, in Markdown and in the figure: the columns behind
``--ranges``, the summary lines (format, loss scale range, autocast) and the panel of
each layer's scale against the formats' ranges."""

from __future__ import annotations

import math
from collections.abc import Callable

from rich.text import Text

from varprobe.range_flags import GRADIENTS, fits
from varprobe.report import Layer, Report


def _amax(layer: Layer, key: str) -> float | None:
    row = layer.ranges.get(key) or layer.ranges.get(f"predicted_{key}") or {}
    return row.get("amax")


def _log2(value: float | None) -> str:
    return "" if not value else f"{math.log2(value):.1f}"


def _underflow(report: Report) -> Callable[[Layer], str]:
    def cell(layer: Layer) -> str:
        values = [f["underflow"] for key in ("forward", *GRADIENTS)
                  if (f := fits(report, layer, key)) and f["underflow"] is not None]
        return f"{100 * max(values):.3g}" if values else ""
    return cell


def cells(report: Report) -> list[tuple[str, Callable[[Layer], str], int]]:
    """(header, cell, keep) of the range columns: log2 of the largest |y| and |g|, and
    the worst underflow % in the checked format."""
    out = [("log2|y|", lambda layer: _log2(_amax(layer, "forward")), 7),
           ("log2|g|", lambda layer: _log2(_amax(layer, "backward")), 7)]
    fmt = (report.precision or {}).get("format")
    if fmt:
        out.append((f"{fmt} under%", _underflow(report), 7))
    return out


def _pow(value: float | None) -> str:
    return "-" if not value else f"2^{round(math.log2(value))}"


def summary(report: Report) -> list[str]:
    """Plain sentences: the format checked, the loss scale, autocast's parting."""
    p = report.precision or {}
    out = []
    if p.get("format"):
        missing = p.get("not_predicted")
        head = (f"{p['format']} ({p['basis']}, {p['tensors']} tensors"
                f"{f'; {missing} without a prediction, see the notes' if missing else ''})")
        scale = p.get("loss_scale")
        if p.get("scaling"):
            out.append(f"{head}: per-tensor amax scaling, power-of-two scales")
        elif scale and scale["fits"]:
            out.append(f"{head}: loss scales {_pow(scale['low'])}..{_pow(scale['high'])} keep "
                       f"every gradient in range, recommended {_pow(scale['recommended'])}; "
                       f"gradients checked under {_pow(scale['used'])}"
                       f"{' (--loss-scale)' if scale['given'] else ''}")
        elif scale:
            out.append(f"{head}: no single loss scale fits: {scale['low_set_by']} needs "
                       f"at least {_pow(scale['low'])}, {scale['high_set_by']} overflows "
                       f"above {_pow(scale['high'])}; gradients checked under "
                       f"{_pow(scale['used'])}")
    amp = p.get("autocast")
    if amp:
        for direction in ("forward", "backward"):
            d = amp[direction]
            worst = d["max_relative_difference"]
            out.append(f"autocast {amp['dtype']} vs float32, {direction}: "
                       + (f"{len(d['parted'])} layer(s) part by more than "
                          f"{amp['tolerance']:.2g}, first {d['first']}"
                          if d["parted"] else f"within {amp['tolerance']:.2g} everywhere")
                       + (f" (largest relative difference {worst:.3g})"
                          if worst is not None else ""))
    return out


def lines(report: Report) -> list[Text]:
    return [Text(line, style="dim") for line in summary(report)]


def markdown(report: Report) -> list[str]:
    """A "Number formats" section: the summary and each flagged tensor."""
    text = summary(report)
    if not text:
        return []
    out = ["", "## Number formats", ""] + [f"- {line}" for line in text]
    rows = [(layer, f) for layer in report.layers for f in layer.flags
            if f.code in ("overflow", "underflow", "loss_scale_conflict")]
    if rows:
        out += ["", "| layer | flag | what |", "|---|---|---|"]
        out += [f"| `{layer.label}` | {f.severity} {f.code} | "
                f"{' '.join(f.message.split()).replace('|', chr(92) + '|')} |"
                for layer, f in rows]
    return out
