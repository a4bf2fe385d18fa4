"""Residual, dense, Inception and encoder-decoder CNN families at their libraries' init.

Hand-written (no torchvision import), block for block as the published code builds
them, each with its library's own default init (see corpus/layers.py) and at the
resolution it is trained at. Probe times in the comments: ``varprobe.probe(e.build(),
e.example())``, wall clock on a 2-core CPU shared with other jobs (load average 7-13,
so several times what an idle machine takes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from corpus import Entry, register
from corpus.layers import images, init_torchvision_mobile, init_torchvision_resnet


# -- torchvision ResNet-50 (v1.5: the stride sits on the 3x3 conv) -------------------

class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision.models.resnet.ResNet with Bottleneck blocks."""

    def __init__(self, layers=(3, 4, 6, 3), num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, stages = 64, []
        for i, (n, width) in enumerate(zip(layers, (64, 128, 256, 512))):
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * 4
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)
        init_torchvision_resnet(self)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# -- pytorch-cifar (kuangliu): ResNet-18, PreAct ResNet-18, SENet-18; PyTorch default init

class BasicBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block (He et al. 2016b); ``se=True``: pytorch-cifar's SENet block,
    a squeeze-excitation gate on the residual branch before the add."""

    def __init__(self, cin: int, planes: int, stride: int = 1, se: bool = False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False))
        self.se = se
        if se:
            self.fc1 = nn.Conv2d(planes, planes // 16, 1)
            self.fc2 = nn.Conv2d(planes // 16, planes, 1)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        if self.se:
            w = F.avg_pool2d(out, out.size(2))
            out = out * torch.sigmoid(self.fc2(F.relu(self.fc1(w))))
        return out + shortcut


class CifarResNet(nn.Module):
    """pytorch-cifar ResNet / PreActResNet / SENet: 3x3 stem, four stages of two blocks,
    4x4 average pool, Linear(512, 10). ``stem_bn``: ResNet and SENet normalize the stem
    (PreActResNet does not, and has no final BN either, as in the repository)."""

    def __init__(self, block, stem_bn: bool = True, num_classes: int = 10, **block_kw):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64) if stem_bn else None
        cin, stages = 64, []
        for i, planes in enumerate((64, 128, 256, 512)):
            stages.append(nn.Sequential(block(cin, planes, 1 if i == 0 else 2, **block_kw),
                                        block(planes, planes, 1, **block_kw)))
            cin = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        if self.bn1 is not None:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(F.avg_pool2d(out, 4), 1))


# -- pytorch-cifar VGG-16 with BatchNorm, default init ---------------------------------

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, cfg=VGG16, bn: bool = True, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers.append(nn.Conv2d(cin, v, 3, padding=1))
            if bn:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            cin = v
        layers.append(nn.AvgPool2d(1, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


# -- pytorch-cifar densenet_cifar: DenseNet-121's block counts at growth 12 ------------

class DenseBottleneck(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet(nn.Module):
    def __init__(self, nblocks=(6, 12, 24, 16), growth: int = 12, reduction: float = 0.5,
                 num_classes: int = 10):
        super().__init__()
        planes = 2 * growth
        self.conv1 = nn.Conv2d(3, planes, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for i, n in enumerate(nblocks):
            layers = []
            for _ in range(n):
                layers.append(DenseBottleneck(planes, growth))
                planes += growth
            stages.append(nn.Sequential(*layers))
            if i < len(nblocks) - 1:
                out = int(planes * reduction)
                stages.append(Transition(planes, out))
                planes = out
        self.features = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(planes)
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x):
        out = self.features(self.conv1(x))
        out = F.avg_pool2d(F.relu(self.bn(out)), 4)
        return self.linear(torch.flatten(out, 1))


# -- torchvision GoogLeNet (no auxiliary heads, transform_input off) -------------------

def _basic(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0) -> nn.Sequential:
    """torchvision's BasicConv2d: conv (no bias), BatchNorm(eps=0.001), ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, bias=False),
                         nn.BatchNorm2d(cout, eps=0.001), nn.ReLU(inplace=True))


class Inception(nn.Module):
    def __init__(self, cin, ch1, ch3red, ch3, ch5red, ch5, pool_proj):
        super().__init__()
        self.branch1 = _basic(cin, ch1, 1)
        self.branch2 = nn.Sequential(_basic(cin, ch3red, 1), _basic(ch3red, ch3, 3, padding=1))
        # torchvision keeps a 3x3 here where the paper has 5x5 (pytorch/vision#906)
        self.branch3 = nn.Sequential(_basic(cin, ch5red, 1), _basic(ch5red, ch5, 3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), _basic(cin, pool_proj, 1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNet(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        pool = lambda k=3: nn.MaxPool2d(k, 2, ceil_mode=True)  # noqa: E731
        self.stem = nn.Sequential(_basic(3, 64, 7, 2, 3), pool(), _basic(64, 64, 1),
                                  _basic(64, 192, 3, padding=1), pool())
        self.inception3 = nn.Sequential(Inception(192, 64, 96, 128, 16, 32, 32),
                                        Inception(256, 128, 128, 192, 32, 96, 64), pool())
        self.inception4 = nn.Sequential(Inception(480, 192, 96, 208, 16, 48, 64),
                                        Inception(512, 160, 112, 224, 24, 64, 64),
                                        Inception(512, 128, 128, 256, 24, 64, 64),
                                        Inception(512, 112, 144, 288, 32, 64, 64),
                                        Inception(528, 256, 160, 320, 32, 128, 128), pool(2))
        self.inception5 = nn.Sequential(Inception(832, 256, 160, 320, 32, 128, 128),
                                        Inception(832, 384, 192, 384, 48, 128, 128))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(1024, num_classes)
        # torchvision: trunc_normal_(std=0.01, a=-2, b=2) on every conv and linear
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.inception5(self.inception4(self.inception3(self.stem(x))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


# -- UNet (Ronneberger et al. 2015, as in milesial/Pytorch-UNet), default init ---------

def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class Up(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
        self.conv = double_conv(cin, cout)

    def forward(self, x, skip):
        return self.conv(torch.cat([skip, self.up(x)], 1))


class UNet(nn.Module):
    def __init__(self, in_ch: int = 3, n_classes: int = 2, base: int = 32):
        super().__init__()
        w = [base * 2 ** i for i in range(5)]
        self.inc = double_conv(in_ch, w[0])
        self.downs = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), double_conv(a, b))
                                   for a, b in zip(w, w[1:]))
        self.ups = nn.ModuleList(Up(b, a) for a, b in reversed(list(zip(w, w[1:]))))
        self.outc = nn.Conv2d(w[0], n_classes, 1)

    def forward(self, x):
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)


# -- timm NF-ResNet-26: normalizer-free, ScaledStdConv2d (weight standardization) ------

RELU_GAMMA = 1.7139588594436646  # timm's _nonlin_gamma["relu"]: 1/std of relu(N(0,1))


class ScaledStdConv2d(nn.Conv2d):
    """timm.layers.ScaledStdConv2d: the weight is standardized per output channel in the
    forward, times gain * gamma / sqrt(fan_in) (Brock et al. 2021)."""

    def __init__(self, cin, cout, k, stride=1, gamma: float = 1.0, eps: float = 1e-6):
        super().__init__(cin, cout, k, stride, (k - 1) // 2, bias=True)
        self.gain = nn.Parameter(torch.ones(cout, 1, 1, 1))
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True,
                              momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


class NormFreeBlock(nn.Module):
    """out = shortcut + alpha * branch(relu(x) * beta); beta = 1/sqrt(expected var of x)."""

    def __init__(self, cin: int, cout: int, stride: int, alpha: float, beta: float):
        super().__init__()
        mid = cout // 4
        conv = lambda a, b, k, s=1: ScaledStdConv2d(a, b, k, s, gamma=RELU_GAMMA)  # noqa: E731
        self.alpha, self.beta = alpha, beta
        self.downsample = conv(cin, cout, 1, stride) if (stride != 1 or cin != cout) else None
        self.act1, self.act2, self.act3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.conv1, self.conv2, self.conv3 = conv(cin, mid, 1), conv(mid, mid, 3, stride), conv(mid, cout, 1)

    def forward(self, x):
        out = self.act1(x) * self.beta
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.conv3(self.act3(self.conv2(self.act2(self.conv1(out)))))
        return out * self.alpha + shortcut


class NFResNet(nn.Module):
    def __init__(self, depths=(2, 2, 2, 2), alpha: float = 0.2, num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(ScaledStdConv2d(3, 64, 7, 2, gamma=RELU_GAMMA),
                                  nn.MaxPool2d(3, 2, 1))
        cin, blocks = 64, []
        for i, (d, cout) in enumerate(zip(depths, (256, 512, 1024, 2048))):
            expected_var = 1.0  # a stage's first block projects the normalized input
            for j in range(d):
                blocks.append(NormFreeBlock(cin, cout, 2 if (j == 0 and i > 0) else 1,
                                            alpha, expected_var ** -0.5))
                expected_var = (1.0 if j == 0 else expected_var) + alpha ** 2
                cin = cout
        self.stages = nn.Sequential(*blocks)
        self.final_act = nn.ReLU()
        self.fc = nn.Linear(2048, num_classes)
        # timm NormFreeNet: convs kaiming_normal_(fan_in, linear), bias 0; fc N(0, .01)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
                nn.init.zeros_(m.bias)
        init_torchvision_mobile(nn.ModuleList([self.fc]))

    def forward(self, x):
        x = self.final_act(self.stages(self.stem(x)))
        return self.fc(x.mean((2, 3)))


# -- registration ----------------------------------------------------------------------

_TV, _CIFAR, _TIMM = "torchvision-style", "pytorch-cifar-style", "timm-style"

for _e in (
    # probe 4.3 s
    Entry("resnet50", _TV, ResNet, images(3, 224), batch_size=2,
          notes="ResNet-50 v1.5, torchvision init (kaiming fan_out on convs, BN 1/0)"),
    # probe 0.5 s
    Entry("cifar_resnet18", _CIFAR, lambda: CifarResNet(BasicBlock), images(3, 32), batch_size=8,
          notes="pytorch-cifar ResNet18, PyTorch default init"),
    # probe 0.4 s
    Entry("preact_resnet18", _CIFAR, lambda: CifarResNet(PreActBlock, stem_bn=False),
          images(3, 32), batch_size=8, notes="pytorch-cifar PreActResNet18, default init"),
    # probe 0.5 s
    Entry("senet18", _CIFAR, lambda: CifarResNet(PreActBlock, se=True), images(3, 32),
          batch_size=8, notes="pytorch-cifar SENet18 (pre-activation blocks with SE gates)"),
    # probe 0.7 s
    Entry("vgg16_bn_cifar", _CIFAR, VGG, images(3, 32), batch_size=8,
          notes="pytorch-cifar VGG16 with BatchNorm, default init"),
    # probe: varprobe raises (tests/test_corpus.py KNOWN_CRASHES)
    Entry("densenet_cifar", _CIFAR, DenseNet, images(3, 32), batch_size=8,
          notes="pytorch-cifar densenet_cifar: DenseNet-121 block counts (6,12,24,16), growth 12"),
    # probe 0.7 s
    Entry("googlenet", _TV, GoogLeNet, images(3, 224), batch_size=2,
          notes="torchvision GoogLeNet without aux heads, trunc_normal(0.01) init"),
    # probe 3.4 s
    Entry("unet", "milesial-style", UNet, images(3, 128), batch_size=2, task="regress",
          notes="UNet, base width 32, BN, ConvTranspose up-sampling, default init"),
    # probe 3.8 s
    Entry("nf_resnet26", _TIMM, NFResNet, images(3, 224), batch_size=2,
          notes="timm nf_resnet26: ScaledStdConv2d, alpha 0.2, no normalization layers"),
):
    register(_e)
