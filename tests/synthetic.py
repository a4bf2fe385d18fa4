"""Reports built from the dataclasses, for renderer tests that need no model.

``chain(n)`` is what varprobe records for an n-layer Linear+ReLU MLP whose every step
multiplies the signal by ``step``: Xavier init on ReLU gives ½ (docs/theory-review.md §1).
"""

from __future__ import annotations

import dataclasses
import math

from varprobe.report import (
    BackwardStats,
    Fix,
    Flag,
    ForwardStats,
    Layer,
    ModelInfo,
    Prediction,
    Report,
    Summary,
    TensorInfo,
)

LAYER_FIELDS = {f.name for f in dataclasses.fields(Layer)}


def chain(n: int = 30, *, step: float = 0.5, predictions: bool = True, flags: bool = True,
          intervals: bool = False, width: int = 64) -> Report:
    layers: list[Layer] = []
    for i in range(n):
        fwd, bwd = step ** i, step ** (n - 1 - i)
        jitter = 1 + 0.05 * math.sin(i)  # measured scatters around the prediction
        linear = Layer(index=2 * i, name=f"layers.{2 * i}", call=0, type="Linear",
                       kind="weight", shape=[256, width], fan_in=width, fan_out=width,
                       weight_var=2 * step / width, activation="ReLU", gain=0.5,
                       input=_fwd(fwd / step if i else 1.0),
                       forward=_fwd(fwd * jitter), backward=_bwd(bwd * jitter))
        relu = Layer(index=2 * i + 1, name=f"layers.{2 * i + 1}", call=0, type="ReLU",
                     kind="activation", shape=[256, width], input=linear.forward,
                     forward=_fwd(fwd * jitter / 2, zero=0.5, dead=min(0.3, 0.01 * i)),
                     backward=_bwd(bwd))
        if predictions:
            linear.predicted = Prediction(fwd, bwd, basis="chain")
            linear.schemes = {"xavier": Prediction(fwd, bwd), "he": Prediction(1.0, 1.0)}
            _set(linear, forward_multiplier=step, backward_multiplier=step)
        if intervals:
            linear.intervals = {"forward.second_moment": [fwd * 0.8, fwd * 1.25],
                                "backward.var": [bwd * 0.8, bwd * 1.25]}
        if flags:
            _flag(linear, relu, i, n, fwd, bwd, step)
        layers += [linear, relu] if i < n - 1 else [linear]
    return _report(layers, "ChainMLP", flags)


def _flag(linear: Layer, relu: Layer, i: int, n: int, fwd: float, bwd: float,
          step: float) -> None:
    if fwd < 1e-2:
        linear.flags.append(Flag("vanishing_forward", "error",
                                 f"E[y²] is {fwd:.1e} of the input's (threshold 1e-02)"))
    if bwd < 1e-2 and i == 0:
        linear.flags.append(Flag("vanishing_backward", "error",
                                 f"gradient reaches {linear.name} at {bwd:.1e} | of the output's"))
    if i > 0 and step != 1:
        linear.flags.append(Flag("shrinks" if step < 1 else "amplifies", "warning",
                                 f"n·Var[w]·g = {step:.2f}"))
    if i == n // 2:
        relu.flags.append(Flag("dead_units", "warning", "30% of units are zero for every sample"))


def _set(layer: Layer, **values: float) -> None:
    """Fields the prediction stage adds; set only once the schema has them."""
    for name, value in values.items():
        if name in LAYER_FIELDS:
            setattr(layer, name, value)


def _fwd(second: float, zero: float = 0.0, dead: float = 0.0) -> ForwardStats:
    return ForwardStats(mean=0.0, var=second, second_moment=second, zero_fraction=zero,
                        dead_fraction=dead)


def _bwd(var: float) -> BackwardStats:
    return BackwardStats(var=var, second_moment=var)


def _report(layers: list[Layer], name: str, flags: bool) -> Report:
    found = [f for layer in layers for f in layer.flags]
    errors = sum(f.severity == "error" for f in found)
    warnings = sum(f.severity == "warning" for f in found)
    weights = [la for la in layers if la.kind == "weight"]
    summary = Summary(healthy=errors == 0, errors=errors, warnings=warnings)
    if weights and weights[-1].predicted:
        summary.forward_ratio = weights[-1].predicted.forward_var
        summary.backward_ratio = weights[0].predicted.backward_var
    settings = {"seed": 0, "trials": 1, "batch_size": 256, "device": "cpu", "mode": "train",
                "init": "as-is", "grad": "randn"}
    if flags:  # what the diagnosis leaves behind
        settings["thresholds"] = {"forward": [1e-2, 1e2], "backward": [1e-2, 1e2]}
        summary.verdict = ", ".join(sorted({f.code for f in found})) if found else (
            "the signal holds through every layer")
    if errors:
        summary.cause = "every Linear→ReLU step multiplies the signal by n·E[w²]·g ≈ 0.5"
        summary.fix = Fix(scheme="he", code="for m in model.modules():\n    ...",
                          short='kaiming_normal_(…, nonlinearity="relu")',
                          layers=[la.label for la in weights],
                          before=[summary.forward_ratio, summary.backward_ratio],
                          after=[1.0, 1.0])
    return Report(
        model=ModelInfo(target="synthetic.py", class_=name, parameters=4096 * len(weights)),
        settings=settings,
        input=TensorInfo(shape=[256, 64], dtype="float32", mean=0.0, var=1.0,
                         second_moment=1.0),
        output=None, layers=layers, summary=summary, varprobe_version="0.1.0",
        torch_version="2.13.0")


def without_predictions(report: Report) -> Report:
    """What `varprobe predict` has the other way round: measured only."""
    for layer in report.layers:
        layer.predicted, layer.schemes = None, {}
    return report
