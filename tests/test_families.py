"""Model families in plain torch: CNN zoo, ViT, recurrent nets.

For each: every weight layer gets finite, non-zero forward and backward variances;
chosen layers equal an independent float64 computation (tests/reference.py); the
report follows the schema; the model is left bit-for-bit as found.
"""

from __future__ import annotations

import math

import pytest
import torch
import zoo
from pristine import assert_untouched, give_grads, snapshot
from reference import assert_matches, capture
from schema import check_report
from torch import nn

import varprobe

IMAGE = (4, 3, 16, 16)
SEQUENCE = (4, 8, 8)  # batch, steps, features

FAMILIES = {
    # name: (builder, input shape, layers checked against the reference)
    "resnet": (zoo.ResNet, IMAGE, ["stem.0", "layer1.0.body.1.1", "layer1.0.relu",
                                   "layer2.0.shortcut.0", "fc"]),
    "vgg_bn": (zoo.vgg_bn, IMAGE, ["0", "1", "2", "8", "13", "16"]),
    "densenet": (zoo.DenseNet, IMAGE, ["stem", "block.0.body.2", "block.2.body.5",
                                       "transition.2", "head.2"]),
    "mobilenet_v2": (zoo.MobileNetV2, IMAGE, ["features.1.conv.1.0", "features.3.conv.2.1",
                                              "classifier.1"]),
    "googlenet": (zoo.GoogLeNet, IMAGE, ["inc1.b1.0", "inc1.b3.1.0", "inc2.b4.1.0", "fc"]),
    "vit": (zoo.ViT, IMAGE, ["patch", "blocks.0.attn", "blocks.1.mlp.0", "norm", "head"]),
    "lstm": (lambda: zoo.RecurrentClassifier("LSTM"), SEQUENCE, ["rnn", "head"]),
    "gru": (lambda: zoo.RecurrentClassifier("GRU"), SEQUENCE, ["rnn", "head"]),
    "lstm_cell_loop": (lambda: zoo.CellLoop("LSTMCell"), SEQUENCE, ["embed", "cell", "head"]),
    "gru_cell_loop": (lambda: zoo.CellLoop("GRUCell"), SEQUENCE, ["embed", "cell", "head"]),
}


def run_family(name: str):
    build, shape, checked = FAMILIES[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(shape)
    with torch.no_grad():
        g = torch.randn(model(x).shape)
    give_grads(model)
    before = snapshot(model)
    report = varprobe.probe(model, x, grad_output=g)
    assert_untouched(model, before)
    return model, x, g, checked, report


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_is_measured_exactly_and_left_untouched(name):
    model, x, g, checked, report = run_family(name)
    check_report(report.to_dict())
    # MultiheadAttention uses out_proj's weight inside F.multi_head_attention_forward
    # without calling it: the attention module's own record covers it.
    called = {n for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv2d, nn.RNNBase, nn.RNNCellBase))
              and not n.endswith("attn.out_proj")}
    assert {layer.name for layer in report.weight_layers} >= called
    for layer in report.weight_layers:
        assert math.isfinite(layer.forward.var) and layer.forward.var > 0, layer.label
        assert math.isfinite(layer.backward.var) and layer.backward.var > 0, layer.label
        assert layer.weight_grad_ratio is not None and layer.weight_grad_ratio > 0, layer.label
    assert assert_matches(report, capture(model, x, g, checked)) >= len(checked)


def test_batchnorm_buffers_move_in_the_probe_and_are_restored():
    """Train-mode BN updates its running stats during the probe; they come back bit-exact."""
    model = zoo.ResNet()
    bn = model.stem[1]
    report = varprobe.probe(model, torch.randn(IMAGE) * 3 + 1)
    assert report.layers[1].name == "stem.1" and report.layers[1].forward.var == pytest.approx(
        1.0, abs=1e-3)  # batch-normalised output (eps = 1e-5 makes it 1 - O(1e-5))
    assert torch.equal(bn.running_mean, torch.zeros(8))
    assert torch.equal(bn.running_var, torch.ones(8))
    assert int(bn.num_batches_tracked) == 0


def test_depthwise_and_pointwise_fans_in_mobilenet():
    report = run_family("mobilenet_v2")[-1]
    by_name = {layer.name: layer for layer in report.layers}
    depthwise = by_name["features.1.conv.1.0"]
    assert depthwise.fan_in == 9 and depthwise.fan_out == 9  # one input channel per group
    assert by_name["features.1.conv.0.0"].fan_in == 8  # 1x1 expansion over 8 channels


def test_concatenations_feed_wider_layers():
    """DenseNet and inception outputs: the conv after a concat sees all its channels."""
    report = run_family("densenet")[-1]
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["block.2.body.2"].fan_in == 8 + 2 * 4  # stem + two growth steps
    assert by_name["transition.2"].input.var > 0
    report = run_family("googlenet")[-1]
    inc2 = [layer for layer in report.layers if layer.name.startswith("inc2.b1.0")]
    assert inc2[0].fan_in == 8 + 8 + 4 + 4  # the four inc1 branches, concatenated


def test_cell_in_a_python_loop_gets_one_record_per_step():
    report = run_family("lstm_cell_loop")[-1]
    cells = [layer for layer in report.layers if layer.name == "cell"]
    assert [layer.call for layer in cells] == list(range(SEQUENCE[1]))
    assert [layer.label for layer in cells[:2]] == ["cell", "cell#1"]
    # The gradient reaching step t's hidden state grows toward the last step (it feeds
    # the head directly); every step's gradient is measured, none is missing.
    assert all(layer.backward is not None for layer in cells)
    assert cells[-1].backward.var > cells[0].backward.var


def test_multihead_attention_is_one_weight_layer():
    report = run_family("vit")[-1]
    attn = [layer for layer in report.layers if layer.type == "MultiheadAttention"]
    assert len(attn) == 2 and all(layer.kind == "weight" for layer in attn)
    assert attn[0].fan_in == 32 and attn[0].weight_var > 0
