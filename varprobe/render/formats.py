"""Text formats of a report (JSON, CSV, Markdown) and writing them to files."""

from __future__ import annotations

import os
from pathlib import Path

from varprobe.report import Report, write_atomic

BY_SUFFIX = {".json": "json", ".csv": "csv", ".md": "markdown", ".markdown": "markdown"}


def text(report: Report, fmt: str, image: Path | None = None,
         folder: Path | None = None) -> str:
    """The report as text. Markdown links ``image`` (the figure) by its path relative to
    ``folder``, where the document will live (default: the current directory)."""
    if fmt == "json":
        return report.to_json() + "\n"
    if fmt == "csv":
        return report.to_frame().to_csv(index=False)
    if fmt == "markdown":
        from varprobe.render.markdown import markdown

        return markdown(report, _link(image, folder or Path.cwd()) if image else None)
    raise ValueError(f"unknown format {fmt!r}")


def write(report: Report, path: Path, image: Path | None = None) -> None:
    """Write by extension (.json, .csv, .md), atomically; Markdown links ``image``."""
    path = Path(path)
    fmt = BY_SUFFIX.get(path.suffix.lower(), "json")
    write_atomic(path, text(report, fmt, image, folder=path.absolute().parent))


def _link(image: Path, start: Path) -> str:
    """The image's path as a Markdown document in ``start`` reaches it."""
    return Path(os.path.relpath(Path(image).absolute(), start)).as_posix()
