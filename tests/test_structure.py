"""The structure read off the dataflow (varprobe.structure) and the verdicts that use it.

Each model is built to have one structural feature real networks have (token ids into
an embedding, LayerNorm'd branches, LayerScale, squeeze-excitation gates, a module
called several times, a zero-initialized head) and the expected reference, stretch and
verdict follow from the architecture, not from varprobe. The numbers in the assertions
come from He et al.'s recursion: a residual stream x + F(x) with Var[F(x)] = Var[x]
doubles per block; a ReLU layer at Var[w] = 1/n halves the signal.
"""

from __future__ import annotations

import math

import pytest
import torch
import zoo
from torch import nn
from torch.nn import functional as F

from varprobe import probe

WIDTH = 128


def codes(report, severity="error"):
    return {f.code for layer in report.layers for f in layer.flags if f.severity == severity}


def layer(report, name):
    return next(la for la in report.layers if la.name == name)


class TinyLM(nn.Module):
    """GPT-style: token + position embeddings at std 0.02, pre-LN blocks whose branches
    end in a Linear at std 0.02/sqrt(2 L), a final LayerNorm and an LM head."""

    def __init__(self, vocab=500, d=WIDTH, depth=4, seq=32):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(depth))
        self.up = nn.ModuleList(nn.Linear(d, 4 * d) for _ in range(depth))
        self.down = nn.ModuleList(nn.Linear(4 * d, d) for _ in range(depth))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
        for m in self.down:
            nn.init.normal_(m.weight, std=0.02 / math.sqrt(2 * depth))

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        for norm, up, down in zip(self.norms, self.up, self.down):
            x = x + down(F.gelu(up(norm(x))))
        return self.head(self.ln_f(x))


def test_token_ids_are_held_against_the_norms_not_the_embedding_lookup():
    torch.manual_seed(0)
    report = probe(TinyLM(), torch.randint(0, 500, (8, 32)))
    # E[x²] of the stream is about 2 x 0.02² = 8e-4; each LayerNorm'd input is ~1
    assert layer(report, "head").reference == "ln_f"
    assert layer(report, "up.2").reference == "norms.2"
    assert layer(report, "down.2").reference == "norms.2"
    assert layer(report, "down.2").depth == 2
    assert report.summary.errors == 0 and report.summary.warnings == 0


class Residual(nn.Module):
    def __init__(self, d, scale_last: float = 1.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        nn.init.kaiming_normal_(self.fc1.weight, nonlinearity="relu")
        nn.init.normal_(self.fc2.weight, std=scale_last * math.sqrt(1 / d))

    def forward(self, x):
        return x + self.fc2(F.relu(self.fc1(x)))


def test_an_unnormalized_residual_stream_that_doubles_per_block_explodes():
    # fc1 He (2/n) then ReLU keeps E[x²]; fc2 at 1/n gives Var[F(x)] = Var[x]: the stream
    # doubles per block, 2^12 = 4096 after 12 blocks, with nothing to reset it.
    torch.manual_seed(0)
    model = nn.Sequential(*[Residual(WIDTH) for _ in range(12)], nn.Linear(WIDTH, 10))
    report = probe(model, batch_size=256)
    assert "exploding_forward" in codes(report)
    flagged = [la for la in report.layers if any(f.code == "exploding_forward" for f in la.flags)]
    assert flagged[0].reference == "the network input"
    r = flagged[0].flags[0].value
    assert abs(math.log2(r) - 12) < 1.5  # 2^12 within the sampling noise of 12 blocks


def test_the_same_stream_with_zero_initialized_branches_is_healthy():
    torch.manual_seed(0)
    model = nn.Sequential(*[Residual(WIDTH, scale_last=0.0) for _ in range(12)],
                          nn.Linear(WIDTH, 10))
    report = probe(model, batch_size=256)
    assert report.summary.errors == 0


class LayerScaleBlock(nn.Module):
    """ConvNeXt-style: x + gamma * pw2(gelu(pw1(norm(dw(x))))), gamma = 1e-6."""

    def __init__(self, c=64):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.GroupNorm(1, c)
        self.pw1, self.pw2 = nn.Conv2d(c, 4 * c, 1), nn.Conv2d(4 * c, c, 1)
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 1e-6))

    def forward(self, x):
        return x + self.gamma * self.pw2(F.gelu(self.pw1(self.norm(self.dw(x)))))


def test_layer_scale_branches_are_not_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 4, stride=4), nn.GroupNorm(1, 64),
                          *[LayerScaleBlock() for _ in range(6)], nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(64, 10))
    report = probe(model, torch.randn(8, 3, 64, 64))
    assert report.summary.errors == 0
    assert layer(report, "2.pw1").reference == "2.norm"


class SqueezeExcite(nn.Module):
    def __init__(self, c=64, r=4):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * s


def test_squeeze_excitation_gates_are_not_errors_and_the_gate_carries_the_trunk_scale():
    torch.manual_seed(0)
    model = nn.Sequential(zoo.conv_bn(3, 64), SqueezeExcite(), zoo.conv_bn(64, 64),
                          SqueezeExcite(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(64, 10))
    report = probe(model, torch.randn(8, 3, 32, 32))
    assert report.summary.errors == 0
    # the average over positions sets the gate's scale (a zero-mean map averaged over
    # 32x32 positions is ~1000x smaller); the gate x * sigmoid(s) carries x's
    assert layer(report, "1.fc1").reference == "1.fc1 (input)"
    assert layer(report, "1.fc2").reference == "1.fc1 (input)"
    assert layer(report, "1.fc2").depth == 2
    assert layer(report, "2.0").reference == "0.1"


def test_a_module_called_many_times_is_flagged_once_with_its_call_count():
    # One Linear at Var[w] = 1/n applied 30 times with ReLU: the signal halves per call.
    torch.manual_seed(0)
    shared = nn.Linear(WIDTH, WIDTH, bias=False)
    nn.init.normal_(shared.weight, std=math.sqrt(1 / WIDTH))

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.head = shared, nn.Linear(WIDTH, 10)

        def forward(self, x):
            for _ in range(30):
                x = F.relu(self.shared(x))
            return self.head(x)

    report = probe(Loop(), batch_size=256)
    calls = [la for la in report.layers if la.name == "shared"]
    assert len(calls) == 30 and all(la.calls == 30 for la in calls)
    flagged = [f for la in calls for f in la.flags if f.code == "vanishing_forward"]
    assert len(flagged) <= 1
    assert "vanishing_forward" in codes(report)
    every = [f for la in calls for f in la.flags]
    assert len({f.code for f in every}) == len(every)  # each code on one call only
    assert all("called 30 times" in f.message for f in every)


def test_a_zero_initialized_head_is_deliberate():
    torch.manual_seed(0)
    model = zoo.mlp([WIDTH] * 4 + [10], init=zoo.gauss(lambda i, o: 2 / i))
    nn.init.zeros_(model[-1].weight)
    report = probe(model, batch_size=256)
    assert report.summary.errors == 0


def test_a_layer_whose_units_are_all_dead_stops_the_signal():
    torch.manual_seed(0)
    model = zoo.mlp([WIDTH] * 5 + [10], init=zoo.gauss(lambda i, o: 2 / i), bias=True)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.bias.zero_()
        model[2].bias.fill_(-100.0)  # |y| ~ 1: every unit after it is negative, then zero
    report = probe(model, batch_size=256)
    assert "vanishing_forward" in codes(report)
    assert "dead_units" in codes(report, "warning")


class Sinusoidal(nn.Module):
    """A diffusion model's timestep embedding (diffusers' Timesteps, DDPM's
    SinusoidalPosEmb): [cos(t f), sin(t f)] at geometric frequencies, E[x²] = 1/2 for t
    in [0, 1000) whatever t's own scale."""

    def __init__(self, dim=WIDTH):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(1e4) * torch.arange(half) / half))

    def forward(self, t):
        angles = t[:, None].float() * self.freqs
        return torch.cat([angles.cos(), angles.sin()], -1)


class Denoiser(nn.Module):
    """x + MLP(embed(t)) into a He ReLU stack: the time path starts at the embedding."""

    def __init__(self, depth=3):
        super().__init__()
        self.embed = Sinusoidal()
        self.time = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.SiLU(), nn.Linear(WIDTH, WIDTH))
        self.body = zoo.mlp([WIDTH] * (depth + 1), lambda w: nn.init.kaiming_normal_(
            w, nonlinearity="relu"), nn.ReLU, False, 0)

    def forward(self, x, t):
        return self.body(x + self.time(self.embed(t)))


def test_a_float_timestep_is_no_signal_scale_its_embedding_sets_one():
    """t in [0, 1000) has E[t²] ~ 3e5; the time MLP after the embedding is fed ~1/2
    (torch's default Linear init then shrinks it ~1/6 per layer): held against t, its
    layers would look 1e-7 of their reference, a false vanishing error."""
    torch.manual_seed(0)
    model, x = Denoiser(), torch.randn(64, WIDTH)
    for t in (torch.randint(0, 1000, (64,)), torch.randint(0, 1000, (64,)).float()):
        report = probe(model, (x, t))
        assert codes(report) == set()
        first = layer(report, "time.0")
        assert first.reference == "embed"  # the embedding's output, not its input t
        assert first.reference_second_moment == first.input.second_moment
        assert first.reference_second_moment == pytest.approx(0.5, rel=0.05)


class Branch(nn.Module):
    """x + fc3(gelu(fc2(gelu(fc1(ln(x)))))) at std 0.02 (SegFormer's Mix-FFN, ViT's
    init), or the same layers as a plain stack without the skip."""

    def __init__(self, residual: bool):
        super().__init__()
        self.residual = residual
        self.ln = nn.LayerNorm(WIDTH)
        self.fc1, self.fc2, self.fc3 = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.act1, self.act2 = nn.GELU(), nn.GELU()
        self.head = nn.Linear(WIDTH, 10)
        for m in (self.fc1, self.fc2, self.fc3):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x):
        y = self.fc3(self.act2(self.fc2(self.act1(self.fc1(self.ln(x))))))
        return self.head(x + y if self.residual else y)


def test_a_small_residual_branch_is_no_vanishing_gradient():
    """Each layer passes back n·E[w²]·E[gelu'²] ~ 128 · 4e-4 · 0.4 = 0.02 of its
    gradient: fc1 gets ~4e-4 of fc3's. In a plain stack the signal shrinks by as much on
    the way up, so each weight's gradient g^T x stays level (‖∇W‖/‖W‖ alike in the
    three): no vanishing_backward, the small factors are warnings; on a residual branch
    the trunk carries the gradient around it, and fc3, which gets the trunk's gradient
    in full, grows the branch."""
    torch.manual_seed(0)
    x = torch.randn(64, 16, WIDTH)
    plain = probe(Branch(residual=False), x)
    fc1, fc3 = layer(plain, "fc1"), layer(plain, "fc3")
    assert fc1.backward.var < 1e-2 * fc3.backward.var
    assert 0.5 < fc1.weight_grad_ratio / fc3.weight_grad_ratio < 2
    assert "vanishing_backward" not in codes(plain) and "shrinks" in codes(plain, "warning")
    assert not any(la.rejoins for la in plain.layers)
    branch = probe(Branch(residual=True), x)
    assert "vanishing_backward" not in codes(branch)
    assert "shrinks" not in codes(branch, "warning")
    assert [la.name for la in branch.layers if la.rejoins] == ["fc3"]


class Lookup(nn.Module):
    """A table of V rows at N(0, 1) (nn.Embedding's init) read one of two ways, the same
    function: token ids into nn.Embedding, or one-hot rows times the table (a Linear
    without bias); then ``depth`` ReLU layers at std ``body`` and a head at 1/sqrt(d)."""

    def __init__(self, one_hot: bool, body: float, vocab=70, d=WIDTH, depth=8):
        super().__init__()
        self.one_hot, self.vocab = one_hot, vocab
        self.table = nn.Linear(vocab, d, bias=False) if one_hot else nn.Embedding(vocab, d)
        nn.init.normal_(self.table.weight)
        self.body = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))
        self.head = nn.Linear(d, 10)
        for m in self.body:
            nn.init.normal_(m.weight, std=body)
            nn.init.zeros_(m.bias)
        nn.init.normal_(self.head.weight, std=d ** -0.5)

    def forward(self, ids):
        x = self.table(F.one_hot(ids, self.vocab).float() if self.one_hot else ids)
        for m in self.body:
            x = F.relu(m(x))
        return self.head(x)


class OneHotInput(Lookup):
    def forward(self, x):  # the one-hot made outside, as a data loader would
        for m in [self.table, *self.body]:
            x = F.relu(m(x)) if m is not self.table else m(x)
        return self.head(x)


@pytest.mark.parametrize("body, expected", [
    (math.sqrt(2 / WIDTH), set()),              # He: n Var[w] / 2 = 1 per layer
    (0.01, {"vanishing_forward"}),                # 128 x 1e-4 / 2 = 0.0064 per layer
    (3 / math.sqrt(WIDTH), {"exploding_forward"}),  # 9 / 2 = 4.5 per layer, 8 layers
])
def test_a_one_hot_input_is_token_ids_in_disguise(body, expected):
    """One-hot rows times a table are an embedding lookup: the same function of the ids,
    so the same verdict, whatever the table's scale (here nn.Embedding's N(0, 1), 70x
    the one-hot's E[x²] = 1/70) and whether the body is healthy or not."""
    ids = torch.randint(0, 70, (64,), generator=torch.Generator().manual_seed(1))
    reports = []
    for one_hot in (False, True):
        torch.manual_seed(0)
        model = OneHotInput(True, body) if one_hot else Lookup(False, body)
        x = F.one_hot(ids, 70).float() if one_hot else ids
        reports.append(probe(model, x))
    by_ids, by_one_hot = reports
    assert codes(by_ids) == codes(by_one_hot) == expected
    assert by_ids.summary.culprits == by_one_hot.summary.culprits
    assert "unnormalized_input" not in codes(by_one_hot, "warning")
    assert by_one_hot.input.indicator is True
    assert layer(by_one_hot, "body.0").reference == "table"


@pytest.mark.parametrize("values, indicator", [
    ("one-hot", True), ("multi-hot", True), ("halves", False), ("gaussian", False),
    ("nan", False), ("zeros", False),
])
def test_an_indicator_input_is_every_element_zero_or_one(values, indicator):
    g = torch.Generator().manual_seed(0)
    x = {"one-hot": F.one_hot(torch.randint(0, 16, (32,), generator=g), 16).float(),
         "multi-hot": torch.randint(0, 2, (32, 16), generator=g).float(),
         "halves": torch.randint(0, 2, (32, 16), generator=g).float() / 2,
         "gaussian": torch.randn(32, 16, generator=g),
         "nan": torch.tensor([[0.0, 1.0, float("nan")] + [0.0] * 13] * 32),
         "zeros": torch.zeros(32, 16)}[values]
    report = probe(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)), x)
    assert report.input.indicator is indicator


def _bn_stack(gamma_std: float | None, depth: int = 10) -> nn.Sequential:
    """conv -> BatchNorm(eps 1e-3) -> ReLU, ``depth`` times, at PyTorch's default conv
    init; the BatchNorm gammas drawn N(0, gamma_std²) (a generic normal_(0, 0.02) over
    every module's weight, as some libraries' init does), or left at 1 (None)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    c_in = 3
    for _ in range(depth):
        bn = nn.BatchNorm2d(16, eps=1e-3)
        if gamma_std is not None:
            nn.init.normal_(bn.weight, 0.0, gamma_std)
        layers += [nn.Conv2d(c_in, 16, 3, padding=1), bn, nn.ReLU()]
        c_in = 16
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(16 * 8 * 8, 10))


def test_a_norm_whose_input_is_below_its_eps_restores_no_scale():
    """BatchNorm's output is gamma² v/(v + eps) + beta², v the per-channel variance it
    divides by. With gamma ~ N(0, 0.02) the first one sets E[y²] ~ 4e-4; the next conv
    (n·Var[w] = 1/3) and ReLU (1/2) leave a per-channel variance ~7e-5, below eps =
    1e-3 (the conv's bias adds ~2e-3 of per-channel means, which the norm removes), so
    each later norm multiplies its input's scale by ~gamma²/eps instead of resetting it,
    and the signal the first norm set falls ~1/20 per block: ~1e-13 after ten. Held
    against that first norm, not each norm's own output, the stack vanishes; with
    gamma = 1 every norm sets its output's scale and nothing is flagged."""
    x = torch.randn(8, 3, 8, 8)
    model = _bn_stack(0.02)
    gamma2 = [float(m.weight.detach().square().mean())
              for m in model if isinstance(m, nn.BatchNorm2d)]
    small = probe(model, x)
    norms = [la for la in small.layers if la.type == "BatchNorm2d"]
    flagged = [la for la in small.layers
               if any(f.code == "vanishing_forward" for f in la.flags)]
    assert flagged and flagged[0].reference == norms[0].label
    # the first norm sets its gammas' scale; every later one hands on a tenth or less
    assert norms[0].forward.second_moment > 0.5 * gamma2[0]
    assert all(la.forward.second_moment < 0.1 * g2 for la, g2 in zip(norms[1:], gamma2[1:]))
    assert any(note.startswith("structure: 9 norm(s) did not set") for note in small.notes)
    healthy = probe(_bn_stack(None), x)
    assert not codes(healthy)
    assert not any(note.startswith("structure:") for note in healthy.notes)
