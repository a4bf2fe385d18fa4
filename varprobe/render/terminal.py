"""The rich terminal table and verdict."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from varprobe.diagnose import SEVERITIES
from varprobe.render.ci import SYMBOL as SEVERITY_SYMBOL
from varprobe.render.ranges import cells as range_cells
from varprobe.render.ranges import lines as range_lines
from varprobe.report import Layer, Report

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


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
    run = (f"seed {s.get('seed')} · {s.get('mode')} mode · init {s.get('init')} · "
           f"cotangent {_grad_label(s.get('grad'))}")
    if s.get("source") == "closed-form":  # varprobe predict: nothing was run
        run = (f"closed-form (no input, no cotangent; E[x²]=1 and unit cotangent assumed) · "
               f"{s.get('mode')} mode · init {s.get('init')}")
    text.append(f"input {shape} {i.dtype}{second} · {run}", style="dim")
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


@dataclass(frozen=True)
class Column:
    """A table column; in a narrow terminal the lowest ``keep`` goes first."""

    header: str
    cell: Callable[[Layer], str | Text]
    keep: int
    justify: str = "right"


def _forward(layer: Layer) -> float | None:
    return layer.forward.second_moment if layer.forward else None


def _backward(layer: Layer) -> float | None:
    return layer.backward.var if layer.backward else None


def _pred(layer: Layer, field: str) -> float | None:
    return getattr(layer.predicted, field) if layer.predicted else None


def _nvar(layer: Layer) -> str:
    if layer.fan_in is None or layer.weight_var is None:
        return ""
    return num(layer.fan_in * layer.weight_var)


def _over_reference(layer: Layer) -> str:
    """The input's E[x²] over its reference's: the number the forward verdict judges."""
    m2 = layer.input.second_moment if layer.input else None
    ref = layer.reference_second_moment
    if m2 is None or not ref or layer.reference == f"{layer.label} (input)":
        return ""
    return num(m2 / ref)


def _flags(layer: Layer) -> Text:
    text = Text(" ".join(f"{SEVERITY_SYMBOL[f.severity]} {f.code}" for f in layer.flags))
    if layer.flags:
        text.stylize(SEVERITY_STYLE[_worst(layer)])
    return text


ESSENTIAL = 9  # never dropped


def columns(compare: list[str] = (), extra: list[Column] = ()) -> list[Column]:
    essential = ESSENTIAL
    schemes = [Column(name, lambda layer, name=name: num(
        layer.schemes[name].forward_var if name in layer.schemes else None), 7)
        for name in compare]
    return [
        Column("#", lambda layer: str(layer.index), essential),
        Column("layer", lambda layer: layer.label, essential, "left"),
        Column("type", lambda layer: layer.type, 1, "left"),
        Column("fan_in", _fan_in, 4),
        Column("n·Var[w]", _nvar, 5),
        Column("act", lambda layer: layer.activation or "", 3, "left"),
        Column("gain", lambda layer: "" if layer.gain is None else num(layer.gain), 2),
        Column("x²/ref", _over_reference, 7),
        Column("fwd E[y²]", lambda layer: num(_forward(layer)), essential),
        Column("pred", lambda layer: num(_pred(layer, "forward_var")), 6),
        Column("meas/pred", lambda layer: ratio(_forward(layer), _pred(layer, "forward_var")),
               essential),
        *schemes,
        Column("bwd Var", lambda layer: num(_backward(layer)), essential),
        Column("pred", lambda layer: num(_pred(layer, "backward_var")), 6),
        Column("meas/pred", lambda layer: ratio(_backward(layer), _pred(layer, "backward_var")),
               8),
        *extra,
        Column("flags", _flags, essential, "left"),
    ]


def range_columns(report: Report) -> list[Column]:
    return [Column(header, cell, keep) for header, cell, keep in range_cells(report)]


def table(report: Report, console: Console, *, all_layers: bool = False,
          cols: list[Column]) -> tuple[Table, int]:
    """The table, and the width it needs.

    Each cell is styled here, once, as rich styles a string cell (markup, emoji,
    highlighting), so that every column's width is its widest cell, known without rich
    measuring all cells at each print (a 400-row table: ~1 s). Only the layer names keep
    no fixed width: in a terminal too narrow for the essential columns, they fold.
    """
    t = Table(box=None, header_style="bold", pad_edge=False)
    rows = [[_styled(console, col.cell(layer)) for col in cols]
            for layer in shown_layers(report, all_layers)]
    need = 2 * (len(cols) - 1)  # one space of padding each side, none at the edges
    for i, col in enumerate(cols):
        # Text headers: "[w]" is not markup. Numbers never wrap; long names fold.
        width = max(_width(cell) for cell in (Text(col.header), *(row[i] for row in rows)))
        folds = col.header == "layer"
        t.add_column(Text(col.header), justify=col.justify, no_wrap=not folds,
                     overflow="fold", width=None if folds else width)
        need += width
    for row in rows:
        t.add_row(*row)
    return t, need


def _styled(console: Console, cell: str | Text) -> Text:
    return cell if isinstance(cell, Text) else console.render_str(cell, highlight=False)


def _width(text: Text) -> int:
    return max(map(cell_len, text.plain.splitlines() or [""]))


def fitted(report: Report, console: Console, *, all_layers: bool,
           compare: list[str], ranges: bool = False) -> Table:
    """The table, with the least needed columns dropped until it fits a terminal;
    piped or logged output is never cut (the console widens instead)."""
    cols = columns(compare, range_columns(report) if ranges else [])
    while True:
        body, need = table(report, console, all_layers=all_layers, cols=cols)
        if not console.is_terminal:
            console.width = max(console.width, need)
            return body
        droppable = [c for c in cols if c.keep < ESSENTIAL]
        if need <= console.width or not droppable:
            return body
        cols = [c for c in cols if c is not min(droppable, key=lambda c: c.keep)]


def _fan_in(layer: Layer) -> str:
    """The nominal fan-in, and the effective one in parentheses where zero-padded
    borders or stride make it differ by more than 1%."""
    if layer.fan_in is None:
        return ""
    eff = layer.effective_fan_in
    if eff is None or abs(eff - layer.fan_in) <= 0.01 * layer.fan_in:
        return str(layer.fan_in)
    return f"{layer.fan_in} ({eff:.3g})"


def end_to_end(report: Report, compare: list[str] = ()) -> Text:
    """The predicted end-to-end forward/backward ratios, and under each compared scheme."""
    from varprobe.theory import end_to_end as ratios

    s = report.summary
    text = Text(f"predicted end to end: forward ×{num(s.forward_ratio)}, "
                f"backward ×{num(s.backward_ratio)}", style="dim")
    for scheme in compare:
        fwd, bwd = ratios(report, scheme)
        text.append(f" · {scheme} ×{num(fwd)}, ×{num(bwd)}", style="dim")
    return text


def trial_progress(total: int):
    """A context manager giving a ``progress(done, total)`` callback that draws a bar
    on stderr (None for a single trial): the library itself stays quiet."""
    console = Console(stderr=True)
    if total < 2 or not console.is_terminal:  # a log or a pipe: no bar, nor its newline
        return contextlib.nullcontext(None)
    return _bar(total, console)


@contextlib.contextmanager
def _bar(total: int, console: Console):
    from rich.progress import Progress

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("trials", total=total)
        yield lambda done, _total: bar.update(task, completed=done)


def _worst(layer: Layer) -> str:
    return min((f.severity for f in layer.flags), key=SEVERITIES.index)


def verdict(report: Report) -> Text:
    """The verdict block: status, one line per problem (most severe first), the
    cause, and the checked fix with its predicted end-to-end ratios."""
    from varprobe.render.ci import problems

    s = report.summary
    text = Text()
    if not s.healthy:
        text.append("✗ UNHEALTHY", style="bold red")
    elif s.warnings:
        text.append("! HEALTHY", style="bold yellow")
    else:
        text.append("✓ HEALTHY", style="bold green")
    text.append(f" · {s.counts()}")
    found = problems(report)
    rows = [(p.code, f"{p.where}: {p.message}", SEVERITY_STYLE[p.severity]) for p in found]
    if s.cause:
        rows.append(("cause", s.cause, ""))
    if s.fix is not None:
        rows.append(("fix", s.fix.code, "bold"))
        rows.append(("", _fix_effect(s.fix), ""))
    if not found and s.verdict:
        rows.append(("", s.verdict, "green"))
    width = max((len(code) for code, _, _ in rows), default=0) + 2
    for code, body, style in rows:
        lines = body.splitlines() or [""]
        text.append(f"\n  {code:<{width}}", style=style)
        text.append(lines[0])
        for line in lines[1:]:
            text.append(f"\n  {'':<{width}}{line}")
    for note in report.notes:
        text.append(f"\n  note: {note}", style="dim")
    return text


def _fix_effect(fix) -> str:
    (f0, b0), (f1, b1) = fix.before, fix.after
    return (f"predicted end-to-end ratio: forward {num(f0)} → {num(f1)}, "
            f"backward {num(b0)} → {num(b1)} ({fix.scheme})")


def render(report: Report, console: Console | None = None, *, all_layers: bool = False,
           compare: list[str] = (), ranges: bool = False) -> None:
    console = console or Console()
    body = fitted(report, console, all_layers=all_layers, compare=list(compare),
                  ranges=ranges)
    console.print(header(report))
    console.print()
    console.print(body)
    if report.summary.forward_ratio is not None or report.summary.backward_ratio is not None:
        console.print(end_to_end(report, list(compare)))
    for line in range_lines(report):
        console.print(line)
    console.print()
    console.print(verdict(report))
