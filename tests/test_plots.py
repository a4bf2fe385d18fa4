"""The report figure: written, decodable, the right size, deterministic, legible at any
depth, and drawable from a saved report; `varprobe plot` exit codes."""

from __future__ import annotations

import io
import json
import time
from itertools import pairwise
from pathlib import Path

import matplotlib.image
import pytest
from matplotlib.patches import Rectangle

from tests import synthetic
from tests.cli_helpers import run
from varprobe.errors import VarprobeError
from varprobe.render import plots
from varprobe.report import ForwardStats, Report

WIDTH, HEIGHT = 1400, 900  # plots.SIZE_IN at plots.DPI

TINY_MODEL = """
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                      nn.Linear(32, 8))
"""


def pixels(data: bytes):
    return matplotlib.image.imread(io.BytesIO(data), format="png")


def round_trip(report: Report) -> Report:
    return Report.from_dict(json.loads(report.to_json()))


def test_png_is_written_decodes_and_has_the_expected_size(tmp_path):
    path = plots.save(synthetic.chain(30, intervals=True), tmp_path / "fig.png")
    image = pixels(path.read_bytes())
    assert image.shape[:2] == (HEIGHT, WIDTH)
    assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]  # no temporary left over


@pytest.mark.parametrize("fmt, magic", [("svg", b"<svg"), ("pdf", b"%PDF")])
def test_svg_and_pdf_by_extension_are_deterministic(tmp_path, fmt, magic):
    report = synthetic.chain(8)
    first = plots.save(report, tmp_path / f"a.{fmt}").read_bytes()
    assert magic in first[:200]
    assert plots.render(report, fmt) == first


def test_json_round_trip_draws_the_same_bytes():
    report = synthetic.chain(30, intervals=True)
    assert plots.render(round_trip(report)) == plots.render(report)


def _labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_null_predictions_still_plot_the_measurement():
    fig = plots.figure(synthetic.without_predictions(synthetic.chain(10)))
    forward = fig.axes[0]
    assert _labels(forward) == ["measured"]
    assert pixels(plots.render(synthetic.without_predictions(synthetic.chain(10)))).shape[:2] \
        == (HEIGHT, WIDTH)


def test_predictions_without_measurements_plot_the_predictions():
    """What `varprobe predict` writes: measured fields null."""
    report = synthetic.chain(10)
    for layer in report.layers:
        layer.input = layer.forward = layer.backward = None
    labels = _labels(plots.figure(report).axes[0])
    assert "measured" not in labels
    assert {"predicted (this init)", "Xavier init (predicted)", "He init (predicted)"} \
        <= set(labels)
    plots.render(report)


def test_a_single_layer_plots():
    fig = plots.figure(synthetic.chain(1))
    assert len(fig.axes) == 4
    assert [t.get_text() for t in fig.axes[2].get_xticklabels()] == ["layers.0"]
    plots.render(synthetic.chain(1))


def test_a_report_without_weight_layers_plots_every_layer():
    report = synthetic.chain(3)
    for layer in report.layers:
        layer.kind = "other"
    fig = plots.figure(report)
    assert fig.axes[0].get_xlim()[1] == pytest.approx(len(report.layers) + 0.6)


def test_nonfinite_and_zero_values_do_not_break_the_log_axes():
    report = synthetic.chain(6)
    report.weight_layers[2].forward = ForwardStats(None, None, float("inf"), nonfinite=10)
    report.weight_layers[3].forward.second_moment = 0.0
    report.weight_layers[4].backward = None
    plots.render(report)


def test_flags_are_marked_on_the_panel_of_their_direction():
    report = synthetic.chain(30)
    fig = plots.figure(report)

    def rug(ax) -> int:
        return sum(isinstance(p, Rectangle) and p.get_height() == 0.035 for p in ax.patches)

    # layer 1: vanishing_backward only; layers 2..30: shrinks (no direction), and
    # vanishing_forward from the 8th on. The dead_units flag sits on a ReLU in a block
    # that is already flagged.
    assert rug(fig.axes[0]) == 29
    assert rug(fig.axes[1]) == 30


def _level_lines(ax) -> set[float]:
    return {round(line.get_ydata()[0], 12) for line in ax.get_lines()
            if line.get_label().startswith("_") and len(set(line.get_ydata())) == 1}


def test_the_forward_panel_is_over_each_reference_and_the_band_the_diagnosed_one():
    report = synthetic.chain(12)
    report.input.second_moment = 4.0
    for layer in report.layers:
        layer.reference_second_moment = None  # no structure: the network input is it
    assert _level_lines(plots.figure(report).axes[0]) == {0.01, 100.0}
    report.settings["thresholds"]["forward"] = [1e-3, 1e3]
    fig = plots.figure(report)
    assert _level_lines(fig.axes[0]) == {0.001, 1000.0}
    measured = next(line for line in fig.axes[0].get_lines() if line.get_label() == "measured")
    inputs = [la.input.second_moment / 4.0 for la in report.weight_layers]
    assert list(measured.get_ydata()) == pytest.approx(inputs)
    # each layer's own reference, where the structure gave one
    for k, layer in enumerate(report.weight_layers):
        layer.reference_second_moment = 2.0 ** k
    measured = next(line for line in plots.figure(report).axes[0].get_lines()
                    if line.get_label() == "measured")
    assert list(measured.get_ydata()) == pytest.approx(
        [la.input.second_moment / 2.0 ** k for k, la in enumerate(report.weight_layers)])
    # Backward, the diagnosis multiplies measured multipliers: no band on this axis.
    assert _level_lines(fig.axes[1]) == set()


def _no_overlap(fig, texts) -> None:
    renderer = fig.canvas.get_renderer()
    boxes = sorted((t.get_window_extent(renderer) for t in texts if t.get_text()),
                   key=lambda b: b.x0)
    for left, right in pairwise(boxes):
        assert left.x1 <= right.x0 + 0.5, "tick labels overlap"


@pytest.mark.parametrize("n", [5, 30, 300])
def test_labels_are_thinned_and_never_overlap(n):
    report = synthetic.chain(n)
    for layer in report.layers:  # long qualified names, as in real models
        layer.name = f"encoder.blocks.{layer.index}.attention.output.dense"
    fig = plots.figure(report)
    fig.canvas.draw()
    for ax in fig.axes:
        _no_overlap(fig, ax.get_xticklabels())
        title = ax.title.get_window_extent(fig.canvas.get_renderer())
        assert title.x1 <= ax.get_window_extent().x1 + 1, f"title too wide: {ax.title}"
    names = fig.axes[2].get_xticklabels()
    assert 1 <= len(names) <= plots.MAX_NAME_LABELS


def test_300_layers_render_in_reasonable_time():
    report = synthetic.chain(300, step=0.97, intervals=True)
    start = time.perf_counter()
    data = plots.render(report)
    seconds = time.perf_counter() - start
    print(f"300-layer figure: {seconds:.2f} s, {len(data)} bytes")
    assert pixels(data).shape[:2] == (HEIGHT, WIDTH)


def test_bad_paths_are_varprobe_errors_and_leave_nothing(tmp_path):
    report = synthetic.chain(3)
    with pytest.raises(VarprobeError, match=r"\.png, \.svg or \.pdf"):
        plots.save(report, tmp_path / "fig.jpg")
    (tmp_path / "taken.png").mkdir()  # the name is a folder: the final rename fails
    with pytest.raises(VarprobeError, match="cannot write"):
        plots.save(report, tmp_path / "taken.png")
    with pytest.raises(VarprobeError, match="cannot write"):
        plots.save(report, tmp_path / "missing" / "fig.png")
    assert [p.name for p in tmp_path.iterdir()] == ["taken.png"]
    assert not any((tmp_path / "taken.png").iterdir())


# --- the CLI ---------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "report.json"
    path.write_text(synthetic.chain(6).to_json())
    return path


def test_plot_command_draws_a_saved_report(capsys, saved, tmp_path):
    result = run(capsys, "plot", saved, "-o", tmp_path / "fig.svg")
    assert result.code == 0, result.err
    assert (tmp_path / "fig.svg").read_bytes() == plots.render(Report.load(saved), "svg")
    assert run(capsys, "plot", saved).code == 0  # default name: the report's, as .png
    assert pixels((tmp_path / "report.png").read_bytes()).shape[:2] == (HEIGHT, WIDTH)


@pytest.mark.parametrize("content, reason", [
    (None, "cannot read"),
    ("{ not json", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    ('{"schema": "varprobe.report/0"}', "not a varprobe.report/1 report"),
    ('[1, 2]', "not a varprobe.report/1 report"),
    ('{"schema": "varprobe.report/1", "model": {}}', "does not follow varprobe.report/1"),
])
def test_plot_command_refuses_bad_reports_with_exit_2(capsys, tmp_path, content, reason):
    path = tmp_path / "report.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    result = run(capsys, "plot", path, "-o", tmp_path / "fig.png")
    assert result.code == 2
    assert reason in result.err and result.err.count("\n") == 1
    assert not (tmp_path / "fig.png").exists()


def test_plot_command_refuses_unwritable_outputs_with_exit_2(capsys, saved, tmp_path):
    (tmp_path / "taken.png").mkdir()
    for target in (tmp_path / "no" / "fig.png", saved / "fig.png", tmp_path / "taken.png",
                   tmp_path / "fig.gif"):
        result = run(capsys, "plot", saved, "-o", target)
        assert result.code == 2, target
        assert result.err.startswith("varprobe: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "taken.png"]


def test_analyze_png_equals_plot_of_its_json_report(capsys, tmp_path):
    model = tmp_path / "tiny.py"
    model.write_text(TINY_MODEL)
    direct, report = tmp_path / "direct.png", tmp_path / "report.json"
    result = run(capsys, "analyze", model, "-b", "32", "--png", direct, "-o", report)
    assert result.code == 0, result.err
    again = tmp_path / "again.png"
    assert run(capsys, "plot", report, "-o", again).code == 0
    assert again.read_bytes() == direct.read_bytes()


def test_analyze_refuses_a_bad_figure_path_before_running(capsys, tmp_path):
    result = run(capsys, "analyze", tmp_path / "does_not_exist.py", "--png",
                 tmp_path / "fig.bmp")
    assert result.code == 2 and ".png, .svg or .pdf" in result.err


def test_check_draws_the_figure_too(capsys, tmp_path):
    model = tmp_path / "tiny.py"
    model.write_text(TINY_MODEL)
    figure = tmp_path / "check.png"
    result = run(capsys, "check", model, "-b", "32", "--png", figure)
    assert result.code in (0, 1), result.err  # healthy or flagged: it ran
    assert pixels(figure.read_bytes()).shape[:2] == (HEIGHT, WIDTH)
    assert run(capsys, "check", model, "--png", tmp_path / "check.tiff").code == 2
