"""predict on meta runs torch's Python meta kernels without importing torch's compiler,
gives the numbers it gives with the compiler loaded, and leaves torch's kernels as
found. Each case runs in a fresh interpreter, as the import is once per process."""

from __future__ import annotations

import json
import subprocess
import sys

MODEL = """
import torch
from torch import nn

class Block(nn.Module):  # linear (addmm), layer_norm, gelu, normal_: Python meta kernels
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.up = nn.Linear(64, 256)
        self.down = nn.Linear(256, 64)
        nn.init.normal_(self.up.weight, std=0.02)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))

model = nn.Sequential(Block(), Block(), nn.Linear(64, 8))
example_input = torch.randn(4, 16, 64)
"""

SCRIPT = """
import json, sys
if sys.argv[2] == "compiler first":
    import torch._dynamo
import torch
from varprobe import metakernels
from varprobe.predict import predict_target
report = predict_target(sys.argv[1])
marked = [fn for fn in metakernels._wrapped_kernels()
          if getattr(fn, "__dynamo_disable", None) is fn]
print(json.dumps({"compiler": "torch._dynamo" in sys.modules, "left_marked": len(marked),
                  "kernels": len(metakernels._wrapped_kernels()),
                  "layers": [[r.predicted.forward_var, r.predicted.backward_var]
                             for r in report.layers]}))
"""


def run(path, how: str) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(path), how],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_predict_on_meta_leaves_the_compiler_out(tmp_path):
    path = tmp_path / "block.py"
    path.write_text(MODEL)
    fast = run(path, "plain")
    assert fast["compiler"] is False
    assert fast["kernels"] > 0  # the scan found torch's wrapped kernels
    assert fast["left_marked"] == 0  # and every mark was cleared afterwards
    loaded = run(path, "compiler first")
    assert loaded["compiler"] is True
    assert loaded["left_marked"] == 0  # nothing set where torch's own cache applies
    assert fast["layers"] == loaded["layers"]  # the same numbers, to the last bit
    assert all(f is not None for f, _ in fast["layers"])
