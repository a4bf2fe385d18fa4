"""``probe()``, the pipeline: make inputs, record forward + backward, predict, diagnose."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from varprobe import (
    diagnose,
    exponents,
    reinit,
    rng,
    stats,
    structure,
    theory,
    timing,
)
from varprobe import ends as ends_mod
from varprobe import inputs as inputs_mod
from varprobe import trials as trials_mod
from varprobe.config import DEFAULT_BATCH_SIZE
from varprobe.cotangent import aligned, gradients, paired
from varprobe.diagnose.common import places
from varprobe.errors import VarprobeError
from varprobe.input_leaves import InputLeaves
from varprobe.recorder import Call, Recorder, float_leaves, main_weight, tensor_leaves
from varprobe.report import (
    FROZEN,
    BackwardStats,
    ForwardStats,
    Layer,
    ModelInfo,
    Report,
)
from varprobe.stages import later_predictions, stage
from varprobe.state import preserved
from varprobe.theory import norms
from varprobe.theory import recording as recording_mod


def unwrap(model: Any) -> nn.Module:
    """The eager module behind torch.compile and (Distributed)DataParallel wrappers; a
    model whose lazy modules have not run yet is refused (probing would shape them)."""
    if isinstance(model, torch.jit.ScriptModule):
        raise VarprobeError("TorchScript modules cannot be hooked; pass the eager nn.Module")
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            break
    if not isinstance(model, nn.Module):
        raise VarprobeError(f"expected an nn.Module, got {type(model).__name__}")
    lazy = next((name for name, p in model.named_parameters()
                 if isinstance(p, nn.parameter.UninitializedParameter)), None)
    if lazy is not None:
        raise VarprobeError(
            f"parameter {lazy} is not initialized yet (a lazy module): its shape comes from "
            "the first call; call the model once on an example input before probing it")
    return model


def resolve_device(device: str | torch.device | None, model: nn.Module | None) -> torch.device:
    """``auto``: cuda, then mps, then cpu; None: where the model's parameters are.
    A device this machine lacks is a VarprobeError (one line, exit 2)."""
    if device is None:
        p = next(model.parameters(), None) if model is not None else None
        return p.device if p is not None else torch.device("cpu")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise VarprobeError(f"--device {device}: not a device; use cpu, cuda, cuda:N, mps "
                            "or auto") from None
    if dev.type == "meta":
        raise VarprobeError(f"--device {device}: meta tensors have shapes but no values, "
                            "nothing to measure; `varprobe predict` runs on meta")
    missing = _missing(dev)
    if missing:
        raise VarprobeError(f"--device {device}: {missing}; use cpu or auto")
    return dev


def _missing(dev: torch.device) -> str | None:
    """Why ``dev`` cannot be used here, or None."""
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"no CUDA GPU here (torch {torch.__version__})"
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            return f"there are {count} CUDA GPU(s), numbered from 0"
        return None
    if dev.type == "mps":
        return None if torch.backends.mps.is_available() else "MPS is not available here"
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as exc:
        text = str(exc).strip()
        return f"not available here ({text.splitlines()[0] if text else type(exc).__name__})"
    return None


def probe(model: nn.Module, inputs: Any = None, *, grad_output: Any = None,
          loss: Any = None, batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
          mode: str | None = None, device: str | torch.device | None = None,
          input_shape: tuple[int, ...] | None = None, target: str | None = None,
          init: str | None = None, trials: int = 1,
          progress: Callable[[int, int], None] | None = None,
          thresholds: diagnose.Thresholds | None = None,
          ignore: Iterable[str] = (), precision: Any = None,
          compare: str | Iterable[str] | None = None) -> Report:
    """Measure per-layer forward and backward statistics of ``model``.

    ``inputs``: a tensor, a tuple (positional) or a dict (keywords), or a callable
    ``f(batch_size)``; synthesized from the first layer when None. ``grad_output``: the
    cotangent at the output (a tensor or a pytree matching the output), used exactly;
    default N(0, 1). ``loss``: ``loss(output) -> scalar`` instead of a cotangent.
    ``mode``: "train", "eval" or None (leave each module's mode as it is).
    ``init``: an init scheme (theory.SCHEMES) applied to a copy of the model first.
    ``trials``: repeat with seeds seed..seed+K-1 and report means and 95% intervals;
    ``progress(done, total)`` is called after each trial.
    ``thresholds`` / ``ignore``: what diagnose flags (defaults: diagnose.Thresholds()),
    and glob patterns of layer names it skips.
    ``precision``: a precision.Settings: range statistics, number-format flags and
    ``autocast`` (see range_flags).
    ``compare``: init schemes (theory.SCHEMES, or "all") whose counterfactual
    predictions ``layer.schemes`` carries; a fix the diagnosis proposes adds the
    schemes it weighed.
    The model is left exactly as found, also when it raises.
    """
    if mode not in (None, "train", "eval"):
        raise VarprobeError(f"mode must be 'train' or 'eval', not {mode!r}")
    if batch_size < 1:
        raise VarprobeError(f"batch size must be positive, not {batch_size}")
    if trials < 1:
        raise VarprobeError(f"trials must be positive, not {trials}")
    scheme = reinit.check_scheme(init)
    compared = reinit.check_compare(compare)
    model = unwrap(model)
    dev = resolve_device(device, model)
    settings = {"seed": seed, "trials": trials, "batch_size": None, "device": str(dev),
                "mode": mode or "as-is", "init": scheme or reinit.AS_IS,
                "grad": "loss" if loss else ("given" if grad_output is not None else "randn")}
    if precision is not None:
        settings["precision"] = precision.to_dict()
    with preserved(model, [dev]):
        reports = []
        for k in range(trials):
            work = _working_copy(model, dev, scheme, seed + k)
            if mode is not None:
                work.train(mode == "train")
            torch.manual_seed(seed + k)
            generator = torch.Generator().manual_seed(seed + k)
            with stage("input"):
                x = _make_inputs(work, inputs, batch_size, input_shape, generator, dev)
            recording = recording_mod.Recording(work)  # the last trial's graph serves them all
            values: dict[int, list[float]] = {}  # and its norm and PReLU values
            with stage("record"), rng.seeded(seed + k):
                report, modules = _record(
                    work, x, grad_output, loss, generator, settings={
                        **settings, "batch_size": _batch_of(x)},
                    target=target or type(model).__name__, recording=recording,
                    values=values, precision=precision)
                reports.append(report)
            if progress is not None:
                progress(k + 1, trials)
        with stage("record"):
            report = reports[0] if trials == 1 else trials_mod.aggregate(reports)
        walker = None
        with timing.phase("predictions"), stage("predict", report):
            walker = theory.annotate(report, modules, recording, values, schemes=compared)
        with timing.phase("diagnosis"), stage("diagnose"):
            structure.annotate(report, recording, modules, values)
            # in the probe's modes, like the predictions: a fix walks the schemes it weighs
            diagnose.annotate(report, thresholds, ignore, schemes=later_predictions(walker, report))
    return report


def _working_copy(model: nn.Module, dev: torch.device, scheme: str | None,
                  seed: int) -> nn.Module:
    """The model itself where possible; a copy to move it or to re-initialize it."""
    if scheme is not None:
        return reinit.reinitialized(model, scheme, seed).to(dev)
    current = next((p.device for p in model.parameters()), dev)
    return model if current == dev else copy.deepcopy(model).to(dev)


def _make_inputs(model, inputs, batch_size, shape, generator, dev) -> Any:
    if callable(inputs) and not isinstance(inputs, torch.Tensor):
        inputs = _users(lambda: inputs(batch_size), "example_input(batch_size)")
    if inputs is None:
        return inputs_mod.synthesize(model, batch_size, shape, generator, dev)
    return inputs_mod.to_device(inputs, dev, inputs_mod.model_dtype(model))


def _users(call: Callable[[], Any], what: str) -> Any:
    """Run the user's own ``what``: what it raises is theirs to fix (exit 2), not a
    bug in varprobe."""
    try:
        return call()
    except VarprobeError:
        raise
    except Exception as exc:
        text = str(exc).strip()
        raise VarprobeError(f"{what} raised {type(exc).__name__}"
                            f"{': ' + text.splitlines()[0] if text else ''}; "
                            "check the model file's " + what.partition("(")[0]) from exc


def _batch_of(x: Any) -> int | None:
    leaves = [t for t in float_leaves(x) + tensor_leaves(x) if t.dim() > 0]
    return int(leaves[0].shape[0]) if leaves else None


def _record(model: nn.Module, x: Any, grad_output: Any, loss: Any, generator,
            settings: dict, target: str, recording: recording_mod.Recording | None = None,
            values: dict[int, list[float]] | None = None,
            precision: Any = None) -> tuple[Report, list[nn.Module]]:
    """Run forward + backward under hooks; the modules list is aligned with layers.
    ``recording`` (a TorchFunctionMode) follows the dataflow during the forward only.
    ``values`` is filled with host copies of the tensors the predictions read
    (theory.norms.host_tensors), keyed by id, from the same one transfer."""
    owned = InputLeaves(x)  # gradients w.r.t. float inputs come from leaves we own
    fed, leaves = owned.fed, owned.leaves
    with Recorder(model, ranges=exponents.Measure.of(precision)) as rec:
        # cached: a parametrized weight is computed once, the tensor the hooks read
        with timing.phase("pass"), parametrize.cached():
            with exponents.autocast(precision, x):
                output = _forward(model, fed, rec, recording, owned)
            rec.check_views()
            indicator = ends_mod.indicator_slot(rec, x)  # the input, read with the pass
            out_leaves = [t for t in float_leaves(output) if t.requires_grad]
            params = [p for p in model.parameters() if p.requires_grad] + [
                w for _, w in rec.weights.values() if w.grad_fn is not None]  # computed
            note = _backward(rec, model, output, out_leaves, params + leaves, grad_output,
                             loss, generator)
        with timing.phase("collect"):
            host, ends = _collect(rec, ends_mod.measured_copy(rec, x, fed), output,
                                  recording, values)
            layers = _layers(rec, host, note.removeprefix("backward unavailable: "))
            if recording is not None:
                slot = getattr(rec, "cotangent_slot", None)  # a loss makes its own cotangent
                recording.finish(out_leaves, host[slot][stats.G_VAR]
                                 if slot is not None and loss is None else None)
    report = Report(
        model=ModelInfo(target=target, class_=type(model).__name__,
                        parameters=sum(p.numel() for p in model.parameters())),
        settings=settings, input=ends_mod.tensor_info(x, host, ends[0], indicator),
        output=ends_mod.tensor_info(output, host, ends[1]),
        layers=layers, varprobe_version=_version(), torch_version=torch.__version__)
    if getattr(rec, "unreached", None):
        report.notes.append(
            f"backward: {len(rec.unreached)} module(s) got no gradient for their parameters "
            f"({places(rec.unreached)}): the forward did not use them (a layer skipped at "
            "random, as LayerDrop does in train mode, which --mode eval turns off; a head "
            "the output does not come from) or they feed only an output the cotangent "
            "does not drive")
    if note:
        report.notes.append(note)
    elif grad_output is None and loss is None and len(out_leaves) > 1:
        report.notes.append(
            f"backward: the N(0, 1) cotangent drives the first of the output's "
            f"{len(out_leaves)} float tensors that require grad (the logits, by He's "
            "assumption); a layer that reaches only the others gets no gradient: a "
            "loss(output) in the model file, or probe(loss=...), drives them all")
    return report, [call.module for call in rec.calls]


def _forward(model: nn.Module, fed: Any, rec: Recorder,
             recording: recording_mod.Recording | None, owned: InputLeaves | None = None) -> Any:
    """The model's forward under the hooks (and the graph recording); a model that
    raises becomes one line naming the layer it raised in. ``owned``: the input leaves,
    whose mode goes outside the recording's (which must be innermost)."""
    args, kwargs = inputs_mod.as_call(fed)
    if recording is not None:
        rec.observer = recording
        recording.start(float_leaves(fed))
    try:
        with (owned if owned is not None and owned.leaves else contextlib.nullcontext()), \
                (recording or contextlib.nullcontext()):
            return model(*args, **kwargs)
    except Exception as exc:
        if _out_of_memory(exc):
            raise VarprobeError(_oom_message(_where(rec))) from exc
        raise VarprobeError(
            f"the model raised in {_where(rec)}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}; check the input "
            "(--input-shape, example_input) and the model's forward") from exc


def _collect(rec: Recorder, x: Any, output: Any, recording: recording_mod.Recording | None,
             values: dict[int, list[float]] | None) -> tuple[list, list[int]]:
    """The pass's one device-to-host transfer: every layer's statistics, the network's
    input and output moments (slots ``ends``), the graph's constants, and host copies
    of the parameters the predictions read (into ``values``)."""
    ends = [ends_mod.moments_slot(rec, x), ends_mod.moments_slot(rec, output)]
    constants = [rec._new_slot(p)
                 for p in (recording.on_device() if recording is not None else [])]
    # as they are: collect's one torch.cat makes them float64 vectors
    copies = {id(t): rec._new_slot(stats.Pending(t.detach(), list))
              for t in (norms.host_tensors([c.module for c in rec.calls])
                        if values is not None else [])}
    host = rec.collect()
    if values is not None:
        values.update((key, host[slot]) for key, slot in copies.items())
    if recording is not None:
        recording.fetched([host[slot] for slot in constants])
    return host, ends


def _out_of_memory(exc: BaseException) -> bool:
    """CUDA/MPS raise OutOfMemoryError; the CPU allocator a plain RuntimeError."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def _oom_message(where: str) -> str:
    return (f"out of memory in {where}; try a smaller --batch-size or the closed-form "
            "`varprobe predict`, which needs no forward pass")


def _where(rec: Recorder) -> str:
    open_calls = [c for calls in rec._open.values() for c in calls]
    if not open_calls:
        return "the model's own forward"
    call = max(open_calls, key=rec.calls.index)
    return f"layer {call.name} ({type(call.module).__name__})"


def _backward(rec: Recorder, model, output, outs, wrt, grad_output, loss, generator) -> str:
    """Run the backward pass; returns a note when there is nothing to backpropagate."""
    if loss is not None:
        value = _users(lambda: loss(output), "loss(output)")
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise VarprobeError("loss(output) must return a scalar tensor")
        outs, cotangents = [value], [torch.ones_like(value)]
    elif grad_output is not None:
        floats = float_leaves(output)
        cotangents = [g.to(o.device, o.dtype) for g, o in
                      zip(tensor_leaves(aligned(grad_output, output)), floats)]
        if len(cotangents) != len(floats):
            raise VarprobeError("grad_output does not match the model's output structure")
        pairs = [(o, g) for o, g in zip(floats, cotangents) if o.requires_grad]
        outs, cotangents = [o for o, _ in pairs], [g for _, g in pairs]
    else:
        # He's backward assumption: N(0, 1) at the network's output, i.e. its first
        # floating leaf (the logits, not a KV cache or a pooled side output).
        outs = outs[:1]
        cotangents = [torch.randn(o.shape, generator=generator).to(o.device, o.dtype)
                      for o in outs]
    if not outs or not outs[0].requires_grad:
        return "backward unavailable: the output has no floating tensor that requires grad"
    start = paired(outs, cotangents)
    # read before the backward, so that the hook on the output that receives this very
    # buffer finds it read (a language model's logits gradient is its largest tensor)
    rec.cotangent_slot = timing.timed("recording", rec.gradient_slot)(cotangents[0])
    rec.in_backward = True
    try:
        grads = gradients(start, outs, wrt)
    except Exception as exc:
        if _out_of_memory(exc):
            raise VarprobeError(_oom_message("the backward pass")) from exc
        raise VarprobeError(
            f"the model's backward pass raised: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}; check the model's backward "
            "(in-place ops on tensors saved for backward, custom autograd functions)") from exc
    finally:
        rec.in_backward = False
    by_param = {id(p): g for p, g in zip(wrt, grads)}
    rec.unreached = list(dict.fromkeys(  # modules, in order, whose parameters got none
        name.rpartition(".")[0] or name for name, p in model.named_parameters()
        if p.requires_grad and by_param.get(id(p)) is None))
    weight_grads = {key: by_param.get(id(w)) for key, (_, w) in rec.weights.items()}
    rec.weight_grad_slots = timing.timed("recording", rec.add_weight_grads)(weight_grads)
    return ""


def _forward_stats(row: list[float] | None) -> ForwardStats | None:
    if row is None:
        return None
    return ForwardStats(mean=row[stats.MEAN], var=row[stats.VAR],
                        second_moment=row[stats.SECOND_MOMENT],
                        zero_fraction=row[stats.ZERO_FRACTION],
                        dead_fraction=row[stats.DEAD_FRACTION],
                        nonfinite=int(row[stats.NONFINITE]))


def _backward_stats(row: list[float] | None) -> BackwardStats | None:
    if row is None:
        return None
    return BackwardStats(var=row[stats.G_VAR], second_moment=row[stats.G_SECOND_MOMENT],
                         nonfinite=int(row[stats.G_NONFINITE]))


def _layers(rec: Recorder, host: list, no_backward: str = "") -> list[Layer]:
    """``no_backward``: why the backward pass did not run at all ("" when it did)."""
    grad_slots = getattr(rec, "weight_grad_slots", {})
    return [_layer(index, call, rec, host, grad_slots, no_backward)
            for index, call in enumerate(rec.calls)]


def _layer(index: int, call: Call, rec: Recorder, host: list, grad_slots: dict,
           no_backward: str = "") -> Layer:
    module = call.module
    fan_in, fan_out = theory.fans(module)
    layer = Layer(index=index, name=call.name, call=call.call,
                  type=parametrize.type_before_parametrizations(module).__name__,
                  kind=theory.kind(module), shape=call.shape, dtype=call.dtype,
                  input_shape=call.input_shape, fan_in=fan_in, fan_out=fan_out,
                  unavailable=dict(call.unavailable))
    for key, convert in (("input", _forward_stats), ("forward", _forward_stats),
                         ("backward", _backward_stats), ("backward_input", _backward_stats)):
        slot = call.slots.get(key)
        value = convert(host[slot]) if slot is not None else None
        setattr(layer, key, value)
        if value is None and slot is not None:
            layer.unavailable.setdefault(key, no_backward or "no gradient reached this tensor")
    if id(module) not in rec.weights and layer.kind == "weight" \
            and (w := main_weight(module)[0]) is not None and w.is_complex():
        for key in ("weight_var", "weight_grad_ratio"):
            layer.unavailable[key] = "complex weights: not measured"
    if id(module) in rec.weights:
        row = host[rec.weights[id(module)][0]]
        layer.weight_var, layer.weight_second_moment = row[stats.W_VAR], row[
            stats.W_SECOND_MOMENT]
        layer.bias_second_moment = row[stats.B_SECOND_MOMENT]
        layer.bias_mean = row[stats.B_MEAN]
        if id(module) in rec.row_shares:
            layer.weight_row_share = host[rec.row_shares[id(module)]][0]
        if id(module) in rec.mean_gains:
            layer.weight_mean_gain, layer.weight_bias_cross = host[rec.mean_gains[id(module)]]
        if id(module) in grad_slots:
            layer.weight_grad_ratio = host[grad_slots[id(module)]][0]
        elif not rec.weights[id(module)][1].requires_grad:
            layer.unavailable["weight_grad_ratio"] = FROZEN
        else:
            layer.unavailable["weight_grad_ratio"] = no_backward or "no gradient reached the weight"
    if rec.range_slots:
        weight = rec.weights.get(id(module), (None,))[0]
        layer.ranges = exponents.layer_ranges(call.slots, (weight, grad_slots.get(id(module))),
                                              rec.range_slots, host)
    return layer


def _version() -> str:
    from varprobe import __version__

    return __version__
