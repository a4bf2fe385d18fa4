"""The report figure: where the signal dies, and which init would have kept it alive.

Four panels over the weight layers in depth order: (a) forward E[y²], (b) backward
Var[dL/dy], (c) each layer's predicted multipliers (log2 axis; ×1 holds), (d) the
zero and dead fractions after each layer's activation. Drawn on a bare ``Figure`` with
the Agg canvas (no pyplot state, no display), rendered to bytes, written atomically.
The same report always gives the same bytes.
"""

from __future__ import annotations

import io
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.offsetbox import AnchoredOffsetbox, HPacker, TextArea
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator

from varprobe.diagnose import SEVERITIES as SEVERITY_ORDER
from varprobe.diagnose import Thresholds
from varprobe.errors import VarprobeError
from varprobe.render.markdown import HEALTHY, UNHEALTHY, before_after, model_name, state
from varprobe.report import Layer, Report, write_atomic

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
SIZE_IN, DPI = (14.0, 9.0), 100  # 1400 x 900 pixels
DEFAULT_BAND = Thresholds().forward  # E[y²] over the input's: below vanishes, above explodes
MAX_NAME_LABELS = 40  # rotated layer names that fit under one panel without touching
MARKERS_UP_TO = 60  # beyond this many layers, markers only clutter the curves

# Okabe & Ito (2008): distinguishable under every common colour-vision deficiency.
BLACK, ORANGE, SKY, GREEN = "#000000", "#E69F00", "#56B4E9", "#009E73"
BLUE, VERMILION, PURPLE, GREY = "#0072B2", "#D55E00", "#CC79A7", "#999999"
SEVERITY_COLOUR = {"error": VERMILION, "warning": ORANGE, "info": SKY, None: GREY}
FLAGGED = ("error", "warning")  # info flags (e.g. theory_mismatch) are not drawn
ZONE_ALPHA = 0.08
# Measured solid black, the prediction for this init dashed, each counterfactual its own.
# Each curve also has its own marker shape, drawn when there are few layers.
PREDICTED = {"label": "predicted (this init)", "color": BLUE, "ls": "--", "marker": "s"}
SCHEMES = {"xavier": {"label": "Xavier init (predicted)", "color": PURPLE, "ls": "-.",
                      "marker": "^"},
           "he": {"label": "He init (predicted)", "color": GREEN, "ls": ":", "marker": "v"}}
CURVE_MARKERS_UP_TO = 10


@dataclass
class Direction:
    """What panels (a) and (b) need to know about one direction of the signal."""

    title: str
    ylabel: str
    stats: str  # Layer field holding the measured stats
    measured: str  # ForwardStats / BackwardStats field
    predicted: str  # Prediction field
    energy: bool = False  # times the output's element count: what the diagnosis compares


FORWARD = Direction("(a) forward: E[x²] of each weight layer's input over its reference's",
                    "E[x²] / reference E[x²] (log)",
                    "input", "second_moment", "input_var")
# Backward the diagnosis multiplies gradient energies (elements x variance): a layer
# into fewer or more units changes the per-element variance by geometry alone.
BACKWARD = Direction("(b) backward: gradient energy N·Var[dL/dy] at each weight layer's "
                     "output  (← gradient flows)",
                     "N·Var[dL/dy] (log)",
                     "backward", "var", "backward_var", energy=True)


# --- public API ------------------------------------------------------------------------
def figure(report: Report) -> Figure:
    """The four-panel figure of ``report`` (a bare Figure: no pyplot, no display)."""
    fig = Figure(figsize=SIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.get_layout_engine().set(rect=(0, 0, 1, 0.84), h_pad=0.06, w_pad=0.06)
    layers, blocks = _blocks(report)
    axes = fig.subplots(2, 2)
    x = np.arange(1, len(layers) + 1)
    handles = _signal(axes[0, 0], report, layers, blocks, x, FORWARD)
    handles += _signal(axes[0, 1], report, layers, blocks, x, BACKWARD)
    _multipliers(axes[1, 0], layers, blocks, x)
    _dead(axes[1, 1], blocks, x)
    for ax in axes.flat:
        ax.set_xlim(0.4, len(layers) + 0.6)
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlabel("weight layer, in depth order", fontsize=8)
    for ax in axes[1]:
        _name_ticks(ax, layers)
    _title(fig, report)
    _legend(fig, report, handles)
    return fig


def render(report: Report, fmt: str = "png") -> bytes:
    """The figure as PNG, SVG or PDF bytes, identical for identical reports."""
    buffer = io.BytesIO()
    metadata = {"png": {"Software": None},
                "svg": {"Date": None, "Creator": None},
                "pdf": {"Creator": None, "Producer": None, "CreationDate": None}}[fmt]
    # SVG element ids are random unless salted; rc_context restores the setting after.
    with matplotlib.rc_context({"svg.hashsalt": "varprobe", "svg.fonttype": "path"}):
        figure(report).savefig(buffer, format=fmt, dpi=DPI, metadata=metadata)
    return buffer.getvalue()


def save(report: Report, path: str | Path) -> Path:
    """Render by extension (.png, .svg, .pdf) and write atomically; VarprobeError if not."""
    path = Path(path)
    fmt = format_of(path)
    data = render(report, fmt)
    try:
        write_atomic(path, data)
    except OSError as exc:
        raise VarprobeError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def format_of(path: str | Path) -> str:
    """The image format a path asks for; VarprobeError for anything but png/svg/pdf."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise VarprobeError(f"cannot plot to {path}: the name must end in .png, .svg or .pdf")
    return FORMATS[suffix]


# --- data ------------------------------------------------------------------------------
def _blocks(report: Report) -> tuple[list[Layer], list[list[Layer]]]:
    """The weight layers, and for each the layers recorded after it up to the next one.

    A block (Linear -> BatchNorm -> ReLU) is one point on the depth axis: its flags are
    drawn there, and so are its activation's zero and dead fractions.
    Without weight layers every recorded layer is its own point.
    """
    layers = report.weight_layers or report.layers
    if not report.weight_layers:
        return layers, [[layer] for layer in layers]
    blocks: list[list[Layer]] = []
    for layer in report.layers:
        if layer.kind == "weight":
            blocks.append([layer])
        elif blocks:
            blocks[-1].append(layer)
    return layers, blocks


def _values(layers: list[Layer], get, d: Direction | None = None) -> np.ndarray:
    """One float per layer; None, non-finite and (for log axes) non-positive become NaN.
    For a Direction that plots energy, each value times the layer's output elements."""
    out = []
    for layer in layers:
        value = get(layer)
        if value is not None and d is not None and d.energy:
            value = value * math.prod(layer.shape) if layer.shape else None
        out.append(value if value is not None and math.isfinite(value) else math.nan)
    return np.array(out, dtype=float)


def _measured(layer: Layer, d: Direction) -> float | None:
    stats = getattr(layer, d.stats)
    return getattr(stats, d.measured) if stats is not None else None


def _predicted(prediction, d: Direction) -> float | None:
    return getattr(prediction, d.predicted) if prediction is not None else None


def _interval(layer: Layer, d: Direction) -> tuple[float | None, float | None]:
    bounds = layer.intervals.get(f"{d.stats}.{d.measured}") or [None, None]
    return bounds[0], bounds[-1]


def _predicted_inputs(layers: list[Layer], get) -> np.ndarray:
    """A prediction's E[x²] at each weight layer's input (``get(layer)`` gives the
    layer's Prediction): its own ``input_var`` where the graph walk gave one, else, where
    the layer before it feeds it directly (one more weight layer in series on the same
    stretch), He's E[x_l²] = g·E[y_(l-1)²] with g the gain of the activation between."""
    out = []
    for k, layer in enumerate(layers):
        p = get(layer)
        value = p.input_var if p is not None else None
        if value is None and k > 0:
            prev, q = layers[k - 1], get(layers[k - 1])
            # no structure recorded (a report from before it, or synthetic): module order
            chained = (layer.stretch is None and prev.stretch is None) or (
                layer.stretch == prev.stretch and layer.depth is not None
                and prev.depth == layer.depth - 1)
            if q is not None and q.forward_var is not None and chained:
                gain = layer.input_gain if layer.input_gain is not None else 1.0
                value = q.forward_var * gain
        out.append(value if value is not None and math.isfinite(value) else math.nan)
    return np.array(out, dtype=float)


def _references(report: Report, layers: list[Layer]) -> tuple[np.ndarray, str]:
    """Each layer's forward reference E[x²], as the diagnosis holds its input against
    (varprobe.structure); one reference for all where the report has none."""
    refs = _values(layers, lambda la: la.reference_second_moment)
    if np.isfinite(refs).any():
        single = len({la.reference for la in layers}) == 1
        what = f"{layers[0].reference}'s E[x²]" if single else "each layer's reference"
        return np.where(refs > 0, refs, np.nan), what
    value, what = _reference(report, layers)
    return np.full(len(layers), value if value else np.nan), what


def _worst(flags) -> str | None:
    severities = [f.severity for f in flags if f.severity in SEVERITY_ORDER]
    return min(severities, key=SEVERITY_ORDER.index) if severities else None


def _flags_about(block: list[Layer], word: str | tuple[str, ...]) -> list:
    words = (word,) if isinstance(word, str) else word
    return [f for layer in block for f in layer.flags if any(w in f.code for w in words)]


def forward_band(report: Report) -> tuple[float, float]:
    """The [vanishing, exploding] band of E[y²] over the reference, as diagnosed."""
    band = (report.settings.get("thresholds") or {}).get("forward") or DEFAULT_BAND
    return band[0], band[1]


def _reference(report: Report, layers: list[Layer]) -> tuple[float | None, str]:
    """What the forward band is relative to, as the diagnosis takes it: the network
    input's E[x²], or the first weight layer's output when the input is token ids."""
    value, what = report.input.second_moment, "the input's E[x²]"
    if value is None and layers and layers[0].forward is not None:
        value, what = layers[0].forward.second_moment, "the first layer's E[y²]"
    return (value if value is not None and math.isfinite(value) and value > 0 else None), what


# --- panels ----------------------------------------------------------------------------
def _signal(ax: Axes, report: Report, layers: list[Layer], blocks: list[list[Layer]],
            x: np.ndarray, d: Direction) -> list:
    """Measured, predicted and counterfactual curves on a log axis; returns the handles."""
    # Forward, every value is over the E[x²] of the tensor the diagnosis holds that
    # layer against, so that one band serves all and a curve outside it is a flag.
    scale = _references(report, layers)[0] if d is FORWARD else np.ones(len(layers))
    measured = _values(layers, lambda la: _measured(la, d), d) / scale
    predicted = (_predicted_inputs(layers, lambda la: la.predicted) if d is FORWARD else
                 _values(layers, lambda la: _predicted(la.predicted, d), d)) / scale
    lo = _values(layers, lambda la: _interval(la, d)[0], d) / scale
    hi = _values(layers, lambda la: _interval(la, d)[1], d) / scale
    curves = [measured, predicted]
    if np.isfinite(lo).any() and np.isfinite(hi).any():
        ax.fill_between(x, lo, hi, color=GREY, alpha=0.4, lw=0, label="measured, 95% interval")
        curves += [lo, hi]
    few = len(layers) <= CURVE_MARKERS_UP_TO
    for name, style in SCHEMES.items():
        values = (_predicted_inputs(layers, lambda la, n=name: la.schemes.get(n))
                  if d is FORWARD else
                  _values(layers, lambda la, n=name: _predicted(la.schemes.get(n), d), d)) / scale
        if np.isfinite(values).any():
            _curve(ax, x, values, style, few, lw=1.8)
            curves.append(values)
    # The prediction is drawn wider, under the measurement, so that both stay visible
    # where they agree.
    if np.isfinite(predicted).any():
        _curve(ax, x, predicted, PREDICTED, few, lw=2.6)
    if np.isfinite(measured).any():
        ax.plot(x, measured, color=BLACK, lw=1.4, label="measured",
                marker="o" if len(layers) <= MARKERS_UP_TO else None, ms=3)
    ax.set_title(d.title, loc="left", fontsize=10)
    ax.set_ylabel(d.ylabel, fontsize=8)
    _zones(ax, report, layers, d, curves)
    _flag_rug(ax, blocks, x, d)
    if not any(np.isfinite(c).any() for c in curves):
        _empty(ax, "nothing measured or predicted")
    ax.grid(True, which="major", axis="y", color="#dddddd", lw=0.6)
    return ax.get_legend_handles_labels()[0]


def _curve(ax: Axes, x, values, style: dict, markers: bool, lw: float) -> None:
    ax.plot(x, values, color=style["color"], ls=style["ls"], lw=lw, label=style["label"],
            marker=style["marker"] if markers else None, ms=6, mfc="none")


def _flag_rug(ax: Axes, blocks: list[list[Layer]], x: np.ndarray, d: Direction) -> None:
    """A tick along the bottom edge, in the severity colour, under each flagged layer.

    Flags that name the other direction are left to its panel; those that name none
    (nonfinite, dead units, ...) show on both. A rug stays legible at 300 layers, where
    rings around the points would hide the curves.
    """
    other = "backward" if d is FORWARD else "forward"
    width = 1.0 if len(blocks) > MARKERS_UP_TO else 0.9
    for i, block in enumerate(blocks):
        severity = _worst([f for layer in block for f in layer.flags
                           if f.severity in FLAGGED and other not in f.code])
        if severity:
            ax.add_patch(Rectangle((x[i] - width / 2, 0), width, 0.035, lw=0,
                                   color=SEVERITY_COLOUR[severity], antialiased=False,
                                   transform=ax.get_xaxis_transform()))


def _zones(ax: Axes, report: Report, layers, d: Direction, curves) -> None:
    """Log y axis spanning the data and the band; forward, the zones outside it shaded.

    Forward, the curves are over each layer's reference (the E[x²] of the last
    normalization, embedding, pooling or attention before it, or the network input:
    varprobe.structure), so the band is the verdict's own. Backward there is no band on
    this axis to shade: the diagnosis multiplies each chain's measured backward
    multipliers, and its flags are what the panel marks.
    """
    finite = np.concatenate([c[np.isfinite(c) & (c > 0)] for c in curves])
    refs, what = _references(report, layers) if d is FORWARD else (None, "")
    vanishing, exploding = forward_band(report)
    bounds = [vanishing, exploding] if refs is not None and np.isfinite(refs).any() else []
    values = np.concatenate([finite, bounds]) if bounds or finite.size else np.array([1.0])
    low, high = values.min() / 6, values.max() * 6
    ax.set_yscale("log")
    ax.set_ylim(low, high)
    if bounds:
        for y0, y1 in ((low, bounds[0]), (bounds[1], high)):
            ax.axhspan(y0, y1, color=VERMILION, alpha=ZONE_ALPHA, lw=0)
        for bound in bounds:
            ax.axhline(bound, color=VERMILION, lw=0.8, alpha=0.6)
        ax.set_ylabel(f"E[y²] over {what} (log)", fontsize=8)


def _multipliers(ax: Axes, layers: list[Layer], blocks, x: np.ndarray) -> None:
    """Bars: the forward multiplier, coloured by the layer's shrinks/amplifies flag.
    A step line: the backward multiplier."""
    forward = _values(layers, lambda la: _log2(getattr(la, "forward_multiplier", None)))
    backward = _values(layers, lambda la: _log2(getattr(la, "backward_multiplier", None)))
    severities = [_worst([f for f in _flags_about(b, ("shrink", "amplif"))
                          if f.severity in FLAGGED]) for b in blocks]
    ax.axhline(0, color=BLACK, lw=0.8)
    both = np.concatenate([forward, backward])
    if np.isfinite(both).any():
        _columns(ax, x, forward, [SEVERITY_COLOUR[s] for s in severities])
        if np.isfinite(backward).any():
            ax.hlines(backward, x - 0.45, x + 0.45, color=BLACK, lw=1.4,
                      label="backward multiplier n̂·Var[w]·g′")
        top = max(1.0, float(np.nanmax(np.abs(both)))) * 1.2
        ax.set_ylim(-top, top)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=8, integer=True, symmetric=True))
        ax.yaxis.set_major_formatter(FuncFormatter(_times))
        shown = [s for s in (None, "warning", "error") if s in severities]
        handles = [Patch(color=SEVERITY_COLOUR[s], label="forward multiplier" + (
            f" ({s})" if s else "")) for s in shown]
        ax.legend(handles=handles + ax.get_legend_handles_labels()[0], fontsize=7.5,
                  loc="best", framealpha=0.85)
    else:
        ax.set_ylim(-1.2, 1.2)
        ax.set_yticks([0], ["×1"])
        _empty(ax, "no multipliers predicted")
    ax.set_ylabel("multiplier (log2 scale)", fontsize=8)
    ax.set_title("(c) each layer's multiplier n·Var[w]·g  (×1 holds the signal)", loc="left",
                 fontsize=10)
    ax.grid(True, axis="y", color="#dddddd", lw=0.6)


def _columns(ax: Axes, x: np.ndarray, heights: np.ndarray, colours, width: float = 0.8,
             **kwargs) -> None:
    """Bars that stay solid at any count: beyond a few dozen they touch, unsmoothed,
    so that 300 one-pixel bars do not dissolve into moiré."""
    if len(x) > MARKERS_UP_TO:
        kwargs.update(width=1.0, antialiased=False)
    else:
        kwargs.update(width=width)
    ax.bar(x, np.nan_to_num(heights), color=colours, lw=0, **kwargs)


def _log2(value: float | None) -> float | None:
    return math.log2(value) if value is not None and value > 0 else None


def _times(value: float, _pos) -> str:
    """A log2 tick as the factor it stands for: 1 -> ×2, -2 -> ×1/4."""
    factor = 2.0 ** abs(value)
    return f"×{factor:g}" if value >= 0 else f"×1/{factor:g}"


def _dead(ax: Axes, blocks: list[list[Layer]], x: np.ndarray) -> None:
    """After each weight layer's activation (its own output when none follows)."""
    after = [next((la for la in b[1:] if la.kind == "activation"), b[0]) for b in blocks]
    zero = _values(after, lambda la: la.forward.zero_fraction if la.forward else None)
    dead = _values(after, lambda la: la.forward.dead_fraction if la.forward else None)
    if np.isfinite(zero).any() or np.isfinite(dead).any():
        _columns(ax, x, zero, SKY, label="zero fraction (elements)")
        _columns(ax, x, dead, BLUE, width=0.5,
                 label="dead fraction (units zero for every sample)")
        worst = [_worst([f for f in _flags_about(b, "dead") if f.severity in FLAGGED])
                 for b in blocks]
        flagged = [i for i, severity in enumerate(worst) if severity]
        if flagged:
            ax.scatter(x[flagged], np.nan_to_num(zero[flagged]) + 0.05, marker="v", s=28,
                       color=[SEVERITY_COLOUR[worst[i]] for i in flagged], zorder=5,
                       label="flagged: dead units")
        ax.legend(fontsize=7.5, loc="upper left", framealpha=0.85)
        if not (np.nan_to_num(zero).any() or np.nan_to_num(dead).any()):
            _empty(ax, "no output element is exactly zero")
    else:
        _empty(ax, "nothing measured")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("fraction", fontsize=8)
    ax.set_title("(d) zero and dead fractions after each layer's activation", loc="left",
                 fontsize=10)
    ax.grid(True, axis="y", color="#dddddd", lw=0.6)


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center",
            color="#555555", fontsize=10)


# --- labels ----------------------------------------------------------------------------
def _name_ticks(ax: Axes, layers: list[Layer]) -> None:
    """Layer names under the bottom panels, thinned so that rotated labels never touch."""
    step = max(1, math.ceil(len(layers) / MAX_NAME_LABELS))
    ticks = list(range(0, len(layers), step))
    ax.set_xticks([i + 1 for i in ticks],
                  [_short(layers[i].label) for i in ticks],
                  rotation=90, fontsize=6.5)
    ax.tick_params(axis="x", length=2, pad=2)


def _short(name: str, width: int = 22) -> str:
    """The end of a long qualified name is the informative part: "…blocks.3.attn.proj"."""
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _title(fig: Figure, report: Report) -> None:
    s, word = report.summary, state(report)
    colour = {UNHEALTHY: VERMILION, HEALTHY: GREEN}.get(word, GREY)
    bold = {"size": 15, "weight": "bold"}
    headline = HPacker(pad=0, sep=0, align="baseline", children=[
        TextArea(f"{model_name(report)} · ", textprops=bold),
        TextArea(f"{word} · {s.counts()}",
                 textprops={**bold, "color": colour})])
    fig.add_artist(AnchoredOffsetbox("upper left", child=headline, pad=0, borderpad=0,
                                     frameon=False, bbox_to_anchor=(0.01, 0.99),
                                     bbox_transform=fig.transFigure))
    fig.text(0.01, 0.952, _settings_line(report), fontsize=9, color="#333333", va="top")
    lines = [" ".join(s.verdict.split())] if s.verdict else []
    if s.fix is not None:
        lines.append(f"fix: {s.fix.short}, predicted end to end "
                     f"{before_after(s.fix.before, s.fix.after)}")
    for y, line in zip((0.931, 0.910), lines):
        fig.text(0.01, y, textwrap.shorten(line, 230, placeholder=" …"), fontsize=9, va="top")


def _legend(fig: Figure, report: Report, handles: list) -> None:
    """One legend for panels (a) and (b), above them, so that it hides no data."""
    unique = list({h.get_label(): h for h in handles}.values())
    vanishing, exploding = forward_band(report)
    layers = report.weight_layers or report.layers
    if np.isfinite(_references(report, layers)[0]).any():
        unique.append(Patch(color=VERMILION, alpha=ZONE_ALPHA * 2,
                            label=f"forward: vanishing < {vanishing:g}×, "
                                  f"exploding > {exploding:g}×"))
    severities = {_worst([f for f in la.flags if f.severity in FLAGGED])
                  for la in report.layers} - {None}
    unique += [Patch(color=SEVERITY_COLOUR[s], label=f"flagged layer ({s})")
               for s in FLAGGED if s in severities]
    columns = len(unique) if len(unique) <= 6 else math.ceil(len(unique) / 2)
    fig.legend(handles=unique, loc="upper center", bbox_to_anchor=(0.5, 0.89), ncol=columns,
               fontsize=8, frameon=False, handlelength=2.6)


def _settings_line(report: Report) -> str:
    s, i = report.settings, report.input
    parts = [report.model.target, f"{report.model.parameters:,} parameters"]
    if isinstance(i.shape, list):
        parts.append(f"input {tuple(i.shape)} {i.dtype or ''}".rstrip())
    parts += [f"seed {s.get('seed')}", f"batch {s.get('batch_size')}",
              f"{s.get('mode')} mode", f"init {s.get('init')}",
              {"randn": "cotangent N(0,1)", "loss": "loss(output)",
               "given": "given cotangent"}.get(s.get("grad"), f"grad {s.get('grad')}")]
    if (s.get("trials") or 1) > 1:
        parts.append(f"{s['trials']} trials")
    return " · ".join(str(p) for p in parts)
