"""Vision and audio models from HuggingFace transformers' own code, at tiny configs.

Built from config classes (no hub download), so the library's ``_init_weights`` sets the
weights. Images are 32x32 (patch 4: 64 tokens), audio is a quarter second of 16 kHz
samples (wav2vec 2.0) or 128 log-mel frames (Whisper).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers as tf

from corpus import Entry, register
from corpus.broken import pair

tf.logging.set_verbosity_error()

IMAGE, PATCH, WIDTH, LAYERS, HEADS, CLASSES = 32, 4, 128, 4, 4, 10
VIT = dict(image_size=IMAGE, patch_size=PATCH, hidden_size=WIDTH, num_hidden_layers=LAYERS,
           num_attention_heads=HEADS, intermediate_size=4 * WIDTH)


def images(batch: int) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE)}


def model(cls: str, config: str, **kwargs: Any) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        return getattr(tf, cls)(getattr(tf, config)(**kwargs))
    return make


def add(name: str, cls: str, config: str, inputs: Callable[[int], Any], task: str,
        notes: str, tags: tuple[str, ...], **kwargs: Any) -> Entry:
    return register(Entry(name=name, family="transformers", make=model(cls, config, **kwargs),
                          inputs=inputs, task=task, notes=notes, tags=tags))


add("hf_vit", "ViTModel", "ViTConfig", images, "regress",
    "ViT encoder: patch embedding, pre-LN blocks, final LN and tanh pooler "
    "(truncated-normal 0.02 init)", ("transformer", "vision"), **VIT)
add("hf_vit_classify", "ViTForImageClassification", "ViTConfig", images, "classify",
    "ViT with a linear head on the [CLS] token", ("transformer", "vision"),
    **VIT, num_labels=CLASSES)
add("hf_clip_vision", "CLIPVisionModel", "CLIPVisionConfig", images, "regress",
    "CLIP image tower: pre-LN before the blocks, quick-GELU, pooled [CLS] post-LN",
    ("transformer", "vision"), **VIT)
add("hf_swin", "SwinForImageClassification", "SwinConfig", images, "classify",
    "Swin: shifted-window attention with relative position bias, patch merging "
    "(16, 8, 4 tokens a side), mean-pooled head",
    ("transformer", "vision", "windowed"),
    image_size=IMAGE, patch_size=2, embed_dim=32, depths=[2, 2, 2], num_heads=[2, 4, 8],
    window_size=4, num_labels=CLASSES)
add("hf_convnext", "ConvNextForImageClassification", "ConvNextConfig", images, "classify",
    "ConvNeXt: patchify stem, depthwise 7x7 conv blocks with LayerNorm, inverted "
    "bottleneck, layer scale 1e-6", ("cnn", "vision", "layer-scale"),
    num_channels=3, patch_size=PATCH, hidden_sizes=[32, 64, 128], depths=[2, 2, 2],
    num_stages=3, num_labels=CLASSES)


def clip_tokens(batch: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(4, 2000, (batch, 64))}


add("hf_clip_text", "CLIPTextModel", "CLIPTextConfig", clip_tokens, "regress",
    "CLIP text tower: causal pre-LN transformer, quick-GELU, pooled at the end token",
    ("transformer", "token-input"),
    vocab_size=2000, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
    num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=64,
    pad_token_id=0, bos_token_id=1, eos_token_id=2)


def audio(batch: int) -> dict[str, torch.Tensor]:
    return {"input_values": torch.randn(batch, 4000)}


add("hf_wav2vec2", "Wav2Vec2ForSequenceClassification", "Wav2Vec2Config", audio, "classify",
    "wav2vec 2.0: conv feature encoder (group norm), conv positional embedding, "
    "post-LN transformer, mean-pooled classifier",
    ("transformer", "audio", "post-ln"),
    conv_dim=(32, 32, 32), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3),
    hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
    intermediate_size=256, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
    classifier_proj_size=64, num_labels=CLASSES)

MELS, FRAMES = 16, 128
WHISPER = dict(num_mel_bins=MELS, max_source_positions=FRAMES // 2, d_model=WIDTH,
               encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=HEADS,
               decoder_attention_heads=HEADS, encoder_ffn_dim=4 * WIDTH,
               decoder_ffn_dim=4 * WIDTH, vocab_size=2000, max_target_positions=64,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3,
               use_cache=False)


def mels(batch: int) -> dict[str, torch.Tensor]:
    return {"input_features": torch.randn(batch, MELS, FRAMES)}


def mels_and_tokens(batch: int) -> dict[str, torch.Tensor]:
    return {**mels(batch), "decoder_input_ids": torch.randint(4, 2000, (batch, 32))}


add("hf_whisper_classify", "WhisperForAudioClassification", "WhisperConfig", mels,
    "classify", "Whisper encoder (two GELU convs, sinusoidal positions, pre-LN blocks) "
    "with a mean-pooled classifier", ("transformer", "audio"),
    **WHISPER, classifier_proj_size=64, num_labels=CLASSES)
add("hf_whisper", "WhisperForConditionalGeneration", "WhisperConfig", mels_and_tokens,
    "regress", "Whisper encoder-decoder with its tied LM head; trained as regression "
    "because the decoder's tokens are not the audio", ("transformer", "audio",
                                                      "encoder-decoder"), **WHISPER)
add("hf_segformer", "SegformerForImageClassification", "SegformerConfig", images, "classify",
    "SegFormer (MiT): overlapping patch embeddings, spatial-reduction attention, Mix-FFN "
    "(Linear, 3x3 depthwise conv, Linear) residual branches, every Linear and conv at "
    "std 0.02", ("transformer", "vision", "residual-branch"),
    num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[32, 64],
    patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[4, 4],
    num_labels=CLASSES)


def _efficientnet(gamma_one: bool = False) -> torch.nn.Module:
    """EfficientNet at transformers' own init, which draws every BatchNorm's γ from
    N(0, 0.02) as it draws the convs (``gamma_one``: the twin, those γ reset to 1)."""
    made = model("EfficientNetForImageClassification", "EfficientNetConfig",
                 image_size=IMAGE, width_coefficient=0.25, depth_coefficient=0.25,
                 hidden_dim=320, num_labels=CLASSES)()
    if gamma_one:
        for module in made.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(module.weight)
    return made


pair("hf_efficientnet", "transformers", _efficientnet, lambda: _efficientnet(True), images,
     "collapsing norms: every BatchNorm's γ ~ N(0, 0.02) (the library's init), so past "
     "the stem no norm's input reaches its eps (1e-3) and each multiplies the signal by "
     "~γ²/eps", batch_size=8,
     notes="MBConv blocks with squeeze-excitation, width and depth x0.25")


def _mobilevit(gamma_one: bool = False) -> torch.nn.Module:
    """MobileViT (v1) narrowed (hidden 48/64/80) at 64×64, at transformers' own init,
    BatchNorm γ ~ N(0, 0.02) as for EfficientNet (``gamma_one``: the twin, γ = 1). Its
    transformer blocks' LayerNorms do not reset the scale either (their input, ~1e-11, is
    under their eps): the deepest point is 1.1e-6 of the stem norm's small scale (5e-4),
    6e-10 of a normalized signal."""
    made = model("MobileViTForImageClassification", "MobileViTConfig", image_size=64,
                 hidden_sizes=[48, 64, 80], neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 160],
                 num_labels=CLASSES)()
    if gamma_one:
        for module in made.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(module.weight)
    return made


pair("hf_mobilevit", "transformers", _mobilevit, lambda: _mobilevit(True),
     lambda batch: {"pixel_values": torch.randn(batch, 3, 64, 64)},
     "collapsing norms between LayerNorms: every BatchNorm's γ ~ N(0, 0.02) (the "
     "library's init), the stem's setting a scale of 5e-4 and the stretches after it "
     "shrinking the signal to 6e-10, the LayerNorms between them under their eps", batch_size=8,
     notes="MobileViT v1 narrowed, 64x64")
