"""What the walk carries: a predicted second moment and its shared mean (``Signal``), a
node's value or why it has none (``Value``), a gradient (``Grad``), and what the walk
says about one recorded call (``Call``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from varprobe.report import Report


@dataclass(frozen=True)
class Lead:
    """E[x²] at one position that differs from the others (a class token;
    theory.positions): ``at`` = (its axis counted from the end, its index, the number
    of positions on that axis)."""

    at: tuple[int, int, int]
    m2: float


@dataclass(frozen=True)
class Signal:
    """A predicted second moment, and the share of it that is a per-unit mean.

    ``mean_share`` matters only where a layer normalizes each unit over the batch
    (BatchNorm): it divides by the per-unit variance, m2 * (1 - mean_share). After a
    ReLU every unit has mean sqrt(q/2pi), so the share is 1/pi, and the next layer
    passes it on (y_c = w_c . x has batch mean w_c . mean(x)).
    """

    m2: float
    mean_share: float = 0.0
    r: float = 0.0  # uncentered token correlation (attention.md §3.7), at least mean_share
    lead: Lead | None = None  # one position apart (theory.positions); m2 is the mean
    width: float | None = None  # directions the features span (theory.widths); None: all

    def __init__(self, m2: float, mean_share: float = 0.0, r: float = 0.0,
                 lead: Lead | None = None, width: float | None = None) -> None:
        # the fields set in one step: a frozen dataclass's own __init__ sets each through
        # object.__setattr__, 3x the cost, and every node of every walk makes a few
        d = self.__dict__
        d["m2"], d["mean_share"], d["r"], d["lead"], d["width"] = m2, mean_share, r, lead, width


@dataclass
class Value:
    """A node's predicted second moment, or why there is none (``broken``)."""

    signal: Signal | None
    broken: str | None = None
    note: str | None = None
    at: int = -1  # the node where ``note`` was made: the latest carry names the value
    mu: float = 0.0  # the mean every element shares (after a rectifier), not a unit's own
    rel: float | None = 1.0  # a scheme's value over the actual walk's, before a break
    pre: tuple | None = None  # a rectifier's output: its input's (mu, var, slope)
    mix: tuple | None = None  # a zero-mean branch plus a rectified stream (theory.residual)
    profile: Any = None  # E[x^2] over the positions, mean 1 (theory.profile); None: uniform
    centred: Any = None  # the profile once each channel's mean is taken out; None: the same
    gram: Any = None  # the tokens' Gram shape, mean diagonal 1 (theory.tokens); None: alike


@dataclass
class Grad:
    var: float = 0.0
    broken: str | None = None
    note: str | None = None
    sparse: bool = False  # it reaches only a slice of the positions (a class token)
    rel: float | None = 1.0  # a scheme's gradient over the actual walk's, before a break
    window: float | None = None  # it lands only on the maxima of windows this large
    maxed: float = 0.0  # of var, the part that does (``window`` set): the rest does not
    cover: float = 1.0  # the share of the positions it reaches, where ``sparse``
    # what a gate broadcast over positions collects (theory.shared): E[ḡ^2], E[H̄^2],
    # E[ḡ H̄] of the means over one sample's and channel's positions
    shared: float = 0.0
    curv: float = 0.0
    cross: float = 0.0
    shared0: float = 0.0  # E[ḡ0^2], ḡ0 the shared gradient where its tensor's own
    cross0: float = 0.0   # rectifier input crosses 0; E[ḡ0 H̄] (theory.shared)
    profile: Any = None  # Var over the positions, mean 1 (theory.profile); None: uniform
    rectified: float = 0.0  # k_V - 1 of what passed a residual sum's rectifier (residual)
    deferred: float = 0.0  # variance its rectifier adds back (theory.residual: k_V)
    centred: float = 0.0  # of shared, the part with no mean over the batch (theory.shared)
    lead: float | None = None  # E[g²] at the forward value's lead position (positions)
    # E[g_i g_j] over pairs of tokens other than the lead: the vector self-attention's
    # value path hands every key alike (theory.positions; the closed-form walks)
    pairs: float = 0.0
    gram: Any = None  # the gradient's Gram shape over the tokens (theory.tokens)
    pool: Any = None  # with ``window``: (the max pool, its input's spatial shape)


def fork(g: Grad) -> Grad:
    """A copy of ``g`` that more consumers' gradients can be added to: what
    dataclasses.replace(g) makes (every field, none other set), at a tenth of its cost
    (every node of every walk)."""
    out = Grad.__new__(Grad)
    out.__dict__.update(g.__dict__)
    return out


@dataclass
class Call:
    """What the walk says about one recorded call."""

    input: Value | None = None
    forward: float | None = None
    forward_break: str | None = None
    forward_note: str | None = None
    grad: float | None = None
    grad_input: float | None = None
    backward_break: str | None = None
    backward_note: str | None = None


def start_signal(report: Report) -> tuple[Signal | None, str | None]:
    """The network input's measured E[x^2] (1 assumed when nothing was measured)."""
    measured = measured_m2(report.input)
    if measured is not None:
        share = measured_share(report.input)
        return Signal(measured, share, share), None
    if report.input.dtype is not None and "int" in report.input.dtype:
        return None, None  # token ids: the first (embedding) layer starts the walk
    return Signal(1.0), "input E[x²] = 1 assumed"


def measured_m2(stats) -> float | None:
    value = stats.second_moment if stats is not None else None
    return value if value is not None and value == value and abs(value) != float("inf") \
        else None


def measured_share(stats) -> float:
    """mean^2 / E[x^2] of a measured tensor: its shared mean (a lower bound on the
    per-unit one, exact after an activation, where every unit has the same mean)."""
    if stats is None or not stats.second_moment or stats.mean is None:
        return 0.0
    return min(1.0, stats.mean * stats.mean / stats.second_moment)
