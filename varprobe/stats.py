"""On-device reductions: one small float64 vector per tensor, never a host sync.

Every vector has the same length (``WIDTH``) so that all of them can be stacked and
copied to the host in a single transfer after the backward pass.

Speed and memory: ``torch.var_mean`` (Welford) runs at a tenth of memory speed on CPU,
and reductions with a ``dtype=`` argument first copy the whole tensor. So a tensor is
read in chunks of at most ``chunk_size`` elements: each chunk is shifted by the first
chunk's mean (no cancellation in E[x^2] - E[x]^2), reduced in float32 (upcast from
fp16/bf16 per chunk) with torch's pairwise sums, and the per-chunk sums are added in
float64. Scratch memory is one chunk, whatever the size of the activation.
"""

from __future__ import annotations

import torch

WIDTH = 8
# Forward slot layout.
MEAN, VAR, SECOND_MOMENT, ZERO_FRACTION, DEAD_FRACTION, NONFINITE, NUMEL = range(7)
# Gradient slot layout (reuses the first positions).
G_VAR, G_SECOND_MOMENT, G_NONFINITE, G_NUMEL = 0, 1, 2, 3
# Weight slot layout.
W_VAR, W_SECOND_MOMENT, B_SECOND_MOMENT, W_NORM = 0, 1, 2, 3


def chunk_size(device: torch.device) -> int:
    # 1 MiB of float32 scratch on CPU (as fast as bigger chunks: the passes over a chunk
    # stay in cache); accelerators pay per kernel launch, so bigger there.
    return 1 << 18 if device.type == "cpu" else 1 << 24


def _chunks(x: torch.Tensor) -> list[torch.Tensor]:
    """Views of ``x`` with at most about ``chunk_size`` elements each (no copy)."""
    size = chunk_size(x.device)
    if x.numel() <= size:
        return [x]
    if x.is_contiguous():
        return list(x.view(-1).split(size))
    rows = max(1, size // max(1, x[0].numel()))
    return list(x.split(rows))


def _sums(x: torch.Tensor, nonfinite: bool, zeros: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, [sum(x - shift), sum((x - shift)^2), non-finite count?, non-zero count?]).

    The shift is a float32 0-d tensor, the sums a float64 vector; each count only when
    asked for. A non-finite element makes the sum of squares non-finite, and on the CPU
    reading that sum costs no transfer: there the count is taken only when it is.
    """
    lazy = nonfinite and reads_are_free(x.device)
    shift, parts = None, []
    for chunk in _chunks(x.detach()):
        c = _float32(chunk)
        if shift is None:
            shift = c.mean()
        d = c - shift
        # Sums only: torch's sum is pairwise (cascaded); vector_norm's float32 is not.
        row = [d.sum(), d.square_().sum()]
        if nonfinite and not lazy:
            row.append(_nonfinite(c, d))
        if zeros:
            row.append(torch.ne(c, 0, out=d).sum())
        parts.append(torch.stack(row))
    total = torch.stack(parts).double().sum(0)
    if lazy:
        count = (torch.zeros((), dtype=torch.float64) if total[1].isfinite()
                 else sum(_nonfinite(c, torch.empty_like(c)).double()
                          for c in map(_float32, _chunks(x.detach()))))
        total = torch.cat([total[:2], count.view(1), total[2:]])
    return shift, total


def reads_are_free(device: torch.device) -> bool:
    """Whether looking at a result on the host costs no device sync."""
    return device.type == "cpu"


def _float32(chunk: torch.Tensor) -> torch.Tensor:
    return chunk.float() if chunk.dtype in (torch.float16, torch.bfloat16) else chunk


def _nonfinite(c: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Non-finite elements of ``c``: ``c - c`` is 0 where c is finite, NaN where not."""
    return torch.ne(torch.sub(c, c, out=scratch), 0, out=scratch).sum()


def _moments(x: torch.Tensor, nonfinite: bool = False, zeros: bool = False
             ) -> list[torch.Tensor]:
    """[mean, var, E[x^2], then the counts asked for], float64 0-d tensors."""
    n = x.numel()
    shift, s = _sums(x, nonfinite, zeros)
    offset = s[0] / n
    var = (s[1] / n - offset * offset).clamp_(min=0)
    mean = shift.double() + offset
    return [mean, var, var + mean * mean, *s[2:]]


def _pad(values: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    out = torch.zeros(WIDTH, dtype=torch.float64, device=device)
    out[: len(values)] = torch.stack([v.to(torch.float64) for v in values])
    return out


def _dead_fraction(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Share of units (indices along ``channel_dim``) that are zero everywhere.

    Max and min per unit: reductions without scratch memory, unlike ``ne(0).any``.
    """
    dims = [d for d in range(x.dim()) if d != channel_dim % x.dim()]
    hi, lo = torch.amax(x, dims), torch.amin(x, dims)
    return 1 - (hi.ne(0) | lo.ne(0)).double().mean()


def activation(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """mean, var, E[x^2], zero fraction, dead-unit fraction, non-finite count, numel.

    A unit is one index along ``channel_dim`` (a feature or a conv channel); it is dead
    when it is zero for every sample and position.
    """
    x = t.detach()
    n = x.numel()
    mean, var, m2, nonfinite, nonzero = _moments(x, nonfinite=True, zeros=True)
    if x.dim() >= 2:
        dead = _dead_fraction(x, channel_dim)
    else:
        dead = torch.full((), float("nan"), dtype=torch.float64, device=x.device)
    numel = torch.full((), float(n), dtype=torch.float64, device=x.device)
    return _pad([mean, var, m2, 1 - nonzero / n, dead, nonfinite, numel], x.device)


def gradient(g: torch.Tensor) -> torch.Tensor:
    """var, E[g^2], non-finite count, numel of a gradient tensor."""
    _, var, m2, nonfinite = _moments(g, nonfinite=True)
    numel = torch.full((), float(g.numel()), dtype=torch.float64, device=g.device)
    return _pad([var, m2, nonfinite, numel], g.device)


def weight(w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Var[w], E[w^2], mean(b^2) (NaN without bias), ||w|| (= sqrt(numel * E[w^2]))."""
    _, var, m2 = _moments(w)
    if bias is not None:
        b2 = _moments(bias)[2]
    else:
        b2 = torch.full((), float("nan"), dtype=torch.float64, device=w.device)
    return _pad([var, m2, b2, (m2 * w.numel()).sqrt()], w.device)


def grad_ratio(grad: torch.Tensor, w_norm: torch.Tensor) -> torch.Tensor:
    """||dL/dW|| / ||W||, in slot 0. A norm needs no shift: sum the squares directly."""
    parts = [c.float().square().sum() for c in _chunks(grad.detach())]
    norm = torch.stack(parts).double().sum().sqrt()
    return _pad([norm / w_norm.to(torch.float64)], grad.device)
