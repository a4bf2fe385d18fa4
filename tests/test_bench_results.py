"""bench.results.write: a run replaces only its own machine's runs; the other benches'
subsections of that machine, other machines and the history stay."""

from __future__ import annotations

from bench import results


def _run(when: str) -> dict:
    return {"when": when, "command": "python -m bench", "info": {"CPU": "A"}, "threads": []}


def test_a_run_keeps_the_other_benches_subsections(tmp_path):
    path = tmp_path / "RESULTS.md"
    key = "CPU A, 2 logical cores; torch x"
    path.write_text("\n".join([
        "# intro", "", f"## Machine: {key}", "",
        results.PRECISION, "", "precision figures", "",
        results.PRECISION_OWN, "", "own CPU time figures", "",
        "### Run of first", "", "old run", "",
        "## Machine: CPU B; torch y", "", "### Run of b", "", "b's run", "",
        "## History", "", "history text", ""]))
    results.write(path, key, _run("second"))
    text = path.read_text()
    for kept in ("precision figures", "own CPU time figures", "b's run", "history text",
                 "### Run of second", "old run"):
        assert kept in text, kept
    assert text.index("### Run of second") < text.index("### Run of first")
