"""The command line's number-format options (--precision, --loss-scale, --autocast,
--ranges), kept beside cli.py so that it stays a list of commands.

Names are spelled out here so that a bad one fails without importing torch.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Annotated

import typer


class Precision(str, Enum):
    """precision.FORMATS."""

    fp16 = "fp16"
    bf16 = "bf16"
    fp8_e4m3 = "fp8-e4m3"
    fp8_e5m2 = "fp8-e5m2"


class Autocast(str, Enum):
    """precision.AUTOCAST."""

    fp16 = "fp16"
    bf16 = "bf16"


def _power_of_two(value: float | None) -> float | None:
    if value is not None and not (value > 0 and math.isfinite(value)
                                  and math.frexp(value)[0] == 0.5):
        raise typer.BadParameter(f"{value:g} is not a power of two (GradScaler's scales are "
                                 "2^k: 1, 1024, 65536, ...)")
    return value


PrecisionOpt = Annotated[Precision | None, typer.Option(
    "--precision", help="check every tensor against this number format: overflow, "
                        "underflow, the loss scale range (fp16, bf16, fp8-e4m3, fp8-e5m2)",
    show_default=False)]
LossScale = Annotated[float | None, typer.Option(
    "--loss-scale", callback=_power_of_two, help="check gradients under this loss scale "
    "(a power of two; default: the middle of the range that fits)", show_default=False)]
AutocastOpt = Annotated[Autocast | None, typer.Option(
    "--autocast", help="run the forward under torch.autocast in this dtype and report "
                       "where it parts from the float32 pass", show_default=False)]
RangesOpt = Annotated[bool, typer.Option(
    "--ranges", help="table columns for number ranges: log2 of the largest |y| and |g|, "
                     "and the underflow % in the --precision format")]


def settings(precision: Precision | None, loss_scale: float | None,
             autocast: Autocast | None, ranges: bool = False):
    """A precision.Settings, or None when no option asks for range statistics."""
    if precision is None and loss_scale is None and autocast is None and not ranges:
        return None
    from varprobe.precision import Settings

    return Settings(format=precision.value if precision else None, loss_scale=loss_scale,
                    autocast=autocast.value if autocast else None)
