"""Odd modules and odd calls: in-place ops, reuse, frozen weights, structured outputs,
keyword-only forwards, gradient checkpointing, torch.compile, half precision, and
bad input (out of memory, nothing to backpropagate).

Each test compares recorded numbers with an independent computation
(tests/reference.py) and checks that the model is left exactly as found.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import pytest
import torch
from cli_helpers import run
from pristine import assert_untouched, give_grads, snapshot
from reference import RTOL, assert_matches, capture, moments
from schema import check_report
from torch import nn
from torch.utils.checkpoint import checkpoint

import varprobe
from varprobe.errors import VarprobeError
from varprobe.predict import predict

BATCH, WIDTH = 4, 32


def probe_untouched(model, x, g=None, **kwargs):
    """Probe with pre-existing grads on the model; assert nothing changed; check schema."""
    give_grads(model)
    before = snapshot(model)
    report = varprobe.probe(model, x, grad_output=g, **kwargs)
    assert_untouched(model, before)
    check_report(report.to_dict())
    return report


def by_label(report):
    return {layer.label: layer for layer in report.layers}


class InplaceResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.fc1(x)
        h += x  # modifies fc1's output in place, then the ReLU does again
        h = self.act(h)
        out = self.fc2(h)
        out += h
        return out


def test_inplace_relu_and_plus_equals_match_autograd():
    torch.manual_seed(0)
    model, x, g = InplaceResidual(), torch.randn(BATCH, WIDTH), torch.randn(BATCH, WIDTH)
    report = probe_untouched(model, x, g)
    assert assert_matches(report, capture(model, x, g, ["fc1", "act", "fc2"])) == 3
    act = by_label(report)["act"]
    # The ReLU's input is fc1's output plus x (measured in the pre-hook, before the
    # ReLU overwrites it); fc1's own record is its output before the += .
    with torch.no_grad():
        pre = model.fc1(x) + x
    assert act.input.var == pytest.approx(moments(pre.double())[0], rel=RTOL)
    assert act.input.var != pytest.approx(by_label(report)["fc1"].forward.var, rel=1e-2)
    assert act.backward_input is None
    assert "in place" in act.unavailable["backward_input"]


class Reused(nn.Module):
    """One Linear applied twice, plus two Linears sharing one weight (tied)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(WIDTH, WIDTH)
        self.enc, self.dec = nn.Linear(WIDTH, WIDTH, bias=False), nn.Linear(WIDTH, WIDTH)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.tanh(self.shared(torch.tanh(self.shared(self.enc(x))))))


def test_reused_module_gets_one_record_per_call_and_tied_weights_both_record():
    torch.manual_seed(0)
    model, x, g = Reused(), torch.randn(BATCH, WIDTH), torch.randn(BATCH, WIDTH)
    report = probe_untouched(model, x, g)
    assert [layer.label for layer in report.layers] == ["enc", "shared", "shared#1", "dec"]
    assert assert_matches(report, capture(model, x, g, ["enc", "shared", "dec"])) == 4
    first, second = report.layers[1], report.layers[2]
    assert first.forward.var != second.forward.var  # two distinct calls, not one merged
    assert report.layers[0].weight_var == report.layers[3].weight_var  # the tied weight


def test_frozen_weights_still_pass_gradients_and_say_why_none_reaches_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 4))
    model[0].requires_grad_(False)
    x, g = torch.randn(BATCH, WIDTH), torch.randn(BATCH, 4)
    report = probe_untouched(model, x, g)
    assert assert_matches(report, capture(model, x, g, ["0", "2"])) == 2
    frozen, trained = report.layers[0], report.layers[2]
    assert frozen.weight_grad_ratio is None
    assert "frozen" in frozen.unavailable["weight_grad_ratio"]
    assert trained.weight_grad_ratio > 0
    assert not model[0].weight.requires_grad  # still frozen after the probe


def test_a_fully_frozen_embedding_model_reports_forward_and_why_no_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, WIDTH), nn.Linear(WIDTH, WIDTH)).requires_grad_(False)
    report = probe_untouched(model, torch.randint(0, 50, (BATCH, 8)))
    assert all(layer.forward.var > 0 for layer in report.layers)
    assert all(layer.backward is None for layer in report.layers)
    assert any("backward unavailable" in note for note in report.notes)


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    pred: torch.Tensor  # integer: no gradient, no crash


class Structured(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.body, self.head = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, 4)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        y = self.head(h)
        if self.kind == "tuple":
            return y, h
        if self.kind == "dict":
            return {"logits": y, "hidden": h}
        if self.kind == "nested":  # a ControlNet's residuals: a tuple inside the output
            return {"logits": y, "states": (h, 2 * h), "count": 3}
        return Output(y, y.argmax(-1))


@pytest.mark.parametrize("kind", ["tuple", "dict", "dataclass"])
def test_structured_outputs_get_a_cotangent_on_every_float_leaf(kind):
    torch.manual_seed(0)
    model, x = Structured(kind), torch.randn(BATCH, WIDTH)
    gy, gh = torch.randn(BATCH, 4), torch.randn(BATCH, WIDTH)
    given = {"tuple": (gy, gh), "dict": {"logits": gy, "hidden": gh}, "dataclass": [gy]}[kind]
    report = probe_untouched(model, x, given)
    # Ground truth: plain autograd with retain_grad; the hidden state also receives its
    # own cotangent when the output exposes it.
    ref = copy.deepcopy(model)
    xr = x.clone().requires_grad_()
    h_pre = ref.body(xr)
    h_pre.retain_grad()
    h = torch.tanh(h_pre)
    y = ref.head(h)
    y.retain_grad()
    loss = (y * gy).sum() + ((h * gh).sum() if kind != "dataclass" else 0)
    loss.backward()
    body, head = by_label(report)["body"], by_label(report)["head"]
    assert body.backward.var == pytest.approx(moments(h_pre.grad.double())[0], rel=RTOL)
    assert head.backward.var == pytest.approx(moments(y.grad.double())[0], rel=RTOL)
    assert not any("backward unavailable" in note for note in report.notes)


def test_default_cotangent_covers_a_dataclass_output_with_an_integer_field():
    report = probe_untouched(Structured("dataclass"), torch.randn(BATCH, WIDTH))
    assert all(layer.backward is not None for layer in report.weight_layers)
    assert report.output.shape == [BATCH, 4]


def test_the_output_shape_lists_every_tensor_of_a_nested_output():
    report = probe_untouched(Structured("nested"), torch.randn(BATCH, WIDTH))
    assert report.output.shape == {"logits": [BATCH, 4],
                                   "states": [[BATCH, WIDTH], [BATCH, WIDTH]]}
    assert any("first of the output's 3 float tensors" in n for n in report.notes)


class KeywordOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.out = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, 4)

    def forward(self, *, tokens, scale=None):
        h = torch.relu(self.proj(input=tokens))  # keyword call into the module, too
        return self.out(h * scale if scale is not None else h)


def test_keyword_only_forward_arguments():
    torch.manual_seed(0)
    model = KeywordOnly()
    inputs = {"tokens": torch.randn(BATCH, WIDTH), "scale": torch.full((1,), 2.0)}
    g = torch.randn(BATCH, 4)
    report = probe_untouched(model, inputs, g)
    assert assert_matches(report, capture(model, inputs, g, ["proj", "out"])) == 2
    proj = by_label(report)["proj"]
    # The alias swap works on keyword inputs too: proj's input gradient is measured.
    assert proj.input.var == pytest.approx(float(inputs["tokens"].double().var(correction=0)),
                                           rel=RTOL)
    assert proj.backward_input is not None and proj.backward_input.var > 0


class Checkpointed(nn.Module):
    def __init__(self, use_reentrant: bool | None):
        super().__init__()
        self.use_reentrant = use_reentrant  # None: no checkpointing (the reference twin)
        self.segment = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH),
                                     nn.Dropout(0.25))
        self.head = nn.Linear(WIDTH, 4)

    def forward(self, x):
        if self.use_reentrant is None:
            return self.head(self.segment(x))
        return self.head(checkpoint(self.segment, x, use_reentrant=self.use_reentrant))


def twin_truth(model, x, g):
    """The same weights without checkpointing: outputs, gradients and weight grads."""
    twin = copy.deepcopy(model)
    twin.use_reentrant = None
    truth = capture(twin, x, g, ["segment.0", "segment.2", "head"])
    twin.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    twin(x.clone().requires_grad_()).backward(g)
    return truth, {n: float(m.weight.grad.norm() / m.weight.detach().norm())
                   for n, m in twin.named_modules() if isinstance(m, nn.Linear)}


def test_non_reentrant_checkpointing_is_measured_like_the_plain_model():
    torch.manual_seed(0)
    model, x, g = Checkpointed(False), torch.randn(BATCH, WIDTH), torch.randn(BATCH, 4)
    report = probe_untouched(model, x, g)
    # Recomputation re-fires forward hooks during backward; they add no records.
    assert [layer.name for layer in report.layers] == [
        "segment.0", "segment.1", "segment.2", "segment.3", "head"]
    truth, ratios = twin_truth(model, x, g)
    assert assert_matches(report, truth) == 3
    for layer in report.weight_layers:
        assert layer.weight_grad_ratio == pytest.approx(ratios[layer.name], rel=RTOL)


def test_reentrant_checkpointing_runs_and_marks_what_it_cannot_measure():
    torch.manual_seed(0)
    model, x, g = Checkpointed(True), torch.randn(BATCH, WIDTH), torch.randn(BATCH, 4)
    report = probe_untouched(model, x, g)
    truth, ratios = twin_truth(model, x, g)
    layers = by_label(report)
    assert len(report.layers) == 5
    # The segment's first forward runs under no_grad: its activations are right, its
    # output gradients flow only through the recomputation varprobe does not record.
    for name in ("segment.0", "segment.2"):
        assert layers[name].forward.var == pytest.approx(moments(truth[name][0][0])[0],
                                                         rel=RTOL)
        assert layers[name].backward is None
        assert "checkpoint" in layers[name].unavailable["backward"]
    assert assert_matches(report, {"head": truth["head"]}) == 1
    # Weight gradients come from the real backward, checkpoint or not.
    for layer in report.weight_layers:
        assert layer.weight_grad_ratio == pytest.approx(ratios[layer.name], rel=RTOL)


def test_compiled_model_is_analyzed_through_its_original_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, 4))
    compiled = torch.compile(model)  # not called: nothing is compiled
    assert type(compiled).__name__ == "OptimizedModule"
    x, g = torch.randn(BATCH, WIDTH), torch.randn(BATCH, 4)
    before = snapshot(compiled)
    report = varprobe.probe(compiled, x, grad_output=g)
    assert_untouched(compiled, before)
    assert report.model.class_ == "Sequential"
    assert assert_matches(report, capture(model, x, g, ["0", "1", "2"])) == 3


def test_lazy_modules_are_refused_until_they_have_run_then_measured():
    # Probing would shape an uninitialized (lazy) parameter: the model would not be left
    # as found. One clear error; after the model's own first call, a normal probe.
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(WIDTH), nn.ReLU(), nn.LazyLinear(4))
    x, g = torch.randn(BATCH, 10), torch.randn(BATCH, 4)
    with pytest.raises(VarprobeError, match="0.weight is not initialized yet"):
        varprobe.probe(model, x, grad_output=g)
    with pytest.raises(VarprobeError, match="not initialized yet"):
        predict(model, x)
    assert isinstance(model[0].weight, nn.parameter.UninitializedParameter)
    model(x)
    before = snapshot(model)
    report = varprobe.probe(model, x, grad_output=g)
    assert_untouched(model, before)
    assert assert_matches(report, capture(model, x, g, ["0", "1", "2"])) == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stats_are_accumulated_in_float32(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, 64), nn.ReLU(), nn.Linear(64, 4)).to(dtype)
    with torch.no_grad():
        model[2].weight.mul_(4000)  # outputs ~ 500: squares overflow float16 (max 65504)
    x, g = torch.randn(BATCH, WIDTH, dtype=dtype), torch.randn(BATCH, 4, dtype=dtype)
    report = probe_untouched(model, x, g)
    assert [layer.dtype for layer in report.layers] == [str(dtype)[6:]] * 3
    assert report.input.dtype == str(dtype)[6:]
    # Same half-precision tensors, reduced in float64: a half-precision reduction would
    # be off by ~1e-3 (bf16) or overflow to inf (the last layer's E[y^2] > 65504).
    assert assert_matches(report, capture(model, x, g, ["0", "2"])) == 2
    assert report.layers[2].forward.second_moment > 65504


class Argmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(WIDTH, 8)

    def forward(self, x):
        return self.fc(x).argmax(-1)


def test_output_with_nothing_to_backpropagate_keeps_forward_stats_and_says_why():
    torch.manual_seed(0)
    model, x = Argmax(), torch.randn(BATCH, WIDTH)
    report = probe_untouched(model, x)
    fc = report.layers[0]
    assert fc.forward.var == pytest.approx(moments(model.fc(x).detach().double())[0], rel=RTOL)
    assert fc.backward is None and fc.weight_grad_ratio is None
    assert "no floating tensor" in fc.unavailable["backward"]
    assert "no floating tensor" in fc.unavailable["weight_grad_ratio"]
    assert any("backward unavailable" in note for note in report.notes)


class OutOfMemory(nn.Module):
    def __init__(self, where: str, error: Exception):
        super().__init__()
        self.where, self.error = where, error
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        if self.where == "forward":
            raise self.error
        return Explode.apply(self.fc(x), self.error)


class Explode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, error):
        ctx.error = error
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise ctx.error


OOM_ERRORS = {
    "cuda": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    # What the CPU allocator raises: a plain RuntimeError.
    "cpu": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. "
                                "DefaultCPUAllocator: can't allocate memory: you tried to "
                                "allocate 140737488355328 bytes. Error code 12"),
}


@pytest.mark.parametrize("where", ["forward", "backward"])
@pytest.mark.parametrize("error", sorted(OOM_ERRORS))
def test_out_of_memory_is_a_clear_error_that_suggests_what_to_do(where, error):
    model, x = OutOfMemory(where, OOM_ERRORS[error]()), torch.randn(BATCH, WIDTH)
    give_grads(model)
    before = snapshot(model)
    with pytest.raises(VarprobeError) as info:
        varprobe.probe(model, x)
    assert_untouched(model, before)
    message = str(info.value)
    assert "out of memory" in message and "--batch-size" in message
    assert "varprobe predict" in message and "\n" not in message


def test_out_of_memory_on_the_command_line_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "big.py"
    path.write_text("import torch\nfrom torch import nn\n\n"
                    "class Big(nn.Module):\n"
                    "    def __init__(self):\n"
                    "        super().__init__()\n"
                    "        self.fc = nn.Linear(8, 8)\n\n"
                    "    def forward(self, x):\n"
                    "        raise torch.OutOfMemoryError('CUDA out of memory.')\n\n"
                    "model = Big()\n")
    result = run(capsys, "analyze", str(path), "--format", "json")
    assert result.code == 2 and result.out == ""
    assert result.err.count("\n") == 1 and "Traceback" not in result.err
    assert "--batch-size" in result.err and "varprobe predict" in result.err


def test_nonfinite_activations_are_counted_and_serialise_as_null():
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh())
    with torch.no_grad():
        model[0].weight.fill_(math.inf)
    report = probe_untouched(model, torch.randn(BATCH, WIDTH))
    assert report.layers[0].forward.nonfinite == BATCH * WIDTH
    assert report.to_dict()["layers"][0]["forward"]["var"] is None


def test_a_batchnorm_fed_the_wrong_channels_raises_its_own_error():
    """The model's own error, not one from varprobe's bookkeeping of the BatchNorm."""
    model, x = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(6)), torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError) as plain:
        model(x)
    before = snapshot(model)
    with pytest.raises(VarprobeError) as probed:
        varprobe.probe(model, x)
    message = str(probed.value)
    assert "layer 1 (BatchNorm2d)" in message
    assert str(plain.value).splitlines()[0] in message
    assert_untouched(model, before)


class _OwnsAndCalls(nn.Module):
    """A model that owns a parameter (a class token) beside its layers, as a ViT."""

    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, 16) * 0.02)
        self.a, self.act, self.b = nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)

    def forward(self, x):
        x = torch.cat([self.token.expand(x.shape[0], 1, 16), x], dim=1)
        return self.b(self.act(self.a(x)))


class _Thin(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("wrap", [nn.Sequential, _Thin, lambda m: nn.Sequential(_Thin(m))])
def test_a_wrapped_model_has_the_same_layers(wrap):
    """Wrapping a model (nn.Sequential(model), a module whose forward calls it) changes
    nothing but the names' prefix: the wrapped model's own parameters make it no layer,
    as they do not unwrapped."""
    torch.manual_seed(0)
    x = torch.randn(8, 5, 16)
    model = _OwnsAndCalls()
    plain = varprobe.probe(model, x)
    wrapped = varprobe.probe(wrap(model), x)
    assert [layer.name.split(".")[-1] for layer in wrapped.layers] == \
        [layer.name for layer in plain.layers] == ["a", "act", "b"]
    assert [layer.forward.var for layer in wrapped.layers] == \
        [layer.forward.var for layer in plain.layers]


class _Reentrant(nn.Module):
    """A use_reentrant=True checkpoint (autograd.grad refuses it: the probe runs
    backward()), and a tensor the model keeps that requires grad but is no parameter."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)
        self.scale = torch.ones(1, requires_grad=True)

    def forward(self, x):
        return self.b(checkpoint(self.a, x * self.scale, use_reentrant=True))


def test_a_reentrant_checkpoint_leaves_grads_and_optimizer_hooks_alone():
    """backward() writes every leaf it reaches and runs post-accumulate hooks (an
    optimizer in the backward, which steps the weights): the probe holds both off, the
    kept tensor's grad stays None, the weights stay as they were, and the hooks are
    still there after it."""
    torch.manual_seed(0)
    model, calls = _Reentrant(), []

    def step(p):
        calls.append(p)
        p.data.add_(p.grad, alpha=-0.1)

    for p in (model.a.weight, model.b.weight):  # inside the checkpoint and outside it
        p.register_post_accumulate_grad_hook(step)
    before = [p.detach().clone() for p in model.parameters()]
    report = varprobe.probe(model, torch.randn(4, 8))
    assert calls == [] and model.scale.grad is None
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(layer.weight_grad_ratio > 0 for layer in report.layers)
    model(torch.randn(4, 8)).sum().backward()
    assert len(calls) == 2


def test_a_spectral_norm_in_train_mode_is_measured_at_the_pass_own_weight():
    """A spectral norm in train mode takes a power-iteration step each time its weight
    is computed: the probe computes it once, in the pass (as a plain forward does), so
    the recorded variance is the plain forward's to RTOL (one step more moves
    it 1.6% here)."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.spectral_norm(nn.Linear(64, 64)), nn.ReLU(),
                          nn.Linear(64, 4)).train()
    x = torch.randn(64, 64)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        y = twin[0](x).double()
    report = varprobe.probe(model, x)
    assert report.layers[0].forward.var == pytest.approx(y.var(unbiased=False).item(),
                                                          rel=RTOL)


class _NormedCheckpoint(nn.Module):
    """weight_norm layers (computed weights) around a checkpointed one."""

    def __init__(self, reentrant: bool):
        super().__init__()
        from torch.nn.utils import parametrizations

        self.a = parametrizations.weight_norm(nn.Linear(8, 8))
        self.c = nn.Linear(8, 8)
        self.b = parametrizations.weight_norm(nn.Linear(8, 2))
        self.reentrant = reentrant

    def forward(self, x):
        h = checkpoint(self.c, self.a(x), use_reentrant=self.reentrant)
        return self.b(torch.relu(h))


def test_computed_weights_keep_their_gradient_ratio_under_a_reentrant_checkpoint():
    """The backward() a reentrant checkpoint needs also reads computed weights' gradients
    (they were reported as "no gradient reached the weight"): the same ratios as with a
    non-reentrant checkpoint."""
    ratios = []
    for reentrant in (False, True):
        torch.manual_seed(0)
        report = varprobe.probe(_NormedCheckpoint(reentrant), torch.randn(16, 8))
        ratios.append([layer.weight_grad_ratio for layer in report.layers
                       if layer.kind == "weight"])
    assert ratios[1] == pytest.approx(ratios[0], rel=1e-12)
    assert all(r is not None and r > 0 for r in ratios[1])


def test_complex_weights_are_not_measured_and_say_so():
    """A complex weight's real part alone is no moment of it (it read half of Var[w],
    with torch's warning about the discarded imaginary part): its weight statistics are
    null with the reason; the real layers beside it are measured as ever."""
    class Complex(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8, dtype=torch.cfloat)
            self.b = nn.Linear(8, 2)

        def forward(self, x):
            return self.b(self.a(x.to(torch.cfloat)).real)

    torch.manual_seed(0)
    model = Complex()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no complex-to-real cast inside the probe
        report = varprobe.probe(model, torch.randn(16, 8))
    layers = {layer.name: layer for layer in report.layers}
    assert layers["a"].weight_var is None
    assert layers["a"].unavailable["weight_var"] == "complex weights: not measured"
    assert layers["b"].weight_var == pytest.approx(
        model.b.weight.detach().double().var(unbiased=False).item(), rel=RTOL)
