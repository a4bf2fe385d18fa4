"""What a gradient shares across positions, for a factor broadcast over them (an SE gate).

y = x * s with s of shape (N, C, 1, ...) broadcast over the P positions of x: the
gradient of s is ds = sum_i g_i x_i over one sample's and channel's positions. Taking
the P terms as independent gives P Var[g] E[x^2]. They are not where the gradient that
reaches y is shared across positions (it came back through a global average pool,
which hands every position the same dL/dp / P) and depends on x through a later
activation's mask (g_i = U_i f'(z_i), z = y + a residual). Given the gradient's shared
part, Stein's lemma for x_i ~ N(mu_x, v_x) gives E[g_i x_i] = E[dg_i/dx_i] v_x +
E[g_i] mu_x, with dg_i/dx_i = s H_i and H_i = dg_i/dy_i (the diagonal of the loss's
Hessian in y). The mean of g_i x_i over the positions has the shared part
s v_x H̄ + ḡ x̄, so

    Var[ds] = P Var[g] E[x^2] + P^2 (E[s^2] v_x^2 E[H̄^2] + E[ḡ^2] E[x̄^2])

(ḡ, H̄, x̄: means over one sample's and channel's positions; E[x̄^2] the shared mean of
x, the positions' own parts being in the first term). On the bench's SE-ResNet the
last block's gate gradient is 23x the independent-terms rule and within 2% of this.

The walk's Grad carries shared = E[ḡ^2], curv = E[H̄^2] and cross = E[ḡ H̄]; beside
them shared0 and cross0, the same with ḡ0, the shared gradient where the tensor's own
rectifier input crosses 0 (ḡ0 = ḡ except into a residual stream, where the stream is 0
there: theory.residual), and centred, the part of shared a train-mode BatchNorm has
already centred over the batch (``batch_loss``). Backward:

- the seed: an i.i.d. cotangent shares var / positions; a tensor without positions
  (a classifier's logits) shares all of it
- a mean pool hands each position of a window one gradient: the shared fraction is
  kept (a global pool's output has one position: its input's gradient is all shared);
  a max pool hands it to one position per window: shared times fraction^2
- an activation, g = U f'(z): ḡ = Ū E[f'], and dg/dz = U f'' + f'^2 dU/do gives
  H̄ = Ū E[f''] + H̄_U E[f'^2], the positions' z taken as independent of U:
  shared S E[f']^2, curv S0 E[f'']^2 + C E[f'^2]^2 + 2 X0 E[f''] E[f'^2],
  cross E[f'] (sqrt(S S0) E[f''] + X E[f'^2]); E[f''] = E[(z - mu) f'(z)] / var (Stein)
- an add, a view, a constant factor (a^2 on the variance), a per-channel map
  (BatchNorm, the gated factor times s): shared a^2, curv a^4, cross a^3
- a weight layer: shared times its gain (ḡ_x,c = sum_o (sum_t w_oct) ḡ_y,o; a strided
  conv's times P_out/P_in again, ``stride_share``), curv and
  cross 0: H̄_x,c = sum_o sum_t w_oct^2 H̄_y,o sums the output channels' curvatures,
  which carry the random signs of their Ū, and E[w^3] = 0 decouples ḡ_x from H̄_x
- anything else: nothing shared (the independent-terms rule)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from varprobe.theory import norms, pools, residual, rules
from varprobe.theory.gains import _attributes, _breakpoints, _nodes, expectation, prelu_slope
from varprobe.theory.pools import Pool
from varprobe.theory.signal import Grad, Value

Parts = tuple[float, ...]  # shared, curv, cross, shared0, cross0, centred
NONE: Parts = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def over_positions(t: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether ``t`` is broadcast to ``out`` over positions only (batch and channels
    kept, every later dimension 1): a gate of shape (N, C, 1, 1) on a channels-first
    map. A 3-D tensor is not taken as one: (B, T, 1) on (B, T, C) is a per-token
    factor over the channels (a hand-written RMSNorm), which shares nothing of this."""
    return (t.dim() == out.dim() >= 4 and t.shape[:2] == out.shape[:2]
            and all(d == 1 for d in t.shape[2:]) and out.numel() > t.numel())


def seed(var: float, shape) -> Parts:
    positions = math.prod(shape[2:]) if shape is not None and len(shape) > 2 else 1
    return (var / positions, 0.0, 0.0, var / positions, 0.0, 0.0)


def scaled(g: Grad, a2: float, mixes: bool = False) -> Parts:
    """Through a map that multiplies the gradient's variance by ``a2``; ``mixes``: a
    weight layer, which sums its output channels' curvatures away."""
    if mixes:
        return (g.shared * a2, 0.0, 0.0, g.shared0 * a2, 0.0, g.centred * a2)
    return (g.shared * a2, g.curv * a2 * a2, g.cross * a2 ** 1.5, g.shared0 * a2,
            g.cross0 * a2 ** 1.5, g.centred * a2)


def dropped(g: Grad, keep: float, positions: bool = True) -> Parts:
    """Dropout: the mask's mean over positions is 1, H_i gets mask^2 / keep^2. On a
    tensor without positions (pooled features) each element is its own mean: all of
    it is shared, E[(g m / keep)^2] = E[g^2] / keep, and E[H̄^2] gets E[m^4] / keep^4."""
    if not positions:
        return (g.shared / keep, g.curv / keep ** 3, g.cross / keep ** 2, g.shared0 / keep,
                g.cross0 / keep ** 2, g.centred / keep)
    return (g.shared, g.curv / keep ** 2, g.cross / keep, g.shared0, g.cross0 / keep,
            g.centred)


def pooled(g: Grad, pool: Pool) -> Parts:
    if pool.kind == "max":
        f = pool.fraction ** 2
    elif pool.kind in ("mean", "sum"):
        f = pools.backward(pool)
    else:  # padding, nearest copies
        return scaled(g, 1.0)
    return (g.shared * f, 0.0, 0.0, g.shared0 * f, 0.0, g.centred * f)


def into_stream(g: Grad, m: residual.Mix | None, a2: float) -> Parts:
    """From a residual sum z = y + f(w) into its rectified stream f(w): the stream's
    own mask meets the sum's (theory.residual.stream_factors). ḡ, H̄ are Ū E[f'(z)],
    Ū E[f''(z)] here; at w's rectifier they become Ū E[f'(z) f'(w)] = ḡ k_S E[f'(w)]
    and Ū E[f''(z) f'(w)^2] = H̄ k_C E[f'(w)^2], and where w crosses 0 the stream is 0:
    ḡ0 = Ū E[f'(z) | w = 0] = ḡ k_0."""
    if m is None or (g.shared <= 0 and g.curv <= 0):
        return scaled(g, a2)
    k_s, k_0, k_c, _ = residual.stream_factors(m)
    return (g.shared * k_s * k_s, g.curv * k_c * k_c, g.cross * k_s * k_c,
            g.shared * k_0 * k_0, g.cross * k_0 * k_c, g.centred * k_s * k_s)


def activation(g: Grad, module: nn.Module, x: Value | None) -> Parts:
    """g = U f'(z) at the activation's input z (module note); the curvature reads the
    shared gradient where z crosses 0 (ḡ0), E[ḡ ḡ0] taken as sqrt(E[ḡ^2] E[ḡ0^2]).
    None of it under a max pool's window (each window's maximum only, maxgate)."""
    if g.shared <= 0 and g.curv <= 0 or x is None or x.signal is None or \
            g.window is not None and g.maxed >= g.var:
        return NONE
    slopes = (residual.slopes(module, x.mix) if x.mix is not None
              else _slopes(module, x.mu, x.signal.m2 - x.mu * x.mu))
    if slopes is None:
        return NONE
    d1, d1_2, d2 = slopes
    s, c, x_, s0, x0 = g.shared, g.curv, g.cross, g.shared0, g.cross0
    shared = s * d1 * d1
    curv = s0 * d2 * d2 + c * d1_2 * d1_2 + 2 * x0 * d2 * d1_2
    cross = d1 * (math.sqrt(max(s * s0, 0.0)) * d2 + x_ * d1_2)
    return (shared, curv, cross, shared, cross, g.centred * d1 * d1)


def _slopes(module: nn.Module, mu: float, var: float) -> tuple[float, float, float] | None:
    """(E[f'], E[f'^2], E[f'']) at z ~ N(mu, var); a rectifier in closed form (slope a
    below 0: E[f''] = (1 - a) phi(t) / sigma), else by quadrature, with Stein's
    E[f''] = E[(z - mu) f'(z)] / var."""
    if var <= 0:
        return None
    if isinstance(module, rules.RECTIFIERS):
        a = prelu_slope(module)
        sigma = math.sqrt(var)
        t = mu / sigma
        above = 0.5 * math.erfc(-t / math.sqrt(2))
        phi = math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
        return above + a * (1 - above), above + a * a * (1 - above), (1 - a) * phi / sigma
    key = (type(module), _attributes(module), float(f"{mu:.4g}"), float(f"{var:.4g}"))
    if key not in _SLOPES:  # a deep stack of alike layers repeats them
        try:
            kinks = tuple(b - mu for b in (0.0, *_breakpoints(module)))
            d1 = expectation(lambda y: rules._slope(module, y + mu), var, kinks)
            d1_2 = expectation(lambda y: rules._slope(module, y + mu) ** 2, var, kinks)
            d2 = expectation(lambda y: y * rules._slope(module, y + mu), var, kinks) / var
            _SLOPES[key] = (d1, d1_2, d2)
        except Exception:  # noqa: BLE001 -- a module that cannot run on a vector of points
            _SLOPES[key] = None
    return _SLOPES[key]


_SLOPES: dict[tuple, tuple[float, float, float] | None] = {}


def gate_gradient(g: Grad, spread: float, x: Value | None, s_m2: float) -> float:
    """Var[ds] - P Var[g] E[x^2]: what the shared gradient and its curvature add to the
    gradient of a factor s broadcast over the P = ``spread`` positions of x."""
    if x is None or x.signal is None or (g.shared <= 0 and g.curv <= 0):
        return 0.0
    m2 = x.signal.m2
    v = max(m2 - x.mu * x.mu, 0.0)
    x_shared = m2 * max(x.signal.mean_share, x.mu * x.mu / m2 if m2 > 0 else 0.0)
    return spread * spread * (s_m2 * v * v * g.curv + g.shared * x_shared)


def stride_share(layer) -> float:
    """What a weight layer's backward hands the shared part beside the variance: a
    stride-s conv's input position meets 1/s^d of the taps, each class of positions its
    own, so their mean over the positions holds (sum_t w_t / s^d)^2 where the variance
    holds sum_t w_t^2 / s^d: the positions' fraction P_out / P_in again (1 unstrided or
    transposed)."""
    ins, outs = layer.input_shape, layer.shape
    if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) < 3 \
            or len(ins) != len(outs):
        return 1.0
    p_in, p_out = math.prod(ins[2:]), math.prod(outs[2:])
    return min(1.0, p_out / p_in) if p_in > 0 else 1.0


def batch_normed(g: Grad, gain: float, batch: int = 0) -> Parts:
    """Past a train-mode BatchNorm: scaled by its gain, and the shared part now has no
    mean over the batch (BatchNorm subtracted it: of the per-sample means not yet
    centred, 1/N of their energy, which ``batch_loss`` removes; half at a batch of 2);
    a conv and a ReLU keep that."""
    parts = scaled(g, gain)
    if batch >= 1 and g.shared > 0:
        fresh = max(1.0 - g.centred / g.shared, 0.0)
        parts = tuple(p * (1.0 - fresh / batch) for p in parts[:1]) + parts[1:]
    return (*parts[:5], parts[0])


def batch_loss(g: Grad, batch: int) -> float:
    """The share of Var[g] a train-mode BatchNorm's backward removes beyond its gain:
    dx = (gamma/sigma)(g - mean(g) - x̂ mean(g x̂)), the means over the batch and the
    positions of one channel. The per-sample means ḡ not yet centred over the batch
    leave E[ḡ^2]/N in mean(g); by Stein mean_i(g_i x̂_i) = H̄ (Var[x̂] = 1) leaves
    E[H̄^2]/N in the second (gamma^2 = 1 taken; on the bench's ResNets 4.5% and 0.4% of
    Var[g] where the global pool's gradient arrives, within 10% of these)."""
    if g.var <= 0 or g.shared <= 0 or batch < 1:
        return 0.0
    fresh = max(1.0 - g.centred / g.shared, 0.0)
    return min(fresh * (g.shared + g.curv) / (batch * g.var), 1.0)


def batch_centring(module: nn.Module, shape: list[int] | None,
                   behind: float | None = None) -> float:
    """What a train-mode BatchNorm's backward keeps of the part of a gradient that is
    independent from value to value: it projects the M = batch x positions values of
    each channel off their mean and off x̂, 1/M of it each where no BatchNorm after it
    has centred the gradient over the batch: (M - 2)/M (a BatchNorm1d at a batch of 8
    keeps 3/4; float64: 0.749 over 20000 channels). ``behind``: what the two take
    where the gradient comes from behind another BatchNorm (``behind_loss``):
    (M - behind)/M."""
    if not norms.centres_batch(module) or not shape:
        return 1.0
    m = shape[0] * math.prod(shape[2:])
    return max(1.0 - (2.0 if behind is None else behind) / m, 0.0)


def behind_loss(act: nn.Module | None, x: Value | None, per_channel: bool) -> float:
    """``batch_centring``'s count behind another BatchNorm, whose centring (passed back
    through convolutions) left the gradient u of each channel summing to zero and,
    over the channels it mixes, orthogonal to the next BatchNorm's input. Through an
    activation f between them, the gradient is f'(y) u, so the mean takes
    sum_i u_i f'(y_i) and the projection on x̂ sum_i u_i f'(y_i) x̂_i: counted over M,
    Var[f'] and E[f'^2 x̂^2] of E[f'^2] where a conv mixes the channels to the next
    BatchNorm; where only a depthwise conv does (or nothing), u is orthogonal to each
    channel's f(y) and 1 as well, and only what f' and f' x̂ hold beyond those two
    counts (a ReLU's f' x̂ = f(y)/sigma: nothing). Without an activation: 1 (x̂).
    Measured x M in float64 (the next BatchNorm 3x3 convs later, a batch of 2 at 7x7,
    64 channels, 6 seeds): ReLU 1.58 (1.50 here), SiLU 1.91 (1.71); through a depthwise
    conv ReLU 0.37 (0.27), SiLU 0.41 (0.12), the rest the borders' (a 3x3 conv at 7x7
    does not keep a sum of zero there: without an activation 0.56, here 0). In
    ResNet-50 at a batch of 2 (M = 98 in its last stage) the gradient at the stem is
    within 3% of the measured one with it, 15% over without."""
    if act is None:
        return 1.0
    if x is None or x.signal is None:
        return 1.0 + 0.5
    if x.mix is not None:  # a residual sum's activation: its slopes, x̂ taken as 1
        slopes = residual.slopes(act, x.mix)
        return 1.0 + (0.5 if slopes is None or slopes[1] <= 0
                      else max(1.0 - slopes[0] ** 2 / slopes[1], 0.0))
    counts = _mask_counts(act, x.mu, x.signal.m2 - x.mu * x.mu)
    if counts is None:
        return 1.0 + 0.5
    return counts[1] if per_channel else counts[0]


def _mask_counts(module: nn.Module, mu: float, var: float) -> tuple[float, float] | None:
    """(mixed, per channel): ``behind_loss``'s counts at z ~ N(mu, var), by quadrature."""
    if var <= 0:
        return None
    key = (type(module), _attributes(module), float(f"{mu:.4g}"), float(f"{var:.4g}"))
    if key not in _COUNTS:  # a deep stack of alike layers repeats them
        try:
            _COUNTS[key] = _counts(module, mu, var)
        except Exception:  # noqa: BLE001 -- a module that cannot run on a vector of points
            _COUNTS[key] = None
    return _COUNTS[key]


def _counts(module: nn.Module, mu: float, var: float) -> tuple[float, float] | None:
    y, w = _nodes(float(var), tuple(sorted({b - mu for b in (0.0, *_breakpoints(module))})))
    z = y + mu
    with torch.no_grad():
        f = module.forward(z * 1.0).to(torch.float64)
    d = rules._slope(module, z)
    t = y / math.sqrt(var)
    e = lambda v: float(torch.dot(w, v))  # noqa: E731 -- E[v] under the quadrature
    d2 = e(d * d)
    if d2 <= 0:
        return None
    basis = torch.stack([f, torch.ones_like(f)])
    gram = torch.tensor([[e(a * b) for b in basis] for a in basis], dtype=torch.float64)

    def beyond(v: torch.Tensor) -> float:  # E[v^2] less its projection on f and 1
        c = torch.tensor([e(v * b) for b in basis], dtype=torch.float64)
        return e(v * v) - float(c @ torch.linalg.pinv(gram) @ c)

    mixed = (e(d * d * t * t) + d2 - e(d) ** 2) / d2
    return mixed, max(beyond(d * t) + beyond(d), 0.0) / d2


_COUNTS: dict[tuple, tuple[float, float] | None] = {}


def group_loss(g: Grad, channels: int) -> float:
    """``batch_loss`` for a GroupNorm of ``channels`` channels a group: its means are
    over one sample's group (its channels and positions), which holds the mean of the
    channels' ḡ, E[ḡ^2]/channels for channels of independent signs, and of their H̄."""
    if g.var <= 0 or (g.shared <= 0 and g.curv <= 0):
        return 0.0
    return min((g.shared + g.curv) / (channels * g.var), 1.0)


def norm_loss(module: nn.Module, g: Grad, shape: list[int] | None) -> float:
    """The share of Var[g] a normalizing call's backward removes beyond its gain: a
    train-mode BatchNorm's (``batch_loss``), a GroupNorm's or an InstanceNorm's
    (``group_loss``: an InstanceNorm's group is one channel); 0 else."""
    if (channels := _group(module, shape)) is not None:
        return group_loss(g, channels)
    if isinstance(module, norms.BATCH_NORMS) and not norms.uses_running_stats(module):
        return batch_loss(g, shape[0]) if shape else 0.0
    return 0.0


def normed(module: nn.Module, g: Grad, gain: float, shape: list[int] | None) -> Parts | None:
    """The shared parts past a norm that centres them: a train-mode BatchNorm
    (``batch_normed``); a GroupNorm or InstanceNorm over positions, which takes each
    group's mean of the channels' parts away (a share 1/channels of them: all of them
    for an InstanceNorm); None for other modules."""
    if (channels := _group(module, shape)) is not None:
        return tuple(part * (1.0 - 1.0 / channels) for part in scaled(g, gain))
    if isinstance(module, norms.BATCH_NORMS) and not norms.uses_running_stats(module):
        return batch_normed(g, gain, shape[0] if shape else 0)
    return None


def _group(module: nn.Module, shape: list[int] | None) -> int | None:
    """The channels a group of a norm that centres each sample's group of channels
    over the positions: a GroupNorm's, 1 for an InstanceNorm with its own statistics;
    None for other norms or a call without positions."""
    if not positions_of(shape):
        return None
    if isinstance(module, nn.GroupNorm):
        return module.num_channels // module.num_groups
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) \
            and not norms.uses_running_stats(module):
        return 1
    return None


def positions_of(shape: list[int] | None) -> bool:
    """Whether a call's output has positions beside its samples and channels: a
    GroupNorm on features alone has none to share a gradient across, and there its
    centring's 1/k is the same order as the spread of its small groups' scales, which
    the rule leaves out too."""
    return shape is not None and len(shape) > 2
