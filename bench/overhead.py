"""varprobe's probe, and the simple peer loggers, against a bare forward + backward.

Every side runs the same forward, the same cotangent and the same ``torch.autograd.grad``
call (w.r.t. every parameter and the float input), so the ratio is what the hooks, the
on-device statistics and the report cost on top of the pass itself. The probe runs
under a ``varprobe.timing.Stopwatch`` (a clock read per hook call), which splits its
time into the pass under the hooks, the hooks' own share of it and the analysis after.
"""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import varprobe
from bench import models, peers
from varprobe import kernel_choice, recorder, timing


@dataclass
class Case:
    name: str
    model: nn.Module
    inputs: torch.Tensor
    describe: str


def cases(device: torch.device) -> list[Case]:
    torch.manual_seed(0)
    gpt = models.GPT()
    return [
        Case("MLP", models.mlp(), torch.randn(256, 1024),
             "30 x (Linear 1024->1024, ReLU), batch 256"),
        Case("ResNet", models.ResNet(), torch.randn(64, 3, 32, 32),
             "ResNet-18-style, 3 stages x 2 basic blocks (32/64/128 ch), BN, batch 64 x 3x32x32"),
        Case("GPT", gpt, torch.randint(0, 4096, (8, 256)),
             "4 pre-norm blocks, d 256, 4 heads, vocab 4096, batch 8 x 256 tokens"),
    ]


def cotangent(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        shape = model(x).shape
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(x.device)


def bare(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Any:
    """What probe() does minus varprobe: own the float input, forward, autograd.grad."""
    wrt = [p for p in model.parameters() if p.requires_grad]
    if x.is_floating_point():
        leaf = x.detach().requires_grad_()
        wrt.append(leaf)
        x = leaf.clone()
    out = model(x)
    return torch.autograd.grad([out], wrt, [g], allow_unused=True)


def probed(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Any:
    return varprobe.probe(model, x, grad_output=g, mode=None)


def with_sums(numba: bool) -> Callable:
    """``probed`` with the CPU sums from numba's kernels or from torch's."""
    def run(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Any:
        with sums(numba):
            return probed(model, x, g)
    return run


@contextlib.contextmanager
def sums(numba: bool):
    """The CPU sums (and range kernels) numba's or torch's inside the block."""
    before = os.environ.get("VARPROBE_NUMBA")
    os.environ["VARPROBE_NUMBA"] = "1" if numba else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["VARPROBE_NUMBA"]
        else:
            os.environ["VARPROBE_NUMBA"] = before


def numba_installed() -> bool:
    return kernel_choice._load_numba(True) is not None


def sides(device: torch.device) -> dict[str, Callable]:
    """Name -> fn(model, x, g): the bare pass, varprobe (each kind of CPU sums), peers."""
    out: dict[str, Callable] = {"bare": bare}
    if device.type == "cpu":
        if numba_installed():
            out["varprobe, numba sums"] = with_sums(True)
        out["varprobe, torch sums"] = with_sums(False)
    else:
        out["varprobe"] = probed
    for name, logger in peers.loggers().items():
        out[name] = functools.partial(logger, bare=bare)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timings(case: Case, device: torch.device, repeats: int, warmup: int,
            fns: dict[str, Callable]) -> dict[str, dict[str, list]]:
    """Seconds per call of every side, interleaved so that machine noise hits all.

    Wall-clock and process CPU time: on a shared machine the CPU time of a
    single-threaded run is what the work costs, the wall clock adds the neighbours.
    varprobe's runs also give their phases (``timing``): ``pass``, ``recording``
    (the hooks' share of the pass) and ``analysis`` (collect, predictions, diagnosis).
    """
    g = cotangent(case.model, case.inputs)
    out = {name: {"wall": [], "cpu": [], "pass": [], "pass_cpu": [], "recording": [],
                  "analysis": [], "analysis_cpu": [], "failed": ""} for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            if out[name]["failed"]:
                continue
            sync(device)
            with timing.Stopwatch() as watch:
                start, cpu = time.perf_counter(), time.process_time()
                try:
                    result = fn(case.model, case.inputs, g)
                except Exception as exc:  # a peer that cannot log this model
                    out[name]["failed"] = f"{type(exc).__name__}: {str(exc)[:80]}"
                    continue
                sync(device)
                elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
            del result
            if i >= warmup:
                t = out[name]
                t["wall"].append(elapsed)
                t["cpu"].append(cpu)
                if "pass" in watch.wall:
                    t["pass"].append(watch.wall["pass"])
                    t["pass_cpu"].append(watch.cpu["pass"])
                    t["recording"].append(watch.wall.get("recording", 0.0))
                    t["analysis"].append(watch.analysis())
                    t["analysis_cpu"].append(sum(watch.cpu.get(p, 0.0) for p in timing.ANALYSIS))
    return out


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by torch during ``fn`` above what was live before it.

    CUDA: the caching allocator's counters. CPU: the profiler's allocation events replayed
    in time order (RSS sampling misses short peaks and sees malloc's caching).
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def transfers(case: Case) -> int:
    """Device-to-host transfers per probe on CUDA: syncs outside collect() raise."""
    g = cotangent(case.model, case.inputs)
    original = recorder.Recorder.collect
    count = 0

    def collect(self):
        nonlocal count
        count += 1
        torch.cuda.set_sync_debug_mode(0)
        try:
            return original(self)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    recorder.Recorder.collect = collect
    torch.cuda.set_sync_debug_mode("error")
    try:
        probed(case.model, case.inputs, g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        recorder.Recorder.collect = original
    return count


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(t: dict[str, dict[str, list]], calls: int) -> dict[str, dict]:
    """Per side: median wall and CPU ms, their ratios to the bare pass, the spread of
    the per-round wall ratios (quartiles), and varprobe's phases."""
    bare = t["bare"]
    out = {}
    for name, side in t.items():
        if side["failed"] or not side["wall"]:
            out[name] = {"failed": side["failed"] or "no runs"}
            continue
        ratios = sorted(p / b for p, b in zip(side["wall"], bare["wall"]))
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else ratios * 3
        row = {"wall_ms": 1e3 * median(side["wall"]), "cpu_ms": 1e3 * median(side["cpu"]),
               "wall": median(side["wall"]) / median(bare["wall"]),
               "cpu": median(side["cpu"]) / median(bare["cpu"]), "q1": q1, "q3": q3}
        if side["pass"]:
            row.update(pass_wall=median(side["pass"]) / median(bare["wall"]),
                       pass_cpu=median(side["pass_cpu"]) / median(bare["cpu"]),
                       hooks_ms=1e3 * median(side["recording"]),
                       analysis_ms_per_100=1e5 * median(side["analysis"]) / calls,
                       analysis_cpu_ms_per_100=1e5 * median(side["analysis_cpu"]) / calls)
        out[name] = row
    return out


def run(device: torch.device, repeats: int, warmup: int, log=print) -> list[dict]:
    rows = []
    fns = sides(device)
    for case in cases(device):
        case.model.to(device)
        case.inputs = case.inputs.to(device)
        g = cotangent(case.model, case.inputs)
        model, x = case.model, case.inputs
        calls = len(probed(model, x, g).layers)
        t = timings(case, device, repeats, warmup, fns)
        mem_bare = peak_bytes(functools.partial(bare, model, x, g), device)
        mem_probe = peak_bytes(functools.partial(probed, model, x, g), device)
        row = {"device": device.type, "model": case.name, "describe": case.describe,
               "layers": calls, "repeats": repeats, "sides": summarize(t, calls),
               "mem_bare_mb": mem_bare / 2**20, "mem_probe_mb": mem_probe / 2**20,
               "mem_ratio": mem_probe / mem_bare,
               "transfers": transfers(case) if device.type == "cuda" else None}
        for name, r in row["sides"].items():
            if "failed" in r:
                log(f"{device.type:4} {case.name:7} {name:32} failed: {r['failed']}")
                continue
            log(f"{device.type:4} {case.name:7} {name:32} {r['wall_ms']:8.1f} ms  wall "
                f"{r['wall']:.3f}x  cpu {r['cpu']:.3f}x" + (
                    f"  pass {r['pass_wall']:.3f}x  hooks {r['hooks_ms']:.1f} ms  analysis "
                    f"{r['analysis_ms_per_100']:.1f} ms/100 calls (cpu "
                    f"{r['analysis_cpu_ms_per_100']:.1f})" if "pass_wall" in r else ""))
        log(f"{device.type:4} {case.name:7} peak {row['mem_bare_mb']:.1f} -> "
            f"{row['mem_probe_mb']:.1f} MiB ({row['mem_ratio']:.3f}x)")
        rows.append(row)
        case.model.to("cpu")
    return rows
