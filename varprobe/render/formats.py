"""Text formats of a report (JSON, CSV, Markdown) and writing them to files."""

from __future__ import annotations

from pathlib import Path

from varprobe.report import Report, write_atomic

BY_SUFFIX = {".json": "json", ".csv": "csv", ".md": "markdown", ".markdown": "markdown"}


def text(report: Report, fmt: str) -> str:
    if fmt == "json":
        return report.to_json() + "\n"
    if fmt == "csv":
        return report.to_frame().to_csv(index=False)
    if fmt == "markdown":
        from varprobe.render.markdown import markdown

        return markdown(report)
    raise ValueError(f"unknown format {fmt!r}")


def write(report: Report, path: Path) -> None:
    """Write by extension (.json, .csv, .md), atomically."""
    write_atomic(Path(path), text(report, BY_SUFFIX.get(Path(path).suffix.lower(), "json")))
