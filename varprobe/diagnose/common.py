"""Small pieces every rule shares: number formatting, the flag table, units of layers."""

from __future__ import annotations

import math
from dataclasses import dataclass

from varprobe.report import Flag, ForwardStats, Layer

SEVERITY = {"nonfinite": "error", "vanishing_forward": "error", "exploding_forward": "error",
            "vanishing_backward": "error", "exploding_backward": "error",
            "dead_units": "warning", "dead_branch": "warning", "shrinks": "warning",
            "amplifies": "warning",
            "unnormalized_input": "warning", "exploding_input": "error",
            "theory_mismatch": "info",
            "attention_saturated": "warning", "attention_collapsed": "error"}
TREND_CODES = ("vanishing_forward", "exploding_forward", "vanishing_backward",
               "exploding_backward")
# Modules a unit passes through without changing what the weight layer started.
PASS_THROUGH = ("norm", "activation")
PASS_THROUGH_TYPES = ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "Identity")
SAME = 1e-9  # the recorder measures a tensor once: the same tensor has identical moments


@dataclass
class Trend:
    """A vanishing/exploding flag and the weight layers that can be behind it."""

    code: str
    at: int
    suspects: list[int]  # weight-layer indices in execution order


def num(value: float | None) -> str:
    if value is None:
        return "—"
    if value == 0 or 1e-2 <= abs(value) < 1e3:
        return f"{value:.3g}"
    return f"{value:.2e}"


def band(b: tuple[float, float]) -> str:
    return f"[{b[0]:.3g}, {b[1]:.3g}]"


def pos(value: float | None) -> float | None:
    """A finite positive number, else None."""
    return value if value is not None and math.isfinite(value) and value > 0 else None


def same(a: ForwardStats | None, b: ForwardStats | None) -> bool:
    """Whether two measured tensors are one and the same (identical moments)."""
    if a is None or b is None or a.second_moment is None or b.second_moment is None:
        return False
    x, y = a.second_moment, b.second_moment
    return abs(x - y) <= SAME * max(abs(x), abs(y)) and (a.mean == b.mean)


def flag(layer: Layer, code: str, message: str, value: float | None = None,
         culprits: list[str] | None = None) -> Flag | None:
    if all(f.code != code for f in layer.flags):
        made = Flag(code=code, severity=SEVERITY[code], message=message, value=value,
                    culprits=list(culprits or []))
        layer.flags.append(made)
        return made
    return None


def is_weight(layer: Layer) -> bool:
    """A layer that multiplies the signal by a weight matrix it owns: varprobe knows its
    fans (a table of position biases or a LayerScale vector has none)."""
    return layer.kind == "weight" and layer.fan_in is not None


def passes_through(layer: Layer) -> bool:
    return layer.kind in PASS_THROUGH or layer.type in PASS_THROUGH_TYPES


def unit_end(layers: list[Layer], i: int, stop_at_norm: bool = False) -> int:
    """The last layer of weight layer i's unit: the elementwise modules (norm,
    activation, dropout) that consume its output one after the other."""
    j = i
    while (j + 1 < len(layers) and passes_through(layers[j + 1])
           and same(layers[j + 1].input, layers[j].forward)):
        if stop_at_norm and layers[j + 1].kind == "norm":
            break
        j += 1
    return j


def feeds_norm(layers: list[Layer], i: int) -> bool:
    """A norm layer rescales this layer's output (possibly after an activation), so
    the layer's own scale cancels and its multiplier says nothing."""
    j = unit_end(layers, i, stop_at_norm=True)
    return (j + 1 < len(layers) and layers[j + 1].kind == "norm"
            and same(layers[j + 1].input, layers[j].forward))


def multiplier_values(layer: Layer) -> list[float]:
    return [m for m in (layer.forward_multiplier, layer.backward_multiplier)
            if m is not None and math.isfinite(m)]


def places(labels: list[str]) -> str:
    if len(labels) <= 3:
        return ", ".join(labels)
    return f"{', '.join(labels[:3])} and {len(labels) - 3} more"
