"""``--init SCHEME``: a copy of the model re-initialized with an init scheme.

The user's weights are never written: the scheme goes into a deep copy. Every
Linear, Conv and ConvTranspose weight is drawn from N(0, Var[w]) with
Var[w] = theory.scheme_variance(scheme, fan_in, fan_out, a) and every bias of those
layers is set to zero (but for torch-default), so that measured and predicted can be
held side by side for any scheme. ``torch-default`` uses the fans torch itself computes (its default
init is kaiming_uniform_; here it is Gaussian with the same variance) and draws the
bias as torch does, U(-1/sqrt(n), 1/sqrt(n)).
Other parameters (embeddings, Bilinear, norms, attention, recurrent cells) stay as
they are, as in the scheme columns and the printed fix (fixcode): the same layers and
the same fans in all three.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from varprobe import theory
from varprobe.errors import VarprobeError
from varprobe.theory.layer_fans import is_linear_map
from varprobe.theory.weights import prelu_slopes

AS_IS = "as-is"
WEIGHT_STREAM = 1  # keeps the weight draws independent of the input draws of one seed


def check_scheme(name: str | None) -> str | None:
    """The scheme name, None for "as-is"; a VarprobeError listing the valid ones."""
    if name is None or name == AS_IS:
        return None
    if name not in theory.SCHEMES:
        raise VarprobeError(f"unknown init scheme {name!r}; valid: "
                            f"{', '.join(theory.SCHEMES)} (or {AS_IS})")
    return name


def check_compare(names: str | Iterable[str] | None) -> tuple[str, ...]:
    """``probe(compare=...)``: the schemes named ("all": every one); a VarprobeError
    listing the valid ones."""
    if names is None:
        return ()
    if isinstance(names, str):
        names = theory.SCHEMES if names == "all" else (names,)
    names = tuple(dict.fromkeys(names))
    bad = [n for n in names if n not in theory.SCHEMES]
    if bad:
        raise VarprobeError(f"unknown init scheme(s) to compare: {', '.join(map(repr, bad))}; "
                            f"valid: {', '.join(theory.SCHEMES)} (or all)")
    return names


def reinitialized(model: nn.Module, scheme: str, seed: int) -> nn.Module:
    """A deep copy of ``model`` with its weight layers drawn from ``scheme``.

    Draws come from a torch.Generator seeded from ``seed`` (and a stream number, so
    that they share no numbers with the seed's inputs): reproducible, and the global
    RNG is untouched. The PReLU slope of he-prelu is read in registration order.
    """
    computed = [name for name, m in model.named_modules() if _computed_weight(m)]
    if computed:  # copying into a weight that is recomputed at each call changes nothing
        raise VarprobeError(
            f"--init cannot re-draw a computed weight (weight_norm, spectral_norm or "
            f"another parametrization) at {', '.join(computed[:3])}"
            f"{f' and {len(computed) - 3} more' if len(computed) > 3 else ''}; "
            "initialize the underlying parameters in the model file, or probe as it is")
    clone = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(_stream_seed(seed))
    modules = [m for m in clone.modules() if next(m.children(), None) is None]
    with torch.no_grad():
        for module, a in zip(modules, prelu_slopes(modules)):
            if is_linear_map(module):  # the layers whose scheme columns assume the scheme
                _draw(module, scheme, a, generator)
    return clone


def _computed_weight(module: nn.Module) -> bool:
    """A weight computed from other parameters at each call: a parametrization, or the
    old-style weight_norm / spectral_norm hooks."""
    if parametrize.is_parametrized(module, "weight"):
        return True
    return any(type(hook).__name__ in ("WeightNorm", "SpectralNorm")
               for hook in module._forward_pre_hooks.values())


def _draw(module: nn.Module, scheme: str, a: float, generator: torch.Generator) -> None:
    fan_in, fan_out = (theory.torch_fans(module) if scheme == "torch-default"
                       else theory.fans(module))
    var = theory.scheme_variance(scheme, fan_in, fan_out, a)
    weight = module.weight
    sample = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
    weight.copy_(sample * math.sqrt(var))
    if module.bias is None:
        return
    b2 = theory.scheme_bias_variance(scheme, module)
    if b2 == 0:
        module.bias.zero_()
        return
    bound = math.sqrt(3 * b2)  # torch-default's U(-1/sqrt(n), 1/sqrt(n))
    sample = torch.rand(module.bias.shape, generator=generator, dtype=torch.float64)
    module.bias.copy_((2 * sample - 1) * bound)


def _stream_seed(seed: int) -> int:
    entropy = [seed & (2**64 - 1), WEIGHT_STREAM]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) & (2**63 - 1)
