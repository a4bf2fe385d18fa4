"""What every rule family shares: the grid, the sandwich model, the inits, the measurement.

A case (``Spec``) builds a tiny model with the op between two weight layers, draws an
input, probes it with ``varprobe.probe`` (the public API only) for ``seeds`` seeds and
compares one measured number forward and one backward with varprobe's prediction of it.

Noise (docs/theory-review.md §10). The forward number is E[y^2] of the weight layer after
the op, whose prediction n E[w^2] E[x^2] uses that layer's own measured E[w^2]: what is
left is the chi-square of W along the directions the input spans, a relative sd of
sqrt(2/n_out) per seed when the input is collinear (a shared mean; the worst case) and
far less when it is spread over many directions. ``POST_OUT`` = 1024 outputs and S seeds
make the 3-sigma bound of the seed mean 3 sqrt(2/(1024 S)) = 4.7% at S = 8. The backward
number is Var[dL/dx] at the weight layer before the op; the cotangent is N(0, 1), fresh
per element, so its noise is the backward factor's, sd sqrt(0.75/n) per seed at width n
(§10), bound 3 sqrt(0.75/(n S)): 5.7% at n = 256, S = 8. A case whose own noise is
larger (dropout masks, small batches) says so in ``extra_noise``.
"""

from __future__ import annotations

import math
import statistics
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

INITS = ("he", "xavier", "default", "std0.02")
SCALES = (0.1, 1.0, 10.0)
MEANS = (0.0, 1.0)
# An op placed after a ReLU keeps mean 0: with a mean the ReLU's own gain is off (the
# activations family measures that), and the error would be charged to the op.
AFTER_RELU_MEANS = (0.0,)
WIDTHS = (64, 256, 1024)
POST_OUT = 1024  # outputs of the weight layer after the op: its chi-square noise is sqrt(2/1024)
BATCH = 512


@dataclass(frozen=True)
class Knobs:
    """The grid axes every rule shares. ``scale`` multiplies the network input; ``mean``
    is the op input's mean in units of its std (a constant bias on the layer before);
    ``width`` the op's width (features or channels); ``init`` the weight layers' init."""

    scale: float = 1.0
    mean: float = 0.0
    width: int = 256
    init: str = "he"

    def label(self) -> str:
        return f"scale {self.scale:g}, mean {self.mean:g}σ, width {self.width}, {self.init}"


def grid(scales: Iterable[float] = SCALES, means: Iterable[float] = MEANS,
         widths: Iterable[int] = WIDTHS, inits: Iterable[str] = INITS,
         base: Knobs = Knobs()) -> list[Knobs]:
    """A star around ``base``: scale x mean at the base width and init, width x init at
    the base scale and mean, and mean x init at the base scale and width."""
    out: list[Knobs] = []
    for k in ([replace(base, scale=s, mean=m) for s in scales for m in means]
              + [replace(base, width=w, init=i) for w in widths for i in inits]
              + [replace(base, mean=m, init=i) for m in means for i in inits]):
        if k not in out:
            out.append(k)
    return out


# --- inits -------------------------------------------------------------------------------

def _fans(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight (in, out)
        return w.shape[0], w.shape[1]
    return nn.init._calculate_fan_in_and_fan_out(w)


def is_weight_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or \
        type(module).__name__ == "Conv1D"


def init_(model: nn.Module, scheme: str) -> nn.Module:
    """Draw every Linear/Conv/Conv1D weight from ``scheme`` (torch's fans, zero bias):
    he N(0, 2/fan_in), xavier N(0, 2/(fan_in+fan_out)), std0.02 N(0, 0.02^2) (GPT-2);
    default leaves torch's own kaiming_uniform_(a=sqrt 5) weights and uniform biases."""
    if scheme == "default":
        return model
    for m in model.modules():
        if not is_weight_layer(m):
            continue
        fan_in, fan_out = _fans(m)
        std = {"he": math.sqrt(2 / fan_in), "xavier": math.sqrt(2 / (fan_in + fan_out)),
               "std0.02": 0.02}[scheme]
        with torch.no_grad():
            m.weight.normal_(0, std)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    return model


def set_mean(layer: nn.Module, knobs: Knobs) -> None:
    """Give the layer's output the mean ``knobs.mean`` x its std: a constant bias (std from
    the layer's own weights and the input's second moment scale^2)."""
    if not knobs.mean:
        return
    fan_in, _ = _fans(layer)
    std = knobs.scale * math.sqrt(fan_in * float(layer.weight.detach().pow(2).mean()))
    with torch.no_grad():
        layer.bias.fill_(knobs.mean * std)


# --- models --------------------------------------------------------------------------------

class Sandwich(nn.Module):
    """pre -> fn(self, h) -> post. ``fn`` runs inside this module's forward, so varprobe's
    graph sees the functional ops it calls; ``parts`` become child modules."""

    def __init__(self, pre: nn.Module, fn: Callable[[Any, torch.Tensor], torch.Tensor],
                 post: nn.Module, **parts: nn.Module):
        super().__init__()
        self.pre = pre
        for name, part in parts.items():
            setattr(self, name, part)
        self.post = post
        self._fn = fn

    def forward(self, x):
        return self.post(self._fn(self, self.pre(x)))


def linear_sandwich(knobs: Knobs, fn, op_width: int | None = None, post_in: int | None = None,
                    **parts) -> Callable[[], nn.Module]:
    """Linear(width, width) -> fn -> Linear(post_in or width, POST_OUT), init and mean
    from ``knobs``. Called under a seeded RNG."""
    n = knobs.width

    def build() -> nn.Module:
        model = Sandwich(nn.Linear(n, op_width or n), fn,
                         nn.Linear(post_in or op_width or n, POST_OUT),
                         **{k: (v() if callable(v) and not isinstance(v, nn.Module) else v)
                            for k, v in parts.items()})
        init_(model, knobs.init)
        set_mean(model.pre, knobs)
        return model
    return build


def conv_sandwich(knobs: Knobs, fn, pre: Callable[[int], nn.Module] | None = None,
                  post_in: int | None = None, dims: int = 2,
                  **parts) -> Callable[[], nn.Module]:
    """Conv(width, width, 3, padding 1) -> fn -> Conv(post_in or width, POST_OUT, 1)
    (``dims``-d), init and mean from ``knobs``. Called under a seeded RNG."""
    n = knobs.width
    conv = {1: nn.Conv1d, 2: nn.Conv2d}[dims]

    def build() -> nn.Module:
        model = Sandwich(pre(n) if pre else conv(n, n, 3, padding=1), fn,
                         conv(post_in or n, POST_OUT, 1),
                         **{k: (v() if callable(v) and not isinstance(v, nn.Module) else v)
                            for k, v in parts.items()})
        init_(model, knobs.init)
        set_mean(model.pre, knobs)
        return model
    return build


def gaussian(shape: tuple[int, ...], scale: float = 1.0, corr: float = 0.0,
             corr_dims: tuple[int, ...] = ()) -> Callable[[torch.Generator], torch.Tensor]:
    """N(0, scale^2) inputs; ``corr`` > 0 shares a component across ``corr_dims`` (token
    or pixel positions): x = scale (sqrt(r) z_shared + sqrt(1-r) z), so any two positions
    of one sample have correlation r."""
    def draw(gen: torch.Generator) -> torch.Tensor:
        z = torch.randn(shape, generator=gen)
        if corr:
            shared_shape = tuple(1 if d in corr_dims else s for d, s in enumerate(shape))
            shared = torch.randn(shared_shape, generator=gen)
            z = math.sqrt(corr) * shared + math.sqrt(1 - corr) * z
        return scale * z
    return draw


# --- the measurement ------------------------------------------------------------------------

@dataclass
class Spec:
    """One grid case. ``forward``/``backward``: (layer name, what) with what one of
    "forward" (E[y^2] vs predicted.forward_var), "input" (E[x^2] vs
    predicted.input_var), "backward" (Var[dL/dy] vs predicted.backward_var),
    "backward_input" (Var[dL/dx] vs predicted.backward_input_var); None: not applicable.
    ``prepare(model, gen)`` runs before the probe (calibration, train/eval)."""

    rule: str
    case: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], Any]
    width: int
    forward: tuple[str, str] | None = ("post", "forward")
    backward: tuple[str, str] | None = ("pre", "backward_input")
    prepare: Callable[[nn.Module, torch.Generator], None] | None = None
    fwd_out: int = POST_OUT          # outputs of the forward point's layer (its chi-square)
    extra_noise: tuple[float, float] = (0.0, 0.0)  # per-seed relative sd beyond §10's
    tags: dict[str, Any] = field(default_factory=dict)

    def bounds(self, seeds: int) -> tuple[float, float]:
        """3 sd of the seed mean (docs/theory-review.md §10): forward the chi-square of the
        measuring layer's W, sqrt(2/n_out); backward the backward factor, sqrt(0.75/n)."""
        f = math.hypot(math.sqrt(2 / self.fwd_out), self.extra_noise[0])
        b = math.hypot(math.sqrt(0.75 / self.width), self.extra_noise[1])
        return 3 * f / math.sqrt(seeds), 3 * b / math.sqrt(seeds)


def _pair(layer, what: str) -> tuple[float | None, float | None]:
    p = layer.predicted
    if what == "forward":
        return layer.forward and layer.forward.second_moment, p and p.forward_var
    if what == "input":
        return layer.input and layer.input.second_moment, p and p.input_var
    if what == "backward":
        return layer.backward and layer.backward.var, p and p.backward_var
    if what == "backward_input":
        return layer.backward_input and layer.backward_input.var, p and p.backward_input_var
    raise ValueError(what)


CARRIED = ("carried", "fell back")


def _side(ratios: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(ratios)
    se = statistics.stdev(ratios) / math.sqrt(len(ratios)) if len(ratios) > 1 else 0.0
    return mean, se


def measure(spec: Spec, seeds: int = 8) -> dict:
    """Probe ``spec`` for ``seeds`` seeds: one row (see bench/accuracy/__init__.py)."""
    import varprobe

    ratios: dict[str, list[float]] = {"forward": [], "backward": []}
    missing: dict[str, str] = {}
    notes: dict[str, str] = {}
    # Seeds of their own per case (a hash of rule and case), so that the errors of
    # different cases are independent draws and their percentiles mean something.
    base = zlib.crc32(f"{spec.rule}|{spec.case}".encode()) % 1_000_000
    for s in range(base, base + seeds):
        torch.manual_seed(s)  # the weights
        model = spec.build()
        gen = torch.Generator().manual_seed(s + 1)  # calibration and input draws
        if spec.prepare is not None:
            spec.prepare(model, gen)
        x = spec.inputs(gen)
        report = varprobe.probe(model, x, seed=s + 2)  # the cotangent (and dropout)
        by_name = {layer.name: layer for layer in report.layers}
        for side, point in (("forward", spec.forward), ("backward", spec.backward)):
            if point is None:
                continue
            layer = by_name.get(point[0])
            if layer is None:
                missing[side] = f"no layer {point[0]!r} in the report"
                continue
            meas, pred = _pair(layer, point[1])
            note = (layer.predicted.note if layer.predicted else None) or ""
            graph_notes = [n for n in report.notes if n.startswith("graph")]
            notes[side] = "; ".join(dict.fromkeys(
                x for x in [*note.split("; "), *graph_notes] if x))
            if pred is None or meas is None:
                why = (layer.predicted.note if layer.predicted else None) or \
                    "; ".join(f"{k}: {v}" for k, v in layer.unavailable.items()) or \
                    "predicted is None"
                missing[side] = why
                continue
            ratios[side].append(meas / pred if pred else math.inf)
    fb, bb = spec.bounds(seeds)
    row: dict[str, Any] = {"rule": spec.rule, "case": spec.case, "width": spec.width,
                           "seeds": seeds, "forward_bound": fb if spec.forward else None,
                           "backward_bound": bb if spec.backward else None, **spec.tags}
    status, shown = [], []
    for side, point in (("forward", spec.forward), ("backward", spec.backward)):
        row[f"{side}_error"] = row[f"{side}_ratio"] = row[f"{side}_se"] = None
        if point is None:
            continue
        if side in missing:
            status.append(f"{side}: no prediction")
            shown.append(missing[side])
            continue
        mean, se = _side(ratios[side])
        row[f"{side}_ratio"], row[f"{side}_se"] = mean, se
        row[f"{side}_error"] = abs(mean - 1)
        if any(c in notes.get(side, "") for c in CARRIED):
            status.append(f"{side}: carried")
            shown.append(notes[side])
    row["status"] = "; ".join(status) or "ok"
    row["note"] = "; ".join(dict.fromkeys(
        piece for text in shown for piece in text.split("; "))) or None
    return row


def run(specs: Iterable[Spec], seeds: int = 8) -> list[dict]:
    return [measure(spec, seeds) for spec in specs]


def beyond_noise(row: dict, side: str) -> bool:
    """The error exceeds both the theory's noise bound and 3 empirical standard errors."""
    err, bound, se = row.get(f"{side}_error"), row.get(f"{side}_bound"), row.get(f"{side}_se")
    return err is not None and bound is not None and err > bound and err > 3 * (se or 0.0)
