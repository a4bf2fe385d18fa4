"""Diffusion networks from HuggingFace diffusers' own code, at tiny configs.

Built from constructor arguments (no hub download), at the init the constructors give:
diffusers keeps PyTorch's layer defaults and zeroes nothing (not DiT's adaLN-Zero
modulation, not the UNets' output convs), unlike the papers' reference code.
Noisy samples are 16x16 (UNets, DiT and SD3 latents) or 32x32 (VAE); timesteps are
integers in [0, 1000), floats there for SD3, as its flow-matching scheduler gives them.
Every one is trained as regression to a target of its output's shape, as a denoiser is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffusers
import torch

from corpus import Entry, register

SIDE, STEPS = 16, 1000


def model(cls: str, **kwargs: Any) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        return getattr(diffusers, cls)(**kwargs)
    return make


def add(name: str, make: Callable[[], torch.nn.Module], inputs: Callable[[int], Any],
        notes: str, tags: tuple[str, ...]) -> Entry:
    return register(Entry(name=name, family="diffusers", make=make, inputs=inputs,
                          task="regress", notes=notes, tags=tags))


def noisy(channels: int, side: int = SIDE) -> Callable[[int], dict[str, torch.Tensor]]:
    def inputs(batch: int) -> dict[str, torch.Tensor]:
        return {"sample": torch.randn(batch, channels, side, side),
                "timestep": torch.randint(0, STEPS, (batch,))}
    return inputs


def noisy_with_text(batch: int) -> dict[str, torch.Tensor]:
    return {**noisy(4)(batch), "encoder_hidden_states": torch.randn(batch, 8, 32)}


def latents_with_class(batch: int) -> dict[str, torch.Tensor]:
    return {"hidden_states": torch.randn(batch, 4, SIDE, SIDE),
            "timestep": torch.randint(0, STEPS, (batch,)),
            "class_labels": torch.randint(0, 10, (batch,))}


def latents_with_text(batch: int) -> dict[str, torch.Tensor]:
    """SD3's and Flux's inputs: the timestep a float, as their schedulers give it."""
    return {"hidden_states": torch.randn(batch, 4, SIDE, SIDE),
            "encoder_hidden_states": torch.randn(batch, 8, 32),
            "pooled_projections": torch.randn(batch, 16),
            "timestep": torch.rand(batch) * STEPS}


def image(batch: int) -> dict[str, torch.Tensor]:
    return {"sample": torch.randn(batch, 3, 2 * SIDE, 2 * SIDE)}


add("diffusers_unet2d",
    model("UNet2DModel", sample_size=SIDE, in_channels=3, out_channels=3,
          block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
          down_block_types=("DownBlock2D", "AttnDownBlock2D"),
          up_block_types=("AttnUpBlock2D", "UpBlock2D")),
    noisy(3), "DDPM UNet: GroupNorm + SiLU ResNet blocks with timestep embedding, "
              "self-attention at the low resolution, skip concatenations",
    ("unet", "diffusion", "group-norm"))
add("diffusers_unet2d_cond",
    model("UNet2DConditionModel", sample_size=SIDE, in_channels=4, out_channels=4,
          block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
          cross_attention_dim=32, attention_head_dim=8),
    noisy_with_text, "Stable-Diffusion-style UNet: transformer blocks with cross-attention "
                     "to 8 text tokens, GEGLU feed-forward",
    ("unet", "diffusion", "group-norm", "cross-attention"))
add("diffusers_vae",
    model("AutoencoderKL", in_channels=3, out_channels=3, latent_channels=4,
          block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
          down_block_types=("DownEncoderBlock2D",) * 2,
          up_block_types=("UpDecoderBlock2D",) * 2, sample_size=2 * SIDE),
    image, "KL autoencoder: encoder to a 4-channel latent (posterior mode), decoder back; "
           "mid-block self-attention", ("vae", "group-norm"))
add("diffusers_dit",
    model("DiTTransformer2DModel", num_attention_heads=4, attention_head_dim=16,
          in_channels=4, out_channels=8, num_layers=4, sample_size=SIDE, patch_size=2,
          num_embeds_ada_norm=10, norm_num_groups=8),
    latents_with_class, "DiT: patchified latents, adaLN-Zero-style blocks conditioned "
                        "on timestep and class (modulation not zeroed), learned-sigma "
                        "output (8 channels)",
    ("transformer", "diffusion", "adaln"))
add("diffusers_sd3",
    model("SD3Transformer2DModel", sample_size=SIDE, patch_size=2, in_channels=4,
          num_layers=2, attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
          caption_projection_dim=64, pooled_projection_dim=16, out_channels=4,
          pos_embed_max_size=SIDE),
    latents_with_text, "Stable Diffusion 3 MMDiT: joint attention over image patches and "
                       "text tokens, adaLN modulation from a float timestep's sinusoidal "
                       "embedding and pooled text", ("transformer", "diffusion", "adaln"))
