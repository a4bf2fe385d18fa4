"""``varprobe predict``: the closed form from a shape-only pass, on meta or on the CPU.

Predictions are functions of shapes, fans, gains and weight variances only, so with the
weight variances fixed (an ``--init`` scheme) a meta build and a CPU build must give the
very same numbers; the counterfactual schemes never depend on the realized weights.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from typer.testing import CliRunner

import varprobe
from varprobe.cli import app
from varprobe.predict import predict, predict_target

MODEL = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.act2 = nn.Tanh()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = self.act1(self.bn(self.conv1(x)))
        return self.fc(self.flat(self.pool(self.act2(self.conv2(h)))))


model = Net
example_input = lambda batch: torch.randn(batch, 3, 16, 16)
"""

NEEDS_VALUES = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        depth = 2 + int(torch.rand(()).item() > 1)  # a draw has no value on meta
        self.layers = nn.Sequential(*(nn.Linear(12, 12) for _ in range(depth)))

    def forward(self, x):
        return self.layers(x)


model = Net
"""


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(MODEL)
    return str(path)


def structure(report):
    return [(layer.name, layer.call, layer.type, layer.kind, layer.shape, layer.input_shape,
             layer.fan_in, layer.fan_out) for layer in report.layers]


def predictions(report):
    out = {}
    for layer in report.layers:
        p = layer.predicted
        out[layer.label] = None if p is None else (p.forward_var, p.backward_var)
        for name, s in layer.schemes.items():
            out[f"{layer.label}/{name}"] = (s.forward_var, s.backward_var)
    return out


def same(a, b, rel=1e-12):
    assert a.keys() == b.keys()
    for key in a:
        if a[key] is None or b[key] is None:
            assert a[key] == b[key], key
            continue
        for x, y in zip(a[key], b[key]):
            assert (x is None and y is None) or math.isclose(x, y, rel_tol=rel), key


def test_meta_and_cpu_give_the_same_predictions(model_file):
    meta = predict_target(model_file, batch_size=4, init="he", compare="all")
    cpu = predict_target(model_file, batch_size=4, init="he", device="cpu", compare="all")
    assert meta.settings["device"] == "meta" and cpu.settings["device"] == "cpu"
    assert structure(meta) == structure(cpu)
    same(predictions(meta), predictions(cpu))
    ends = lambda r: (r.summary.forward_ratio, r.summary.backward_ratio)  # noqa: E731
    assert ends(meta) == ends(cpu)


def test_counterfactual_schemes_do_not_depend_on_the_weights(model_file):
    meta = predict_target(model_file, batch_size=4, compare="all")
    cpu = predict_target(model_file, batch_size=4, device="cpu", compare="all")
    keep = lambda p: {k: v for k, v in p.items() if "/" in k}  # noqa: E731
    assert len(keep(predictions(meta))) == len(meta.weight_layers) * len(varprobe.theory.SCHEMES)
    same(keep(predictions(meta)), keep(predictions(cpu)))
    # Meta has no weight values: the init its constructor applied is recorded
    # (reset_parameters' kaiming_uniform_, Var = 1/(3 n)); the CPU build reads them.
    fc_meta, fc_cpu = meta.layers[-1], cpu.layers[-1]
    assert fc_meta.weight_var == pytest.approx(1 / (3 * 16), rel=1e-12)
    assert any("recorded while it was built on the meta device" in note for note in meta.notes)
    # 160 draws from U(-b, b): the sample variance has relative sd sqrt((9/5 - 1)/160)
    # = 0.071, so 0.25 is 3.5 sd.
    assert fc_cpu.weight_var == pytest.approx(1 / (3 * 16), rel=0.25)


def test_structure_matches_a_measured_probe(model_file):
    from varprobe import target

    predicted = predict_target(model_file, batch_size=4, device="cpu")
    loaded = target.load(model_file)
    measured = varprobe.probe(loaded.model, loaded.example_input, batch_size=4, mode="train")
    assert structure(predicted) == structure(measured)


def test_measured_fields_are_null_with_a_reason(model_file):
    report = predict_target(model_file, batch_size=4)
    data = report.to_dict()
    assert data["input"]["var"] is None and data["input"]["shape"] == [4, 3, 16, 16]
    for layer in data["layers"]:
        for key in ("input", "forward", "backward", "backward_input"):
            assert layer[key] is None
            assert "not measured" in layer["unavailable"][key]
    assert data["settings"]["source"] == "closed-form"
    assert any(layer["predicted"] for layer in data["layers"])


def test_a_model_too_big_to_allocate_is_predicted_on_meta(tmp_path):
    path = tmp_path / "big.py"
    path.write_text("from torch import nn\n"
                    "model = lambda: nn.Sequential(nn.Linear(100_000, 100_000), nn.ReLU(),\n"
                    "                              nn.Linear(100_000, 100_000))\n")
    start = time.perf_counter()
    report = predict_target(str(path), batch_size=2)
    assert time.perf_counter() - start < 20
    assert report.model.parameters == 2 * (100_000 * 100_000 + 100_000)  # 80 GB in fp32
    assert report.layers[-1].predicted.forward_var is not None


def test_a_constant_read_in_the_constructor_is_known_on_meta(tmp_path):
    path = tmp_path / "reads_a_constant.py"
    path.write_text(NEEDS_VALUES.replace("2 + int(torch.rand(()).item() > 1)",
                                         "int(torch.tensor(2.0).item())"))
    report = predict_target(str(path), batch_size=4)
    assert report.settings["device"] == "meta"
    assert sum(layer.kind == "weight" for layer in report.layers) == 2


def test_falls_back_to_the_cpu_with_a_note(tmp_path):
    path = tmp_path / "needs_values.py"
    path.write_text(NEEDS_VALUES)
    report = predict_target(str(path), batch_size=4)
    assert "could not be built or run on the meta device" in report.notes[0]
    assert report.settings["device"] == "cpu"
    assert report.layers[0].weight_var is not None  # read from the real weights


def test_cli_predict_writes_the_report_schema(model_file, tmp_path):
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["predict", model_file, "-b", "4", "-f", "json",
                                      "-o", str(out), "--init", "xavier"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["schema"] == "varprobe.report/1"
    assert data["settings"]["init"] == "xavier"
    assert data["layers"][0]["weight_var"] == pytest.approx(2 / (27 + 72))  # 2/(n_in+n_out)


def test_cli_unavailable_device_is_one_line_exit_2(model_file):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = CliRunner().invoke(app, ["predict", model_file, "--device", "cuda"])
    assert result.exit_code == 2
    assert "--device cuda" in result.output


# --- residual structure: the predictions follow the recorded graph ---------------------

class Attention(torch.nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        y = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(torch.nn.Module):
    def __init__(self, d, heads=0):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.attn = Attention(d, heads) if heads else None
        self.fc, self.gelu, self.fc2 = (torch.nn.Linear(d, 4 * d), torch.nn.GELU(),
                                        torch.nn.Linear(4 * d, d))

    def forward(self, x):
        if self.attn is not None:
            x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.gelu(self.fc(self.ln2(x))))


class GPT(torch.nn.Module):
    """A pre-LN decoder as bench/gpt175b.py builds it, small."""

    def __init__(self, layers=4, d=32, heads=4, vocab=64, context=16):
        super().__init__()
        self.wte, self.wpe = torch.nn.Embedding(vocab, d), torch.nn.Embedding(context, d)
        self.blocks = torch.nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln_f, self.head = torch.nn.LayerNorm(d), torch.nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.head(self.ln_f(self.blocks(self.wte(ids) + self.wpe(pos))))


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "the probe reads the tokens' shapes it measures (the gradient's token correlation "
    "at each attention output, the norms' kappa); predict derives them from the tokens' "
    "Gram (theory.tokens), which leaves every backward below ln_f 7-9% under the "
    "probe's (seed 0: wte 1/1.10, blocks.3.fc2 1/1.07) and blocks.0.ln1 1/1.18 (1/1.31 "
    "with r_g taken as 0), the probe the closer to the measured gradient (measured/probe "
    "0.98-1.05, measured/predict 1.05-1.24)"))
def test_a_pre_ln_decoder_agrees_with_the_graph_of_a_measured_probe():
    """Same weights on the CPU: the closed form walks the probe's graph. Up to the first
    attention call the two agree but for LayerNorm's eps (a probe knows the measured
    E[x²] s² and predicts gamma² s²/(s²+eps), predict takes s² ≫ eps: a relative
    difference eps/s² < 1e-5 that the next layers pass on). At attention the probe uses
    what it measured at the call, predict the closed forms: the token correlation r (a
    probe measures it, predict takes the per-unit-mean share, a lower bound) and Σp²."""
    torch.manual_seed(0)
    model = GPT()
    ids = torch.randint(0, 64, (8, 16))
    cotangent = torch.randn(8, 16, 64)
    cotangent = (cotangent - cotangent.mean()) / cotangent.std(correction=0)  # Var = 1
    closed = varprobe.predict.predict(model, ids)
    probed = varprobe.probe(model, ids, grad_output=cotangent, mode="train")
    # E[z²] = q_v [r + P₂(1 - r)]: with P₂ ≈ 0.22 here and r below 0.1 in both, a gap
    # in r of at most 0.03 moves it by at most 0.03 (1 - P₂)/(r + P₂) < 11%; the
    # backward's dependence on r is a fraction of that (attention.backward).
    forward_tolerance, backward_tolerance = 0.11, 0.05
    for c, p in zip(closed.layers, probed.layers):
        assert c.label == p.label and c.predicted.basis == p.predicted.basis == "graph"
        assert c.predicted.forward_var is not None and c.predicted.backward_var is not None
        at_attention = c.label.endswith("attn.proj")
        assert p.predicted.forward_var == pytest.approx(
            c.predicted.forward_var, rel=forward_tolerance if at_attention else 1e-4), c.label
        assert p.predicted.backward_var == pytest.approx(
            c.predicted.backward_var, rel=backward_tolerance), c.label
    # The attention calls themselves: the same logit variance (the same weights walked),
    # Σp² from the closed form within 5% of the probe's measured subsample (attention.md
    # §3.4; tests/test_attention_rules.py), and no call saturated at this init.
    assert len(closed.attention) == len(probed.attention) == 4
    for c, p in zip(closed.attention, probed.attention):
        assert c["logit_variance"] == pytest.approx(p["logit_variance"], rel=1e-4)
        assert c["participation"] == pytest.approx(p["participation"], rel=0.05)
        assert p["participation_basis"] == "measured" and not c["saturated"]


def tower(depth=12, d=32):
    return torch.nn.Sequential(*(Block(d) for _ in range(depth)))


def test_the_residual_stream_grows_as_the_sum_of_its_branches():
    """Var[x + F(x)] = Var[x] + Var[F(x)]: with the norm resetting each branch's input,
    every block adds the same Var[F], so the stream grows linearly from E[x²] = 1."""
    with torch.device("meta"):
        model = tower()
    report = varprobe.predict.predict(model, input_shape=(32,), batch_size=4, init="he")
    lns = [x for x in report.layers if x.type == "LayerNorm"]
    fc2 = [x for x in report.layers if x.label.endswith("fc2")]
    stream = 1.0
    for ln, branch in zip(lns, fc2):
        assert ln.predicted.input_var == pytest.approx(stream, rel=1e-12)
        stream += branch.predicted.forward_var
    assert stream > 1 + 11 * fc2[0].predicted.forward_var
    # Backward: through each norm at its predicted input and down both paths of each
    # add; finite, and the same on the CPU.
    grads = [x.predicted.backward_var for x in report.weight_layers]
    assert all(g is not None and 0 < g < 1e3 for g in grads)
    with torch.device("cpu"):
        cpu = varprobe.predict.predict(tower(), input_shape=(32,), batch_size=4, init="he")
    assert [x.predicted.backward_var for x in cpu.weight_layers] == pytest.approx(grads,
                                                                                  rel=1e-12)


class Scaled(torch.nn.Module):
    """x + alpha F(x) with a learnable scalar alpha (SkipInit)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.alpha = torch.nn.Parameter(torch.full((), 0.2))

    def forward(self, x):
        return self.fc2(x + self.alpha * self.fc1(x))


def test_a_parameter_with_no_value_on_meta_stops_the_prediction_with_a_reason():
    with torch.device("meta"):
        model = Scaled()
    report = varprobe.predict.predict(model, input_shape=(8,), batch_size=4)
    fc1, fc2 = report.layers
    assert fc1.predicted.forward_var is not None
    assert fc2.predicted.forward_var is None and "meta device" in fc2.predicted.note
    cpu = varprobe.predict.predict(Scaled(), input_shape=(8,), batch_size=4)
    assert cpu.layers[1].predicted.forward_var is not None  # the CPU reads alpha = 0.2


PRELU = """
from torch import nn
model = lambda: nn.Sequential(nn.Linear(16, 16), nn.PReLU(16, init=0.1), nn.Linear(16, 16))
"""


def test_prelu_on_meta_takes_its_initial_slope(tmp_path):
    from varprobe import theory

    with torch.device("meta"):
        prelu = torch.nn.PReLU(3, init=-0.3)
    assert theory.prelu_slope(prelu) == pytest.approx(0.3)
    path = tmp_path / "prelu.py"
    path.write_text(PRELU)
    meta = predict_target(str(path), batch_size=4, init="he")
    cpu = predict_target(str(path), batch_size=4, init="he", device="cpu")
    assert meta.settings["device"] == "meta"  # no fall back to the CPU
    assert any("PReLU slopes" in note and "initial" in note for note in meta.notes)
    # A CPU PReLU holds its init rounded to float32: a relative 6e-8 on the slope.
    same(predictions(meta), predictions(cpu), rel=1e-7)
    assert meta.layers[0].gain == pytest.approx((1 + 0.1**2) / 2)


def test_terminal_header_says_closed_form(model_file):
    from varprobe.render.terminal import header

    text = header(predict_target(model_file, batch_size=4)).plain
    assert "closed-form" in text and "unit cotangent assumed" in text
    assert "seed None" not in text and "cotangent None" not in text


# --- the loss's cotangent -----------------------------------------------------------------

def test_cross_entropy_cotangent_equals_autograds():
    """At a uniform softmax (zero logits) the mean cross-entropy's gradient has exactly
    the Var --cotangent cross-entropy assumes, (1 - 1/V)/(V N^2); autograd says so."""
    from varprobe.predict import cotangent_var

    n_rows, v = 96, 37
    logits = torch.zeros(8, 12, v, requires_grad=True)
    targets = torch.randint(v, (8, 12), generator=torch.Generator().manual_seed(0))
    torch.nn.functional.cross_entropy(logits.reshape(-1, v), targets.reshape(-1)).backward()
    var, note = cotangent_var("cross-entropy", logits)
    assert logits.grad.double().pow(2).mean().item() == pytest.approx(var, rel=1e-9)
    assert var == pytest.approx((1 - 1 / v) / (v * n_rows ** 2), rel=1e-12)
    assert f"{n_rows} rows of {v} logits" in note


def test_predict_under_a_cross_entropy_loss_matches_the_probe_with_it():
    """A GPT-style decoder, mean cross-entropy on random targets. The head's output
    gradient is the cotangent itself: predict's, seeded with --cotangent cross-entropy,
    against a probe that backpropagates the loss. The logits are not exactly uniform
    (E[z^2] = 1/3, so sum p^2 = 1.4/V, not 1/V: 0.1% at V = 512), hence 1%. Every other
    layer's predicted gradient is the unit-cotangent walk's times that Var (the backward
    is linear in its seed)."""
    from bench.models import GPT

    torch.manual_seed(0)
    vocab, model = 512, GPT(layers=2, d=64, heads=4, vocab=512, context=64)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(vocab, (8, 64), generator=g)
    targets = torch.randint(vocab, (8, 64), generator=g)

    def loss(out):
        return torch.nn.functional.cross_entropy(out.reshape(-1, vocab), targets.reshape(-1))

    measured = varprobe.probe(model, ids, loss=loss)
    predicted = predict(model, ids, cotangent="cross-entropy")
    assert measured.layers[-1].label == "head"
    assert predicted.layers[-1].predicted.backward_var == pytest.approx(
        measured.layers[-1].backward.var, rel=0.01)
    unit = predict(model, ids)
    var = predicted.settings["cotangent_var"]
    assert var == pytest.approx((1 - 1 / vocab) / (vocab * (8 * 64) ** 2))
    for p, u in zip(predicted.layers, unit.layers):
        if p.kind == "weight":
            assert p.predicted.backward_var == pytest.approx(var * u.predicted.backward_var)


def test_cli_cotangent_bad_value_is_exit_2(model_file):
    result = CliRunner().invoke(app, ["predict", model_file, "--cotangent", "mse"])
    assert result.exit_code == 2
    assert "--cotangent must be unit, cross-entropy or a positive number" in result.output


class _Shortcut(torch.nn.Module):
    """A residual block whose identity shortcut is ``shortcut`` (pytorch-cifar writes
    ``nn.Sequential()``, which returns its input)."""

    def __init__(self, shortcut: torch.nn.Module):
        super().__init__()
        self.lin, self.act, self.shortcut = torch.nn.Linear(64, 64), torch.nn.ReLU(), shortcut

    def forward(self, x):
        return self.act(self.lin(x)) + self.shortcut(x)


def test_an_empty_sequential_shortcut_is_the_identity():
    """``nn.Sequential()`` returns its input: the closed forms follow it as nn.Identity
    (they stopped there: no forward prediction after it, no backward before it)."""
    from torch import nn

    def predicted(shortcut):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64), _Shortcut(shortcut), nn.Linear(64, 10))
        report = predict(model, batch_size=64)
        return [(layer.predicted.forward_var, layer.predicted.backward_var)
                for layer in report.layers if layer.kind == "weight"]

    empty = predicted(nn.Sequential())
    assert empty == predicted(nn.Identity())
    assert all(f is not None and b is not None for f, b in empty)


DEAD_BIAS = """
from torch import nn
def build_model():
    layers = []
    for i in range(4):
        lin = nn.Linear(64, 64)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.constant_(lin.bias, -10.0 if i == 1 else 0.0)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(64, 10))
"""


def test_a_recorded_bias_constant_reaches_the_prediction(tmp_path):
    """``constant_(bias, -10)`` after a He layer: the ReLU after it sees N(-10, 2) and
    passes almost nothing (Φ(-10/√2) ~ 1e-12). On meta the recorded bias gives its mean
    as well as its square (the mean was dropped: the ReLU was predicted alive at 102)."""
    path = tmp_path / "dead_bias.py"
    path.write_text(DEAD_BIAS)
    report = predict_target(str(path), batch_size=64)
    layers = [layer for layer in report.layers if layer.kind == "weight"]
    assert layers[1].bias_mean == -10.0 and layers[0].bias_mean == 0.0
    assert layers[1].predicted.forward_var == pytest.approx(102, rel=1e-2)  # 2 + 100
    assert layers[2].predicted.forward_var < 1e-9


SMALL_GAMMA = """
from torch import nn
def build_model():
    layers = []
    for _ in range(3):
        lin, bn = nn.Linear(64, 64), nn.BatchNorm1d(64)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.normal_(bn.weight, std=0.02)  # as transformers' EfficientNet/MobileViT
        layers += [lin, bn, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(64, 10))
"""


def test_a_recorded_norm_scale_drawn_at_random_reaches_the_prediction(tmp_path):
    """BatchNorm γ ~ N(0, 0.02) recorded on meta: the norms' output is mean(γ²) ~ 4e-4 of
    a normalized signal, not 1. Each later weight layer's predicted E[y²] is within 2x of
    what a probe of the same file built on the CPU measures (it was 200x off: γ = 1 was
    assumed); one γ draw of 64 channels scatters mean(γ²) by ~ sqrt(2/64) = 18%."""
    path = tmp_path / "small_gamma.py"
    path.write_text(SMALL_GAMMA)
    predicted = predict_target(str(path), batch_size=256)
    from varprobe import target as target_mod

    loaded = target_mod.load(str(path), device="cpu", seed=0)
    measured = varprobe.probe(loaded.model, batch_size=256)
    pairs = [(p.predicted.forward_var, m.forward.second_moment)
             for p, m in zip(predicted.layers, measured.layers) if p.kind == "weight"]
    assert all(0.5 < meas / pred < 2 for pred, meas in pairs[1:]), pairs
    assert pairs[1][0] < 1e-2


DEEP = """
from torch import nn
def build_model():
    layers = []
    for _ in range(20):
        lin = nn.Linear(64, 64, bias=False)
        nn.init.{init}(lin.weight)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(64, 10))
"""


@pytest.mark.parametrize(("init", "errors"), [
    ("xavier_normal_", ["vanishing_forward"]),  # (1/2)^20 of the input: 1e-6
    ("kaiming_normal_", [])])
def test_predict_judges_the_predicted_signal(tmp_path, init, errors):
    """With nothing measured, ``predict`` holds each weight layer's predicted input E[x²]
    against its reference's predicted one, in the same band: a 20-layer Xavier ReLU
    stack keeps 2^-20 ~ 1e-6 of its input, flagged where a probe flags it; He's is not
    (it was HEALTHY either way: the rules read measured values only). Also the dead
    ReLU of ``DEAD_BIAS``."""
    path = tmp_path / "deep.py"
    path.write_text(DEEP.replace("{init}", init))
    report = predict_target(str(path), batch_size=64)
    found = sorted({f.code for layer in report.layers for f in layer.flags
                    if f.severity == "error"})
    assert found == errors
    if errors:
        flag = next(f for layer in report.layers for f in layer.flags
                    if f.code == "vanishing_forward")
        assert "predicted" in flag.message
    dead = tmp_path / "dead_bias.py"
    dead.write_text(DEAD_BIAS)
    assert any(f.code == "vanishing_forward" for layer in
               predict_target(str(dead), batch_size=64).layers for f in layer.flags)
