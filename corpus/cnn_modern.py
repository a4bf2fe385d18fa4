"""Mobile, searched and transformer-era vision families at their libraries' init.

MobileNetV2, MobileNetV3-Small, EfficientNet-B0, MNASNet 0.5 and RegNetY-400MF as
torchvision builds them, ConvNeXt (torchvision blocks) and PoolFormer-S12 with LayerScale,
and a Swin-style stack (shifted windows, relative-position-bias table). Probe times in the comments:
``varprobe.probe(e.build(), e.example())``, wall clock on a 2-core CPU shared with other
jobs (load average 7-13, so several times what an idle machine takes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from corpus import Entry, register
from corpus.broken import pair
from corpus.layers import (
    SqueezeExcitation,
    StochasticDepth,
    conv_bn_act,
    images,
    init_torchvision_mobile,
    init_trunc_normal,
    make_divisible,
)


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 and EfficientNet's MBConv: expand 1x1, depthwise kxk, optional SE,
    linear 1x1 projection; identity shortcut when shapes allow."""

    def __init__(
        self,
        cin,
        k,
        expanded,
        cout,
        stride,
        act,
        se_squeeze=None,
        se_act=nn.ReLU,
        se_gate=nn.Sigmoid,
        eps=1e-5,
        drop=0.0,
    ):
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(conv_bn_act(cin, expanded, 1, act=act, eps=eps))
        layers.append(conv_bn_act(expanded, expanded, k, stride, groups=expanded, act=act, eps=eps))
        if se_squeeze:
            layers.append(SqueezeExcitation(expanded, se_squeeze, se_act, se_gate))
        layers.append(conv_bn_act(expanded, cout, 1, act=None, eps=eps))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(drop) if drop else None

    def forward(self, x):
        out = self.block(x)
        if not self.use_res:
            return out
        if self.stochastic_depth is not None:
            out = self.stochastic_depth(out)
        return out + x


class MobileNetV2(nn.Module):
    SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [conv_bn_act(3, 32, 3, 2, act=nn.ReLU6)]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, 3, cin * t, c, s if i == 0 else 1, nn.ReLU6))
                cin = c
        layers.append(conv_bn_act(cin, 1280, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
        init_torchvision_mobile(self)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class MobileNetV3Small(nn.Module):
    # input, kernel, expanded, output, SE, activation (RE: ReLU, HS: Hardswish), stride
    SETTINGS = (
        (16, 3, 16, 16, True, "RE", 2),
        (16, 3, 72, 24, False, "RE", 2),
        (24, 3, 88, 24, False, "RE", 1),
        (24, 5, 96, 40, True, "HS", 2),
        (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 120, 48, True, "HS", 1),
        (48, 5, 144, 48, True, "HS", 1),
        (48, 5, 288, 96, True, "HS", 2),
        (96, 5, 576, 96, True, "HS", 1),
        (96, 5, 576, 96, True, "HS", 1),
    )

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        eps = 0.001
        layers: list[nn.Module] = [conv_bn_act(3, 16, 3, 2, act=nn.Hardswish, eps=eps)]
        for cin, k, exp, cout, se, act, s in self.SETTINGS:
            squeeze = make_divisible(exp // 4, 8) if se else None
            layers.append(
                InvertedResidual(
                    cin,
                    k,
                    exp,
                    cout,
                    s,
                    nn.ReLU if act == "RE" else nn.Hardswish,
                    squeeze,
                    se_gate=nn.Hardsigmoid,
                    eps=eps,
                )
            )
        layers.append(conv_bn_act(96, 576, 1, act=nn.Hardswish, eps=eps))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(576, 1024), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(1024, num_classes)
        )
        init_torchvision_mobile(self)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class EfficientNetB0(nn.Module):
    # expand ratio, kernel, stride, input, output, layers
    SETTINGS = (
        (1, 3, 1, 32, 16, 1),
        (6, 3, 2, 16, 24, 2),
        (6, 5, 2, 24, 40, 2),
        (6, 3, 2, 40, 80, 3),
        (6, 5, 1, 80, 112, 3),
        (6, 5, 2, 112, 192, 4),
        (6, 3, 1, 192, 320, 1),
    )

    def __init__(self, num_classes: int = 1000, stochastic_depth_prob: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = [conv_bn_act(3, 32, 3, 2, act=nn.SiLU)]
        total, done = sum(c[-1] for c in self.SETTINGS), 0
        for e, k, s, cin, cout, n in self.SETTINGS:
            for i in range(n):
                inp = cin if i == 0 else cout
                layers.append(
                    InvertedResidual(
                        inp,
                        k,
                        make_divisible(inp * e, 8),
                        cout,
                        s if i == 0 else 1,
                        nn.SiLU,
                        max(1, inp // 4),
                        nn.SiLU,
                        drop=stochastic_depth_prob * done / total,
                    )
                )
                done += 1
        layers.append(conv_bn_act(320, 1280, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
        init_torchvision_mobile(self, linear_std=None)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class MNASNet(nn.Module):
    """torchvision's MNASNet (B1 search space) at width ``alpha`` and its init: convs
    kaiming_normal_(fan_out, relu), norms 1/0, the head kaiming_uniform_(fan_out,
    sigmoid), so Var[w] = 1/num_classes (BatchNorm momentum left at PyTorch's 0.1, not
    torchvision's 0.0003: the probe and the labels run in train mode on batch stats)."""

    # output channels at alpha = 1, kernel, stride, expand ratio, repeats
    STACKS = ((24, 3, 2, 3, 3), (40, 5, 2, 3, 3), (80, 5, 2, 6, 3), (96, 3, 1, 6, 2),
              (192, 5, 2, 6, 4), (320, 3, 1, 6, 1))

    def __init__(self, alpha: float = 0.5, num_classes: int = 1000):
        super().__init__()
        stem, first = make_divisible(32 * alpha), make_divisible(16 * alpha)
        layers: list[nn.Module] = [conv_bn_act(3, stem, 3, 2),
                                   conv_bn_act(stem, stem, 3, groups=stem),
                                   conv_bn_act(stem, first, 1, act=None)]
        cin = first
        for out, k, s, t, n in self.STACKS:
            cout = make_divisible(out * alpha)
            for i in range(n):
                layers.append(InvertedResidual(cin, k, cin * t, cout, s if i == 0 else 1,
                                               nn.ReLU))
                cin = cout
        layers.append(conv_bn_act(cin, 1280, 1))
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True),
                                        nn.Linear(1280, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, mode="fan_out", nonlinearity="sigmoid")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.layers(x).mean([2, 3]))


class ResBottleneckBlock(nn.Module):
    """torchvision RegNet block: 1x1, grouped 3x3, SE, 1x1; relu(proj(x) + f(x))."""

    def __init__(
        self, cin: int, cout: int, stride: int, group_width: int = 8, se_ratio: float = 0.25
    ):
        super().__init__()
        self.proj = (
            conv_bn_act(cin, cout, 1, stride, act=None) if cin != cout or stride != 1 else None
        )
        self.f = nn.Sequential(
            conv_bn_act(cin, cout, 1),
            conv_bn_act(cout, cout, 3, stride, cout // group_width),
            SqueezeExcitation(cout, int(round(se_ratio * cin))),
            conv_bn_act(cout, cout, 1, act=None),
        )
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        shortcut = x if self.proj is None else self.proj(x)
        return self.activation(shortcut + self.f(x))


class RegNetY400MF(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        blocks: list[nn.Module] = [conv_bn_act(3, 32, 3, 2)]
        cin = 32
        for width, depth in zip((48, 104, 208, 440), (1, 3, 6, 6)):
            for i in range(depth):
                blocks.append(ResBottleneckBlock(cin, width, 2 if i == 0 else 1))
                cin = width
        self.trunk = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(440, num_classes)
        init_torchvision_mobile(self)  # convs N(0, 2/fan_out), BN 1/0, fc N(0, .01)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.trunk(x)), 1))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW tensor."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    """torchvision ConvNeXt block: dw 7x7, LN, Linear 4x, GELU, Linear, LayerScale 1e-6."""

    def __init__(self, dim: int, layer_scale: float, drop: float):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), layer_scale))
        self.stochastic_depth = StochasticDepth(drop)

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.pwconv2(self.act(self.pwconv1(y))).permute(0, 3, 1, 2)
        return x + self.stochastic_depth(self.layer_scale * y)


class ConvNeXt(nn.Module):
    """torchvision ConvNeXt; the corpus uses timm's convnext_nano stage sizes
    (depths 2-2-8-2, widths 80-640) to keep the probe fast, with ConvNeXt-T's blocks."""

    def __init__(
        self,
        depths=(2, 2, 8, 2),
        dims=(80, 160, 320, 640),
        num_classes: int = 1000,
        layer_scale: float = 1e-6,
        stochastic_depth_prob: float = 0.1,
    ):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
        ]
        total, done = sum(depths), 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            if i > 0:
                layers.append(
                    nn.Sequential(
                        LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dim, 2, 2)
                    )
                )
            for _ in range(depth):
                layers.append(CNBlock(dim, layer_scale, stochastic_depth_prob * done / (total - 1)))
                done += 1
        self.features = nn.Sequential(*layers)
        self.norm = LayerNorm2d(dims[-1], eps=1e-6)
        self.classifier = nn.Linear(dims[-1], num_classes)
        init_trunc_normal(self, 0.02)

    def forward(self, x):
        x = self.norm(F.adaptive_avg_pool2d(self.features(x), 1))
        return self.classifier(torch.flatten(x, 1))


class PoolFormerBlock(nn.Module):
    """PoolFormer (Yu et al. 2022): GroupNorm(1), avg-pool token mixer (pool(x) - x),
    1x1-conv MLP, LayerScale 1e-5 on both branches."""

    def __init__(self, dim: int, drop: float, layer_scale: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.norm2 = nn.GroupNorm(1, dim)
        self.fc1 = nn.Conv2d(dim, 4 * dim, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(4 * dim, dim, 1)
        self.layer_scale_1 = nn.Parameter(torch.full((dim, 1, 1), layer_scale))
        self.layer_scale_2 = nn.Parameter(torch.full((dim, 1, 1), layer_scale))
        self.drop_path = StochasticDepth(drop)
        for fc in (self.fc1, self.fc2):  # the Mlp's own init in the PoolFormer code
            nn.init.trunc_normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.drop_path(self.layer_scale_1 * (self.pool(y) - y))
        y = self.fc2(self.act(self.fc1(self.norm2(x))))
        return x + self.drop_path(self.layer_scale_2 * y)


class PoolFormer(nn.Module):
    """PoolFormer-S12: layers 2-2-6-2, widths 64-512; patch-embed convs at default init,
    the head Linear trunc_normal(.02)."""

    def __init__(
        self,
        layers=(2, 2, 6, 2),
        dims=(64, 128, 320, 512),
        num_classes: int = 1000,
        drop_path_rate: float = 0.1,
    ):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, dims[0], 7, 4, 2)]
        total, done = sum(layers), 0
        for i, (n, dim) in enumerate(zip(layers, dims)):
            if i > 0:
                blocks.append(nn.Conv2d(dims[i - 1], dim, 3, 2, 1))
            for _ in range(n):
                blocks.append(PoolFormerBlock(dim, drop_path_rate * done / (total - 1)))
                done += 1
        self.network = nn.Sequential(*blocks)
        self.norm = nn.GroupNorm(1, dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(self.norm(self.network(x)).mean((-2, -1)))


from corpus.swin import SwinStack  # noqa: E402  (kept apart: the module stays short)

_TV, _TIMM = "torchvision-style", "timm-style"

for _e in (
    # probe 8.8 s
    Entry(
        "mobilenet_v2",
        _TV,
        MobileNetV2,
        images(3, 224),
        batch_size=2,
        notes="torchvision MobileNetV2 and its init (kaiming fan_out, Linear N(0, .01))",
    ),
    # probe 3.8 s
    Entry(
        "mobilenet_v3_small",
        _TV,
        MobileNetV3Small,
        images(3, 224),
        batch_size=2,
        notes="torchvision MobileNetV3-Small: SE (hardsigmoid gate), hardswish, depthwise",
    ),
    # probe 9.1 s
    Entry(
        "efficientnet_b0",
        _TV,
        EfficientNetB0,
        images(3, 224),
        batch_size=2,
        notes="torchvision EfficientNet-B0: SE, SiLU, depthwise, stochastic depth 0.2",
    ),
    # probe 11.8 s
    Entry(
        "regnety_400mf",
        _TV,
        RegNetY400MF,
        images(3, 224),
        batch_size=2,
        notes="torchvision RegNetY-400MF: widths 48-440, depths 1-3-6-6, group width 8, SE",
    ),
    # probe 10.5 s
    Entry(
        "convnext_nano",
        _TIMM,
        ConvNeXt,
        images(3, 224),
        batch_size=2,
        notes="ConvNeXt blocks (LayerScale 1e-6, trunc_normal .02) at convnext_nano depths",
    ),
    # probe 5.3 s
    Entry(
        "poolformer_s12",
        _TIMM,
        PoolFormer,
        images(3, 224),
        batch_size=2,
        notes="PoolFormer-S12 with LayerScale 1e-5 and GroupNorm(1)",
    ),
    # probe 2.3 s
    Entry(
        "swin_cifar",
        "swin-style",
        SwinStack,
        images(3, 32),
        batch_size=8,
        notes="Swin blocks (shifted 4x4 windows, relative-position bias) on 32x32 images",
    ),
):
    register(_e)


def _head_for_1000(model: nn.Module) -> nn.Module:
    """The twins: the 10-class head drawn as the library draws it for 1000 classes."""
    head = model.classifier[1]
    # MNASNet: kaiming_uniform_(fan_out = 1000, gain 1); EfficientNet: U(+-1/sqrt(out))
    bound = math.sqrt(3 / 1000) if isinstance(model, MNASNet) else 1 / math.sqrt(1000)
    nn.init.uniform_(head.weight, -bound, bound)
    return model


pair("efficientnet_b0_10cls", _TV, lambda: EfficientNetB0(num_classes=10),
     lambda: _head_for_1000(EfficientNetB0(num_classes=10)), images(3, 224),
     "hot logits: torchvision's head init U(+-1/sqrt(num_classes)) at 10 classes gives "
     "Var[w] = 1/30, so the logits start at E[y²] ~56x the pooled features'",
     culprits=("classifier.1",), batch_size=2,
     notes="torchvision EfficientNet-B0 built with num_classes=10")
pair("mnasnet0_5_10cls", _TV, lambda: MNASNet(0.5, num_classes=10),
     lambda: _head_for_1000(MNASNet(0.5, num_classes=10)), images(3, 224),
     "hot logits: torchvision's head init kaiming_uniform_(fan_out) at 10 classes gives "
     "Var[w] = 1/10, so the logits start at E[y²] ~200x the pooled features'",
     culprits=("classifier.1",), batch_size=2,
     notes="torchvision MNASNet 0.5 built with num_classes=10")
