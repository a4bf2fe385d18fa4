"""The CLI's hold on Python's garbage collector (varprobe.lifetime) ends with the command.

A command keeps the collector off while the model file loads and freezes what loading
made; a caller that runs commands in its own process (as these tests do) must get the
collector back as it was: enabled or not, nothing of varprobe's frozen, its own freeze
untouched, and one exit hook however many commands it runs.
"""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from tests.cli_helpers import run

MODEL = """
import gc, pathlib
pathlib.Path({seen!r}).write_text(str(gc.isenabled()))
import torch
from torch import nn
model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
{tail}
"""


def model_file(tmp_path, tail: str = "") -> tuple[str, object]:
    seen = tmp_path / "collector_during_load.txt"
    path = tmp_path / "model.py"
    path.write_text(MODEL.format(seen=str(seen), tail=tail))
    return str(path), seen


@pytest.fixture
def collector():
    """The collector as a fresh process has it, and restored after the test."""
    was = gc.isenabled()
    assert gc.get_freeze_count() == 0
    gc.enable()
    yield
    gc.unfreeze()
    (gc.enable if was else gc.disable)()


def test_a_command_loads_without_the_collector_and_leaves_nothing_frozen(
        capsys, tmp_path, collector):
    path, seen = model_file(tmp_path)
    assert run(capsys, "analyze", path).code in (0, 1)
    assert seen.read_text() == "False"  # the model file ran with the collector off
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_a_model_file_that_raises_leaves_the_collector_as_found(capsys, tmp_path, collector):
    path, seen = model_file(tmp_path, tail="raise RuntimeError('broken on purpose')")
    result = run(capsys, "analyze", path)
    assert result.code == 2 and "broken on purpose" in result.err
    assert seen.read_text() == "False"
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_a_disabled_collector_stays_disabled(capsys, tmp_path, collector):
    path, _ = model_file(tmp_path)
    gc.disable()
    assert run(capsys, "analyze", path).code in (0, 1)
    assert not gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_a_callers_own_freeze_is_left_to_it(capsys, tmp_path, collector):
    path, _ = model_file(tmp_path)
    gc.freeze()
    frozen = gc.get_freeze_count()
    assert frozen > 0
    assert run(capsys, "analyze", path).code in (0, 1)
    # not unfrozen (0), and nothing the command made added (frozen objects may die)
    assert 0 < gc.get_freeze_count() <= frozen


EXITS = """
import atexit, gc, sys
real, calls = gc.freeze, []
gc.freeze = lambda: (calls.append(1), real())[1]
atexit.register(lambda: print("exit freezes", len(calls) - made))  # first in: runs last
from varprobe import cli
path = sys.argv[1]
for _ in range(3):
    sys.argv = ["varprobe", "analyze", path]
    try:
        cli.main()
    except SystemExit as exc:
        assert exc.code in (0, 1), exc.code
made = len(calls)
print("command freezes", made)
"""


def test_the_exit_freeze_runs_once_however_many_commands_ran(tmp_path):
    path, _ = model_file(tmp_path)
    done = subprocess.run([sys.executable, "-c", EXITS, path], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if "freezes" in line]
    assert lines == ["command freezes 3", "exit freezes 1"], done.stdout
