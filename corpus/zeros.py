"""Exact zeros at init: where a γ = 0 sits decides whether the network trains.

Two pairs, each with its twin at the usual init (see corpus.broken for the pair rules):
every residual branch of a CIFAR ResNet-18 dead behind a BatchNorm at γ = 0 before its
ReLU (the shortcuts carry the signal and the net trains: a broken mechanism that SGD
trains anyway), and a pre-LN transformer whose final LayerNorm starts at γ = 0 (only γ
and the head move at the first step; everything below waits for γ to grow).
"""

from __future__ import annotations

from torch import nn

from corpus.broken import _CNN, _SEQ, VOCAB, pair, tokens, transformer
from corpus.cnn import BasicBlock, CifarResNet
from corpus.layers import images


def cifar_resnet18(bn1_gamma: float | None = None) -> CifarResNet:
    model = CifarResNet(BasicBlock)
    for name, m in model.named_modules():
        if bn1_gamma is not None and name.startswith("layer") and name.endswith(".bn1"):
            nn.init.constant_(m.weight, bn1_gamma)
    return model


def transformer12(final_gamma: float | None = None) -> nn.Module:
    model = transformer(depth=12)
    if final_gamma is not None:
        nn.init.constant_(model.ln_f.weight, final_gamma)
    return model


pair(
    "cifar_resnet18_bn1_zero",
    _CNN,
    lambda: cifar_resnet18(0.0),
    cifar_resnet18,
    images(3, 32),
    "dead branches: every block's bn1 (before the branch's ReLU) at γ = 0",
    culprits=("layer1.0.bn1",),
    batch_size=8,
)
pair(
    "transformer12_ln_f_zero",
    _SEQ,
    lambda: transformer12(0.0),
    transformer12,
    tokens,
    "a zero on the trunk: the final LayerNorm at γ = 0",
    culprits=("ln_f",),
    task="lm",
    vocab=VOCAB,
    batch_size=8,
)
