"""A Markdown report for pull-request comments and CI job summaries."""

from __future__ import annotations

from varprobe.render.terminal import num, ratio
from varprobe.report import Report


def markdown(report: Report) -> str:
    s = report.summary
    lines = [f"## varprobe · {report.model.target} · {report.model.class_}", "",
             f"**{'✓ HEALTHY' if s.healthy else '✗ UNHEALTHY'}** · {s.errors} errors · "
             f"{s.warnings} warnings", ""]
    lines += ["| # | layer | type | fwd E[y²] | pred | meas/pred | bwd Var | flags |",
              "|---:|---|---|---:|---:|---:|---:|---|"]
    for layer in report.weight_layers:
        fwd = layer.forward.second_moment if layer.forward else None
        pred = layer.predicted.forward_var if layer.predicted else None
        bwd = layer.backward.var if layer.backward else None
        flags = ", ".join(f.code for f in layer.flags)
        lines.append(f"| {layer.index} | `{layer.label}` | {layer.type} | {num(fwd)} | "
                     f"{num(pred)} | {ratio(fwd, pred)} | {num(bwd)} | {flags} |")
    return "\n".join(lines) + "\n"
