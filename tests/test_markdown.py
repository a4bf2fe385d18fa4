"""The Markdown report: verdict, flags, the per-layer table, and the figure's link."""

from __future__ import annotations

import re

from tests import synthetic
from tests.cli_helpers import run
from tests.test_plots import TINY_MODEL
from varprobe.render import formats
from varprobe.render.markdown import FOLD_ROWS, markdown
from varprobe.report import Summary


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ")]


def cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]


def test_verdict_flags_and_rows():
    report = synthetic.chain(12)
    text = markdown(report)
    s = report.summary
    assert text.startswith(f"## ✗ UNHEALTHY · synthetic.py · ChainMLP · {s.errors} errors · "
                           f"{s.warnings} warnings\n")
    assert f"> {s.verdict}" in text
    assert f"**Cause:** {s.cause}" in text
    assert "**Fix** (he init; predicted end-to-end ratio forward" in text
    assert f"```python\n{s.fix.code}\n```" in text
    flags = {cells(r)[1]: cells(r) for r in table_rows(text) if cells(r)[1].startswith("`")}
    assert flags["`vanishing_forward`"][0] == "✗ error"
    vanishing = [la for la in report.layers
                 if any(f.code == "vanishing_forward" for f in la.flags)]
    assert flags["`vanishing_forward`"][2].startswith(f"{len(vanishing)}: `{vanishing[0].label}`")
    # errors come before warnings
    assert text.index("`vanishing_forward`") < text.index("`shrinks`")

    layer_rows = [cells(r) for r in table_rows(text) if cells(r)[0].isdigit()]
    weights = report.weight_layers
    assert len(layer_rows) == len(weights) + 1  # + the flagged ReLU (dead_units)
    first = next(r for r in layer_rows if r[1] == f"`{weights[3].label}`")
    assert first[7] == f"{weights[3].forward.second_moment:.3g}"  # measured E[y²]
    assert first[8] == f"{weights[3].predicted.forward_var:.3g}"  # predicted
    assert first[9] == f"{weights[3].forward.second_moment / weights[3].predicted.forward_var:.2f}"
    assert "! shrinks" in first[-1]


def test_every_row_has_as_many_cells_as_its_header_even_with_pipes_in_messages():
    text = markdown(synthetic.chain(12))
    assert "\\|" in text  # the synthetic vanishing_backward message contains a pipe
    for block in text.split("\n\n"):
        rows = table_rows(block)
        assert len({len(cells(r)) for r in rows}) <= 1, block


def test_healthy_and_undiagnosed_reports_say_so():
    healthy = synthetic.chain(4, flags=False)
    healthy.summary = Summary(healthy=True, verdict="every layer holds the signal")
    assert markdown(healthy).startswith(
        "## ✓ HEALTHY · synthetic.py · ChainMLP · 0 errors · 0 warnings")
    assert "### Flags" not in markdown(healthy)
    bare = synthetic.chain(4, flags=False)
    assert markdown(bare).startswith("## not diagnosed")


def test_null_predictions_show_dashes():
    text = markdown(synthetic.without_predictions(synthetic.chain(3, flags=False)))
    row = next(cells(r) for r in table_rows(text) if cells(r)[0] == "0")
    assert row[8] == row[9] == "—"


def test_long_tables_fold_so_that_the_verdict_stays_on_screen():
    long_text = markdown(synthetic.chain(FOLD_ROWS + 5, flags=False))
    assert "<details><summary>Layers: 45 with weights</summary>" in long_text
    assert "<details>" not in markdown(synthetic.chain(5, flags=False))


def test_the_figure_is_linked_relative_to_the_document(tmp_path):
    report = synthetic.chain(3)
    assert "![varprobe: ChainMLP](fig.png)" in markdown(report, "fig.png")
    (tmp_path / "docs").mkdir()
    formats.write(report, tmp_path / "docs" / "report.md", image=tmp_path / "fig.png")
    assert "](../fig.png)" in (tmp_path / "docs" / "report.md").read_text()
    assert "![" not in markdown(report)


def test_analyze_format_markdown_prints_it_and_links_the_png(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.py").write_text(TINY_MODEL)
    (tmp_path / "out").mkdir()
    result = run(capsys, "analyze", "tiny.py", "-b", "32", "--format", "markdown",
                 "--png", "out/fig.png", "-o", "out/report.md")
    assert result.code == 0, result.err
    assert "](out/fig.png)" in result.out
    assert "](fig.png)" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "fig.png").stat().st_size > 0
    rows = [cells(r) for r in table_rows(result.out) if cells(r)[0].isdigit()]
    assert [r[1] for r in rows] == ["`0`", "`2`", "`4`"]
