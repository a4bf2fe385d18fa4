"""The command line: parse, call the library, render, choose the exit code.

Thin on purpose. Heavy imports (torch, pandas, matplotlib) happen inside commands so
that ``varprobe --help`` and usage errors stay instant.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Does the signal survive the trip through your network? Measures per-layer "
         "forward and backward variances and holds them against He et al. 2015 and "
         "Glorot & Bengio 2010.")


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"


class Mode(str, Enum):
    train = "train"
    eval = "eval"


def fail(message: str, debug: bool, exc: BaseException | None = None) -> None:
    """One line on stderr and exit code 2; the traceback only with --debug."""
    if debug and exc is not None:
        import traceback

        traceback.print_exception(exc)
    typer.echo(f"varprobe: error: {message}", err=True)
    raise typer.Exit(2)


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise typer.BadParameter(f"{text!r} is not a shape like 3,32,32 (batch excluded)")
    return shape


TargetArg = Annotated[str, typer.Argument(
    help="path/model.py, path/model.py:NAME or package.module:NAME", show_default=False)]
InputShape = Annotated[str | None, typer.Option(
    "--input-shape", help="input shape without the batch dimension, e.g. 3,32,32")]
InputFile = Annotated[Path | None, typer.Option(
    "--input", help="real data: a .pt tensor/tuple/dict or a .npy array (batch included)")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="batch size")]
Seed = Annotated[int, typer.Option("--seed", help="seed for inputs and cotangent")]
ModeOpt = Annotated[Mode, typer.Option("--mode", help="train (BatchNorm uses batch stats) "
                                                      "or eval")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, mps or auto")]
Debug = Annotated[bool, typer.Option("--debug", help="show tracebacks")]


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
    batch_size: BatchSize = 256,
    seed: Seed = 0,
    mode: ModeOpt = Mode.train,
    device: Device = "cpu",
    fmt: Annotated[Format, typer.Option("--format", "-f", help="what to print")] = (
        Format.table),
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="also write the report: .json, .csv or .md by extension")] = None,
    all_layers: Annotated[bool, typer.Option(
        "--all-layers", help="show activation, norm and other layers too")] = False,
    debug: Debug = False,
) -> None:
    """Measure per-layer forward and backward variances of a model file."""
    shape = parse_shape(input_shape)
    report = _run(target, shape, input_file, batch_size, seed, mode, device, debug)
    _emit(report, fmt, output, all_layers, debug)


def _run(target, shape, input_file, batch_size, seed, mode, device, debug):
    from varprobe.errors import VarprobeError

    try:
        from varprobe import inputs
        from varprobe import target as target_mod
        from varprobe.pipeline import probe

        loaded = target_mod.load(target)
        data = inputs.load_file(input_file) if input_file else loaded.example_input
        return probe(loaded.model, data, loss=loaded.loss, batch_size=batch_size, seed=seed,
                     mode=mode.value, device=device, input_shape=shape, target=target)
    except VarprobeError as exc:
        fail(str(exc), debug, exc)


def _emit(report, fmt: Format, output: Path | None, all_layers: bool, debug: bool) -> None:
    from varprobe.render import formats

    if output is not None:
        try:
            formats.write(report, output)
        except OSError as exc:
            fail(f"cannot write {output}: {exc.strerror or exc}", debug, exc)
    if fmt is Format.table:
        from varprobe.render.terminal import render

        render(report, all_layers=all_layers)
    else:
        sys.stdout.write(formats.text(report, fmt.value))


# typer vendors click without re-exporting UsageError; BadParameter's base is it.
UsageError = typer.BadParameter.__bases__[0]


def main() -> None:
    """Console entry point: a usage error is one line on stderr and exit code 2."""
    try:
        code = app(standalone_mode=False)
    except UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "varprobe"
        typer.echo(f"varprobe: error: {exc.format_message()} (see {command} --help)",
                   err=True)
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    sys.exit(code or 0)
