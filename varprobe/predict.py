"""``varprobe predict``: closed-form trajectories, no backward pass, no weights allocated.

The model is built on the meta device where it can be: parameters get shapes but no
memory, so a 175B-parameter decoder costs nothing. One forward pass on meta tensors,
under a Recorder that measures nothing, gives the calls, their shapes and their order;
theory.recording follows the dataflow between the calls (residual adds, views,
functional ops) in the same pass, and the predictions walk that graph (theory.walk), the
same walk the probe uses, with nothing measured. Where the graph meets something
without a closed form the prediction stops, with the reason: nothing is measured to
carry past it. A norm resets the scale, so the prediction resumes after it. Every
measured field stays null.
Meta weights have no values: the init ops the model's code applies while it is built
are recorded (initlog) and give the weights' second moments; where nothing was
recorded (a model handed over already built on meta), each layer's reset_parameters
draw (PyTorch's default) is assumed, and a PReLU slope its constructor's ``init``.
A model that cannot be built or run on meta (``.item()`` in its constructor, a
branch on an activation's value) is built on the CPU instead, and then its weights are
read; branches on index and mask tensors made from constants run on their values
(metavalues).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from varprobe import diagnose, initlog, metakernels, reinit, rng, structure, theory
from varprobe import inputs as inputs_mod
from varprobe import target as target_mod
from varprobe.ends import tensor_info
from varprobe.errors import VarprobeError
from varprobe.metavalues import MetaValues
from varprobe.pipeline import (
    DEFAULT_BATCH_SIZE,
    _layers,
    _users,
    _version,
    _where,
    resolve_device,
    unwrap,
)
from varprobe.recorder import Recorder, float_leaves, main_weight, tensor_leaves
from varprobe.report import ModelInfo, Report, TensorInfo
from varprobe.stages import later_predictions, stage
from varprobe.state import preserved
from varprobe.theory.recording import Recording
from varprobe.theory.weights import prelu_slopes

MEASURED = ("input", "forward", "backward", "backward_input", "weight_grad_ratio")
NOT_MEASURED = "not measured: closed-form prediction (varprobe predict)"
META_NOTE = ("built on the meta device: weights have shapes but no values, so each "
             "layer's PyTorch default init (what reset_parameters draws) is assumed and "
             "init code in the model's constructor is not seen; pass --init SCHEME, or "
             "--device cpu to read the real weights")
PRELU_NOTE = ("PReLU slopes: each one's initial value (the constructor's init) is assumed, "
              "as the meta device holds no weight values")


def predict_target(spec: str, *, device: str = "meta", input_shape: tuple[int, ...] | None
                   = None, batch_size: int = DEFAULT_BATCH_SIZE, init: str | None = None,
                   mode: str | None = "train", **diagnosis: Any) -> Report:
    """Load ``spec`` on ``device`` (meta unless told otherwise) and predict.

    When the model cannot be built or run on meta, it is built on the CPU with a note.
    ``diagnosis``: ``thresholds`` and ``ignore`` for diagnose.
    """
    options = dict(input_shape=input_shape, batch_size=batch_size, init=init, mode=mode,
                   target=spec, **diagnosis)
    if device != "meta":
        loaded = target_mod.load(spec, device=str(resolve_device(device, None)), seed=0)
        return predict(loaded.model, loaded.example_input, **options)
    try:
        values = MetaValues()  # index buffers made while it is built keep their values
        with metakernels.without_compiler():
            with initlog.recording() as log, values:  # its own init, seen as it is built
                loaded = target_mod.load(spec, device="meta")
                initlog.run_skipped_init(loaded.model)
            return predict(loaded.model, loaded.example_input, init_log=log,
                           meta_values=values, **options)
    except Exception as exc:  # noqa: BLE001 - whatever needed values: the theory, too
        if not _about_meta(exc):
            raise
        reason = _first_line(exc.__cause__ if isinstance(exc, VarprobeError) else exc)
    loaded = target_mod.load(spec, seed=0)
    report = predict(loaded.model, loaded.example_input, **options)
    report.notes.insert(0, f"the model could not be built or run on the meta device "
                           f"({reason}); it was built on the CPU and its weights were read")
    return report


def predict(model: nn.Module, inputs: Any = None, *, input_shape: tuple[int, ...] | None
            = None, batch_size: int = DEFAULT_BATCH_SIZE, init: str | None = None,
            mode: str | None = "train", target: str | None = None,
            thresholds: diagnose.Thresholds | None = None, ignore: Any = (),
            init_log: initlog.Log | None = None, precision: Any = None,
            cotangent: float | str | None = None, meta_values: MetaValues | None = None,
            compare: Any = None) -> Report:
    """Closed-form predictions for ``model`` from one shape-only forward pass.

    On a meta model nothing is allocated; on a real one the forward runs there, under
    no_grad, and the weights are read (the actual init). ``init``: a scheme from
    theory.SCHEMES for every Linear/Conv layer instead. ``thresholds`` / ``ignore`` /
    ``precision``: as for probe (ranges predicted, see headroom). ``init_log``: the init
    ops recorded while a meta model was built (initlog.recording); without it a meta
    model's layers take PyTorch's default. ``meta_values``: the values of index tensors
    made while it was built (metavalues), which the shape pass keeps adding to.
    ``compare``: as for probe, the init schemes whose predictions ``layer.schemes``
    carries. The model is left as found.
    """
    if mode not in (None, "train", "eval"):
        raise VarprobeError(f"mode must be 'train' or 'eval', not {mode!r}")
    if batch_size < 1:
        raise VarprobeError(f"batch size must be positive, not {batch_size}")
    scheme = reinit.check_scheme(init)
    compared = reinit.check_compare(compare)
    model = unwrap(model)
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    with preserved(model, []):
        if mode is not None:
            model.train(mode == "train")
        with stage("input"):
            x = _inputs(model, inputs, batch_size, input_shape, dev)
        with stage("record"):
            with rng.seeded(0, with_torch=True):  # the model's own draws: the same each run
                output, rec, recording = _shape_pass(model, x, dev, init_log, meta_values)
            seed, seed_note = cotangent_var(cotangent, output)
            recording.cotangent_var = seed
            layers = _layers(rec, rec.collect())
        modules = [call.module for call in rec.calls]
        report = Report(
            model=ModelInfo(target=target or type(model).__name__,
                            class_=type(model).__name__,
                            parameters=sum(p.numel() for p in model.parameters())),
            settings={"seed": None, "trials": 0, "batch_size": _batch_of(x),
                      "device": dev.type, "mode": mode or "as-is",
                      "init": scheme or reinit.AS_IS, "grad": None, "source": "closed-form",
                      "cotangent_var": seed},
            input=_shape_info(x), output=_shape_info(output), layers=layers,
            varprobe_version=_version(), torch_version=torch.__version__)
        _mark_unmeasured(report, dev)
        if scheme is not None:
            _assume_scheme(report, modules, scheme)
        elif dev.type == "meta" and init_log is not None:
            _assume_recorded(report, modules, init_log)
        elif dev.type == "meta":
            report.notes.append(META_NOTE)
        if dev.type == "meta" and any(isinstance(m, nn.PReLU) for m in modules):
            report.notes.append(PRELU_NOTE)
        values = None if init_log is None else init_log.constants(
            [t for m in modules for t in (*m._parameters.values(), *m._buffers.values())
             if t is not None])
        walker = None
        with stage("predict", report):
            floats = report.input.dtype is not None and "int" not in report.input.dtype
            report.notes.append(f"input E[x²] = 1 and {seed_note} assumed"
                                if floats else f"{seed_note} assumed")
            walker = theory.annotate(report, modules, recording, values, measured=False,
                                     schemes=compared)
        if precision is not None:
            report.settings["precision"] = precision.to_dict()
        with stage("diagnose"):
            structure.annotate(report, recording, modules, values)
            diagnose.annotate(report, thresholds, ignore,
                              schemes=later_predictions(walker, report))
    return report


def cotangent_var(spec: float | str | None, output: Any) -> tuple[float, str]:
    """The Var of the loss's gradient at each output element that seeds the backward,
    and how it was decided.

    None or "unit": 1, the papers' assumption (the probe's random cotangent too).
    "cross-entropy": a mean-reduced cross-entropy over N rows of V logits (the output's
    last dim) at init, where the softmax is near uniform: the gradient is (p - y)/N, and
    sum_j (p_j - y_j)^2 = 1 - 2 p_y + sum p^2 = 1 - 1/V at p = 1/V, so Var = (1 - 1/V) /
    (V N^2). A number: that Var."""
    if spec is None or spec == "unit":
        return 1.0, "output cotangent Var = 1"
    if spec == "cross-entropy":
        leaves = [t for t in float_leaves(output) if t.requires_grad]
        if not leaves or leaves[0].dim() == 0:
            raise VarprobeError("--cotangent cross-entropy needs an output with a class "
                                "dimension (its last)")
        v = leaves[0].shape[-1]
        n = leaves[0].numel() // v
        var = (1 - 1 / v) / (v * n * n)
        return var, (f"output cotangent of a mean cross-entropy over {n} rows of {v} "
                     f"logits at a uniform softmax, Var = (1 - 1/V)/(V N²) = {var:.3g},")
    try:
        var = float(spec)
    except (TypeError, ValueError):
        var = math.nan
    if not math.isfinite(var) or var <= 0:
        raise VarprobeError(f"--cotangent must be unit, cross-entropy or a positive "
                            f"number (the Var), not {spec!r}")
    return var, f"output cotangent Var = {var:.3g}"


def _shape_pass(model: nn.Module, x: Any, dev: torch.device, init_log: Any = None,
                values: MetaValues | None = None) -> tuple[Any, Recorder, Recording]:
    """One forward under a Recorder that measures nothing and a graph Recording.

    Autograd stays on (free on meta): the recording tells custom autograd Functions and
    outputs that need no gradient by it. The unit cotangent seeds the graph's backward.
    """
    args, kwargs = inputs_mod.as_call(x)
    recording = Recording(model, init_log)  # a parameter's recorded init: its moments
    # On meta, the index and mask tensors made from constants carry values, so that the
    # model's own branches on them (transformers' packed-sequence check) can run and
    # the embeddings see which positions share an id (theory.tokenids).
    if dev.type == "meta":
        values = values or MetaValues()
        recording.value_of = values.value
        kernels = metakernels.without_compiler()
    else:
        values = kernels = contextlib.nullcontext()
    with kernels, torch.enable_grad(), Recorder(model, measure=False) as rec:
        rec.observer = recording
        recording.start(float_leaves(x))
        try:
            with values, recording:
                output = model(*args, **kwargs)
        except Exception as exc:
            raise VarprobeError(
                f"the model raised in {_where(rec)} during the shape pass on "
                f"{dev.type}: {type(exc).__name__}: {_first_line(exc)}") from exc
        recording.finish([t for t in float_leaves(output) if t.requires_grad], 1.0)
    return output, rec, recording


def _inputs(model: nn.Module, inputs: Any, batch_size: int,
            shape: tuple[int, ...] | None, dev: torch.device) -> Any:
    """The user's input moved to ``dev`` (meta: shapes only), or one made up there."""
    if callable(inputs) and not isinstance(inputs, torch.Tensor):
        inputs = _users(lambda: inputs(batch_size), "example_input(batch_size)")
    if inputs is not None:
        return pytree.tree_map(
            lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t, inputs)
    if dev.type != "meta" or inputs_mod.is_transformers(model):  # its config says what
        generator = torch.Generator().manual_seed(0)
        return inputs_mod.synthesize(model, batch_size, shape, generator, dev)
    inferred, dtype, _ = inputs_mod.infer_shape(model)
    if shape is None:
        shape = inferred
    dtype = dtype if dtype == torch.long else inputs_mod.model_dtype(model)
    return torch.empty((batch_size, *shape), dtype=dtype, device=dev)


def _mark_unmeasured(report: Report, dev: torch.device) -> None:
    for layer in report.layers:
        for key in MEASURED:
            layer.unavailable[key] = NOT_MEASURED
        if layer.kind == "weight" and layer.weight_second_moment is None:
            layer.unavailable["weight_var"] = (
                "no weight values on the meta device" if dev.type == "meta"
                else "the weight could not be read")


def _assume_scheme(report: Report, modules: list[nn.Module], scheme: str) -> None:
    """What ``--init SCHEME`` draws (reinit): Var[w] of the scheme, and its biases."""
    for layer, module, a in zip(report.layers, modules, prelu_slopes(modules)):
        if layer.kind != "weight" or not theory.is_linear_map(module):
            continue
        fan_in, fan_out = (theory.torch_fans(module) if scheme == "torch-default"
                           else theory.fans(module))
        var = theory.scheme_variance(scheme, fan_in, fan_out, a)
        layer.weight_var = layer.weight_second_moment = var
        layer.weight_mean_gain = layer.weight_bias_cross = None  # the actual weights' sums
        has_bias = getattr(module, "bias", None) is not None
        layer.bias_second_moment = (theory.scheme_bias_variance(scheme, module)
                                    if has_bias else None)
        layer.bias_mean = 0.0 if has_bias else None  # zero, or torch's symmetric draw
        layer.unavailable.pop("weight_var", None)
    report.notes.append(f"weights: the {scheme} scheme is assumed for every Linear/Conv "
                        "layer (zero bias, PyTorch's own for torch-default); other layers "
                        "as they are")


def _assume_recorded(report: Report, modules: list[nn.Module], log: initlog.Log) -> None:
    """The weight moments the model's own init ops leave (initlog), where recorded;
    PyTorch's default elsewhere (theory.weights.actual), and the note names those layers.
    An op with no closed form leaves the layer's weights, and what follows, unknown."""
    defaults, unknown = [], []
    for layer, module in zip(report.layers, modules):
        if layer.kind != "weight":
            continue
        w, b = main_weight(module)
        mw, mb = log.moments(w), log.moments(b)
        if mw is None:
            defaults.append(layer.label)
            continue
        bad = next((m for m in (mw, mb) if m is not None and not m.known), None)
        if bad is not None:
            layer.unavailable["weight_var"] = f"{initlog.UNKNOWN} ({bad.op})"
            unknown.append(layer.label)
            continue
        layer.weight_var, layer.weight_second_moment = mw.var, mw.m2
        layer.weight_kurtosis = mw.kurt
        layer.bias_second_moment = None if b is None else (mb.m2 if mb is not None else 0.0)
        layer.bias_mean = None if b is None else (mb.mean if mb is not None else 0.0)
        layer.unavailable.pop("weight_var", None)
    known = sum(layer.kind == "weight" for layer in report.layers) - len(defaults) - len(unknown)
    note = (f"weights: the moments the model's own init ops give (recorded while it was "
            f"built on the meta device) for {known} weight layer(s)")
    if defaults:
        note += (f"; nothing recorded for {_listed(defaults)}: PyTorch's default init "
                 "assumed there")
    if unknown:
        note += f"; an init op with no closed form at {_listed(unknown)}: not predicted"
    report.notes.append(note)


def _listed(labels: list[str]) -> str:
    return ", ".join(labels) if len(labels) <= 6 else \
        f"{', '.join(labels[:6])} and {len(labels) - 6} more"


def _shape_info(value: Any) -> TensorInfo:
    """Shape and dtype of the first (float) tensor; its moments are not measured."""
    return tensor_info(value, [], None)


def _batch_of(x: Any) -> int | None:
    leaves = [t for t in tensor_leaves(x) if t.dim() > 0]
    return int(leaves[0].shape[0]) if leaves else None


def _about_meta(exc: BaseException) -> bool:
    """Whether an error (or its cause) comes from running on the meta device."""
    while exc is not None:
        if "meta" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
