"""What the recording measures at attention calls, on the device and fetched with the
statistics in the pass's one transfer: Σp², the mean squared logit and the token
correlations at a scaled_dot_product_attention call; the weights' moments of an
nn.MultiheadAttention (theory.mha.moments)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from varprobe import stats
from varprobe.theory import mha
from varprobe.theory.nodes import Attention, T, _arg

SUBSAMPLE = 64  # queries per head whose softmax rows the probe recomputes
# Token-pair entries of the Gram matrices query_path forms (2 MiB): at 256 tokens that is
# 8 (batch, head) slices of 64 queries each, whose X lies within 1.2% (sd of disjoint
# groups of 8, causal tokens with a shared part) of all 32 slices' of a GPT batch of 8,
# at a quarter of the cost (the 32 slices took 14% of that GPT's bare pass, CPU time)
GRAMS = 1 << 19
MASKED = -1e4   # an additive mask entry at or below this hides the key
BLOCK = 16      # tokens per block of _cumulate_'s in-place adds
CHUNK = 1 << 16  # entries per float64 copy in _square_sum64 (512 KiB: no large fresh block)


def sdpa_facts(q: T, k: T, args: tuple, kwargs: dict) -> tuple[Attention, Any]:
    """What a scaled_dot_product_attention call is (its arguments), and its mask."""
    mask, scale = _arg(args, kwargs, 3, "attn_mask", None), _arg(args, kwargs, 6, "scale", None)
    return Attention(queries=q.shape[-2], keys=k.shape[-2], d_k=q.shape[-1],
                     heads=q.shape[-3] if q.dim() > 2 else 1,
                     kv_heads=k.shape[-3] if k.dim() > 2 else 1,
                     causal=bool(_arg(args, kwargs, 5, "is_causal", False)),
                     masked=mask is not None, scale=None if scale is None else float(scale),
                     dropout=float(_arg(args, kwargs, 4, "dropout_p", 0.0))), mask


def sdpa(q: T, k: T, v: T, mask: Any, facts: Attention) -> list[T | tuple[float, float]]:
    """Σp² and the mean squared logit over a subsample of queries (the softmax of
    64 rows per head, O(64 T d) where the call was O(T² d)), the token
    correlations of v and k (attention.token_correlation from the sums over the
    sequence), the mask's shape (``mask_shape``), the prefix shares of v and k
    (``prefix_share``) and the query path's factor (``query_path``): five pairs,
    reduced on the device.

    Elementwise in the inputs' precision, Σp² and the squared logits summed in float64
    (``_square_sum64``); of the whole v and k one contiguous copy (``_Sums``), which
    becomes their running sums (the prefix shares' cumsum, a tensor of their size
    anyway), and no copy of q (a key head shared by a group of query heads is read once
    per group). At the bench GPT's calls (8 x 4 heads x 256 tokens, d 64, q/k/v strided
    views of one projection) this costs ~10-12 ms of CPU time on one thread, ~1.3x the
    SDPA forward it measures."""
    with torch.no_grad():
        rows = torch.linspace(0, facts.queries - 1, min(SUBSAMPLE, facts.queries),
                              device=q.device).round().long()
        group = _group(q, k)
        scale = facts.scale if facts.scale is not None else facts.d_k ** -0.5
        # k as one contiguous tensor: the logits' matmul would copy a strided k (the
        # heads of a packed projection, transposed) anyway
        sums = _Sums(k, v)
        keys, values = sums.x
        logits = _logits(q, keys, rows, scale, group)
        allowed = torch.ones(rows.numel(), facts.keys, dtype=torch.bool, device=q.device)
        if facts.causal:  # torch's is_causal: the top-left aligned lower triangle
            cols = torch.arange(facts.keys, device=q.device)
            allowed = cols[None, :] <= rows[:, None]
        if mask is not None:
            part = mask.index_select(-2, rows) if mask.shape[-2] > 1 else mask
            if part.dtype == torch.bool:
                allowed = allowed & part
            else:
                logits = logits + part.float()
                allowed = allowed & (part > MASKED)
        count = allowed.sum() * (logits.numel() // max(allowed.numel(), 1)) \
            if allowed.dim() <= 2 else allowed.expand_as(logits).sum()
        # the hidden entries' squares are zero, then -inf for the softmax: zeroed
        # (_hidden_zeroed) and an added bias of the mask's own size (masked_fill
        # broadcast over the heads costs twice the select); 0 + -inf and x + 0 are exact
        seen, spread = _hidden_zeroed(logits, allowed)
        spread = spread / count.clamp(min=1)
        bias = torch.where(allowed, 0.0, -math.inf)
        p = torch.softmax(seen.add_(bias), -1).nan_to_num_(0.0)
        # the mean over rows of each row's sum: the whole sum over the row count
        squares = _square_sum64(p) / max(p.numel() // max(p.shape[-1], 1), 1)
        path = query_path(p, values, keys, group, _early(facts, rows.numel()))
        r_k, r_v = sums.correlations()
        shape = mask_shape(mask, facts)
        w_k, u_v = sums.prefix_shares(weighted=(True, False),
                                      window=shape[2] if isinstance(shape, T) else None)
        return [torch.stack([squares, spread]), torch.stack([r_v, r_k]), shape,
                torch.stack([u_v, w_k]), path]


def _hidden_zeroed(logits: T, allowed: T) -> tuple[T, T]:
    """``where(allowed, logits, 0)`` and its sum of squares. On the CPU a product with
    the mask in place (a tenth of the select's time there), exact where every hidden
    logit is finite (x * 1 = x, x * 0 = ±0); a non-finite one (0 * inf is NaN) shows in
    the sum, which the CPU reads without a sync, and the select then mends it."""
    if not stats.reads_are_free(logits.device) or not _fits(allowed.shape, logits.shape):
        seen = torch.where(allowed, logits, 0.0)
        return seen, _square_sum64(seen)
    seen = logits.mul_(allowed)
    spread = _square_sum64(seen)
    if not math.isfinite(spread.item()):  # the shown entries as they were; hidden: 0
        seen = torch.where(allowed, seen, 0.0)
        spread = _square_sum64(seen)
    return seen, spread


def _fits(small: torch.Size, shape: torch.Size) -> bool:
    """Whether ``small`` broadcasts to ``shape`` without growing it (by hand:
    torch.broadcast_shapes imports torch's symbolic shapes, sympy, ~0.4 s per process)."""
    return len(small) <= len(shape) and all(
        a in (1, b) for a, b in zip(reversed(small), reversed(shape)))


class _Sums:
    """sum(x^2), the sum over the tokens and the running sums of k and v, read from
    contiguous copies of them (a strided x, the heads of a packed projection, is read
    several times slower; one buffer where their shapes match, so the running sums are
    one pass), which then become the running sums in place."""

    def __init__(self, *tensors: T):
        first = tensors[0]
        if all(t.shape == first.shape and t.dtype == first.dtype for t in tensors):
            joint = torch.empty((len(tensors), *first.shape), dtype=first.dtype,
                                device=first.device)
            for part, t in zip(joint, tensors):
                part.copy_(t)
            self.buffers, self.x = [joint], list(joint.unbind(0))
        else:
            self.x = [torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)
                      for t in tensors]
            self.buffers = self.x
        self.square = [_square_sum(x) for x in self.x]

    def correlations(self) -> list[T]:
        return [_correlation(x, square, x.sum(-2)) for x, square in zip(self.x, self.square)]

    def prefix_shares(self, weighted: tuple[bool, ...], window: T | None = None) -> list[T]:
        """After the last read of the tensors: their copies are summed in place."""
        for buffer in self.buffers:
            _cumulate_(buffer)
        return [prefix_share(x, w, square, x, window)
                for x, w, square in zip(self.x, weighted, self.square)]


def _early(facts: Attention, count: int) -> int:
    """How many of the ``count`` subsampled queries see no key of the second half: under
    is_causal query r sees the keys up to r. Counted on the host with a margin of one
    position for the rounding of the subsample's positions (an early row counted late
    only costs its share of the products)."""
    if not facts.causal or count < 2:
        return 0
    step, half = (facts.queries - 1) / (count - 1), facts.keys // 2
    return sum(1 for i in range(count) if i * step < half - 1)


def _group(q: T, k: T) -> int:
    """How many query heads share each key and value head (1 without grouped heads)."""
    if q.dim() <= 2 or k.dim() <= 2 or k.shape[-3] == q.shape[-3] \
            or q.shape[-3] % k.shape[-3]:
        return 1
    return q.shape[-3] // k.shape[-3]


def _logits(q: T, k: T, rows: T, scale: float, group: int) -> T:
    """The scaled logits of the subsampled queries (..., heads, rows, T_k), a fresh float32
    tensor. Query heads that share a key head (``group``, consecutive as
    repeat_interleave orders them) are one matrix of group x rows queries against that
    key head, so k is not repeated per query head."""
    picked = q.index_select(-2, rows)
    if group == 1:
        return (picked @ k.transpose(-1, -2)).float().mul_(scale)
    lead, heads, count = picked.shape[:-3], picked.shape[-3], picked.shape[-2]
    shared = picked.reshape(*lead, heads // group, group * count, picked.shape[-1])
    logits = (shared @ k.transpose(-1, -2)).float().mul_(scale)
    return logits.view(*logits.shape[:-3], heads, count, k.shape[-2])


def _square_sum(x: T, dtype: torch.dtype | None = None) -> T:
    """sum(x^2) as a float64 scalar on x's device, from one read and no copy: a norm
    accumulated in ``dtype`` (x's own by default: torch's cascade of partial sums,
    relative error ~1e-7 in float32; float64 where the sum must be exact to rounding),
    squared in float64."""
    return torch.linalg.vector_norm(x, dtype=dtype).double().square()


def _square_sum64(x: T) -> T:
    """sum(x^2) accumulated in float64, as _square_sum(x, torch.float64), for the
    subsampled logits and probabilities: on the CPU a float64 dot of a float64 copy, in
    pieces of at most CHUNK entries (the norm's elementwise cast costs twice the copy and
    dot there); elsewhere the norm, one kernel."""
    if x.device.type != "cpu":
        return _square_sum(x, torch.float64)
    flat = x.reshape(-1)
    sums = [torch.dot(c, c) for c in (flat[i:i + CHUNK].double()
                                       for i in range(0, max(flat.numel(), 1), CHUNK))]
    return sums[0] if len(sums) == 1 else torch.stack(sums).sum()


def mask_shape(mask: Any, facts: Attention) -> T | tuple[float, float, float]:
    """(causal, full, window) of an SDPA call's mask on the device: 1 where every query
    sees exactly the keys up to its own position (top-left aligned, as is_causal), 1
    where every key is seen, and W where every query i sees exactly the keys i - W + 1
    to i (a sliding window: Mistral's, Gemma's local layers; 0 where not). A float mask
    that carries a position bias (T5 adds its relative bias to the causal mask) hides a
    key by a large negative entry, so the shape is read off the entries at or below
    MASKED, as at an eager softmax."""
    if mask is None:  # the arguments say it all: a host triple
        return float(facts.causal), float(not facts.causal), 0.0
    allowed = mask if mask.dtype == torch.bool else mask > MASKED
    if facts.causal:
        allowed = allowed & _tril(facts.queries, facts.keys, mask.device)
    return allowed_shape(allowed, facts.queries, facts.keys)


def _tril(queries: int, keys: int, device: torch.device) -> T:
    cols = torch.arange(keys, device=device)
    return cols[None, :] <= torch.arange(queries, device=device)[:, None]


def allowed_shape(allowed: T, queries: int, keys: int) -> T:
    """``mask_shape``'s triple from the boolean mask of the keys each query sees (any
    leading dims), on its device without a sync."""
    tril = _tril(queries, keys, allowed.device)
    rows = torch.arange(queries, device=allowed.device)[:, None]
    width = allowed.sum(-1).amax()  # the widest row: the window where it is one
    band = tril & (rows - torch.arange(keys, device=allowed.device)[None, :] < width)
    window = torch.where((allowed == band).all(), width, 0)
    return torch.stack([(allowed == tril).all(), allowed.all(), window]).double()


def multihead(module: nn.MultiheadAttention, args: tuple, kwargs: dict,
              ) -> tuple[Attention, list[T]]:
    """The facts of an nn.MultiheadAttention call, and (off the meta device) its
    weights' moments."""
    with torch._C.DisableTorchFunction():
        q, k = _arg(args, kwargs, 0, "query", None), _arg(args, kwargs, 1, "key", None)
        axis = 1 if module.batch_first and q.dim() == 3 else 0
        facts = Attention(queries=q.shape[axis], keys=k.shape[axis], d_k=module.head_dim,
                          heads=module.num_heads, kv_heads=module.num_heads,
                          causal=bool(kwargs.get("is_causal", False)),
                          masked=_arg(args, kwargs, 5, "attn_mask", None) is not None
                          or _arg(args, kwargs, 3, "key_padding_mask", None) is not None,
                          dropout=module.dropout if module.training else 0.0)
        if q.is_meta:
            return facts, []
        with torch.no_grad():
            return facts, mha.moments(module)


def _correlation(x: T, square_sum: T | None = None, total: T | None = None) -> T:
    """The uncentered token correlation r of x (..., T, d), on its device:
    (mean(S^2)/T - E[x^2]) / ((T-1) E[x^2]) with S the sum over the T tokens (summed in
    x's precision, finished in float64). ``square_sum``: sum(x^2) where already read;
    ``total``: x.sum(-2) where already summed."""
    tokens = x.shape[-2]
    q = (_square_sum(x) if square_sum is None else square_sum) / x.numel()
    if tokens < 2:
        return torch.zeros_like(q)
    total = x.sum(-2) if total is None else total
    s = torch.linalg.vector_norm(total).double().square() / (x.numel() // tokens)
    return (s / tokens - q) / ((tokens - 1) * q).clamp(min=1e-300)


def prefix_share(x: T, weighted: bool = False, square_sum: T | None = None,
                 running: T | None = None, window: T | None = None) -> T:
    """u = mean_i |x̄_i|^2 / E[x^2], x̄_i the mean of x_1..x_i (tokens on axis -2): what
    flat causal attention keeps of x, on its device. For tokens of one second moment
    and uncentered correlation r it is r + (1 - r) mean_i 1/i; where the correlation
    depends on the positions (a causal stack makes the early tokens' correlated among
    themselves) it is the r the windows of causal attention see (theory.attend).
    ``weighted``: mean_i u_i / i, the weights the query path gives query i (its m_i,
    ~1/i at flat attention). ``running``: the running sums of x (_cumulate_) where
    already formed. ``window``: a 0-d tensor, W > 0 for a sliding window (x̄_i the mean
    of x_{i-W+1}..x_i, over min(i, W) tokens), 0 for none (mask_shape's third value)."""
    tokens = x.shape[-2]
    q = _square_sum(x) if square_sum is None else square_sum
    # |x̄_i|^2 = |S_i|^2 / i^2, S_i the running sum: one norm per prefix, then the
    # positions' weights (no division of the whole tensor)
    positions = torch.arange(1, tokens + 1, dtype=torch.float64, device=x.device)
    sums = _cumulate_(x.clone(memory_format=torch.contiguous_format)) \
        if running is None else running
    if window is not None:  # S_i - S_{i-W}, on the device: W is not read
        width = torch.where(window > 0, window, tokens).to(torch.long)
        start = torch.arange(tokens, device=x.device) - width
        before = sums.index_select(-2, start.clamp(min=0)) * (start >= 0).unsqueeze(-1)
        sums = sums - before
        positions = torch.minimum(positions, width.to(torch.float64))
    prefix = torch.linalg.vector_norm(sums, dim=-1).double().square()
    return (prefix * positions ** (-3 if weighted else -2)).sum() / q.clamp(min=1e-300)


def _cumulate_(out: T) -> T:
    """The running sums over the tokens (x.cumsum(-2)) in place on a contiguous ``out``.
    On the CPU, cumsum along an axis that is not the last walks each of the d columns
    with a stride; a large x is summed instead in blocks of BLOCK tokens (BLOCK - 1
    in-place adds of whole token rows), the blocks' totals then carried over (rounding:
    sums of the same terms in another order; a half-precision x keeps cumsum, which
    accumulates in float32)."""
    tokens = out.shape[-2]
    blocks = tokens // BLOCK
    if out.device.type != "cpu" or out.dtype not in (torch.float32, torch.float64) \
            or blocks < 8 or out.numel() < 1 << 18:
        return out.cumsum_(-2)
    body = out[..., :blocks * BLOCK, :].unflatten(-2, (blocks, BLOCK))
    for i in range(1, BLOCK):
        body[..., i, :] += body[..., i - 1, :]
    totals = body[..., -1, :].cumsum(-2)  # the running sum at each block's end
    body[..., 1:, :, :] += totals[..., :-1, None, :]
    if tokens > blocks * BLOCK:
        tail = out[..., blocks * BLOCK:, :]
        tail[..., 0, :] += totals[..., -1, :]
        out[..., blocks * BLOCK:, :] = tail.cumsum(-2)
    return out


def query_path(p: T, v: T, k: T, group: int = 1, early: int = 0) -> T:
    """(X, 1): the query path's factor at the realized p, v and k, on the device.

    dq_i = c sum_j p_ij (g_i . (v_j - v̄_i)) k_j, v̄_i = sum_j p_ij v_j, so for a gradient
    g_i of i.i.d. entries (sigma_g^2) independent of v and k,
    E|dq_i|^2 = c^2 sigma_g^2 Q_i, Q_i = sum_jl p_ij p_il (v_j - v̄_i).(v_l - v̄_i) k_j.k_l,
    and X = mean_i Q_i / (d_v d_k q_v q_k) is what theory.attention.backward's query
    path writes (1 - r_k) f m + (1 - r) coherent for tokens alike. Q_i is a fourth
    moment of the tokens: where their correlations spread over the pairs (a causal
    stack's early tokens correlated among themselves, the late ones with everything)
    it exceeds the closed form by the pairs' variance times the window (the 4-block
    Llama's last two blocks: 2-3x), which no r can say.

    p: rows of the probabilities (..., R, T_k) (the subsample of queries); v, k:
    (..., T_k, d) with p's leading dims, or with heads / ``group`` heads, each shared by
    ``group`` consecutive query heads (grouped-query attention); ``early``: how many of
    the first rows are zero past the first half of the keys (causal attention's early
    queries). Q_i = p^T (Gv o Gk) p
    - 2 sum_j p_j (v_j . v̄)(k_j . k̄) + |v̄|^2 |k̄|^2, k̄ = sum_j p_j k_j, Gv, Gk the Gram
    matrices of v and k, formed for a subsample of the (batch, head) slices (GRAMS
    entries)."""
    with torch.no_grad():
        rows, keys = p.shape[-2:]
        heads = p.shape[-3] if p.dim() > 2 else 1
        if not (p.shape[:-3] == v.shape[:-3] == k.shape[:-3]) \
                or v.dim() != p.dim() or k.dim() != p.dim() \
                or heads != (v.shape[-3] if v.dim() > 2 else 1) * group \
                or k.shape[:-2] != v.shape[:-2] \
                or v.shape[-2] != keys or k.shape[-2] != keys:
            # broadcast heads or batch: left to the closed form
            return torch.zeros(2, dtype=torch.float64, device=p.device)
        if p.dim() == 2:  # one slice
            p, v, k = p[None], v[None], k[None]
        slices = math.prod(p.shape[:-2])
        pick = torch.linspace(0, slices - 1, min(slices, max(1, GRAMS // keys ** 2)),
                              device=p.device).round().long()
        # the picked slices of v and k: those of the key head each query head reads
        shared = pick // heads * (heads // group) + pick % heads // group
        pf = _slices(p, pick).float()
        vf, kf = _slices(v, shared).float(), _slices(k, shared).float()
        vbar, kbar = pf @ vf, pf @ kf
        # (Gk p)_j = k_j . k̄ and p^T Gk p = |k̄|^2: O(R T d) where Gk p was O(R T^2)
        q = _fourth(pf, vf, kf, early) \
            - 2 * (pf * (vbar @ vf.transpose(-1, -2)) * (kbar @ kf.transpose(-1, -2))).sum(-1) \
            + vbar.square().sum(-1) * kbar.square().sum(-1)
        scale = vf.square().sum(-1).mean(dtype=torch.float64) \
            * kf.square().sum(-1).mean(dtype=torch.float64)
        x = q.mean(dtype=torch.float64) / scale.clamp(min=1e-300)
        return torch.stack([x, torch.ones_like(x)])


def _fourth(p: T, v: T, k: T, early: int) -> T:
    """p_i^T (Gv o Gk) p_i for each row i of p (S, R, T) and v, k (S, T, d). The Gram
    matrices are symmetric: of their halves' blocks [[C11, C21^T], [C21, C22]] the left
    column (T x T/2) and C22 are formed, 3/4 of the products, and the rows' forms are
    p1^T C11 p1 + 2 p2^T C21 p1 + p2^T C22 p2 (p1, p2 the row's halves), the terms with
    p2 skipped for the ``early`` rows, whose p2 is 0."""
    half = p.shape[-1] // 2
    if half < 64:  # small blocks: the whole products
        both = (v @ v.transpose(-1, -2)).mul_(k @ k.transpose(-1, -2))
        return (p @ both).mul_(p).sum(-1)
    v2, k2 = v[:, half:], k[:, half:]
    left = (v @ v[:, :half].transpose(-1, -2)).mul_(k @ k[:, :half].transpose(-1, -2))
    corner = (v2 @ v2.transpose(-1, -2)).mul_(k2 @ k2.transpose(-1, -2))
    p1, p2 = p[..., :half], p[..., early:, half:]
    forms = (p @ left).mul_(p1).sum(-1)  # p1^T C11 p1 + p2^T C21 p1
    forms[..., early:] += (p1[..., early:, :] @ left[:, half:].transpose(-1, -2)) \
        .add_(p2 @ corner).mul_(p2).sum(-1)
    return forms


def _slices(x: T, flat: T) -> T:
    """x's (..., T, d) slices at the flat positions ``flat`` of its leading dims, (n, T,
    d): rows of a flat view where x has one (a copy of n slices), else gathered by
    index (a flat view of a transposed v or k would copy all of them)."""
    if x.is_contiguous():
        return x.view(-1, *x.shape[-2:]).index_select(0, flat)
    return x[_unravel(flat, x.shape[:-2])]


def _unravel(flat: T, shape: torch.Size) -> tuple[T, ...]:
    """The indices into ``shape`` of the flat positions ``flat`` (row-major), as
    torch.unravel_index, whose Python checks cost more than the whole statistic here."""
    found = []
    for size in reversed(shape):
        found.append(flat % size)
        flat = flat // size
    return tuple(reversed(found))
