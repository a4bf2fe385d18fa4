"""How a mean every input element shares reaches a layer's outputs, through its actual
weights.

Output unit o of a Linear or convolution gets a common input mean mu as mu S_o(p), S_o(p)
the sum of its weights over the taps that touch real input at position p (zero padding
hides the rest at the borders). The closed forms take the square of that sum at its
expectation for independent zero-mean draws, n_eff E[w^2]; the actual weights'

    G = mean over o and p of S_o(p)^2

differs from it by a relative ~sqrt(2 / outputs) (45% on a 10-class head, 18% at 64
channels): after a rectifier, whose mean is a third of E[x^2], that is the largest error
of one step of the actual init's walk. With it comes B = mean over o and p of b_o S_o(p),
the bias's cross term 2 mu B with the mean. G feeds the rules as the row share
G / (n_eff E[w^2]) (theory.weights).

The probe sums each unit's weights per tap on the device, in float32 (a float64 sum
costs ten times the read). Where every tap lands on real input at every position (a
Linear, an unpadded conv) G and B are two more numbers of the pass's one transfer; a
zero-padded conv's tap sums (outputs x taps) come to the host, where the output
positions, grouped by which taps they see along each axis, weigh each group's sums.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from varprobe import stats
from varprobe.theory.layer_fans import _is_conv1d
from varprobe.transfer import Pending

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def tap_sums(module: nn.Module, w: torch.Tensor | None, x: object) -> torch.Tensor | None:
    """Each output unit's weights summed per tap, [outputs, taps], of a Linear,
    transformers' Conv1D or (not transposed) convolution called on ``x``, ``w`` the
    weight it multiplies by; None for other modules and weights without values (meta,
    complex, not float). Their total is ``w``'s sum, which its moments can take from
    here rather than from a read of their own (``stats.weight``)."""
    conv1d = w is not None and w.dim() == 2 and _is_conv1d(module)  # GPT-2's: W (in, out)
    if not conv1d and not isinstance(module, (nn.Linear, *_CONVS)) or w is None \
            or w.is_meta or w.is_complex() or not w.is_floating_point() \
            or not isinstance(x, torch.Tensor) or w.dim() < 2 or w.numel() == 0:
        return None
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32  # half's in fp32
    if conv1d:
        return w.detach().sum(0, dtype=dtype)[:, None]
    return w.detach().reshape(w.shape[0], w.shape[1], -1).sum(1, dtype=dtype)


def total(taps: torch.Tensor | None) -> float | None:
    """The weight's sum from its ``tap_sums``, where reading it costs no device sync."""
    if taps is None or not stats.reads_are_free(taps.device):
        return None
    return float(taps.sum(dtype=torch.float64))


def measure(module: nn.Module, w: torch.Tensor | None, bias: torch.Tensor | None,
            x: object, taps: torch.Tensor | None = None) -> Pending | None:
    """[G, B] of a module ``tap_sums`` reads (``taps``: its result, where already
    made); None for other modules and a conv whose attributes do not fit its input (it
    pads on its own)."""
    if taps is None:
        taps = tap_sums(module, w, x)
    if taps is None:
        return None
    out, kernel = taps.shape[0], (() if w.dim() == 2 else tuple(w.shape[2:]))
    b = bias.detach().reshape(out, 1).to(taps.dtype) if isinstance(bias, torch.Tensor) \
        and bias.numel() == out and not bias.is_meta else None
    groups = _groups(module, tuple(x.shape[-len(kernel):])) if kernel else None
    if groups is None or groups == _WHOLE:  # every tap always lands: one group
        sums = taps.sum(1).double()
        both = torch.stack([sums, b[:, 0].double()]) if b is not None else sums[None]
        return Pending(both @ sums / out, lambda r: [r[0], r[1] if len(r) > 1 else 0.0])
    if groups == _UNFIT:
        return None
    raw = torch.cat([taps.flatten()] + ([b.flatten()] if b is not None else [])).double()
    n, biased = taps.numel(), b is not None

    def finish(r: list[float]) -> list[float | None]:
        values = np.asarray(r, dtype=np.float64)
        bias_values = values[n:] if biased else np.zeros(out)
        return list(_weighed(values[:n].reshape(out, *kernel), bias_values, groups))

    if stats.reads_are_free(raw.device):  # the row now: no tensor held until the transfer
        return Pending(finish(raw.numpy()), list)
    return Pending(raw, finish)


_WHOLE, _UNFIT = "whole", "unfit"


def _weighed(s: np.ndarray, b: np.ndarray, groups: tuple) -> tuple[float, float]:
    """(G, B) from the tap sums ``s`` [outputs, *kernel] and the groups of output
    positions per axis: (the first tap seen, one past the last, how many positions).
    Each axis's groups become 0/1 rows over its taps, contracted with ``s`` in turn:
    the sums of every group of positions at once, weighed by how many it holds."""
    rows, weight = _rows(groups, s.shape[1:])
    with np.errstate(all="ignore"):  # a non-finite weight: NaN, as torch's sums give it
        if len(rows) == 2:  # a 2-d kernel: (groups_h x kh) @ s @ (kw x groups_w), per unit
            s = rows[0] @ s @ rows[1].T
        else:
            for r in rows:
                s = np.tensordot(s, r, axes=([1], [1]))  # its groups last, the next axis
        flat = s.reshape(len(s), -1)
        return (float(np.mean(flat * flat, axis=0) @ weight),
                float((b @ flat) @ weight) / len(b))


@functools.lru_cache(maxsize=1024)
def _rows(groups: tuple, kernel: tuple) -> tuple[list[np.ndarray], np.ndarray]:
    """Per axis, a group's 0/1 row over the taps; the groups' shares of the positions."""
    rows, weight = [], np.ones(())
    for axis, k in zip(groups, kernel):
        r = np.zeros((len(axis), k))
        for g, (lo, hi, _) in enumerate(axis):
            r[g, lo:hi] = 1.0
        rows.append(r)
        weight = np.multiply.outer(weight, np.array([n for _, _, n in axis], dtype=float))
    return rows, (weight / weight.sum()).reshape(-1)


def _groups(module: nn.Module, spatial: tuple) -> tuple | str:
    """Per axis, the output positions grouped by the contiguous range of taps that land
    on the input: ((first, end, positions), ...); ``_WHOLE`` where every tap does
    everywhere, ``_UNFIT`` where the attributes do not fit the input."""
    if not isinstance(module, _CONVS) or module.padding_mode != "zeros":
        return _WHOLE
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            return _WHOLE
        padding = tuple((d * (k - 1)) // 2 for d, k in zip(module.dilation, module.kernel_size))
    if len(spatial) != len(module.kernel_size) or all(p == 0 for p in padding):
        return _WHOLE
    axes = tuple(_axis(*args) for args in zip(spatial, module.kernel_size, module.stride,
                                               padding, module.dilation))
    if any(a is None for a in axes):
        return _UNFIT
    return axes


@functools.lru_cache(maxsize=1024)
def _axis(size: int, k: int, stride: int, pad: int, dilation: int) -> tuple | None:
    """One axis's groups: output j's taps t land at j stride - pad + t dilation."""
    outputs = (size + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    if outputs <= 0:
        return None
    counts: dict[tuple[int, int], int] = {}
    for j in range(outputs):
        valid = [t for t in range(k) if 0 <= j * stride - pad + t * dilation < size]
        key = (valid[0], valid[-1] + 1) if valid else (0, 0)
        counts[key] = counts.get(key, 0) + 1
    return tuple((lo, hi, n) for (lo, hi), n in counts.items())
