"""Whole models, measured against predicted per weight layer, averaged over seeds.

A fast subset of bench/whole_models.py (docs/whole-model-accuracy.md has the full
run): a residual MLP, a padded CNN with global average pooling and a GPT-style decoder
with causal scaled-dot-product attention, each held to the bound the whole-model check
asks for: median over weight layers of |log(seed mean of measured / seed mean of
predicted)| at most 0.1, forward E[y²] and backward Var[dL/dy], every weight layer on
the graph basis.

Why seed noise stays far below 0.1 here (docs/theory-review.md §10). For one input a
ReLU weight layer multiplies E[x²] by a random factor whose log has variance about 5/n
(2/n from the chi-square of W's rows, 3/n from the ReLU sign pattern); after l layers
the log of measured/predicted scatters with sd <= sqrt(5 l / n), and the mean of S
seeds has a standard error of about sqrt(exp(5 l / n) - 1) / sqrt(S) on the log. A
residual block x + F(x) adds its branch's share s of the output (1/2 under He), so it
contributes s² · 5/n.

* Residual MLP, n = 256, 8 blocks, S = 32: at the head sd <= sqrt(8 · 1/4 · 5/256) =
  0.20 (measured 0.20), se 0.035; at the median layer (block 4) sd <= 0.14 (measured
  0.10), se <= 0.025. The bound is 4 standard errors at the median layer; the median
  measured is 0.004 forward, 0.007 backward.
* CNN, 256 channels, 16x16 maps, batch 8, S = 16: a conv's factor averages the ReLU
  pattern over B·H·W positions, leaving about 2/c_out from its filters: per-seed sd
  0.003-0.12 over the convs, se <= 0.03. The 10-way head reads the pooled vector, which
  the samples nearly share (every channel keeps a mean after a ReLU), so it is a
  chi-square with 10 degrees of freedom: sd 0.33, se 0.08, the reason the bound is on
  the median. Zero padding makes E[x²] smaller at the borders, where fewer outputs
  read it (+0.03 to +0.07 forward at the later convs, 2σ, while the walk had one number
  per tensor); theory.profile carries the positional profile (the bench's 5-conv CNN:
  forward median 0.046 before, 0.002 after, 3 seeds).
* GPT decoder, width 256, 4 blocks, S = 8: every LayerNorm resets the scale and the
  residual branches are 0.02/sqrt(2 n_layer) small, so per-seed sd <= 0.07, se <= 0.025
  (small also because the graph carries the measured LayerNorm outputs today; a closed
  form through attention and the norms will scatter more, which the guard below checks).

Each test also checks that the median layer's standard error over the seeds (delta
method) is below a third of the bound, so a pass is not luck and a failure is not
noise. Cases that fail today because of a prediction bug are xfail(strict=True), with
the measured numbers as the reason; the bound is never widened.
"""

from __future__ import annotations

import math
import statistics

import pytest

from bench import whole_models as W
from bench import whole_zoo as Z
from bench.whole_zoo import Case

BOUND = W.BOUND

RESIDUAL = Case("residual_mlp", Z.residual_mlp, Z.gaussian(Z.WIDTH), 256,
                "8 blocks x + Linear(ReLU(x)) at 256, He, a final Linear")
CNN = Case("small_cnn", Z.small_cnn, Z.gaussian(3, 16, 16), 8,
           "4 padded 3x3 convs at 256 channels, ReLU, global average pool, Linear",
           meta_shape=(3, 16, 16))
GPT = Z.case("nanogpt")  # 4 blocks at 256, causal F.scaled_dot_product_attention
HF_GPT2, HF_GPT2_EAGER = Z.case("hf_gpt2"), Z.case("hf_gpt2_eager")  # SDPA, spelled out
RESNET_POST, RESNET_PRE = Z.case("resnet_postact"), Z.case("resnet_preact")  # train-mode BN
MOBILENET = Z.case("mobilenet")  # depthwise convs, each read by a train-mode BatchNorm
T5 = Z.case("hf_t5")  # encoder-decoder, relative position bias, SDPA
SENET = Z.case("senet")  # a squeeze-excitation gate in each of 2 post-activation blocks

SEEDS = {RESIDUAL.name: 32, CNN.name: 16, GPT.name: 8, HF_GPT2.name: 8,
         HF_GPT2_EAGER.name: 8, RESNET_POST.name: 8, RESNET_PRE.name: 8,
         MOBILENET.name: 8, SENET.name: 8}


def series(case: Case, scheme: str | None = None) -> dict[str, W.LayerSeries]:
    return W.seed_series(case, SEEDS[case.name], scheme)


def assert_within_bound(found: dict[str, W.LayerSeries]) -> None:
    stats = W.stats(found.values())
    problems = [f"{way} median |log| {median:.3f} > {BOUND}"
                for way, median in (("forward", stats.median_f), ("backward", stats.median_b))
                if median is None or median > BOUND]
    if stats.missing:
        problems.append(f"no prediction for {', '.join(stats.missing)}")
    assert not problems, "; ".join(problems) + f" (worst: {W.worst_text(stats, 3)})"
    noise = statistics.median(c.se for c in W.compare_series(found.values())[0] if c.se)
    assert noise <= BOUND / 3, f"underpowered: median standard error {noise:.3f}"


def assert_graph_basis(found: dict[str, W.LayerSeries]) -> None:
    cover = W.coverage(found)
    assert cover.graph == cover.weights, "\n".join(
        f"{name}: {note}" for name, note in cover.fallbacks)


@pytest.fixture(scope="module")
def residual() -> dict[str, W.LayerSeries]:
    return series(RESIDUAL)


@pytest.fixture(scope="module")
def cnn() -> dict[str, W.LayerSeries]:
    return series(CNN)


@pytest.fixture(scope="module")
def gpt() -> dict[str, W.LayerSeries]:
    return series(GPT)


# -- residual MLP --------------------------------------------------------------------------


def test_residual_mlp_within_bound(residual):
    assert_graph_basis(residual)
    assert_within_bound(residual)


def test_residual_mlp_lecun_counterfactual():
    assert_within_bound(series(RESIDUAL, "lecun"))


# -- CNN with zero padding and global average pooling ----------------------------------------


def test_cnn_within_bound(cnn):
    assert_graph_basis(cnn)
    assert_within_bound(cnn)


def test_cnn_lecun_counterfactual():
    assert_within_bound(series(CNN, "lecun"))


def test_cnn_closed_form_on_meta():
    report = W.predict_meta(CNN)
    missing = [layer.name for layer in W.weight_layers(report)
               if layer.predicted is None or layer.predicted.forward_var is None
               or layer.predicted.backward_var is None]
    assert not missing, missing


# -- GPT-style decoder with causal SDPA ----------------------------------------------------------


def test_gpt_within_bound(gpt):
    assert_within_bound(gpt)


def test_gpt_graph_basis(gpt):
    assert_graph_basis(gpt)


ATTENTION_BOUND = 0.2  # attention.md §3.4: the closed forms' tolerance while s_e² <= 1


def assert_attention_backward(found: dict[str, W.LayerSeries], names: tuple[str, ...]) -> None:
    """Every attention projection's backward within the attention tolerance: the value
    path reads the gradient's token correlation the probe measures (gradient_stats);
    with it taken as 0 the first block's qkv projection was 0.55x measured (GPT)."""
    off = {}
    for name, layer in found.items():
        if any(part in name for part in names):
            ratio = W._mean(layer.meas_b) / W._mean(layer.pred_b)
            if abs(math.log(ratio)) > ATTENTION_BOUND:
                off[name] = round(ratio, 3)
    assert not off, f"measured/predicted backward: {off}"


def test_gpt_attention_backward_per_layer(gpt):
    assert_attention_backward(gpt, ("attn.c_attn", "attn.c_proj"))


def test_llama_within_bound():
    # RoPE, GQA, and a residual stream that causal attention makes position-dependent:
    # the norms' per-token gains (theory.tokennorm), the values' and keys' prefix shares
    # and the measured query path (theory.attention_stats) carry it
    assert_within_bound(W.seed_series(Z.case("hf_llama"), 8))


def test_t5_within_bound():
    # relative position bias in a float SDPA mask (the decoder's causal mask inside it),
    # no 1/sqrt(d) scaling (s^2 ~ 1), cross-attention whose gradient makes the encoder's
    # token-correlated; the two bias tables get the logits' gradient. S = 4 (about 10 s)
    # keeps the median layer's standard error within the guard of assert_within_bound
    found = W.seed_series(T5, 4)
    assert_graph_basis(found)
    assert_within_bound(found)


# Under LeCun the logit variance is ~1: the scheme walk carries the tokens' Gram
# (theory.tokens), without which the qkv projections' gradient was 2-3x over the
# re-initialized copy's (median |log| 0.455 backward, 8 seeds).
def test_gpt_lecun_counterfactual():
    assert_within_bound(series(GPT, "lecun"))


def test_gpt_predict_on_meta(gpt):
    report = W.predict_meta(GPT)
    closed = {W.key(layer): layer.predicted for layer in W.weight_layers(report)}
    missing = [k for k, p in closed.items()
               if p is None or p.forward_var is None or p.backward_var is None]
    assert not missing, f"{len(missing)}/{len(closed)} without a prediction: {missing[:4]}"
    # the same closed form as the measured-mode prediction from the real weights
    pairs = {k: W.LayerSeries(k, s.type, meas_f=[closed[k].forward_var],
                              meas_b=[closed[k].backward_var], pred_f=[W._mean(s.pred_f)],
                              pred_b=[W._mean(s.pred_b)]) for k, s in gpt.items()}
    stats = W.stats(pairs.values())
    assert stats.median_f <= BOUND and stats.median_b <= BOUND, W.worst_text(stats, 3)


# -- transformers GPT-2 with eager attention (matmul, mask, softmax, matmul) ---------------------


@pytest.fixture(scope="module")
def gpt2_eager() -> dict[str, W.LayerSeries]:
    return series(HF_GPT2_EAGER)


def test_eager_gpt2_within_bound(gpt2_eager):
    assert_graph_basis(gpt2_eager)
    assert_within_bound(gpt2_eager)


def test_eager_gpt2_as_accurate_as_sdpa(gpt2_eager):
    """The same seeds draw the same weights and inputs under either implementation, so
    the measured numbers agree; eager's predictions must be SDPA's (T = 64: the probe's
    Σp² subsample under SDPA is every query row, as eager's is)."""
    fused = series(HF_GPT2)
    assert fused.keys() == gpt2_eager.keys()
    for name, eager in gpt2_eager.items():
        for side in ("pred_f", "pred_b", "meas_f", "meas_b"):
            assert W._mean(getattr(eager, side)) == pytest.approx(
                W._mean(getattr(fused[name], side)), rel=1e-3), (name, side)


@pytest.mark.parametrize("name", ["hf_gpt2", "hf_llama"])  # Llama: RoPE, repeat_kv (GQA)
def test_eager_predict_on_meta(name):
    eager, fused = W.predict_meta(Z.case(name + "_eager")), W.predict_meta(Z.case(name))
    closed = {W.key(layer): layer.predicted for layer in W.weight_layers(eager)}
    missing = [k for k, p in closed.items()
               if p is None or p.forward_var is None or p.backward_var is None]
    assert not missing, f"{len(missing)}/{len(closed)} without a prediction: {missing[:4]}"
    for layer in W.weight_layers(fused):  # the causal mask taken from is_causal on meta
        mine = closed[W.key(layer)]
        assert (mine.forward_var, mine.backward_var) == pytest.approx(
            (layer.predicted.forward_var, layer.predicted.backward_var), rel=1e-9)
    assert len(eager.attention) == len(fused.attention) == 4


# -- BatchNorm ResNets (train mode): the per-channel shape measured at each norm -------------
# 256 channels, 16x16 maps, batch 16, S = 8: every BatchNorm resets the forward scale, so
# a conv's factor scatters as in the CNN above (per-seed sd <= 0.12, se <= 0.04; the
# bench's delta-method se at the median layer is 0.01-0.02). The backward crosses one
# BatchNorm per branch, whose gain the probe takes from the measured channel variances
# (theory.normshape) at the walk's own scale.


def test_resnet_postact_within_bound():
    found = series(RESNET_POST)
    assert_graph_basis(found)
    assert_within_bound(found)


def test_resnet_preact_within_bound():
    """The block convs' gradients were 0.87x predicted (backward median 0.105): each
    padded conv reads the larger interior of a map whose borders an earlier conv left
    smaller (theory.profile), about +2.7% per conv, which the walk's BatchNorm scale
    k^2 carried into every backward gain."""
    assert_within_bound(series(RESNET_PRE))


def test_senet_within_bound():
    """The SE gate's gradient sums dL/dy * x over the positions, and the gradient that
    reaches y is shared across them (a global average pool) and depends on x through
    the block's last ReLU: 23x the independent-terms rule before theory.shared; the
    ReLU of the residual sum is the mixture of theory.residual. The 10-way head reads
    the pooled vector (forward se 0.08, as in the CNN above)."""
    assert_within_bound(series(SENET))


@pytest.mark.xfail(strict=True, reason=(
    "backward median |log| 0.130 > 0.1: each depthwise conv's step is 4-10% under "
    "(its ReLU6's mask at the conv's output is correlated across positions along the "
    "filter's own autocorrelation, which the same filter reads back; not modelled)"))
def test_mobilenet_within_bound():
    """A BatchNorm after a depthwise conv: the actual walk takes the BatchNorm's measured
    gain and the conv's pairing with it (theory.normshape's F), each step right in
    isolation (tests/test_cnn_steps.py). Here the depthwise steps still fall 4-10% short
    (float64: the conv's step is the pairing's to 0.5% on positions taken apart, and the
    gradient at its output has lag-1 correlation 0.18); the per-tensor gain there used
    to cancel this at 0.021 while being 1.2x off at the norm itself."""
    found = series(MOBILENET)
    assert_graph_basis(found)
    assert_within_bound(found)
