"""The terminal table: complete numbers in a narrow terminal, nothing cut when piped."""

from __future__ import annotations

import io
import re

import torch
from rich.console import Console
from torch import nn

import varprobe
from varprobe.render.terminal import render


def report():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    return varprobe.probe(model, batch_size=8)


def rendered(width: int, terminal: bool) -> str:
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=terminal, no_color=True)
    render(report(), console)
    return re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue())  # bold/dim styles


def header_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.lstrip().startswith("#"))


def test_a_narrow_terminal_drops_optional_columns_not_digits():
    narrow = rendered(80, terminal=True)
    head = header_line(narrow)
    for essential in ("layer", "fwd E[y²]", "meas/pred", "bwd Var", "flags"):
        assert essential in head
    assert "gain" not in head and "type" not in head
    assert "…" not in narrow
    assert max(len(line) for line in narrow.splitlines()) <= 80


def test_a_wide_terminal_and_a_pipe_show_every_column():
    for text in (rendered(200, terminal=True), rendered(60, terminal=False)):
        head = header_line(text)
        for column in ("type", "fan_in", "n·Var[w]", "act", "gain", "pred"):
            assert column in head
        assert "…" not in text
