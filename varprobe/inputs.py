"""Example inputs: the user's, a file's, or synthesized from the first layer.

Float inputs are unit-variance Gaussians (the paper's E[x^2] = 1 assumption); an
``nn.Embedding`` first layer gets integer ids inside its vocabulary; a transformers
model gets what its ``main_input_name`` and config declare.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from varprobe.errors import VarprobeError

DEFAULT_SPATIAL = {1: (128,), 2: (32, 32), 3: (16, 16, 16)}
DEFAULT_SEQUENCE = 32


def first_layer(model: nn.Module) -> nn.Module | None:
    """The first module (in registration order) that consumes the input."""
    kinds = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.RNNBase, nn.Bilinear)
    return next((m for m in model.modules() if isinstance(m, kinds)), None)


def _sequence_limit(model: nn.Module, decoder: bool = False) -> int:
    config = getattr(model, "config", None)
    keys = ("max_position_embeddings", "n_positions") + (
        ("max_target_positions",) if decoder else ())
    limits = [getattr(config, k, None) for k in keys]
    return min([DEFAULT_SEQUENCE] + [v for v in limits if isinstance(v, int) and v > 0])


def infer_shape(model: nn.Module) -> tuple[tuple[int, ...], torch.dtype, int | None]:
    """(shape without batch, dtype, id bound) read off the first layer."""
    layer = first_layer(model)
    if isinstance(layer, nn.Linear):
        return (layer.in_features,), torch.float32, None
    if isinstance(layer, nn.Bilinear):
        return (layer.in1_features,), torch.float32, None
    if isinstance(layer, nn.modules.conv._ConvNd):
        dims = len(layer.kernel_size)
        return (layer.in_channels, *DEFAULT_SPATIAL[dims]), torch.float32, None
    if isinstance(layer, nn.Embedding):
        return (_sequence_limit(model),), torch.long, layer.num_embeddings
    if isinstance(layer, nn.RNNBase):
        seq = (DEFAULT_SEQUENCE, layer.input_size)
        return seq, torch.float32, None
    raise VarprobeError(
        f"cannot infer an input for {type(model).__name__}: its first layer is not a "
        "Linear, Conv, Embedding or RNN; pass --input-shape (e.g. --input-shape 3,32,32) "
        "or define example_input in the model file")


def synthesize(model: nn.Module, batch_size: int, shape: tuple[int, ...] | None,
               generator: torch.Generator, device: torch.device) -> Any:
    """A batch for ``model``: N(0, 1) floats, or in-range ids for an embedding."""
    if is_transformers(model):
        fed = transformers_inputs(model, batch_size, shape, generator)
        return to_device(fed, device, model_dtype(model))
    bound = None
    if shape is None:
        shape, _, bound = infer_shape(model)
    elif isinstance(first_layer(model), nn.Embedding):
        bound = first_layer(model).num_embeddings
    full = (batch_size, *shape)
    if bound is not None:
        ids = torch.randint(0, bound, full, generator=generator)
        return ids.to(device)
    float_dtype = model_dtype(model)
    return torch.randn(full, generator=generator).to(device=device, dtype=float_dtype)


def is_transformers(model: nn.Module) -> bool:
    """A HuggingFace ``PreTrainedModel`` (transformers is imported only if the user did)."""
    hf = sys.modules.get("transformers")
    return hf is not None and isinstance(model, hf.PreTrainedModel)


def transformers_inputs(model: nn.Module, batch_size: int, shape: tuple[int, ...] | None,
                        generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Keyword inputs for a transformers model, from what it declares: its
    ``main_input_name`` (token ids, pixel values, audio features or raw audio) shaped
    from its config, and decoder ids for an encoder-decoder (T5, BART, Whisper).

    Token ids are drawn inside the input embedding's vocabulary, skipping the pad id
    (attention may mask it out). ``shape`` overrides the default: the sequence length
    for ids, else the per-sample shape of the main input.
    """
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", "input_ids")
    seq = shape[0] if shape else _sequence_limit(model)
    if main.endswith("_ids"):
        out = {main: _token_ids(model, config, batch_size, seq, generator)}
    else:
        sample = tuple(shape) if shape else _sample_shape(model, config, main)
        out = {main: torch.randn((batch_size, *sample), generator=generator)}
    if _accepts(model, "decoder_input_ids") and main != "decoder_input_ids":
        length = seq if main.endswith("_ids") else _sequence_limit(model, decoder=True)
        out["decoder_input_ids"] = _token_ids(model, config, batch_size, length, generator)
    return out


def _token_ids(model: nn.Module, config: Any, batch_size: int, seq: int,
               generator: torch.Generator) -> torch.Tensor:
    vocab = _vocabulary(model, config)
    ids = torch.randint(0, vocab - 1, (batch_size, seq), generator=generator)
    pad = getattr(config, "pad_token_id", None)
    return ids + (ids >= pad) if isinstance(pad, int) and 0 <= pad < vocab else ids


def _sample_shape(model: nn.Module, config: Any, main: str) -> tuple[int, ...]:
    """The per-sample shape of a float main input, as the config declares it."""
    shape = _declared_shape(model, config, main)
    if shape is None:
        raise VarprobeError(
            f"cannot synthesize {main} for {type(model).__name__}: its config does not say "
            "what shape it takes; define example_input in the model file or pass "
            "--input-shape (the shape of one sample)")
    return shape


def _declared_shape(model: nn.Module, config: Any, main: str) -> tuple[int, ...] | None:
    def get(key: str, of: Any = config) -> Any:
        return getattr(of, key, None)

    if main in ("pixel_values", "pixel_values_videos"):
        vision = config if get("image_size") or get("num_channels") else get("vision_config")
        size = get("image_size", vision) or DEFAULT_SPATIAL[2]
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        frames = (get("num_frames", vision),) if get("num_frames", vision) else ()
        return (*frames, get("num_channels", vision) or 3, *size)  # video: (T, C, H, W)
    if main == "input_features" and get("num_mel_bins") and get("max_source_positions") \
            and _encoder_stride(model):
        # Whisper and its kin: the encoder's two convolutions must bring the frames down
        # to exactly max_source_positions.
        return (config.num_mel_bins, config.max_source_positions * _encoder_stride(model))
    if main == "input_features" and get("input_feat_per_channel"):
        # Speech2Text: (frames, features); each layer of its conv subsampler halves them.
        features = config.input_feat_per_channel * (get("input_channels") or 1)
        return (DEFAULT_SEQUENCE * 2 ** (get("num_conv_layers") or 0), features)
    if main == "input_values" and get("conv_stride") and get("conv_kernel"):
        return (_raw_audio_length(config.conv_kernel, config.conv_stride),)
    if main == "input_values" and get("num_mel_bins") and get("max_length"):
        return (config.max_length, config.num_mel_bins)  # AST: a spectrogram
    if main in ("inputs_embeds", "hidden_states") and get("hidden_size"):
        return (_sequence_limit(model), config.hidden_size)
    return None


def _encoder_stride(model: nn.Module) -> int | None:
    """The frame stride of a Whisper-style encoder's conv1 and conv2; None without them."""
    with contextlib.suppress(Exception):
        model = model.get_encoder()
    convs = [getattr(model, name, None) for name in ("conv1", "conv2")]
    if not all(isinstance(c, nn.Conv1d) for c in convs):
        return None
    return convs[0].stride[0] * convs[1].stride[0]


def _raw_audio_length(kernels: Any, strides: Any, frames: int = DEFAULT_SEQUENCE) -> int:
    """Samples that a feature encoder's convolutions turn into ``frames`` frames: each
    layer's output length is floor((L - k) / s) + 1, inverted from the last layer."""
    length = frames
    for k, s in zip(reversed(list(kernels)), reversed(list(strides))):
        length = (length - 1) * s + k
    return length


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _vocabulary(model: nn.Module, config: Any) -> int:
    """The number of ids the input embedding accepts (config and module may disagree)."""
    sizes = [getattr(config, "vocab_size", None)]
    with contextlib.suppress(Exception):
        sizes.append(model.get_input_embeddings().num_embeddings)
    return min(v for v in sizes if isinstance(v, int) and v > 1)


def model_dtype(model: nn.Module) -> torch.dtype:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


def load_file(path: str | Path) -> Any:
    """Real data from ``.pt`` (tensor, tuple or dict; weights_only) or ``.npy``."""
    path = Path(path)
    if not path.is_file():
        raise VarprobeError(f"--input {path}: no such file")
    try:
        if path.suffix == ".npy":
            import numpy as np

            return torch.from_numpy(np.load(path, allow_pickle=False))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any load failure is a bad input file
        raise VarprobeError(f"--input {path}: cannot load it ({exc}); "
                            "use a .pt tensor/tuple/dict or a .npy array") from exc


def to_device(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move every tensor to ``device``; floats take the model's dtype."""
    from torch.utils import _pytree as pytree

    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    return pytree.tree_map(move, value)


def as_call(inputs: Any) -> tuple[tuple, dict]:
    """A tuple is positional args, a dict is keywords, anything else one argument."""
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}
