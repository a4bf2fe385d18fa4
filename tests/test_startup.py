"""``varprobe --help`` and argument errors answer without importing torch, pandas,
matplotlib or numba, and a run imports no sympy (torch's symbolic shapes, ~0.4 s): each
run happens in a fresh interpreter, which then lists what it imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "pandas", "matplotlib", "numba", "sympy")
SCRIPT = f"""
import json, sys
from varprobe.cli import main
sys.argv = ["varprobe", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
print(json.dumps({{"code": code, "heavy": heavy}}))
"""


def run(*args: str, env: dict[str, str] | None = None) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(args)],
                          capture_output=True, text=True, timeout=60, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [
    ("--help",), ("analyze", "--help"), ("predict", "--help"), ("--version",),
])
def test_help_imports_nothing_heavy(args):
    result = run(*args)
    assert result["code"] in (0, None)
    assert result["heavy"] == []


@pytest.mark.parametrize("args", [
    ("analyze",),                                              # missing target
    ("predict", "m.py", "--batch-size", "0"),                  # below the minimum
    ("predict", "m.py", "--input-shape", "3,a,2"),             # not a shape
    ("predict", "m.py", "--init", "bogus"),                    # not a scheme
    ("analyze", "m.py", "--format", "yaml"),                   # not a format
    ("no-such-command",),
])
def test_argument_errors_import_nothing_heavy(args):
    result = run(*args)
    assert result["code"] == 2
    assert result["heavy"] == []


def test_the_check_sees_torch_when_a_command_runs(tmp_path):
    # The probe above is not blind: a real run does import torch.
    model = tmp_path / "m.py"
    model.write_text("from torch import nn\nmodel = nn.Linear(3, 2)\n")
    result = run("predict", str(model), "-f", "json")
    assert result["code"] in (0, None)
    assert "torch" in result["heavy"]
    assert "numba" not in result["heavy"]  # predict measures nothing: no CPU kernels
    measured = run("analyze", str(model), "-f", "json", "--input-shape", "3")
    assert measured["code"] in (0, None)
    # numba's kernels: loaded by a measurement where numba can be imported and is asked
    # for (VARPROBE_NUMBA=1, as the suite sets it); without it the CPU sums are torch's.
    assert ("numba" in measured["heavy"]) == numba_usable()
    default = {k: v for k, v in os.environ.items() if k != "VARPROBE_NUMBA"}
    plain = run("analyze", str(model), "-f", "json", "--input-shape", "3", env=default)
    assert plain["code"] in (0, None)
    assert "torch" in plain["heavy"] and "numba" not in plain["heavy"]  # the default


def test_a_run_imports_no_sympy(tmp_path):
    """A max pool's overlap count (theory.pools) took autograd.grad with a grad_outputs
    tensor, whose shape check imports torch's symbolic shapes: sympy, ~0.4 s once per
    process, in the predictions of every CLI run on a CNN (ResNet-50's 338 ms of
    predictions, 15 ms without)."""
    model = tmp_path / "m.py"
    model.write_text("from torch import nn\nmodel = nn.Sequential(nn.Conv2d(3, 8, 3), "
                     "nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Flatten(), "
                     "nn.Linear(392, 4))\n")
    result = run("analyze", str(model), "-f", "json", "--input-shape", "3,16,16")
    assert result["code"] in (0, None)
    assert "torch" in result["heavy"] and "sympy" not in result["heavy"]


def numba_usable() -> bool:
    if os.environ.get("VARPROBE_NUMBA") != "1":
        return False
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


IMPORT_EACH = """
import importlib, pkgutil, sys
import torch  # loaded once; varprobe's modules are dropped between imports
import varprobe
names = sorted(m.name for m in pkgutil.walk_packages(varprobe.__path__, "varprobe.")
               if not m.name.endswith("__main__"))  # that one runs the CLI
failed = []
for name in names:
    for loaded in [k for k in sys.modules if k == "varprobe" or k.startswith("varprobe.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ImportError as exc:
        failed.append(f"{name}: {exc}")
print("\\n".join(failed))
"""


def test_every_module_imports_first():
    """Each module imports on its own, as the first of varprobe's: no import cycle that
    only the usual order hides (structure and diagnose.forward had one)."""
    done = subprocess.run([sys.executable, "-c", IMPORT_EACH], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ""
