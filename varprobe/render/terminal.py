"""The rich terminal table and verdict."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from varprobe.report import Layer, Report

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
SEVERITY_SYMBOL = {"error": "✗", "warning": "!", "info": "i"}


def num(value: float | None) -> str:
    """Two-to-three significant digits; scientific outside [1e-2, 1e3]."""
    if value is None:
        return "—"
    if value != value:  # NaN
        return "nan"
    if value == 0:
        return "0"
    if abs(value) >= 1e3 or abs(value) < 1e-2:
        return f"{value:.2e}"
    return f"{value:.3g}"


def ratio(measured: float | None, predicted: float | None) -> str:
    if measured is None or not predicted:
        return "—"
    return f"{measured / predicted:.2f}"


def header(report: Report) -> Text:
    s, i = report.settings, report.input
    text = Text()
    text.append(f"varprobe {report.varprobe_version}", style="bold")
    text.append(f" · {report.model.target} · {report.model.class_} "
                f"({_params(report.model.parameters)} params)\n")
    shape = i.shape if not isinstance(i.shape, dict) else ", ".join(
        f"{k}={v}" for k, v in i.shape.items())
    second = f", E[x²]={num(i.second_moment)}" if i.second_moment is not None else ""
    text.append(f"input {shape} {i.dtype}{second} · seed {s.get('seed')} · "
                f"{s.get('mode')} mode · init {s.get('init')} · "
                f"cotangent {_grad_label(s.get('grad'))}", style="dim")
    if s.get("trials", 1) > 1:
        text.append(f" · {s['trials']} trials (mean, 95% interval)", style="dim")
    return text


def _grad_label(grad: str | None) -> str:
    return {"randn": "N(0,1)", "loss": "loss(output)", "given": "given"}.get(grad, str(grad))


def _params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def shown_layers(report: Report, all_layers: bool) -> list[Layer]:
    if all_layers:
        return report.layers
    return [layer for layer in report.layers if layer.kind == "weight" or layer.flags]


def table(report: Report, *, all_layers: bool = False, compare: list[str] = ()) -> Table:
    t = Table(box=None, header_style="bold", pad_edge=False)
    for name, justify in (("#", "right"), ("layer", "left"), ("type", "left"),
                          ("fan_in", "right"), ("n·Var[w]", "right"), ("act", "left"),
                          ("gain", "right"), ("fwd E[y²]", "right"), ("pred", "right"),
                          ("meas/pred", "right")):
        t.add_column(Text(name), justify=justify)  # Text: "[w]" is not markup
    for scheme in compare:
        t.add_column(scheme, justify="right")
    for name in ("bwd Var", "pred", "meas/pred", "flags"):
        t.add_column(Text(name), justify="left" if name == "flags" else "right")
    for layer in shown_layers(report, all_layers):
        t.add_row(*_row(layer, compare))
    return t


def _row(layer: Layer, compare: list[str]) -> list[str | Text]:
    fwd = layer.forward.second_moment if layer.forward else None
    bwd = layer.backward.var if layer.backward else None
    pred = layer.predicted
    nvar = (layer.fan_in * layer.weight_var
            if layer.fan_in is not None and layer.weight_var is not None else None)
    flags = Text(" ".join(f"{SEVERITY_SYMBOL[f.severity]} {f.code}" for f in layer.flags))
    if layer.flags:
        flags.stylize(SEVERITY_STYLE[_worst(layer)])
    cells: list[str | Text] = [
        str(layer.index), layer.label, layer.type,
        str(layer.fan_in) if layer.fan_in is not None else "",
        num(nvar) if nvar is not None else "", layer.activation or "",
        num(layer.gain) if layer.gain is not None else "",
        num(fwd), num(pred.forward_var if pred else None),
        ratio(fwd, pred.forward_var if pred else None),
    ]
    for scheme in compare:
        s = layer.schemes.get(scheme)
        cells.append(num(s.forward_var if s else None))
    cells += [num(bwd), num(pred.backward_var if pred else None),
              ratio(bwd, pred.backward_var if pred else None), flags]
    return cells


def _worst(layer: Layer) -> str:
    order = ["error", "warning", "info"]
    return min((f.severity for f in layer.flags), key=order.index)


def verdict(report: Report) -> Text:
    s = report.summary
    text = Text()
    if s.healthy:
        text.append("✓ HEALTHY", style="bold green")
    else:
        text.append("✗ UNHEALTHY", style="bold red")
    text.append(f" · {s.errors} errors · {s.warnings} warnings")
    if s.verdict:
        text.append(f"\n  {s.verdict}")
    for note in report.notes:
        text.append(f"\n  note: {note}", style="dim")
    return text


def render(report: Report, console: Console | None = None, *, all_layers: bool = False,
           compare: list[str] = ()) -> None:
    console = console or Console()
    body = table(report, all_layers=all_layers, compare=list(compare))
    if not console.is_terminal:  # piped or logged: never truncate the numbers
        wide = console.options.update_width(10_000)
        console.width = max(console.width, console.measure(body, options=wide).maximum)
    console.print(header(report))
    console.print()
    console.print(body)
    console.print()
    console.print(verdict(report))
