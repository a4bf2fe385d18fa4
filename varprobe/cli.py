"""The command line: parse, call the library, render, choose the exit code.

Thin on purpose. Heavy imports (torch, pandas, matplotlib) happen inside commands so
that ``varprobe --help`` and usage errors stay instant.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from varprobe import lifetime
from varprobe.cli_options import (
    AllLayers,
    BatchSize,
    Compare,
    Debug,
    Device,
    FailOn,
    Format,
    FormatOpt,
    Init,
    InputFile,
    InputShape,
    Mode,
    ModeOpt,
    Output,
    Png,
    Scheme,
    Seed,
    TargetArg,
    Timings,
    Trials,
    parse_schemes,
    parse_shape,
)
from varprobe.cli_precision import AutocastOpt, LossScale, PrecisionOpt, RangesOpt
from varprobe.cli_precision import settings as precision_settings

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Does the signal survive the trip through your network? Measures per-layer "
         "forward and backward variances and holds them against He et al. 2015 and "
         "Glorot & Bengio 2010.")


def fail(message: str, debug: bool, exc: BaseException | None = None) -> None:
    """One line on stderr and exit code 2; the traceback only with --debug."""
    if debug and exc is not None:
        import traceback

        traceback.print_exception(exc)
    typer.echo(f"varprobe: error: {message}", err=True)
    raise typer.Exit(2)


def _stage(*args, **kwargs):
    from varprobe.stages import cli_stage

    return cli_stage(*args, **kwargs)


FailOnOpt = Annotated[FailOn | None, typer.Option(
    "--fail-on", help="exit 1 when a flag of this severity or worse is raised  "
                      "(default error, or pyproject's)", show_default=False)]
Ignore = Annotated[list[str] | None, typer.Option(
    "--ignore", help="skip layers whose name matches this glob (repeatable), "
                     "e.g. --ignore 'head*'", show_default=False)]
ThresholdOpt = Annotated[list[str] | None, typer.Option(
    "--threshold", help="override a threshold (repeatable): forward=1e-3,1e3, "
                        "multiplier=0.5,2, dead_units=0.7, ...", show_default=False)]


def _settings(debug: bool, **given):
    """Defaults < [tool.varprobe] in the nearest pyproject.toml < these options."""
    from varprobe import config
    from varprobe.errors import VarprobeError
    from varprobe.stages import show_tracebacks

    show_tracebacks(debug)
    given["fail_on"] = given["fail_on"].value if given.get("fail_on") else None
    given["ignore"] = tuple(given.get("ignore") or ())
    try:
        return config.resolve(given)
    except VarprobeError as exc:
        fail(str(exc), debug, exc)


def _record_settings(report, settings) -> None:
    report.settings.update(fail_on=settings.fail_on, config=settings.source)


def _exit_code(report, fail_on: str, regression: bool = False) -> None:
    from varprobe.render.ci import failed

    if failed(report, fail_on) or regression:
        raise typer.Exit(1)


def _version(value: bool) -> None:
    if value:
        from varprobe import __version__

        typer.echo(f"varprobe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="print the version")] = False,
          ) -> None:
    """Does the signal survive the trip through your network?"""


@app.command()
def analyze(
    target: TargetArg,
    input_shape: InputShape = None,
    input_file: InputFile = None,
    batch_size: BatchSize = None,
    seed: Seed = None,
    mode: ModeOpt = Mode.train,
    device: Device = "cpu",
    fmt: FormatOpt = Format.table,
    fail_on: FailOnOpt = None,
    ignore: Ignore = None,
    threshold: ThresholdOpt = None,
    output: Output = None,
    all_layers: AllLayers = False,
    png: Png = None,
    compare: Compare = None,
    init: Init = None,
    trials: Trials = 1,
    precision: PrecisionOpt = None,
    loss_scale: LossScale = None,
    autocast: AutocastOpt = None,
    ranges: RangesOpt = False,
    timings: Timings = False,
    debug: Debug = False,
) -> None:
    """Measure per-layer forward and backward variances of a model file."""
    from varprobe import timing

    shape = parse_shape(input_shape)
    schemes = parse_schemes(compare)
    _check_figure_path(png, debug)
    settings = _settings(debug, batch_size=batch_size, seed=seed, fail_on=fail_on,
                         ignore=ignore, threshold=threshold)
    with timing.Stopwatch() if timings else nullcontext() as watch:
        report = _run(target, shape, input_file, settings.batch_size, settings.seed, mode,
                      device, debug, settings, init=init.value if init else None,
                      trials=trials, compare=_walked(schemes, fmt, output, png),
                      precision=precision_settings(precision, loss_scale, autocast, ranges))
        _record_settings(report, settings)
        with timing.phase("report"):
            _emit(report, fmt, output, all_layers, debug, png, compare=schemes,
                  ranges=ranges)
    if watch is not None:
        sys.stderr.write("\n".join(watch.lines(len(report.layers))) + "\n")
    if fail_on is not None:  # analyze decides its exit code only when asked to
        _exit_code(report, settings.fail_on)


def _walked(schemes: list[str], fmt: Format | None, output: Path | None,
            png: Path | None) -> list[str]:
    """The init schemes the probe predicts: --compare's, and Xavier's and He's where a
    figure or a Markdown report draws them."""
    drawn = png is not None or fmt is Format.markdown or (
        output is not None and output.suffix.lower() == ".md")
    return list(dict.fromkeys([*schemes, *(("xavier", "he") if drawn else ())]))


def _run(target, shape, input_file, batch_size, seed, mode, device, debug, settings, *,
         init: str | None = None, trials: int = 1, precision=None, compare=()):
    from varprobe import timing
    from varprobe.errors import VarprobeError
    from varprobe.stages import tell_failed

    try:
        with timing.phase("load"), lifetime.loading():  # the imports (torch), the model file
            from varprobe import inputs
            from varprobe import target as target_mod
            from varprobe.mixed import probe
            from varprobe.render.terminal import trial_progress

            with _stage("load"):
                loaded = target_mod.load(target, seed=seed)
                data = inputs.load_file(input_file) if input_file else loaded.example_input
        with trial_progress(trials) as progress:
            report = probe(loaded.model, data, loss=loaded.loss, batch_size=batch_size,
                           seed=seed, mode=mode.value, device=device, input_shape=shape,
                           target=target, init=init, trials=trials, progress=progress,
                           thresholds=settings.thresholds, ignore=settings.ignore,
                           precision=precision, compare=compare)
    except VarprobeError as exc:
        fail(str(exc), debug, exc)
    tell_failed(report)
    return report


@app.command()
def predict(
    target: TargetArg,
    input_shape: InputShape = None,
    batch_size: BatchSize = None,
    mode: ModeOpt = Mode.train,
    device: Annotated[str, typer.Option(
        "--device", help="meta: build without allocating weights (PyTorch's default init "
                         "assumed); cpu, cuda, mps or auto: build there and read the weights")
    ] = "meta",
    init: Annotated[Scheme | None, typer.Option(
        "--init", help="assume this init scheme for every Linear/Conv layer")] = None,
    fmt: FormatOpt = Format.table,
    fail_on: FailOnOpt = None,
    ignore: Ignore = None,
    threshold: ThresholdOpt = None,
    output: Output = None,
    all_layers: AllLayers = False,
    precision: PrecisionOpt = None,
    loss_scale: LossScale = None,
    ranges: RangesOpt = False,
    compare: Compare = None,
    cotangent: Annotated[str, typer.Option(
        "--cotangent", help="the loss gradient's Var at each output element that seeds "
                            "the backward: unit (the papers' 1), cross-entropy (a mean "
                            "cross-entropy at init: (1-1/V)/(V N²)) or a number")] = "unit",
    debug: Debug = False,
) -> None:
    """Closed-form trajectories only: no data, no backward pass, no weights allocated."""
    shape = parse_shape(input_shape)
    schemes = parse_schemes(compare)
    settings = _settings(debug, batch_size=batch_size, seed=None, fail_on=fail_on,
                         ignore=ignore, threshold=threshold)
    from varprobe.errors import VarprobeError
    from varprobe.stages import tell_failed

    try:
        from varprobe.predict import predict_target

        report = predict_target(target, device=device, input_shape=shape,
                                batch_size=settings.batch_size, init=init.value if init
                                else None, mode=mode.value, thresholds=settings.thresholds,
                                ignore=settings.ignore, precision=precision_settings(
                                    precision, loss_scale, None, ranges),
                                cotangent=cotangent,
                                compare=_walked(schemes, fmt, output, None))
    except VarprobeError as exc:
        fail(str(exc), debug, exc)
    tell_failed(report)
    _record_settings(report, settings)
    _emit(report, fmt, output, all_layers, debug, compare=schemes, ranges=ranges)
    if fail_on is not None:
        _exit_code(report, settings.fail_on)


def _emit(report, fmt: Format, output: Path | None, all_layers: bool, debug: bool,
          png: Path | None = None, compare: list[str] = (), ranges: bool = False) -> None:
    from varprobe.render import formats

    if png is not None:  # first, so that a Markdown report can link it
        _draw(report, png, debug)
    if output is not None:
        _write(output, lambda p: formats.write(report, p, image=png), debug)
    with _stage("render", report):
        if fmt is Format.table:
            from varprobe.render.terminal import render

            render(report, all_layers=all_layers, compare=compare, ranges=ranges)
        else:
            sys.stdout.write(formats.text(report, fmt.value, image=png))


def _write(path: Path, write, debug: bool) -> None:
    """``write(path)``: an OSError is the user's to fix (exit 2), anything else a bug."""
    try:
        with _stage("write", expected=(OSError,)):
            write(path)
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror or exc}", debug, exc)


def _check_figure_path(path: Path | None, debug: bool) -> None:
    """Refuse a figure name or folder that cannot work before the model runs."""
    if path is None:
        return
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        fail(f"cannot draw {path}: the name must end in .png, .svg or .pdf", debug)
    if not path.absolute().parent.is_dir():
        fail(f"cannot write {path}: the folder {path.absolute().parent} does not exist", debug)


def _draw(report, path: Path, debug: bool, isolated: bool = True) -> None:
    """``isolated``: a failure in the plot stage leaves the rest of the command running."""
    from varprobe.errors import VarprobeError
    from varprobe.render import plots

    try:
        with _stage("plot", report if isolated else None):
            plots.save(report, path)
    except VarprobeError as exc:
        fail(str(exc), debug, exc)


@app.command()
def plot(
    report_file: Annotated[Path, typer.Argument(
        help="a JSON report written by `varprobe analyze ... -o report.json`",
        show_default=False)],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help=".png, .svg or .pdf by extension (default: the report's "
                               "name with .png)")] = None,
    debug: Debug = False,
) -> None:
    """Draw the figure of a saved report, without the model."""
    output = output or report_file.with_suffix(".png")
    _check_figure_path(output, debug)
    _draw(_read_report(report_file, debug), output, debug, isolated=False)
    typer.echo(f"wrote {output}", err=True)


class CheckFormat(str, Enum):
    text = "text"
    github = "github"


def _factor(value: float) -> float:
    if not value > 1:
        raise typer.BadParameter(f"{value} is not a factor > 1")
    return value


Factor = Annotated[float, typer.Option(
    "--factor", callback=_factor, help="a layer regressed when its variance moved by more "
                                       "than this factor either way")]


def _read_report(path: Path, debug: bool):
    from varprobe.errors import VarprobeError
    from varprobe.report import read

    try:
        with _stage("load"):
            return read(path)
    except VarprobeError as exc:
        fail(str(exc), debug, exc)


def _annotation_file(target: str) -> str | None:
    from varprobe.target import split_spec

    location = split_spec(target)[0]
    return location if location.endswith(".py") else None


@app.command()
def check(
    target: TargetArg,
    input_shape: InputShape = None,
    input_file: InputFile = None,
    batch_size: BatchSize = None,
    seed: Seed = None,
    mode: ModeOpt = Mode.train,
    device: Device = "cpu",
    fail_on: FailOnOpt = None,
    ignore: Ignore = None,
    threshold: ThresholdOpt = None,
    baseline: Annotated[Path | None, typer.Option(
        "--baseline", help="a JSON report to compare with; a layer whose variance moved "
                           "by more than --factor fails the check")] = None,
    factor: Factor = 2.0,
    junit: Annotated[Path | None, typer.Option(
        "--junit", help="also write JUnit XML (a test case per weight layer)")] = None,
    fmt: Annotated[CheckFormat, typer.Option(
        "--format", "-f", help="text: one line per problem; github: workflow "
                               "annotations")] = CheckFormat.text,
    output: Output = None,
    png: Png = None,
    precision: PrecisionOpt = None,
    loss_scale: LossScale = None,
    autocast: AutocastOpt = None,
    debug: Debug = False,
) -> None:
    """Health check for CI: one line per problem; exit 0 healthy, 1 flagged, 2 could not
    run, 3 a bug in varprobe.

    Flagged means a flag at or above --fail-on, or a regression against --baseline.
    """
    from varprobe.render import ci

    shape = parse_shape(input_shape)
    _check_figure_path(png, debug)
    settings = _settings(debug, batch_size=batch_size, seed=seed, fail_on=fail_on,
                         ignore=ignore, threshold=threshold)
    base = _read_report(baseline, debug) if baseline is not None else None
    report = _run(target, shape, input_file, settings.batch_size, settings.seed, mode,
                  device, debug, settings, compare=_walked([], None, output, png),
                  precision=precision_settings(precision, loss_scale, autocast))
    _record_settings(report, settings)
    lines = []
    with _stage("render", report):
        lines = (ci.github(report, _annotation_file(target), settings.fail_on)
                 if fmt is CheckFormat.github else ci.check_lines(report, target,
                                                                  settings.fail_on))
    regression = False
    if base is not None:
        more, regression = _against_baseline(base, report, factor, baseline)
        lines += more
    if png is not None:  # first, so that a Markdown report can link it
        _draw(report, png, debug)
    _write_ci_files(report, junit, output, settings, debug, png)
    for line in lines:
        typer.echo(line)
    _exit_code(report, settings.fail_on, regression)


def _against_baseline(base, report, factor: float, path: Path) -> tuple[list[str], bool]:
    """Lines for the layers that moved against the baseline, and whether that fails."""
    from varprobe.baseline import diff as diff_reports

    with _stage("diagnose"):
        changes = diff_reports(base, report, factor)
    lines = [f"baseline {line}" for line in changes.lines()]
    if changes.regression:
        lines.append(f"✗ varprobe: {len(changes.moved)} change(s) beyond ×{factor:g} "
                     f"against {path}")
    return lines, changes.regression


def _write_ci_files(report, junit: Path | None, output: Path | None, settings,
                    debug: bool, png: Path | None = None) -> None:
    from varprobe.render import ci, formats
    from varprobe.report import write_atomic

    for path, write in ((junit, lambda p: write_atomic(
            p, ci.junit(report, settings.fail_on, settings.ignore))),
                        (output, lambda p: formats.write(report, p, image=png))):
        if path is not None:
            _write(path, write, debug)


@app.command()
def diff(
    base: Annotated[Path, typer.Argument(help="the baseline JSON report",
                                         show_default=False)],
    new: Annotated[Path, typer.Argument(help="the JSON report to compare with it",
                                        show_default=False)],
    factor: Factor = 2.0,
    debug: Debug = False,
) -> None:
    """Compare two saved reports layer by layer; exit 1 when a layer moved by > --factor.

    Layers are matched by name and call; forward E[y²] and backward Var[dL/dy] are
    compared, and added or removed layers are listed. Exit 2 when a file cannot be read.
    """
    from varprobe.baseline import diff as diff_reports

    base_report, new_report = _read_report(base, debug), _read_report(new, debug)
    with _stage("diagnose"):
        changes = diff_reports(base_report, new_report, factor)
    for line in changes.lines():
        typer.echo(line)
    if changes.regression:
        typer.echo(f"✗ varprobe: {len(changes.moved)} change(s) beyond ×{factor:g}")
        raise typer.Exit(1)
    typer.echo(f"✓ varprobe: no layer moved by more than ×{factor:g}")


# typer vendors click without re-exporting UsageError; BadParameter's base is it.
UsageError = typer.BadParameter.__bases__[0]


def main() -> None:
    """Console entry point. Exit codes: 0 healthy, 1 flagged, 2 the input or model could
    not be run (one line on stderr), 3 a bug in varprobe (one line naming the stage)."""
    try:
        with lifetime.command():
            code = app(standalone_mode=False)
    except UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "varprobe"
        typer.echo(f"varprobe: error: {exc.format_message()} (see {command} --help)",
                   err=True)
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the command did not handle it: see tell
        from varprobe.stages import tell

        # The command's own --debug did not get to act on it: read it off the line.
        sys.exit(tell(exc, None, "--debug" in sys.argv[1:]))
    sys.exit(code or 0)
