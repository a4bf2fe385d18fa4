"""Run the console entry point in-process, as a shell would, and capture what it says."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

from varprobe import cli


@dataclass
class Result:
    code: int
    out: str
    err: str


def run(capsys: pytest.CaptureFixture, *args: str) -> Result:
    argv = sys.argv
    sys.argv = ["varprobe", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return Result(int(exit_info.value.code or 0), captured.out, captured.err)
