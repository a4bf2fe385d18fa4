"""``--autocast``: the probe's pass under torch.autocast, and where it parts from the
float32 pass of the same seed (same weights, inputs and cotangent).

Two passes: the mixed-precision one is the report; the float32 one is only compared
with it, layer by layer, on the measured second moments forward and backward. A layer
parts when its second moment moved by more than ``PARTS`` times the format's unit
roundoff relative (2^-8 for bf16, 2^-11 for fp16): rounding each element of a tensor
moves its second moment by far less (the errors are independent and average out), so
what passes the line is a difference the format made in the computation itself.
"""

from __future__ import annotations

import math
from typing import Any

from varprobe import pipeline
from varprobe.precision import FORMATS, Settings
from varprobe.report import Report

PARTS = 8


def probe(model: Any, inputs: Any = None, *, precision: Settings | None = None,
          **options: Any) -> Report:
    """``pipeline.probe`` with ``precision``; under autocast, also the float32 pass
    and ``report.precision["autocast"]``."""
    report = pipeline.probe(model, inputs, precision=precision, **options)
    if precision is not None and precision.autocast is not None:
        options = {**options, "progress": None, "compare": None}  # only its measurements
        reference = pipeline.probe(model, inputs, **options)
        report.precision = {**(report.precision or {}),
                            "autocast": parting(report, reference, precision.autocast)}
    return report


def parting(mixed: Report, reference: Report, dtype: str) -> dict:
    """Per direction, the layers whose measured second moment under autocast differs
    from the float32 pass by more than the tolerance, the first of them, and the
    largest relative difference."""
    fmt = FORMATS[dtype]
    tolerance = PARTS * 2.0 ** -(fmt.mantissa_bits + 1)
    by_label = {layer.label: layer for layer in reference.layers}
    out: dict[str, Any] = {"dtype": dtype, "tolerance": tolerance}
    for direction in ("forward", "backward"):
        parted, worst = [], 0.0
        for layer in mixed.layers:
            twin = by_label.get(layer.label)
            diff = _relative(getattr(layer, direction), getattr(twin, direction, None))
            if diff is None:
                continue
            worst = max(worst, diff)
            if diff > tolerance:
                parted.append({"layer": layer.label, "relative_difference": diff})
        out[direction] = {"parted": parted, "first": parted[0]["layer"] if parted else None,
                          "max_relative_difference": worst}
    return out


def _relative(a: Any, b: Any) -> float | None:
    """|a - b| / |b| of two second moments; inf where only one is finite."""
    if a is None or b is None or a.second_moment is None or b.second_moment is None:
        return None
    x, y = a.second_moment, b.second_moment
    if not (math.isfinite(x) and math.isfinite(y)):
        return None if math.isfinite(x) == math.isfinite(y) else math.inf
    return abs(x - y) / abs(y) if y else (0.0 if x == 0 else math.inf)
