"""The fast statistics equal the straightforward float64 computation on the same tensor.

On the CPU, stats.py reads a dense float tensor once with the numba kernels (float32
blocks of 256 elements, blocks added in float64); elsewhere it reads tensors in chunks,
shifts them by the first chunk's mean, sums in float32 and adds the per-chunk sums in
float64; the Recorder measures a gradient buffer once. Each number here is held
against numpy in float64 on the captured tensor.

Tolerance: float32 pairwise summation of n terms has relative error about
eps32 * log2(n) (6e-8 * 17 ~ 1e-6 for n ~ 1e5); the shift keeps the variance free of
cancellation, so 1e-5 relative holds for every moment. Counts are exact.
"""

from __future__ import annotations

import math
import sys
import traceback

import numpy as np
import pytest
import torch
from torch import nn

import varprobe
from varprobe import kernel_choice, stats, torch_kernels

RTOL = 1e-5


def reference(t: torch.Tensor, channel_dim: int = -1) -> dict[str, float]:
    a = t.detach().double().numpy()
    finite = np.isfinite(a).all()
    units = np.moveaxis(a, channel_dim, -1).reshape(-1, a.shape[channel_dim])
    return {
        "mean": a.mean() if finite else None, "var": a.var() if finite else None,
        "m2": (a * a).mean() if finite else None,
        "zero": (a == 0).mean(), "nonfinite": int((~np.isfinite(a)).sum()),
        "dead": (~(units != 0).any(0)).mean() if a.ndim >= 2 else None,
    }


def host(pending: stats.Pending) -> list:
    """The row the report reads, through the one transfer."""
    return stats.collect([pending])[0]


def check_activation(t: torch.Tensor, channel_dim: int = -1) -> None:
    row = host(stats.activation(t, channel_dim))
    ref = reference(t, channel_dim)
    for key, index in (("mean", stats.MEAN), ("var", stats.VAR), ("m2", stats.SECOND_MOMENT)):
        if ref[key] is None:
            assert not np.isfinite(row[index]), key
        else:
            assert row[index] == pytest.approx(ref[key], rel=RTOL, abs=1e-12), key
    assert row[stats.ZERO_FRACTION] == pytest.approx(ref["zero"], abs=1e-12)
    assert row[stats.NONFINITE] == ref["nonfinite"]
    assert row[stats.NUMEL] == t.numel()
    if ref["dead"] is None:
        assert np.isnan(row[stats.DEAD_FRACTION])
    else:
        assert row[stats.DEAD_FRACTION] == pytest.approx(ref["dead"], abs=1e-12)


def relu_with_dead_units(*shape: int, channel_dim: int = -1) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).relu()
    x.select(channel_dim, 0).zero_()  # one dead unit
    x.select(channel_dim, 3).zero_()
    return x


@pytest.fixture(params=["one chunk", "without numba", "many chunks", "accelerator path"])
def chunked(request, monkeypatch):
    """Every path: the whole tensor at once (the CPU kernels where they apply: numba's,
    and torch's where numba is switched off); chunks of 1000 elements; and, as on an
    accelerator, torch reductions in chunks of scratch with non-finite elements counted
    in the same pass instead of on demand."""
    if request.param == "without numba":
        monkeypatch.setenv("VARPROBE_NUMBA", "0")
    if request.param not in ("one chunk", "without numba"):
        monkeypatch.setattr(stats, "chunk_size", lambda device: 1000)
    if request.param == "accelerator path":
        monkeypatch.setattr(stats, "reads_are_free", lambda device: False)
    return request.param


def test_activation_channels_last(chunked):
    check_activation(relu_with_dead_units(256, 64))


def test_activation_channels_first_conv(chunked):
    check_activation(relu_with_dead_units(8, 16, 12, 12, channel_dim=1), channel_dim=1)
    # planes longer than a kernel block (400 > 256 elements)
    check_activation(relu_with_dead_units(4, 6, 20, 20, channel_dim=1), channel_dim=1)


def test_activation_non_contiguous(chunked):
    x = relu_with_dead_units(64, 40, 30, channel_dim=1).transpose(0, 2)
    assert not x.is_contiguous()
    check_activation(x, channel_dim=1)


def test_channels_last_memory_and_float64(chunked):
    # Channels innermost in memory (NHWC): the units of a conv output are then the
    # columns of an (N*H*W, C) array; float64 is accumulated in float64.
    x = relu_with_dead_units(6, 9, 11, 13, channel_dim=1)
    check_activation(x.to(memory_format=torch.channels_last), channel_dim=1)
    check_activation(x.double(), channel_dim=1)
    check_activation(relu_with_dead_units(300, 1000).double())


def test_large_mean_small_spread_has_no_cancellation(chunked):
    # E[x^2] - E[x]^2 in float32 would lose every digit here (mean^2 / var = 1e10).
    g = torch.Generator().manual_seed(0)
    x = 1e4 + 0.1 * torch.randn(50_000, generator=g, dtype=torch.float64)
    check_activation(x.float().view(500, 100))


def test_nonfinite_and_zero_counts(chunked):
    x = torch.randn(100, 50)
    x[3, 4], x[7, 1], x[90, 49] = float("inf"), float("nan"), float("-inf")
    x[10] = 0.0
    check_activation(x)


def test_one_dimensional_tensor_has_no_units():
    check_activation(torch.randn(3000))


def test_bfloat16_accumulates_in_float32_or_better(chunked):
    # bf16 has 8 bits of mantissa: sums kept in bf16 would be off by ~1e-2; the
    # reference is float64 of the very same bf16 values.
    g = torch.Generator().manual_seed(1)
    x = (3.0 + torch.randn(200, 300, generator=g)).relu().bfloat16()
    check_activation(x)
    ref = reference(x)
    row = host(stats.gradient(x))
    assert row[stats.G_VAR] == pytest.approx(ref["var"], rel=RTOL)
    assert row[stats.G_SECOND_MOMENT] == pytest.approx(ref["m2"], rel=RTOL)


def test_gradient_weight_and_grad_ratio(chunked):
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(300, 200, generator=g) * 1e-3
    grad[5, 5] = float("nan")
    row = host(stats.gradient(grad))
    assert row[stats.G_NONFINITE] == 1 and row[stats.G_NUMEL] == grad.numel()
    grad[5, 5] = 0.0
    row = host(stats.gradient(grad))
    a = grad.double().numpy()
    assert row[stats.G_VAR] == pytest.approx(a.var(), rel=RTOL)
    assert row[stats.G_SECOND_MOMENT] == pytest.approx((a * a).mean(), rel=RTOL)

    w, b = torch.randn(200, 300, generator=g) * 0.05 + 0.01, torch.randn(200, generator=g)
    row = host(stats.weight(w, b))
    wa, ba = w.double().numpy(), b.double().numpy()
    assert row[stats.W_VAR] == pytest.approx(wa.var(), rel=RTOL)
    assert row[stats.W_SECOND_MOMENT] == pytest.approx((wa * wa).mean(), rel=RTOL)
    assert row[stats.B_SECOND_MOMENT] == pytest.approx((ba * ba).mean(), rel=RTOL)
    assert row[stats.W_NORM] == pytest.approx(np.linalg.norm(wa), rel=RTOL)
    assert np.isnan(host(stats.weight(w, None))[stats.B_SECOND_MOMENT])
    ratio = host(stats.grad_ratio(grad, w, stats.weight(w, b)))[0]
    assert ratio == pytest.approx(np.linalg.norm(a) / np.linalg.norm(wa), rel=RTOL)


def test_a_weights_sum_comes_from_its_tap_sums(monkeypatch):
    """With torch's kernels a Linear's or conv's weight is read once for its moments:
    its sum is the total of the mean gain's tap sums (a read the probe makes anyway),
    the one read its squares'. The moments still equal float64's, with a mean the
    variance must take out."""
    monkeypatch.setattr(kernel_choice, "numba_kernels", lambda: None)
    read, real = [], torch_kernels.sums
    monkeypatch.setattr(torch_kernels, "sums", lambda a, s, z: read.append(a) or real(a, s, z))
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(64 * 6 * 6, 10))
    with torch.no_grad():
        model[0].weight.add_(0.02)
        model[3].weight.sub_(0.01)
    report = varprobe.probe(model, torch.randn(4, 32, 6, 6, generator=g))
    weights = [model[0].weight, model[3].weight]
    assert min(w.numel() for w in weights) > torch_kernels.SMALL  # else numpy's sums
    assert not any(np.shares_memory(a, w.detach().numpy()) for a in read for w in weights)
    for layer, w in zip(report.weight_layers, weights):
        a = w.detach().double().numpy()
        assert layer.weight_var == pytest.approx(a.var(), rel=RTOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-25, 1e-35, 1e20])
def test_squares_outside_float32s_range_are_kept(chunked, scale, dtype):
    """A collapsed network's tensors reach |x| ~ 1e-25 (squares below float32's smallest
    subnormal: a float32 sum of squares reads 0) and an exploding one's 1e20 (squares past
    float32's largest): every path still gives each moment as float64 does, to RTOL
    (the CPU kernels read such a tensor again in float64; the accelerators' path shifts
    it into float64 scratch)."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(200, 300, generator=g).relu() * scale).to(dtype)
    check_activation(x)
    ref = reference(x)
    row = host(stats.gradient(x))
    assert row[stats.G_SECOND_MOMENT] == pytest.approx(ref["m2"], rel=RTOL)
    assert row[stats.G_VAR] == pytest.approx(ref["var"], rel=RTOL)
    w = (torch.randn(300, 200, generator=g) * scale).to(dtype)
    b = (torch.randn(20000, generator=g) * scale).to(dtype)
    wa, ba, a = (t.double().numpy() for t in (w, b, x))
    row = host(stats.weight(w, b))
    assert row[stats.W_SECOND_MOMENT] == pytest.approx((wa * wa).mean(), rel=RTOL)
    assert row[stats.B_SECOND_MOMENT] == pytest.approx((ba * ba).mean(), rel=RTOL)
    ratio = host(stats.grad_ratio(x, w, stats.weight(w, b)))[0]
    assert ratio == pytest.approx(np.linalg.norm(a) / np.linalg.norm(wa), rel=RTOL)


class Residual(nn.Module):
    """A chain (where gradient buffers are shared between calls) and a residual add
    (where two gradients meet, so no buffer may be reused for the other)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(24, 24)
        self.act = nn.ReLU()
        self.b = nn.Linear(24, 24)

    def forward(self, x):
        h = self.act(self.a(x))
        return self.b(h) + h


def test_recorded_gradients_match_autograd_with_shared_buffers():
    torch.manual_seed(0)
    model = Residual()
    x, g = torch.randn(64, 24), torch.randn(64, 24)
    report = varprobe.probe(model, x, grad_output=g)
    xin = x.clone().requires_grad_()
    y = model.a(xin)
    h = model.act(y)
    for t in (y, h):
        t.retain_grad()
    (model.b(h) + h).backward(g)
    layers = {layer.name: layer for layer in report.layers}

    def var(t):
        return t.grad.double().var(unbiased=False).item()

    assert layers["a"].backward.var == pytest.approx(var(y), rel=RTOL)
    assert layers["act"].backward_input.var == pytest.approx(var(y), rel=RTOL)
    assert layers["act"].backward.var == pytest.approx(var(h), rel=RTOL)  # both branches
    assert layers["b"].backward_input.var == pytest.approx(
        g.double().matmul(model.b.weight.double()).var(unbiased=False).item(), rel=RTOL)
    assert layers["a"].backward_input.var == pytest.approx(var(xin), rel=RTOL)


def test_bfloat16_model_recorded_against_float64():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).bfloat16()
    x = torch.randn(256, 64).bfloat16()
    outputs = []
    handles = [m.register_forward_hook(lambda m, i, o: outputs.append(o.detach()))
               for m in model]
    report = varprobe.probe(model, x, grad_output=torch.randn(256, 32).bfloat16())
    for h in handles:
        h.remove()
    assert report.layers[0].dtype == "bfloat16"
    for layer, out in zip(report.layers, outputs):
        a = out.double().numpy()
        assert layer.forward.var == pytest.approx(a.var(), rel=RTOL)
        assert layer.forward.second_moment == pytest.approx((a * a).mean(), rel=RTOL)


class Scaled(nn.Module):
    """A chain, an activation, a residual add and a product with a constant buffer (a
    graph constant whose moments travel with the statistics)."""

    def __init__(self):
        super().__init__()
        self.a, self.act, self.b = nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 16))

    def forward(self, x):
        h = self.act(self.a(x))
        return self.b(h) * self.scale + h


HOST_READS = ("cpu", "item", "tolist", "numpy", "__float__", "__int__", "__bool__",
              "__index__")


class Normed(nn.Module):
    """Norms and PReLUs, whose weights, biases and running statistics the predictions
    read, and a graph constant (``scale``)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.act = nn.Linear(16, 16), nn.BatchNorm1d(16), nn.PReLU(16)
        self.b, self.ln, self.act2 = nn.Linear(16, 16), nn.LayerNorm(16), nn.PReLU()
        self.c = nn.Linear(16, 16)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 16))

    def forward(self, x):
        h = self.act(self.bn(self.a(x)))
        return self.c(self.act2(self.ln(self.b(h)))) * self.scale + h


def count_host_reads(monkeypatch) -> list[tuple[str, str]]:
    """(method, caller) of every host read of a tensor from now until
    ``monkeypatch.undo()``, on the accelerators' code path (``reads_are_free`` False).
    The quadrature's nodes are made on the host by theory itself (``expectation``,
    ``_quadrature``): reading them is no transfer, so they are left out."""
    monkeypatch.setattr(stats, "reads_are_free", lambda device: False)
    calls: list[tuple[str, str]] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_name
            if caller not in ("expectation", "_quadrature", "_points"):  # quadrature on CPU
                calls.append((_name, caller))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize(("model", "mode"), [(Scaled, None), (Normed, "train"),
                                             (Normed, "eval")])
def test_one_host_read_per_probe(monkeypatch, model, mode):
    """By design one device-to-host transfer per pass: on the code path accelerators
    take (``reads_are_free`` False), every Tensor method that brings a value to the host
    is counted, with its caller, during a whole probe (the pass, the report, the graph's
    constants, the predictions from norm and PReLU parameters and running statistics,
    and the diagnosis). Only ``stats.collect`` may read: ``.cpu()`` once, then
    ``.tolist()`` of that host copy (``count_host_reads``). On CUDA, ``python -m bench``
    checks the same with ``torch.cuda.set_sync_debug_mode``."""
    torch.manual_seed(0)
    model, x = model(), torch.randn(32, 16)
    with torch.no_grad():  # away from their defaults, so that reading them matters
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm, nn.PReLU)):
                for t in (*m.parameters(), *m.buffers()):
                    if t.is_floating_point():
                        t.uniform_(0.2, 0.9)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias -= m.bias.mean()  # no common mean: the norm's closed form below
    calls = count_host_reads(monkeypatch)
    report = varprobe.probe(model, x, mode=mode)
    monkeypatch.undo()
    assert calls == [("cpu", "collect"), ("tolist", "collect")]
    assert all(layer.forward is not None for layer in report.layers)
    assert not any("graph: not used" in note for note in report.notes)
    if isinstance(model, Normed):
        check_parameters_read(model, {layer.name: layer for layer in report.layers},
                              mode, x)


def check_parameters_read(model: Normed, layers: dict, mode: str,
                          x: torch.Tensor) -> None:
    """The predictions use the actual norm and PReLU values (not their defaults): each
    is the closed form of theory.md on them. The same float64 arithmetic in another
    order: 1e-12 relative."""
    def host(t):
        return t.detach().double()

    for act, after in ((model.act, "b"), (model.act2, "c")):  # PReLU: a = rms(a_c)
        assert layers[after].input_gain == pytest.approx(
            (1 + host(act.weight).square().mean().item()) / 2, rel=1e-12)
    q = layers["b"].predicted.forward_var  # LayerNorm: mean(gamma^2 q/(q+eps) + beta^2)
    gamma, beta = host(model.ln.weight), host(model.ln.bias)
    kept = q / (q + model.ln.eps)
    assert layers["ln"].predicted.forward_var == pytest.approx(
        (gamma.square() * kept + beta.square()).mean().item(), rel=1e-12)
    if mode == "eval":  # BatchNorm on its running statistics, per channel (theory.normshape)
        a, bn = layers["a"], model.bn
        with torch.no_grad():
            h = model.a(x).double()  # the norm's input, as measured: channel means, variances
        mu, v = h.mean(0), h.var(0, unbiased=False)
        k = math.sqrt(a.predicted.forward_var / h.square().mean().item())  # the walk's scale
        g, b, m = host(bn.weight), host(bn.bias), host(bn.running_mean)
        sd = (host(bn.running_var) + bn.eps).sqrt()
        out = g * (k * mu - m) / sd + b  # each channel's mean, and its variance below
        expected = out.square() + (g / sd).square() * k * k * v
        # the channel sums are float32 reductions (normshape.measure): relative error
        # about eps_32 * log2(n), 1e-6 is ~10x that
        assert layers["bn"].predicted.forward_var == pytest.approx(expected.mean().item(),
                                                                   rel=1e-6)


def test_zero_and_dead_fractions_after_activations_only():
    torch.manual_seed(0)
    report = varprobe.probe(Scaled(), torch.randn(32, 16))
    a, act, b = report.layers
    assert act.forward.zero_fraction is not None and act.forward.dead_fraction is not None
    for layer in (a, b):
        assert layer.forward.zero_fraction is None and layer.forward.dead_fraction is None
        assert "activations" in layer.unavailable["zero_fraction"]
        assert "activations" in layer.unavailable["dead_fraction"]
    row = host(stats.activation(torch.randn(30, 20), -1, units=False))
    assert row[stats.ZERO_FRACTION] is None and row[stats.DEAD_FRACTION] is None


def test_strided_tensor_and_odd_sizes(chunked):
    # Not dense in any order of its dims (every other column), and a size that is not a
    # multiple of the CPU sum of squares' row length.
    x = relu_with_dead_units(300, 77)[:, ::2]
    assert not x.is_contiguous() and x.numel() % torch_kernels.BLOCK
    check_activation(x)
    check_activation(relu_with_dead_units(61, 7, 5, channel_dim=1), channel_dim=1)


def test_a_strided_row_longer_than_a_chunk(chunked, recwarn):
    # One row of a tensor that is not dense holds more elements than a chunk of scratch
    # (5000 > 1000 where chunked; a UNet's 128x128 maps hold 2^18 in one row on the CPU).
    x = relu_with_dead_units(2, 12, 5000)[:, ::2, :]
    assert not x.is_contiguous()
    check_activation(x)
    assert not [w for w in recwarn if "resized" in str(w.message)]


def test_grad_ratio_of_a_zero_weight():
    w = torch.zeros(4, 3)
    assert host(stats.grad_ratio(torch.ones(4, 3), w, stats.weight(w, None)))[0] == np.inf
    assert np.isnan(host(stats.grad_ratio(torch.zeros(4, 3), w, stats.weight(w, None)))[0])


def test_cpu_sums_without_numba_installed(monkeypatch):
    """Where numba cannot be imported the CPU sums are torch's, and the same numbers."""
    monkeypatch.setitem(sys.modules, "numba", None)  # what an install without it sees
    monkeypatch.delitem(sys.modules, "varprobe.kernels", raising=False)
    monkeypatch.delattr(varprobe, "kernels", raising=False)
    assert kernel_choice._load_numba.__wrapped__(True) is None
    monkeypatch.setattr(kernel_choice, "numba_kernels", lambda: None)
    assert kernel_choice.cpu_kernels().__name__ == "varprobe.torch_kernels"
    check_activation(relu_with_dead_units(64, 8, 5, 5, channel_dim=1), channel_dim=1)
    check_activation(relu_with_dead_units(300, 70))


@pytest.mark.parametrize("n", [1, 255, 256, 16384, 16385, 70003])
def test_torch_square_sum_is_the_sums_second_value(n):
    """torch's one-read sum of squares (a weight gradient's norm) equals the second value
    of its two-read ``sums`` exactly (the same row norms, or numpy's float64 dot up to
    SMALL elements) and float64's to float32 rounding: both sides of SMALL and of a whole
    number of rows."""
    from varprobe import torch_kernels

    a = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3 + 0.5).numpy()
    got = torch_kernels.square_sum(a)
    assert got == torch_kernels.sums(a, np.float32(0), np.float32(0))[1]
    assert got == pytest.approx(float(a.astype(np.float64) @ a.astype(np.float64)), rel=RTOL)


# aten ops that make the host wait for an accelerator: a value read (item), or an output
# whose size depends on the data. On the CPU they cost nothing, so only their calls show.
WAITS = ("_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive",
         "masked_select", "is_nonzero", "equal")
HOST_SIDE = ("expectation", "_quadrature", "_points", "collect")  # host tensors of their own


class _AttentionNet(nn.Module):
    """Projections into a causal SDPA call and a spelled-out (eager) one: the attention
    paths' backward hooks subsample (batch, head) slices on the tensors' device."""

    def __init__(self, n: int = 32, heads: int = 4):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(n, n) for _ in range(4))
        self.heads = heads

    def forward(self, x):
        b, t, n = x.shape
        q, k, v = (f(x).view(b, t, self.heads, -1).transpose(1, 2)
                   for f in (self.q, self.k, self.v))
        z = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.o((z + p @ v).transpose(1, 2).reshape(b, t, n))


@pytest.mark.parametrize("model", [Normed, _AttentionNet])
def test_nothing_waits_for_the_device_during_a_probe(monkeypatch, model):
    """No aten op that would make the host wait for a GPU (listed in WAITS, or indexing
    by a boolean mask) runs during a probe on the accelerators' code path, except
    inside ``stats.collect`` (the one transfer) and the quadrature's own host tensors.
    A dispatch mode sees every op, also those inside torch functions and the backward's
    hooks, which the Tensor-method count above cannot."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(stats, "reads_are_free", lambda device: False)
    seen: list[tuple[str, str]] = []

    class Waits(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            boolean = name == "index" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
            if name in WAITS or boolean:
                frames = [f.name for f in traceback.extract_stack()]
                if not any(f in HOST_SIDE for f in frames):
                    seen.append((name, " < ".join(frames[-6:-1])))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    net = model()
    x = torch.randn(4, 8, 32) if model is _AttentionNet else torch.randn(32, 16)
    with Waits():
        report = varprobe.probe(net, x)
    assert seen == [], seen
    if model is _AttentionNet:
        assert report.attention  # the attention calls were followed


def test_collect_returns_every_value_in_its_place(monkeypatch):
    """``collect`` copies 0-d values grouped by dtype (one stack each), vectors and
    host floats in one transfer and hands each Pending its values in order: a 0-d
    raw, a vector raw, and Parts mixing int64 and float64 0-d values, host floats and
    a vector, on the accelerators' path."""
    monkeypatch.setattr(stats, "reads_are_free", lambda device: False)
    f64 = torch.float64
    pending = [
        stats.Pending(torch.tensor(2.5), list),
        stats.Pending(torch.tensor([1.0, 2.0]), list),
        stats.Pending(stats.Parts([torch.tensor(3), 4.0, torch.tensor(5.0, dtype=f64),
                                   torch.tensor([6.0, 7.0]), torch.tensor(8)]), list),
        stats.Pending([9.0], list),
        stats.Pending(stats.Parts([torch.tensor(10.0, dtype=f64), torch.tensor(11.0)]), list),
    ]
    assert stats.collect(pending) == [[2.5], [1.0, 2.0], [3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
                                      [9.0], [10.0, 11.0]]


def _foreach_norm_without_dtype(tensors, ord=2, **kwargs):
    if kwargs:  # as torch before 2.4 answers the dtype keyword
        raise TypeError("_foreach_norm() got an unexpected keyword argument 'dtype'")
    return [torch.linalg.vector_norm(t, ord) for t in tensors]


@pytest.mark.parametrize("chunk", [None, 1000, "old torch"])
def test_weight_grad_ratios_on_the_accelerators_path(monkeypatch, chunk):
    """||dL/dW|| / ||W|| per weight layer and the weight's moments, on the accelerators'
    path (the gradients' norms by one torch._foreach_norm, squared in float64; the
    weights' moments whole or, with chunks of 1000 elements, combined on the host
    from each chunk's; and, with a torch whose _foreach_norm takes no dtype, the norms
    one at a time), equal float64 autograd on a copy of the model. A layer whose
    weight is scaled by 1e-30 has gradients and weights far below float32's squares'
    range. Tolerance: float32 values summed in float64, 1e-6 relative."""
    monkeypatch.setattr(stats, "reads_are_free", lambda device: False)
    if chunk == "old torch":  # no dtype in _foreach_norm: the norms one at a time
        monkeypatch.setattr(torch, "_foreach_norm", _foreach_norm_without_dtype)
    elif chunk is not None:
        monkeypatch.setattr(stats, "chunk_size", lambda device: chunk)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 60), nn.Tanh(), nn.Linear(60, 50), nn.Tanh(),
                          nn.Linear(50, 30))
    with torch.no_grad():
        model[2].weight.mul_(1e-30)
        model[2].bias.zero_()
    x, g = torch.randn(16, 40), torch.randn(16, 30)
    report = varprobe.probe(model, x, grad_output=g, mode=None)
    twin = _double_copy(model)
    twin(x.double()).backward(g.double())
    layers = {layer.name: layer for layer in report.layers}
    for name in ("0", "2", "4"):
        w = twin.get_submodule(name).weight
        want = (w.grad.norm() / w.norm()).item()
        assert layers[name].weight_grad_ratio == pytest.approx(want, rel=1e-6), name
        assert layers[name].weight_var == pytest.approx(w.var(unbiased=False).item(),
                                                        rel=1e-6), name


def _double_copy(model: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(model).double()


@pytest.mark.parametrize("path", ["cpu", "accelerator path"])
def test_no_activation_outlives_the_backward(monkeypatch, path):
    """No stored activations: when the one transfer starts (after the backward) no
    module's output is still alive, on either code path (the BatchNorms' deferred
    per-channel measurement, the moments' host folds and every hook keep numbers, not
    tensors). The network's output, which the probe still reads, is left out."""
    import gc
    import weakref

    if path == "accelerator path":
        monkeypatch.setattr(stats, "reads_are_free", lambda device: False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8).eval(), nn.GELU(),
                          nn.Flatten(), nn.LayerNorm(800), nn.Linear(800, 10))
    refs: list[weakref.ref] = []
    handles = [m.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
               for m in list(model)[:-1]]
    alive: list[int] = []
    original = stats.collect

    def checking(pending):
        gc.collect()
        alive.extend(i for i, r in enumerate(refs) if r() is not None)
        return original(pending)

    monkeypatch.setattr(stats, "collect", checking)
    try:
        varprobe.probe(model, torch.randn(4, 3, 10, 10))
    finally:
        for h in handles:
            h.remove()
    assert refs and not alive


def test_the_cotangent_is_read_once(monkeypatch):
    """The output's gradient is the cotangent's own buffer: read once, for the last
    layer's backward and for the cotangent's scale (a language model's logits gradient
    is its largest tensor)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 64))
    x, g = torch.randn(8, 16), torch.randn(8, 64)
    reads, real = [], stats.gradient
    monkeypatch.setattr(stats, "gradient", lambda t: reads.append(t.data_ptr()) or real(t))
    report = varprobe.probe(model, x, grad_output=g)
    assert reads.count(g.data_ptr()) == 1
    truth = g.double().var(unbiased=False).item()
    assert report.layers[-1].backward.var == pytest.approx(truth, rel=RTOL)
