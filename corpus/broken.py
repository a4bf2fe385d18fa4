"""Broken networks, each registered with a healthy twin that differs in the broken place only.

Every pair is a mistake people make: an init formula copied for the wrong activation, a
forgotten ``std=``, a scale applied to the wrong layers, unnormalized pixels. ``broken``
names the mechanism, ``culprits`` the modules a diagnosis must name; a mistake made in
every weight layer alike (a whole-network init scheme) has no single culprit, so its
``culprits`` is empty and it carries the tag "global". Twins are named ``<broken>_twin``.
Probe times, wall clock on a 2-core CPU shared with other jobs (load average ~13): the
MLPs 0.4-3.7 s, the VGGs 1.3-5.6 s, the transformers 2.9-11.7 s, the LSTMs 0.5-4.5 s, the
unnormalized ResNet 12 s, the UNet pair 8.5 s, the ResNet-50 pair 9-15 s.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from corpus import Entry, register
from corpus.cnn import VGG, ResNet, UNet
from corpus.layers import images, init_torchvision_mobile
from corpus.sequence import LSTMLM, TransformerLM, init_gpt

WIDTH, CLASSES, VOCAB, SEQ = 256, 10, 64, 32
VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def pair(name: str, family: str, broken: Callable[[], nn.Module], twin: Callable[[], nn.Module],
         inputs, mechanism: str, culprits: tuple[str, ...] = (), batch_size: int = 16,
         task: str = "classify", vocab: int | None = None, notes: str = "",
         twin_inputs=None) -> None:
    tags = () if culprits else ("global",)
    register(Entry(name, family, broken, inputs, batch_size, task, vocab, mechanism, culprits,
                   f"{name}_twin", notes, tags))
    register(Entry(f"{name}_twin", family, twin, twin_inputs or inputs, batch_size, task, vocab, None, (),
                   name, f"healthy twin of {name}"))


def vectors(batch: int) -> torch.Tensor:
    return torch.randn(batch, WIDTH)


def tokens(batch: int) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, SEQ))


# -- deep MLPs: an init scheme meant for another activation ----------------------------

def mlp(depth: int, act: Callable[[], nn.Module], std: Callable[[int, int], float] | None,
        bias: bool = False) -> nn.Sequential:
    """``depth`` Linear layers of width 256 (the last one to 10 classes), ``act`` between;
    weights N(0, std(fan_in, fan_out)^2), or PyTorch's default when ``std`` is None."""
    layers: list[nn.Module] = []
    for i in range(depth):
        out = CLASSES if i == depth - 1 else WIDTH
        linear = nn.Linear(WIDTH, out, bias=bias)
        if std is not None:
            nn.init.normal_(linear.weight, 0.0, std(WIDTH, out))
        layers.append(linear)
        if i < depth - 1:
            layers.append(act())
    return nn.Sequential(*layers)


HE = lambda fi, fo: math.sqrt(2.0 / fi)  # noqa: E731
XAVIER = lambda fi, fo: math.sqrt(2.0 / (fi + fo))  # noqa: E731
LECUN = lambda fi, fo: math.sqrt(1.0 / fi)  # noqa: E731


def _dead_bias(model: nn.Sequential, name: str) -> nn.Sequential:
    nn.init.constant_(dict(model.named_modules())[name].bias, -10.0)
    return model


class ResidualMLP(nn.Module):
    """x + scale * W2 relu(W1 relu(x)) per block, no normalization, He in both."""

    def __init__(self, blocks: int = 32, scale: float = 1.0):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(),
                                                  nn.Linear(WIDTH, WIDTH)) for _ in range(blocks))
        self.head = nn.Linear(WIDTH, CLASSES)
        self.scale = scale
        for block in self.blocks:
            for linear in (block[1], block[3]):
                nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
                nn.init.zeros_(linear.bias)

    def forward(self, x):
        for block in self.blocks:
            x = x + self.scale * block(x)
        return self.head(x)


# -- CNNs -----------------------------------------------------------------------------------

def vgg11(scale: dict[str, float] | None = None, bias: dict[str, float] | None = None,
          he_gain: float = 1.0) -> VGG:
    """VGG-11 without BatchNorm on 32x32 images, torchvision's init (kaiming fan_out,
    Linear N(0, .01)); ``scale``/``bias``: weight multipliers / bias fills by module name."""
    model = init_torchvision_mobile(VGG(VGG11, bn=False))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(he_gain)
        for name, s in (scale or {}).items():
            modules[name].weight.mul_(s)
        for name, b in (bias or {}).items():
            modules[name].bias.fill_(b)
    return model


def vgg16_plain(std: float | None) -> VGG:
    """VGG-16 without BatchNorm: N(0, std^2) on every conv (the VGG paper's 0.01), or
    torchvision's kaiming fan_out when None; Linear N(0, .01) in both."""
    model = init_torchvision_mobile(VGG(bn=False))
    if std is not None:
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, std)
    return model


def vgg16_bn(zero: str | None = None) -> VGG:
    model = VGG()
    if zero is not None:
        nn.init.zeros_(dict(model.named_modules())[zero].weight)
    return model


class PlainResNet(nn.Module):
    """A CIFAR ResNet without normalization: stem, ``blocks`` pre-activation basic blocks
    x + scale * conv(relu(conv(relu(x)))) at 32 channels, He (fan_in) on every conv."""

    def __init__(self, blocks: int = 24, scale: float = 1.0):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                                                  nn.Conv2d(32, 32, 3, padding=1)) for _ in range(blocks))
        self.head = nn.Linear(32, CLASSES)
        self.scale = scale
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + self.scale * block(x)
        return self.head(torch.relu(x).mean((2, 3)))


def resnet50_residual_bn_zero(broken: bool) -> ResNet:
    """zero_init_residual done by hand on every BatchNorm of the residual stages, not
    just each block's bn3: the projection shortcuts' BNs go to zero too (twin: bn3 only,
    torchvision's ``zero_init_residual=True``)."""
    model = ResNet()
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d) and name.startswith("layer") and (broken or name.endswith("bn3")):
            nn.init.zeros_(m.weight)
    return model


def unet(scale: dict[str, float] | None = None) -> UNet:
    model = UNet()
    with torch.no_grad():
        for name, s in (scale or {}).items():
            dict(model.named_modules())[name].weight.mul_(s)
    return model


def pixels_0_255(batch: int) -> torch.Tensor:
    """Raw 8-bit pixels cast to float, never normalized."""
    return torch.randint(0, 256, (batch, 3, 32, 32)).float()


def normalized_pixels(batch: int) -> torch.Tensor:
    """The same pixels, scaled to [0, 1] and normalized per channel (mean 127.5, std 73.9)."""
    return (torch.randint(0, 256, (batch, 3, 32, 32)).float() - 127.5) / 73.9


# -- sequence models ---------------------------------------------------------------------

def transformer(std: float = 0.02, post_ln: bool = False, depth: int = 6,
                qkv_std: dict[int, float] | None = None) -> TransformerLM:
    model = init_gpt(TransformerLM(VOCAB, SEQ, depth=depth, post_ln=post_ln), std)
    for i, s in (qkv_std or {}).items():
        nn.init.normal_(model.blocks[i].attn.qkv.weight, 0.0, s)
    return model


def lstm(recurrent_std: float | None) -> LSTMLM:
    model = LSTMLM(VOCAB)
    if recurrent_std is not None:
        nn.init.normal_(model.lstm.weight_hh_l0, 0.0, recurrent_std)
    return model


_MLP, _CNN, _SEQ = "hand-written MLP", "hand-written CNN", "hand-written sequence"
C32 = images(3, 32)

pair("mlp30_xavier_relu", _MLP, lambda: mlp(30, nn.ReLU, XAVIER), lambda: mlp(30, nn.ReLU, HE), vectors,
     "vanishing: Xavier (2/(n_in+n_out)) under ReLU halves the signal per layer",
     notes="He et al. 2015's 30-layer ReLU net with Xavier as the Glorot paper states it")
pair("mlp30_lecun_relu", _MLP, lambda: mlp(30, nn.ReLU, LECUN), lambda: mlp(30, nn.ReLU, HE), vectors,
     "vanishing: LeCun 1/n_in (gain 1, the 'linear' gain) under ReLU")
pair("mlp40_default_relu", _MLP, lambda: mlp(40, nn.ReLU, None, bias=True),
     lambda: mlp(40, nn.ReLU, HE, bias=True), vectors,
     "vanishing: PyTorch's default Linear init (1/(3 n_in)) in a 40-layer ReLU net")
pair("mlp20_sigmoid", _MLP, lambda: mlp(20, nn.Sigmoid, XAVIER), lambda: mlp(20, nn.ReLU, HE), vectors,
     "vanishing gradients: sigmoid (derivative <= 1/4) in a 20-layer net, Xavier init",
     notes="the twin differs in activation and its matching init (ReLU + He)")
pair("mlp30_tanh_chaotic", _MLP, lambda: mlp(30, nn.Tanh, lambda fi, fo: math.sqrt(4.0 / fi)),
     lambda: mlp(30, nn.Tanh, LECUN), vectors,
     "exploding gradients: tanh in the chaotic phase (sigma_w^2 = 4; twin: critical 1)")
pair("mlp20_he_x2", _MLP, lambda: mlp(20, nn.ReLU, lambda fi, fo: 2 * HE(fi, fo)),
     lambda: mlp(20, nn.ReLU, HE), vectors,
     "exploding: He std doubled (variance x4 per layer)")
pair("mlp8_dead_relu_bias", _MLP, lambda: _dead_bias(mlp(8, nn.ReLU, HE, bias=True), "6"),
     lambda: mlp(8, nn.ReLU, HE, bias=True), vectors,
     "dead ReLUs: bias -10 before a ReLU, every unit after it is zero", culprits=("6",))
pair("resmlp32_unnormalized", _MLP, lambda: ResidualMLP(32), lambda: ResidualMLP(32, 32 ** -0.5), vectors,
     "exploding: 32 residual blocks, no normalization, unscaled branches (variance x2 per block)",
     notes="twin scales each branch by 1/sqrt(32)")
pair("resnet24_unnormalized", _CNN, lambda: PlainResNet(24), lambda: PlainResNet(24, 24 ** -0.5), C32,
     "exploding: 24 residual conv blocks, no normalization, He in both branch convs, unscaled",
     batch_size=8, notes="twin scales each branch by 1/sqrt(24)")
pair("vgg16_std001", _CNN, lambda: vgg16_plain(0.01), lambda: vgg16_plain(None), C32,
     "vanishing: N(0, 0.01^2) on every conv of a VGG-16 without BatchNorm", batch_size=8,
     notes="the VGG paper's init, which it could not train at depth 16 without pre-training")
pair("vgg11_he_x2", _CNN, lambda: vgg11(he_gain=2.0), lambda: vgg11(), C32,
     "exploding: kaiming std doubled on every conv", batch_size=8)
pair("vgg11_stem_x100", _CNN, lambda: vgg11({"features.0": 100.0}), lambda: vgg11(), C32,
     "exploding: the stem conv's weights 100x", culprits=("features.0",), batch_size=8)
pair("vgg11_conv_x50", _CNN, lambda: vgg11({"features.8": 50.0}), lambda: vgg11(), C32,
     "exploding: one conv's weights 50x", culprits=("features.8",), batch_size=8)
pair("vgg11_dead_relu_bias", _CNN, lambda: vgg11(bias={"features.11": -10.0}), lambda: vgg11(), C32,
     "dead ReLUs: conv bias -10, every unit after it is zero", culprits=("features.11",), batch_size=8)
pair("vgg11_pixels_0_255", _CNN, vgg11, vgg11, pixels_0_255,
     "exploding input: raw 0-255 pixels into a net initialized for unit-variance input",
     culprits=("features.0",), batch_size=8, notes="the twin gets the same pixels normalized",
     twin_inputs=normalized_pixels)
pair("vgg16_bn_gamma_zero", _CNN, lambda: vgg16_bn("features.21"), vgg16_bn, C32,
     "dead signal: one BatchNorm's weight zero-initialized in a net without skips",
     culprits=("features.21",), batch_size=8)
pair("resnet50_residual_bn_zero", _CNN, lambda: resnet50_residual_bn_zero(True),
     lambda: resnet50_residual_bn_zero(False), images(3, 224),
     "dead signal: every BN of the residual stages zeroed, projection shortcuts included",
     culprits=("layer1.0.downsample.1",), batch_size=2)
pair("unet_decoder_x1e-3", _CNN, lambda: unet({"ups.0.up": 1e-3}), unet, images(3, 128),
     "vanishing: the deepest up-sampling ConvTranspose scaled 1e-3", culprits=("ups.0.up",),
     batch_size=2, task="regress")
pair("transformer_std1", _SEQ, lambda: transformer(1.0), transformer, tokens,
     "saturated attention and exploding residual stream: std 1 instead of 0.02 everywhere",
     task="lm", vocab=VOCAB, batch_size=8)
pair("transformer_qkv_std1", _SEQ, lambda: transformer(qkv_std={0: 1.0}), transformer, tokens,
     "saturated attention: nn.init.normal_ without std on the first block's qkv",
     culprits=("blocks.0.attn.qkv",), task="lm", vocab=VOCAB, batch_size=8)
pair("transformer24_post_ln", _SEQ, lambda: transformer(post_ln=True, depth=24),
     lambda: transformer(depth=24), tokens,
     "vanishing gradients to early blocks: post-LN at depth 24 (twin: pre-LN)",
     task="lm", vocab=VOCAB, batch_size=8)
pair("lstm_recurrent_std1", _SEQ, lambda: lstm(1.0), lambda: lstm(None), tokens,
     "saturated gates: the recurrent weight drawn N(0, 1) instead of U(+-1/sqrt(hidden))",
     culprits=("lstm",), task="lm", vocab=VOCAB, batch_size=8)

