"""``varprobe.timing``: the probe's phases, measured only when a stopwatch is open.

No timed assertions: these check the structure (which phases, nested how, every hook
call counted, nothing wrapped when off) and that the phases fit inside the wall time
measured around the probe by the test itself.
"""

from __future__ import annotations

import json
import textwrap
import time

import torch
from torch import nn

import varprobe
from tests.cli_helpers import run
from varprobe import timing
from varprobe.recorder import Recorder

PASS_PHASES = {"pass", "recording", "collect", "predictions", "diagnosis"}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_off_wraps_nothing():
    def hook():
        return None

    assert timing.timed("recording", hook) is hook
    assert timing.phase("pass") is timing.phase("collect")  # the one shared null context
    net = model()
    with Recorder(net):
        hooks = [*net[0]._forward_pre_hooks.values(), *net[0]._forward_hooks.values()]
    assert hooks and not any(hasattr(h, "__wrapped__") for h in hooks)


def test_phases_of_a_probe(monkeypatch):
    adds: list[str] = []
    original = timing.Stopwatch.add

    def counted(self, name, wall, cpu=None):
        adds.append(name)
        original(self, name, wall, cpu)

    monkeypatch.setattr(timing.Stopwatch, "add", counted)
    start = time.perf_counter()
    with timing.Stopwatch() as watch:
        report = varprobe.probe(model(), torch.randn(32, 8))
    outer = time.perf_counter() - start
    assert set(watch.wall) == PASS_PHASES
    assert set(watch.cpu) == PASS_PHASES - {"recording"}  # hooks: wall clock only
    assert 0 < watch.wall["recording"] < watch.wall["pass"]  # the hooks run inside the pass
    # The top-level phases do not overlap: together they fit in the probe's wall time.
    assert sum(watch.wall[p] for p in PASS_PHASES - {"recording"}) <= outer
    assert watch.analysis() == sum(watch.wall[p] for p in timing.ANALYSIS)
    # Every forward pre-hook and forward hook call is timed, and the gradient hooks too.
    assert adds.count("recording") > 2 * len(report.layers)
    assert timing.phase("pass") is timing.phase("diagnosis")  # closed again


def test_lines_per_hundred_calls():
    watch = timing.Stopwatch()
    watch.add("pass", 0.5, 0.4)
    watch.add("collect", 0.002, 0.002)
    watch.add("predictions", 0.004, 0.004)
    watch.add("diagnosis", 0.001, 0.001)
    lines = watch.lines(calls=50)
    row = next(line.split() for line in lines if line.startswith("pass"))
    assert row[1:] == ["500.0", "400.0", "1000.00"]  # 500 ms over 50 calls: 1000 per 100
    assert lines[-1].endswith("analysis (collect + predictions + diagnosis) 14.00 ms per "
                              "100 calls")


def test_analyze_timings_on_stderr(tmp_path, capsys):
    path = tmp_path / "net.py"
    path.write_text(textwrap.dedent("""
        from torch import nn
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    """))
    result = run(capsys, "analyze", path, "-f", "json", "-b", "16", "--timings")
    assert result.code == 0
    report = json.loads(result.out)  # stdout is the report alone
    phases = {line.split()[0] for line in result.err.splitlines()[1:-1]}
    assert phases == PASS_PHASES | {"load", "report"}
    assert result.err.splitlines()[-1].startswith(f"{len(report['layers'])} layer calls")
