"""A Markdown report for pull-request comments and CI job summaries.

The verdict first, then the fix, the figure (when one was written), the flags grouped
by code, and the per-layer table. GitHub-flavoured: long tables fold into <details>.
"""

from __future__ import annotations

from collections import defaultdict

from varprobe.diagnose import SEVERITIES as SEVERITY_ORDER
from varprobe.render import ranges
from varprobe.render.terminal import SEVERITY_SYMBOL, num, ratio, shown_layers
from varprobe.report import Flag, Layer, Report

FOLD_ROWS = 40  # longer tables are folded so that the verdict stays on screen
NAMES_PER_FLAG = 3
HEALTHY, UNHEALTHY = "✓ HEALTHY", "✗ UNHEALTHY"


def state(report: Report) -> str:
    """HEALTHY, UNHEALTHY, or "not diagnosed" when the report carries no diagnosis
    (written before flags existed, or by hand)."""
    s = report.summary
    if s.verdict is None and not (s.errors or s.warnings) and "thresholds" not in report.settings:
        return "not diagnosed"
    return HEALTHY if s.healthy else UNHEALTHY


def model_name(report: Report) -> str:
    """"xavier_mlp.py · Sequential": the file says which model, the class what it is."""
    where = report.model.target.replace("\\", "/").rsplit("/", 1)[-1]
    return report.model.class_ if where == report.model.class_ else (
        f"{where} · {report.model.class_}")


def markdown(report: Report, image: str | None = None) -> str:
    """The report as Markdown; ``image`` is the figure's path relative to the document."""
    lines = _head(report)
    if image:
        lines += [f"![varprobe: {report.model.class_}]({image.replace(' ', '%20')})", ""]
    lines += _flags(report)
    lines += _table(report)
    lines += ranges.markdown(report)
    return "\n".join(lines).rstrip() + "\n"


def _head(report: Report) -> list[str]:
    s, word = report.summary, state(report)
    lines = [f"## {word} · {model_name(report)} · {s.counts()}",
             "",
             _settings(report), ""]
    if s.verdict:
        lines += [f"> {line}" if line.strip() else ">" for line in s.verdict.splitlines()]
        lines.append("")
    if s.cause:
        lines += [f"**Cause:** {_cell(s.cause)}", ""]
    if s.fix is not None:
        lines += [f"**Fix** ({s.fix.scheme} init; predicted end-to-end ratio "
                  f"{before_after(s.fix.before, s.fix.after)}):", "", "```python",
                  s.fix.code, "```", ""]
    elif s.verdict is None and (s.forward_ratio, s.backward_ratio) != (None, None):
        # a diagnosis states these in its verdict
        lines += [f"Predicted end-to-end ratio: forward {num(s.forward_ratio)}, "
                  f"backward {num(s.backward_ratio)}", ""]
    lines += [f"*note: {_cell(note)}*" for note in report.notes]
    return lines + ([""] if report.notes else [])


def before_after(before: list[float | None], after: list[float | None]) -> str:
    return ", ".join(f"{name} {num(b)} → {num(a)}"
                     for name, b, a in zip(("forward", "backward"), before, after))


def _settings(report: Report) -> str:
    st, i, m = report.settings, report.input, report.model
    parts = [f"`{m.target}`", f"{m.parameters:,} parameters"]
    if i.shape is not None:
        shape = (tuple(i.shape) if isinstance(i.shape, list)
                 else ", ".join(f"{k}={tuple(v)}" for k, v in i.shape.items()))
        parts.append(f"input {shape} {i.dtype or ''}".rstrip())
    if i.second_moment is not None:
        parts.append(f"E[x²] {num(i.second_moment)}")
    parts += [f"seed {st.get('seed')}", f"batch {st.get('batch_size')}",
              f"{st.get('mode')} mode", f"init {st.get('init')}"]
    if (st.get("trials") or 1) > 1:
        parts.append(f"{st['trials']} trials (mean, 95% interval)")
    parts.append(f"varprobe {report.varprobe_version}")
    return " · ".join(parts)


def _flags(report: Report) -> list[str]:
    """One row per (severity, code): a 300-layer model's 299 identical warnings fit."""
    groups: dict[tuple[str, str], list[tuple[Layer, Flag]]] = defaultdict(list)
    for layer in report.layers:
        for flag in layer.flags:
            groups[(flag.severity, flag.code)].append((layer, flag))
    if not groups:
        return []
    order = sorted(groups, key=lambda k: (_rank(k[0]), k[1]))
    lines = ["### Flags", "", "| severity | flag | layers | first message |",
             "|---|---|---|---|"]
    for severity, code in order:
        hits = groups[(severity, code)]
        names = ", ".join(f"`{layer.label}`" for layer, _ in hits[:NAMES_PER_FLAG])
        if len(hits) > NAMES_PER_FLAG:
            names = f"{len(hits)}: {names}, …"
        lines.append(f"| {SEVERITY_SYMBOL.get(severity, '')} {severity} | `{code}` | {names} | "
                     f"{_cell(hits[0][1].message)} |")
    return [*lines, ""]


def _rank(severity: str) -> int:
    return SEVERITY_ORDER.index(severity) if severity in SEVERITY_ORDER else len(SEVERITY_ORDER)


def _table(report: Report) -> list[str]:
    layers = shown_layers(report, all_layers=False)
    if not layers:
        return []
    schemes = [name for name in ("xavier", "he") if any(name in la.schemes for la in layers)]
    header = ["#", "layer", "type", "fan_in", "n·Var[w]", "act", "gain", "fwd E[y²]", "pred",
              "meas/pred", *schemes, "bwd Var", "pred", "meas/pred", "flags"]
    align = ["---:", "---", "---", "---:", "---:", "---", "---:", "---:", "---:", "---:",
             *["---:"] * len(schemes), "---:", "---:", "---:", "---"]
    rows = [_row(layer, schemes) for layer in layers]
    table = [_line(header), _line(align), *(_line(row) for row in rows)]
    weights = sum(layer.kind == "weight" for layer in layers)
    title = f"Layers: {weights} with weights" + (
        f", {len(layers) - weights} other flagged" if len(layers) > weights else "")
    if len(rows) > FOLD_ROWS:
        return [f"<details><summary>{title}</summary>", "", *table, "", "</details>", ""]
    return [f"### {title}", "", *table, ""]


def _row(layer: Layer, schemes: list[str]) -> list[str]:
    fwd = layer.forward.second_moment if layer.forward else None
    bwd = layer.backward.var if layer.backward else None
    pred = layer.predicted
    pred_fwd = pred.forward_var if pred else None
    pred_bwd = pred.backward_var if pred else None
    nvar = (layer.fan_in * layer.weight_var
            if layer.fan_in is not None and layer.weight_var is not None else None)
    flags = " ".join(f"{SEVERITY_SYMBOL.get(f.severity, '')} {f.code}"
                     for f in sorted(layer.flags, key=lambda f: _rank(f.severity)))
    return [str(layer.index), f"`{layer.label}`", layer.type,
            "" if layer.fan_in is None else str(layer.fan_in),
            "" if nvar is None else num(nvar), layer.activation or "",
            "" if layer.gain is None else num(layer.gain),
            num(fwd), num(pred_fwd), ratio(fwd, pred_fwd),
            *(num(_scheme(layer, name)) for name in schemes),
            num(bwd), num(pred_bwd), ratio(bwd, pred_bwd), flags]


def _scheme(layer: Layer, name: str) -> float | None:
    prediction = layer.schemes.get(name)
    return prediction.forward_var if prediction else None


def _line(cells: list[str]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _cell(text: str) -> str:
    """Table-safe: a pipe would end the cell, a newline the row."""
    return " ".join(str(text).split()).replace("|", "\\|")
