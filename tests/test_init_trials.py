"""--init (a re-initialized copy, the user's weights untouched) and --trials (means and
95% intervals over seeds), in the library and on the command line."""

from __future__ import annotations

import json
import math
import statistics
import textwrap
import warnings

import pytest
import torch
from torch import nn
from zoo import mlp

from tests.cli_helpers import run
from tests.pristine import assert_untouched, snapshot
from varprobe import VarprobeError, probe, theory
from varprobe.reinit import reinitialized
from varprobe.report import Report
from varprobe.trials import summarize, t_quantile

N, DEPTH = 256, 12


def xavier_mlp(depth: int = DEPTH, n: int = N) -> nn.Sequential:
    model = mlp([n] * (depth + 1), nn.init.xavier_normal_, bias=True)
    for layer in model[::2]:
        nn.init.zeros_(layer.bias)
    return model


def test_init_he_on_a_xavier_model_is_flat_and_leaves_the_model_alone():
    model = xavier_mlp()
    before = snapshot(model)
    report = probe(model, batch_size=128, init="he")
    assert_untouched(model, before)
    assert report.settings["init"] == "he"
    x2 = report.input.second_moment
    for depth, layer in enumerate(report.weight_layers, start=1):
        # docs/theory-review.md §10: the layer-l log error of one draw has sd <= sqrt(5 l/n); 3 sd.
        assert abs(math.log(layer.forward.second_moment / (2 * x2))) <= \
            3 * math.sqrt(5 * depth / N), layer.name
        # The copy's weights are He's: E[w^2] = 2/n up to sampling (rel sd sqrt(2)/n, 4 sd),
        # biases zero.
        assert layer.weight_second_moment == pytest.approx(2 / N, rel=4 * math.sqrt(2) / N)
        assert layer.bias_second_moment == 0.0
    # As it is, the same model vanishes: 2^-(DEPTH-1) end to end.
    as_is = probe(model, batch_size=128)
    assert as_is.settings["init"] == "as-is"
    first, last = as_is.weight_layers[0], as_is.weight_layers[-1]
    ratio = last.forward.second_moment / first.forward.second_moment
    assert abs(math.log(ratio / 2.0 ** -(DEPTH - 1))) <= 3 * math.sqrt(5 * DEPTH / N)


def test_init_is_reproducible_and_independent_of_the_inputs():
    model = xavier_mlp(depth=3, n=32)
    a = reinitialized(model, "xavier", seed=7)
    b = reinitialized(model, "xavier", seed=7)
    c = reinitialized(model, "xavier", seed=8)
    state = torch.get_rng_state()
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if name.endswith("weight"):
            assert not torch.equal(pa, pc), name
    assert torch.equal(state, torch.get_rng_state())
    # The weight stream shares no numbers with the seed's N(0, 1) inputs.
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(7))
    w = a[0].weight / math.sqrt(theory.scheme_variance("xavier", 32, 32))
    assert not torch.isclose(w.flatten()[:8], x.flatten()[:8]).any()


def test_he_prelu_init_uses_the_models_own_slope():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.PReLU(init=0.25), nn.Linear(64, 64))
    copy = reinitialized(model, "he-prelu", seed=0)
    expected = 2 / ((1 + 0.25 ** 2) * 64)
    for layer in (copy[0], copy[2]):
        # 4096 Gaussian entries: relative sd of the sample second moment sqrt(2/4096).
        assert layer.weight.square().mean().item() == pytest.approx(
            expected, rel=4 * math.sqrt(2 / 4096))


def test_unknown_scheme_is_a_usage_error_listing_the_valid_ones():
    with pytest.raises(VarprobeError, match="valid: xavier, he, he-fan-out, he-prelu"):
        probe(xavier_mlp(depth=2, n=8), init="glorot")


def test_trials_hold_the_mean_and_an_interval_that_contains_it():
    model = xavier_mlp(depth=4, n=64)
    calls = []
    report = probe(model, batch_size=32, trials=4, progress=lambda k, K: calls.append((k, K)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert report.settings["trials"] == 4
    singles = [probe(model, batch_size=32, seed=s) for s in range(4)]
    for i, layer in enumerate(report.layers):
        values = [r.layers[i].forward.second_moment for r in singles]
        assert layer.forward.second_moment == pytest.approx(statistics.fmean(values), rel=1e-12)
        lo, hi = layer.intervals["forward.second_moment"]
        assert 0 <= lo <= layer.forward.second_moment <= hi
        half = t_quantile(3) * statistics.stdev(values) / 2
        assert hi - layer.forward.second_moment == pytest.approx(half, rel=1e-9)
        if layer.backward is not None:
            assert "backward.var" in layer.intervals
    assert "input.second_moment" in report.intervals
    assert Report.from_dict(report.to_dict()).layers[0].intervals == report.layers[0].intervals
    # Predictions come from the means: the first layer's local is n E[w^2] mean(E[x^2]).
    first = report.weight_layers[0]
    assert first.local.forward_var == pytest.approx(
        64 * first.weight_second_moment * first.input.second_moment, rel=1e-9)


def test_trials_with_init_draw_new_weights_each_time():
    report = probe(xavier_mlp(depth=3, n=64), batch_size=16, trials=3, init="he")
    lo, hi = report.weight_layers[0].intervals["weight_var"]
    assert lo < report.weight_layers[0].weight_var < hi


def test_t_quantiles_match_the_tables():
    # Student's t, two-sided 95%: the textbook values to the printed 3 decimals.
    for df, value in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262),
                      (30, 2.042), (10**6, 1.960)):
        assert t_quantile(df) == pytest.approx(value, abs=5e-4)
    assert summarize([1.0])[1] is None
    assert summarize([1.0, 3.0], signed=False)[1][0] == 0.0  # clipped: 2 - 12.7 < 0


MODEL = """
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = []
    for i in range(6):
        lin = nn.Linear(64, 64)
        nn.init.xavier_normal_(lin.weight)
        layers += [lin, nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    """


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(textwrap.dedent(MODEL))
    return path


def test_cli_init_trials_and_compare(model_file, capsys):
    result = run(capsys, "analyze", model_file, "-b", "16", "--init", "he", "--trials", "3",
                 "--compare", "all", "-f", "json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["settings"]["init"] == "he" and data["settings"]["trials"] == 3
    layer = data["layers"][0]
    assert set(layer["schemes"]) == set(theory.SCHEMES)
    assert layer["intervals"]["forward.second_moment"][0] <= layer["forward"]["second_moment"]
    table = run(capsys, "analyze", model_file, "-b", "16", "--compare", "xavier,he")
    assert table.code == 0
    header = next(line for line in table.out.splitlines() if "meas/pred" in line)
    assert "xavier" in header and " he " in header + " "
    assert "predicted end to end" in table.out


@pytest.mark.parametrize("args", [("--init", "glorot"), ("--compare", "xavier,glorot"),
                                  ("--trials", "0")])
def test_cli_bad_scheme_or_trials_exit_2(model_file, capsys, args):
    result = run(capsys, "analyze", model_file, *args)
    assert result.code == 2
    assert len(result.err.strip().splitlines()) == 1
    if "trials" not in args[0]:
        assert "he-fan-out" in result.err  # the valid names are listed


def test_the_cli_knows_every_scheme():
    from varprobe.cli import Scheme  # spelled out there so that --help needs no torch

    assert [s.value for s in Scheme] == list(theory.SCHEMES)


@pytest.mark.parametrize("wrap", ["weight_norm", "old weight_norm", "spectral_norm"])
def test_init_refuses_a_computed_weight(wrap):
    """A weight computed at each call (a parametrization, or the old weight_norm hook)
    cannot be re-drawn by copying into it (the copy is thrown away: --init would be a
    silent no-op, and the old hook's tensor cannot even be deep-copied): --init says so
    in one line; probing as it is works."""
    from torch.nn.utils import parametrizations
    from torch.nn.utils import weight_norm as old_weight_norm

    make = {"weight_norm": parametrizations.weight_norm,
            "old weight_norm": old_weight_norm,
            "spectral_norm": parametrizations.spectral_norm}[wrap]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old weight_norm's deprecation
        model = nn.Sequential(make(nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(16, 8)
    with pytest.raises(VarprobeError, match=r"cannot re-draw a computed weight .* at 0;"):
        probe(model, x, init="he")
    assert probe(model, x).layers[0].forward is not None


class _LayerDrop(nn.Module):
    """Six layers, each skipped at random in train mode (LayerDrop 0.5)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(6))

    def forward(self, x):
        for layer in self.layers:
            if not self.training or torch.rand(()) > 0.5:
                x = layer(x).relu()
        return x


def test_trials_that_run_different_layers_say_which_and_why():
    """LayerDrop runs other layers in each trial's seed: refused in one line that names
    them and points at --mode eval, which then works."""
    torch.manual_seed(0)
    model, x = _LayerDrop(), torch.randn(32, 16)
    with pytest.raises(VarprobeError, match=r"ran different layers \(layers\.\d.*--mode eval"):
        probe(model, x, trials=2)
    assert len(probe(model, x, trials=2, mode="eval").layers) == 6
