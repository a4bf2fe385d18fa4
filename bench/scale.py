"""``varprobe predict`` on a GPT-3-175B-shaped decoder, as a user runs it: the CLI in a
fresh process, timed from launch to exit.

Peak memory is the process's own VmHWM (Linux), printed as it exits: ``ru_maxrss`` of a
child would also count the pages it shared with this (forked) parent before ``exec``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = Path(__file__).with_name("gpt175b.py")
WRAPPER = """
import atexit, sys

def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write(f"VmHWM_kB {line.split()[1]}\\n")

atexit.register(peak)
from varprobe.cli import main
sys.argv = ["varprobe", *sys.argv[1:]]
main()
"""


def run(log=print) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        args = ["predict", str(MODEL), "-f", "json", "-o", str(out)]
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True,
                              text=True)
        seconds = time.perf_counter() - start
        if done.returncode not in (0, 1):  # 1: flags raised
            raise RuntimeError(f"varprobe predict failed: {done.stderr}")
        report = json.loads(out.read_text())
    peak_kb = next(int(line.split()[1]) for line in done.stderr.splitlines()
                   if line.startswith("VmHWM_kB"))
    row = {"command": "varprobe predict bench/gpt175b.py -f json -o report.json",
           "parameters": report["model"]["parameters"], "layers": len(report["layers"]),
           "seconds": seconds, "peak_rss_mb": peak_kb / 1024}
    log(f"predict 175B: {row['parameters'] / 1e9:.1f}B parameters, {row['layers']} calls, "
        f"{seconds:.1f} s, peak RSS {row['peak_rss_mb']:.0f} MiB")
    return row


if __name__ == "__main__":
    run()
