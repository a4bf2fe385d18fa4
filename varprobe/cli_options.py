"""The command line's option types: shared by the commands, spelled out without torch.

Every option of ``analyze``, ``predict`` and ``check`` is declared once here, with its
help text, so that the commands list them and typer parses them alike.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"


class Mode(str, Enum):
    train = "train"
    eval = "eval"


class Scheme(str, Enum):
    """theory.SCHEMES, spelled out here so that a bad name fails without importing torch."""

    xavier = "xavier"
    he = "he"
    he_fan_out = "he-fan-out"
    he_prelu = "he-prelu"
    torch_default = "torch-default"
    lecun = "lecun"


def parse_schemes(text: str | None) -> list[str]:
    """--compare xavier,he -> ["xavier", "he"]; a bad name lists the valid ones."""
    if not text:
        return []
    if text.strip() == "all":
        return [s.value for s in Scheme]
    names = [p.strip() for p in text.split(",") if p.strip()]
    valid = [s.value for s in Scheme]
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise typer.BadParameter(f"unknown init scheme {', '.join(bad) or text}; "
                                 f"valid: {', '.join(valid)}", param_hint="'--compare'")
    return list(dict.fromkeys(names))


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
BatchSize = Annotated[int | None, typer.Option(
    "--batch-size", "-b", min=1, help="batch size (default 256, or pyproject's)",
    show_default=False)]
Seed = Annotated[int | None, typer.Option(
    "--seed", help="seed for the model file's own init, the inputs and the cotangent "
                   "(default 0, or pyproject's)",
    show_default=False)]
ModeOpt = Annotated[Mode, typer.Option("--mode", help="train (BatchNorm uses batch stats) "
                                                      "or eval")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, mps or auto")]
Debug = Annotated[bool, typer.Option("--debug", help="show tracebacks")]
Timings = Annotated[bool, typer.Option(
    "--timings", help="print where the time went to stderr: the pass, the hooks' share "
                      "of it, and the analysis after it, per 100 layer calls")]
Compare = Annotated[str | None, typer.Option(
    "--compare", help="predict under these init schemes too (a table column each, "
                      "and the reports' scheme predictions), e.g. xavier,he, or all "
                      "(xavier, he, he-fan-out, he-prelu, torch-default, lecun)")]
Init = Annotated[Scheme | None, typer.Option(
    "--init", help="re-initialize a copy of the model with this scheme first "
                   "(your weights are untouched)")]
Trials = Annotated[int, typer.Option(
    "--trials", min=1, help="repeat with K seeds; report means and 95% intervals")]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="what to print")]
Output = Annotated[Path | None, typer.Option(
    "--output", "-o", help="also write the report: .json, .csv or .md by extension")]
AllLayers = Annotated[bool, typer.Option(
    "--all-layers", help="show activation, norm and other layers too")]
Png = Annotated[Path | None, typer.Option(
    "--png", help="also draw the report figure: .png, .svg or .pdf by extension")]


class FailOn(str, Enum):
    error = "error"
    warning = "warning"
    info = "info"
    never = "never"
