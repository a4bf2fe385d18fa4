"""Fans, module kinds and the init schemes' variances.

Pure functions of modules and shapes: the fans He et al. 2015 and Glorot & Bengio 2010
use (n, n^), their effective values on padded and strided convs, and the weight and
bias variances each scheme prescribes (docs/theory.md).
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from varprobe.theory import tapmaps

# ---------------------------------------------------------------------------
# Module classes
# ---------------------------------------------------------------------------

NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
         *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
NOT_ELEMENTWISE = (nn.Softmax, nn.Softmax2d, nn.LogSoftmax, nn.Softmin, nn.MultiheadAttention,
                   nn.GLU, nn.AdaptiveLogSoftmaxWithLoss)


def is_linear_map(module: nn.Module) -> bool:
    """y = W x + b summed over a fan-in: Linear, every ConvNd, transformers' Conv1D.
    Once per class but for a Conv1D, told by its weight (every walk asks at every call)."""
    cls = type(module)
    known = _LINEAR_MAPS.get(cls)
    if known is None:
        known = issubclass(cls, (nn.Linear, nn.modules.conv._ConvNd))
        if not known and cls.__name__ == "Conv1D":
            return _is_conv1d(module)
        _LINEAR_MAPS[cls] = known
    return known


_LINEAR_MAPS: dict[type, bool] = {}


def _is_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D (GPT-2, GPT-J's heads): addmm(b, x, W) with W
    of shape (in, out). Told by name and shape, so transformers need not be imported."""
    if type(module).__name__ != "Conv1D":  # before .weight: a parametrization computes it
        return False
    w = getattr(module, "weight", None)
    return (isinstance(w, torch.Tensor) and w.dim() == 2
            and getattr(module, "nf", None) == w.shape[1])


# Libraries whose activation modules are all elementwise when they hold no parameters
# (transformers' NewGELUActivation of GPT-2, QuickGELU, ...; diffusers' own).
ELEMENTWISE_LIBRARIES = ("transformers.activations", "diffusers.models.activations")


def is_activation(module: nn.Module) -> bool:
    """An elementwise nonlinearity from torch.nn (ReLU, PReLU, GELU, Tanh, ...), or a
    parameterless one from ELEMENTWISE_LIBRARIES."""
    cls = type(module)
    if cls.__module__ in ELEMENTWISE_LIBRARIES:
        return not module._parameters and next(module.children(), None) is None
    if cls not in _ACTIVATIONS:  # decided by the class alone
        _ACTIVATIONS[cls] = cls.__module__ == "torch.nn.modules.activation" and \
            not issubclass(cls, NOT_ELEMENTWISE)
    return _ACTIVATIONS[cls]


_ACTIVATIONS: dict[type, bool] = {}


# Norm modules of other libraries and hand-written code, told by class name (nanoGPT's
# LayerNorm calling F.layer_norm, transformers' LlamaRMSNorm and T5LayerNorm, ...):
# a leaf whose parameters are per-feature scales and shifts.
NORM_NAMES = ("LayerNorm", "RMSNorm", "GroupNorm")
RMS_NAMES = ("RMSNorm", "T5LayerNorm")
# Gemma's RMSNorm scales by (1 + weight), its weight initialized to zeros; T5Gemma's,
# RecurrentGemma's, VaultGemma's and Qwen3-Next's too. Told by the forward's source.
_ONE_PLUS = re.compile(r"\b1(?:\.0)?\s*\+\s*self\.weight\b")


def norm_like(module: nn.Module) -> bool:
    name = type(module).__name__
    return (name.endswith(NORM_NAMES)
            and not type(module).__module__.startswith("torch.nn.")
            and next(module.children(), None) is None
            and all(p.dim() == 1 for p in own_parameters(module)))


def gamma_offset(module: nn.Module) -> float:
    """What a norm adds to its weight to scale by: 1 for a (1 + weight) norm, else 0."""
    return _gamma_offset(type(module))


@functools.cache
def _gamma_offset(cls: type) -> float:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):  # no source at hand (a builtin, a compiled module)
        return 0.0
    return 1.0 if _ONE_PLUS.search(source) else 0.0


def kind(module: nn.Module) -> str:
    """"weight", "activation", "norm" or "other"."""
    if isinstance(module, NORMS) or norm_like(module):
        return "norm"
    if is_activation(module):
        return "activation"
    if any(p.dim() >= 2 for p in own_parameters(module)):
        return "weight"
    return "other"


def own_parameters(module: nn.Module) -> list[torch.Tensor]:
    """``module.parameters(recurse=False)``, read from the module's own table: the
    public generator walks ``named_modules`` first, which costs tens of microseconds,
    and this is asked for every layer of every pass. A parametrized tensor
    (torch.nn.utils.parametrize: weight_norm, spectral_norm) is the module's own too,
    as the tensors it is computed from (the ones an optimizer updates)."""
    own = [p for p in module._parameters.values() if p is not None]
    lists = module._modules.get("parametrizations")
    if isinstance(lists, nn.ModuleDict):
        own += [p for plist in lists.values() for p in plist._parameters.values()
                if p is not None]
    return own


# ---------------------------------------------------------------------------
# Fans
# ---------------------------------------------------------------------------

Fans = tuple[int | None, int | None]


def fans(module: nn.Module) -> Fans:
    """(fan_in, fan_out) = (n, n^): terms in one output's forward sum, and in one
    input's backward sum, ignoring borders and stride (see effective_fans).

    - Linear: (in, out); transformers' Conv1D (GPT-2), a Linear whose weight is
      stored transposed, (in, out) = weight.shape, where torch's formula swaps them.
    - ConvNd: ((in/g)*k, (out/g)*k), k = prod(kernel_size). torch's helper gives
      out*k as fan_out for grouped convs, g times too many (pytorch#23854).
    - ConvTransposeNd: the weight is (in, out/g, k...), and the forward pass is the
      backward pass of a conv, so the same formulas hold with in/out read from the
      module: ((in/g)*k, (out/g)*k). With stride s only about 1/s^d of the k taps
      of an output land on an input (effective_fans counts them exactly).
    - Bilinear (y = x1^T A x2): (in1*in2, out*in2); the fan_out is the one of x1's
      gradient (x2's is out*in1).
    - Embedding: (1, None). A lookup: every output element is one weight entry, so
      E[y^2] = 1 * E[w^2] with the one-hot input counted as second moment 1; no
      gradient reaches the integer ids, so there is no fan-out.
    - RNN/LSTM/GRU and their cells: the first input-to-hidden gate matrix,
      (input_size, gates*hidden) (param_fans lists every gate matrix).
    - MultiheadAttention: (embed_dim, embed_dim) for each of the q/k/v projections
      (torch's init sees 3*embed_dim as fan_out of the packed in_proj_weight); the
      out projection is its own Linear child.
    - Any other module with a weight of dim >= 2: torch's formula on that weight.
    - (None, None) where nothing defines them.
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        return tuple(module.weight.shape)
    if isinstance(module, nn.modules.conv._ConvNd):
        k = math.prod(module.kernel_size)
        g = module.groups
        return module.in_channels // g * k, module.out_channels // g * k
    if isinstance(module, nn.Bilinear):
        return module.in1_features * module.in2_features, module.out_features * module.in2_features
    if isinstance(module, nn.Embedding):
        return 1, None
    if isinstance(module, nn.EmbeddingBag):
        return None, None  # a bag sum: its fan-in is the bag size, known only from the input
    if isinstance(module, nn.RNNBase):
        return param_fans(module)["weight_ih_l0"]
    if isinstance(module, nn.RNNCellBase):
        return param_fans(module)["weight_ih"]
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim, module.embed_dim
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() >= 2:
        return _torch_formula(w)
    return None, None


def param_fans(module: nn.Module) -> dict[str, Fans]:
    """Fans of each weight matrix of a module, by parameter name.

    RNN gate matrices weight_ih_lK / weight_hh_lK are (gates*hidden, n): fan_in is
    n (input_size, or hidden/proj size for the recurrent matrix and upper layers),
    fan_out gates*hidden (the terms of the backward sum into one input element).
    """
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return {name: (p.shape[1], p.shape[0]) for name, p in module.named_parameters(recurse=False)
                if name.startswith(("weight_ih", "weight_hh"))}
    if isinstance(module, nn.MultiheadAttention):
        e = module.embed_dim
        return {name: (e, e) if name == "in_proj_weight" else (p.shape[1], p.shape[0])
                for name, p in module.named_parameters(recurse=False) if p.dim() == 2}
    fan = fans(module)
    return {"weight": fan} if fan != (None, None) else {}


def torch_fans(module: nn.Module) -> Fans:
    """The fans torch.nn.init computes for the module's weight (what its default
    init and kaiming_*/xavier_* actually use), or (None, None) without a weight.

    They differ from fans() for grouped convs (fan_out) and transposed convs
    (torch's "fan_in" is (out/g)*k there).
    """
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() >= 2:
        return _torch_formula(w)
    return None, None


def _torch_formula(w: torch.Tensor) -> tuple[int, int]:
    rf = math.prod(w.shape[2:])
    return w.shape[1] * rf, w.shape[0] * rf


def effective_fans(module: nn.Module, input_shape: Sequence[int],
                   output_shape: Sequence[int] | None = None) -> tuple[float, float] | None:
    """Fans averaged over positions, counting only the taps that touch real input.

    For a conv, output positions near a zero-padded border see fewer than k taps
    (forward: (in/g)*k*f with f the mean in-bounds fraction), and with stride an
    input position feeds fewer than k outputs (backward). Both come from the total
    number P of (output position, tap) pairs that land on an input position:
    fan_in = (in/g) * P / n_out, fan_out = (out/g) * P / n_in. For ConvTranspose
    the same count gives its stride-reduced fan-in (about (in/g)*k/s^d).

    input_shape: the layer's input shape, (N, C, *spatial) or (C, *spatial); only
    the trailing spatial dims are used. A transposed conv called with output_size
    is counted with its own output_padding. Non-zero padding modes (circular,
    reflect, replicate) feed every tap real data: f = 1.
    Returns None for modules without a spatial kernel (use fans()), and where the
    module does not compute what its attributes say on that input: the conv does not
    fit it, or gives another ``output_shape`` than the one recorded (a subclass that
    pads in its own forward, as a causal video conv does).
    """
    if not isinstance(module, nn.modules.conv._ConvNd):
        return None
    d = len(module.kernel_size)
    spatial = tuple(int(s) for s in input_shape[-d:])
    if len(spatial) != d:
        raise ValueError(f"input shape {list(input_shape)} has fewer than {d} spatial dims")
    if not kernel_fits(module, spatial):
        return None
    pairs, n_in, n_out = _tap_pairs(module.transposed, module.kernel_size, module.stride,
                                    module.padding, module.dilation,
                                    tuple(getattr(module, "output_padding", ())), spatial)
    if output_shape is not None and n_out != math.prod(int(v) for v in output_shape[-d:]):
        return None
    if module.padding_mode != "zeros":  # padded with copies of the data: every tap is real
        pairs = math.prod(module.kernel_size) * n_out
    g = module.groups
    return (module.in_channels // g * pairs / n_out, module.out_channels // g * pairs / n_in)


def kernel_fits(module: nn.modules.conv._ConvNd, spatial: Sequence[int]) -> bool:
    """Whether the conv's kernel fits its zero-padded input on every axis: where it does
    not, the module must pad on its own (or it would have raised), so its attributes
    do not say where its borders are."""
    if module.transposed or not isinstance(module.padding, tuple):
        return True
    return all(s + 2 * p >= d * (k - 1) + 1 for s, p, d, k in zip(
        spatial, module.padding, module.dilation, module.kernel_size))


def tap_fraction(module: nn.Module, input_shape: Sequence[int]) -> float | None:
    """f: the mean fraction of a conv's k taps per output that land on real input."""
    eff = effective_fans(module, input_shape)
    if eff is None:
        return None
    return eff[0] / fans(module)[0]


@functools.lru_cache(maxsize=1024)
def _tap_pairs(transposed: bool, kernel: tuple, stride: tuple, padding, dilation: tuple,
               output_padding: tuple, spatial: tuple) -> tuple[float, int, int]:
    """(P, n_in, n_out): in-bounds (output, tap) pairs of a one-channel conv of ones."""
    if not transposed and (taps := tapmaps.along(spatial, kernel, stride, padding,
                                                 dilation)) is not None:
        return taps.total, math.prod(spatial), math.prod(taps.outputs)
    d = len(kernel)
    x = torch.ones((1, 1, *spatial), dtype=torch.float64)
    k = torch.ones((1, 1, *kernel), dtype=torch.float64)
    if transposed:
        conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[d - 1]
        y = conv(x, k, stride=stride, padding=padding, output_padding=output_padding,
                 dilation=dilation)
    else:
        conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
        y = conv(x, k, stride=stride, padding=padding, dilation=dilation)
    return float(y.sum()), math.prod(spatial), y[0, 0].numel()


# ---------------------------------------------------------------------------
# Initialization schemes
# ---------------------------------------------------------------------------

SCHEMES = ("xavier", "he", "he-fan-out", "he-prelu", "torch-default", "lecun")


def scheme_variance(scheme: str, fan_in: float | None, fan_out: float | None,
                    a: float = 0.0) -> float | None:
    """Var[w] a scheme prescribes for a layer with fans (n, n^) and PReLU slope a.

    xavier 2/(n+n^) (Glorot Eq. 12); he 2/n (He Eq. 10); he-fan-out 2/n^ (Eq. 14);
    he-prelu 2/((1+a^2) n) (Eq. 15); torch-default 1/(3n) (kaiming_uniform_ with
    a=sqrt(5); pass torch_fans() to get what torch itself does); lecun 1/n.
    None when the scheme needs a fan the layer does not have.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    n, m = fan_in, fan_out
    needs = (n, m) if scheme == "xavier" else (m,) if scheme == "he-fan-out" else (n,)
    for v in needs:  # a loop, not any(): every scheme asks it of every layer
        if v is None or v <= 0:
            return None
    if scheme == "xavier":
        return 2.0 / (n + m)
    if scheme == "he":
        return 2.0 / n
    if scheme == "he-fan-out":
        return 2.0 / m
    if scheme == "he-prelu":
        return 2.0 / ((1.0 + a * a) * n)
    if scheme == "torch-default":
        return 1.0 / (3.0 * n)
    return 1.0 / n  # lecun


def scheme_bias_variance(scheme: str, module: nn.Module) -> float:
    """mean(b^2) a scheme gives a layer's bias: PyTorch's default draws it from
    U(-1/sqrt(n), 1/sqrt(n)) with torch's fan-in n, Var = 1/(3n); the other schemes
    zero it. 0 for a layer without bias."""
    if getattr(module, "bias", None) is None or scheme != "torch-default":
        return 0.0
    return default_bias_variance(torch_fans(module)[0])


def default_bias_variance(n: float | None) -> float:
    """Var of PyTorch's default bias, U(-1/sqrt(n), 1/sqrt(n)) for torch's fan-in n."""
    return 1.0 / (3.0 * n) if n else 0.0
