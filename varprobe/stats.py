"""On-device reductions: a few raw values per tensor, finished on the host after one copy.

Each measurement is a ``transfer.Pending``: a tensor's mean and variance and the counts
asked for (host floats where the CPU kernels made them, else values still on the
tensor's device) and a function that turns them into the row the report reads (the
layouts below). ``transfer.collect`` copies every value still on a device in a single
transfer; the rest is float64 arithmetic on the host.

CPU: a dense float32/float64 tensor is read by ``kernels`` (numba, the optional ``fast``
extra: sum, sum of squares and unit counts in one read) or else ``torch_kernels`` (torch
has no one-read reduction of both sums; ``var_mean`` runs at a tenth of memory speed).
Where the mean dominates (mean^2 > Var) the sums are taken again from ``x - mean``.
Accelerators must not sync, and there each operation costs a launch, so a tensor is
read by as few as will do: a float64 copy and ``var_mean`` (one pass, in float64: neither
cancellation nor squares outside float32's range), counts by ``count_nonzero``, weight
gradients' norms by one ``torch._foreach_norm``; a tensor longer than a chunk the same
way a chunk at a time through float64 scratch, the chunks' moments combined on the
host. The CPU reads fp16/bf16 tensors and memory that is not dense that way too.
Squares outside float32's range are read in float64 on every path.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

from varprobe import unit_counts
from varprobe.kernel_choice import cpu_kernels
from varprobe.transfer import Folded as Folded
from varprobe.transfer import Parts as Parts
from varprobe.transfer import Pending as Pending
from varprobe.transfer import Raw as Raw
from varprobe.transfer import collect as collect
from varprobe.transfer import device_items, read_free, values

WIDTH = 8
# Forward row layout.
MEAN, VAR, SECOND_MOMENT, ZERO_FRACTION, DEAD_FRACTION, NONFINITE, NUMEL = range(7)
# Gradient row layout (reuses the first positions).
G_VAR, G_SECOND_MOMENT, G_NONFINITE, G_NUMEL = 0, 1, 2, 3
# Weight row layout.
W_VAR, W_SECOND_MOMENT, B_SECOND_MOMENT, W_NORM, B_MEAN = 0, 1, 2, 3, 4

FEW = 1 << 15  # elements up to which a CPU tensor's unit counts are numpy's (_units)


def _join(parts: list[Raw]) -> Raw:
    """Raw values one after another: host floats where all are on the host or on a
    device whose reads are free, else ``Parts`` (no torch.cat: ``collect`` makes one)."""
    items = [item for p in parts for item in (p if isinstance(p, list) else [p])]
    if all(reads_are_free(t.device) for t in device_items(Parts(items))):
        return values(Parts(items), read_free)
    return Parts(items)


def chunk_size(device: torch.device) -> int:
    # 2 MiB of float64 scratch on CPU (the passes over a chunk stay in cache);
    # accelerators pay per kernel launch, so bigger there, 8 MiB: a read's scratch
    # adds to the model's peak memory where a hook runs at its peak (64 MiB made a
    # GPT's 1.68x on an H200)
    return 1 << 18 if device.type == "cpu" else 1 << 20


def _wide(device: torch.device) -> bool:
    """Whether the device has float64 (MPS has not): there the shifted copy is float64,
    whose squares neither underflow (float32's do below |x| ~ 1e-19, reading a tensor of
    tiny values as 0) nor overflow."""
    return device.type != "mps"


def reads_are_free(device: torch.device) -> bool:
    """Whether looking at a result on the host costs no device sync."""
    return device.type == "cpu"


# --- reading a tensor ---------------------------------------------------------------

def _in_memory_order(x: torch.Tensor) -> tuple[torch.Tensor, list[int]] | None:
    """``x`` permuted so that its dims run in memory order, and that order, when its
    memory is dense (sums do not care about order), else None."""
    if x.is_contiguous():
        return x, list(range(x.dim()))
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    y = x.permute(order)
    return (y, order) if y.is_contiguous() else None


def _dense(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as a flat view when its memory is dense in some order of its dims."""
    found = _in_memory_order(x)
    return found[0].reshape(-1) if found is not None else None


def _sums(x: torch.Tensor, nonfinite: bool, read: tuple[float, float] | None = None) -> Raw:
    """float64 [mean, var, then the non-finite count if asked for]; ``read``: (sum, sum
    of squares) of a CPU ``x`` read elsewhere."""
    found = kernel_array(x)
    if found is None:
        return _device_moments(x, nonfinite)
    flat = found[0].reshape(-1)
    return _finish_cpu_sums(x, flat, read if read is not None else _moment_read(flat),
                            nonfinite)


# (list, sample, rows) while the range reads are asked for: ``extremes_read``, or set
# and reset directly by the recorder's hooks, once per tensor, where a context
# manager's own calls (a generator, enter, exit) are a share of the hook's cost.
EXTREMES: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("extremes",
                                                                        default=None)


@contextlib.contextmanager
def extremes_read(sample: Callable[[int], np.ndarray | None],
                  rows: tuple[int, int] | Callable[[], np.ndarray]) -> Iterator[list]:
    """Within it, the first float32 array the CPU moment kernel reads also gets, from
    that read, what the range statistics (``exponents``) take of it: its extremes and
    the histogram rows (shape ``rows``, or zeroed ones from ``rows()``) of its elements
    at ``sample(n)`` (sorted indices; None: no sample), appended to the yielded list as
    (n, bits of the largest |x|, bits of the smallest non-zero |x| minus one, rows or
    None). Empty where no such read happened (a cached gradient, torch's sums)."""
    found: list = []
    token = EXTREMES.set((found, sample, rows))
    try:
        yield found
    finally:
        EXTREMES.reset(token)


_NO_SAMPLE = np.zeros(0, dtype=np.int64)


def _moment_read(flat: np.ndarray) -> tuple[float, float]:
    """(sum, sum of squares) of ``flat`` by the CPU kernels, with the range reads where
    ``extremes_read`` asks for them."""
    k, zero = cpu_kernels(), flat.dtype.type(0)
    reads = _range_reads(flat, "sums_extremes")
    if reads is None:
        return k.sums(flat, zero, zero)
    s1, s2, top, low = k.sums_extremes(flat, flat.view(np.int32), zero, zero, *reads[1:3])
    _found(reads, flat.size, top, low)
    return s1, s2


def _range_reads(flat: np.ndarray, kernel: str) -> tuple | None:
    """Where ``extremes_read`` asks the CPU moment read of float32 ``flat`` (by
    ``kernel``) for the range reads: (the list to append to, the sorted sample indices,
    the histogram rows, whether there is a sample); else None."""
    wanted = EXTREMES.get()
    if wanted is None or wanted[0] or flat.dtype != np.float32 \
            or not hasattr(cpu_kernels(), kernel):
        return None
    found, sample, shape = wanted
    idx = sample(flat.size)
    hist = shape() if callable(shape) else np.zeros(shape, dtype=np.int64)
    return found, _NO_SAMPLE if idx is None else idx, hist, idx is not None


def _found(reads: tuple, n: int, top, low) -> None:
    reads[0].append((n, int(top), int(low), reads[2] if reads[3] else None))


def kernel_array(x: torch.Tensor) -> tuple[np.ndarray, list[int]] | None:
    """``x``'s memory as a numpy array with its dims in memory order, and that order,
    when the CPU kernels can read it: a dense, non-empty float32/float64 CPU tensor."""
    if not reads_are_free(x.device) or x.dtype not in (torch.float32, torch.float64) \
            or x.numel() == 0 or x.is_neg():
        return None
    found = _in_memory_order(x)
    return (found[0].numpy(), found[1]) if found is not None else None


# A float32 read squares in float32: below |x| ~ 1e-19 a square underflows, and past
# ~1.8e19 it overflows. Above this mean square the underflowed ones weigh under 2^-26
# of the sum; below it (or where the squares overflowed and the sum did not) the sums
# are read again in float64.
SQUARE_FLOOR = 2.0 ** -100
WIDE_CHUNK = 1 << 16  # elements per float64 copy of that read (512 KiB)


def _narrow(flat: np.ndarray, s1: float, s2: float) -> bool:
    """Whether a CPU kernel's sum of squares of float32 ``flat`` left float32's range."""
    return flat.dtype == np.float32 and (
        s2 < SQUARE_FLOOR * flat.size or (math.isfinite(s1) and not math.isfinite(s2)))


def _wide_sums(flat: np.ndarray, shift: float = 0.0) -> tuple[float, float]:
    """(sum(d), sum(d^2)) in float64, d = flat - shift, a chunk at a time."""
    s1 = s2 = 0.0
    with np.errstate(all="ignore"):  # inf - inf: NaN, as the kernels give it
        for at in range(0, flat.size, WIDE_CHUNK):
            d = flat[at:at + WIDE_CHUNK].astype(np.float64)
            if shift:
                d -= shift
            s1 += float(d.sum())
            s2 += float(np.einsum("i,i->", d, d))
    return s1, s2


def _finish_cpu_sums(x: torch.Tensor, flat: np.ndarray, sums: tuple[float, float],
                     nonfinite: bool) -> list[float]:
    """The ``_sums`` vector from a kernel's (sum, sum of squares) of ``flat``: read again
    from ``flat - mean`` when mean^2 > Var, and non-finite elements counted only when a
    sum is non-finite (a non-finite element makes one so)."""
    s1, s2 = sums
    narrow = _narrow(flat, s1, s2)
    if narrow:
        s1, s2 = _wide_sums(flat)
    n, shift = flat.size, 0.0
    mean, m2 = s1 / n, s2 / n
    finite = math.isfinite(s1) and math.isfinite(s2)
    if finite and mean * mean > m2 - mean * mean:  # E[x^2] - E[x]^2 would cancel
        shift = flat.dtype.type(mean)
        s1, s2 = _wide_sums(flat, float(shift)) if narrow else \
            cpu_kernels().sums(flat, shift, flat.dtype.type(0))
    offset = s1 / n
    row = [float(shift) + offset, max(s2 / n - offset * offset, 0.0)]  # NaN stays NaN
    if nonfinite:
        row.append(0.0 if finite else _count_nonfinite(x))
    return row


def _count_nonfinite(x: torch.Tensor) -> float:
    """On the CPU: ``c - c`` is 0 where c is finite, NaN where not."""
    return float(sum(torch.count_nonzero(c - c).item() for c in _chunks(x)))


def _fit(scratch: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``c.numel()`` elements of scratch; a fresh buffer for a piece longer than a chunk
    (one row of a strided tensor can be)."""
    if c.numel() > scratch.numel():
        return torch.empty(c.numel(), dtype=scratch.dtype, device=scratch.device)
    return scratch[: c.numel()]


def _device_moments(x: torch.Tensor, nonfinite: bool) -> Raw:
    """[mean, var(, non-finite count)] without a sync, in four launches where ``x``
    fits a chunk: its float64 copy ``d`` (where the device has float64, ``_wide``;
    dense whatever ``x``'s strides), ``var_mean`` of it, then ``d - d`` in place, NaN
    exactly where ``x`` is not finite, and its non-zero count. A longer ``x`` the same
    way a chunk at a time through one scratch buffer, the chunks' moments combined on
    the host (``Folded``)."""
    dtype = torch.float64 if _wide(x.device) else torch.float32
    if not x.numel():
        return [0.0, 0.0, 0.0][:3 if nonfinite else 2]
    if x.numel() <= chunk_size(x.device):
        return Parts(_chunk_moments(x.to(dtype, copy=True), nonfinite))
    scratch = torch.empty(chunk_size(x.device), dtype=dtype, device=x.device)
    items, sizes = [], []
    for c in _chunks(x):
        items += _chunk_moments(_fit(scratch, c).view(c.shape).copy_(c), nonfinite)
        sizes.append(c.numel())
    return Folded(items, lambda v: _combined(v, sizes, nonfinite))


def _chunk_moments(d: torch.Tensor, nonfinite: bool) -> list[torch.Tensor]:
    """[mean, var(, non-finite count)] of ``d``, a copy this may overwrite."""
    var, mean = torch.var_mean(d, correction=0)
    if not nonfinite:
        return [mean, var]
    return [mean, var, torch.count_nonzero(torch.sub(d, d, out=d))]


def _chunks(x: torch.Tensor) -> list[torch.Tensor]:
    """Views of ``x`` of at most about ``chunk_size`` elements: of its memory where it
    is dense, else runs of its first dim (one of which can be longer)."""
    size, flat = chunk_size(x.device), _dense(x)
    if flat is not None:
        return list(flat.split(size))
    return list(x.split(max(1, size // max(1, x[0].numel()))))


def _combined(v: list[float], sizes: list[int], nonfinite: bool) -> list[float]:
    """[mean, var(, non-finite count)] of the whole from its chunks' (``_chunk_moments``
    values in a row, ``sizes`` elements each): the pooled mean, and the chunks'
    variances plus their means' spread about it (no cancellation)."""
    step, n = 3 if nonfinite else 2, sum(sizes)
    means, variances = v[0::step], v[1::step]
    mean = sum(k * m for k, m in zip(sizes, means)) / n
    var = sum(k * (s + (m - mean) ** 2) for k, s, m in zip(sizes, variances, means)) / n
    return [mean, var] + ([sum(v[2::step])] if nonfinite else [])


def _sums_and_units(x: torch.Tensor, channel_dim: int) -> Raw:
    """``_sums`` with the non-finite count, then ``_units``; with numba in one read."""
    found = kernel_array(x)
    if found is None:
        return _join([_sums(x, nonfinite=True), _units(x, channel_dim)])
    if not hasattr(cpu_kernels(), "unit_sums_first"):  # torch's sums: the array as found
        flat = found[0].reshape(-1)
        return _finish_cpu_sums(x, flat, _moment_read(flat), nonfinite=True) + _units(
            x, channel_dim, found)
    array = found[0]
    shape = _unit_layout(found, channel_dim, x.dim())
    nonzero = np.zeros(shape[1], dtype=np.int64)
    zero, k, flat = array.dtype.type(0), cpu_kernels(), array.reshape(-1)
    units = array.reshape(shape[:2] if shape[2] == 1 else shape)
    last = shape[2] == 1  # units innermost: a Linear's features
    reads = _range_reads(flat, "unit_sums_last_extremes")
    if reads is not None:  # the range reads in the same read (``extremes_read``)
        fused = k.unit_sums_last_extremes if last else k.unit_sums_first_extremes
        *sums, top, low = fused(units, flat.view(np.int32), zero, nonzero, *reads[1:3])
        _found(reads, flat.size, top, low)
    else:
        sums = (k.unit_sums_last if last else k.unit_sums_first)(units, zero, nonzero)
    alive = np.count_nonzero(nonzero) if x.dim() >= 2 else 0
    return _finish_cpu_sums(x, flat, sums, nonfinite=True) + [
        float(array.size - nonzero.sum()), float(alive)]


def _unit_layout(found: tuple[np.ndarray, list[int]], channel_dim: int,
                 dims: int) -> tuple[int, int, int]:
    """(before the units, units, after them) in the memory of ``kernel_array``'s
    ``found``."""
    array, order = found
    if dims < 2:
        return (1, 1, array.size)
    at = order.index(channel_dim % dims)
    return math.prod(array.shape[:at]), array.shape[at], math.prod(array.shape[at + 1:])


def _units(x: torch.Tensor, channel_dim: int, found: tuple | None = None) -> Raw:
    """float64 [zero elements, units alive]; a unit (an index along ``channel_dim``) is
    dead when zero for every sample and position. A dense CPU tensor's as a host list
    from one read: numpy's up to ``FEW`` elements (dispatch outweighs the read), else
    ``unit_counts``'; elsewhere the compare pass and per-unit max and min. ``found``:
    ``kernel_array(x)`` where already made."""
    host = reads_are_free(x.device)
    if found is None or x.dim() < 2:
        found = kernel_array(x) if host and x.dim() >= 2 else None
    if found is not None:  # both counts from one read (numpy's, or unit_counts)
        layout = _unit_layout(found, channel_dim, x.dim())
        if x.numel() <= FEW:
            live = found[0].reshape(layout) != 0
            return [float(live.size - np.count_nonzero(live)),
                    float(np.count_nonzero(live.any(axis=(0, 2))))]
        made = unit_counts.counts(torch.from_numpy(found[0]).view(layout))
        if made is not None:
            return list(made)
    units, n = x.dim() >= 2, x.numel()
    if not host and units and n <= chunk_size(x.device):
        # three launches: per-unit non-zero counts (a bool copy of x, a quarter of its
        # float32 bytes at most a chunk's), their total and the units alive; the zeros
        # on the host
        at = channel_dim % x.dim()
        per_unit = torch.count_nonzero(x, dim=[d for d in range(x.dim()) if d != at])
        return Folded([per_unit.sum(), torch.count_nonzero(per_unit)],
                      lambda v: [n - v[0], v[1]])
    # the non-zeros a chunk at a time (a bool copy of each), units alive by their peaks
    counts = [torch.count_nonzero(c) for c in _chunks(x)] if n else []
    alive = torch.count_nonzero(_unit_peaks(x, channel_dim)) if units else 0.0
    found = Folded([*counts, alive], lambda v: [n - sum(v[:-1]), v[-1]])
    return values(found, read_free) if host else found


def _unit_peaks(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """max(hi, -lo) per unit, hi and lo its max and min: 0 only if both are."""
    c = channel_dim % x.dim()
    if x.is_contiguous() and c < x.dim() - 1:  # (before, units, after), inner along memory
        v = x.reshape(math.prod(x.shape[:c]), x.shape[c], -1)
        hi, lo = v.amax(2).amax(0), v.amin(2).amin(0)
    else:
        dims = [d for d in range(x.dim()) if d != c]
        hi, lo = torch.amax(x, dims), torch.amin(x, dims)
    return torch.maximum(hi, lo.neg_())


# --- host rows ------------------------------------------------------------------------

def _moments(r: list[float]) -> tuple[float, float, float]:
    """(mean, var, E[x^2]) from [mean, var]."""
    mean, var = r[0], r[1]
    return mean, var, var + mean * mean


def activation(t: torch.Tensor, channel_dim: int, units: bool = True,
               read: tuple[float, float] | None = None) -> Pending:
    """mean, var, E[x^2], zero fraction, dead-unit fraction, non-finite count, numel.

    With ``units=False`` the zero and dead-unit fractions are not measured (None): they
    say something only where an activation can zero a unit, and off the CPU they cost
    more passes.
    A unit is one index along ``channel_dim`` (a feature or a conv channel); the dead
    fraction is NaN for a tensor with fewer than two dims. ``read``: see ``_sums``.
    """
    x = t.detach()
    n = x.numel()
    count = x.shape[channel_dim] if units and x.dim() >= 2 else 0
    raw = _sums_and_units(x, channel_dim) if units else _sums(x, True, read)

    def finish(r: list[float]) -> list[float | None]:
        mean, var, m2 = _moments(r)
        zero = dead = None
        if units:
            zero = r[3] / n if n else float("nan")
            dead = 1 - r[4] / count if count else float("nan")
        return [mean, var, m2, zero, dead, r[2], float(n)]

    return Pending(raw, finish)


def gradient(g: torch.Tensor) -> Pending:
    """var, E[g^2], non-finite count, numel of a gradient tensor."""
    n = g.numel()

    def finish(r: list[float]) -> list[float | None]:
        _, var, m2 = _moments(r)
        return [var, m2, r[2], float(n)]

    return Pending(_sums(g.detach(), nonfinite=True), finish)


def weight(w: torch.Tensor, bias: torch.Tensor | None, total: float | None = None) -> Pending:
    """Var[w], E[w^2], mean(b^2) (NaN without bias), ||w|| (= sqrt(numel * E[w^2])),
    mean(b) (NaN without bias: the mean a bias gives every unit, which an activation
    after the layer sees). ``total``: w's sum where a read made it already (the mean
    gain's tap sums): torch's kernels then read w once, for its squares."""
    n, nb = w.numel(), bias.numel() if bias is not None else 0
    moments = _sums(w.detach(), False, _squares_beside(w, total))
    parts: list[Raw] = [moments]
    if bias is not None:
        parts.append(_bias_moments(bias.detach()))

    def finish(r: list[float]) -> list[float | None]:
        _, var, m2 = _moments(r)
        b1, _, b2 = _moments(r[2:4]) if nb else (math.nan, math.nan, math.nan)
        return [var, m2, b2, math.sqrt(n * m2), b1]

    return Pending(_join(parts), finish, moments)


def _squares_beside(w: torch.Tensor, total: float | None) -> tuple[float, float] | None:
    """(total, sum(w^2)): torch's kernels' one read, of the squares (numba's moment read
    takes both at once; the range reads ride on a moment read)."""
    k = cpu_kernels()
    found = kernel_array(w.detach()) if total is not None and hasattr(k, "square_sum") \
        and EXTREMES.get() is None else None
    return None if found is None else (total, k.square_sum(found[0].reshape(-1)))


def grad_ratio(grad: torch.Tensor, w: torch.Tensor, stats: Pending,
               norm: Raw | None = None) -> Pending:
    """||dL/dW|| / ||W||, ``stats`` being ``weight(w, ...)``. A norm needs no shift.
    ``norm``: ``weight_grad_norms``' for ``grad``, where it made one."""
    n = w.numel()

    def finish(r: list[float]) -> list[float | None]:
        _, _, m2 = _moments(r[1:3])
        norm = math.sqrt(n * m2)  # a zero weight: inf, or NaN for a zero gradient too
        return [r[0] / norm if norm else math.inf if r[0] else math.nan]

    found = norm if norm is not None else _norm(grad.detach())
    return Pending(_join([found, stats.moments]), finish)


def weight_grad_norms(grads: list[torch.Tensor]) -> list[Raw | None]:
    """The norms of dense weight gradients on an accelerator, those of one device and
    dtype by one ``torch._foreach_norm`` (its kernel squares and sums in float64: no
    copy, one launch for hundreds of tensors); None for the rest, each read on its own
    (``_norm``: the CPU's reads are free, and there the range reads share them)."""
    out: list[Raw | None] = [None] * len(grads)
    groups: dict[tuple, list[int]] = {}
    for i, g in enumerate(grads):
        if not reads_are_free(g.device) and _wide(g.device) and g.numel() \
                and g.is_floating_point() and g.is_contiguous():
            groups.setdefault((g.device, g.dtype), []).append(i)
    for found in groups.values():
        try:
            norms = torch._foreach_norm([grads[i] for i in found], 2, dtype=torch.float64)
        except TypeError:  # torch before 2.4 has no dtype there: one at a time, as unbatched
            continue
        for i, t in zip(found, norms):
            out[i] = Parts([t])
    return out


def _bias_moments(b: torch.Tensor) -> Raw:
    """[mean, var] of a bias; on the CPU its sum in float64 (a centred bias's mean is
    what rounding left)."""
    found = kernel_array(b)
    if found is None:
        return _device_moments(b, nonfinite=False)
    flat = found[0].reshape(-1)
    s2 = _moment_read(flat)[1]
    if _narrow(flat, 0.0, s2):
        s2 = _wide_sums(flat)[1]
    with np.errstate(all="ignore"):  # inf - inf: NaN, as torch's sum gives it
        mean = float(flat.sum(dtype=np.float64)) / flat.size
    return [mean, max(s2 / flat.size - mean * mean, 0.0)]  # NaN stays NaN


def _norm(x: torch.Tensor) -> Raw:
    """[||x||], float64; on an accelerator one launch per chunk, squaring in float64
    where the device has it (``_wide``)."""
    found = kernel_array(x)
    if found is not None:
        # torch's kernels in one read (their moment read takes two); numba's in its one
        flat, k = found[0].reshape(-1), cpu_kernels()
        s2 = k.square_sum(flat) if hasattr(k, "square_sum") else _moment_read(flat)[1]
        return [math.sqrt(_wide_sums(flat)[1] if _narrow(flat, 0.0, s2) else s2)]
    dtype = torch.float64 if _wide(x.device) else None
    norms = [torch.linalg.vector_norm(c, dtype=dtype) for c in _chunks(x)] if x.numel() else []
    if not norms:
        return torch.zeros(1, dtype=torch.float64, device=x.device)
    return (norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))).view(1)
