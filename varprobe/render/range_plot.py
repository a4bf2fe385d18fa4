"""Panel (e) of the report figure: each weight layer's forward and backward scale
against the number formats' ranges.

On a log2 axis, per weight layer: the rms (a point) with a whisker from the smallest
non-zero |x| to the largest, forward and backward side by side; gradients multiplied
by the loss scale they were checked under, so that both sit against the same bands.
Bands: the checked format's normal range (green) and subnormal range (orange); the
other formats' smallest subnormal and largest value as thin lines. Where nothing was
measured (``varprobe predict``), the predicted rms and median max.
"""

from __future__ import annotations

import math

from matplotlib.axes import Axes

from varprobe.precision import FORMATS, SCALED
from varprobe.report import Layer, Report

FORWARD_COLOUR, BACKWARD_COLOUR = "#000000", "#0072B2"
LINE_STYLES = {"fp16": "-", "bf16": "--", "fp8-e4m3": ":", "fp8-e5m2": "-."}


def wanted(report: Report) -> bool:
    return bool(report.precision) or any(layer.ranges for layer in report.layers)


def _spread(layer: Layer, key: str) -> tuple[float, float, float] | None:
    """(rms, smallest non-zero, largest) |x|, measured where it was, else predicted."""
    row = layer.ranges.get(key)
    stats = getattr(layer, key, None)
    if row and row.get("amax") and stats is not None and stats.second_moment:
        return math.sqrt(stats.second_moment), row["min_nonzero"], row["amax"]
    row = layer.ranges.get(f"predicted_{key}")
    if row and row.get("amax"):
        return math.sqrt(row["second_moment"]), row["min_nonzero"], row["amax"]
    return None


def panel(ax: Axes, report: Report, layers: list[Layer]) -> None:
    p = report.precision or {}
    name = p.get("format") or "fp16"
    scale = (p.get("loss_scale") or {}).get("used") or 1.0
    lows, highs = [], []
    for offset, key, colour, factor in ((-0.12, "forward", FORWARD_COLOUR, 1.0),
                                        (0.12, "backward", BACKWARD_COLOUR, scale)):
        xs, rms = [], []
        for i, layer in enumerate(layers, start=1):
            found = _spread(layer, key)
            if found is None:
                continue
            r, lo, hi = (math.log2(v * factor) for v in found)
            ax.vlines(i + offset, lo, hi, color=colour, lw=1.0, alpha=0.7)
            xs.append(i + offset)
            rms.append(r)
            lows.append(lo)
            highs.append(hi)
        label = "forward" if key == "forward" else (
            f"backward × loss scale 2^{round(math.log2(scale))}" if scale != 1 else "backward")
        ax.plot(xs, rms, "o", ms=3, color=colour, label=f"{label}: rms, whisker min..max |x|")
    _bands(ax, name)
    if lows:
        ax.set_ylim(min(min(lows), math.log2(FORMATS[name].min_subnormal)) - 2,
                    max(max(highs), math.log2(FORMATS[name].max)) + 9)  # room for the legend
    scaling = " (fp8: per-tensor amax scaling brings each max to the top)" \
        if name in SCALED else ""
    ax.set_title(f"(e) number ranges: |x| per weight layer against {name}{scaling}",
                 fontsize=10, loc="left")
    ax.set_ylabel("log2 |x|")
    ax.legend(fontsize=7, loc="upper right", ncol=3, frameon=False)


def _bands(ax: Axes, name: str) -> None:
    fmt = FORMATS[name]
    sub, normal, top = (math.log2(v) for v in (fmt.min_subnormal, fmt.min_normal, fmt.max))
    ax.axhspan(normal, top, color="#009E73", alpha=0.10, label=f"{name} normal range")
    ax.axhspan(sub, normal, color="#E69F00", alpha=0.15, label=f"{name} subnormal")
    for other, f in FORMATS.items():
        if other == name:
            continue
        for v in (f.min_subnormal, f.max):
            ax.axhline(math.log2(v), color="#999999", lw=0.8, ls=LINE_STYLES[other])
        ax.plot([], [], color="#999999", lw=0.8, ls=LINE_STYLES[other],
                label=f"{other} smallest subnormal, max")
