"""A feature norm's tokens, measured: the per-token scale that one number per tensor
misses in the backward.

LayerNorm and RMSNorm divide each token by its own scale rho_t (the variance across
features, or the second moment), so the gradient at the input is, per token,
E[dx_t^2] = mean(gamma^2) G_t / (rho_t + eps) with G_t = E[dy_t^2] the gradient at the
output (the projection that removes the normalized direction costs 1/d). The walk's
rule (theory.norms.backward) takes mean(gamma^2) E[G] / (E[rho] + eps): exact when the
tokens share one scale, or when a token's scale and its gradient are unrelated and the
scales spread little. Neither holds where causal attention writes the residual stream:
an early token's attention output averages few values, so its rho_t is large, and the
value path sends the early keys the large gradients (every later query reads them), so
G_t is large exactly where 1/rho_t is small. On the 4-block Llama of the bench (residual
stream std 0.02, o_proj at the same std) E[rho_t] falls 2.6x from the first position
to the last and G_t 10^4x, and the rule puts the stream's gradient 2x over the truth at
the second block's input norm (from E[G]/E[rho] 74.6, from mean_t G_t/rho_t 35.1).

A GroupNorm divides each sample's group of channels by its own variance the same way,
and where channels of different scales meet in a group (a UNet's skip connection
concatenated to the upsampled path) the groups' variances spread widely: at the first
up-block of the corpus's diffusers UNet E[1/rho] E[rho] = 2.0, and the rule's gradient
there is half the truth. Its units here are (sample, group) where a LayerNorm's are
tokens.

So at each such call the probe measures, on the device and in the pass's one transfer,
kappa = mean_t(G_t / (rho_t + eps)) (E[rho] + eps) / E[G], the ratio of the exact gain
to the rule's (1 where the tokens are alike): the forward keeps 1/(rho_t + eps) per token,
and a hook on the output's gradient fills the slot in the backward. The walk multiplies
its rule by kappa; the scale stays its own. ``varprobe predict`` measures nothing and
keeps the rule.
"""

from __future__ import annotations

import torch
from torch import nn

from varprobe import transfer
from varprobe.theory import norms
from varprobe.theory.constants import awaiting, deferred

T = torch.Tensor
# Elements a GroupNorm's group must hold for its measured spread: in a group of a few
# rectified features the near-zero scales are the groups the rectifier's mask zeroes
# anyway, whose 1/rho the mean would count (GroupNorm(8) on 64 ReLU features: the
# gradient predicted 77x over).
GROUP = 64


def wanted(module: nn.Module, x: object) -> bool:
    """LayerNorm and RMSNorm (torch's, and those of other code told by name) over at
    least two tokens whose normalized dims are known (``_channels_first``), torch's
    GroupNorm on its channels (dim 1), on a float input with values that will get a
    gradient."""
    if not (isinstance(x, T) and x.is_floating_point() and not x.is_meta
            and x.requires_grad and x.dim() >= 2):
        return False
    if isinstance(module, nn.GroupNorm):  # a few elements a group: see GROUP
        return x.shape[1] == module.num_channels and \
            x[0].numel() // module.num_groups >= GROUP
    return (x.numel() > x.shape[-1] and norms.is_norm(module)
            and not isinstance(module, norms.BATCH_NORMS)
            and "GroupNorm" not in type(module).__name__
            and _channels_first(module, x) is not None)


def _channels_first(module: nn.Module, x: T) -> bool | None:
    """Where a norm's dims lie in its input: False where the input ends in them (its
    ``normalized_shape``, else its weight's shape; the last dim where neither is
    known), True where a one-dim norm's size is dim 1 instead (a subclass whose forward
    permutes first: ConvNeXt's LayerNorm2d over the channels of NCHW), None else."""
    shape = norms.normalized_shape(module) or tuple(x.shape[-1:])
    if tuple(x.shape[x.dim() - len(shape):]) == shape:
        return False
    return True if len(shape) == 1 and x.dim() > 2 and x.shape[1] == shape[0] else None


def measure(module: nn.Module, x: T) -> tuple[T, T, bool]:
    """(1/(rho_t + eps) per token, in float32; E[rho] + eps as a float64 scalar; whether
    the norm's dim is dim 1), no sync. rho_t over the normalized dims (LayerNorm's
    normalized_shape, the last ones or the channels; a GroupNorm's group of channels
    and the positions)."""
    dims = tuple(range(-len(getattr(module, "normalized_shape", (0,))), 0))
    with torch.no_grad():
        x = x.detach()
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        first = not isinstance(module, nn.GroupNorm) and bool(_channels_first(module, x))
        if isinstance(module, nn.GroupNorm):
            x, dims = x.reshape(x.shape[0], module.num_groups, -1), (-1,)
        elif first:
            dims = (1,)
        rho = x.square().mean(dims) if norms._is_rms(module) else _variance(x, dims)
        eps = norms.eps_of(module)
        return (1 / (rho + eps)).float(), rho.mean(dtype=torch.float64) + eps, first


def _variance(x: T, dims: tuple[int, ...]) -> T:
    """The biased variance over ``dims``, by the mean of the centred squares: two
    vector passes where torch's ``var`` over a short last dim runs a per-row loop
    (3.5 against 0.26 ms for 8 x 256 tokens of 256 features on one CPU thread)."""
    centred = x - x.mean(dims, keepdim=True)
    return centred.square_().mean(dims)


def watch(out: object, inverse: T, mean_scale: T, first: bool = False) -> list:
    """One constant the backward fills with (kappa, 1), ``constants.deferred``: the hook's
    means go through the pass's one transfer and kappa is made on the host ((0, 0)
    where the hook never runs); none where no gradient will come. ``first``: the
    tokens' features are dim 1 of the output (``_channels_first``)."""
    if not isinstance(out, T) or out.is_meta or not out.requires_grad \
            or out.shape[:1] != inverse.shape[:1] or out.numel() % inverse.numel():
        return []
    found = awaiting(1)

    def fill(grad: T) -> None:
        with torch.no_grad():
            g = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
            squares = g.square()
            per_token = squares.mean(1) if first else squares.reshape(*inverse.shape,
                                                                      -1).mean(-1)
            found.raw = transfer.Parts([per_token.mean(dtype=torch.float64),
                                        (per_token * inverse).mean(dtype=torch.float64),
                                        mean_scale])
            found.finish = _kappa

    out.register_hook(fill)
    return deferred(found, 1)


def _kappa(r: list[float]) -> list[tuple[float, float]]:
    """(kappa, 1) from mean_t G_t, mean_t G_t/(rho_t + eps) and E[rho] + eps; 1 where no
    gradient reached the output (or it is not finite)."""
    total, weighted, mean_scale = r
    return [(weighted * mean_scale / max(total, 1e-300) if total > 0 else 1.0, 1.0,
             mean_scale)]


def enter(rec, index: int, module: nn.Module, x: object) -> None:
    """At a call's entry (theory.recording): its tokens' scales, kept till its exit."""
    if wanted(module, x):
        rec.token_scales[index] = measure(module, x)


def leave(rec, index: int, out: object) -> None:
    """At its exit: the slot the backward fills, among the recording's constants."""
    scales = rec.token_scales.pop(index, None)
    slots = watch(out, *scales) if scales is not None else []
    if slots:
        rec.token_norms[index] = len(rec._constants)
        rec._constants.extend(slots)


def gain(slot: tuple | None) -> float | None:
    """kappa, or None where the backward never filled the slot."""
    if slot is None or slot[1] < 0.5 or not slot[0] > 0:
        return None
    return float(slot[0])


def own_means(slot: tuple | None, module: nn.Module, stats) -> float:
    """The rule divides by the variance across all the features, E[x^2] - mu^2; a
    LayerNorm divides each token by its own, which is less where tokens have means of
    their own over their features (sinusoidal positions: an early position's low
    frequencies' cosines are all near 1; and 1/d of it for d independent features).
    The measured E[rho] over the input's measured E[x^2] - mu^2 (``stats``): the share
    of the variance a token's own mean leaves, which the walk applies at its own scale;
    1 for an RMS norm (no mean taken) or a GroupNorm (the rule counts its groups')."""
    if slot is None or len(slot) < 3 or isinstance(module, nn.GroupNorm) or \
            norms._is_rms(module) or stats is None or not stats.second_moment:
        return 1.0
    whole = stats.second_moment - (stats.mean or 0.0) ** 2
    rho = slot[2] - norms.eps_of(module)
    return min(max(rho / whole, 0.0), 1.0) if whole > 0 and rho == rho else 1.0
