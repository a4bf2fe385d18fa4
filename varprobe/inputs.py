"""Example inputs: the user's, a file's, or synthesized from the first layer.

Float inputs are unit-variance Gaussians (the paper's E[x^2] = 1 assumption); an
``nn.Embedding`` first layer gets integer ids inside its vocabulary.
"""

from __future__ import annotations

import contextlib
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


def _sequence_limit(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    limits = [getattr(config, k, None) for k in ("max_position_embeddings", "n_positions")]
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
        if fed:
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
    """Keyword inputs shaped like ``model.dummy_inputs`` (T5 needs decoder ids too).

    Token ids are drawn inside the input embedding's vocabulary, skipping the pad id
    (attention may mask it out); masks are all ones, token types zero. ``shape`` (the
    sequence length for ids, else the per-sample shape) overrides the default length.
    """
    try:
        dummy = dict(model.dummy_inputs)
    except Exception:  # noqa: BLE001 - a model without usable dummy inputs: fall back
        dummy = {}
    main = getattr(model, "main_input_name", "input_ids")
    if main not in dummy and main.endswith("_ids"):
        dummy[main] = torch.zeros(1, 1, dtype=torch.long)
    config = getattr(model, "config", None)
    seq = shape[0] if shape else _sequence_limit(model)
    out = {}
    for key, t in dummy.items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.is_floating_point():
            rest = tuple(shape) if shape and key == main else tuple(t.shape[1:])
            out[key] = torch.randn((batch_size, *rest), generator=generator)
        elif "mask" in key or key == "token_type_ids":
            fill = 1 if "mask" in key else 0
            out[key] = torch.full((batch_size, seq), fill, dtype=t.dtype)
        else:
            vocab = _vocabulary(model, config)
            ids = torch.randint(0, vocab - 1, (batch_size, seq), generator=generator)
            pad = getattr(config, "pad_token_id", None)
            out[key] = ids + (ids >= pad) if isinstance(pad, int) and 0 <= pad < vocab else ids
    return out


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
