"""The whole models of the accuracy bench (bench/whole_models.py), each at its own init.

Every builder is a module-level function with no arguments, so that the closed-form
``varprobe predict`` can build it on the meta device from a spec such as
``bench.whole_zoo:nanogpt`` (the init the builder applies is then recorded, not read).
Widths are 256 or more wherever the bench holds a model to the 0.1 bound: the
Monte Carlo spread of a layer's second moment shrinks as 1/sqrt(width)
(docs/theory-review.md §10). ``Case`` says how each model is fed and probed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

WIDTH = 256
VOCAB, SEQ = 2000, 64


# -- plain stacks ----------------------------------------------------------------------


def mlp(width: int = WIDTH, depth: int = 8) -> nn.Module:
    """Linear+ReLU x depth and a Linear head, PyTorch's default init (1/(3n), biases)."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


class ResidualMLP(nn.Module):
    """``blocks`` x (x + Linear(ReLU(x))), He init, zero biases, a final Linear.

    Without a norm or a branch scale every block doubles E[x²]: 2^blocks at the head.
    """

    def __init__(self, width: int = WIDTH, blocks: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.head = nn.Linear(width, width)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fc in self.blocks:
            x = x + fc(F.relu(x))
        return self.head(x)


def residual_mlp() -> nn.Module:
    return ResidualMLP()


def _he_fan_out(model: nn.Module, linear_std: float | None = None) -> nn.Module:
    """torchvision's ResNet init: convs kaiming_normal_(fan_out, relu), zero conv biases,
    norms 1/0; Linear at PyTorch's default, or N(0, linear_std²) with zero bias."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
    return model


class PaddedCNN(nn.Module):
    """3x3 convs with zero padding 1 (one of them stride 2), ReLU, global average
    pooling and a Linear head; torchvision's fan-out He on the convs."""

    def __init__(self, width: int = WIDTH, depth: int = 5, classes: int = 10):
        super().__init__()
        convs: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
        for i in range(depth - 1):
            stride = 2 if i == depth // 2 - 1 else 1
            convs += [nn.Conv2d(width, width, 3, stride=stride, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*convs)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, classes)
        _he_fan_out(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def cnn() -> nn.Module:
    return PaddedCNN()


def small_cnn() -> nn.Module:
    """The tests' CNN: four padded convs at 256 channels (the third one stride 2)."""
    return PaddedCNN(depth=4)


# -- residual CNNs with BatchNorm --------------------------------------------------------


class PostActBlock(nn.Module):
    """The original ResNet basic block: relu(bn2(conv2(relu(bn1(conv1 x)))) + x)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class PreActBlock(nn.Module):
    """He et al. 2016b: x + conv2(relu(bn2(conv1(relu(bn1 x)))))."""

    def __init__(self, c: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        return x + self.conv2(F.relu(self.bn2(out)))


class BNResNet(nn.Module):
    """Stem conv, ``blocks`` basic blocks at one width, global average pool, Linear.

    ``pre``: pre-activation blocks, no BN on the stem and a final BN-ReLU before the
    pool (He et al. 2016b); else post-activation blocks behind a conv-BN-ReLU stem."""

    def __init__(self, pre: bool, width: int = WIDTH, blocks: int = 4, classes: int = 10):
        super().__init__()
        self.pre = pre
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.stem_bn = None if pre else nn.BatchNorm2d(width)
        block = PreActBlock if pre else PostActBlock
        self.blocks = nn.Sequential(*(block(width) for _ in range(blocks)))
        self.final_bn = nn.BatchNorm2d(width) if pre else None
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)
        _he_fan_out(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.stem_bn is not None:
            x = F.relu(self.stem_bn(x))
        x = self.blocks(x)
        if self.final_bn is not None:
            x = F.relu(self.final_bn(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet_postact() -> nn.Module:
    return BNResNet(pre=False)


def resnet_preact() -> nn.Module:
    return BNResNet(pre=True)


# -- a ConvTranspose decoder --------------------------------------------------------------


class Decoder(nn.Module):
    """DCGAN's generator without BatchNorm: Linear to 4x4, three ConvTranspose2d(4, s2, p1)
    + ReLU up to 32x32, a 3x3 conv and tanh; DCGAN's N(0, 0.02) on every weight."""

    def __init__(self, latent: int = 128, width: int = WIDTH):
        super().__init__()
        self.width = width
        self.fc = nn.Linear(latent, width * 16)
        self.ups = nn.Sequential(*(m for _ in range(3) for m in (
            nn.ConvTranspose2d(width, width, 4, 2, 1), nn.ReLU())))
        self.out = nn.Conv2d(width, 3, 3, padding=1)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc(z)).view(z.shape[0], self.width, 4, 4)
        return torch.tanh(self.out(self.ups(x)))


def decoder() -> nn.Module:
    return Decoder()


# -- depthwise (MobileNetV2-style) and squeeze-excitation -----------------------------------


class InvertedResidual(nn.Module):
    """MobileNetV2: 1x1 expand-BN-ReLU6, depthwise 3x3-BN-ReLU6, 1x1 project-BN, + x."""

    def __init__(self, c: int, expand: int = 2):
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h),
                                    nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False),
                                       nn.BatchNorm2d(h), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.depthwise(self.expand(x)))


class MobileNet(nn.Module):
    """A conv-BN-ReLU6 stem, three inverted residual blocks, 1x1 head conv, global
    average pool, dropout and a Linear; torchvision MobileNetV2's init."""

    def __init__(self, width: int = WIDTH, blocks: int = 3, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU6())
        self.blocks = nn.Sequential(*(InvertedResidual(width) for _ in range(blocks)))
        self.head = nn.Sequential(nn.Conv2d(width, 2 * width, 1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(2 * width, classes))
        _he_fan_out(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


def mobilenet() -> nn.Module:
    return MobileNet()


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: x * sigmoid(fc2(relu(fc1(avgpool(x)))))."""

    def __init__(self, c: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(self.avgpool(x)))))
        return x * scale


class SEBlock(nn.Module):
    """SE-ResNet basic block: relu(se(bn2(conv2(relu(bn1(conv1 x))))) + x)."""

    def __init__(self, c: int, reduction: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.se = SqueezeExcitation(c, c // reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.se(self.bn2(self.conv2(out))) + x)


class SENet(nn.Module):
    def __init__(self, width: int = WIDTH, blocks: int = 2, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(*(SEBlock(width) for _ in range(blocks)))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)
        _he_fan_out(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def senet() -> nn.Module:
    return SENet()


# -- transformers ----------------------------------------------------------------------------


def vit() -> nn.Module:
    """The corpus ViT (conv patchify, [CLS], learned positions, pre-LN blocks on
    nn.MultiheadAttention, PyTorch's default inits) at width 256, 4 blocks."""
    from corpus.handwritten import ViT

    return ViT(image=32, patch=4, d=WIDTH, layers=4, heads=4)


def nanogpt() -> nn.Module:
    """The corpus nanoGPT (causal F.scaled_dot_product_attention, N(0, 0.02), c_proj at
    0.02/sqrt(2 n_layer), tied head) at width 256, 4 blocks."""
    from corpus.handwritten import NanoGPT

    return NanoGPT(vocab=VOCAB, block=2 * SEQ, layers=4, d=WIDTH, heads=4)


def _hf(cls: str, config: str, **kwargs: Any) -> nn.Module:
    import transformers as tf

    tf.logging.set_verbosity_error()
    return getattr(tf, cls)(getattr(tf, config)(use_cache=False, **kwargs))


def hf_gpt2() -> nn.Module:
    return _hf("GPT2LMHeadModel", "GPT2Config", n_layer=4, n_embd=WIDTH, n_head=4,
               vocab_size=VOCAB, n_positions=2 * SEQ)


def hf_llama() -> nn.Module:
    return _hf("LlamaForCausalLM", "LlamaConfig", num_hidden_layers=4, hidden_size=WIDTH,
               num_attention_heads=4, num_key_value_heads=2, intermediate_size=688,
               vocab_size=VOCAB, max_position_embeddings=2 * SEQ)


def hf_gpt2_eager() -> nn.Module:
    """GPT-2 as hf_gpt2, its attention spelled out (matmul, mask, softmax, matmul)."""
    return _hf("GPT2LMHeadModel", "GPT2Config", n_layer=4, n_embd=WIDTH, n_head=4,
               vocab_size=VOCAB, n_positions=2 * SEQ, attn_implementation="eager")


def hf_llama_eager() -> nn.Module:
    """Llama as hf_llama, its attention spelled out (repeat_kv, matmul, softmax, matmul)."""
    return _hf("LlamaForCausalLM", "LlamaConfig", num_hidden_layers=4, hidden_size=WIDTH,
               num_attention_heads=4, num_key_value_heads=2, intermediate_size=688,
               vocab_size=VOCAB, max_position_embeddings=2 * SEQ, attn_implementation="eager")


def hf_bert() -> nn.Module:
    return _hf("BertForMaskedLM", "BertConfig", num_hidden_layers=4, hidden_size=WIDTH,
               num_attention_heads=4, intermediate_size=4 * WIDTH, vocab_size=VOCAB,
               max_position_embeddings=2 * SEQ)


def hf_t5() -> nn.Module:
    return _hf("T5ForConditionalGeneration", "T5Config", num_layers=4, num_decoder_layers=4,
               d_model=WIDTH, d_ff=4 * WIDTH, num_heads=4, d_kv=WIDTH // 4, vocab_size=VOCAB)


# -- how each is fed ---------------------------------------------------------------------------


def gaussian(*shape: int) -> Callable[[int, torch.Generator], torch.Tensor]:
    return lambda batch, gen: torch.randn(batch, *shape, generator=gen)


def tokens(low: int = 0) -> Callable[[int, torch.Generator], torch.Tensor]:
    return lambda batch, gen: torch.randint(low, VOCAB, (batch, SEQ), generator=gen)


def hf_tokens(*names: str) -> Callable[[int, torch.Generator], dict[str, torch.Tensor]]:
    """Ids above the low ids special tokens sit on, under each of ``names``."""
    return lambda batch, gen: {n: torch.randint(4, VOCAB, (batch, SEQ), generator=gen)
                               for n in names}


@dataclass(frozen=True)
class Case:
    """One model of the bench.

    build: the module-level builder (its ``__name__`` is the predict spec).
    inputs: ``inputs(batch, generator)``. mode: the probe's mode; "eval" models get
    their BatchNorm running statistics calibrated first (``calibrate`` batches in
    train mode with a cumulative average). meta_shape: the input shape (batch
    excluded) ``varprobe predict`` synthesizes; None: not predicted on meta (the
    eval-mode cases: their running statistics come from the calibration, which a
    model built on meta does not get).
    counterfactual: whether the re-initialized copies are measured.
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], Any]
    batch: int
    what: str
    mode: str = "train"
    calibrate: int = 0
    meta_shape: tuple[int, ...] | None = None
    counterfactual: bool = True

    @property
    def spec(self) -> str:
        return f"{__name__}:{self.build.__name__}"


IMAGE_SHAPE = (3, 16, 16)
IMAGES = gaussian(*IMAGE_SHAPE)
CASES: tuple[Case, ...] = (
    Case("mlp", mlp, gaussian(WIDTH), 256,
         "8 Linear+ReLU at 256, PyTorch default init (biases on)", meta_shape=(WIDTH,)),
    Case("residual_mlp", residual_mlp, gaussian(WIDTH), 256,
         "8 blocks x + Linear(ReLU(x)) at 256, He, final Linear", meta_shape=(WIDTH,)),
    Case("cnn", cnn, IMAGES, 16,
         "5 padded 3x3 convs at 256 ch (one stride 2), ReLU, global avg pool, Linear",
         meta_shape=IMAGE_SHAPE),
    Case("resnet_postact", resnet_postact, IMAGES, 16,
         "post-activation BN ResNet, 4 basic blocks at 256 ch, train-mode BN",
         meta_shape=IMAGE_SHAPE),
    Case("resnet_postact_eval", resnet_postact, IMAGES, 16,
         "the same in eval mode, running stats calibrated on 8 batches", mode="eval",
         calibrate=8),
    Case("resnet_preact", resnet_preact, IMAGES, 16,
         "pre-activation BN ResNet (He 2016b), 4 blocks at 256 ch, train-mode BN",
         meta_shape=IMAGE_SHAPE),
    Case("resnet_preact_eval", resnet_preact, IMAGES, 16,
         "the same in eval mode, running stats calibrated on 8 batches", mode="eval",
         calibrate=8),
    Case("decoder", decoder, gaussian(128), 16,
         "DCGAN-style decoder: Linear, 3 ConvTranspose2d(4, s2) at 256 ch, conv, tanh",
         meta_shape=(128,)),
    Case("mobilenet", mobilenet, IMAGES, 16,
         "MobileNetV2-style: 3 inverted residuals (256 -> 512 depthwise -> 256), BN, ReLU6",
         meta_shape=IMAGE_SHAPE),
    Case("senet", senet, IMAGES, 16,
         "SE-ResNet: 2 basic blocks at 256 ch with a squeeze-excitation gate",
         meta_shape=IMAGE_SHAPE),
    Case("vit", vit, gaussian(3, 32, 32), 16,
         "ViT: patch conv, [CLS], 4 pre-LN blocks (nn.MultiheadAttention) at 256",
         meta_shape=(3, 32, 32)),
    Case("nanogpt", nanogpt, tokens(), 8,
         "nanoGPT: 4 blocks at 256, causal F.scaled_dot_product_attention, tied head",
         meta_shape=(SEQ,)),
    Case("hf_gpt2", hf_gpt2, hf_tokens("input_ids"), 8,
         "transformers GPT-2, 4 layers, hidden 256, its _init_weights", meta_shape=(SEQ,)),
    Case("hf_llama", hf_llama, hf_tokens("input_ids"), 8,
         "transformers Llama, 4 layers, hidden 256, GQA 4/2", meta_shape=(SEQ,)),
    Case("hf_gpt2_eager", hf_gpt2_eager, hf_tokens("input_ids"), 8,
         "the same GPT-2 with attn_implementation='eager'", meta_shape=(SEQ,)),
    Case("hf_llama_eager", hf_llama_eager, hf_tokens("input_ids"), 8,
         "the same Llama with attn_implementation='eager'", meta_shape=(SEQ,)),
    Case("hf_bert", hf_bert, hf_tokens("input_ids"), 8,
         "transformers BERT masked LM, 4 layers, hidden 256, post-LN", meta_shape=(SEQ,)),
    Case("hf_t5", hf_t5, hf_tokens("input_ids", "decoder_input_ids"), 8,
         "transformers T5 v1.0, 4+4 layers, d_model 256", meta_shape=(SEQ,)),
)


def case(name: str) -> Case:
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(name)

