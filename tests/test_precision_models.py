"""Number-format flags on the evidence models, against truth computed here by casting.

sample_models/fp16_overflow_mlp.py: activations reach about 1e5. The layers flagged for
fp16 overflow are exactly those whose output, recomputed here, has an element that
casts to inf; bf16 flags none.
sample_models/fp16_underflow_sigmoid.py: gradients fall to about 1e-9. Without loss
scaling, the output gradients flagged for underflow are exactly those of which more
than the threshold casts to zero (gradients recomputed here with autograd); under the
recommended loss scale every gradient casts with at most that fraction lost and none
overflows, and the probe flags nothing. The gradients have 65536 elements, more than
``exponents.SAMPLE``: their histograms are sampled, so a gradient whose flushed
fraction is within SIGMAS standard errors of the threshold may go either way.
"""

from __future__ import annotations

import json
import math
import runpy

import pytest
import torch
from torch import nn

import varprobe
from tests.cli_helpers import run
from varprobe.diagnose import Thresholds
from varprobe.exponents import SAMPLE
from varprobe.mixed import probe as mixed_probe
from varprobe.precision import Settings
from varprobe.predict import predict

OVERFLOW = "sample_models/fp16_overflow_mlp.py"
UNDERFLOW = "sample_models/fp16_underflow_sigmoid.py"
THRESHOLD = 0.01  # the default underflow threshold, diagnose.Thresholds.underflow
SIGMAS = 5  # a sampled fraction lies this many binomial standard errors from the truth
# with probability below 6e-7: closer to the threshold than that, either flag is right
RANGE_CODES = ("overflow", "underflow", "loss_scale_conflict")


def load(path: str):
    torch.manual_seed(0)
    ns = runpy.run_path(path)
    g = torch.Generator().manual_seed(1)
    return ns["build_model"](), torch.randn(256, 256, generator=g), ns.get("loss")


def flagged(report, code: str, what: str = "") -> set[str]:
    return {layer.label for layer in report.layers for f in layer.flags
            if f.code == code and what in f.message}


def outputs(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for layer in model:
        x = layer(x)
        out.append(x)
    return out


def test_overflow_flagged_at_the_layer_where_fp16_casts_give_inf():
    model, x, _ = load(OVERFLOW)
    with torch.no_grad():
        truth = {str(i) for i, y in enumerate(outputs(model, x))
                 if y.to(torch.float16).isinf().any()}
    assert truth  # the model does reach past 65504 ...
    report = varprobe.probe(model, x, precision=Settings("fp16"))
    assert flagged(report, "overflow") == truth
    first = min(truth, key=int)
    assert report.layers[int(first)].type == "Linear"  # ... first at a Linear's output
    assert 5e4 < report.layers[int(first)].ranges["forward"]["amax"] < 2e5
    bf16 = varprobe.probe(model, x, precision=Settings("bf16"))
    assert not any(f.code in RANGE_CODES for layer in bf16.layers for f in layer.flags)


def gradients(model: nn.Sequential, x: torch.Tensor, loss) -> tuple[list, list]:
    """Every layer's output gradient and every Linear's weight gradient, by autograd."""
    ys = outputs(model, x)
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    grads = torch.autograd.grad(loss(ys[-1]), ys + weights)
    return list(grads[:len(ys)]), list(grads[len(ys):])


def flushed(g: torch.Tensor, scale: float) -> float:
    """The fraction of g * scale (exact: a power of two) that casts to zero in fp16."""
    s = g.double() * scale
    return ((s.to(torch.float16) == 0) & (s != 0)).sum().item() / g.numel()


def test_underflow_without_loss_scaling_and_the_recommended_scale_clears_it():
    model, x, loss = load(UNDERFLOW)
    outs, wgrads = gradients(model, x, loss)
    assert max(g.abs().max().item() for g in outs[:2]) < 1e-8  # gradients ~1e-9
    unscaled = varprobe.probe(model, x, loss=loss, precision=Settings("fp16", 1.0))
    truth = {str(i): flushed(g, 1.0) for i, g in enumerate(outs)}
    got = flagged(unscaled, "underflow", "output gradient")
    for i, p in truth.items():  # the probe's fraction is from a sample of each gradient
        se = math.sqrt(p * (1 - p) / min(SAMPLE, outs[int(i)].numel()))
        if p > THRESHOLD + SIGMAS * se:
            assert i in got, (i, p)
        elif p < THRESHOLD - SIGMAS * se:
            assert i not in got, (i, p)
    assert sum(p > THRESHOLD + SIGMAS * math.sqrt(p * (1 - p) / SAMPLE)
               for p in truth.values()) >= 8  # most of the decision is not left to chance

    scale = unscaled.precision["loss_scale"]["recommended"]
    assert scale == varprobe.probe(model, x, loss=loss,
                                   precision=Settings("fp16")).precision["loss_scale"]["used"]
    for g in outs + wgrads:  # the recommendation, checked by casting
        assert flushed(g, scale) <= THRESHOLD
        assert torch.isfinite((g.double() * scale).to(torch.float16)).all()
    scaled = varprobe.probe(model, x, loss=loss, precision=Settings("fp16", scale))
    assert not any(f.code in RANGE_CODES for layer in scaled.layers for f in layer.flags)


def test_predicted_headroom_agrees_with_measured():
    """The Gaussian tail model's median max of N draws against the measured max, where
    the prediction is local-or-better and the tensor a Linear's output or gradient:
    within half a binade. The max of N = 65536 Gaussians has a relative spread of
    about (pi / sqrt 6) / (2 ln N) = 6%, the predicted second moments about 10% here
    (meas/pred of the table), so half a binade (x1.41) is loose for a right model and
    tight for a wrong one (a tail model off by a factor, or no tail model: the rms is
    4.4 sd below the max, two binades)."""
    checks = [(OVERFLOW, "forward"), (UNDERFLOW, "backward")]
    for path, key in checks:
        model, x, loss = load(path)
        report = varprobe.probe(model, x, loss=loss, precision=Settings("fp16"))
        pairs = [(layer.ranges[key]["amax"], layer.ranges[f"predicted_{key}"]["amax"])
                 for layer in report.layers if layer.type == "Linear"
                 and f"predicted_{key}" in layer.ranges]
        assert len(pairs) >= 7
        for got, want in pairs:
            assert abs(math.log2(got / want)) < 0.5, (path, got, want)


def test_predict_flags_the_same_overflow_before_any_tensor_exists():
    model, x, _ = load(OVERFLOW)
    measured = varprobe.probe(model, x, precision=Settings("fp16"))
    report = predict(model, x, precision=Settings("fp16"))
    assert report.precision["basis"].startswith("predicted")
    assert flagged(report, "overflow") == flagged(measured, "overflow")


def test_extremes_from_the_moment_read_are_every_elements(monkeypatch, numba_kernels):
    """Past SAMPLE elements the probe takes amax and the smallest non-zero |x| from the
    moment kernel's own read where it can (``stats.extremes_read``): exactly those of
    every element of each output, output gradient, weight and weight gradient,
    recomputed here with autograd."""
    from varprobe import kernels

    reads = []
    monkeypatch.setattr(kernels, "sums_extremes",
                        lambda *a, f=kernels.sums_extremes: reads.append(1) or f(*a))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 256))
    x, g = torch.randn(128, 256), torch.randn(128, 256)  # 32768 elements each
    report = varprobe.probe(model, x, grad_output=g, precision=Settings("fp16"))
    ys = outputs(model, x)
    weights = [model[0].weight, model[2].weight]
    grads = torch.autograd.grad(ys[-1], ys[:-1] + weights, g)
    truth = {(i, "forward"): y for i, y in enumerate(ys)}
    truth.update({(i, "backward"): d for i, d in enumerate(list(grads[:-2]) + [g])})
    truth.update({(0, "weight"): weights[0], (2, "weight"): weights[1],
                  (0, "weight_grad"): grads[-2], (2, "weight_grad"): grads[-1]})
    for (i, key), t in truth.items():
        row, a = report.layers[i].ranges[key], t.detach().abs()
        assert row["sample"] == SAMPLE < row["numel"] == t.numel(), (i, key)
        assert row["amax"] == a.max().item() and row["min_nonzero"] == a[a > 0].min().item()
    assert reads  # the moment kernel's read, with the range statistics' reads in it


def test_one_host_read_with_range_statistics(monkeypatch):
    """As tests/test_fastpath.py: on the accelerators' code path the range statistics
    travel in the pass's one transfer."""
    from tests.test_fastpath import count_host_reads

    torch.manual_seed(0)  # small: the chunked torch path is slow on a CPU
    model = nn.Sequential(nn.Linear(64, 64), nn.Sigmoid(), nn.Linear(64, 64))
    x, loss = torch.randn(16, 64), lambda y: y.pow(2).mean()
    calls = count_host_reads(monkeypatch)
    report = varprobe.probe(model, x, loss=loss, precision=Settings("fp16"))
    monkeypatch.undo()
    assert calls == [("cpu", "collect"), ("tolist", "collect")]
    assert report.layers[0].ranges["backward"]["amax"] > 0


def test_default_probe_measures_no_ranges():
    model, x, _ = load(OVERFLOW)
    report = varprobe.probe(model, x)
    data = report.to_dict()
    assert "precision" not in data and not any("ranges" in d for d in data["layers"])


def test_integer_inputs_are_skipped_with_a_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 16))
    report = varprobe.probe(model, torch.randint(0, 100, (8, 4)),
                            precision=Settings("fp16"))
    first = report.layers[0]
    assert "input" not in first.ranges and "forward" in first.ranges
    assert "no floating-point input" in first.unavailable["input"]


def test_autocast_reports_where_it_parts_from_float32():
    """Under fp16 autocast the overflow model's activations become inf at the layer
    where the fp16 cast does (computed here): the forward parts there first."""
    model, x, _ = load(OVERFLOW)
    x = x[:64]  # fp16 and bf16 matmuls are slow on a CPU; the truth is recomputed here
    with torch.no_grad():
        first = min(i for i, y in enumerate(outputs(model, x))
                    if y.to(torch.float16).isinf().any())
    report = mixed_probe(model, x, precision=Settings(autocast="fp16"))
    parted = report.precision["autocast"]["forward"]
    assert report.layers[first].dtype == "float16"
    assert parted["first"] == str(first)
    model, x, _ = load(UNDERFLOW)
    calm = mixed_probe(model, x[:64], precision=Settings(autocast="bf16"))
    assert calm.precision["autocast"]["forward"]["max_relative_difference"] > 0


def test_cli_precision(capsys, tmp_path):
    bad = run(capsys, "analyze", OVERFLOW, "--precision", "fp32")
    assert bad.code == 2 and "fp16" in bad.err and "fp8-e5m2" in bad.err
    assert len(bad.err.strip().splitlines()) == 1
    scale = run(capsys, "analyze", OVERFLOW, "--precision", "fp16", "--loss-scale", "3")
    assert scale.code == 2 and "power of two" in scale.err
    out = tmp_path / "r.json"
    checked = run(capsys, "check", OVERFLOW, "--precision", "fp16", "-o", str(out))
    assert checked.code == 1 and "overflow" in checked.out
    data = json.loads(out.read_text())
    forward = data["layers"][0]["ranges"]["forward"]
    assert sum(forward["histogram"]["counts"]) + forward["zeros"] == forward["sample"]
    assert forward["sample"] == min(forward["numel"], SAMPLE)
    assert data["precision"]["format"] == "fp16"
    md = tmp_path / "r.md"
    shown = run(capsys, "analyze", UNDERFLOW, "--precision", "fp16", "--ranges",
                "-o", str(md))
    assert shown.code == 0 and "fp16 under%" in shown.out and "recommended 2^" in shown.out
    assert "## Number formats" in md.read_text()


@pytest.mark.parametrize("fmt", ["fp8-e4m3", "fp8-e5m2"])
def test_fp8_with_amax_scaling_never_overflows(fmt):
    model, x, _ = load(OVERFLOW)
    report = varprobe.probe(model, x, precision=Settings(fmt))
    assert not flagged(report, "overflow")
    assert report.precision["scaling"].startswith("per-tensor amax")


def test_a_torch_without_float8_gets_one_note_and_the_rest(monkeypatch):
    model, x, _ = load(OVERFLOW)
    monkeypatch.delattr(torch, "float8_e4m3fn")
    report = varprobe.probe(model, x, precision=Settings("fp8-e4m3"))
    notes = [n for n in report.notes if "float8_e4m3fn" in n]
    assert len(notes) == 1 and "no torch.float8_e4m3fn" in notes[0]
    assert report.layers[0].ranges["forward"]["formats"]["fp8-e4m3"]["amax_scaled"]


def test_figure_has_the_range_panel(tmp_path):
    from varprobe.render import plots

    model, x, _ = load(OVERFLOW)
    report = varprobe.probe(model, x, precision=Settings("fp16"))
    fig = plots.figure(report)
    panel = fig.axes[-1]
    assert len(fig.axes) == 5 and panel.get_title(loc="left").startswith("(e) number ranges")
    with torch.no_grad():  # the last Linear's largest |y|, recomputed here
        top = math.log2(outputs(model, x)[-1].abs().max().item())
    tops = [seg[:, 1].max() for coll in panel.collections if hasattr(coll, "get_segments")
            for seg in coll.get_segments()]
    assert any(abs(t - top) < 1e-9 for t in tops)
    assert plots.save(report, tmp_path / "r.png").stat().st_size > 0


def test_underflow_threshold_is_configurable(capsys):
    """A threshold above every tensor's flushed fraction (computed here by casting)
    leaves only the tensors that flush entirely, which are errors whatever it is."""
    model, x, loss = load(UNDERFLOW)
    outs, _ = gradients(model, x, loss)
    whole = {str(i) for i, g in enumerate(outs)
             if flushed(g, 1.0) * g.numel() == (g != 0).sum().item()}
    t = Thresholds().updated({"underflow": 0.999}, "test")
    report = varprobe.probe(model, x, loss=loss, thresholds=t,
                            precision=Settings("fp16", 1.0))
    assert whole and flagged(report, "underflow", "output gradient") == whole
    bad = run(capsys, "analyze", UNDERFLOW, "--precision", "fp16", "--threshold",
              "underflow=2")
    assert bad.code == 2 and "underflow" in bad.err and "(0, 1]" in bad.err


def test_cli_predict_precision(capsys):
    """predict reads the model file's own init only off the meta device (--device cpu):
    then it flags the same overflow as the measured probe (the layers where a cast
    gives inf, recomputed here)."""
    model, x, _ = load(OVERFLOW)
    with torch.no_grad():
        truth = {str(i) for i, y in enumerate(outputs(model, x))
                 if y.to(torch.float16).isinf().any()}
    out = run(capsys, "predict", OVERFLOW, "--precision", "fp16", "--device", "cpu",
              "-f", "json")
    data = json.loads(out.out)
    assert data["precision"]["basis"].startswith("predicted")
    flags = {layer["name"] for layer in data["layers"] for f in layer["flags"]
             if f["code"] == "overflow"}
    assert flags == truth
