"""End to end, as a user runs it: ``varprobe analyze`` / ``check`` on a ResNet-50-style
model at 224x224, batch 16, against a plain script that imports torch, builds the same
model and runs one forward + backward (``python bench/resnet50.py``).

Each command runs in a fresh process, interleaved round by round, at a given number
of intra-op threads (``OMP_NUM_THREADS``); wall time from launch to exit and the
child's CPU time (user + system, from ``getrusage``).
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODEL = Path(__file__).with_name("resnet50.py")
ROOT = Path(__file__).resolve().parent.parent


def commands(numba: bool, device: str = "cpu") -> dict[str, tuple[list[str], dict[str, str]]]:
    """Name -> (argv, extra environment). On the CPU: varprobe with numba's sums
    (``VARPROBE_NUMBA=1``) where numba is installed, and with torch's (the default).
    On an accelerator both sides run there (its statistics are torch's)."""
    varprobe = [sys.executable, "-m", "varprobe"]
    target = [str(MODEL), "--batch-size", "16", "--device", device]
    out = {"plain script": ([sys.executable, str(MODEL), device], {})}
    sums = ((("numba sums", {"VARPROBE_NUMBA": "1"}),) if numba else ()) + (("torch sums", {}),)
    for name, extra in sums if device == "cpu" else (("", {}),):
        suffix = f", {name}" if name else ""
        out[f"varprobe analyze{suffix}"] = ([*varprobe, "analyze", *target], extra)
        out[f"varprobe check{suffix}"] = ([*varprobe, "check", *target], extra)
    return out


def _once(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 1):  # check: 1 means flags raised, not a failure
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def run(threads: int, rounds: int, numba: bool, device: str = "cpu", log=print) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("VARPROBE_NUMBA", None)
    cmds = commands(numba, device)
    times: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in cmds}
    for _ in range(rounds):
        for name, (argv, extra) in cmds.items():
            wall, cpu = _once(argv, {**env, **extra})
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
    plain = times["plain script"]
    rows = {}
    for name, t in times.items():
        wall, cpu = statistics.median(t["wall"]), statistics.median(t["cpu"])
        rows[name] = {"wall_s": wall, "cpu_s": cpu,
                      "wall": wall / statistics.median(plain["wall"]),
                      "cpu": cpu / statistics.median(plain["cpu"])}
        log(f"e2e {device} {threads} thread(s) {name:30} {wall:6.2f} s wall "
            f"({rows[name]['wall']:.3f}x)  {cpu:6.2f} s cpu ({rows[name]['cpu']:.3f}x)")
    return {"threads": threads, "rounds": rounds, "device": device, "rows": rows}
