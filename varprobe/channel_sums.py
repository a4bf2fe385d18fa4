"""Per-channel sum and sum of squares of a tensor, for what the recording measures per
channel (theory.normshape: a BatchNorm's input channels).

torch reduces a (N, C, H, W) tensor over dims (0, 2, 3) in strides across memory: its
norm over those dims reads at ~1.5 ns an element on one CPU thread, which made these
sums cost a third of a ResNet-50's recording. Laid out as (before, C, after) in memory,
each (n, c) row is contiguous: numba's kernel (``kernels.channel_sums``) reads every
element once, torch's row reductions twice; the rows are added in float64.

While a recording keeps them (``keep``), an activation with channels is read per channel
(``kept_read``: its moments are those sums added up) and the sums are kept, so that the
BatchNorm it feeds (``recall``) does not read it again.
"""

from __future__ import annotations

import contextvars
import math
import weakref

import numpy as np
import torch

from varprobe import kernel_choice, stats

# tensor key -> (weak reference to the tensor, s1, s2); None: nothing is kept
_KEPT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("channel_sums",
                                                                    default=None)


def keep() -> contextvars.Token:
    """Keep each ``kept_read``'s sums until ``release`` (a recording with BatchNorms)."""
    return _KEPT.set({})


def release(token: contextvars.Token) -> None:
    _KEPT.reset(token)


def kept_read(t: torch.Tensor) -> tuple[float, float] | None:
    """(sum, sum of squares) of ``t``, a dense CPU tensor with channels on dim 1, from
    its per-channel sums, which are kept for ``recall``; None where nothing is kept or
    ``t`` is not such a tensor. The read costs about a flat one's, more on small maps
    (7x7: up to 4x), which the BatchNorm's own read would cost."""
    kept, x = _KEPT.get(), t.detach()
    if kept is None or x.dim() < 3 or stats.kernel_array(x) is None:
        return None
    s1, s2 = channel_sums(x, 1)
    kept[_key(t)] = (weakref.ref(t), s1, s2)
    return float(s1.sum()), float(s2.sum())


def recall(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The per-channel sums kept of the memory ``x`` views, while the tensor they were
    read from is alive (its memory not reused) and unwritten (the version counter is
    shared by views); else None. Taken, not kept on to the end of the pass: the
    BatchNorm that reads them is the one reader (another would read ``x`` again)."""
    kept = _KEPT.get()
    found = kept.pop(_key(x), None) if kept else None
    if found is None or found[0]() is None:
        return None
    return found[1], found[2]


def _key(x: torch.Tensor) -> tuple:
    return x.data_ptr(), x.shape, x.stride(), x.dtype, x.device, x._version


def channel_sums(x: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over everything but ``dim``, the same of x^2): two float64 vectors on x's
    device, no sync."""
    found = stats.kernel_array(x)
    if found is None:  # another device, or memory that is not dense: torch's reductions
        dims = [d for d in range(x.dim()) if d != dim]
        return (x.sum(dim=dims).double(),
                torch.linalg.vector_norm(x, dim=dims).double().square())
    array, order = found
    at = order.index(dim % x.dim())
    shape = (math.prod(array.shape[:at]), array.shape[at], math.prod(array.shape[at + 1:]))
    k = kernel_choice.cpu_kernels()
    if hasattr(k, "channel_sums") and shape[2] > 1:
        s1, s2 = np.zeros(shape[1]), np.zeros(shape[1])
        k.channel_sums(array.reshape(shape), array.dtype.type(0), s1, s2)
        return torch.from_numpy(s1), torch.from_numpy(s2)
    rows = torch.from_numpy(array).view(shape)
    if shape[2] == 1:  # channels innermost: column sums over the rows before them
        rows = rows[..., 0]
        return (rows.sum(0).double(),
                torch.linalg.vector_norm(rows, dim=0).double().square())
    return (rows.sum(-1).double().sum(0),
            torch.linalg.vector_norm(rows, dim=-1).double().square().sum(0))
